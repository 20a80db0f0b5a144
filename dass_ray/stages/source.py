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
BEST_FILE = "best_source_val.safetensors"  # the checkpoint with the best source-val mIoU
EQUAL_FILE = "source_equal_budget.safetensors"  # source-only continued for the PTL budget


def train_source_loop(loop_config: dict) -> None:
    import ray.train
    import ray.train.torch

    from ..data.transforms import PairTransform
    from ..diffusion.schedule import DDPMSchedule
    from ..evaluation import evaluate
    from ..metrics import PROTOCOLS
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
    sval = None
    if not oracle:
        if cfg.data.source_val_holdout and rank == 0:
            sval = common.source_part(cfg, data, "val")
        data = common.source_part(cfg, data, "train")
    # source-only at the PTL budget: after the source schedule (g_0), the same number of
    # updates as PTL makes, with PTL's lr and batch size, on source only
    extra = int(loop_config.get("extra_iters", 0))
    total = s.source_iters + extra
    classes = PROTOCOLS[cfg.data.protocol].classes
    best_path = out / "best_source_val.json"
    trainer, start = start_training(s, cfg.data.num_classes, device, world, cfg.seed, out / LAST_FILE,
                                    "oracle" if oracle else "source")
    transform = PairTransform.from_config(cfg.data)
    best = json.loads(best_path.read_text()) if (best_path.exists() and start) else {"iter": None, "miou": -1.0}
    alphas_cumprod = DDPMSchedule(cfg.diffusion).alphas_cumprod
    max_n = s.augment_max_n or min(cfg.ptl.N, cfg.diffusion.num_train_timesteps)
    history_path = out / "loss_history.json"
    history = json.loads(history_path.read_text()) if (history_path.exists() and start) else []
    history = [h for h in history if h["iter"] <= start]  # resumed from an older checkpoint: drop what follows
    gen = torch.Generator()
    running, count, t0 = 0.0, 0, time.time()
    every = max(1, s.source_iters // 20)
    for it in range(start, total):
        rng = common.seeded_rng(cfg.seed, it, rank)
        gen.manual_seed(int(rng.integers(2**31)))
        if it < s.source_iters:
            x, y = sample_batch(data.images, data.labels, s.batch_size, rng, transform)
            x, y = augment(x, y, s, max_n, alphas_cumprod, gen)
            trainer.set_lr(poly_lr(s.lr, it, s.source_iters))
        else:
            x, y = sample_batch(data.images, data.labels, cfg.ptl.batch_size, rng, transform)
            trainer.set_lr(cfg.ptl.lr)
        running += trainer.step_source(x, y)["loss"]
        count += 1
        done = it + 1
        if done % every == 0 or done in (s.source_iters, total):
            rec = {"iter": done, "loss": running / count, "s": time.time() - t0}
            running, count = 0.0, 0
            if rank == 0:
                if sval is not None:
                    rec["source_val_miou"] = evaluate(trainer.raw, sval.images, sval.labels, cfg.data.num_classes,
                                                      s.eval_batch_size, device).miou(classes)
                    if rec["source_val_miou"] > best["miou"]:
                        trainer.save(out / BEST_FILE, {"iter": done})
                        best = {"iter": done, "miou": rec["source_val_miou"]}
                        atomic_write_json(best_path, best)
                history.append(rec)
                print(f"[{'oracle' if oracle else 'source'}] iter {done}/{total} loss {rec['loss']:.4f}"
                      + (f" source-val mIoU {rec['source_val_miou']:.1f}" if sval is not None else ""))
                if done == s.source_iters:
                    trainer.save(out / G0_FILE, {"iter": s.source_iters, "oracle": oracle})
                trainer.save(out / LAST_FILE, {"iter": done}, keep_previous=True)
                atomic_write_json(history_path, history)
    if rank == 0:
        if extra:
            trainer.save(out / EQUAL_FILE, {"iter": total})
        atomic_write_json(history_path, history)
    # one report at the end: each ray.train.report costs ~1.6 s here; the loss curve is on disk
    ray.train.report({"iter": total, "loss": history[-1]["loss"] if history else float("nan")})


def cache_key(cfg: ExperimentConfig, oracle: bool) -> str:
    """Hash of what determines g_0 (or the oracle): data, segmenter section, augmentation schedule, seed."""
    import hashlib

    seg = {k: v for k, v in cfg.to_dict()["segmenter"].items()
           if k not in ("cache_dir", "eval_batch_size", "similarity_weight", "augment_max_n")}  # resolved below
    d = cfg.data
    ident = {
        "data": {"dataset": d.dataset, "root": str(common.data_root(cfg)), "image_size": d.image_size,
                 "crop_size": d.crop_size, "flip": d.flip, "max_samples": d.max_samples, "skip_bad": d.skip_bad,
                 "digits_seed": d.seed if d.dataset == "digits" else None,
                 "split": [d.target_domain, d.target_train_split] if oracle else [d.source_domain, d.source_split],
                 "source_val_holdout": d.source_val_holdout, "protocol": d.protocol, "num_classes": d.num_classes},
        "segmenter": seg,
        # the App. C noisy copies use the DDPM schedule up to augment_max_n (default ptl.N)
        "augment": [cfg.diffusion.num_train_timesteps, cfg.diffusion.beta_start, cfg.diffusion.beta_end,
                    cfg.segmenter.augment_max_n or min(cfg.ptl.N, cfg.diffusion.num_train_timesteps)],
        "seed": cfg.seed, "oracle": oracle,
    }
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]


