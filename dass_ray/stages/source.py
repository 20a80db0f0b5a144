"""Stage: train g_0 on the labelled source domain (Ray Train, DDP), Sec. 4.3 / 5.1, App. C.

The same loop trains the *oracle* (``method: oracle``): on target-train images
with their labels, the upper bound of the ablation table. It is the only path
that reads target-train labels, and only when the config asks for it.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable

import torch

from ..checkpoints import atomic_write_json
from ..config import ExperimentConfig
from . import common

G0_FILE = "g0.safetensors"
LAST_FILE = "last.safetensors"


def train_source_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..data.transforms import PairTransform
    from ..diffusion.schedule import DDPMSchedule
    from ..ray_utils import train_device
    from ..seg_training import augment, poly_lr, sample_batch, start_training

    cfg = common.worker_config(loop_config)
    out = Path(loop_config["out_dir"])
    oracle = loop_config["oracle"]
    rank, world = common.rank_info()
    common.env_threads(cfg.ray.worker_threads())
    device = train_device(cfg.ray.device, cfg.ray.gpus_per_worker)
    s = cfg.segmenter

    domain, split = ((cfg.data.target_domain, cfg.data.target_train_split) if oracle
                     else (cfg.data.source_domain, cfg.data.source_split))
    data = common.load(cfg, domain, split, labels=True)
    if rank == 0:
        common.record_skipped(data, out, f"{'oracle' if oracle else 'source'}_{domain}_{split}")
    trainer, start = start_training(s, cfg.data.num_classes, device, world, cfg.seed, out / LAST_FILE,
                                    "oracle" if oracle else "source")
    transform = PairTransform.from_config(cfg.data)
    alphas_cumprod = DDPMSchedule(cfg.diffusion).alphas_cumprod
    max_n = s.augment_max_n or min(cfg.ptl.N, cfg.diffusion.num_train_timesteps)
    history_path = out / "loss_history.json"
    history = json.loads(history_path.read_text()) if (history_path.exists() and start) else []
    history = [h for h in history if h["iter"] <= start]  # resumed from an older checkpoint: drop what follows
    gen = torch.Generator()
    running, count, t0 = 0.0, 0, time.time()
    every = max(1, s.source_iters // 20)
    for it in range(start, s.source_iters):
        rng = common.seeded_rng(cfg.seed, it, rank)
        gen.manual_seed(int(rng.integers(2**31)))
        x, y = sample_batch(data.images, data.labels, s.batch_size, rng, transform)
        x, y = augment(x, y, s, max_n, alphas_cumprod, gen)
        trainer.set_lr(poly_lr(s.lr, it, s.source_iters))
        running += trainer.step_source(x, y)["loss"]
        count += 1
        done = it + 1
        if done % every == 0 or done == s.source_iters:
            rec = {"iter": done, "loss": running / count, "s": time.time() - t0}
            running, count = 0.0, 0
            if rank == 0:
                history.append(rec)
                print(f"[{'oracle' if oracle else 'source'}] iter {done}/{s.source_iters} loss {rec['loss']:.4f}")
                trainer.save(out / LAST_FILE, {"iter": done}, keep_previous=True)
                atomic_write_json(history_path, history)
    if rank == 0:
        trainer.save(out / G0_FILE, {"iter": s.source_iters, "oracle": oracle})
        atomic_write_json(history_path, history)
    # one report at the end: each ray.train.report costs ~1.6 s here; the loss curve is on disk
    ray.train.report({"iter": s.source_iters, "loss": history[-1]["loss"] if history else float("nan")})


def run_source_stage(cfg: ExperimentConfig, run_dir: Path, oracle: bool = False, tracker=None,
                     log: Callable[[str], None] = print) -> Path:
    """Train g_0 (or the oracle) unless the run already has it; return its checkpoint."""
    name = "oracle" if oracle else "source"
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    common.fit(train_source_loop, {"out_dir": str(out.resolve()), "oracle": oracle}, cfg, run_dir, name=name,
               max_failures=2)
    log(f"[{name}] trained in {time.time() - t0:.0f}s -> {out / G0_FILE}")
    if tracker is not None:
        with tracker.stage(name) as rid:
            hist_path = out / "loss_history.json"
            for h in json.loads(hist_path.read_text()) if hist_path.exists() else []:
                tracker.log_metrics({f"{name}_loss": h["loss"]}, step=h["iter"], run_id=rid)
    return out / G0_FILE
