"""The bad-input matrix of issue 7: what was missing elsewhere. Each error names the file / key / value.

Where each row of the matrix is tested (nothing was moved):

| bad input | test |
|---|---|
| missing image | here: ``test_missing_image_named``, ``test_label_without_image_is_a_missing_image`` |
| missing label | test_data_layout.py::test_missing_label |
| truncated PNG | test_data_layout.py::test_truncated_png |
| image/label size mismatch | test_data_layout.py::test_size_mismatch |
| label id outside the class set | test_data_layout.py::test_label_id_out_of_range |
| empty split | test_data_layout.py::test_empty_split |
| unknown config key | test_config.py::test_unknown_key_names_key_and_allowed |
| wrong type | test_config.py::test_wrong_type |
| out-of-range (N < 0, lambda NaN, stride > N) | test_config.py::test_out_of_range, test_pipeline.py::test_bad_config_value_fails_before_any_work |
| missing pretrained-weights path | test_segmenters.py::test_missing_pretrained_file_names_the_path |
| run dir of another config offered for resume | test_pipeline.py::test_run_dir_refuses_another_config |
| translated dataset of another config offered for resume | here: ``test_translated_level_of_another_config_is_refused`` |
| non-finite guidance gradient | test_sgg.py::test_nonfinite_gradient_raises_with_level_step_ids, test_translate.py::test_segmenter_state_restored_and_errors |
| ``skip_bad: true`` skips and counts | test_data_layout.py::test_skip_bad_counts_every_problem, here: ``test_skip_bad_counts_reach_the_run_records`` |
| fault-switch value | here: ``test_fault_switch_value_checked`` |
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dass_ray.config import ConfigError, ExperimentConfig, from_dict, set_path
from dass_ray.data.layout import DataError, image_path, label_path, load_split, read_sample, split_dir

NC = 4


def _layout(root: Path, n: int = 3) -> Path:
    rng = np.random.default_rng(0)
    d = split_dir(root, "dom", "train")
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir(parents=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).save(d / "images" / f"s{i}.png")
        Image.fromarray(rng.integers(0, NC, (6, 6), dtype=np.uint8)).save(d / "labels" / f"s{i}.png")
    return root


def test_missing_image_named(tmp_path):
    root = _layout(tmp_path)
    p = image_path(root, "dom", "train", "s1")
    p.unlink()
    with pytest.raises(DataError) as e:
        read_sample(root, "dom", "train", "s1", NC)
    assert str(p) in str(e.value) and "image file is missing" in str(e.value)


def test_label_without_image_is_a_missing_image(tmp_path):
    """A label whose image is gone: the split read names the missing image; skip_bad counts it."""
    root = _layout(tmp_path)
    p = image_path(root, "dom", "train", "s1")
    p.unlink()
    with pytest.raises(DataError) as e:
        load_split(root, "dom", "train", NC)
    assert str(p) in str(e.value) and "image file is missing" in str(e.value)
    s = load_split(root, "dom", "train", NC, skip_bad=True)
    assert s.ids == ["s0", "s2"] and [i for i, _ in s.skipped] == ["s1"]
    assert "image file is missing" in s.skipped[0][1]
    # images-only reads (target-train for the DDPM) never look at labels
    assert load_split(root, "dom", "train", NC, require_labels=False).ids == ["s0", "s2"]


def test_skip_bad_counts_reach_the_run_records(tmp_path):
    """``data.skip_bad``: the stage's load skips, records which and why; the run's metrics count them."""
    from dass_ray.stages import common

    root = _layout(tmp_path / "data", n=4)
    label_path(root, "dom", "train", "s0").unlink()
    bad = image_path(root, "dom", "train", "s2")
    bad.write_bytes(bad.read_bytes()[:30])
    cfg = from_dict(ExperimentConfig, {"data": {"dataset": "folder", "root": str(root), "num_classes": NC,
                                                "source_domain": "dom", "skip_bad": True}})
    split = common.load(cfg, "dom", "train")
    assert split.ids == ["s1", "s3"]
    run = tmp_path / "run"
    common.record_skipped(split, run / "source", "source_dom_train")
    recs = json.loads((run / "source" / "skipped-source_dom_train.json").read_text())
    assert [r["id"] for r in recs] == ["s0", "s2"] and "truncated" in recs[1]["reason"]
    assert common.skipped_counts(run) == {"source_dom_train": 2}
    with pytest.raises(DataError, match="s0.png"):
        common.load(set_path(cfg, "data.skip_bad", False), "dom", "train")


def _fake_level(run_dir: Path, n: int, config_hash: str) -> Path:
    from dass_ray.stages.ptl import SEG_FILE, _write_parquet, level_dir

    d = level_dir(run_dir, n)
    d.mkdir(parents=True)
    rows = {"id": ["0001", "0002"], "level": [n, n], "image_png": [b"x", b"y"], "seed": [0, 0],
            "segmenter_id": ["s", "s"], "config_hash": [config_hash] * 2}
    _write_parquet(d / "translated-r0.parquet", rows)
    (d / "record.json").write_text(json.dumps({"level": n, "loss": 1.0, "seconds": 1.0, "translated": 2}))
    (d / (SEG_FILE + ".sha256")).write_text("0" * 64 + "\n")
    return d


def test_translated_level_of_another_config_is_refused(tmp_path):
    """A finished level whose rows carry another config's hash (copied in, or state.json lost) is not resumed."""
    from dass_ray.stages.ptl import check_level_provenance, run_ptl_stage

    cfg = from_dict(ExperimentConfig, {"ptl": {"N": 20, "stride": 10}, "diffusion": {"cache_dir": None}})
    other = set_path(cfg, "guidance.scale", 5.0)
    run = tmp_path / "run"
    _fake_level(run, 10, cfg.hash())
    check_level_provenance(cfg, run, [10])  # its own level: fine
    d = _fake_level(run, 20, other.hash())
    logs: list[str] = []
    with pytest.raises(ConfigError) as e:  # before any Ray work: no Ray here at all
        run_ptl_stage(cfg, run, tmp_path / "unet.safetensors", tmp_path / "g0.safetensors", log=logs.append)
    msg = str(e.value)
    assert str(d / "translated-r0.parquet") in msg and other.hash() in msg and cfg.hash() in msg
    assert "level 20" in msg and logs == []


def test_fault_switch_value_checked():
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"ray": {"fault_translator_after_batches": 0}})
    assert "'ray.fault_translator_after_batches'" in str(e.value) and "got 0" in str(e.value)
    assert from_dict(ExperimentConfig, {}).ray.fault_translator_after_batches is None