def run_source_stage(cfg: ExperimentConfig, run_dir: Path, oracle: bool = False, tracker=None,
                     log: Callable[[str], None] = print, extra_iters: int = 0) -> Path:
    """Train g_0 (or the oracle) unless the run already has it; return its checkpoint.

    With ``segmenter.cache_dir`` the trained g_0 comes from (or goes to) the cache entry
    of :func:`cache_key`, and its files are copied into the run. ``extra_iters``: continue
    on source only for that many updates after g_0 (the source-only baseline at PTL's
    budget, saved as ``EQUAL_FILE``), from g_0's checkpoint with its optimizer state.
    """
    import shutil

    from .ddpm import _lock

    name = "oracle" if oracle else "source"
    out = run_dir / name
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    if cfg.segmenter.cache_dir and not (out / G0_FILE).exists():
        entry = Path(cfg.segmenter.cache_dir).expanduser().resolve() / cache_key(cfg, oracle)
        entry.mkdir(parents=True, exist_ok=True)
        with _lock(entry / ".lock"):
            if not (entry / "done.json").exists():
                common.fit(train_source_loop, {"out_dir": str(entry), "oracle": oracle, "extra_iters": 0}, cfg,
                           run_dir, name=name, max_failures=2)
                atomic_write_json(entry / "done.json", {"iters": cfg.segmenter.source_iters, "time": time.time()})
                log(f"[{name}] trained in {time.time() - t0:.0f}s -> cache {entry}")
            else:
                log(f"[{name}] reusing the cached g_0 {entry}")
            for f in entry.iterdir():  # checksummed files travel with their .sha256
                if f.is_file() and f.name not in (".lock", "done.json"):
                    shutil.copy2(f, out / f.name)
    if not (out / G0_FILE).exists() or extra_iters:
        common.fit(train_source_loop, {"out_dir": str(out.resolve()), "oracle": oracle, "extra_iters": extra_iters},
                   cfg, run_dir, name=name, max_failures=2)
        log(f"[{name}] trained in {time.time() - t0:.0f}s -> {out / G0_FILE}")
    if tracker is not None:
        with tracker.stage(name) as rid:
            hist_path = out / "loss_history.json"
            for h in json.loads(hist_path.read_text()) if hist_path.exists() else []:
                tracker.log_metrics({f"{name}_loss": h["loss"],
                                     **({"source_val_miou": h["source_val_miou"]} if "source_val_miou" in h else {})},
                                    step=h["iter"], run_id=rid)
    return out / G0_FILE
