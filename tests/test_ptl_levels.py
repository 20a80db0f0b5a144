"""PTL's level hand-over, without Ray: the next level's pipeline starts while the
current level replays (``_LevelStream``), and an unfinished level's stale g_n is
removed before anything can read it."""
from __future__ import annotations

import threading
from pathlib import Path

import pytest

from dass_ray.config import load_config
from dass_ray.stages.ptl import SEG_FILE, _LevelStream, _level_batches, drop_stale_checkpoints, level_dir

ROOT = Path(__file__).resolve().parents[1]


class FakeDataset:
    """``iter_batches`` of a few batches; records that it was pulled, and may fail after ``fail_at``."""

    def __init__(self, n: int, fail_at: int | None = None):
        self.n, self.fail_at = n, fail_at
        self.started = threading.Event()
        self.release = threading.Event()  # the producer waits for it after the first batch

    def iter_batches(self, batch_size, batch_format):
        self.started.set()
        for i in range(self.n):
            if self.fail_at == i:
                raise RuntimeError(f"actor died on batch {i}")
            yield {"i": i}
            if i == 0:
                assert self.release.wait(10)


def _cfg():
    return load_config(ROOT / "experiments" / "digits_smoke.yaml")


def test_level_stream_pulls_before_it_is_iterated_and_keeps_order(tmp_path):
    ds = FakeDataset(4)
    stream = _LevelStream(_level_batches(ds, _cfg(), 20, 0, tmp_path), tmp_path, name="level-20")
    # nobody iterates yet: the pipeline (in PTL: its actor start-up) runs already
    assert ds.started.wait(10), "the level's pipeline did not start before the stream was iterated"
    ds.release.set()
    assert [b["i"] for b in stream] == [0, 1, 2, 3]
    assert stream.events == tmp_path


def test_level_stream_raises_the_pipelines_error_in_the_consumer(tmp_path):
    ds = FakeDataset(4, fail_at=2)
    ds.release.set()
    got = []
    with pytest.raises(RuntimeError, match="actor died on batch 2"):
        for b in _LevelStream(_level_batches(ds, _cfg(), 20, 0, tmp_path), tmp_path, name="level-20"):
            got.append(b["i"])
    assert got == [0, 1]  # the batches before the failure were handed over, in order


def test_stale_checkpoint_of_an_unfinished_level_is_dropped(tmp_path):
    from dass_ray.checkpoints import atomic_write_json, save_state

    import torch

    done, unfinished = level_dir(tmp_path, 10), level_dir(tmp_path, 20)
    for d in (done, unfinished):
        save_state(d / SEG_FILE, {"w": torch.zeros(1)})
    atomic_write_json(done / "record.json", {"level": 10})
    # level 20 was killed between its checkpoint and its record: the next level's translators,
    # started early, must not take that file for g_20
    drop_stale_checkpoints(tmp_path, [20, 30])
    assert (done / SEG_FILE).exists() and (done / (SEG_FILE + ".sha256")).exists()
    assert not (unfinished / SEG_FILE).exists() and not (unfinished / (SEG_FILE + ".sha256")).exists()
