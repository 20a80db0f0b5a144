"""The ablation table on `digits` (paper Tab. 2, 3, 5, 6): every variant, several seeds, mean and std.

    python benchmarks/ablation_digits.py --seeds 3 --out bench_out/ablation_digits.json [--variants a,b] [--write-docs]

Each variant is an experiment file in ``experiments/`` run with ``dass-ray run`` semantics
(``dass_ray.pipeline.run``) and ``--set seed=S``; runs are resumable (an interrupted
benchmark re-run skips finished runs). The JSON holds every run's metrics; ``--write-docs``
rewrites, from the JSON, the variant table and the paired summary between the markers
``<!-- ablation-summary:begin -->`` / ``<!-- ablation-summary:end -->`` in README.md and the
same with the per-level statistics between ``<!-- ablation:begin -->`` / ``<!-- ablation:end -->``
in docs/measurements.md (``--render`` does only that, from an existing JSON). Fair protocol (issue 8): every variant of one seed shares g_0
(the same source schedule; cached) and the number of segmenter updates and translations
(the configs extend ``digits_ptl.yaml``; ``tests/test_config.py`` checks the budgets);
source-only is reported at that budget (``source_only_equal_budget_miou``, its
``target_miou``), at g_0, and at its best checkpoint by source-val (held-out source images,
no target label read). The summary pairs full PTL with source-only and with w/o SGG by
seed. The oracle is an upper bound trained on target-train labels.
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
    ("SGG on x_k (Eq. 7 as printed, lambda 625)", "digits_ablation_sgg_on_xk"),
    ("L_ada only", "digits_ablation_l_ada_only"),
    ("arrangement lcg_then_gsg", "digits_arrangement_lcg_then_gsg"),
    ("arrangement gsg_then_lcg", "digits_arrangement_gsg_then_lcg"),
    ("arrangement random", "digits_arrangement_random"),
    ("w/o augmentation", "digits_ablation_wo_aug"),
    ("oracle (target labels, upper bound)", "digits_oracle"),
]


KEYS = ("target_miou", "source_only_miou", "source_only_equal_budget_miou", "source_only_best_source_val_miou",
        "oracle_miou", "segmenter_updates", "translated_images", "unet_evals", "wall_s", "ddpm_frechet")
# per PTL level: how target-like the translations are (Fréchet feature distance of dass_ray/domain_stats.py)
# and how well they keep the labels (the level's starting segmenter on them vs the source labels)
LEVEL_KEYS = ("level", "frechet_to_target", "frechet_to_source", "consistency_miou", "target_miou", "seconds")


def run_record(seed: int, m: dict) -> dict:
    """What the JSON keeps of one run's metrics.json."""
    rec = {"seed": seed, **{k: m.get(k) for k in KEYS}}
    if m.get("levels"):
        rec["levels"] = [{k: lv.get(k) for k in LEVEL_KEYS} for lv in m["levels"]]
    return rec


def _ms(xs: list) -> str:
    xs = [x for x in xs if x is not None]
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.1f} (1 run)"  # not "± 0.0": one run has no spread
    return f"{statistics.mean(xs):.1f} ± {statistics.stdev(xs):.1f}"


def _by_seed(results: dict, name: str, key: str = "target_miou") -> dict[int, float]:
    return {r["seed"]: r[key] for r in results.get(name, {}).get("runs", []) if r.get(key) is not None}


# Paired differences by seed (a minus b) of the paper's ordering, Tab. 2: full > w/o PTL > baseline > source-only
PAIRS = (
    ("full_minus_wo_ptl", "digits_ptl", "digits_ablation_wo_ptl", "Full PTL minus w/o PTL (one level n = N, SGG with g_0)"),
    ("wo_ptl_minus_baseline", "digits_ablation_wo_ptl", "digits_baseline", "W/o PTL minus the baseline (phi^N, no SGG)"),
    ("baseline_minus_source_only", "digits_baseline", "digits_source_only", "Baseline minus source-only (equal budget)"),
)


def _paired(results: dict, a: str, b: str) -> list[float]:
    """Variant ``a`` minus variant ``b`` on each seed both ran (empty when none)."""
    xa, xb = _by_seed(results, a), _by_seed(results, b)
    return [xa[s] - xb[s] for s in sorted(set(xa) & set(xb))]


