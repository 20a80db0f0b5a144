"""A small MLflow layer (DESIGN.md section 6).

Default: a sqlite store inside the run directory (``sqlite:///<run_dir>/mlflow.db``),
no server needed. ``TrackingConfig.uri`` or ``MLFLOW_TRACKING_URI`` selects a
server. One experiment per config name; one parent run per pipeline run; child
runs per stage.

Tracking must never cost the user a run: when the tracking backend fails
(server down mid-run), the failure is reported once on stderr and recorded in
``tracker.errors``; the pipeline carries on and its own records
(checkpoints, ``metrics.json``) stay the source of truth.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional

from .config import ExperimentConfig


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def resolve_tracking_uri(cfg: ExperimentConfig, run_dir: str | os.PathLike) -> str:
    """Config ``tracking.uri``, else ``MLFLOW_TRACKING_URI``, else sqlite in the run dir."""
    if cfg.tracking.uri:
        return cfg.tracking.uri
    env = os.environ.get("MLFLOW_TRACKING_URI")
    if env:
        return env
    return f"sqlite:///{Path(run_dir).resolve() / 'mlflow.db'}"


def _quiet_env() -> None:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "dass-ray-mpl"))
    # A dead server must not hang the pipeline: few, short retries.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


class Tracker:
    """Logs params, metrics and artifacts of one pipeline run to MLflow.

    Every call is guarded: an MLflow failure is recorded and reported, never
    raised, so an outage of the tracking server does not stop the pipeline.
    ``enabled=False`` makes every call a no-op.
    """

    def __init__(self, cfg: ExperimentConfig, run_dir: str | os.PathLike, enabled: Optional[bool] = None):
        _quiet_env()
        self.enabled = cfg.tracking.enabled if enabled is None else enabled
        self.run_dir = Path(run_dir)
        self.uri = resolve_tracking_uri(cfg, run_dir)
        self.experiment = cfg.tracking.experiment or cfg.name
        self.errors: list[str] = []
        self._client = None
        self.parent_run_id: Optional[str] = None
        self._cfg = cfg

    # ------------------------------------------------------------------ guarded calls
    def _guard(self, what: str, fn, *args, **kwargs):
        if not self.enabled:
            return None
        try:
            return fn(*args, **kwargs)
        except Exception as e:  # any backend failure: record, report once per kind, go on
            msg = f"MLflow tracking failed ({what}) at {self.uri}: {type(e).__name__}: {str(e)[:200]}"
            if not self.errors:
                print(f"[dass-ray] WARNING: {msg}. The run continues; its checkpoints and metrics.json "
                      f"in {self.run_dir} are complete.", file=sys.stderr)
            self.errors.append(msg)
            return None

    @property
    def client(self):
        if self._client is None:
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self) -> str:
        exp = self.client.get_experiment_by_name(self.experiment)
        if exp is not None:
            return exp.experiment_id
        location = None
        if self.uri.startswith("sqlite:"):
            # with a local store, artifacts go next to it (not into ./mlruns of the working directory)
            location = (self.run_dir.resolve() / "mlartifacts").as_uri()
        return self.client.create_experiment(self.experiment, artifact_location=location)

    # ------------------------------------------------------------------ runs
    def start(self, run_name: str, resume_run_id: Optional[str] = None) -> Optional[str]:
        """Start (or reopen, on resume) the parent run; log the resolved config as params."""

        def _start():
            if resume_run_id:
                try:
                    self.client.update_run(resume_run_id, status="RUNNING")
                    self.parent_run_id = resume_run_id
                    return resume_run_id
                except Exception:
                    pass
            exp_id = self._experiment_id()
            run = self.client.create_run(exp_id, run_name=run_name, tags={"dass_ray.method": self._cfg.method})
            self.parent_run_id = run.info.run_id
            self.log_params(self._cfg.to_dict())
            return self.parent_run_id

        return self._guard("start run", _start)

    def child(self, name: str, params: Optional[dict] = None) -> Optional[str]:
        """Create a child run of the parent (a stage); returns its run id."""

        def _child():
            if self.parent_run_id is None:
                return None
            exp_id = self.client.get_run(self.parent_run_id).info.experiment_id
            run = self.client.create_run(exp_id, run_name=name, tags={"mlflow.parentRunId": self.parent_run_id})
            rid = run.info.run_id
            if params:
                self.log_params(params, run_id=rid)
            return rid

        return self._guard(f"create child run {name}", _child)

    def end(self, run_id: Optional[str] = None, status: str = "FINISHED") -> None:
        rid = run_id or self.parent_run_id
        if rid:
            self._guard("end run", self.client.set_terminated, rid, status)

    # ------------------------------------------------------------------ records
    def log_params(self, params: dict, run_id: Optional[str] = None) -> None:
        rid = run_id or self.parent_run_id
        if not rid:
            return
        from mlflow.entities import Param

        flat = _flatten(params)
        items = [Param(k, str(v)[:6000]) for k, v in flat.items()]

        def _log():
            for i in range(0, len(items), 100):
                self.client.log_batch(rid, params=items[i : i + 100])

        self._guard("log params", _log)

    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None, run_id: Optional[str] = None) -> None:
        rid = run_id or self.parent_run_id
        if not rid:
            return
        from mlflow.entities import Metric
        import time

        now = int(time.time() * 1000)
        items = [
            Metric(k, float(v), now, int(step or 0))
            for k, v in metrics.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(float(v))
        ]
        if items:
            self._guard("log metrics", self.client.log_batch, rid, metrics=items)

    def log_artifact(self, path: str | os.PathLike, artifact_path: Optional[str] = None, run_id: Optional[str] = None) -> None:
        rid = run_id or self.parent_run_id
        if rid and Path(path).exists():
            self._guard(f"log artifact {path}", self.client.log_artifact, rid, str(path), artifact_path)

    @contextlib.contextmanager
    def stage(self, name: str, params: Optional[dict] = None) -> Iterator[Optional[str]]:
        """A child run that ends FINISHED, or FAILED when the stage raises."""
        rid = self.child(name, params)
        try:
            yield rid
        except BaseException:
            self.end(rid, "FAILED")
            raise
        self.end(rid, "FINISHED")
