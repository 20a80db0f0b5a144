"""Configs: every file in experiments/ and tune_spaces/ loads; bad values fail naming key, value, allowed."""
import math
from pathlib import Path

import pytest
import yaml

from dass_ray.config import ConfigError, ExperimentConfig, apply_overrides, from_dict, load_config, set_path
from dass_ray.tune_space import load_space, parse_space

ROOT = Path(__file__).resolve().parents[1]
EXPERIMENTS = sorted((ROOT / "experiments").glob("*.yaml"))
SPACES = sorted((ROOT / "tune_spaces").glob("*.yaml"))


def test_there_are_experiments_and_spaces():
    names = {p.name for p in EXPERIMENTS}
    assert {"digits_ptl.yaml", "digits_smoke.yaml"} <= names
    assert len(SPACES) >= 1


@pytest.mark.parametrize("path", EXPERIMENTS, ids=lambda p: p.name)
def test_every_experiment_loads(path):
    cfg = load_config(path)
    assert cfg.name == path.stem or cfg.name
    assert cfg.ptl.levels()[-1] == cfg.ptl.N
    # round trip: the resolved config is a valid config
    again = from_dict(ExperimentConfig, yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_tune_space_loads(path):
    space = load_space(path)
    assert space.params
    assert space.mode in ("max", "min")


def _msg(excinfo) -> str:
    return str(excinfo.value)


def test_unknown_key_names_key_and_allowed():
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"ptl": {"NN": 3}})
    assert "ptl.NN" in _msg(e) and "unknown" in _msg(e) and "stride" in _msg(e)


def test_unknown_section():
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"ptll": {}})
    assert "ptll" in _msg(e)


@pytest.mark.parametrize(
    "data,key,allowed",
    [
        ({"ptl": {"N": "ten"}}, "ptl.N", "an integer"),
        ({"ptl": {"N": 2.5}}, "ptl.N", "an integer"),
        ({"guidance": {"scale": "big"}}, "guidance.scale", "a number"),
        ({"guidance": {"arrangement": "zigzag"}}, "guidance.arrangement", "alternate"),
        ({"ptl": {"l_src": "yes"}}, "ptl.l_src", "true/false"),
        ({"diffusion": {"block_out_channels": 32}}, "diffusion.block_out_channels", "a list"),
        ({"ptl": 5}, "ptl", "a mapping"),
    ],
)
def test_wrong_type(data, key, allowed):
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, data)
    assert f"'{key}'" in _msg(e) and allowed in _msg(e)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"ptl": {"N": -5}}, "ptl.N"),
        ({"ptl": {"N": 10, "stride": 20}}, "ptl.stride"),
        ({"guidance": {"scale": float("nan")}}, "guidance.scale"),
        ({"guidance": {"scale": -1.0}}, "guidance.scale"),
        ({"ptl": {"N": 1200}}, "ptl.N"),
        ({"segmenter": {"augment_fraction": 1.5}}, "segmenter.augment_fraction"),
        ({"diffusion": {"beta_start": 0.1, "beta_end": 0.01}}, "diffusion.beta_start/beta_end"),
        ({"diffusion": {"image_size": 30, "block_out_channels": [8, 16, 16]}}, "diffusion.image_size"),
        ({"ray": {"cpus_per_actor": -1}}, "ray.cpus_per_actor"),
        ({"zodi": {"strength": 1.5}}, "zodi.strength"),
        ({"name": "bad name!"}, "name"),
    ],
)
def test_out_of_range(data, key):
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, data)
    assert f"'{key}'" in _msg(e) and "allowed" in _msg(e)


def test_overrides_are_typed_and_validated(tmp_path):
    p = tmp_path / "x.yaml"
    p.write_text("name: x\nptl: {N: 100, stride: 10}\n")
    cfg = load_config(p, ["ptl.N=200", "guidance.scale=1e3", "guidance.arrangement=random",
                          "diffusion.block_out_channels=[8, 16]", "diffusion.weights=null"])
    assert cfg.ptl.N == 200 and cfg.guidance.scale == 1000.0 and cfg.guidance.arrangement == "random"
    assert cfg.diffusion.block_out_channels == [8, 16] and cfg.diffusion.weights is None
    with pytest.raises(ConfigError, match="ptl.stride"):
        load_config(p, ["ptl.stride=500"])
    with pytest.raises(ConfigError, match="expected section.key=value"):
        load_config(p, ["ptl.N"])
    with pytest.raises(ConfigError, match="ptl.bogus"):
        load_config(p, ["ptl.bogus=1"])


def test_missing_file_and_non_mapping(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_config(p)


def test_yaml_is_loaded_safely(tmp_path):
    p = tmp_path / "evil.yaml"
    p.write_text("name: !!python/object/apply:os.system ['echo pwned']\n")
    with pytest.raises(yaml.YAMLError):
        load_config(p)


def test_max_actor_restarts_checked():
    assert ExperimentConfig().ray.max_actor_restarts == 3
    assert from_dict(ExperimentConfig, {"ray": {"max_actor_restarts": 0}}).ray.max_actor_restarts == 0
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"ray": {"max_actor_restarts": -1}})
    assert "'ray.max_actor_restarts'" in _msg(e) and "got -1" in _msg(e) and "an integer >= 0" in _msg(e)
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"ray": {"max_actor_restarts": 1.5}})
    assert "'ray.max_actor_restarts'" in _msg(e) and "an integer" in _msg(e)


