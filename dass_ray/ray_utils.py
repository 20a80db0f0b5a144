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


def error_summary(e: BaseException) -> str:
    """``"TypeName: first line"`` of an error: Ray's actor-death errors run to dozens of lines
    (the actor's whole traceback), and the messages that wrap them quote only this much."""
    return f"{type(e).__name__}: {(str(e).splitlines() or [''])[0]}"


def ensure_ray(cfg: RayConfig):
    import ray

    if ray.is_initialized():
        return ray
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    address = cfg.address or os.environ.get("RAY_ADDRESS")
    # every worker of the job quiets Ray's own once-a-second warnings (ray_logging's doc)
    runtime_env = {"worker_process_setup_hook": "dass_ray.ray_logging.quiet_worker_logs"}
    if address:
        ray.init(address=address, log_to_driver=True, runtime_env=runtime_env)
    else:
        # An in-process local cluster: no dashboard, loopback only, bounded memory.
        os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=(cfg.object_store_mb * 1024 * 1024) if cfg.object_store_mb else None,
            include_dashboard=False,
            _node_ip_address="127.0.0.1",
            log_to_driver=True,
            runtime_env=runtime_env,
        )
    from ray.data import DataContext

    ctx = DataContext.get_current()
    ctx.enable_progress_bars = False
    return ray


def cuda_index(gpu_ids: list, visible: Optional[str]) -> int:
    """The torch CUDA index of the first GPU Ray assigned (``ray.get_gpu_ids()``).

    Ray sets ``CUDA_VISIBLE_DEVICES`` to a task's GPUs, so torch numbers them from 0 in
    that list's order; with ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` (or a node started
    with its own list) the variable keeps the node's GPUs and the assigned id must be looked
    up in it, as ``ray.train.torch.get_devices`` does. No assigned ids: index 0.
    """
    if not gpu_ids:
        return 0
    first = str(gpu_ids[0]).strip()
    if visible is not None and visible.strip():
        listed = [v.strip() for v in visible.split(",")]
        if first in listed:
            return listed.index(first)
        raise RuntimeError(f"Ray assigned GPU {first!r}, which CUDA_VISIBLE_DEVICES={visible!r} does not list")
    return int(first)


def pick_device(requested: str, gpus: float) -> torch.device:
    """The device for a worker/actor: from the config and the resources it was given.

    Ray no longer hides GPUs from tasks that asked for none (STACK-NOTES), so
    ``torch.cuda.is_available()`` alone would put CPU-only actors on a GPU; ``device: cuda``
    for a task given no GPU is an error, not a GPU shared outside Ray's accounting.
    """
    if requested == "cpu":
        return torch.device("cpu")
    if gpus <= 0:
        if requested == "cuda":
            raise RuntimeError("ray.device is 'cuda' but this task was given no GPU (its ray.gpus_per_actor or "
                               "ray.gpus_per_worker is 0): give it GPUs, or use device 'auto' (CPU where no GPU was given)")
        return torch.device("cpu")
    if not torch.cuda.is_available():
        if requested == "cuda":
            raise RuntimeError("ray.device is 'cuda' but no CUDA device is visible to this worker")
        return torch.device("cpu")
    try:
        import ray

        ids = ray.get_gpu_ids() if ray.is_initialized() else []
    except Exception:  # outside a Ray task: no assignment to honour
        ids = []
    return torch.device("cuda", cuda_index(ids, os.environ.get("CUDA_VISIBLE_DEVICES")))


def train_device(requested: str, gpus_per_worker: float) -> torch.device:
    """Inside a Ray Train worker: Ray's own device choice when it gave us a GPU."""
    if requested == "cpu" or gpus_per_worker <= 0:
        return torch.device("cpu")
    import ray.train.torch

    return ray.train.torch.get_device()


def set_threads(n: Optional[int]) -> None:
    if n:
        torch.set_num_threads(int(n))


def actor_pool_dataset(rows: list[dict], actor_cls, cfg: RayConfig, constructor_kwargs: dict, **remote_args):
    """A lazy Ray dataset: ``rows`` (one row per block, order preserved, so a batch never merges
    rows) through ``map_batches(actor_cls, batch_size=1)`` on an actor pool of ``cfg.num_actors``
    with the config's CPUs/GPUs per actor. ``remote_args`` (e.g. ``max_restarts``) go to the actors."""
    import warnings

    import ray.data
    from ray.data import ActorPoolStrategy, DataContext

    DataContext.get_current().execution_options.preserve_order = True
    ds = ray.data.from_items(rows, override_num_blocks=max(1, len(rows)))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args (removal announced for 2.64) but has no named
        # parameter for max_restarts / max_task_retries; ray is pinned (==2.60.0), re-check on an
        # upgrade. Unfiltered, the warning is printed at every PTL level.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated", category=DeprecationWarning)
        return ds.map_batches(actor_cls, batch_size=1, compute=ActorPoolStrategy(size=cfg.num_actors),
                              num_cpus=cfg.cpus_per_actor, num_gpus=cfg.gpus_per_actor,
                              fn_constructor_kwargs=constructor_kwargs, **remote_args)
