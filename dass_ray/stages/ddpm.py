"""Stage: train the target DDPM on unlabelled target-train images (Ray Train).

Paper Sec. 3, 5.1 (Eq. 5). Only target-train *images* are read: the loader is
called with ``require_labels=False`` and never opens a label file.

The trained model is cached by (data identity, DDPM config) hash under
``diffusion.cache_dir`` so reruns, ablations and sweeps reuse it; training
checkpoints live in the cache entry too, so an interrupted training resumes
from its last checkpoint in any run that asks for the same DDPM.
"""
from __future__ import annotations

import fcntl
import json
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch

from ..checkpoints import (
    CheckpointError,
    atomic_write_json,
    load_latest,
    load_state,
    optimizer_tensors,
    previous_path,
    restore_optimizer,
    save_state,
)
from ..config import ExperimentConfig
from . import common

DDPM_FILE = "unet_ema.safetensors"
LAST_FILE = "last.safetensors"


def cache_key(cfg: ExperimentConfig) -> str:
    """Hash of what determines the trained DDPM: the target images and the DDPM config."""
    d = cfg.diffusion
    ident = {
        "data": {
            "dataset": cfg.data.dataset,
            "root": str(common.data_root(cfg)),
            "target": [cfg.data.target_domain, cfg.data.target_train_split],
            "image_size": cfg.data.image_size,
            "max_samples": cfg.data.max_samples,
            "digits_seed": cfg.data.seed if cfg.data.dataset == "digits" else None,
        },
        "ddpm": {k: v for k, v in cfg.to_dict()["diffusion"].items()
                 if k not in ("cache_dir", "log_every", "checkpoint_every", "weights", "sample_steps",
                               "clip_sample", "reverse_variance", "ddim_eta")},  # sampling-only keys
    }  # the run seed is not in the key: the DDPM is a dataset-level model (its own seed is diffusion.seed)
    import hashlib

    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def ddpm_dir(cfg: ExperimentConfig, run_dir: Path) -> Path:
    if cfg.diffusion.cache_dir:
        return Path(cfg.diffusion.cache_dir).expanduser().resolve() / cache_key(cfg)
    return (run_dir / "ddpm").resolve()


def lr_at(step: int, cfg: ExperimentConfig) -> float:
    """Linear warm-up, then constant or cosine decay to 5 % of ``diffusion.lr``."""
    d = cfg.diffusion
    if d.warmup_steps and step < d.warmup_steps:
        return d.lr * (step + 1) / d.warmup_steps
    if d.lr_schedule == "constant":
        return d.lr
    span = max(1, d.train_steps - d.warmup_steps)
    t = min(1.0, (step - d.warmup_steps) / span)
    return d.lr * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * t)))


