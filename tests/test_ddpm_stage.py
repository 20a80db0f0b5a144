"""The DDPM stage (Ray Train): cached, resumable, reads target-train images only.

A tiny DDPM (channels (8, 16), 64 target images, 20 steps) on ``digits`` built once per
module into a tmp dir, with the target-train *labels* directory deleted before any
training. Each ``run_ddpm_stage`` that trains costs one Ray Train start-up: ``slow``.
"""
from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import torch

from dass_ray.checkpoints import load_state, read_meta
from dass_ray.config import ExperimentConfig, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def digits_root(digits_root) -> Path:
    """conftest's ``digits`` root (built for this module) without the target-train labels."""
    # the DDPM reads target-train images only: without the labels it must still train
    shutil.rmtree(digits_root / "target" / "train" / "labels")
    return digits_root


def _cfg(root: Path, cache: Path, **diffusion) -> ExperimentConfig:
    d = load_config(REPO / "experiments" / "digits_smoke.yaml").to_dict()
    d["data"].update(root=str(root), max_samples=64)
    d["diffusion"].update(block_out_channels=[8, 16], train_steps=20, batch_size=8, warmup_steps=2, log_every=5,
                          checkpoint_every=10, cache_dir=str(cache))
    d["diffusion"].update(diffusion)
    d["ray"].update(num_workers=1, cpus_per_worker=1.0, threads_per_worker=1)
    return from_dict(ExperimentConfig, d)


def _steps(out: Path) -> list[int]:
    return [h["step"] for h in json.loads((out / "loss_history.json").read_text())]


@pytest.fixture(scope="module")
def trained(digits_root, tmp_path_factory, ray_local):
    """One 20-step training into a fresh cache: (cfg, run_dir, weights path, log lines)."""
    from dass_ray.stages.ddpm import run_ddpm_stage

    base = tmp_path_factory.mktemp("ddpm_stage")
    cfg = _cfg(digits_root, base / "cache")
    logs: list[str] = []
    path = run_ddpm_stage(cfg, base / "run", log=logs.append)
    return cfg, base / "run", path, logs


def test_trains_on_images_only_and_writes_weights(digits_root, trained):
    from dass_ray.stages.ddpm import DDPM_FILE, cache_key

    cfg, _, path, logs = trained
    assert not (digits_root / "target" / "train" / "labels").exists()
    out = path.parent
    assert path.name == DDPM_FILE and path.is_file()
    assert out.name == cache_key(cfg) and out.parent == Path(cfg.diffusion.cache_dir).resolve()
    assert Path(str(path) + ".sha256").is_file()
    state = load_state(path)  # checksum verified
    assert state and all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert _steps(out) == [5, 10, 15, 20]
    assert all(h["loss"] == h["loss"] for h in json.loads((out / "loss_history.json").read_text()))
    assert json.loads((out / "done.json").read_text())["steps"] == 20
    assert read_meta(out / "last.safetensors")["step"] == "20"
    assert any("trained" in m for m in logs)
    from dass_ray.diffusion.unet import load_unet

    load_unet(path, cfg.diffusion)  # fits the UNet of the config


def test_second_call_reuses_the_cache(trained):
    from dass_ray.stages.ddpm import run_ddpm_stage

    cfg, run_dir, path, _ = trained
    hist = path.parent / "loss_history.json"
    before = (hist.stat().st_mtime_ns, path.stat().st_mtime_ns, (path.parent / "last.safetensors").stat().st_mtime_ns)
    logs: list[str] = []
    t0 = time.time()
    again = run_ddpm_stage(cfg, run_dir / "another_run", log=logs.append)
    assert again == path
    assert time.time() - t0 < 10, "a cache hit must not start Ray Train"
    assert any("reusing" in m for m in logs)
    after = (hist.stat().st_mtime_ns, path.stat().st_mtime_ns, (path.parent / "last.safetensors").stat().st_mtime_ns)
    assert after == before


