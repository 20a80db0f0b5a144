"""``dass-ray tune``: a Ray Tune sweep over the whole pipeline, logged to MLflow.

One trial = one :func:`dass_ray.pipeline.run` of the base config with the
sampled params applied (``out/trials/<trial_id>``). The pipeline runs beside
the trial (a 0-CPU Ray task the trial owns, outside Tune's placement group:
see :func:`pipeline_trial`); the trial's thread polls the PTL level
records (``ptl/levels/<n>/record.json``) and calls ``tune.report`` once per
finished level, so ASHA (``time_attr=training_iteration``,
``grace_period=space.grace_levels``) can stop weak trials after a few levels.
A last report carries the numeric values of the trial's ``metrics.json``
(``final=1``).

Decisions, each a plain function tested without Ray:

* :func:`trial_config`: all sampled params are applied to the base config at
  once and validated once; a combination the config refuses (``ptl.stride`` >
  ``ptl.N``, ``ptl.N`` > ``diffusion.num_train_timesteps``, ...) raises a
  :class:`~dass_ray.config.ConfigError` naming the params, so that trial ends
  ERROR with that message (the sweep goes on). :func:`check_combinations`
  samples the space in the driver before any trial starts: a space where no
  sampled combination is valid fails at once, a partly invalid one is
  reported with an example.
* :func:`scale_cpus`: the resource rule. A trial's own function takes no CPU
  (``{"CPU": 0}``; Ray Tune 2.60 refuses an all-zero request, so the trial
  holds 1 MiB of Ray's logical ``memory`` resource instead). The CPUs a trial
  holds at its peak are the PTL stage's train workers plus translation
  actors: ``demand = num_workers * cpus_per_worker + num_actors *
  cpus_per_actor``. With ``k = min(max_concurrent, trials)`` trials at once
  and ``C`` cluster CPUs, each trial's budget is ``C / k``; when ``demand``
  exceeds it, ``cpus_per_worker`` and ``cpus_per_actor`` are multiplied by
  ``budget / demand`` (rounded down to 0.001) and the torch thread counts by
  the same factor (at least 1). Example: 2 CPUs, 2 concurrent trials, 1
  worker + 1 actor of 1 CPU each -> 0.5 CPU each. GPUs are not scaled.
* Shared DDPM: unless a ``diffusion.*``, ``data.*`` or ``seed`` param is
  searched (they change the DDPM's cache key), the driver trains (or reuses)
  the DDPM once with :func:`~dass_ray.stages.ddpm.run_ddpm_stage` before the
  trials start, under ``diffusion.cache_dir`` (``out/ddpm_cache`` when the
  base config has none), so every trial reuses it. Otherwise the trials
  train it themselves under the cache's file lock.
* Trials run with ``tracking.enabled=false``; relative paths of the base
  config are made absolute (Tune trials do not run in the driver's working
  directory).

MLflow: the sweep is a parent run created in the driver (``Tracker``:
``cfg.tracking.uri``, else ``MLFLOW_TRACKING_URI``, else
``sqlite:///<out>/mlflow.db`` with artifacts in ``<out>/mlartifacts``); each
trial is a child run through Ray's ``MLflowLoggerCallback`` (params = the
sampled params, metrics = every report, artifacts = Ray's trial directory).
Failed trials get an ``error`` tag; the parent ends FINISHED (FAILED when the
sweep itself fails or no trial produced the objective).

Outputs in ``out``: ``results.csv``, ``objective_vs_params.png``,
``best_config.yaml`` (the best trial's config with ``tracking.enabled``
restored: ``dass-ray run best_config.yaml`` accepts it unchanged),
``summary.json``, ``trials/<trial_id>/`` (each trial's run directory) and
``ray_results/`` (Ray's bookkeeping).
"""
from __future__ import annotations

import csv
import json
import math
import os
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional


from .checkpoints import atomic_write_json, atomic_write_text
from .config import ConfigError, ExperimentConfig, from_dict
from .tune_space import SearchSpace, load_space