def summary(results: dict) -> dict:
    """The issue-8 figures: paired gains over source-only (equal budget) and over w/o SGG, gap closed;
    and the paired steps of the paper's ordering (:data:`PAIRS`) where both variants ran."""
    full, so = _by_seed(results, "digits_ptl"), _by_seed(results, "digits_source_only")
    orc = _by_seed(results, "digits_oracle")
    out: dict = {}
    common = sorted(set(full) & set(so))
    if common:
        out["full_minus_source_only"] = [full[s] - so[s] for s in common]
    for key, a_name, b_name in (("full_minus_wo_sgg", "digits_ptl", "digits_ablation_wo_sgg"),
                                *((k, a, b) for k, a, b, _ in PAIRS)):
        diffs = _paired(results, a_name, b_name)
        if diffs:
            out[key] = diffs
    if common and orc:
        f = statistics.mean(full[s] for s in common)
        b = statistics.mean(so[s] for s in common)
        o = statistics.mean(orc.values())
        out["gap_closed"] = (f - b) / (o - b) if o != b else None
        # a from-scratch oracle run can stall at the all-background solution (seen on digits): the
        # gap is also given against the best oracle run, next to the oracle's runs by seed
        out["oracle_by_seed"] = dict(sorted(orc.items()))
        ob = max(orc.values())
        out["gap_closed_best_oracle"] = (f - b) / (ob - b) if ob != b else None
    return out


def level_table(results: dict) -> list[str]:
    """Per level of the PTL variants: Fréchet distance of the translations to target / source (lower =
    closer) and segmenter consistency, mean ± std over seeds; the DDPM's own phi^N samples for reference."""
    rows: list[str] = []
    for label, name in VARIANTS:
        runs = [x for x in results.get(name, {}).get("runs", []) if x.get("levels")]
        if not runs:
            continue
        if not rows:
            rows += ["", "| variant | level n | Fréchet to target | Fréchet to source | consistency mIoU | "
                         "target-val mIoU after the level |", "|---|---|---|---|---|---|"]
        for n in sorted({lv["level"] for x in runs for lv in x["levels"]}):
            lvs = [lv for x in runs for lv in x["levels"] if lv["level"] == n]
            rows.append(f"| {label} | {n} | " + " | ".join(_ms([lv.get(k) for lv in lvs]) for k in (
                "frechet_to_target", "frechet_to_source", "consistency_miou", "target_miou")) + " |")
    dd = [x["ddpm_frechet"] for r in results.values() for x in r.get("runs", []) if x.get("ddpm_frechet")]
    if dd:
        rows.append("")
        rows.append("DDPM samples (unguided, same statistic, 64 images a row): " + "; ".join(
            f"{k.replace('phi_', 'phi^')} to target {v['to_target']:.1f}" + (f", to source {v['to_source']:.1f}" if "to_source" in v else "")
            for k, v in dd[0].items() if isinstance(v, dict) and "to_target" in v) + ".")
    return rows


def _full_minus(results: dict, name: str) -> str:
    """Full PTL minus ``name`` on the seeds both ran, with the per-seed values ("-" for full, the oracle)."""
    if name in ("digits_ptl", "digits_oracle"):
        return "-"
    d = _paired(results, "digits_ptl", name)
    if not d:
        return "-"
    seeds = sorted(set(_by_seed(results, "digits_ptl")) & set(_by_seed(results, name)))
    if len(d) == 1:
        return f"{d[0]:+.1f} (seed {seeds[0]} only)"
    per = ", ".join(f"{x:+.1f}" for x in d)
    return f"{_ms(d)} ({per}; seeds {', '.join(map(str, seeds))})"


def table(results: dict, levels: bool = True) -> str:
    """Markdown: the variant table, (``levels``) the per-level statistics, then the paired summary."""
    rows = ["| variant | target-val mIoU (mean ± std) | seeds | segmenter updates | full PTL minus the variant, "
            "paired by seed |", "|---|---|---|---|---|"]
    for label, name in VARIANTS:
        r = results.get(name)
        if not r or not r.get("runs"):
            continue
        runs = r["runs"]
        upd = {x.get("segmenter_updates") for x in runs} - {None}
        rows.append(f"| {label} | {_ms([x['target_miou'] for x in runs])} | {len(runs)} | "
                    f"{', '.join(str(u) for u in sorted(upd)) or '-'} | {_full_minus(results, name)} |")
        if name == "digits_source_only":
            rows.append(f"| source-only at g_0 (source schedule only) | {_ms([x.get('source_only_miou') for x in runs])}"
                        f" | {len(runs)} | | |")
            rows.append(f"| source-only, best checkpoint by source-val | "
                        f"{_ms([x.get('source_only_best_source_val_miou') for x in runs])} | {len(runs)} | | |")
    if levels:
        rows += level_table(results)
    s = summary(results)
    if s:
        rows.append("")
        if "full_minus_source_only" in s:
            rows.append(f"Full PTL minus source-only (equal budget), paired by seed: {_ms(s['full_minus_source_only'])}.")
        if "full_minus_wo_sgg" in s:
            rows.append(f"Full PTL minus PTL without SGG, paired by seed: {_ms(s['full_minus_wo_sgg'])}.")
        for key, _, _, text in PAIRS:
            if key in s:
                rows.append(f"{text}, paired by seed: {_ms(s[key])} ({', '.join(f'{d:+.1f}' for d in s[key])}).")
        if s.get("gap_closed") is not None:
            orc = s.get("oracle_by_seed", {})
            rows.append(f"Fraction of the source-only -> oracle gap closed by full PTL: {100 * s['gap_closed']:.0f} % "
                        f"against the mean oracle; oracle runs by seed: "
                        f"{', '.join(f'{v:.1f} (seed {k})' for k, v in orc.items())}.")
            if s.get("gap_closed_best_oracle") is not None and len(orc) > 1:
                rows.append(f"Against the best oracle run ({max(orc.values()):.1f}): "
                            f"{100 * s['gap_closed_best_oracle']:.0f} %.")
    return "\n".join(rows)


