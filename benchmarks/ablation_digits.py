"""The ablation table on `digits` (paper Tab. 2, 3, 5, 6): every variant, several seeds, mean and std.

    python benchmarks/ablation_digits.py --seeds 3 --out bench_out/ablation_digits.json [--variants a,b] [--readme]

Each variant is an experiment file in ``experiments/`` run with ``dass-ray run`` semantics
(``dass_ray.pipeline.run``) and ``--set seed=S``; runs are resumable (an interrupted
benchmark re-run skips finished runs). The JSON holds every run's metrics; ``--readme``
rewrites the table between the markers ``<!-- ablation:begin -->`` / ``<!-- ablation:end -->``
in README.md from the JSON. Every variant of one seed shares the source-training schedule
and the number of fine-tuning updates (the configs are written that way: 4 levels x 10
iterations = one level x 40 iterations); the oracle is an upper bound trained on
target-train labels.
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

VARIANTS = [
    ("source-only", "digits_source_only"),
    ("baseline (phi^N, no SGG)", "digits_baseline"),
    ("w/o SGG (PTL unguided)", "digits_ablation_wo_sgg"),
    ("w/o PTL (n = N, SGG with g_0)", "digits_ablation_wo_ptl"),
    ("w/o LCG", "digits_ablation_wo_lcg"),
    ("w/o GSG", "digits_ablation_wo_gsg"),
    ("full (PTL + SGG, alternate)", "digits_ptl"),
    ("L_ada only", "digits_ablation_l_ada_only"),
    ("arrangement lcg_then_gsg", "digits_arrangement_lcg_then_gsg"),
    ("arrangement gsg_then_lcg", "digits_arrangement_gsg_then_lcg"),
    ("arrangement random", "digits_arrangement_random"),
    ("w/o augmentation", "digits_ablation_wo_aug"),
    ("oracle (target labels, upper bound)", "digits_oracle"),
]


def table(results: dict) -> str:
    rows = ["| variant | target mIoU (mean ± std) | seeds | source-only of the same runs |", "|---|---|---|---|"]
    for label, name in VARIANTS:
        r = results.get(name)
        if not r or not r["target_miou"]:
            continue
        m = statistics.mean(r["target_miou"])
        sd = statistics.stdev(r["target_miou"]) if len(r["target_miou"]) > 1 else 0.0
        so = r.get("source_only_miou") or []
        so_txt = f"{statistics.mean(so):.1f}" if so else "-"
        rows.append(f"| {label} | {m:.1f} ± {sd:.1f} | {len(r['target_miou'])} | {so_txt} |")
    return "\n".join(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="bench_out/ablation_digits.json")
    ap.add_argument("--runs", default="runs/ablation_digits", help="where the runs go (resumable)")
    ap.add_argument("--variants", default=None, help="comma-separated experiment names (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--readme", action="store_true", help="rewrite the README table from the JSON")
    args = ap.parse_args()

    from dass_ray.config import absolute_paths, load_config
    from dass_ray.pipeline import run

    out = Path(args.out)
    results = json.loads(out.read_text())["results"] if out.exists() else {}
    names = args.variants.split(",") if args.variants else [n for _, n in VARIANTS]
    t0 = time.time()
    for name in names:
        for seed in range(args.seeds):
            cfg = absolute_paths(load_config(ROOT / "experiments" / f"{name}.yaml", [f"seed={seed}", *args.overrides]))
            m = run(cfg, Path(args.runs) / name / f"seed{seed}")
            r = results.setdefault(name, {"target_miou": [], "source_only_miou": [], "runs": []})
            r["runs"] = [x for x in r["runs"] if x["seed"] != seed] + [
                {"seed": seed, **{k: m.get(k) for k in ("target_miou", "source_only_miou", "oracle_miou", "wall_s",
                                                           "unet_evals")}}]
            r["target_miou"] = [x["target_miou"] for x in r["runs"]]
            r["source_only_miou"] = [x["source_only_miou"] for x in r["runs"] if x.get("source_only_miou") is not None]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                                       "seeds": args.seeds, "wall_s": round(time.time() - t0, 1),
                                       "results": results}, indent=2))
    print(table(results))
    if args.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        a, b = "<!-- ablation:begin -->", "<!-- ablation:end -->"
        if a in text and b in text:
            head, rest = text.split(a, 1)
            _, tail = rest.split(b, 1)
            readme.write_text(head + a + "\n" + table(results) + "\n" + b + tail)
    return 0


if __name__ == "__main__":
    sys.exit(main())
