"""The Ray Data translation stage: ``translation_dataset`` (actor pool of ``Translator``) and ``dass-ray translate``.

A tiny folder layout (12 images 16x16, 3 classes), a tiny random UNet (T = 20) and a
tiny ``small_cnn`` segmenter checkpoint. Each dataset run starts an actor (imports
diffusers, loads the models): several seconds on 2 loaded cores, hence ``slow``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from dass_ray.checkpoints import checkpoint_id, save_state
from dass_ray.config import ExperimentConfig, from_dict, load_config

REPO = Path(__file__).resolve().parents[1]
LEVEL = 4
N_IMAGES = 12
NUM_CLASSES = 3
SIZE = 16


def _write_layout(root: Path) -> list[str]:
    """root/source/train/{images,labels}/<id>.png: 12 RGB images with blocky 3-class labels (and a few 255)."""
    rng = np.random.default_rng(0)
    ids = [f"{i:04d}" for i in range(N_IMAGES)]
    for d in ("images", "labels"):
        (root / "source" / "train" / d).mkdir(parents=True, exist_ok=True)
    for i in ids:
        img = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
        lbl = np.repeat(np.repeat(rng.integers(0, NUM_CLASSES, (4, 4)), 4, 0), 4, 1).astype(np.uint8)
        lbl[rng.random((SIZE, SIZE)) < 0.05] = 255
        Image.fromarray(img, "RGB").save(root / "source" / "train" / "images" / f"{i}.png")
        Image.fromarray(lbl, "L").save(root / "source" / "train" / "labels" / f"{i}.png")
    return ids


def _tiny_config(root: Path, **ray) -> ExperimentConfig:
    d = load_config(REPO / "experiments" / "digits_smoke.yaml").to_dict()
    d["data"].update(dataset="folder", root=str(root), num_classes=NUM_CLASSES, max_samples=None)
    d["diffusion"].update(image_size=SIZE, block_out_channels=[8, 16], num_train_timesteps=20, cache_dir=None)
    d["segmenter"].update(arch="small_cnn", width=8)
    d["guidance"].update(scale=1000.0, arrangement="alternate")
    d["ptl"].update(N=LEVEL, stride=LEVEL, translate_batch_size=4)
    d["ray"].update(num_actors=1, cpus_per_actor=1.0, threads_per_actor=1, **ray)
    return from_dict(ExperimentConfig, d)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from dass_ray.diffusion.unet import build_unet, save_unet
    from dass_ray.segmenters import build_segmenter

    tmp = tmp_path_factory.mktemp("translate_ray")
    root = tmp / "data"
    ids = _write_layout(root)
    cfg = _tiny_config(root)
    torch.manual_seed(0)
    unet = build_unet(cfg.diffusion).eval()
    unet_path = tmp / "unet.safetensors"
    save_unet(unet_path, unet)
    torch.manual_seed(1)
    seg = build_segmenter(cfg.segmenter, NUM_CLASSES).eval()
    seg_path = tmp / "seg.safetensors"
    save_state(seg_path, {"model." + k: v for k, v in seg.state_dict().items()}, {"iteration": "0"})
    (tmp / "config.yaml").write_text(cfg.to_yaml())
    return {"tmp": tmp, "root": root, "ids": ids, "cfg": cfg, "unet_path": unet_path, "seg_path": seg_path}


def _run(cfg: ExperimentConfig, ids: list[str], unet_path: Path, seg_path) -> dict[str, dict]:
    from dass_ray.stages.translator import translation_dataset, translation_rows

    rows = translation_rows({LEVEL: ids}, cfg.ptl.translate_batch_size)
    ds = translation_dataset(cfg, rows, str(unet_path), {LEVEL: str(seg_path) if seg_path else None})
    out = ds.take_all()
    got = [str(r["id"]) for r in out]
    assert sorted(got) == sorted(ids), "every input id must appear exactly once"
    assert len(got) == len(set(got))
    return {str(r["id"]): r for r in out}


def _in_process(cfg: ExperimentConfig, ids: list[str], unet_path: Path, seg_path, batch: int) -> dict[str, np.ndarray]:
    from dass_ray.data.layout import read_sample
    from dass_ray.data.transforms import from_diffusion, to_diffusion
    from dass_ray.diffusion.schedule import DDPMSchedule
    from dass_ray.diffusion.unet import load_unet
    from dass_ray.seg_training import load_trained
    from dass_ray.translate import translate_level

    unet = load_unet(unet_path, cfg.diffusion)
    seg = load_trained(Path(seg_path), cfg.segmenter, NUM_CLASSES) if seg_path else None
    sched = DDPMSchedule(cfg.diffusion)
    out = {}
    for s in range(0, len(ids), batch):
        chunk = ids[s:s + batch]
        pairs = [read_sample(cfg.data.root, "source", "train", i, NUM_CLASSES) for i in chunk]
        x = to_diffusion(np.stack([p[0] for p in pairs]))
        y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
        xt = translate_level(x, y, LEVEL, seg, unet, sched, cfg.guidance, NUM_CLASSES, ids=chunk, seed=cfg.seed,
                             steps=cfg.diffusion.sample_steps)
        out.update(dict(zip(chunk, from_diffusion(xt))))
    return out


@pytest.fixture(scope="module")
def one_actor(setup, ray_local):
    s = setup
    return _run(s["cfg"], s["ids"], s["unet_path"], s["seg_path"])


@pytest.mark.slow
def test_every_id_once_with_provenance(setup, one_actor):
    s = setup
    cfg = s["cfg"]
    seg_id = checkpoint_id(s["seg_path"])
    for i, r in one_actor.items():
        assert int(r["level"]) == LEVEL
        assert int(r["seed"]) == cfg.seed
        assert str(r["segmenter_id"]) == seg_id
        assert str(r["config_hash"]) == cfg.hash()
        assert r["image"].shape == (SIZE, SIZE, 3) and r["image"].dtype == np.uint8
        from dass_ray.data.layout import read_sample

        img, lbl = read_sample(s["root"], "source", "train", i, NUM_CLASSES)
        np.testing.assert_array_equal(r["source"], img)
        np.testing.assert_array_equal(r["label"], lbl)
        assert not np.array_equal(r["image"], img), "a level-4 translation changes the image"


@pytest.mark.slow
def test_rows_equal_in_process_translate_level(setup, one_actor):
    """Same (seed, n, id) -> the same image, whatever the batch grouping or the process."""
    s = setup
    same_batches = _in_process(s["cfg"], s["ids"], s["unet_path"], s["seg_path"], s["cfg"].ptl.translate_batch_size)
    for i in s["ids"]:
        d = np.abs(one_actor[i]["image"].astype(int) - same_batches[i].astype(int))
        assert d.max() <= 1, (i, d.max())  # 1 = a uint8 rounding flip at most
    other_batches = _in_process(s["cfg"], list(reversed(s["ids"])), s["unet_path"], s["seg_path"], 5)
    for i in s["ids"]:
        d = np.abs(one_actor[i]["image"].astype(int) - other_batches[i].astype(int))
        assert d.max() <= 1, (i, d.max())


@pytest.mark.slow
def test_two_actors_give_the_same_images(setup, one_actor):
    s = setup
    cfg2 = dataclasses.replace(s["cfg"], ray=dataclasses.replace(s["cfg"].ray, num_actors=2, cpus_per_actor=1.0))
    two = _run(cfg2, s["ids"], s["unet_path"], s["seg_path"])
    for i in s["ids"]:
        d = np.abs(two[i]["image"].astype(int) - one_actor[i]["image"].astype(int))
        assert d.max() <= 1, (i, d.max())
        assert str(two[i]["segmenter_id"]) == str(one_actor[i]["segmenter_id"])


@pytest.mark.slow
def test_unguided_rows_have_no_segmenter(setup, ray_local):
    s = setup
    cfg = dataclasses.replace(s["cfg"], guidance=dataclasses.replace(s["cfg"].guidance, arrangement="none"))
    out = _run(cfg, s["ids"][:4], s["unet_path"], None)
    ref = _in_process(cfg, s["ids"][:4], s["unet_path"], None, 4)
    for i, r in out.items():
        assert str(r["segmenter_id"]) == "none"
        assert np.abs(r["image"].astype(int) - ref[i].astype(int)).max() <= 1


@pytest.mark.slow
@pytest.mark.parametrize("guided", [False, True], ids=["phi_n", "sgg"])
def test_cli_translate_writes_parquet_grid_and_json(setup, ray_local, tmp_path, guided):
    """``dass-ray translate``; without --segmenter it is phi^n even though the config's guidance is on."""
    import pyarrow.parquet as pq

    from dass_ray.cli import main

    s = setup
    assert s["cfg"].guidance.scale > 0 and s["cfg"].guidance.arrangement != "none"
    out = tmp_path / "out"
    argv = ["translate", str(s["tmp"] / "config.yaml"), "--level", "2", "--out", str(out), "--limit", "8",
            "--unet", str(s["unet_path"]), "--set", f"data.root={s['root']}"]
    if guided:
        argv += ["--segmenter", str(s["seg_path"])]
    rc = main(argv)
    assert rc in (0, None)
    table = pq.read_table(out / "translated")
    ids = [str(v) for v in table.column("id").to_pylist()]
    assert len(ids) == 8 and len(set(ids)) == 8
    assert set(ids) == set(s["ids"][:8])
    assert set(table.column("level").to_pylist()) == {2}
    for col in ("image", "label", "source", "seed", "segmenter_id", "config_hash"):
        assert col in table.column_names
    seg_ids = set(table.column("segmenter_id").to_pylist())
    assert seg_ids == ({checkpoint_id(s["seg_path"])} if guided else {"none"})
    assert (out / "grid.png").is_file() and Image.open(out / "grid.png").size[0] > 0
    info = json.loads((out / "translate.json").read_text())
    assert info["images"] == 8 and info["level"] == 2 and info["guided"] is guided
