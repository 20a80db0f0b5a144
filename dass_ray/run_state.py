"""The run directory: resolved config, stage records, resume.

Layout of ``DIR``::

    config.resolved.yaml   the validated config of this run
    state.json             finished stages and levels (written atomically)
    metrics.json           final metrics (at the end)
    mlflow.db              default tracking store
    ddpm/ source/ ptl/     stage outputs and checkpoints

Re-running with an existing DIR resumes: finished stages are skipped. A DIR
made by a different config (its hash differs) is refused, naming both hashes,
so outputs of one config are never mixed into another's run.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Optional

import yaml

from .checkpoints import atomic_write_json, atomic_write_text
from .config import ConfigError, ExperimentConfig


class RunDir:
    def __init__(self, path: str | os.PathLike, cfg: ExperimentConfig):
        self.path = Path(path).resolve()  # Ray workers do not share the driver's working directory
        self.cfg = cfg
        self.config_hash = cfg.hash()
        self.marked: list[str] = []  # stages marked done through this object: the work of this invocation
        self.path.mkdir(parents=True, exist_ok=True)
        resolved = self.path / "config.resolved.yaml"
        if resolved.exists():
            with open(resolved) as f:
                old = yaml.safe_load(f) or {}
            old_hash = (self.state.get("config_hash")) or None
            if old_hash and old_hash != self.config_hash:
                raise ConfigError(
                    f"run directory {str(self.path)!r} was made by another config (hash {old_hash}, this one "
                    f"{self.config_hash}); its outputs cannot be resumed with this config. Use another --out. "
                    f"Differences are in config.resolved.yaml: {sorted(_diff(old, cfg.to_dict()))[:10]}"
                )
        # temporary files of atomic writes a killed run left behind (never under a final name)
        self.stale_tmp_removed = [str(p) for p in self.path.rglob(".*.tmp")
                                  if p.is_file() and "ray_train" not in p.relative_to(self.path).parts]
        for p in self.stale_tmp_removed:
            Path(p).unlink(missing_ok=True)
        atomic_write_text(resolved, cfg.to_yaml())
        st = self.state
        if "config_hash" not in st:
            st["config_hash"] = self.config_hash
            st.setdefault("created", time.time())
            self._write_state(st)

    # ------------------------------------------------------------------ state
    @property
    def state(self) -> dict[str, Any]:
        p = self.path / "state.json"
        if not p.exists():
            return {}
        with open(p) as f:
            return json.load(f)

    def _write_state(self, st: dict) -> None:
        atomic_write_json(self.path / "state.json", st)

    def is_done(self, stage: str) -> bool:
        return stage in self.state.get("done", {})

    def record(self, stage: str) -> Optional[dict]:
        return self.state.get("done", {}).get(stage)

    def mark_done(self, stage: str, info: Optional[dict] = None) -> None:
        st = self.state
        st.setdefault("done", {})[stage] = {"time": time.time(), **(info or {})}
        # how many times each stage actually ran (resume tests count these)
        st.setdefault("runs", {})[stage] = st.get("runs", {}).get(stage, 0) + 1
        self._write_state(st)
        self.marked.append(stage)

    def set(self, key: str, value: Any) -> None:
        st = self.state
        st[key] = value
        self._write_state(st)

    def sub(self, *parts: str) -> Path:
        p = self.path.joinpath(*parts)
        p.mkdir(parents=True, exist_ok=True)
        return p


def _diff(a: dict, b: dict, prefix: str = "") -> set[str]:
    out: set[str] = set()
    for k in set(a) | set(b):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out |= _diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.add(f"{prefix}{k}")
    return out


def default_run_dir(cfg: ExperimentConfig) -> Path:
    return Path("runs") / cfg.name / time.strftime("%Y%m%d-%H%M%S")
