"""dass-ray run: CLI contract, run directory, resume, and the smoke pipeline end to end."""
import json
import os
import sqlite3
from pathlib import Path

import pytest

from dass_ray.cli import build_parser, main
from dass_ray.config import ConfigError, ExperimentConfig, load_config, set_path
from dass_ray.run_state import RunDir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "experiments" / "digits_smoke.yaml"


@pytest.mark.parametrize("cmd", [[], ["data"], ["data", "digits"], ["data", "convert"], ["run"], ["train-ddpm"],
                                 ["translate"], ["eval"], ["tune"], ["validate"]])
def test_help_for_every_subcommand(cmd, capsys):
    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(cmd + ["--help"])
    assert e.value.code == 0
    assert "usage: dass-ray" in capsys.readouterr().out


def test_bad_config_value_fails_before_any_work(tmp_path, capsys):
    rc = main(["run", str(SMOKE), "--out", str(tmp_path / "run"), "--set", "ptl.N=-3"])
    assert rc == 2
    err = capsys.readouterr().err
    assert "ptl.N" in err and "-3" in err and "allowed" in err
    assert not (tmp_path / "run").exists()


def test_validate_command(capsys):
    files = [str(p) for p in sorted((ROOT / "experiments").glob("*.yaml"))] + \
            [str(p) for p in sorted((ROOT / "tune_spaces").glob("*.yaml"))]
    assert main(["validate", *files]) == 0
    assert capsys.readouterr().out.count("ok ") == len(files)


def test_run_dir_refuses_another_config(tmp_path):
    cfg = ExperimentConfig(name="a")
    RunDir(tmp_path / "r", cfg)
    assert (tmp_path / "r" / "config.resolved.yaml").exists()
    RunDir(tmp_path / "r", cfg)  # same config: resumes
    other = set_path(cfg, "guidance.scale", 5.0)
    with pytest.raises(ConfigError) as e:
        RunDir(tmp_path / "r", other)
    assert cfg.hash() in str(e.value) and other.hash() in str(e.value) and "guidance.scale" in str(e.value)


def test_run_dir_counts_stage_runs(tmp_path):
    rd = RunDir(tmp_path / "r", ExperimentConfig())
    assert not rd.is_done("source")
    rd.mark_done("source", {"x": 1})
    assert rd.is_done("source") and rd.record("source")["x"] == 1
    assert rd.state["runs"]["source"] == 1


def _mlflow_runs(db: Path) -> list[tuple]:
    con = sqlite3.connect(db)
    try:
        return con.execute("select run_uuid, name, status from runs").fetchall()
    finally:
        con.close()


