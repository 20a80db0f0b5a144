"""The common layout: listing, validated reading, load_split, skip_bad, and the Ray Data reader."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dass_ray.data.layout import DataError, label_path, list_ids, load_split, read_sample, split_dir

NC = 5


def _write(root: Path, domain: str, split: str, id: str, img: np.ndarray, lbl: np.ndarray | None) -> None:
    d = split_dir(root, domain, split)
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "labels").mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(d / "images" / f"{id}.png")
    if lbl is not None:
        Image.fromarray(lbl).save(d / "labels" / f"{id}.png")


def _sample(seed: int, h: int = 6, w: int = 8) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(h, w, 3), dtype=np.uint8)
    lbl = rng.integers(0, NC, size=(h, w), dtype=np.uint8)
    lbl[0, 0] = 255  # ignore is allowed
    return img, lbl


@pytest.fixture
def good(tmp_path: Path) -> Path:
    """A split of 4 valid samples: ids a0..a3."""
    for i in range(4):
        _write(tmp_path, "dom", "train", f"a{i}", *_sample(i))
    return tmp_path


def test_read_sample_roundtrip(good: Path) -> None:
    assert list_ids(good, "dom", "train") == ["a0", "a1", "a2", "a3"]
    img, lbl = read_sample(good, "dom", "train", "a2", NC)
    exp_img, exp_lbl = _sample(2)
    assert img.dtype == np.uint8 and img.shape == (6, 8, 3) and lbl.shape == (6, 8)
    np.testing.assert_array_equal(img, exp_img)
    np.testing.assert_array_equal(lbl, exp_lbl)


def test_grey_image_becomes_rgb(tmp_path: Path) -> None:
    grey = np.arange(48, dtype=np.uint8).reshape(6, 8)
    _write(tmp_path, "dom", "train", "g", grey, np.zeros((6, 8), np.uint8))
    img, _ = read_sample(tmp_path, "dom", "train", "g", NC)
    assert img.shape == (6, 8, 3)
    for c in range(3):
        np.testing.assert_array_equal(img[:, :, c], grey)


def test_missing_label(good: Path) -> None:
    p = label_path(good, "dom", "train", "a1")
    p.unlink()
    with pytest.raises(DataError, match="a1.png.*label file is missing"):
        read_sample(good, "dom", "train", "a1", NC)
    with pytest.raises(DataError, match="without a label.*a1.png"):
        list_ids(good, "dom", "train", check_labels=True)


def test_truncated_png(good: Path) -> None:
    p = split_dir(good, "dom", "train") / "images" / "a2.png"
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError) as e:
        read_sample(good, "dom", "train", "a2", NC)
    assert str(p) in str(e.value) and "truncated" in str(e.value)


def test_size_mismatch(tmp_path: Path) -> None:
    img, _ = _sample(0)
    _write(tmp_path, "dom", "train", "m", img, np.zeros((5, 8), np.uint8))
    with pytest.raises(DataError) as e:
        read_sample(tmp_path, "dom", "train", "m", NC)
    msg = str(e.value)
    assert str(label_path(tmp_path, "dom", "train", "m")) in msg and "does not match" in msg


def test_label_id_out_of_range(good: Path) -> None:
    img, lbl = _sample(1)
    lbl[2, 3] = NC  # first invalid id; 255 elsewhere stays valid
    lbl[4, 4] = 17
    _write(good, "dom", "train", "a1", img, lbl)
    with pytest.raises(DataError) as e:
        read_sample(good, "dom", "train", "a1", NC)
    msg = str(e.value)
    assert str(label_path(good, "dom", "train", "a1")) in msg
    assert "out of range: 5, 17" in msg and "2 pixels" in msg


def test_colour_label_rejected(tmp_path: Path) -> None:
    img, _ = _sample(0)
    _write(tmp_path, "dom", "train", "c", img, img)  # an RGB "label"
    with pytest.raises(DataError, match="c.png: label has mode RGB"):
        read_sample(tmp_path, "dom", "train", "c", NC)


def test_empty_split(tmp_path: Path) -> None:
    d = split_dir(tmp_path, "dom", "train") / "images"
    d.mkdir(parents=True)
    (d / "notes.txt").write_text("not an image")
    with pytest.raises(DataError) as e:
        list_ids(tmp_path, "dom", "train")
    assert str(d) in str(e.value) and "empty" in str(e.value)
    with pytest.raises(DataError, match="empty"):
        load_split(tmp_path, "dom", "train", NC)


def test_wrong_directory(good: Path) -> None:
    with pytest.raises(DataError) as e:
        load_split(good, "dom", "vall", NC)
    assert str(good / "dom" / "vall" / "images") in str(e.value) and "does not exist" in str(e.value)


def test_load_split(good: Path) -> None:
    s = load_split(good, "dom", "train", NC)
    assert s.ids == ["a0", "a1", "a2", "a3"] and len(s) == 4
    assert s.images.shape == (4, 6, 8, 3) and s.images.dtype == np.uint8
    assert s.labels is not None and s.labels.shape == (4, 6, 8) and s.skipped == []
    np.testing.assert_array_equal(s.labels[3], _sample(3)[1])
    s2 = load_split(good, "dom", "train", NC, max_samples=2)
    assert s2.ids == ["a0", "a1"] and s2.images.shape[0] == 2


def test_skip_bad_counts_every_problem(good: Path) -> None:
    d = split_dir(good, "dom", "train")
    label_path(good, "dom", "train", "a0").unlink()  # missing label
    p = d / "images" / "a1.png"
    p.write_bytes(p.read_bytes()[:40])  # truncated
    img, lbl = _sample(2)
    lbl[0, 1] = 9
    _write(good, "dom", "train", "a2", img, lbl)  # out of range
    _write(good, "dom", "train", "a4", img, np.zeros((6, 7), np.uint8))  # size mismatch
    with pytest.raises(DataError):
        load_split(good, "dom", "train", NC)
    s = load_split(good, "dom", "train", NC, skip_bad=True)
    assert s.ids == ["a3"]
    assert [i for i, _ in s.skipped] == ["a0", "a1", "a2", "a4"]
    reasons = dict(s.skipped)
    assert "label file is missing" in reasons["a0"] and "truncated" in reasons["a1"]
    assert "out of range" in reasons["a2"] and "does not match" in reasons["a4"]
    # max_samples counts good samples only
    s1 = load_split(good, "dom", "train", NC, skip_bad=True, max_samples=1)
    assert s1.ids == ["a3"]


def test_all_bad_is_an_error_even_with_skip(good: Path) -> None:
    for i in range(4):
        label_path(good, "dom", "train", f"a{i}").unlink()
    with pytest.raises(DataError, match="no readable samples.*4 skipped"):
        load_split(good, "dom", "train", NC, skip_bad=True)


def test_images_only_never_opens_labels(good: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Corrupt every label: an images-only read must not notice, nor even open them.
    for i in range(4):
        label_path(good, "dom", "train", f"a{i}").write_bytes(b"garbage")
    opened: list[str] = []
    real_open = Image.open

    def spy(fp, *a, **k):
        opened.append(str(fp))
        return real_open(fp, *a, **k)

    monkeypatch.setattr(Image, "open", spy)
    s = load_split(good, "dom", "train", NC, require_labels=False)
    assert s.labels is None and s.images.shape == (4, 6, 8, 3)
    assert opened and not any("labels" in p for p in opened)
    # labels dir may even be absent
    monkeypatch.undo()
    for p in (split_dir(good, "dom", "train") / "labels").iterdir():
        p.unlink()
    (split_dir(good, "dom", "train") / "labels").rmdir()
    assert load_split(good, "dom", "train", NC, require_labels=False).ids == ["a0", "a1", "a2", "a3"]


def test_mixed_sizes_error_or_resize(good: Path) -> None:
    _write(good, "dom", "train", "b0", *_sample(7, h=10, w=12))
    with pytest.raises(DataError) as e:
        load_split(good, "dom", "train", NC)
    assert "b0.png" in str(e.value) and "image_size" in str(e.value)
    s = load_split(good, "dom", "train", NC, image_size=(4, 4))
    assert s.images.shape == (5, 4, 4, 3) and s.labels.shape == (5, 4, 4)
    # nearest resampling keeps label ids valid
    assert set(np.unique(s.labels)) <= set(range(NC)) | {255}


# --------------------------------------------------------------------------- Ray Data reader

def test_ray_reader_rows(good: Path, ray_local) -> None:
    from dass_ray.data.ray_reader import read_layout_dataset

    rows = sorted(read_layout_dataset(good, "dom", "train", NC).take_all(), key=lambda r: r["id"])
    assert [r["id"] for r in rows] == ["a0", "a1", "a2", "a3"]
    for i, r in enumerate(rows):
        img, lbl = _sample(i)
        np.testing.assert_array_equal(r["image"], img)
        np.testing.assert_array_equal(r["label"], lbl)
        assert r["image"].dtype == np.uint8 and r["label"].dtype == np.uint8
    no_lbl = read_layout_dataset(good, "dom", "train", NC, require_labels=False).take_all()
    assert len(no_lbl) == 4 and all("label" not in r for r in no_lbl)


def test_ray_reader_errors_and_skip(good: Path, ray_local) -> None:
    from dass_ray.data.ray_reader import read_layout_dataset

    with pytest.raises(DataError, match="does not exist"):
        read_layout_dataset(good, "dom", "nope", NC)  # fails in the driver, before any task
    bad = label_path(good, "dom", "train", "a2")
    bad.unlink()
    with pytest.raises(Exception) as e:
        read_layout_dataset(good, "dom", "train", NC).take_all()
    assert str(bad) in str(e.value) and "label file is missing" in str(e.value)
    rows = read_layout_dataset(good, "dom", "train", NC, skip_bad=True).take_all()
    assert sorted(r["id"] for r in rows) == ["a0", "a1", "a3"]
