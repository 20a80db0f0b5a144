"""PTL's level hand-over, without Ray: one translation stream for all levels (``_TranslationStream``)
pulls ahead, hands each level its rows in training batches and stops at the level's end, and an
unfinished level's stale g_n is removed before anything can read it."""
from __future__ import annotations

import threading

import numpy as np
import pytest

from dass_ray.stages.ptl import SEG_FILE, _TranslationStream, drop_stale_checkpoints, level_dir


def _block(level: int, start: int, k: int) -> dict:
    return {"level": np.full(k, level), "id": np.array([f"{level}-{i}" for i in range(start, start + k)])}


class FakeBlocks:
    """Blocks of ``sizes`` rows per level, like the translation pipeline's output; the first block of
    each level after the first waits for ``gate[level]`` (the actors wait for g_{n-1}); may fail."""

    def __init__(self, sizes: dict[int, list[int]], fail_at: int | None = None):
        self.sizes, self.fail_at = sizes, fail_at
        self.gate = {n: threading.Event() for n in sizes}
        self.started = threading.Event()
        self.handed = 0

    def __iter__(self):
        self.started.set()
        for li, (n, sizes) in enumerate(self.sizes.items()):
            if li:
                assert self.gate[n].wait(10), f"level {n} was never released"
            start = 0
            for k in sizes:
                if self.fail_at == self.handed:
                    raise RuntimeError(f"actor died on block {self.handed}")
                self.handed += 1
                yield _block(n, start, k)
                start += k


def test_stream_pulls_ahead_and_regroups_blocks_into_each_levels_batches():
    src = FakeBlocks({10: [3, 3, 2], 20: [5, 3]})
    stream = _TranslationStream(iter(src), name="t")
    # nobody iterates yet: the pipeline (in PTL: its actors' start-up) runs already
    assert src.started.wait(10), "the pipeline did not start before the stream was iterated"
    got10 = [list(b["id"]) for b in stream.level(10, 8, 4)]
    assert got10 == [["10-0", "10-1", "10-2", "10-3"], ["10-4", "10-5", "10-6", "10-7"]]
    # the level ended at its own last row: level 20's first block was never needed (it waits for g_10)
    assert src.handed == 3
    src.gate[20].set()  # g_10 published
    got20 = [list(b["id"]) for b in stream.level(20, 8, 3)]
    assert got20 == [["20-0", "20-1", "20-2"], ["20-3", "20-4", "20-5"], ["20-6", "20-7"]]  # last one shorter
    stream.close()


def test_stream_refuses_rows_of_another_level_and_a_short_level():
    src = FakeBlocks({10: [4], 20: [4]})
    src.gate[20].set()
    stream = _TranslationStream(iter(src), name="t")
    with pytest.raises(RuntimeError, match=r"level 10: after 4 of its 6 images .* level\(s\) \[20\]"):
        list(stream.level(10, 6, 2))
    src = FakeBlocks({10: [4]})
    stream = _TranslationStream(iter(src), name="t")
    with pytest.raises(RuntimeError, match="level 10: the translation stream ended after 4 of 6 images"):
        list(stream.level(10, 6, 2))


def test_stream_raises_the_pipelines_error_in_the_consumer_through_on_error():
    src = FakeBlocks({10: [2, 2, 2, 2]}, fail_at=2)
    stream = _TranslationStream(iter(src), name="t")
    got = []

    class Named(RuntimeError):
        pass

    with pytest.raises(Named, match="level 10 failed: actor died on block 2") as e:
        for b in stream.level(10, 8, 2, on_error=lambda err: Named(f"level 10 failed: {err}")):
            got.append(list(b["id"]))
    assert got == [["10-0", "10-1"], ["10-2", "10-3"]]  # the batches before the failure, in order
    assert isinstance(e.value.__cause__, RuntimeError) and "block 2" in str(e.value.__cause__)
    # without on_error (or when it returns the error itself) the pipeline's own error is raised
    with pytest.raises(RuntimeError, match="actor died on block 2"):
        list(stream.level(10, 4, 2, on_error=lambda err: err))


def test_stale_checkpoint_of_an_unfinished_level_is_dropped(tmp_path):
    from dass_ray.checkpoints import atomic_write_json, save_state

    import torch

    done, unfinished = level_dir(tmp_path, 10), level_dir(tmp_path, 20)
    for d in (done, unfinished):
        save_state(d / SEG_FILE, {"w": torch.zeros(1)})
    atomic_write_json(done / "record.json", {"level": 10})
    # level 20 was killed between its checkpoint and its record: the translation actors, waiting at
    # level 30 for g_20, must not take that file for it
    drop_stale_checkpoints(tmp_path, [20, 30])
    assert (done / SEG_FILE).exists() and (done / (SEG_FILE + ".sha256")).exists()
    assert not (unfinished / SEG_FILE).exists() and not (unfinished / (SEG_FILE + ".sha256")).exists()
