"""``dass-ray tune``: trial configs, the CPU rule, level reports, results/plot/best config; a real sweep (slow)."""
import csv
import json
from pathlib import Path

import pytest
import yaml

from dass_ray.config import ConfigError, ExperimentConfig, from_dict, load_config
from dass_ray.tune_runner import (
    LevelPoller,
    TrialResult,
    absolute_paths,
    best_trial_config,
    check_combinations,
    ddpm_shared,
    final_report,
    max_reports,
    pick_best,
    prepare_base,
    scale_cpus,
    trial_config,
    trial_cpu_demand,
    write_reports,
    _error_text,
)
from dass_ray.tune_space import load_space, parse_space

from _mlflow_server import MlflowServer

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "digits_smoke.yaml"
PTL_DIGITS = ROOT / "tune_spaces" / "ptl_digits.yaml"
PTL_SMOKE = ROOT / "tune_spaces" / "ptl_smoke.yaml"


@pytest.fixture
def smoke():
    return load_config(SMOKE)


# --------------------------------------------------------------------------- trial configs

def test_trial_config_applies_all_params_at_once(smoke):
    # stride 30 alone would be refused on the base (N = 20): applied together with N = 60 it is valid
    cfg = trial_config(smoke, {"ptl.stride": 30, "ptl.N": 60, "guidance.arrangement": "random",
                               "guidance.scale": 123.5, "segmenter.similarity_weight": 0.1})
    assert (cfg.ptl.N, cfg.ptl.stride) == (60, 30)
    assert cfg.guidance.arrangement == "random" and cfg.guidance.scale == 123.5
    assert cfg.segmenter.similarity_weight == 0.1
    assert cfg.ptl.levels() == [30, 60]
    # the base is untouched, everything else carried over
    assert smoke.ptl.N == 20 and cfg.diffusion == smoke.diffusion and cfg.data == smoke.data


def test_trial_config_invalid_combination_names_the_params(smoke):
    with pytest.raises(ConfigError) as e:
        trial_config(smoke, {"ptl.N": 10, "ptl.stride": 20})
    msg = str(e.value)
    assert "invalid combination" in msg and "ptl.N=10" in msg and "ptl.stride=20" in msg
    assert "'ptl.stride'" in msg and "allowed" in msg
    with pytest.raises(ConfigError, match="ptl.N"):
        trial_config(smoke, {"ptl.N": 5000})  # > diffusion.num_train_timesteps
    with pytest.raises(ConfigError, match="ptl.bogus"):
        trial_config(smoke, {"ptl.bogus": 1})
    with pytest.raises(ConfigError, match="nosection"):
        trial_config(smoke, {"nosection.x": 1})


def test_grid_param_tries_every_value_per_sample(smoke):
    from ray import tune

    from dass_ray.tune_runner import effective_concurrency

    space = parse_space({"samples": 2, "max_concurrent": 8, "params": {
        "ptl.stride": {"grid": [5, 10]}, "ptl.epochs_per_level": {"grid": [1, 2, 4]},
        "guidance.scale": {"loguniform": [1.0, 10.0]}}})
    assert space.trials() == 12 and space.trials(1) == 6  # samples x 2 x 3
    assert effective_concurrency(space, 1) == 6  # bounded by the trials, not by samples
    stride = next(p for p in space.params if p.path == "ptl.stride")
    assert stride.to_tune() == tune.grid_search([5, 10])
    assert check_combinations(smoke, space)[1] == 0
    with pytest.raises(ConfigError, match="distinct values"):
        parse_space({"params": {"ptl.stride": {"grid": [5, 5]}}})
    with pytest.raises(ConfigError, match="ptl.stride"):  # every grid value is checked against the config
        parse_space({"params": {"ptl.stride": {"grid": [5, 0]}}})


def test_check_combinations(smoke):
    ok, bad, _ = check_combinations(smoke, load_space(PTL_DIGITS))
    assert bad == 0 and ok > 0
    mixed = parse_space({"params": {"ptl.N": {"choice": [5, 20]}, "ptl.stride": {"choice": [10]}}})
    ok, bad, example = check_combinations(smoke, mixed)
    assert ok > 0 and bad > 0 and "ptl.stride" in example
    none_valid = parse_space({"params": {"ptl.N": {"choice": [5, 8]}, "ptl.stride": {"choice": [10]}}})
    with pytest.raises(ConfigError, match="none of .* sampled combinations is valid"):
        check_combinations(smoke, none_valid)


def test_smoke_space_has_the_digits_params_at_smoke_scale(smoke):
    digits, small = load_space(PTL_DIGITS), load_space(PTL_SMOKE)
    assert [p.path for p in small.params] == [p.path for p in digits.params]
    ok, bad, _ = check_combinations(smoke, small)
    assert bad == 0