# A trial's own function holds no CPU: this is what it asks Ray Tune for instead
# (Tune 2.60 refuses a request whose every amount is zero).
TRIAL_RESOURCES = {"CPU": 0, "memory": 1024 * 1024}
ASHA_REDUCTION_FACTOR = 2
_PATH_FIELDS = ("data.root", "diffusion.cache_dir", "diffusion.weights", "segmenter.pretrained",
                "zodi.base_model", "zodi.controlnet", "zodi.class_palette")
# params that change the DDPM's cache key (stages/ddpm.py cache_key)
_DDPM_KEY_PREFIXES = ("diffusion.", "data.")


# --------------------------------------------------------------------------- trial configs

def trial_config(base: ExperimentConfig, params: dict[str, Any]) -> ExperimentConfig:
    """``base`` with every sampled param applied at once, validated once.

    Applying them one by one would refuse valid combinations on the way
    (``ptl.stride=100`` before ``ptl.N=600`` on a base with ``N=20``).
    Raises ``ConfigError`` naming the params when the combination is invalid.
    """
    d = base.to_dict()
    for path, value in params.items():
        parts = path.split(".")
        node = d
        for p in parts[:-1]:
            if not isinstance(node.get(p), dict):
                raise ConfigError(f"tune param '{path}': unknown config section '{p}'")
            node = node[p]
        if parts[-1] not in node:
            raise ConfigError(f"tune param '{path}': unknown config key")
        node[parts[-1]] = value
    try:
        return from_dict(ExperimentConfig, d)
    except ConfigError as e:
        shown = ", ".join(f"{k}={_fmt(v)}" for k, v in params.items())
        raise ConfigError(f"invalid combination of tune params ({shown}): {e}") from None


def _fmt(v: Any) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


def sample_params(space: SearchSpace, rng: random.Random) -> dict[str, Any]:
    """One draw from the space without Ray (the same distributions as ``Param.to_tune``)."""
    out: dict[str, Any] = {}
    for p in space.params:
        lo_hi = p.values
        if p.kind in ("choice", "grid"):  # a grid point drawn at random: validity checks only
            out[p.path] = rng.choice(p.values)
        elif p.kind == "uniform":
            out[p.path] = rng.uniform(lo_hi[0], lo_hi[1])
        elif p.kind == "loguniform":
            out[p.path] = math.exp(rng.uniform(math.log(lo_hi[0]), math.log(lo_hi[1])))
        else:
            out[p.path] = rng.randrange(int(lo_hi[0]), int(lo_hi[1]))
    return out


def check_combinations(base: ExperimentConfig, space: SearchSpace, n: int = 256,
                       seed: int = 0) -> tuple[int, int, Optional[str]]:
    """Sample ``n`` combinations; return (valid, invalid, first error message).

    Raises ``ConfigError`` when none is valid: the space does not fit the base
    config (e.g. a paper-scale space over a smoke config with ``N=20``).
    """
    rng = random.Random(seed)
    ok = bad = 0
    first: Optional[str] = None
    for _ in range(n):
        try:
            trial_config(base, sample_params(space, rng))
            ok += 1
        except ConfigError as e:
            bad += 1
            first = first or str(e)
    if ok == 0:
        raise ConfigError(f"tune space {space.source or ''}: none of {n} sampled combinations is valid for "
                          f"config '{base.name}'; e.g. {first}")
    return ok, bad, first


def absolute_paths(cfg: ExperimentConfig, cwd: Optional[Path] = None) -> ExperimentConfig:
    """Relative paths of the config made absolute against ``cwd`` (trials run elsewhere)."""
    cwd = Path(cwd or os.getcwd())
    d = cfg.to_dict()
    for path in _PATH_FIELDS:
        sec, key = path.split(".")
        v = d[sec][key]
        if isinstance(v, str) and v and not Path(v).expanduser().is_absolute():
            d[sec][key] = str((cwd / Path(v).expanduser()).resolve())
    return from_dict(ExperimentConfig, d)


# --------------------------------------------------------------------------- resources

def trial_cpu_demand(cfg: ExperimentConfig) -> float:
    """CPUs one trial holds at its peak: the PTL stage's train workers plus translation actors."""
    r = cfg.ray
    return r.num_workers * r.cpus_per_worker + r.num_actors * r.cpus_per_actor


