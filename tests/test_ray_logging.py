"""The worker hook that quiets Ray Train's once-a-second State API warnings (no Ray started)."""
import importlib
import importlib.util
import logging

from dass_ray import ray_logging, ray_utils
from dass_ray.config import RayConfig


def test_noisy_loggers_are_real_ray_modules_and_get_quieted():
    # a Ray upgrade that moves the module would leave the hook silencing nothing: fail then
    for name in ray_logging.NOISY_LOGGERS:
        assert importlib.util.find_spec(name) is not None, name
    before = {n: logging.getLogger(n).level for n in ray_logging.NOISY_LOGGERS}
    try:
        ray_logging.quiet_worker_logs()
        for name in ray_logging.NOISY_LOGGERS:
            log = logging.getLogger(name)
            assert not log.isEnabledFor(logging.WARNING) and log.isEnabledFor(logging.ERROR)
    finally:
        for n, lvl in before.items():
            logging.getLogger(n).setLevel(lvl)


def test_the_print_patch_switch_is_rays_and_is_turned_off(monkeypatch):
    from ray.train.v2._internal import constants

    assert constants.ENABLE_PRINT_PATCH_ENV_VAR == ray_logging.PRINT_PATCH_ENV
    monkeypatch.delenv(ray_logging.PRINT_PATCH_ENV, raising=False)
    ray_logging.quiet_worker_logs()
    import os

    assert os.environ[ray_logging.PRINT_PATCH_ENV] == "0"
    monkeypatch.setenv(ray_logging.PRINT_PATCH_ENV, "1")  # a user's own choice wins
    ray_logging.quiet_worker_logs()
    assert os.environ[ray_logging.PRINT_PATCH_ENV] == "1"


def test_ensure_ray_installs_the_hook_locally_and_on_a_cluster(monkeypatch):
    import ray

    calls = []
    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kw: calls.append(kw))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    ray_utils.ensure_ray(RayConfig())
    ray_utils.ensure_ray(RayConfig(address="127.0.0.1:6379"))
    assert len(calls) == 2
    for kw in calls:
        hook = kw["runtime_env"]["worker_process_setup_hook"]
        module, _, fn = hook.rpartition(".")
        assert getattr(importlib.import_module(module), fn) is ray_logging.quiet_worker_logs
    assert calls[1]["address"] == "127.0.0.1:6379"
