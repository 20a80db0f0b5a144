"""Shared fixtures: one local Ray for the Ray tests, quiet MLflow/matplotlib."""
import os
import tempfile

import pytest
import torch

# Tiny models: one thread is fastest and keeps the 2-core machine responsive for Ray's workers.
torch.set_num_threads(1)

os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MPLCONFIGDIR", os.path.join(tempfile.gettempdir(), "dass-ray-mpl"))


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """One shared ``ray.init(num_cpus=2)`` for all Ray tests (about 5 s), capped object store."""
    import ray
    from ray.data import DataContext

    ray.init(num_cpus=2, object_store_memory=256 * 1024 * 1024, include_dashboard=False,
             ignore_reinit_error=True, _node_ip_address="127.0.0.1")
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def digits_root(tmp_path_factory):
    """The built-in ``digits`` benchmark, built from the package's data into a temporary root."""
    from dass_ray.data.digits import build_digits

    root = tmp_path_factory.mktemp("digits") / "digits"
    build_digits(root, seed=0)
    return root