def scale_cpus(cfg: ExperimentConfig, cluster_cpus: float, concurrent: int) -> tuple[ExperimentConfig, float]:
    """Shrink the per-worker/actor CPUs so ``concurrent`` trials fit ``cluster_cpus``.

    Returns (config, factor); factor 1.0 when the trial already fits its budget
    ``cluster_cpus / concurrent`` (CPUs are never scaled up).
    """
    if concurrent < 1:
        raise ValueError(f"concurrent trials must be >= 1, got {concurrent}")
    budget = cluster_cpus / concurrent
    demand = trial_cpu_demand(cfg)
    if demand <= 0 or demand <= budget + 1e-9:
        return cfg, 1.0
    f = budget / demand
    d = cfg.to_dict()
    r = d["ray"]

    def down(x: float) -> float:
        return 0.0 if x == 0 else max(0.001, math.floor(x * f * 1000) / 1000)

    r["cpus_per_worker"] = down(r["cpus_per_worker"])
    r["cpus_per_actor"] = down(r["cpus_per_actor"])
    if r["threads_per_worker"] is not None:
        r["threads_per_worker"] = max(1, int(r["threads_per_worker"] * f))
    r["threads_per_actor"] = max(1, int(r["threads_per_actor"] * f))
    return from_dict(ExperimentConfig, d), f


def effective_concurrency(space: SearchSpace, samples: int) -> int:
    """Trials at once: ``max_concurrent``, or fewer when the sweep has fewer trials (grid points x samples)."""
    return max(1, min(space.max_concurrent, space.trials(samples)))


def max_reports(base: ExperimentConfig, space: SearchSpace) -> int:
    """An upper bound of the reports a trial makes (levels + the final one): ASHA's ``max_t``."""
    if base.method != "ptl":
        return 1

    def bound(path: str, current: float, hi: bool) -> float:
        for p in space.params:
            if p.path == path:
                vals = [float(v) for v in p.values]
                if p.kind == "randint":
                    vals = [vals[0], vals[1] - 1]
                return max(vals) if hi else min(vals)
        return current

    n_max = bound("ptl.N", base.ptl.N, True)
    s_min = max(1.0, bound("ptl.stride", base.ptl.stride, False))
    return int(math.ceil(n_max / s_min)) + 1


def ddpm_shared(space: SearchSpace) -> bool:
    """True when no searched param changes the DDPM (so the driver trains it once for all trials)."""
    return not any(p.path.startswith(_DDPM_KEY_PREFIXES) or p.path == "seed" for p in space.params)


def prepare_base(cfg: ExperimentConfig, out: Path, cluster_cpus: float, concurrent: int,
                 cwd: Optional[Path] = None) -> tuple[ExperimentConfig, float]:
    """The config every trial starts from: absolute paths, shared DDPM cache, no MLflow, scaled CPUs."""
    base = absolute_paths(cfg, cwd)
    d = base.to_dict()
    d["tracking"]["enabled"] = False
    if not d["diffusion"]["cache_dir"] and not d["diffusion"]["weights"]:
        d["diffusion"]["cache_dir"] = str((Path(out) / "ddpm_cache").resolve())
    base = from_dict(ExperimentConfig, d)
    return scale_cpus(base, cluster_cpus, concurrent)


# --------------------------------------------------------------------------- per-level reports