def test_ptl_worker_threads_while_translating_and_after():
    one = from_dict(ExperimentConfig, {"ray": {"cpus_per_worker": 1, "threads_per_worker": 2}}).ray
    assert (one.streaming_threads(), one.replay_threads()) == (1, 2)
    ddp = from_dict(ExperimentConfig, {"ray": {"num_workers": 2, "cpus_per_worker": 1, "threads_per_worker": 2}}).ray
    assert (ddp.streaming_threads(), ddp.replay_threads()) == (1, 1)  # other ranks' actors may share the node
    unset = from_dict(ExperimentConfig, {"ray": {"cpus_per_worker": 0.5}}).ray
    assert (unset.streaming_threads(), unset.replay_threads()) == (1, 1)


def test_levels_with_stride():
    cfg = from_dict(ExperimentConfig, {"ptl": {"N": 10, "stride": 4}})
    assert cfg.ptl.levels() == [4, 8, 10]
    cfg = from_dict(ExperimentConfig, {"ptl": {"N": 3, "stride": 1}})
    assert cfg.ptl.levels() == [1, 2, 3]


def test_levels_from_a_first_level():
    cfg = from_dict(ExperimentConfig, {"ptl": {"N": 1000, "stride": 100, "first_level": 700}})
    assert cfg.ptl.levels() == [700, 800, 900, 1000]
    cfg = from_dict(ExperimentConfig, {"ptl": {"N": 10, "stride": 4, "first_level": 3}})
    assert cfg.ptl.levels() == [3, 7, 10]  # N always last
    assert from_dict(ExperimentConfig, {"ptl": {"N": 10, "stride": 4, "first_level": 10}}).ptl.levels() == [10]
    for bad in (0, 11, -1):
        with pytest.raises(ConfigError, match="ptl.first_level"):
            from_dict(ExperimentConfig, {"ptl": {"N": 10, "first_level": bad}})


def test_first_level_is_hashed_only_when_set():
    # runs made before the key existed keep their hash; setting it changes the run
    a = ExperimentConfig()
    assert a.hash() == "77b0685ef14829e3"  # the defaults' hash as computed before ptl.first_level existed
    assert set_path(a, "ptl.first_level", a.ptl.stride).hash() != a.hash()
    assert set_path(a, "ptl.first_level", 300).hash("ptl") != a.hash("ptl")
    assert set_path(a, "ptl.first_level", None).hash() == a.hash()


def test_hash_is_stable_and_sensitive():
    a, b = ExperimentConfig(), ExperimentConfig()
    assert a.hash() == b.hash()
    assert set_path(a, "guidance.scale", 5.0).hash() != a.hash()
    assert a.hash("diffusion") == set_path(a, "guidance.scale", 5.0).hash("diffusion")
    # ray.max_actor_restarts changes no output: not hashed (a failed level resumes with more restarts)
    assert set_path(a, "ray.max_actor_restarts", 9).hash() == a.hash()
    assert set_path(a, "ray.max_actor_restarts", 9).hash("ray") == a.hash("ray")
    # guidance.lcg_chunk neither (chunks of the same sum): runs made before it existed keep their hash
    assert set_path(a, "guidance.lcg_chunk", 7).hash() == a.hash()
    # nor the translation pool's size and CPU share (each image has its own noise generator);
    # hashed at their defaults, so runs made with one actor keep their hash
    two = set_path(set_path(a, "ray.num_actors", 2), "ray.cpus_per_actor", 0.5)
    assert two.hash() == a.hash() and two.hash("ray") == a.hash("ray")
    assert set_path(a, "ray.threads_per_actor", 2).hash() != a.hash()  # threads change float rounding
    # nor when PTL starts the next level's pipeline (same images, same order; off by default)
    assert a.ptl.prestart_next_level is False
    assert set_path(a, "ptl.prestart_next_level", True).hash() == a.hash()
    with pytest.raises(ConfigError) as e:
        from_dict(ExperimentConfig, {"guidance": {"lcg_chunk": -2}})
    assert "'guidance.lcg_chunk'" in _msg(e) and "got -2" in _msg(e)


def test_apply_overrides_does_not_mutate():
    d = {"ptl": {"N": 5}}
    apply_overrides(d, ["ptl.N=6"])
    assert d == {"ptl": {"N": 5}}


