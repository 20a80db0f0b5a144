"""Shared plumbing of the Ray stages: Ray Train launches, data roots, loading splits."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..config import ExperimentConfig, from_dict
from ..data.layout import Split, load_split


def source_part(cfg: ExperimentConfig, split: Split, part: str) -> Split:
    """The ``train`` or ``val`` part of the loaded source split (``data.source_val_holdout``).

    The held-out ``val`` ids are a fixed subset (seeded by ``data.seed``, independent of
    the run seed), so every run and variant trains on the same ids and picks checkpoints
    on the same source-val. With no holdout, ``train`` is the whole split.
    """
    k = cfg.data.source_val_holdout
    if part not in ("train", "val"):
        raise ValueError(f"part must be 'train' or 'val', got {part!r}")
    if k == 0:
        if part == "val":
            raise ValueError("no source-val: set data.source_val_holdout > 0")
        return split
    if k >= len(split.ids):
        raise ValueError(f"data.source_val_holdout = {k} leaves no source training data "
                         f"({len(split.ids)} samples in {cfg.data.source_domain}/{cfg.data.source_split})")
    order = sorted(range(len(split.ids)), key=lambda i: split.ids[i])
    held = set(np.random.default_rng([cfg.data.seed, 41]).permutation(order)[:k].tolist())
    keep = [i for i in range(len(split.ids)) if (i in held) == (part == "val")]
    return Split([split.ids[i] for i in keep], split.images[keep],
                 None if split.labels is None else split.labels[keep], split.skipped if part == "train" else [])


def source_train_ids(cfg: ExperimentConfig, ids: list[str]) -> list[str]:
    """``ids`` (of the source split) minus the held-out source-val ids, order kept."""
    if cfg.data.source_val_holdout == 0:
        return list(ids)
    dummy = Split(list(ids), np.zeros((len(ids), 1, 1, 3), np.uint8), None)
    keep = set(source_part(cfg, dummy, "train").ids)
    return [i for i in ids if i in keep]


def data_root(cfg: ExperimentConfig) -> Path:
    return Path(cfg.data.root).expanduser().resolve()


def ensure_data(cfg: ExperimentConfig, log: Callable[[str], None] = print) -> Path:
    """Build the ``digits`` benchmark under ``data.root`` when it is absent; return the root."""
    root = data_root(cfg)
    if cfg.data.dataset == "digits" and not (root / "digits.json").exists():
        from ..data.digits import build_digits

        log(f"building the digits benchmark in {root} (seed {cfg.data.seed}) ...")
        build_digits(root, seed=cfg.data.seed)
    elif cfg.data.dataset == "digits":
        from ..data.digits import build_digits

        build_digits(root, seed=cfg.data.seed)  # checks the manifest's seed; no rebuild
    elif not root.is_dir():
        from ..data.layout import DataError

        raise DataError(f"data.root {str(root)!r} does not exist (expected <root>/<domain>/<split>/images|labels)")
    return root


def load(cfg: ExperimentConfig, domain: str, split: str, labels: bool = True) -> Split:
    """A whole split in memory (the image size of ``data.image_size`` when set)."""
    return load_split(
        data_root(cfg),
        domain,
        split,
        num_classes=cfg.data.num_classes,
        skip_bad=cfg.data.skip_bad,
        max_samples=cfg.data.max_samples,
        require_labels=labels,
        image_size=tuple(cfg.data.image_size) if cfg.data.image_size else None,
    )


def record_skipped(split: Split, out_dir: Path, name: str) -> None:
    """With ``data.skip_bad``: write which samples were skipped and why (``<out_dir>/skipped-<name>.json``)."""
    from ..checkpoints import atomic_write_json

    if split.skipped:
        atomic_write_json(Path(out_dir) / f"skipped-{name}.json",
                          [{"id": i, "reason": r} for i, r in split.skipped])


def skipped_counts(run_dir: Path) -> dict[str, int]:
    """How many samples each stage skipped (``data.skip_bad``), from the stages' records."""
    import json

    return {p.stem[len("skipped-"):]: len(json.loads(p.read_text())) for p in sorted(Path(run_dir).rglob("skipped-*.json"))}


def worker_config(loop_config: dict[str, Any]) -> ExperimentConfig:
    """Rebuild the typed config inside a Ray worker (configs travel as plain dicts)."""
    return from_dict(ExperimentConfig, loop_config["config"])


def fit(
    loop: Callable[[dict], None],
    loop_config: dict[str, Any],
    cfg: ExperimentConfig,
    run_dir: Path,
    name: str,
    datasets: Optional[dict] = None,
    dataset_config: Any = None,
    max_failures: int = 0,
) -> None:
    """Run ``loop`` on ``cfg.ray.num_workers`` Ray Train workers (DDP) and wait for it.

    The loop keeps its own checkpoints in the run directory; Ray's storage
    path only holds Ray's bookkeeping.
    """
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    r = cfg.ray
    resources = {"CPU": r.cpus_per_worker}
    if r.gpus_per_worker > 0:
        resources["GPU"] = r.gpus_per_worker
    kwargs: dict[str, Any] = {}
    if datasets:
        kwargs["datasets"] = datasets
    if dataset_config is not None:
        kwargs["dataset_config"] = dataset_config
    trainer = TorchTrainer(
        train_loop_per_worker=loop,
        train_loop_config={**loop_config, "config": cfg.to_dict()},
        scaling_config=ScalingConfig(
            num_workers=r.num_workers, use_gpu=r.gpus_per_worker > 0, resources_per_worker=resources
        ),
        run_config=RunConfig(
            name=name,
            storage_path=str((run_dir / "ray_train").resolve()),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
        **kwargs,
    )
    trainer.fit()


def rank_info() -> tuple[int, int]:
    """(world rank, world size) inside a Ray Train worker; (0, 1) outside."""
    try:
        import ray.train

        ctx = ray.train.get_context()
        return ctx.get_world_rank(), ctx.get_world_size()
    except Exception:
        return 0, 1


def seeded_rng(*parts: int) -> np.random.Generator:
    return np.random.default_rng([int(p) & 0xFFFFFFFF for p in parts])


def env_threads(n: int) -> None:
    import torch

    torch.set_num_threads(max(1, n))
    os.environ["OMP_NUM_THREADS"] = str(max(1, n))