def test_interrupted_after_last_checkpoint_resumes_without_retraining(trained):
    """done.json + final weights gone, last.safetensors (step 20) kept: the rerun resumes at 20.

    Resuming at step 20 of 20 runs no step: the loss history is kept as it was (not
    restarted at 5) and the EMA restored from the checkpoint gives bit-identical weights.
    """
    from dass_ray.stages.ddpm import DDPM_FILE, run_ddpm_stage

    cfg, run_dir, path, _ = trained
    out = path.parent
    first = load_state(path)
    hist_before = json.loads((out / "loss_history.json").read_text())
    (out / "done.json").unlink()
    path.unlink()
    Path(str(path) + ".sha256").unlink()
    again = run_ddpm_stage(cfg, run_dir)
    assert again == out / DDPM_FILE and (out / "done.json").exists()
    assert json.loads((out / "loss_history.json").read_text()) == hist_before
    second = load_state(again)
    assert second.keys() == first.keys()
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_resume_continues_the_step_count(digits_root, trained, tmp_path):
    """A 30-step training finding a step-20 checkpoint in its cache entry runs steps 21..30 only."""
    from dass_ray.stages.ddpm import LAST_FILE, cache_key, ddpm_dir, run_ddpm_stage

    cfg20, _, path20, _ = trained
    cfg30 = _cfg(digits_root, tmp_path / "cache", train_steps=30)
    out30 = ddpm_dir(cfg30, tmp_path / "run")
    assert out30.name == cache_key(cfg30) != cache_key(cfg20)
    out30.mkdir(parents=True)
    # the state of an interrupted 30-step run at its step-20 checkpoint
    for name in (LAST_FILE, LAST_FILE + ".sha256", "loss_history.json"):
        shutil.copy(path20.parent / name, out30 / name)
    hist20 = json.loads((out30 / "loss_history.json").read_text())
    run_ddpm_stage(cfg30, tmp_path / "run")
    hist = json.loads((out30 / "loss_history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    assert hist[:4] == hist20, "the steps before the checkpoint are kept, not re-run"
    assert read_meta(out30 / LAST_FILE)["step"] == "30"
    assert json.loads((out30 / "done.json").read_text())["steps"] == 30


def test_corrupted_last_checkpoint_is_reported_and_training_restarts(digits_root, trained, tmp_path, capfd):
    from dass_ray.stages.ddpm import DDPM_FILE, LAST_FILE, ddpm_dir, run_ddpm_stage

    _, _, path20, _ = trained
    cfg = _cfg(digits_root, tmp_path / "cache", train_steps=30)
    out = ddpm_dir(cfg, tmp_path / "run")
    out.mkdir(parents=True)
    for name in (LAST_FILE, LAST_FILE + ".sha256", "loss_history.json"):
        shutil.copy(path20.parent / name, out / name)
    raw = bytearray((out / LAST_FILE).read_bytes())
    mid = len(raw) // 2
    raw[mid:mid + 64] = bytes(b ^ 0xFF for b in raw[mid:mid + 64])  # flip bytes, keep the length
    (out / LAST_FILE).write_bytes(bytes(raw))
    logs: list[str] = []
    got = run_ddpm_stage(cfg, tmp_path / "run", log=logs.append)
    assert got == out / DDPM_FILE
    load_state(got)
    # restarted from step 0: the whole history is new (a resume would have kept 5..20 and added 25, 30)
    hist = json.loads((out / "loss_history.json").read_text())
    assert [h["step"] for h in hist] == [5, 10, 15, 20, 25, 30]
    old = json.loads((path20.parent / "loss_history.json").read_text())
    assert hist[0]["s"] != old[0]["s"] or hist[0]["loss"] != old[0]["loss"]
    assert read_meta(out / LAST_FILE)["step"] == "30"
    # the worker's warning reaches the driver's output through Ray's log forwarding
    deadline = time.time() + 10
    seen = ""
    while time.time() < deadline:
        o, e = capfd.readouterr()
        seen += o + e
        if "cannot resume" in seen:
            break
        time.sleep(0.5)
    assert "cannot resume" in seen and "corrupted" in seen, seen[-2000:]


def test_ddpm_cache_is_shared_across_run_seeds_not_ddpm_seeds(tmp_path):
    from dass_ray.stages.ddpm import cache_key

    base = ExperimentConfig()
    other_run_seed = ExperimentConfig(seed=3)
    other_ddpm_seed = ExperimentConfig()
    other_ddpm_seed.diffusion.seed = 1
    sampling_only = ExperimentConfig()
    sampling_only.diffusion.sample_steps, sampling_only.diffusion.clip_sample = 7, True
    assert cache_key(base) == cache_key(other_run_seed) == cache_key(sampling_only)
    assert cache_key(base) != cache_key(other_ddpm_seed)