DOC_TABLES = (("README.md", "ablation-summary", False), ("docs/measurements.md", "ablation", True))


def replace_between_markers(text: str, marker: str, body: str, where: str = "text") -> str:
    """``text`` with what lies between ``<!-- {marker}:begin -->`` and ``<!-- {marker}:end -->``
    replaced by ``body``; a missing marker is an error (a table silently not written is worse)."""
    a, b = f"<!-- {marker}:begin -->", f"<!-- {marker}:end -->"
    if a not in text or b not in text:
        raise ValueError(f"{where}: markers {a} / {b} not found")
    head, rest = text.split(a, 1)
    _, tail = rest.split(b, 1)
    return head + a + "\n" + body + "\n" + b + tail


def write_docs(results: dict, root: Path = ROOT) -> None:
    """The summary table into README.md, the full one (with per-level statistics) into docs/measurements.md."""
    for rel, marker, levels in DOC_TABLES:
        path = root / rel
        path.write_text(replace_between_markers(path.read_text(), marker, table(results, levels=levels), str(path)))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default="bench_out/ablation_digits.json")
    ap.add_argument("--runs", default="runs/ablation_digits", help="where the runs go (resumable)")
    ap.add_argument("--variants", default=None, help="comma-separated experiment names (default: all)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra overrides for every run")
    ap.add_argument("--write-docs", action="store_true",
                    help="rewrite the tables in README.md and docs/measurements.md from the JSON")
    ap.add_argument("--render", action="store_true",
                    help="run nothing: only rewrite the tables of README.md and docs/measurements.md from --out")
    ap.add_argument("--collect", action="store_true",
                    help="run nothing: rebuild the JSON from the finished runs' metrics.json under --runs")
    args = ap.parse_args()

    from dass_ray.config import absolute_paths, load_config
    from dass_ray.pipeline import run

    out = Path(args.out)
    previous = json.loads(out.read_text()) if out.exists() else {}
    if args.render:
        if not previous:
            raise SystemExit(f"--render: {out} does not exist")
        write_docs(previous["results"])
        return 0
    results = previous.get("results", {})
    names = args.variants.split(",") if args.variants else [n for _, n in VARIANTS]
    t0 = time.time()
    for seed in range(args.seeds):  # seed-major: an interrupted benchmark has whole seeds of every variant
        for name in names:
            run_dir = Path(args.runs) / name / f"seed{seed}"
            if args.collect:
                if not (run_dir / "metrics.json").is_file():
                    continue  # not finished: left out, never invented
                m = json.loads((run_dir / "metrics.json").read_text())
            else:
                overrides = [f"seed={seed}", *args.overrides]
                m = run(absolute_paths(load_config(ROOT / "experiments" / f"{name}.yaml", overrides)), run_dir)
            r = results.setdefault(name, {"runs": []})
            r["runs"] = sorted([x for x in r["runs"] if x["seed"] != seed] + [run_record(seed, m)],
                               key=lambda x: x["seed"])
            r["target_miou"] = [x["target_miou"] for x in r["runs"]]
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "machine": platform.platform(),
                                       "cpus": __import__("os").cpu_count(), "seeds": args.seeds,
                                       "overrides": args.overrides,
                                       "wall_s": previous.get("wall_s") if args.collect else round(time.time() - t0, 1),
                                       "summary": summary(results), "results": results}, indent=2))
    print(table(results))
    if args.write_docs:
        write_docs(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