def test_tune_space_errors_name_the_key():
    base = {"params": {"ptl.N": {"choice": [100, 200]}}}
    assert parse_space(base).params[0].values == [100, 200]
    with pytest.raises(ConfigError, match="params.ptl.N"):
        parse_space({"params": {"ptl.N": {"choice": [100, -1]}}})
    with pytest.raises(ConfigError, match="params.ptl.nope"):
        parse_space({"params": {"ptl.nope": {"choice": [1]}}})
    with pytest.raises(ConfigError, match="loguniform"):
        parse_space({"params": {"guidance.scale": {"loguniform": [0, 10]}}})
    with pytest.raises(ConfigError, match="objective.mode"):
        parse_space({**base, "objective": {"metric": "x", "mode": "up"}})
    with pytest.raises(ConfigError, match="'bogus'"):
        parse_space({**base, "bogus": 1})
    with pytest.raises(ConfigError, match="guidance.arrangement"):
        parse_space({"params": {"guidance.arrangement": {"choice": ["alternate", "zigzag"]}}})
    assert not math.isnan(parse_space({"params": {"guidance.scale": {"uniform": [1.0, 2.0]}}}).params[0].values[0])


def test_absolute_paths_resolve_against_base(tmp_path):
    from dass_ray.config import absolute_paths

    cfg = from_dict(ExperimentConfig, {"data": {"root": "data/digits"}, "diffusion": {"cache_dir": "runs/c"},
                                       "tracking": {"uri": "http://127.0.0.1:5000"}})
    out = absolute_paths(cfg, tmp_path)
    assert out.data.root == str(tmp_path / "data" / "digits")
    assert out.diffusion.cache_dir == str(tmp_path / "runs" / "c")
    assert out.diffusion.weights is None and out.tracking.uri == "http://127.0.0.1:5000"
    assert absolute_paths(out, "/elsewhere") == out  # idempotent


def test_extends_merges_sections_and_names_the_variant(tmp_path):
    (tmp_path / "base.yaml").write_text("name: base\nmethod: ptl\nguidance: {scale: 10.0, arrangement: alternate}\n"
                                        "ptl: {N: 40, stride: 10}\n")
    (tmp_path / "var.yaml").write_text("extends: base.yaml\nguidance: {arrangement: none}\n")
    cfg = load_config(tmp_path / "var.yaml")
    assert cfg.name == "var" and cfg.guidance.arrangement == "none" and cfg.guidance.scale == 10.0
    assert cfg.ptl.N == 40 and cfg.ptl.stride == 10


def test_extends_errors_name_the_files(tmp_path):
    (tmp_path / "a.yaml").write_text("extends: b.yaml\n")
    (tmp_path / "b.yaml").write_text("extends: a.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("extends: missing.yaml\n")
    with pytest.raises(ConfigError, match=r"missing\.yaml.*extended by"):
        load_config(tmp_path / "c.yaml")
    (tmp_path / "d.yaml").write_text("extends: [1]\n")
    with pytest.raises(ConfigError, match="extends"):
        load_config(tmp_path / "d.yaml")


def test_source_val_holdout_is_fixed_and_disjoint():
    import numpy as np

    from dass_ray.data.layout import Split
    from dass_ray.stages.common import source_part, source_train_ids

    ids = [f"s{i:04d}" for i in range(50)]
    split = Split(ids, np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1).repeat(3, -1), np.zeros((50, 1, 1), np.uint8))
    cfg = ExperimentConfig()
    cfg.data.source_val_holdout = 8
    tr, va = source_part(cfg, split, "train"), source_part(cfg, split, "val")
    assert len(va.ids) == 8 and len(tr.ids) == 42 and not set(tr.ids) & set(va.ids)
    assert [int(v) for v in va.images[:, 0, 0, 0]] == [int(i[1:]) for i in va.ids]  # images follow their ids
    assert source_train_ids(cfg, list(reversed(ids))) == list(reversed(tr.ids))
    cfg.seed = 5  # the run seed does not move the holdout; the data seed does
    assert source_part(cfg, split, "val").ids == va.ids
    cfg.data.seed = 1
    assert source_part(cfg, split, "val").ids != va.ids
    cfg.data.source_val_holdout = 50
    with pytest.raises(ValueError, match="source_val_holdout"):
        source_part(cfg, split, "train")
    cfg.data.source_val_holdout = 0
    assert source_part(cfg, split, "train") is split
    with pytest.raises(ValueError, match="source_val_holdout"):
        source_part(cfg, split, "val")


def test_digits_variants_share_the_budget_of_the_demo():
    """Fair protocol (issue 8): every digits variant has g_0's schedule and PTL's number of updates and translations."""
    ref = load_config(ROOT / "experiments" / "digits_ptl.yaml")

    def budget(c):
        return (len(c.ptl.levels()) * c.ptl.updates_per_level(),
                len(c.ptl.levels()) * c.ptl.iters_per_level * c.ptl.batch_size)

    for path in sorted((ROOT / "experiments").glob("digits_*.yaml")):
        if path.stem in ("digits_smoke", "digits_oracle"):
            continue
        c = load_config(path)
        assert (c.segmenter.source_iters, c.segmenter.lr, c.segmenter.batch_size, c.seed) == (
            ref.segmenter.source_iters, ref.segmenter.lr, ref.segmenter.batch_size, ref.seed), path.name
        assert budget(c) == budget(ref), path.name
        assert c.ptl.N == ref.ptl.N and c.ptl.lr == ref.ptl.lr and c.diffusion == ref.diffusion, path.name
        assert c.data.source_val_holdout == ref.data.source_val_holdout, path.name