def test_absolute_paths_and_prepare_base(smoke, tmp_path):
    cfg = absolute_paths(smoke, cwd=tmp_path)
    assert cfg.data.root == str((tmp_path / "data" / "digits").resolve())
    base, factor = prepare_base(smoke, tmp_path / "out", cluster_cpus=2, concurrent=2, cwd=tmp_path)
    assert base.tracking.enabled is False
    assert Path(base.data.root).is_absolute()
    # the smoke config keeps its DDPM in the run dir: the sweep shares one cache under out/
    assert base.diffusion.cache_dir == str((tmp_path / "out" / "ddpm_cache").resolve())
    assert factor == 0.5 and base.ray.cpus_per_worker == 0.5 and base.ray.cpus_per_actor == 0.5
    # an explicit cache dir is kept (made absolute)
    kept = from_dict(ExperimentConfig, {**smoke.to_dict(), "diffusion": {**smoke.to_dict()["diffusion"],
                                                                          "cache_dir": "cache/x"}})
    base2, _ = prepare_base(kept, tmp_path / "out", 2, 1, cwd=tmp_path)
    assert base2.diffusion.cache_dir == str((tmp_path / "cache" / "x").resolve())
    assert base2.ray == kept.ray


# --------------------------------------------------------------------------- the CPU rule

def test_cpu_scaling_rule(smoke):
    assert trial_cpu_demand(smoke) == 2.0
    cfg, f = scale_cpus(smoke, cluster_cpus=2, concurrent=2)
    assert f == 0.5 and (cfg.ray.cpus_per_worker, cfg.ray.cpus_per_actor) == (0.5, 0.5)
    cfg, f = scale_cpus(smoke, cluster_cpus=2, concurrent=1)
    assert f == 1.0 and cfg == smoke
    cfg, f = scale_cpus(smoke, cluster_cpus=8, concurrent=2)  # never scaled up
    assert f == 1.0 and cfg.ray == smoke.ray
    digits = load_config(ROOT / "experiments" / "digits_ptl.yaml")
    cfg, _ = scale_cpus(digits, 2, 2)
    assert cfg.ray.threads_per_worker == 1 and cfg.ray.threads_per_actor == 1
    with pytest.raises(ValueError):
        scale_cpus(smoke, 2, 0)