@pytest.mark.slow
def test_smoke_pipeline_end_to_end_and_resume(ray_local, digits_root, tmp_path):
    out = tmp_path / "run"
    # threads_per_worker 2: the DDPM / source stages and each level's replay use both cores;
    # prestart_next_level: level 20's pipeline starts while level 10 replays
    args = ["run", str(SMOKE), "--out", str(out), "--set", f"data.root={digits_root}", "--set", "ray.threads_per_worker=2",
            "--set", "ptl.prestart_next_level=true"]
    assert main(args) == 0
    m = json.loads((out / "metrics.json").read_text())
    for key in ("source_only_miou", "target_miou", "levels", "unet_evals", "wall_s"):
        assert key in m, key
    cfg = load_config(SMOKE, [f"data.root={digits_root}", "ray.threads_per_worker=2"])
    assert [lv["level"] for lv in m["levels"]] == cfg.ptl.levels()
    # one worker: after a level's translations its replay runs on the actors' CPUs too
    assert all(lv["replay_threads"] == 2 and lv["translate_s"] > 0 and lv["replay_s"] > 0 for lv in m["levels"])
    # the first level's pipeline starts with it, each later one before the previous level's replay
    assert m["levels"][0]["pipeline_lead_s"] == 0
    assert all(b["pipeline_lead_s"] > a["replay_s"] for a, b in zip(m["levels"], m["levels"][1:]))
    per_level = cfg.ptl.iters_per_level * cfg.ptl.batch_size
    steps = cfg.diffusion.sample_steps or 10**9
    assert m["unet_evals"] == sum(min(n, steps) for n in cfg.ptl.levels()) * per_level
    assert 0 <= m["target_miou"] <= 100 and len(m["per_class"]) == 11
    assert {"source", "target"} <= set(m["ddpm_target_score"])
    assert all(0 <= lv["target_score"] <= 1 and 0 <= lv["consistency_miou"] <= 100 for lv in m["levels"])
    # each level streams its translations once, then replays them (epochs_per_level)
    assert all(lv["iters"] == cfg.ptl.updates_per_level() for lv in m["levels"])
    assert m["segmenter_updates"] == cfg.segmenter.source_iters + len(cfg.ptl.levels()) * cfg.ptl.updates_per_level()
    # g_0's best checkpoint picked on the held-out source-val, never on target labels
    assert 0 <= m["source_only_best_source_val_miou"] <= 100 and 1 <= m["source_best_iter"] <= cfg.segmenter.source_iters
    hist = json.loads((out / "source" / "loss_history.json").read_text())
    assert all("source_val_miou" in h for h in hist)
    for f in ("intermediate_domains.png", "miou_vs_level.png", "translation_vs_level.png", "per_class_iou.csv",
              "ddpm_samples.png"):
        assert (out / "pictures" / f).exists(), f
    # every level's translated ids are recorded once, with provenance
    import pyarrow.parquet as pq

    for n in cfg.ptl.levels():
        t = pq.read_table(out / "ptl" / "levels" / f"{n:05d}" / "translated-r0.parquet")
        assert t.num_rows == per_level and set(t.column("level").to_pylist()) == {n}
        assert set(t.column("config_hash").to_pylist()) == {cfg.hash()}
    runs = _mlflow_runs(out / "mlflow.db")
    assert runs and all(status == "FINISHED" for _, _, status in runs), runs
    assert {"ddpm", "source", "ptl"} <= {name for _, name, _ in runs}

    # an interrupted last level: its record and checkpoint are gone -> only it is redone
    last = out / "ptl" / "levels" / f"{cfg.ptl.levels()[-1]:05d}"
    first = out / "ptl" / "levels" / f"{cfg.ptl.levels()[0]:05d}"
    first_mtime = (first / "record.json").stat().st_mtime
    (last / "record.json").unlink()
    (last / "segmenter.safetensors.sha256").unlink()
    (out / "metrics.json").unlink()
    assert main(args) == 0
    assert (last / "record.json").exists() and (out / "metrics.json").exists()
    assert (first / "record.json").stat().st_mtime == first_mtime
    # the redone level is the only work of this invocation (no stage is marked done): its time is added
    assert json.loads((out / "metrics.json").read_text())["wall_s"] > m["wall_s"]
    state = json.loads((out / "state.json").read_text())
    assert state["runs"]["source"] == 1 and state["runs"]["ddpm"] == 1


@pytest.mark.slow
def test_source_only_is_reported_at_ptl_budget_with_a_shared_g0(ray_local, digits_root, tmp_path):
    cache = tmp_path / "g0cache"
    overrides = [f"data.root={digits_root}", "method=source_only", f"segmenter.cache_dir={cache}"]
    flags = [a for o in overrides for a in ("--set", o)]
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "a"), *flags]) == 0
    m = json.loads((tmp_path / "a" / "metrics.json").read_text())
    cfg = load_config(SMOKE, overrides)
    extra = len(cfg.ptl.levels()) * cfg.ptl.updates_per_level()
    assert m["segmenter_updates"] == cfg.segmenter.source_iters + extra
    assert m["target_miou"] == m["source_only_equal_budget_miou"]
    assert {"source_only_miou", "source_only_best_source_val_miou"} <= set(m)
    hist = json.loads((tmp_path / "a" / "source" / "loss_history.json").read_text())
    assert hist[-1]["iter"] == cfg.segmenter.source_iters + extra
    # g_0 went to the cache at its own schedule's end; a second run reuses it, trains only the extra updates
    (entry,) = [p for p in cache.iterdir() if p.is_dir()]
    cached_hist = json.loads((entry / "loss_history.json").read_text())
    assert cached_hist[-1]["iter"] == cfg.segmenter.source_iters
    stamp = (entry / "g0.safetensors").stat().st_mtime
    assert main(["run", str(SMOKE), "--out", str(tmp_path / "b"), *flags]) == 0
    m2 = json.loads((tmp_path / "b" / "metrics.json").read_text())
    assert (entry / "g0.safetensors").stat().st_mtime == stamp
    assert m2["source_only_miou"] == m["source_only_miou"]  # the same g_0
    assert m2["source_only_equal_budget_miou"] == pytest.approx(m["source_only_equal_budget_miou"], abs=1e-6)


