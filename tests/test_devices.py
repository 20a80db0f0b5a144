"""Device choice for Ray workers and actors: from the config and the GPUs Ray assigned."""
import pytest
import torch

from dass_ray.config import ConfigError, ExperimentConfig, from_dict
from dass_ray.ray_utils import cuda_index, pick_device


def test_cuda_index_follows_cuda_visible_devices_as_ray_train_does():
    assert cuda_index([], None) == 0
    assert cuda_index([], "3,5") == 0
    # Ray set the variable to the task's GPUs: torch numbers them from 0
    assert cuda_index(["2"], "2") == 0
    assert cuda_index([3, 5], "3,5") == 0
    # RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES: the node's list is kept, look the id up in it
    assert cuda_index([2], "0,1,2,3") == 2
    assert cuda_index(["6"], "4, 6") == 1
    # no variable at all: the assigned id is the torch index
    assert cuda_index([1], None) == 1
    assert cuda_index([1], "") == 1
    with pytest.raises(RuntimeError, match="does not list"):
        cuda_index([7], "0,1")


def test_pick_device_never_takes_a_gpu_the_task_was_not_given():
    assert pick_device("cpu", 1.0) == torch.device("cpu")
    assert pick_device("auto", 0.0) == torch.device("cpu")
    with pytest.raises(RuntimeError, match="given no GPU"):
        pick_device("cuda", 0.0)


def test_pick_device_uses_the_assigned_gpu(monkeypatch):
    import ray

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto", 1.0) == torch.device("cpu")  # a GPU was asked for, none is visible
    with pytest.raises(RuntimeError, match="no CUDA device is visible"):
        pick_device("cuda", 1.0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(ray, "is_initialized", lambda: True)
    monkeypatch.setattr(ray, "get_gpu_ids", lambda: [2])
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1,2,3")
    assert pick_device("auto", 1.0) == torch.device("cuda", 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2")
    assert pick_device("cuda", 0.5) == torch.device("cuda", 0)


@pytest.mark.parametrize("method", ["ptl", "zodi"])
def test_device_cuda_needs_gpus_for_the_workers_and_the_translating_actors(method):
    ok = {"device": "cuda", "gpus_per_worker": 1, "gpus_per_actor": 0.5}
    assert from_dict(ExperimentConfig, {"method": method, "ray": ok}).ray.device == "cuda"
    with pytest.raises(ConfigError, match="ray.gpus_per_actor"):
        from_dict(ExperimentConfig, {"method": method, "ray": {**ok, "gpus_per_actor": 0}})
    with pytest.raises(ConfigError, match="ray.gpus_per_worker"):
        from_dict(ExperimentConfig, {"method": method, "ray": {**ok, "gpus_per_worker": 0}})


def test_device_cuda_without_actors_needs_worker_gpus_only():
    cfg = from_dict(ExperimentConfig, {"method": "source_only", "ray": {"device": "cuda", "gpus_per_worker": 1}})
    assert cfg.ray.gpus_per_actor == 0
    with pytest.raises(ConfigError, match="ray.gpus_per_worker"):
        from_dict(ExperimentConfig, {"method": "oracle", "ray": {"device": "cuda", "gpus_per_actor": 1}})
