"""Aligned transforms on ``(image uint8 [H, W, 3], label uint8 [H, W] | None)`` pairs.

Image and label always undergo the same geometry; labels are resampled with
NEAREST only (interpolating ids would invent classes at boundaries) and padded
with 255 (ignore). Also the conversions to and from diffusion space
(``float32 [N, 3, H, W]`` in [-1, 1], ``x = img / 127.5 - 1``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np
from PIL import Image

from dass_ray.data.layout import IGNORE_INDEX

if TYPE_CHECKING:  # torch is imported lazily: the layout readers should not pay for it
    import torch

    from dass_ray.config import DataConfig

Pair = tuple[np.ndarray, Optional[np.ndarray]]


def _hw(size: Sequence[int]) -> tuple[int, int]:
    if len(size) != 2 or any(int(s) <= 0 for s in size):
        raise ValueError(f"size must be (height, width) of positive integers, got {size!r}")
    return int(size[0]), int(size[1])


def _check_pair(img: np.ndarray, lbl: Optional[np.ndarray]) -> None:
    if img.ndim != 3 or img.shape[2] != 3 or img.dtype != np.uint8:
        raise ValueError(f"image must be uint8 [H, W, 3], got {img.dtype} {img.shape}")
    if lbl is not None and lbl.shape != img.shape[:2]:
        raise ValueError(f"label shape {lbl.shape} does not match image {img.shape[:2]}")


def resize_pair(img: np.ndarray, lbl: Optional[np.ndarray], size: Sequence[int]) -> Pair:
    """Resize to ``size = (H, W)``: bilinear for the image, NEAREST for the label."""
    _check_pair(img, lbl)
    h, w = _hw(size)
    if img.shape[:2] == (h, w):
        return img, lbl
    out_img = np.asarray(Image.fromarray(img).resize((w, h), Image.BILINEAR), dtype=np.uint8)
    out_lbl = None
    if lbl is not None:
        out_lbl = np.asarray(Image.fromarray(np.ascontiguousarray(lbl, dtype=np.uint8)).resize((w, h), Image.NEAREST),
                             dtype=np.uint8)
    return out_img, out_lbl


def random_crop_pair(img: np.ndarray, lbl: Optional[np.ndarray], size: Sequence[int], rng: np.random.Generator) -> Pair:
    """Crop the same random ``(H, W)`` window from both.

    A side smaller than the crop is padded first at the bottom / right, the image
    with 0 and the label with 255, so padding never counts as a class.
    """
    _check_pair(img, lbl)
    h, w = _hw(size)
    ph, pw = max(h - img.shape[0], 0), max(w - img.shape[1], 0)
    if ph or pw:
        img = np.pad(img, ((0, ph), (0, pw), (0, 0)), constant_values=0)
        if lbl is not None:
            lbl = np.pad(lbl, ((0, ph), (0, pw)), constant_values=IGNORE_INDEX)
    y = int(rng.integers(0, img.shape[0] - h + 1))
    x = int(rng.integers(0, img.shape[1] - w + 1))
    out_lbl = None if lbl is None else np.ascontiguousarray(lbl[y : y + h, x : x + w])
    return np.ascontiguousarray(img[y : y + h, x : x + w]), out_lbl


def hflip_pair(img: np.ndarray, lbl: Optional[np.ndarray]) -> Pair:
    """Mirror both left-right."""
    _check_pair(img, lbl)
    return np.ascontiguousarray(img[:, ::-1]), None if lbl is None else np.ascontiguousarray(lbl[:, ::-1])


@dataclass(frozen=True)
class PairTransform:
    """Resize (always), then random crop and flip (training only), as a DataConfig asks.

    Build with :meth:`from_config`. The randomness comes only from the Generator
    passed to each call, so a caller that seeds it per sample gets results
    independent of batching and worker placement.
    """

    image_size: Optional[tuple[int, int]] = None
    crop_size: Optional[tuple[int, int]] = None
    flip: bool = False
    train: bool = True

    def __post_init__(self) -> None:
        if self.image_size is not None:
            object.__setattr__(self, "image_size", _hw(self.image_size))
        if self.crop_size is not None:
            object.__setattr__(self, "crop_size", _hw(self.crop_size))

    @classmethod
    def from_config(cls, cfg: DataConfig, train: bool = True) -> PairTransform:
        """From ``data.image_size``, ``data.crop_size``, ``data.flip``; crop and flip apply only when ``train``."""
        return cls(
            image_size=tuple(cfg.image_size) if cfg.image_size is not None else None,
            crop_size=tuple(cfg.crop_size) if cfg.crop_size is not None else None,
            flip=cfg.flip,
            train=train,
        )

    @property
    def is_identity(self) -> bool:
        return self.image_size is None and (not self.train or (self.crop_size is None and not self.flip))

    def __call__(self, img: np.ndarray, lbl: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        if self.image_size is not None:
            img, lbl = resize_pair(img, lbl, self.image_size)
        if self.train:
            if self.crop_size is not None:
                img, lbl = random_crop_pair(img, lbl, self.crop_size, rng)
            # The coin is drawn only when flip is on: a config without flip keeps the
            # same random stream (and so the same crops) as before flip existed.
            if self.flip and rng.random() < 0.5:
                img, lbl = hflip_pair(img, lbl)
        return img, lbl

    def apply_batch(self, images: np.ndarray, labels: Optional[np.ndarray], rng: np.random.Generator) -> Pair:
        """Apply to each sample of ``images uint8 [N, H, W, 3]`` / ``labels uint8 [N, H, W]``; returns stacked arrays."""
        if self.is_identity:
            return images, labels
        outs = [self(images[i], None if labels is None else labels[i], rng) for i in range(len(images))]
        out_img = np.stack([o[0] for o in outs]) if outs else images
        out_lbl = None if labels is None else (np.stack([o[1] for o in outs]) if outs else labels)
        return out_img, out_lbl


def to_diffusion(images: "np.ndarray | torch.Tensor") -> "torch.Tensor":
    """``uint8 [N, H, W, 3]`` -> ``float32 [N, 3, H, W]`` in [-1, 1] (``x = img / 127.5 - 1``)."""
    import torch

    if isinstance(images, np.ndarray) and not images.flags.writeable:
        # Ray Data hands out read-only views of its blocks; torch warns on them. The result is a
        # new float tensor anyway, so a uint8 copy costs nothing the conversion does not.
        images = images.copy()
    t = torch.as_tensor(images)
    if t.ndim != 4 or t.shape[-1] != 3 or t.dtype != torch.uint8:
        raise ValueError(f"to_diffusion expects uint8 [N, H, W, 3], got {t.dtype} {tuple(t.shape)}")
    return t.permute(0, 3, 1, 2).to(torch.float32).div(127.5).sub(1.0).contiguous()


def from_diffusion(x: "torch.Tensor") -> np.ndarray:
    """``float [N, 3, H, W]`` in [-1, 1] -> ``uint8 [N, H, W, 3]`` (rounded, clipped)."""
    import torch

    if x.ndim != 4 or x.shape[1] != 3:
        raise ValueError(f"from_diffusion expects [N, 3, H, W], got {tuple(x.shape)}")
    y = ((x.detach().to(torch.float32).cpu() + 1.0) * 127.5).round().clamp(0, 255).to(torch.uint8)
    return y.permute(0, 2, 3, 1).contiguous().numpy()
