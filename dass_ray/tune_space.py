"""Search spaces for ``dass-ray tune``: typed, validated YAML files in ``tune_spaces/``.

Format::

    objective: {metric: target_miou, mode: max}   # what the Tuner optimises
    samples: 4                                      # default number of trials
    scheduler: asha                                 # asha | fifo
    grace_levels: 1                                 # ASHA: levels before a trial may be stopped
    max_concurrent: 2                               # trials at once
    params:                                         # config path -> one distribution
      ptl.N: {choice: [600, 800, 1000]}
      guidance.scale: {loguniform: [100, 10000]}
      ptl.stride: {randint: [50, 201]}              # [low, high)
      ptl.lr: {uniform: [0.001, 0.01]}
      ptl.epochs_per_level: {grid: [20, 40]}        # every value: samples x 2 trials

``grid`` is Ray Tune's ``grid_search``: every value is tried, and the other
params are drawn ``samples`` times for each grid point, so a sweep runs
``samples x`` (product of the grid sizes) trials (:meth:`SearchSpace.trials`).
Every value a distribution can produce is checked against the experiment
config (type and range) when the file is loaded, so a bad space fails before
any trial starts.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from .config import ConfigError, ExperimentConfig, set_path

Kind = Literal["choice", "grid", "uniform", "loguniform", "randint"]


@dataclass
class Param:
    path: str
    kind: Kind
    values: list[Any]

    def to_tune(self):
        from ray import tune

        if self.kind == "choice":
            return tune.choice(self.values)
        if self.kind == "grid":
            return tune.grid_search(self.values)
        if self.kind == "uniform":
            return tune.uniform(*self.values)
        if self.kind == "loguniform":
            return tune.loguniform(*self.values)
        return tune.randint(*self.values)


@dataclass
class SearchSpace:
    params: list[Param]
    metric: str = "target_miou"
    mode: Literal["max", "min"] = "max"
    samples: int = 4
    scheduler: Literal["asha", "fifo"] = "asha"
    grace_levels: int = 1
    max_concurrent: int = 2
    source: Optional[str] = None

    def trials(self, samples: Optional[int] = None) -> int:
        """Trials a sweep runs: ``samples`` (default ``self.samples``) per point of the grid params."""
        n = self.samples if samples is None else samples
        for p in self.params:
            if p.kind == "grid":
                n *= len(p.values)
        return n

    def check_against(self, cfg: ExperimentConfig) -> None:
        """Every value the space can produce must be valid for ``cfg`` (raises ConfigError)."""
        for p in self.params:
            probes = p.values if p.kind in ("choice", "grid") else (
                [p.values[0], p.values[1] - 1] if p.kind == "randint" else list(p.values))
            for v in probes:
                try:
                    set_path(cfg, p.path, v)
                except ConfigError as e:
                    raise ConfigError(f"tune space {self.source or ''}: params.{p.path} value {v!r}: {e}") from None


_TOP = {"objective", "samples", "scheduler", "grace_levels", "max_concurrent", "params"}


def _err(src: str, key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"tune space {src}: key '{key}': got {value!r}; allowed: {allowed}")


def parse_space(data: dict, src: str = "<dict>") -> SearchSpace:
    if not isinstance(data, dict):
        raise ConfigError(f"tune space {src}: expected a mapping at top level")
    for k in data:
        if k not in _TOP:
            raise _err(src, k, data[k], "one of " + ", ".join(sorted(_TOP)))
    obj = data.get("objective", {}) or {}
    if not isinstance(obj, dict) or set(obj) - {"metric", "mode"}:
        raise _err(src, "objective", obj, "{metric: NAME, mode: max|min}")
    metric = obj.get("metric", "target_miou")
    mode = obj.get("mode", "max")
    if mode not in ("max", "min"):
        raise _err(src, "objective.mode", mode, "max or min")
    if not isinstance(metric, str) or not metric:
        raise _err(src, "objective.metric", metric, "a metric name, e.g. target_miou")
    samples = data.get("samples", 4)
    if not isinstance(samples, int) or isinstance(samples, bool) or samples < 1:
        raise _err(src, "samples", samples, "an integer >= 1")
    sched = data.get("scheduler", "asha")
    if sched not in ("asha", "fifo"):
        raise _err(src, "scheduler", sched, "asha or fifo")
    grace = data.get("grace_levels", 1)
    if not isinstance(grace, int) or grace < 1:
        raise _err(src, "grace_levels", grace, "an integer >= 1")
    conc = data.get("max_concurrent", 2)
    if not isinstance(conc, int) or conc < 1:
        raise _err(src, "max_concurrent", conc, "an integer >= 1")
    raw = data.get("params")
    if not isinstance(raw, dict) or not raw:
        raise _err(src, "params", raw, "a non-empty mapping of config paths to distributions")
    params = []
    for path, dist in raw.items():
        if not isinstance(dist, dict) or len(dist) != 1:
            raise _err(src, f"params.{path}", dist, "one of {choice: [...]}, {grid: [...]}, {uniform: [lo, hi]}, "
                                                     "{loguniform: [lo, hi]}, {randint: [lo, hi]}")
        (kind, vals), = dist.items()
        if kind not in ("choice", "grid", "uniform", "loguniform", "randint"):
            raise _err(src, f"params.{path}", kind, "choice, grid, uniform, loguniform or randint")
        if not isinstance(vals, list) or not vals:
            raise _err(src, f"params.{path}.{kind}", vals, "a non-empty list")
        if kind == "grid" and len(set(map(repr, vals))) != len(vals):
            raise _err(src, f"params.{path}.grid", vals, "distinct values (each is one grid point)")
        if kind not in ("choice", "grid"):
            if len(vals) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                         for v in vals) or not vals[0] < vals[1]:
                raise _err(src, f"params.{path}.{kind}", vals, "[low, high] finite numbers with low < high")
            if kind == "loguniform" and vals[0] <= 0:
                raise _err(src, f"params.{path}.{kind}", vals, "low > 0")
            if kind == "randint" and not all(isinstance(v, int) for v in vals):
                raise _err(src, f"params.{path}.{kind}", vals, "integers")
        params.append(Param(path, kind, list(vals)))
    space = SearchSpace(params=params, metric=metric, mode=mode, samples=samples, scheduler=sched,
                        grace_levels=grace, max_concurrent=conc, source=src)
    space.check_against(ExperimentConfig())
    return space


def load_space(path: str | Path) -> SearchSpace:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"tune space {str(p)!r} does not exist")
    with open(p) as f:
        data = yaml.safe_load(f)
    return parse_space(data, str(p))
