"""Control maps for the segmentation ControlNet: ADE20K colours, nearest resize, palette files."""
import json

import numpy as np
import pytest
import torch

from dass_ray.config import ConfigError
from dass_ray.zodi.control import (
    ADE20K_CLASSES,
    ADE20K_INDEX,
    ADE20K_PALETTE,
    CITYSCAPES_CLASSES,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TO_ADE20K,
    DIGITS,
    control_map,
    load_palette_file,
    resolve_palette,
)


def _colours(x: torch.Tensor) -> set:
    """The set of RGB colours (0..255 ints) present in a [B, 3, H, W] map in [0, 1]."""
    c = (x * 255).round().long().permute(0, 2, 3, 1).reshape(-1, 3)
    return {tuple(v) for v in c.tolist()}


def test_ade20k_palette_and_cityscapes_mapping():
    assert len(ADE20K_CLASSES) == len(ADE20K_PALETTE) == 150
    assert all(len(c) == 3 and all(0 <= v <= 255 for v in c) for c in ADE20K_PALETTE)
    # a few well-known entries of the ControlNet seg palette
    assert ADE20K_PALETTE[ADE20K_INDEX["wall"]] == (120, 120, 120)
    assert ADE20K_PALETTE[ADE20K_INDEX["road"]] == (140, 140, 140)
    assert ADE20K_PALETTE[ADE20K_INDEX["tree"]] == (4, 200, 3)
    assert ADE20K_PALETTE[ADE20K_INDEX["sky"]] == (6, 230, 230)
    assert ADE20K_PALETTE[ADE20K_INDEX["car"]] == (0, 102, 200)
    assert ADE20K_PALETTE[ADE20K_INDEX["person"]] == (150, 5, 61)
    assert ADE20K_PALETTE[ADE20K_INDEX["flag"]] == (92, 0, 255)

    assert len(CITYSCAPES_TO_ADE20K) == len(CITYSCAPES_CLASSES) == 19
    name = {cs: ADE20K_CLASSES[a] for cs, a in zip(CITYSCAPES_CLASSES, CITYSCAPES_TO_ADE20K)}
    for same in ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "sky",
                 "person", "car", "truck", "bus", "bicycle"):
        assert name[same] == same
    assert name["traffic sign"] == "signboard"
    assert name["vegetation"] == "tree"
    assert name["terrain"] == "grass"
    assert name["rider"] == "person"
    assert name["motorcycle"] == "minibike"
    assert name["train"] == "bus"
    assert CITYSCAPES_PALETTE.shape == (19, 3) and CITYSCAPES_PALETTE.dtype == np.uint8
    assert tuple(CITYSCAPES_PALETTE[0]) == (140, 140, 140)  # road in ADE20K colours, not (128, 64, 128)


def test_digits_palette_distinct_ade20k_colours():
    assert DIGITS.shape == (11, 3)
    cols = {tuple(int(v) for v in c) for c in DIGITS}
    assert len(cols) == 11
    assert cols <= set(ADE20K_PALETTE)


def test_control_map_colours_and_ignore():
    labels = torch.tensor([[[0, 1, 255], [8, 10, 18]]], dtype=torch.int64)  # [1, 2, 3]
    m = control_map(labels, (2, 3), CITYSCAPES_PALETTE)
    assert m.shape == (1, 3, 2, 3) and m.dtype == torch.float32
    assert float(m.min()) >= 0 and float(m.max()) <= 1
    px = (m[0] * 255).round().long().permute(1, 2, 0)
    assert tuple(px[0, 0].tolist()) == (140, 140, 140)  # road
    assert tuple(px[0, 1].tolist()) == ADE20K_PALETTE[ADE20K_INDEX["sidewalk"]]
    assert tuple(px[0, 2].tolist()) == (0, 0, 0)  # ignore -> black
    assert tuple(px[1, 0].tolist()) == (4, 200, 3)  # vegetation -> tree
    assert tuple(px[1, 1].tolist()) == (6, 230, 230)  # sky
    assert tuple(px[1, 2].tolist()) == ADE20K_PALETTE[ADE20K_INDEX["bicycle"]]


