"""Public-dataset converters: tiny fixture files in each dataset's own layout, mapping checked pixel-wise."""
from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dass_ray.data.layout import DataError, list_ids, read_sample
from dass_ray.data.public import (
    CITYSCAPES19_CLASSES,
    SYNTHIA13_CLASSES,
    SYNTHIA13_IN_16,
    SYNTHIA16_CLASSES,
    convert_acdc,
    convert_cityscapes,
    convert_gta5,
    convert_synthia,
    read_synthia_label,
)

# The standard tables, typed out again by hand (cityscapesScripts labels.py; SYNTHIA README),
# so a typo in the module does not pass by being compared with itself.
CS_TRAIN = {7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9, 23: 10, 24: 11,
            25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18}
# SYNTHIA id -> 16-class index: road, sidewalk, building, wall, fence, pole, light, sign,
# vegetation, sky, person, rider, car, bus, motorcycle, bicycle
SYN_16 = {3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9, 10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15}
# Cityscapes train id -> 16 classes (terrain 9, truck 14, train 16 dropped)
CS19_TO_16 = {0: 0, 1: 1, 2: 2, 3: 3, 4: 4, 5: 5, 6: 6, 7: 7, 8: 8, 10: 9, 11: 10, 12: 11, 13: 12, 15: 13, 17: 14, 18: 15}


def _expected(ids: np.ndarray, table: dict[int, int]) -> np.ndarray:
    return np.vectorize(lambda v: table.get(int(v), 255))(ids).astype(np.uint8)