def train_ddpm_loop(loop_config: dict) -> None:
    """Ray Train worker loop: eps-prediction DDPM training with EMA, resumable."""
    import ray.train
    import ray.train.torch

    from ..data.transforms import to_diffusion
    from ..diffusion.schedule import DDPMSchedule
    from ..precision import resolve_precision
    from ..diffusion.unet import EMA, build_unet, ddpm_loss

    cfg = common.worker_config(loop_config)
    out = Path(loop_config["out_dir"])
    rank, world = common.rank_info()
    common.env_threads(cfg.ray.worker_threads())
    from ..ray_utils import train_device

    device = train_device(cfg.ray.device, cfg.ray.gpus_per_worker)
    d = cfg.diffusion

    split = common.load(cfg, cfg.data.target_domain, cfg.data.target_train_split, labels=False)
    if rank == 0:
        common.record_skipped(split, Path(loop_config["run_dir"]), "ddpm_target_train")
    x_all = to_diffusion(split.images)
    if x_all.shape[-1] != d.image_size or x_all.shape[-2] != d.image_size:
        x_all = torch.nn.functional.interpolate(x_all, size=(d.image_size, d.image_size), mode="bilinear",
                                                antialias=True, align_corners=False)
    schedule = DDPMSchedule(d)
    if rank == 0:
        print(f"[ddpm] UNet precision {d.precision} -> {resolve_precision(d.precision, device)} on {device}",
              flush=True)
    torch.manual_seed(d.seed)
    unet = build_unet(d)
    ema = EMA(unet, d.ema_decay)
    opt = torch.optim.Adam(unet.parameters(), lr=d.lr)
    start = 0
    last = out / LAST_FILE
    if last.exists() or previous_path(last).exists():
        try:
            # a corrupted last checkpoint is reported by path and the previous one is used
            state, meta, _ = load_latest(last, log=lambda m: print(f"[ddpm] {m}"))
            unet.load_state_dict({k[5:]: v for k, v in state.items() if k.startswith("unet.")})
            ema.load_state_dict({k[4:]: v for k, v in state.items() if k.startswith("ema.")})
            restore_optimizer(opt, state, meta["optimizer"])
            start = int(meta["step"])
            print(f"[ddpm] resuming from step {start} ({last})")
        except (CheckpointError, KeyError) as e:
            print(f"[ddpm] WARNING: cannot resume from {last}: {e}; starting over")
            start = 0
    unet.to(device)
    ema.to(device)
    model = ray.train.torch.prepare_model(unet) if world > 1 else unet
    gen = torch.Generator(device="cpu")
    history_path = out / "loss_history.json"
    history = json.loads(history_path.read_text()) if (history_path.exists() and start > 0) else []
    history = [h for h in history if h["step"] <= start]
    t0 = time.time()
    running = 0.0
    count = 0
    for step in range(start, d.train_steps):
        gen.manual_seed(hash((d.seed, step, rank)) & 0xFFFFFFFF)
        idx = torch.randint(0, x_all.shape[0], (d.batch_size,), generator=gen)
        x0 = x_all[idx]
        if torch.rand((), generator=gen) < 0.5:  # horizontal flip: free augmentation for a DDPM
            x0 = x0.flip(-1)
        for g in opt.param_groups:
            g["lr"] = lr_at(step, cfg)
        loss = ddpm_loss(model, schedule, x0.to(device), gen, precision=d.precision)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema.update(unet)
        running += float(loss.detach())
        count += 1
        done = step + 1
        if done % d.log_every == 0 or done == d.train_steps:
            rec = {"step": done, "loss": running / count, "lr": lr_at(step, cfg), "s": time.time() - t0}
            running, count = 0.0, 0
            if rank == 0:
                history.append(rec)
                print(f"[ddpm] step {done}/{d.train_steps} loss {rec['loss']:.4f}")
        if rank == 0 and (done % d.checkpoint_every == 0 or done == d.train_steps):
            opt_t, opt_meta = optimizer_tensors(opt)
            state = {**{f"unet.{k}": v for k, v in unet.state_dict().items()},
                     **{f"ema.{k}": v for k, v in ema.state_dict().items()}, **opt_t}
            save_state(last, state, {"step": str(done), "optimizer": opt_meta}, keep_previous=True)
            atomic_write_json(history_path, history)
    if rank == 0:
        shadow = build_unet(d)
        ema.copy_to(shadow)
        save_state(out / DDPM_FILE, shadow.state_dict(), {"steps": str(d.train_steps), "key": out.name})
        atomic_write_json(history_path, history)
        atomic_write_json(out / "done.json", {"steps": d.train_steps, "time": time.time()})
    # one report at the end: each ray.train.report costs ~1.6 s here; the loss curve is on disk
    ray.train.report({"step": d.train_steps, "loss": history[-1]["loss"] if history else float("nan")})


@contextmanager
def _lock(path: Path) -> Iterator[None]:
    """One trainer per cache entry: concurrent runs (Tune trials) wait for the first."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def run_ddpm_stage(cfg: ExperimentConfig, run_dir: Path, tracker=None, log: Callable[[str], None] = print) -> Path:
    """Train (or reuse) the target DDPM; return the path of its EMA weights."""
    if cfg.diffusion.weights:
        p = Path(cfg.diffusion.weights).expanduser()
        if not p.exists():
            raise FileNotFoundError(f"diffusion.weights {str(p)!r} does not exist")
        return p
    out = ddpm_dir(cfg, run_dir)
    out.mkdir(parents=True, exist_ok=True)
    with _lock(out / ".lock"):
        if (out / "done.json").exists() and (out / DDPM_FILE).exists():
            try:
                load_state(out / DDPM_FILE)
                log(f"[ddpm] reusing the cached DDPM {out}")
                return out / DDPM_FILE
            except CheckpointError as e:
                log(f"[ddpm] WARNING: {e}; retraining")
                (out / "done.json").unlink()
        t0 = time.time()
        common.fit(train_ddpm_loop, {"out_dir": str(out), "run_dir": str(run_dir.resolve())}, cfg, run_dir,
                   name="ddpm", max_failures=2)
        log(f"[ddpm] trained in {time.time() - t0:.0f}s -> {out / DDPM_FILE}")
    if tracker is not None:
        with tracker.stage("ddpm", {"cache_key": out.name}) as rid:
            hist = json.loads((out / "loss_history.json").read_text()) if (out / "loss_history.json").exists() else []
            for h in hist:
                tracker.log_metrics({"ddpm_loss": h["loss"], "ddpm_lr": h["lr"]}, step=h["step"], run_id=rid)
            tracker.log_artifact(out / "loss_history.json", "ddpm", run_id=rid)
    return out / DDPM_FILE