@pytest.mark.parametrize("size", [(32, 32), (20, 44), (7, 9)])
def test_control_map_nearest_resize_never_blends(size):
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 19, (2, 16, 16), generator=g)
    labels[:, :3, :3] = 255
    m = control_map(labels, size, CITYSCAPES_PALETTE)
    assert m.shape == (2, 3, *size)
    allowed = {tuple(int(v) for v in c) for c in CITYSCAPES_PALETTE} | {(0, 0, 0)}
    assert _colours(m) <= allowed


def test_control_map_2x_upsample_is_pixel_repeat():
    g = torch.Generator().manual_seed(1)
    labels = torch.randint(0, 11, (1, 8, 8), generator=g)
    up = control_map(labels, (16, 16), DIGITS)
    same = control_map(labels, (8, 8), DIGITS)
    ref = same.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3)
    assert torch.equal(up, ref)


def test_control_map_rejects_ids_without_colour():
    labels = torch.tensor([[[0, 19]]], dtype=torch.int64)
    with pytest.raises(ValueError, match="19"):
        control_map(labels, (1, 2), CITYSCAPES_PALETTE)
    with pytest.raises(ValueError, match=r"\[C, 3\]"):
        control_map(torch.zeros(1, 2, 2, dtype=torch.int64), (2, 2), np.zeros((4, 2)))


def test_load_palette_yaml_json_and_names(tmp_path):
    y = tmp_path / "pal.yaml"
    y.write_text("0: [1, 2, 3]\n1: road\n2: [255, 255, 255]\n")
    pal = load_palette_file(y)
    assert pal.dtype == np.uint8 and pal.shape == (3, 3)
    assert pal.tolist() == [[1, 2, 3], [140, 140, 140], [255, 255, 255]]

    j = tmp_path / "pal.json"
    j.write_text(json.dumps({"1": [4, 5, 6], "0": "tree"}))
    assert load_palette_file(j, num_classes=2).tolist() == [[4, 200, 3], [4, 5, 6]]

    m = control_map(torch.tensor([[[0, 1]]]), (1, 2), pal)
    assert _colours(m) == {(1, 2, 3), (140, 140, 140)}


@pytest.mark.parametrize("text,entry", [
    ("0: [1, 2, 3]\n1: [1, 2, 300]\n", "entry 1"),
    ("0: [1, 2]\n", "entry 0"),
    ("0: [1, 2, 3]\nroad: [1, 2, 3]\n", "entry 'road'"),
    ("0: [1, 2, 3]\n1: not_an_ade_class\n", "entry 1"),
    ("0: [1.5, 2, 3]\n", "entry 0"),
])
def test_load_palette_bad_entry_names_file_and_entry(tmp_path, text, entry):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_palette_file(p)
    assert str(p) in str(e.value) and entry in str(e.value)


def test_load_palette_missing_ids_and_bad_files(tmp_path):
    p = tmp_path / "gap.yaml"
    p.write_text("0: [1, 2, 3]\n2: [1, 2, 3]\n")
    with pytest.raises(ConfigError, match=r"class ids \[1\]"):
        load_palette_file(p)
    with pytest.raises(ConfigError, match="num_classes"):
        load_palette_file(p, num_classes=2)
    lst = tmp_path / "list.yaml"
    lst.write_text("- [1, 2, 3]\n")
    with pytest.raises(ConfigError, match="mapping"):
        load_palette_file(lst)
    with pytest.raises(ConfigError, match="does not exist"):
        load_palette_file(tmp_path / "nope.yaml")


def test_resolve_palette(tmp_path):
    assert np.array_equal(resolve_palette(19), CITYSCAPES_PALETTE)
    assert np.array_equal(resolve_palette(11), DIGITS)
    with pytest.raises(ConfigError, match="zodi.class_palette"):
        resolve_palette(7)
    p = tmp_path / "p.yaml"
    p.write_text("\n".join(f"{i}: [{i}, {i}, {i}]" for i in range(7)))
    assert resolve_palette(7, str(p)).shape == (7, 3)