@pytest.mark.parametrize("cpus", [1, 2, 3, 4, 16])
@pytest.mark.parametrize("concurrent", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("workers,actors,cpw,cpa", [(1, 1, 1, 1), (2, 1, 1, 0.5), (1, 3, 2, 1), (4, 4, 1, 1)])
def test_scaled_trials_fit_the_cluster(smoke, cpus, concurrent, workers, actors, cpw, cpa):
    d = smoke.to_dict()
    d["ray"].update(num_workers=workers, num_actors=actors, cpus_per_worker=cpw, cpus_per_actor=cpa)
    cfg, f = scale_cpus(from_dict(ExperimentConfig, d), cpus, concurrent)
    assert concurrent * trial_cpu_demand(cfg) <= cpus + 1e-9 or f == 1.0
    assert trial_cpu_demand(cfg) <= max(cpus / concurrent, workers * cpw + actors * cpa) + 1e-9
    assert cfg.ray.cpus_per_worker > 0 and cfg.ray.cpus_per_actor > 0


def test_asha_horizon_and_shared_ddpm(smoke):
    assert max_reports(smoke, load_space(PTL_SMOKE)) == 20 // 5 + 1
    assert max_reports(smoke, load_space(PTL_DIGITS)) == 1000 // 250 + 1  # largest N over the smallest stride
    assert max_reports(smoke, parse_space({"params": {"guidance.scale": {"uniform": [1.0, 2.0]}}})) == 2 + 1
    assert ddpm_shared(load_space(PTL_DIGITS))
    assert not ddpm_shared(parse_space({"params": {"diffusion.lr": {"loguniform": [1e-4, 1e-3]}}}))
    assert not ddpm_shared(parse_space({"params": {"data.max_samples": {"choice": [64, 128]}}}))


# --------------------------------------------------------------------------- level reports

def _fake_level(run_dir: Path, n: int, rec: dict) -> None:
    d = run_dir / "ptl" / "levels" / f"{n:05d}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "segmenter.safetensors.sha256").write_text("x")
    (d / "record.json").write_text(json.dumps(rec))


def test_level_poller_reports_each_level_once(tmp_path):
    (tmp_path / "state.json").write_text(json.dumps({"done": {"eval_source": {"result": {"miou": 40.0}}}}))
    poller = LevelPoller(tmp_path)
    assert poller.poll() == []
    _fake_level(tmp_path, 5, {"level": 5, "loss": 1.5, "iters": 4, "seconds": 3.0})
    reps = poller.poll()
    assert reps == [{"level": 5, "ptl_loss": 1.5, "level_seconds": 3.0, "evaluated": 0, "target_miou": 40.0}]
    _fake_level(tmp_path, 10, {"level": 10, "loss": 1.0, "seconds": 2.0, "target_miou": 55.0, "per_class": {"0": 1}})
    _fake_level(tmp_path, 15, {"level": 15, "loss": 0.9, "seconds": 2.0})
    reps = poller.poll()
    assert [r["level"] for r in reps] == [10, 15]
    assert reps[0]["target_miou"] == 55.0 and reps[0]["evaluated"] == 1
    assert reps[1]["target_miou"] == 55.0 and reps[1]["evaluated"] == 0  # carried
    assert poller.poll() == []
    # a level without its published checkpoint is not finished yet
    d = tmp_path / "ptl" / "levels" / "00020"
    d.mkdir()
    (d / "record.json").write_text("{}")
    assert poller.poll() == []


def test_final_report(tmp_path, smoke):
    (tmp_path / "metrics.json").write_text(json.dumps({"name": "x", "target_miou": 61.5, "source_only_miou": 40,
                                                       "wall_s": 12.5, "per_class": {}, "levels": [], "ok": True}))
    rep = final_report(tmp_path, smoke)
    assert rep == {"target_miou": 61.5, "source_only_miou": 40.0, "wall_s": 12.5, "final": 1, "level": 20}


def test_error_text_finds_the_cause():
    err = RuntimeError("Traceback (most recent call last):\n  File x\n"
                       "dass_ray.config.ConfigError: invalid combination of tune params (ptl.N=10): ...\n")
    assert _error_text(err).startswith("dass_ray.config.ConfigError: invalid combination")


# --------------------------------------------------------------------------- reports

def _fake_results(run_root: Path) -> list[TrialResult]:
    mk = lambda tid, N, s, arr, scale, obj, status, err=None: TrialResult(  # noqa: E731
        trial_id=tid, params={"ptl.N": N, "ptl.stride": s, "guidance.scale": scale, "guidance.arrangement": arr,
                              "segmenter.similarity_weight": 0.0, "ptl.lr": 0.005},
        objective=obj, status=status, wall_s=30.0, reports=3, error=err, run_dir=str(run_root / tid))
    return [
        mk("a_00000", 20, 10, "alternate", 150.0, 52.0, "completed"),
        mk("a_00001", 10, 5, "random", 2500.0, 61.25, "completed"),
        mk("a_00002", 20, 5, "gsg_then_lcg", 800.0, 70.0, "stopped"),  # higher, but stopped early by ASHA
        mk("a_00003", 10, 10, "lcg_then_gsg", 9000.0, None, "error", "ConfigError: bad\ncombination"),
    ]


def test_reports_from_fake_results(tmp_path, smoke):
    space = load_space(PTL_SMOKE)
    base, _ = prepare_base(smoke, tmp_path, 2, 2)
    results = _fake_results(tmp_path / "trials")
    lines = []
    summary = write_reports(tmp_path, results, space, base, log=lines.append)
    assert (summary["trials"], summary["completed"], summary["stopped"], summary["errors"]) == (4, 2, 1, 1)
    assert summary["best"]["trial_id"] == "a_00001" and summary["best"]["objective"] == 61.25
    # results.csv: trial id, each searched param, objective, status, wall time
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0])[:8] == ["trial_id", *[p.path for p in space.params], "target_miou"]
    assert {"status", "wall_s", "error"} <= set(rows[0])
    assert [r["status"] for r in rows] == ["completed", "completed", "stopped", "error"]
    assert rows[1]["ptl.N"] == "10" and rows[1]["guidance.arrangement"] == "random"
    assert rows[3]["target_miou"] == "" and "ConfigError: bad combination" in rows[3]["error"]
    png = tmp_path / "objective_vs_params.png"
    assert png.exists() and png.stat().st_size > 5000 and png.read_bytes()[:4] == b"\x89PNG"
    # best_config.yaml: accepted by load_config, equal to the best trial's config (tracking back on)
    best = load_config(tmp_path / "best_config.yaml")
    expected = trial_config(base, results[1].params)
    assert best.tracking.enabled is True and expected.tracking.enabled is False
    best_d, exp_d = best.to_dict(), expected.to_dict()
    best_d["tracking"]["enabled"] = False
    assert best_d == exp_d
    assert best == best_trial_config(base, results[1])
    assert (best.ptl.N, best.ptl.stride, best.guidance.arrangement) == (10, 5, "random")
    assert any("best trial a_00001" in ln for ln in lines)
    assert json.loads((tmp_path / "summary.json").read_text())["best_config"].endswith("best_config.yaml")


