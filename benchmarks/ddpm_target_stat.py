"""Does the `digits` default DDPM produce target-like images?

Trains (or reuses from ``runs/_cache/ddpm/<hash>``, relative to the cwd) the DDPM of
``experiments/digits_ptl.yaml`` through ``run_ddpm_stage``, then runs ``sample_grid``:
a domain classifier (source vs target-train) scores source images, phi^n(source) for a
few n, and target images. The issue's statistic: target score of phi^N(source) must
sit closer to the target's than the source's.

    cd /work/main && python benchmarks/ddpm_target_stat.py --out runs/ddpm_stat/ddpm_stat.json
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time
from datetime import datetime, timezone
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--config", default="experiments/digits_ptl.yaml")
    ap.add_argument("--out", default="runs/ddpm_stat/ddpm_stat.json")
    ap.add_argument("--levels", default="150,300,600",
                    help="comma-separated n of phi^n (phi^1000 of 16 images costs minutes on 2 loaded cores)")
    ap.add_argument("--count", type=int, default=16, help="source images per row")
    ap.add_argument("--set", dest="overrides", action="append", default=[])
    args = ap.parse_args(argv)

    from dass_ray.config import load_config
    from dass_ray.ray_utils import ensure_ray
    from dass_ray.stages.common import ensure_data
    from dass_ray.stages.ddpm import ddpm_dir, run_ddpm_stage
    from dass_ray.stages.ddpm_samples import sample_grid

    cfg = load_config(args.config, args.overrides)
    # Ray Train workers run in another cwd (the session's artifacts dir): a relative data.root
    # fails there (DataError: .../artifacts/ddpm/data/digits/... does not exist). The DDPM cache key
    # uses the resolved root, so passing it absolute keeps the key of a run started from this cwd.
    from dass_ray.config import set_path
    from dass_ray.stages.common import data_root

    cfg = set_path(cfg, "data.root", str(data_root(cfg)))
    out = Path(args.out).resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    ensure_data(cfg)
    ensure_ray(cfg.ray)
    import ray

    try:
        was_cached = (ddpm_dir(cfg, out.parent) / "done.json").exists()
        unet_path = run_ddpm_stage(cfg, out.parent)
        t_train = time.time() - t0
        levels = [int(v) for v in args.levels.split(",") if v]
        t1 = time.time()
        png = sample_grid(cfg, unet_path, out.with_suffix(".png"), count=args.count, levels=levels)
        t_sample = time.time() - t1
    finally:
        ray.shutdown()
    grid_json = json.loads(png.with_suffix(".json").read_text())
    s = grid_json["target_score"]
    N = cfg.ptl.N
    key = f"phi_{N}" if f"phi_{N}" in s else None
    verdict = None
    if key:
        d_src = abs(s[key] - s["source"])
        d_tgt = abs(s[key] - s["target"])
        verdict = {"phi_N": key, "dist_to_source": d_src, "dist_to_target": d_tgt,
                   "closer_to_target": d_tgt < d_src}
    hist_path = Path(unet_path).parent / "loss_history.json"
    hist = json.loads(hist_path.read_text()) if hist_path.exists() else []
    result = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "config": args.config,
        "overrides": args.overrides,
        "unet": str(unet_path),
        "ddpm_was_cached": was_cached,
        "ddpm_seconds": round(t_train, 1),
        "sample_grid_seconds": round(t_sample, 1),
        "ddpm_final_loss": hist[-1]["loss"] if hist else None,
        "ddpm_loss_first": hist[0]["loss"] if hist else None,
        "count": args.count,
        "target_score": s,
        "classifier_train_accuracy": grid_json.get("classifier_train_accuracy"),
        "verdict": verdict,
        "grid_png": str(png),
        "machine": {"cores": os.cpu_count(), "loadavg": os.getloadavg(), "python": platform.python_version()},
    }
    out.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