class LevelPoller:
    """Turns the PTL level records of a run directory into ``tune.report`` dicts, once each.

    Every report carries ``level``, ``ptl_loss``, ``level_seconds``,
    ``evaluated`` (1 when the level was evaluated on target-val) and
    ``target_miou``: the level's value when evaluated, else the last known
    one (the previous evaluated level, or g_0's source-only mIoU), so ASHA
    always has the metric to compare.
    """

    def __init__(self, run_dir: Path, metric: str = "target_miou"):
        self.run_dir = Path(run_dir)
        self.metric = metric
        self.seen: set[int] = set()
        self.last: dict[str, float] = {}

    def _source_only(self) -> Optional[float]:
        p = self.run_dir / "state.json"
        if not p.exists():
            return None
        try:
            done = json.loads(p.read_text()).get("done", {})
        except (json.JSONDecodeError, OSError):
            return None
        res = (done.get("eval_source") or {}).get("result") or {}
        return res.get("miou")

    def poll(self) -> list[dict[str, float]]:
        from .stages.ptl import done_levels, level_dir

        out = []
        for n in done_levels(self.run_dir):
            if n in self.seen:
                continue
            try:
                rec = json.loads((level_dir(self.run_dir, n) / "record.json").read_text())
            except (json.JSONDecodeError, OSError):
                break  # being written: next poll
            self.seen.add(n)
            if "target_miou" not in self.last:
                s0 = self._source_only()
                if s0 is not None:
                    self.last["target_miou"] = float(s0)
            rep: dict[str, float] = {"level": int(n), "ptl_loss": float(rec["loss"]),
                                     "level_seconds": float(rec.get("seconds", 0.0)),
                                     "evaluated": 1 if "target_miou" in rec else 0}
            for k, v in rec.items():
                if k in ("level", "loss", "seconds", "per_class") or isinstance(v, bool):
                    continue
                if isinstance(v, (int, float)) and math.isfinite(float(v)):
                    self.last[k] = float(v)
            rep.update({k: v for k, v in self.last.items() if k in ("target_miou", self.metric)})
            out.append(rep)
        return out


def final_report(run_dir: Path, cfg: ExperimentConfig) -> dict[str, float]:
    """The numeric values of ``metrics.json``, with ``final=1`` and the last level."""
    m = json.loads((Path(run_dir) / "metrics.json").read_text())
    rep = {k: float(v) for k, v in m.items()
           if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))}
    rep["final"] = 1
    if cfg.method == "ptl":
        rep["level"] = cfg.ptl.N
    return rep


def _run_pipeline(cfg_dict: dict, run_dir: str) -> None:
    """One ``pipeline.run`` (a Ray task started by the trial; see :func:`pipeline_trial`)."""
    from .pipeline import run

    run(from_dict(ExperimentConfig, cfg_dict), Path(run_dir))


def pipeline_trial(params: dict, base: dict, out: str, metric: str, poll_s: float = 2.0) -> None:
    """The Tune function trainable: one pipeline run, one report per finished level, a final one.

    The pipeline runs beside the trial's thread, as a 0-CPU Ray task scheduled
    with ``scheduling_strategy="DEFAULT"``: a trial runs inside Tune's placement
    group, which captures the tasks and actors its code starts without a
    strategy (the evaluation task, Ray Data's actor pool) and whose only bundle
    holds no CPU, so run in the trial's own process they could never be
    scheduled. The task is owned by the trial: when ASHA stops the trial (or it
    fails), the task is cancelled and Ray ends what it started.
    """
    import ray
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(from_dict(ExperimentConfig, base), params)
    run_dir = Path(out) / "trials" / trial_id
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run_dir / "trial_params.json", params)
    task = ray.remote(num_cpus=0, max_retries=0, scheduling_strategy="DEFAULT")(_run_pipeline)
    ref = task.options(name=f"pipeline-{trial_id}").remote(cfg.to_dict(), str(run_dir))
    poller = LevelPoller(run_dir, metric)
    finished = False
    try:
        while True:
            done, _ = ray.wait([ref], timeout=poll_s)
            for rep in poller.poll():
                tune.report(rep)
            if done:
                break
        ray.get(ref)  # raises the pipeline's error: the trial ends ERROR with it
        finished = True
    finally:
        if not finished:
            ray.cancel(ref, force=True)
    tune.report(final_report(run_dir, cfg))


# --------------------------------------------------------------------------- results

@dataclass
class TrialResult:
    """One trial as the reports see it. ``status``: completed | stopped (ASHA) | error."""

    trial_id: str
    params: dict[str, Any]
    objective: Optional[float]
    status: str
    wall_s: float = 0.0
    reports: int = 0
    error: Optional[str] = None
    run_dir: Optional[str] = None
    metrics: dict[str, Any] = field(default_factory=dict)