def test_run_dir_is_absolute(tmp_path, monkeypatch):
    # Ray workers run elsewhere: every path handed to them must be absolute
    monkeypatch.chdir(tmp_path)
    rd = RunDir("runs/x", ExperimentConfig())
    assert rd.path.is_absolute() and rd.path == (tmp_path / "runs" / "x").resolve()


def test_wall_s_is_the_work_time_over_invocations_and_a_rerun_keeps_it(tmp_path, monkeypatch):
    # metrics.json wall_s: the seconds of an interrupted and of a finishing invocation; a re-run of
    # the finished run (nothing to do) keeps that total instead of reporting its own seconds. The
    # stages are stand-ins that spend time on a fake clock: no Ray, no data.
    import types

    import dass_ray.pipeline as pl
    import dass_ray.ray_utils
    import dass_ray.stages.common
    import dass_ray.stages.source
    from dass_ray.config import absolute_paths, from_dict

    clock = [1000.0]

    def spend(s: float) -> None:
        clock[0] += s

    trained = []

    def source_stage(cfg, out, **kw):
        trained.append(1)
        spend(30)
        if len(trained) == 1:
            raise KeyboardInterrupt  # the first invocation is interrupted in training

    monkeypatch.setattr(pl, "time", types.SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(dass_ray.ray_utils, "ensure_ray", lambda cfg: None)
    monkeypatch.setattr(dass_ray.stages.common, "ensure_data", lambda cfg, log: spend(2))  # each invocation's start
    monkeypatch.setattr(dass_ray.stages.source, "run_source_stage", source_stage)
    monkeypatch.setattr(pl, "_eval_remote", lambda *a: spend(5) or {"miou": 50.0, "per_class": {}})
    cfg = absolute_paths(from_dict(ExperimentConfig, {"method": "oracle", "tracking": {"enabled": False}}))
    out = tmp_path / "run"
    with pytest.raises(KeyboardInterrupt):
        pl.run(cfg, out, log=lambda m: None)  # 2 + 30 s
    assert pl.run(cfg, out, log=lambda m: None)["wall_s"] == 32 + 2 + 30 + 5
    assert pl.run(cfg, out, log=lambda m: None)["wall_s"] == 69  # everything done: +2 s of its own, not counted
    assert len(trained) == 2 and json.loads((out / "metrics.json").read_text())["wall_s"] == 69
    # a run directory finished by the previous version (state kept only the interrupted seconds)
    state = json.loads((out / "state.json").read_text())
    del state["work_s"]
    (out / "state.json").write_text(json.dumps({**state, "wall_s_before": 32.0}))
    assert pl.run(cfg, out, log=lambda m: None)["wall_s"] == 69


def test_eval_out_writes_the_result_json(tmp_path, monkeypatch, capsys):
    # the CLI's plumbing only: the evaluation itself is replaced (it needs Ray and a checkpoint)
    import dass_ray.pipeline as pipeline

    seen = {}

    def fake_eval(cfg, ckpt, domain, split):
        seen.update(ckpt=ckpt, domain=domain, split=split)
        return {"miou": 12.5, "per_class_iou": [25.0, 0.0]}

    monkeypatch.setattr(pipeline, "evaluate_checkpoint", fake_eval)
    ckpt = tmp_path / "seg.safetensors"
    assert main(["eval", str(SMOKE), "--checkpoint", str(ckpt), "--split", "source/val",
                 "--out", str(tmp_path / "ev")]) == 0
    assert seen == {"ckpt": ckpt, "domain": "source", "split": "val"}
    written = json.loads((tmp_path / "ev" / "eval_source_val.json").read_text())
    assert written == {"miou": 12.5, "per_class_iou": [25.0, 0.0]}
    # without --split: the config's target val split names the file
    cfg = load_config(SMOKE)
    assert main(["eval", str(SMOKE), "--checkpoint", str(ckpt), "--out", str(tmp_path / "ev")]) == 0
    assert (tmp_path / "ev" / f"eval_{cfg.data.target_domain}_{cfg.data.target_val_split}.json").exists()
    assert seen["domain"] is None  # the pipeline resolves the default itself


def test_tune_help_names_its_own_default_out(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--help"])
    assert "runs/<name>-tune/<timestamp>" in capsys.readouterr().out.replace("\n", " ").replace("  ", " ")
