"""benchmarks/bench_translate.py: the CPU accounting by role (no Ray, no models)."""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from _bench import load_benchmark


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
