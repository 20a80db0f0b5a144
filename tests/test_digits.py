"""The built-in digits benchmark: counts, construction, disjoint splits, determinism, atomic build."""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from dass_ray.data import digits as D
from dass_ray.data.layout import DataError, list_ids, load_split, read_sample

SPLITS = [("source", "train", 2500), ("target", "train", 2000), ("target", "val", 500)]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("digits") / "digits"
    return out, D.build_digits(out, seed=0)


@pytest.fixture(scope="module")
def mnist() -> tuple[np.ndarray, np.ndarray]:
    return D.load_mnist5k()


def _digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def test_counts_shapes_labels(built) -> None:
    out, m = built
    assert m["seed"] == 0 and m["num_classes"] == 11
    assert m["class_names"] == ["background"] + [str(d) for d in range(10)]
    assert len(m["photo_sources"]) == 13
    for domain, split, n in SPLITS:
        assert m["counts"][f"{domain}/{split}"] == n
        ids = list_ids(out, domain, split, check_labels=True)
        assert len(ids) == n and ids[0] == "000000" and ids[-1] == f"{n - 1:06d}"
    s = load_split(out, "target", "val", 11)
    assert s.images.shape == (500, 32, 32, 3) and s.images.dtype == np.uint8
    assert s.labels.dtype == np.uint8 and s.labels.max() <= 10 and s.labels.min() == 0
    assert set(np.unique(s.labels)) == set(range(11))
    # stratified: 50 of each digit in val
    assert np.bincount(m["samples"]["target/val"]["digit"], minlength=10).tolist() == [50] * 10


def test_no_mnist_image_in_two_splits(built, mnist) -> None:
    _, m = built
    idx = [m["samples"][f"{d}/{s}"]["mnist_index"] for d, s, _ in SPLITS]
    allidx = np.concatenate(idx)
    assert len(allidx) == 5000 and len(np.unique(allidx)) == 5000  # every row once, none twice
    _, cls = mnist
    for d, s, _ in SPLITS:
        rec = m["samples"][f"{d}/{s}"]
        assert rec["digit"] == cls[rec["mnist_index"]].tolist()


def test_samples_reconstruct_from_source(built, mnist) -> None:
    out, m = built
    digits, cls = mnist
    photos = D.load_photos()
    for domain, split, _ in SPLITS:
        rec = m["samples"][f"{domain}/{split}"]
        for i in (0, 7, 123):
            img, lbl = read_sample(out, domain, split, f"{i:06d}", 11)
            j = rec["mnist_index"][i]
            d32 = np.zeros((32, 32), np.uint8)
            d32[2:30, 2:30] = digits[j]  # padded by 2 on each side
            fg = d32 / 255.0 > 0.5
            np.testing.assert_array_equal(lbl > 0, fg)  # label > 0 exactly where the digit > 0.5
            assert (lbl[fg] == cls[j] + 1).all()
            if domain == "source":
                np.testing.assert_array_equal(img, np.repeat(d32[:, :, None], 3, axis=2))
            else:
                photo = photos[rec["photo"][i]]
                y, x = rec["patch_yx"][i]
                patch = photo[y : y + 32, x : x + 32].astype(int)
                np.testing.assert_array_equal(img, np.abs(patch - d32[:, :, None].astype(int)))


def test_backgrounds(built, mnist) -> None:
    out, m = built
    digits, _ = mnist
    src = load_split(out, "source", "train", 11, max_samples=300)
    d32 = np.pad(digits[m["samples"]["source/train"]["mnist_index"][:300]], ((0, 0), (2, 2), (2, 2)))
    assert (src.images[d32 == 0] == 0).all()  # source background is black
    assert (src.images[:, :2] == 0).all() and (src.images[:, :, -2:] == 0).all()
    tgt = load_split(out, "target", "train", 11, require_labels=False)
    assert tgt.images.mean() / 255 > 0.2  # photo backgrounds, not black
    assert tgt.images[:, :2].mean() / 255 > 0.2


def test_same_seed_byte_identical_and_reuse(built, tmp_path: Path) -> None:
    out, m = built
    again = tmp_path / "again"
    m2 = D.build_digits(again, seed=0)
    assert m2 == m
    assert _digests(again) == _digests(out)
    # a complete build is returned, not rebuilt
    mtime = (again / "digits.json").stat().st_mtime_ns
    assert D.build_digits(again, seed=0) == m
    assert (again / "digits.json").stat().st_mtime_ns == mtime


def test_other_seed(built, mnist) -> None:
    out, m = built
    _, cls = mnist
    a, b = D.split_indices(cls, 0), D.split_indices(cls, 1)
    assert a[0].tolist() == m["samples"]["source/train"]["mnist_index"]
    assert set(a[0].tolist()) != set(b[0].tolist())
    for x in b:
        assert len(x) in (2500, 2000, 500)
    with pytest.raises(DataError, match="built with seed 0, asked for seed 1"):
        D.build_digits(out, seed=1)


def test_interrupted_build_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = {"n": 0}
    real = D._save_png

    def flaky(arr, path):
        calls["n"] += 1
        if calls["n"] == 300:
            raise KeyboardInterrupt  # as if killed mid-way
        real(arr, path)

    monkeypatch.setattr(D, "_save_png", flaky)
    out = tmp_path / "digits"
    with pytest.raises(KeyboardInterrupt):
        D.build_digits(out, seed=0)
    assert not out.exists()
    assert os.listdir(tmp_path) == []  # the partial directory is removed too


def test_refuses_foreign_or_incomplete_directory(tmp_path: Path, built) -> None:
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("x")
    with pytest.raises(DataError, match=r"mine: exists but is not a digits build"):
        D.build_digits(foreign, seed=0)
    # a build with a file removed is detected from the manifest counts
    out, _ = built
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    (copy / "target" / "val" / "labels" / "000003.png").unlink()
    with pytest.raises(DataError, match=r"target/val/labels: 499 files, manifest says 500"):
        D.build_digits(copy, seed=0)