def pick_best(results: list[TrialResult], mode: str) -> Optional[TrialResult]:
    """The best completed trial by the objective (a trial ASHA stopped only when none completed)."""
    for pool in (["completed"], ["completed", "stopped"]):
        cands = [r for r in results if r.status in pool and r.objective is not None and math.isfinite(r.objective)]
        if cands:
            return (max if mode == "max" else min)(cands, key=lambda r: r.objective)
    return None


def write_results_csv(path: Path, results: list[TrialResult], space: SearchSpace) -> Path:
    cols = ["trial_id", *[p.path for p in space.params], space.metric, "status", "wall_s", "reports", "error"]
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in results:
            w.writerow([r.trial_id, *[_cell(r.params.get(p.path)) for p in space.params],
                        "" if r.objective is None else f"{r.objective:.4f}", r.status, f"{r.wall_s:.1f}", r.reports,
                        (r.error or "").replace("\n", " ")[:300]])
    return path


def _cell(v: Any) -> str:
    if v is None:
        return ""
    return f"{v:.6g}" if isinstance(v, float) else str(v)


def plot_objective(path: Path, results: list[TrialResult], space: SearchSpace) -> Path:
    """One subplot per searched param: the objective against the param's value.

    Filled dots: completed trials; hollow: stopped early by ASHA (their last
    reported value); the best trial is starred. Categorical params are spread
    over their choices; loguniform params get a log axis.
    """
    from .pictures import _plt

    plt = _plt()
    k = len(space.params)
    ncol = min(3, k)
    nrow = int(math.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    best = pick_best(results, space.mode)
    shown = [r for r in results if r.objective is not None]
    for i, p in enumerate(space.params):
        ax = axes[i // ncol][i % ncol]
        categorical = p.kind in ("choice", "grid") and not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                      for v in p.values)
        if categorical:
            labels = [str(v) for v in p.values]
            pos = {lab: j for j, lab in enumerate(labels)}

            def xval(v):
                return pos.get(str(v), math.nan)

            ax.set_xticks(range(len(labels)))
            ax.set_xticklabels(labels, rotation=20, fontsize=8)
            ax.set_xlim(-0.5, len(labels) - 0.5)
        else:
            def xval(v):
                return float(v) if v is not None else math.nan

            lo, hi = float(min(p.values)), float(max(p.values))
            if p.kind == "loguniform":
                from matplotlib.ticker import NullFormatter

                ax.set_xscale("log")
                ax.set_xlim(lo / 1.3, hi * 1.3)
                ax.xaxis.set_minor_formatter(NullFormatter())
            else:
                pad = 0.08 * (hi - lo) if hi > lo else max(abs(lo) * 0.1, 0.5)
                ax.set_xlim(lo - pad, hi + pad)
        for status, style in (("completed", dict(marker="o", color="C0")),
                              ("stopped", dict(marker="o", facecolors="none", edgecolors="C1"))):
            pts = [(xval(r.params.get(p.path)), r.objective) for r in shown if r.status == status]
            if pts:
                ax.scatter([x for x, _ in pts], [y for _, y in pts], s=36, label=status, **style)
        if best is not None:
            ax.scatter([xval(best.params.get(p.path))], [best.objective], marker="*", s=160, color="C3",
                       label="best", zorder=5)
        ax.set_xlabel(p.path)
        ax.set_ylabel(space.metric)
        ax.grid(alpha=0.3)
        if i == 0 and shown:
            ax.legend(fontsize=7)
    for j in range(k, nrow * ncol):
        axes[j // ncol][j % ncol].axis("off")
    n_err = sum(r.status == "error" for r in results)
    fig.suptitle(f"{space.metric} ({space.mode}) vs params: {len(results)} trials"
                 + (f", {n_err} failed" if n_err else ""), fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def best_trial_config(base: ExperimentConfig, best: TrialResult, tracking_enabled: bool = True) -> ExperimentConfig:
    """The best trial's config with ``tracking.enabled`` restored (what ``best_config.yaml`` holds)."""
    cfg = trial_config(base, best.params)
    d = cfg.to_dict()
    d["tracking"]["enabled"] = tracking_enabled
    return from_dict(ExperimentConfig, d)


def write_reports(out: Path, results: list[TrialResult], space: SearchSpace, base: ExperimentConfig,
                  tracking_enabled: bool = True, log: Callable[[str], None] = print) -> dict:
    """``results.csv``, ``objective_vs_params.png``, ``best_config.yaml``, ``summary.json``; returns the summary."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    csv_path = write_results_csv(out / "results.csv", results, space)
    png_path = plot_objective(out / "objective_vs_params.png", results, space)
    best = pick_best(results, space.mode)
    summary: dict[str, Any] = {
        "metric": space.metric, "mode": space.mode, "trials": len(results),
        "completed": sum(r.status == "completed" for r in results),
        "stopped": sum(r.status == "stopped" for r in results),
        "errors": sum(r.status == "error" for r in results),
        "results_csv": str(csv_path), "plot": str(png_path), "best": None, "best_config": None,
    }
    if best is not None:
        cfg = best_trial_config(base, best, tracking_enabled)
        text = (f"# best trial {best.trial_id} of the sweep in {out}: {space.metric} = {best.objective:.4f} "
                f"({space.mode})\n# params: {json.dumps(best.params, default=str)}\n" + cfg.to_yaml())
        atomic_write_text(out / "best_config.yaml", text)
        summary["best"] = {"trial_id": best.trial_id, "objective": best.objective, "params": best.params,
                           "status": best.status, "run_dir": best.run_dir}
        summary["best_config"] = str(out / "best_config.yaml")
    atomic_write_json(out / "summary.json", summary)
    log(_table(results, space))
    if best is not None:
        log(f"\nbest trial {best.trial_id}: {space.metric} = {best.objective:.4f}; config in {out / 'best_config.yaml'}:\n")
        log(cfg.to_yaml())
    else:
        log("no trial produced the objective; no best_config.yaml")
    return summary


def _table(results: list[TrialResult], space: SearchSpace) -> str:
    names = ["trial_id", *[p.path for p in space.params], space.metric, "status", "wall_s"]
    rows = [[r.trial_id, *[_cell(r.params.get(p.path)) for p in space.params],
             "-" if r.objective is None else f"{r.objective:.2f}", r.status, f"{r.wall_s:.0f}"] for r in results]
    widths = [max(len(n), *(len(row[i]) for row in rows)) if rows else len(n) for i, n in enumerate(names)]
    line = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([f"\n== tune: {len(results)} trials ==", line(names), *[line(r) for r in rows]])


def collect_results(grid, space: SearchSpace, out: Path) -> list[TrialResult]:
    """``TrialResult`` of every trial of a Tune ``ResultGrid``."""
    trials = list(grid._experiment_analysis.trials)  # same order as the grid's results
    results = []
    for trial, res in zip(trials, grid):
        m = dict(res.metrics or {})
        params = {p.path: trial.config.get(p.path) for p in space.params}
        err = None
        if res.error is not None:
            err = _error_text(res.error)
            status = "error"
        elif m.get("final") == 1:
            status = "completed"
        else:
            status = "stopped"
        obj = m.get(space.metric)
        results.append(TrialResult(
            trial_id=trial.trial_id, params=params,
            objective=float(obj) if isinstance(obj, (int, float)) and not isinstance(obj, bool) else None,
            status=status, wall_s=float(m.get("time_total_s") or 0.0),
            reports=int(m.get("training_iteration") or 0), error=err,
            run_dir=str(out / "trials" / trial.trial_id),
            metrics={k: v for k, v in m.items() if isinstance(v, (int, float)) and not isinstance(v, bool)},
        ))
    return results


def _error_text(err: BaseException) -> str:
    """The root cause's one-line message (Tune wraps trial errors)."""
    text = str(err).strip()
    lines = [ln for ln in text.splitlines() if ln.strip()]
    for ln in reversed(lines):
        if ("Error" in ln or "Exception" in ln) and ":" in ln:
            return ln.strip()[:500]
    return (lines[-1] if lines else type(err).__name__)[:500]


# --------------------------------------------------------------------------- the sweep

def default_out(cfg: ExperimentConfig) -> Path:
    return Path("runs") / f"{cfg.name}-tune" / time.strftime("%Y%m%d-%H%M%S")


def _space_params(space: SearchSpace) -> dict[str, str]:
    d = {"tune.metric": space.metric, "tune.mode": space.mode, "tune.max_concurrent": str(space.max_concurrent),
         "tune.grace_levels": str(space.grace_levels), "tune.space": space.source or ""}
    for p in space.params:
        d[f"tune.param.{p.path}"] = f"{p.kind}{p.values}"
    return d


def _ensure_experiment(tracker, out: Path) -> None:
    """Create the MLflow experiment in the driver (before trials: migrations race).

    With a local sqlite store the artifacts go to ``out/mlartifacts`` (MLflow's
    default would be ``./mlruns`` in the working directory).
    """
    def _create():
        c = tracker.client
        if c.get_experiment_by_name(tracker.experiment) is None:
            loc = None
            if tracker.uri.startswith("sqlite:"):
                loc = (out / "mlartifacts").resolve().as_uri()
            c.create_experiment(tracker.experiment, artifact_location=loc)

    tracker._guard("create experiment", _create)


def run_tune(cfg: ExperimentConfig, space_path: str | os.PathLike, out: Optional[Path] = None,
             samples: Optional[int] = None, scheduler: Optional[str] = None,
             log: Callable[[str], None] = print) -> dict:
    """Run the sweep; return the summary (also written to ``out/summary.json``)."""
    import ray
    from ray import tune

    from .ray_utils import ensure_ray
    from .stages import common
    from .tracking import Tracker

    t0 = time.time()
    space = load_space(space_path)
    samples = samples or space.samples
    if samples < 1:
        raise ConfigError(f"--samples {samples}: expected an integer >= 1")
    sched = scheduler or space.scheduler
    out = Path(out or default_out(cfg)).resolve()
    out.mkdir(parents=True, exist_ok=True)
    ok, bad, example = check_combinations(absolute_paths(cfg), space)
    if bad:
        log(f"[tune] WARNING: {bad} of {ok + bad} sampled combinations of {space.source} are invalid for "
            f"'{cfg.name}'; such trials end ERROR with the reason, e.g.: {example}")
    os.environ.setdefault("TUNE_DISABLE_STRICT_METRIC_CHECKING", "1")

    tracker = Tracker(cfg, out)
    tracking = tracker.enabled
    if tracking:
        _ensure_experiment(tracker, out)
        tracker.start(run_name=f"{cfg.name}-tune-{out.name}")
        if tracker.parent_run_id:
            tracker.log_params(_space_params(space))
            tracker._guard("set tags", tracker.client.set_tag, tracker.parent_run_id, "dass_ray.kind", "tune")
    started_ray = not ray.is_initialized()
    status, error = "FAILED", None
    try:
        common.ensure_data(cfg, log)
        ensure_ray(cfg.ray)
        cluster_cpus = float(ray.cluster_resources().get("CPU", 1.0))
        concurrent = effective_concurrency(space, samples)
        base, factor = prepare_base(cfg, out, cluster_cpus, concurrent)
        log(f"[tune] {space.trials(samples)} trials of {space.source} over '{cfg.name}', {concurrent} at once on {cluster_cpus:g} "
            f"CPUs; per trial: {base.ray.num_workers} x {base.ray.cpus_per_worker:g} CPU train workers + "
            f"{base.ray.num_actors} x {base.ray.cpus_per_actor:g} CPU actors (scale {factor:.3g}); out {out}")
        tracker.log_params({"tune.samples": samples, "tune.scheduler": sched, "tune.concurrent": concurrent,
                            "tune.cluster_cpus": cluster_cpus, "tune.cpu_scale": round(factor, 4)})
        if base.method == "ptl" and ddpm_shared(space):
            from .stages.ddpm import run_ddpm_stage

            ddpm_cfg = from_dict(ExperimentConfig, {**base.to_dict(), "ray": cfg.to_dict()["ray"]})  # unscaled: no trial runs yet
            unet = run_ddpm_stage(ddpm_cfg, out / "driver", log=log)
            tracker.log_params({"tune.ddpm": str(unet)})
            log(f"[tune] shared DDPM for all trials: {unet}")

        metric = space.metric
        sched_obj = None
        if sched == "asha":
            from ray.tune.schedulers import ASHAScheduler

            max_t = max(max_reports(base, space), space.grace_levels)
            sched_obj = ASHAScheduler(time_attr="training_iteration", grace_period=space.grace_levels,
                                      max_t=max_t, reduction_factor=ASHA_REDUCTION_FACTOR,
                                      stop_last_trials=False)
        callbacks = []
        if tracking and tracker.parent_run_id:
            from ray.air.integrations.mlflow import MLflowLoggerCallback

            callbacks.append(MLflowLoggerCallback(
                tracking_uri=tracker.uri, experiment_name=tracker.experiment,
                tags={"mlflow.parentRunId": tracker.parent_run_id, "dass_ray.kind": "tune-trial"},
                save_artifact=True))
        trainable = tune.with_resources(
            tune.with_parameters(pipeline_trial, base=base.to_dict(), out=str(out), metric=metric), TRIAL_RESOURCES)
        tuner = tune.Tuner(
            trainable,
            param_space={p.path: p.to_tune() for p in space.params},
            tune_config=tune.TuneConfig(metric=metric, mode=space.mode, num_samples=samples, scheduler=sched_obj,
                                        max_concurrent_trials=concurrent),
            run_config=tune.RunConfig(name="tune", storage_path=str(out / "ray_results"), callbacks=callbacks,
                                      verbose=1, failure_config=tune.FailureConfig(max_failures=0)),
        )
        grid = tuner.fit()
        results = collect_results(grid, space, out)
        _tag_failed_children(tracker, results)
        summary = write_reports(out, results, space, base, tracking_enabled=cfg.tracking.enabled, log=log)
        summary["wall_s"] = round(time.time() - t0, 1)
        summary["mlflow"] = {"uri": tracker.uri, "experiment": tracker.experiment,
                             "parent_run_id": tracker.parent_run_id} if tracking else None
        atomic_write_json(out / "summary.json", summary)
        if summary["best"]:
            tracker.log_metrics({f"best_{metric}": summary["best"]["objective"], "trials": len(results),
                                 "trials_completed": summary["completed"], "trials_stopped": summary["stopped"],
                                 "trials_failed": summary["errors"], "wall_s": summary["wall_s"]})
        for f in ("results.csv", "objective_vs_params.png", "best_config.yaml", "summary.json"):
            tracker.log_artifact(out / f)
        tracker.log_artifact(Path(space_path))
        log(f"[tune] {len(results)} trials in {summary['wall_s']:.0f}s: {summary['completed']} completed, "
            f"{summary['stopped']} stopped early, {summary['errors']} failed; results in {out}")
        if summary["best"] is None:
            first = next((r.error for r in results if r.error), None)
            error = f"no trial produced the objective '{metric}'" + (f"; first error: {first}" if first else "")
            raise RuntimeError(error)
        status = "FINISHED"
        return summary
    except BaseException as e:
        error = error or f"{type(e).__name__}: {e}"
        raise
    finally:
        if tracking and tracker.parent_run_id:
            if error:
                tracker._guard("set tags", tracker.client.set_tag, tracker.parent_run_id, "error", error[:4000])
            tracker.end(status=status)
        if started_ray:
            ray.shutdown()


def _tag_failed_children(tracker, results: list[TrialResult]) -> None:
    """Tag each trial's child run with its run directory, and failed ones with the ``error``."""
    if not tracker.enabled or not tracker.parent_run_id or not results:
        return

    def _tag():
        exp_id = tracker.client.get_run(tracker.parent_run_id).info.experiment_id
        runs = tracker.client.search_runs([exp_id], filter_string=f"tags.mlflow.parentRunId = '{tracker.parent_run_id}'",
                                          max_results=10000)
        for run in runs:
            name = run.data.tags.get("trial_name", "")  # "<trainable>_<trial_id>"
            r = next((r for r in results if name.endswith(r.trial_id)), None)
            if r is None:
                continue
            tracker.client.set_tag(run.info.run_id, "dass_ray.trial_dir", r.run_dir or "")
            tracker.client.set_tag(run.info.run_id, "dass_ray.trial_status", r.status)
            if r.error:
                tracker.client.set_tag(run.info.run_id, "error", r.error[:4000])

    tracker._guard("tag trial runs", _tag)
