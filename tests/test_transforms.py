"""Aligned pair transforms and diffusion-space conversions."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dass_ray.config import DataConfig
from dass_ray.data.transforms import (
    PairTransform,
    from_diffusion,
    hflip_pair,
    random_crop_pair,
    resize_pair,
    to_diffusion,
)


def _pair(h: int = 6, w: int = 8) -> tuple[np.ndarray, np.ndarray]:
    # The image encodes each pixel's position, so alignment with the label is checkable.
    yy, xx = np.mgrid[0:h, 0:w]
    img = np.stack([yy * 10, xx * 10, np.full_like(yy, 7)], axis=-1).astype(np.uint8)
    lbl = (yy * w + xx).astype(np.uint8)
    return img, lbl


def test_resize_nearest_labels_bilinear_image() -> None:
    img, lbl = _pair(4, 4)
    lbl = np.array([[0, 0, 3, 3], [0, 0, 3, 3], [1, 1, 255, 255], [1, 1, 255, 255]], np.uint8)
    ri, rl = resize_pair(img, lbl, (8, 8))
    assert ri.shape == (8, 8, 3) and rl.shape == (8, 8) and rl.dtype == np.uint8
    assert set(np.unique(rl)) == {0, 1, 3, 255}  # nearest: no blended ids
    np.testing.assert_array_equal(rl, np.kron(lbl, np.ones((2, 2), np.uint8)))
    # bilinear creates in-between values on the image
    assert len(np.unique(ri[:, :, 1])) > len(np.unique(img[:, :, 1]))
    down_i, down_l = resize_pair(ri, rl, (4, 4))
    np.testing.assert_array_equal(down_l, lbl)
    assert resize_pair(img, None, (2, 3))[1] is None


def test_random_crop_aligned_and_seeded() -> None:
    img, lbl = _pair(6, 8)
    ci, cl = random_crop_pair(img, lbl, (3, 4), np.random.default_rng(0))
    assert ci.shape == (3, 4, 3) and cl.shape == (3, 4)
    y0, x0 = ci[0, 0, 0] // 10, ci[0, 0, 1] // 10
    np.testing.assert_array_equal(cl, lbl[y0 : y0 + 3, x0 : x0 + 4])
    np.testing.assert_array_equal(ci, img[y0 : y0 + 3, x0 : x0 + 4])
    ci2, cl2 = random_crop_pair(img, lbl, (3, 4), np.random.default_rng(0))
    np.testing.assert_array_equal(cl, cl2)


def test_random_crop_pads_with_ignore() -> None:
    img, lbl = _pair(3, 3)
    ci, cl = random_crop_pair(img, lbl, (5, 4), np.random.default_rng(1))
    assert ci.shape == (5, 4, 3) and cl.shape == (5, 4)
    np.testing.assert_array_equal(cl[:3, :3], lbl)
    assert (cl[3:, :] == 255).all() and (cl[:, 3:] == 255).all()
    assert (ci[3:, :] == 0).all() and (ci[:, 3:] == 0).all()


def test_hflip() -> None:
    img, lbl = _pair()
    fi, fl = hflip_pair(img, lbl)
    np.testing.assert_array_equal(fl, lbl[:, ::-1])
    np.testing.assert_array_equal(fi, img[:, ::-1])
    np.testing.assert_array_equal(hflip_pair(fi, fl)[1], lbl)


def test_pair_transform_from_config() -> None:
    cfg = DataConfig(image_size=[12, 16], crop_size=[6, 6], flip=True)
    t = PairTransform.from_config(cfg)
    img, lbl = _pair(6, 8)
    flips = 0
    rng = np.random.default_rng(3)
    for _ in range(20):
        ti, tl = t(img, lbl, rng)
        assert ti.shape == (6, 6, 3) and tl.shape == (6, 6)
        # after a 2x nearest upsample, ids along a row step by <= 1 column, either way when flipped
        d = np.diff(tl.astype(int), axis=1)
        flips += int((d < 0).any())
    assert 0 < flips < 20  # flip is random, not always / never
    ev = PairTransform.from_config(cfg, train=False)
    ei, el = ev(img, lbl, np.random.default_rng(0))
    assert ei.shape == (12, 16, 3)  # eval: resize only
    assert PairTransform.from_config(DataConfig()).is_identity
    bi, bl = t.apply_batch(np.stack([img] * 3), np.stack([lbl] * 3), np.random.default_rng(0))
    assert bi.shape == (3, 6, 6, 3) and bl.shape == (3, 6, 6)


def test_diffusion_roundtrip() -> None:
    imgs = np.random.default_rng(0).integers(0, 256, size=(2, 5, 7, 3), dtype=np.uint8)
    x = to_diffusion(imgs)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 5, 7)
    assert float(x.min()) >= -1 and float(x.max()) <= 1
    assert float(x[1, 2, 3, 4]) == pytest.approx(imgs[1, 3, 4, 2] / 127.5 - 1, abs=1e-6)
    np.testing.assert_array_equal(from_diffusion(x), imgs)
    # out-of-range values clip, halves round
    y = from_diffusion(torch.tensor([-3.0, 3.0, 0.0, 1 / 127.5 * 0.4]).view(1, 1, 1, 4).expand(1, 3, 1, 4))
    assert y.dtype == np.uint8 and y[0, 0, :, 0].tolist() == [0, 255, 128, 128]
    with pytest.raises(ValueError, match="uint8"):
        to_diffusion(imgs.astype(np.float32))