def test_best_falls_back_to_stopped_and_none(tmp_path, smoke):
    results = _fake_results(tmp_path)
    only_stopped = [r for r in results if r.status != "completed"]
    assert pick_best(only_stopped, "max").trial_id == "a_00002"
    assert pick_best(results, "min").trial_id == "a_00000"
    failed = [results[3]]
    summary = write_reports(tmp_path / "x", failed, load_space(PTL_SMOKE), smoke, log=lambda s: None)
    assert summary["best"] is None and not (tmp_path / "x" / "best_config.yaml").exists()
    assert (tmp_path / "x" / "results.csv").exists() and (tmp_path / "x" / "objective_vs_params.png").exists()


def test_zodi_space_fits_a_zodi_config():
    zodi = load_config(ROOT / "experiments" / "zodi_cityscapes_to_acdc_night.yaml") \
        if (ROOT / "experiments" / "zodi_cityscapes_to_acdc_night.yaml").exists() else \
        from_dict(ExperimentConfig, {"method": "zodi"})
    space = load_space(ROOT / "tune_spaces" / "zodi.yaml")
    ok, bad, _ = check_combinations(zodi, space)
    assert bad == 0
    assert max_reports(zodi, space) == 1
    paper = load_space(ROOT / "tune_spaces" / "ptl_paper.yaml")
    ok, bad, _ = check_combinations(ExperimentConfig(), paper)
    assert bad == 0
    assert {p.path for p in paper.params} >= {"ptl.N", "guidance.scale", "guidance.arrangement", "ptl.stride",
                                              "segmenter.similarity_weight", "ptl.lr"}
    arrangement = next(p for p in paper.params if p.path == "guidance.arrangement")
    assert set(arrangement.values) == {"alternate", "lcg_then_gsg", "gsg_then_lcg", "random"}


# --------------------------------------------------------------------------- a real sweep (slow)

@pytest.fixture
def mlflow_server(tmp_path):
    """A real ``mlflow server`` on loopback (tests/_mlflow_server.py), stopped by PID."""
    with MlflowServer(tmp_path / "mlflow_server") as srv:
        yield srv.uri


@pytest.mark.slow
def test_two_trial_sweep_logs_to_an_mlflow_server(ray_local, mlflow_server, tmp_path, monkeypatch):
    from mlflow.tracking import MlflowClient

    from dass_ray.tune_runner import run_tune

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    # ptl_digits' params at smoke scale (ptl_smoke.yaml), one (N, stride) so each trial has 2 levels
    space = yaml.safe_load(PTL_SMOKE.read_text())
    space["params"]["ptl.N"] = {"choice": [20]}
    space["params"]["ptl.stride"] = {"choice": [10]}
    space_path = tmp_path / "space.yaml"
    space_path.write_text(yaml.safe_dump(space))
    cfg = load_config(SMOKE, [f"data.root={tmp_path / 'digits'}", f"diffusion.cache_dir={tmp_path / 'ddpm_cache'}"])
    out = tmp_path / "tune"
    summary = run_tune(cfg, space_path, out=out, samples=2)

    assert summary["trials"] == 2 and summary["errors"] == 0
    assert summary["completed"] >= 1 and summary["best"] is not None
    with open(out / "results.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 and all(r["status"] in ("completed", "stopped") for r in rows)
    assert (out / "objective_vs_params.png").exists()
    # the DDPM was trained once, in the driver; the trials reused it
    assert len(list((tmp_path / "ddpm_cache").glob("*/done.json"))) == 1
    best = load_config(out / "best_config.yaml")
    assert best.tracking.enabled and best.ptl.N == 20
    assert best.guidance.arrangement == summary["best"]["params"]["guidance.arrangement"]

    client = MlflowClient(tracking_uri=mlflow_server)
    assert summary["mlflow"]["uri"] == mlflow_server
    parent = client.get_run(summary["mlflow"]["parent_run_id"])
    assert parent.info.status == "FINISHED"
    assert parent.data.params["tune.metric"] == "target_miou"
    assert "best_target_miou" in parent.data.metrics
    arts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"results.csv", "objective_vs_params.png", "best_config.yaml"} <= arts
    children = client.search_runs([parent.info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    assert len(children) == 2
    for ch in children:
        assert ch.info.status == "FINISHED"
        assert {"ptl.N", "guidance.scale", "guidance.arrangement"} <= set(ch.data.params)
        assert "target_miou" in ch.data.metrics and "level" in ch.data.metrics
