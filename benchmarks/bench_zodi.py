"""Benchmark: ZoDi transfer one image at a time (the public code's way) vs batched vs a Ray Data actor pool.

All three run the same :func:`dass_ray.zodi.zodi_transfer` on the same images with
tiny random components (nothing loaded or downloaded), side by side in one process:

- ``single``: an in-process loop, one image per call (batch 1);
- ``batched``: in-process, ``--batch`` images per call;
- ``pool_<k>``: :func:`dass_ray.stages.zodi.transfer_dataset` (Ray Data,
  ``ActorPoolStrategy(size=k)``, one core and one torch thread per actor),
  streamed to the driver; its wall time includes the actors' start-up
  (``startup_s`` = until the first actor call began); ``steady_images_per_s``
  leaves it out (first call's start to last call's end, timed in the actors).

The in-process runs use one torch thread, as each actor does. Images are read
from a small layout in a temporary directory by every variant.

    python benchmarks/bench_zodi.py --out bench_zodi.json [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _layout(root: Path, n: int, size: int, num_classes: int) -> list[str]:
    from PIL import Image

    rng = np.random.default_rng(0)
    d = root / "source" / "train"
    (d / "images").mkdir(parents=True)
    (d / "labels").mkdir(parents=True)
    ids = [f"img_{i:05d}" for i in range(n)]
    for i in ids:
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(d / "images" / f"{i}.png")
        # blocky labels, like a segmentation map
        lbl = rng.integers(0, num_classes, (size // 8, size // 8), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
        Image.fromarray(lbl).save(d / "labels" / f"{i}.png")
    return ids


def _in_process(cfg, ids: list[str], batch: int) -> dict:
    """zodi_transfer over ``ids`` in chunks of ``batch`` in this process (components built once)."""
    import torch

    from dass_ray.data.layout import read_sample
    from dass_ray.data.transforms import to_diffusion
    from dass_ray.stages.common import data_root
    from dass_ray.stages.zodi import build_components
    from dass_ray.zodi import resolve_palette, zodi_transfer

    torch.set_num_threads(1)
    zc = cfg.zodi
    t0 = time.perf_counter()
    comps = build_components(cfg, torch.device("cpu"))
    build_s = time.perf_counter() - t0
    palette = resolve_palette(cfg.data.num_classes)
    root = data_root(cfg)

    def run(chunk: list[str]) -> None:
        pairs = [read_sample(root, "source", "train", i, cfg.data.num_classes) for i in chunk]
        x = to_diffusion(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        zodi_transfer(x, y, comps, zc, palette, chunk, seed=zc.seed)

    run(ids[:1])  # warm-up (first-call allocations), not timed
    t0 = time.perf_counter()
    for s in range(0, len(ids), batch):
        run(ids[s : s + batch])
    sec = time.perf_counter() - t0
    return {"batch": batch, "seconds": round(sec, 3), "images_per_s": round(len(ids) / sec, 3),
            "build_components_s": round(build_s, 3)}


def _pool(cfg, ids: list[str], actors: int) -> dict:
    from dass_ray.config import set_path
    from dass_ray.stages.zodi import transfer_dataset, transfer_rows

    cfg = set_path(cfg, "ray.num_actors", actors)
    rows = transfer_rows(ids, cfg.zodi.batch_size)
    t0 = time.time()
    seen = 0
    spans = set()
    for b in transfer_dataset(cfg, rows).iter_batches(batch_size=None, batch_format="numpy"):
        seen += len(b["id"])
        spans |= {(float(s), float(e)) for s, e in zip(b["t_start"], b["t_end"])}
    end = time.time()
    if seen != len(ids):
        raise RuntimeError(f"pool with {actors} actor(s) returned {seen} of {len(ids)} images")
    first, last = min(s for s, _ in spans), max(e for _, e in spans)
    sec = end - t0
    return {"actors": actors, "batch": cfg.zodi.batch_size, "seconds": round(sec, 3),
            "images_per_s": round(seen / sec, 3),
            # actor start-up (imports, components) + scheduling: until the first actor call began
            "startup_s": round(first - t0, 3),
            # from the first call's start to the last call's end, as the actors saw it
            "steady_seconds": round(last - first, 3),
            "steady_images_per_s": round(seen / (last - first), 3)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--quick", action="store_true", help="fewer images and steps (< 60 s)")
    ap.add_argument("--n", type=int, default=None, help="images (default 32, quick 16)")
    ap.add_argument("--steps", type=int, default=None, help="DDIM steps over T (default 10, quick 4)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--actors", type=int, nargs="+", default=None, help="pool sizes (default 1 2, quick 1)")
    args = ap.parse_args(argv)
    n = args.n or (16 if args.quick else 32)
    steps = args.steps or (4 if args.quick else 10)
    actor_counts = args.actors or ([1] if args.quick else [1, 2])

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from dass_ray.config import ExperimentConfig, from_dict
    from dass_ray.zodi.transfer import start_timesteps

    t_all = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_zodi_") as tmp:
        ids = _layout(Path(tmp), n, args.image_size, 19)
        cfg = from_dict(ExperimentConfig, {
            "name": "bench_zodi", "method": "zodi",
            "data": {"dataset": "folder", "root": tmp, "num_classes": 19, "protocol": "cityscapes19"},
            "zodi": {"tiny_random": True, "domain": "night", "steps": steps, "batch_size": args.batch, "seed": 0},
            "ray": {"num_actors": 1, "cpus_per_actor": 1, "threads_per_actor": 1},
        })
        from diffusers import DDIMScheduler

        from dass_ray.zodi.components import SD15_SCHEDULER

        timesteps = start_timesteps(DDIMScheduler(**SD15_SCHEDULER), 0.9, steps)
        results: dict = {
            "what": "ZoDi transfer throughput, tiny random components (CPU)",
            "n_images": n, "image_size": args.image_size, "steps": steps, "strength": 0.9,
            "denoising_steps": len(timesteps), "start_step": timesteps[0], "guidance_scale": cfg.zodi.guidance_scale,
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        }
        print(f"[bench_zodi] {n} images {args.image_size}x{args.image_size}, k={timesteps[0]}, "
              f"{len(timesteps)} DDIM steps + 1 inversion eval, CFG on", flush=True)
        results["single"] = _in_process(cfg, ids, 1)
        print(f"[bench_zodi] single : {results['single']['images_per_s']:.2f} img/s", flush=True)
        results["batched"] = _in_process(cfg, ids, args.batch)
        print(f"[bench_zodi] batched: {results['batched']['images_per_s']:.2f} img/s", flush=True)

        import ray
        from ray.data import DataContext

        ray.init(num_cpus=2, include_dashboard=False, object_store_memory=256 * 1024 * 1024,
                 _node_ip_address="127.0.0.1", log_to_driver=False)
        DataContext.get_current().enable_progress_bars = False
        try:
            for k in actor_counts:
                r = _pool(cfg, ids, k)
                results[f"pool_{k}"] = r
                print(f"[bench_zodi] pool_{k} : {r['images_per_s']:.2f} img/s wall "
                      f"(start-up {r['startup_s']:.1f}s, steady {r['steady_images_per_s']:.2f} img/s)", flush=True)
        finally:
            ray.shutdown()
    single = results["single"]["images_per_s"]
    results["batched_over_single"] = round(results["batched"]["images_per_s"] / single, 3)
    best = max((results[f"pool_{k}"] for k in actor_counts), key=lambda r: r["images_per_s"])
    results["pool_over_single"] = round(best["images_per_s"] / single, 3)
    results["pool_steady_over_single"] = round(
        max(results[f"pool_{k}"]["steady_images_per_s"] for k in actor_counts) / single, 3)
    results["best_pool_actors"] = best["actors"]
    results["total_s"] = round(time.perf_counter() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: results[k] for k in ("batched_over_single", "pool_over_single",
                                              "pool_steady_over_single", "total_s")}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
