"""The MLflow layer: sqlite in the run dir by default, a real server by URI, outages do not stop runs."""
import socket
import time
from pathlib import Path

import pytest

from dass_ray.config import ExperimentConfig, from_dict
from dass_ray.tracking import Tracker, resolve_tracking_uri

from _mlflow_server import MlflowServer


def _cfg(**tracking) -> ExperimentConfig:
    return from_dict(ExperimentConfig, {"name": "track_test", "tracking": tracking})


def test_default_uri_is_sqlite_in_run_dir(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert resolve_tracking_uri(_cfg(), tmp_path) == f"sqlite:///{tmp_path.resolve() / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://127.0.0.1:9")
    assert resolve_tracking_uri(_cfg(), tmp_path) == "http://127.0.0.1:9"
    assert resolve_tracking_uri(_cfg(uri="http://x:1"), tmp_path) == "http://x:1"


def _exercise(tracker: Tracker, tmp_path: Path) -> None:
    rid = tracker.start("parent")
    assert rid
    with tracker.stage("stage_a", {"k": 1}) as child:
        tracker.log_metrics({"loss": 0.5, "nan": float("nan")}, step=3, run_id=child)
    art = tmp_path / "table.csv"
    art.write_text("class,iou\nbg,90\n")
    tracker.log_artifact(art, "pictures")
    tracker.log_metrics({"target_miou": 42.0})
    tracker.end()


def _check(uri: str, experiment: str) -> None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=uri)
    exp = client.get_experiment_by_name(experiment)
    runs = client.search_runs([exp.experiment_id])
    by_name = {r.info.run_name: r for r in runs}
    assert set(by_name) == {"parent", "stage_a"}
    parent, child = by_name["parent"], by_name["stage_a"]
    assert parent.info.status == "FINISHED" and child.info.status == "FINISHED"
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.data.params["ptl.N"] == "600" and parent.data.metrics["target_miou"] == 42.0
    assert child.data.metrics["loss"] == 0.5 and "nan" not in child.data.metrics
    assert [a.path for a in client.list_artifacts(parent.info.run_id, "pictures")] == ["pictures/table.csv"]


def test_sqlite_store_records_parent_child_params_metrics_artifacts(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    cfg = _cfg()
    tr = Tracker(cfg, tmp_path)
    _exercise(tr, tmp_path)
    assert tr.errors == []
    _check(tr.uri, "track_test")
    assert (tmp_path / "mlartifacts").is_dir()  # artifacts beside the store, not in ./mlruns


def test_stage_marks_failed_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    tr = Tracker(_cfg(), tmp_path)
    tr.start("parent")
    with pytest.raises(RuntimeError):
        with tr.stage("boom"):
            raise RuntimeError("x")
    from mlflow.tracking import MlflowClient

    runs = MlflowClient(tracking_uri=tr.uri).search_runs(
        [MlflowClient(tracking_uri=tr.uri).get_experiment_by_name("track_test").experiment_id])
    assert {r.info.run_name: r.info.status for r in runs}["boom"] == "FAILED"


def test_unreachable_server_is_reported_not_raised(tmp_path, capsys):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tr = Tracker(_cfg(uri=f"http://127.0.0.1:{port}"), tmp_path)
    t0 = time.time()
    assert tr.start("parent") is None
    tr.log_metrics({"x": 1.0})
    tr.end()
    assert time.time() - t0 < 120
    assert tr.errors and f"127.0.0.1:{port}" in tr.errors[0]
    assert "tracking failed" in capsys.readouterr().err


def test_disabled_tracking_writes_nothing(tmp_path):
    tr = Tracker(_cfg(enabled=False), tmp_path)
    _ = tr.start("parent")
    tr.log_metrics({"x": 1.0})
    tr.end()
    assert not (tmp_path / "mlflow.db").exists() and tr.errors == []


@pytest.mark.slow
def test_real_mlflow_server_on_loopback(tmp_path):
    with MlflowServer(tmp_path / "server") as srv:
        tr = Tracker(_cfg(uri=srv.uri), tmp_path / "run")
        _exercise(tr, tmp_path)
        assert tr.errors == []
        _check(srv.uri, "track_test")
        assert not (tmp_path / "run" / "mlflow.db").exists()