def _rgb(h: int, w: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _save(a: np.ndarray, p: Path, palette: bool = False) -> None:
    p.parent.mkdir(parents=True, exist_ok=True)
    if palette:  # GTA5 labels are palette PNGs whose indices are the label ids
        im = Image.frombytes("P", (a.shape[1], a.shape[0]), np.ascontiguousarray(a, np.uint8).tobytes())
        im.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    else:
        im = Image.fromarray(a)
    im.save(p)


def _write_png16_rgb(p: Path, arr: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG (what Pillow cannot write), filter type 0."""
    arr = np.asarray(arr, dtype=">u2")
    h, w, _ = arr.shape
    raw = b"".join(b"\x00" + arr[y].tobytes() for y in range(h))

    def chunk(t: bytes, d: bytes) -> bytes:
        return struct.pack(">I", len(d)) + t + d + struct.pack(">I", zlib.crc32(t + d) & 0xFFFFFFFF)

    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                  + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


ALL_IDS = np.arange(36, dtype=np.uint8).reshape(6, 6)  # every Cityscapes labelId 0..33, plus 34, 35
ALL_IDS[5, 5] = 255


def test_class_name_constants() -> None:
    assert len(CITYSCAPES19_CLASSES) == 19 and len(SYNTHIA16_CLASSES) == 16 and len(SYNTHIA13_CLASSES) == 13
    assert SYNTHIA13_IN_16 == (0, 1, 2, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15)
    assert SYNTHIA13_CLASSES == ("road", "sidewalk", "building", "traffic light", "traffic sign", "vegetation",
                                 "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle")


def test_cityscapes(tmp_path: Path) -> None:
    src, out = tmp_path / "cs", tmp_path / "out"
    imgs = {}
    for k, (city, name) in enumerate([("aachen", "aachen_000000_000019"), ("bremen", "bremen_000001_000019")]):
        imgs[name] = _rgb(6, 6, k)
        _save(imgs[name], src / "leftImg8bit" / "val" / city / f"{name}_leftImg8bit.png")
        _save(np.roll(ALL_IDS, k), src / "gtFine" / "val" / city / f"{name}_gtFine_labelIds.png")
        # other gtFine files beside it must not be picked up
        _save(_rgb(6, 6, 9), src / "gtFine" / "val" / city / f"{name}_gtFine_color.png")
    assert convert_cityscapes(src, out, "val") == 2
    assert list_ids(out, "cityscapes", "val") == ["aachen_000000_000019", "bremen_000001_000019"]
    img, lbl = read_sample(out, "cityscapes", "val", "bremen_000001_000019", 19)
    np.testing.assert_array_equal(img, imgs["bremen_000001_000019"])
    np.testing.assert_array_equal(lbl, _expected(np.roll(ALL_IDS, 1), CS_TRAIN))
    assert lbl[1, 2] == 0 and lbl[4, 3] == 13 and lbl[0, 1] == 255  # rolled by one: labelIds 7 road, 26 car, 0 void
    # the same data as the 16-class target of a SYNTHIA run
    assert convert_cityscapes(src, out, "val", domain="cs16", labels="synthia16") == 2
    _, l16 = read_sample(out, "cs16", "val", "aachen_000000_000019", 16)
    np.testing.assert_array_equal(l16, _expected(_expected(ALL_IDS, CS_TRAIN), CS19_TO_16))


def test_cityscapes_resize_and_missing(tmp_path: Path) -> None:
    src, out = tmp_path / "cs", tmp_path / "out"
    _save(_rgb(4, 8, 0), src / "leftImg8bit" / "train" / "ulm" / "ulm_000000_000019_leftImg8bit.png")
    gt = np.full((4, 8), 26, np.uint8)
    gt[:, 4:] = 7
    _save(gt, src / "gtFine" / "train" / "ulm" / "ulm_000000_000019_gtFine_labelIds.png")
    assert convert_cityscapes(src, out, "train", image_size=(2, 4)) == 1
    img, lbl = read_sample(out, "cityscapes", "train", "ulm_000000_000019", 19)
    assert img.shape == (2, 4, 3)
    np.testing.assert_array_equal(lbl, [[13, 13, 0, 0], [13, 13, 0, 0]])
    _save(_rgb(4, 8, 1), src / "leftImg8bit" / "train" / "ulm" / "ulm_000001_000019_leftImg8bit.png")
    with pytest.raises(DataError, match="ulm_000001_000019_gtFine_labelIds.png: label file is missing"):
        convert_cityscapes(src, out, "train")
    with pytest.raises(DataError, match="leftImg8bit/nope: Cityscapes image directory does not exist"):
        convert_cityscapes(src, out, "nope")


def test_gta5_palette_labels_and_size_mismatch(tmp_path: Path) -> None:
    src, out = tmp_path / "gta", tmp_path / "out"
    _save(_rgb(6, 6, 0), src / "images" / "00001.png")
    _save(ALL_IDS, src / "labels" / "00001.png", palette=True)
    _save(_rgb(6, 6, 1), src / "images" / "00002.png")
    _save(ALL_IDS[:5], src / "labels" / "00002.png", palette=True)  # known GTA5 problem: sizes differ
    assert Image.open(src / "labels" / "00001.png").mode == "P"
    with pytest.raises(DataError) as e:
        convert_gta5(src, out)
    assert "00002.png" in str(e.value) and "does not match" in str(e.value)
    skipped: list[tuple[str, str]] = []
    assert convert_gta5(src, out, skip_bad=True, skipped=skipped) == 1
    assert [i for i, _ in skipped] == ["00002"]
    img, lbl = read_sample(out, "gta5", "train", "00001", 19)
    np.testing.assert_array_equal(lbl, _expected(ALL_IDS, CS_TRAIN))
    np.testing.assert_array_equal(img, _rgb(6, 6, 0))
    assert convert_gta5(src, tmp_path / "o2", split="val", ids=["00001"]) == 1
    assert list_ids(tmp_path / "o2", "gta5", "val") == ["00001"]


def test_synthia_16bit_labels(tmp_path: Path) -> None:
    src, out = tmp_path / "syn", tmp_path / "out"
    cls = np.arange(24, dtype=np.uint16).reshape(4, 6)  # SYNTHIA ids 0..22 and one unknown (23)
    gt = np.zeros((4, 6, 3), np.uint16)
    gt[..., 0] = cls
    gt[..., 1] = 1000 + np.arange(24).reshape(4, 6)  # instance ids > 255 in the second channel
    _write_png16_rgb(src / "GT" / "LABELS" / "0000000.png", gt)
    _save(_rgb(4, 6, 3), src / "RGB" / "0000000.png")
    np.testing.assert_array_equal(read_synthia_label(src / "GT" / "LABELS" / "0000000.png"), cls)
    assert convert_synthia(src, out) == 1
    img, lbl = read_sample(out, "synthia", "train", "0000000", 16)
    exp = _expected(cls, SYN_16)
    np.testing.assert_array_equal(lbl, exp)
    assert lbl[0, 3] == 0 and lbl[3, 3] == 3 and lbl[0, 1] == 9  # road, wall, sky
    assert (lbl[cls == 16] == 255).all() and (lbl[cls == 22] == 255).all()  # terrain, lanemarking ignored
    np.testing.assert_array_equal(img, _rgb(4, 6, 3))
    # an 8-bit single-channel label is read as ids too
    _save(cls.astype(np.uint8), src / "GT" / "LABELS" / "0000001.png")
    _save(_rgb(4, 6, 4), src / "RGB" / "0000001.png")
    assert convert_synthia(src, out) == 2
    np.testing.assert_array_equal(read_sample(out, "synthia", "train", "0000001", 16)[1], exp)


def test_synthia_truncated_label(tmp_path: Path) -> None:
    src = tmp_path / "syn"
    gt = np.ones((4, 6, 3), np.uint16)
    p = src / "GT" / "LABELS" / "0000000.png"
    _write_png16_rgb(p, gt)
    p.write_bytes(p.read_bytes()[:-20])
    _save(_rgb(4, 6, 3), src / "RGB" / "0000000.png")
    with pytest.raises(DataError, match="0000000.png: unreadable or truncated SYNTHIA label"):
        convert_synthia(src, tmp_path / "out")


def test_acdc_one_domain_per_condition(tmp_path: Path) -> None:
    src, out = tmp_path / "acdc", tmp_path / "out"
    for k, cond in enumerate(("night", "fog")):
        seq = f"GOPR035{k}"
        name = f"{seq}_frame_000159"
        _save(_rgb(6, 6, k), src / "rgb_anon" / cond / "val" / seq / f"{name}_rgb_anon.png")
        _save(np.roll(ALL_IDS, k), src / "gt" / cond / "val" / seq / f"{name}_gt_labelIds.png")
    assert convert_acdc(src, out, "val", conditions=("night", "fog")) == 2
    assert list_ids(out, "acdc_night", "val") == ["GOPR0350_frame_000159"]
    _, lbl = read_sample(out, "acdc_fog", "val", "GOPR0351_frame_000159", 19)
    np.testing.assert_array_equal(lbl, _expected(np.roll(ALL_IDS, 1), CS_TRAIN))
    with pytest.raises(DataError, match="snow"):
        convert_acdc(src, out, "val", conditions=("snow",))
    with pytest.raises(ValueError, match="ACDC condition 'dusk'"):
        convert_acdc(src, out, "val", conditions=("dusk",))
