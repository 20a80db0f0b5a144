"""Connecting to Ray and choosing devices (thin; the core never imports this).

``ensure_ray``: a cluster address from the config or ``RAY_ADDRESS`` connects to
that cluster (``ray job submit`` sets it); otherwise a local Ray starts
in-process with a capped object store, bound to loopback.
"""
from __future__ import annotations

import os
from typing import Optional

import torch

from .config import RayConfig


def ensure_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # An in-process local cluster: no dashboard, loopback only, bounded memory.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=(cfg.object_store_mb * 1024 * 1024) if cfg.object_store_mb else None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray


def pick_device(requested: str, gpus: float) -> torch.device:
    """The device for a worker/actor: from the config and the resources it was given.

    Ray no longer hides GPUs from tasks that asked for none (STACK-NOTES), so
    ``torch.cuda.is_available()`` alone would put CPU-only actors on a GPU.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if requested == "cuda" or (requested == "auto" and gpus > 0):
        if not torch.cuda.is_available():
            if requested == "cuda":
                raise RuntimeError("ray.device is 'cuda' but no CUDA device is visible to this worker")
            return torch.device("cpu")
        try:
            import ray

            ids = ray.get_gpu_ids() if ray.is_initialized() else []
        except Exception:
            ids = []
        return torch.device("cuda", 0) if not ids else torch.device("cuda", 0)
    return torch.device("cpu")


def train_device(requested: str, gpus_per_worker: float) -> torch.device:
    """Inside a Ray Train worker: Ray's own device choice when it gave us a GPU."""
    if requested == "cpu" or gpus_per_worker <= 0:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(int(n))
