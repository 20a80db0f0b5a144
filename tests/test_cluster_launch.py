"""Cluster launch: a real ``ray start --head`` on loopback, ``ray job submit -- dass-ray run ...`` (slow).

The test does not call ``ray.init``: the session ``ray_local`` fixture may be up in the
same pytest process, and this cluster is a separate one (its own ports, its own temp
dir, so no ``ray.init()`` elsewhere finds it). It is stopped by the PIDs it started:
``ray start --block`` is sent SIGTERM (it then stops the processes it launched) and any
descendant still alive afterwards is killed by PID. ``ray stop`` is not used: it kills
every Ray process on the machine by name, including other clusters.
"""
import json
import re
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).with_name("ray")) if Path(sys.executable).with_name("ray").exists() else "ray"


def _free_ports(n: int) -> list[int]:
    socks, ports = [], []
    for _ in range(n):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        socks.append(s)
        ports.append(s.getsockname()[1])
    for s in socks:
        s.close()
    return ports


def _descendants(pid: int) -> list[int]:
    """PIDs of every process below ``pid`` (from /proc)."""
    children: dict[int, list[int]] = {}
    for p in Path("/proc").iterdir():
        if not p.name.isdigit():
            continue
        try:
            stat = (p / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        children.setdefault(ppid, []).append(int(p.name))
    out, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            out.append(c)
            todo.append(c)
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat")
    try:
        return stat.read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_head(proc: subprocess.Popen, grace: float = 30.0) -> None:
    """SIGTERM to ``ray start --block`` (it stops what it started); SIGKILL by PID to what is left."""
    tree = _descendants(proc.pid)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)
    tree += [p for p in _descendants(proc.pid) if p not in tree]
    deadline = time.time() + 10
    while time.time() < deadline and any(_alive(p) for p in tree):
        time.sleep(0.5)
    for p in tree:
        if _alive(p):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _wait_http(url: str, proc: subprocess.Popen, timeout: float) -> None:
    t0 = time.time()
    while time.time() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=3) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(1.0)
    raise TimeoutError(f"{url} not up after {timeout:.0f}s")


def _job_status(address: str, job_id: str, env: dict) -> str:
    """``ray job status``: "Job 'x' succeeded" / "failed" / "was stopped" / "Status for job 'x': RUNNING"."""
    r = subprocess.run([RAY, "job", "status", job_id, "--address", address, "--log-style", "record"],
                       capture_output=True, text=True, env=env, timeout=120)
    text = r.stdout + r.stderr
    if f"Job '{job_id}' succeeded" in text:
        return "SUCCEEDED"
    if f"Job '{job_id}' failed" in text:
        return "FAILED"
    if f"Job '{job_id}' was stopped" in text:
        return "STOPPED"
    m = re.search(rf"Status for job '{re.escape(job_id)}': (\w+)", text)
    return m.group(1) if m else "UNKNOWN: " + text[-500:]


@pytest.mark.slow
def test_ray_job_submit_runs_the_pipeline(tmp_path):
    gcs, dash, client, agent, agent_grpc, rt_env, metrics, nm, om = _free_ports(9)
    temp_dir = tempfile.mkdtemp(prefix="rj", dir="/tmp")  # short: Ray's socket paths must stay < 108 chars
    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS",)}
    env.update(RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", MLFLOW_DISABLE_TELEMETRY="true")
    head_log = open(tmp_path / "ray_head.log", "w")
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", "--node-ip-address=127.0.0.1", "--dashboard-host=127.0.0.1",
         f"--port={gcs}", f"--dashboard-port={dash}", f"--ray-client-server-port={client}",
         f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
         f"--runtime-env-agent-port={rt_env}", f"--metrics-export-port={metrics}", f"--node-manager-port={nm}",
         f"--object-manager-port={om}", "--num-cpus=2", f"--object-store-memory={256 * 1024 * 1024}",
         "--include-dashboard=true", f"--temp-dir={temp_dir}", "--disable-usage-stats"],
        stdout=head_log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    job_id = f"dass-ray-test-{uuid.uuid4().hex[:8]}"
    run_dir = tmp_path / "run"
    try:
        _wait_http(f"{address}/api/version", head, timeout=120)
        # gitignore syntax: a leading "/" anchors to the working dir; an unanchored "data" would
        # also drop the package's own dass_ray/data/ from the upload
        runtime_env = {"excludes": ["/.git", "/runs", "/data", "/mlruns", ".pytest_cache", "**/__pycache__",
                                    "*.egg-info", "/.benchmarks", "/bench_out"]}
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--submission-id", job_id, "--no-wait",
             "--working-dir", str(ROOT), "--runtime-env-json", json.dumps(runtime_env), "--log-style", "record",
             "--", "dass-ray", "run", "experiments/digits_smoke.yaml", "--out", str(run_dir),
             "--set", f"data.root={tmp_path / 'digits'}"],
            capture_output=True, text=True, env=env, timeout=180)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        status, t0 = "PENDING", time.time()
        while time.time() - t0 < 360:
            status = _job_status(address, job_id, env)
            if status in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(5)
        if status != "SUCCEEDED":
            logs = subprocess.run([RAY, "job", "logs", job_id, "--address", address], capture_output=True,
                                  text=True, env=env, timeout=120)
            if status not in ("FAILED", "STOPPED"):
                subprocess.run([RAY, "job", "stop", job_id, "--address", address], capture_output=True,
                               env=env, timeout=120)
            pytest.fail(f"job {job_id} ended {status} after {time.time() - t0:.0f}s:\n{logs.stdout[-4000:]}")

        metrics = json.loads((run_dir / "metrics.json").read_text())
        assert metrics["method"] == "ptl" and metrics["target_miou"] is not None
        db = run_dir / "mlflow.db"
        assert db.exists()
        with sqlite3.connect(db) as con:
            rows = con.execute("select name, status from runs").fetchall()
        assert rows and all(status == "FINISHED" for _, status in rows), rows
    finally:
        _stop_head(head)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)
