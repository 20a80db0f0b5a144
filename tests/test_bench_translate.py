"""benchmarks/bench_translate.py: the CPU accounting by role (no Ray, no models)."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _bench import ROOT, load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("bench_translate")


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_sampler_counts_a_process_that_exits_before_the_end(bench):
    # a child burns ~0.6 s of CPU and exits well before the block ends: a snapshot at the end
    # alone would not see it (the early-released Ray Data actor of a 2-actor run)
    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.6: pass\n"
    with bench.CpuSampler(period=0.1) as cpu:
        t0 = time.time()
        child = subprocess.Popen([sys.executable, "-c", burn])
        child.wait()
        time.sleep(0.5)
        seconds = time.time() - t0
    assert child.pid not in bench.process_cpu()  # gone at the end ...
    assert child.pid in cpu.after  # ... but sampled while it ran
    roles = bench.cpu_cores_by_role(cpu.before, cpu.after, seconds, {child.pid})
    # its CPU up to the last sample (<= 0.1 s before it exited), start-up included
    assert roles["actors"] * seconds >= 0.4
    assert set(roles) == {"actors", "driver", "ray_other", "other"}


@pytest.mark.slow
def test_quick_benchmark_runs_end_to_end(tmp_path):
    # the whole --quick run in its own process (its own local Ray, started in a background
    # thread: a thread that ended after ray.init took the raylet with it, PR_SET_PDEATHSIG)
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_translate.py"), "--quick",
                           "--out", str(out)], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(out.read_text())
    assert r["quick"] is True
    for key, value in [("guided_over_unguided", r["guided_over_unguided"]["digits_labels"]["guided_over_unguided"]),
                       ("batched_lcg_speedup", r["batched_lcg_speedup"]["speedup"]),
                       ("actors2_over_actors1", r["actors2_over_actors1"]["vs_1actor_1thread"]["overall_images_per_s"]),
                       ("pool_over_loop", r["pool_over_loop"]["after_startup"])]:
        assert value is not None and 0 < value < 100, (key, value)
    rp = r["ray_data"]
    assert rp["ray_init_in_background_s"] > 0
    for run in ("actors1_threads1", "actors2_threads1"):  # every input id exactly once
        assert rp[run]["images"] == rp[run]["unique_ids"] == rp["images"]
    assert rp["actors2_threads1"]["actors_seen"] == 2
    bl = r["batched_lcg_speedup"]
    assert bl["max_abs_grad_difference"] < 1e-4
    # the sweep covers 5, 8 and 11 classes present, each batched path equal to the naive loop
    assert [row["classes_present_per_image"] for row in bl["by_classes_present"]] == [5.0, 8.0, 11.0]
    assert all(row["max_abs_grad_difference"] < 1e-4 and row["speedup"] > 0 for row in bl["by_classes_present"])
    assert bl["by_classes_present"][-1]["copy_ratio"] == 1.0  # every class present: no excess copies
