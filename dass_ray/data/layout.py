"""The on-disk layout shared by every dataset, and validated reading of it.

``<root>/<domain>/<split>/images/<id>.png`` (RGB, or grey which is replicated)
and ``<root>/<domain>/<split>/labels/<id>.png`` (single channel, uint8 train ids,
255 = ignore). Every problem with a sample raises :class:`DataError` whose
message names the file and the problem; ``skip_bad`` turns those errors into
counted skips, never into a silently wrong label.

Target-train data is read with ``require_labels=False``: that path never opens,
nor lists, a label file, so no training code can reach target labels by
accident.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

IGNORE_INDEX = 255
IMAGE_EXT = ".png"


class DataError(ValueError):
    """A dataset directory or sample is missing or inconsistent. The message names the path."""


def split_dir(root: str | os.PathLike, domain: str, split: str) -> Path:
    """``<root>/<domain>/<split>`` (not checked)."""
    return Path(root) / domain / split


def image_path(root: str | os.PathLike, domain: str, split: str, id: str) -> Path:
    return split_dir(root, domain, split) / "images" / f"{id}{IMAGE_EXT}"


def label_path(root: str | os.PathLike, domain: str, split: str, id: str) -> Path:
    return split_dir(root, domain, split) / "labels" / f"{id}{IMAGE_EXT}"


def list_ids(root: str | os.PathLike, domain: str, split: str, check_labels: bool = False) -> list[str]:
    """Sorted ids of the images of a split.

    Raises :class:`DataError` naming the directory when it does not exist or holds
    no ``.png`` image. With ``check_labels`` also raises naming the images that
    have no label file (the default leaves that to :func:`read_sample`, so that
    ``skip_bad`` can skip them one by one and label-free reads never look at
    ``labels/``).
    """
    d = split_dir(root, domain, split) / "images"
    if not d.is_dir():
        raise DataError(f"{d}: image directory does not exist (expected <root>/<domain>/<split>/images/<id>.png)")
    ids = sorted(p.name[: -len(IMAGE_EXT)] for p in d.iterdir() if p.name.endswith(IMAGE_EXT) and not p.name.startswith("."))
    if not ids:
        raise DataError(f"{d}: split is empty (no {IMAGE_EXT} images)")
    if check_labels:
        ld = d.parent / "labels"
        have = {p.name[: -len(IMAGE_EXT)] for p in ld.iterdir()} if ld.is_dir() else set()
        missing = [i for i in ids if i not in have]
        if missing:
            shown = ", ".join(str(d / f"{i}{IMAGE_EXT}") for i in missing[:5])
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise DataError(f"{ld}: {len(missing)} image(s) without a label: {shown}{more}")
    return ids


def _open_checked(path: Path, what: str) -> Image.Image:
    """Open ``path`` and decode it fully, so truncation and corruption fail here, not later."""
    if not path.is_file():
        raise DataError(f"{path}: {what} file is missing")
    try:
        # verify() checks the PNG chunk CRCs without decoding; it leaves the object
        # unusable, so the file is opened again and decoded with load().
        with Image.open(path) as im:
            im.verify()
        im = Image.open(path)
        im.load()
    except DataError:
        raise
    except Exception as e:  # PIL raises OSError, SyntaxError, ValueError, struct.error ... on bad files
        raise DataError(f"{path}: unreadable or truncated {what} ({type(e).__name__}: {e})") from e
    return im


def read_image(path: str | os.PathLike) -> np.ndarray:
    """Read an image file as ``uint8 [H, W, 3]``; grey / palette / RGBA become RGB."""
    path = Path(path)
    im = _open_checked(path, "image")
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "F"):
        # Converting would clip at 255 and give a silently wrong picture.
        raise DataError(f"{path}: image has {im.mode} (16-bit / float) pixels; expected an 8-bit RGB or grey PNG")
    if im.mode != "RGB":
        im = im.convert("RGB")
    return np.asarray(im, dtype=np.uint8).copy()


def read_label(path: str | os.PathLike, num_classes: int) -> np.ndarray:
    """Read a label file as ``uint8 [H, W]`` train ids, checking every id is in ``0..num_classes-1`` or 255."""
    path = Path(path)
    im = _open_checked(path, "label")
    if im.mode not in ("L", "P", "I", "I;16", "I;16B", "I;16L"):
        raise DataError(f"{path}: label has mode {im.mode}; expected a single-channel PNG of train ids "
                        "(a colour-coded label must be converted first)")
    lbl = np.asarray(im)
    bad = (lbl >= num_classes) & (lbl != IGNORE_INDEX)
    bad |= lbl < 0
    if bad.any():
        vals = np.unique(lbl[bad])
        shown = ", ".join(str(int(v)) for v in vals[:10])
        raise DataError(f"{path}: label ids out of range: {shown} ({int(bad.sum())} pixels); "
                        f"allowed 0..{num_classes - 1} and {IGNORE_INDEX} (ignore)")
    return lbl.astype(np.uint8)


def read_sample(
    root: str | os.PathLike, domain: str, split: str, id: str, num_classes: int, with_label: bool = True
) -> tuple[np.ndarray, Optional[np.ndarray]]:
    """Read one validated sample.

    Returns ``(image uint8 [H, W, 3], label uint8 [H, W])``; with ``with_label=False``
    the label file is not touched and ``None`` is returned in its place.
    Raises :class:`DataError` naming the file: missing label, unreadable or
    truncated file, image/label size mismatch, label ids outside
    ``{0..num_classes-1, 255}``.
    """
    ip = image_path(root, domain, split, id)
    img = read_image(ip)
    if not with_label:
        return img, None
    lp = label_path(root, domain, split, id)
    lbl = read_label(lp, num_classes)
    if lbl.shape != img.shape[:2]:
        raise DataError(f"{lp}: label size {lbl.shape[1]}x{lbl.shape[0]} (WxH) does not match "
                        f"image {ip} size {img.shape[1]}x{img.shape[0]}")
    return img, lbl


@dataclass
class Split:
    """A split loaded in memory.

    ``images``: ``uint8 [N, H, W, 3]``; ``labels``: ``uint8 [N, H, W]`` or None when
    read without labels; ``skipped``: ``(id, reason)`` of every sample left out.
    """

    ids: list[str]
    images: np.ndarray
    labels: Optional[np.ndarray]
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.shape[-1] != 3 or self.images.dtype != np.uint8:
            raise ValueError(f"Split.images must be uint8 [N, H, W, 3], got {self.images.dtype} {self.images.shape}")
        if len(self.ids) != len(self.images):
            raise ValueError(f"Split: {len(self.ids)} ids for {len(self.images)} images")
        if self.labels is not None and self.labels.shape != self.images.shape[:3]:
            raise ValueError(f"Split.labels shape {self.labels.shape} does not match images {self.images.shape}")

    def __len__(self) -> int:
        return len(self.ids)


def load_split(
    root: str | os.PathLike,
    domain: str,
    split: str,
    num_classes: int,
    skip_bad: bool = False,
    max_samples: Optional[int] = None,
    require_labels: bool = True,
    image_size: Optional[Sequence[int]] = None,
) -> Split:
    """Load a whole split into memory (sorted ids).

    ``max_samples`` keeps the first that many good samples. ``image_size``
    ``(H, W)`` resizes every sample (bilinear image, nearest label); without it
    all samples must have the size of the first, else :class:`DataError` names
    the file. ``require_labels=False`` reads images only and never opens label
    files (target-train data for the DDPM). With ``skip_bad`` unreadable or
    inconsistent samples are left out and listed in ``Split.skipped``.
    """
    from dass_ray.data.transforms import resize_pair  # local: transforms imports this module's types

    if max_samples is not None and max_samples < 1:
        raise ValueError(f"max_samples must be >= 1 or None, got {max_samples}")
    ids = list_ids(root, domain, split)
    if require_labels:
        # a label whose image is missing is a missing image (named by read_sample, or skipped)
        ld = split_dir(root, domain, split) / "labels"
        if ld.is_dir():
            known = set(ids)
            orphans = [p.name[: -len(IMAGE_EXT)] for p in ld.iterdir()
                       if p.name.endswith(IMAGE_EXT) and not p.name.startswith(".") and p.name[: -len(IMAGE_EXT)] not in known]
            ids = sorted(ids + orphans)
    size = tuple(int(s) for s in image_size) if image_size is not None else None
    keep: list[str] = []
    images: Optional[np.ndarray] = None
    labels: Optional[np.ndarray] = None
    skipped: list[tuple[str, str]] = []
    for id in ids:
        if max_samples is not None and len(keep) >= max_samples:
            break
        try:
            img, lbl = read_sample(root, domain, split, id, num_classes, with_label=require_labels)
        except DataError as e:
            if not skip_bad:
                raise
            skipped.append((id, str(e)))
            continue
        if size is not None and img.shape[:2] != size:
            img, lbl = resize_pair(img, lbl, size)
        if images is None:
            # Preallocate from the first sample: stacking a list would hold the split twice.
            n = len(ids) if max_samples is None else min(len(ids), max_samples)
            images = np.empty((n,) + img.shape, np.uint8)
            labels = np.empty((n,) + img.shape[:2], np.uint8) if require_labels else None
        elif img.shape != images.shape[1:]:
            # A size difference is a property of the dataset, not a corrupt sample: fail even with skip_bad.
            first = image_path(root, domain, split, keep[0])
            raise DataError(f"{image_path(root, domain, split, id)}: size {img.shape[1]}x{img.shape[0]} (WxH) differs from "
                            f"{first} ({images.shape[2]}x{images.shape[1]}); set data.image_size to resize")
        images[len(keep)] = img
        if labels is not None:
            labels[len(keep)] = lbl
        keep.append(id)
    if images is None:
        d = split_dir(root, domain, split)
        reason = f"; first problem: {skipped[0][1]}" if skipped else ""
        raise DataError(f"{d}: no readable samples ({len(skipped)} skipped){reason}")
    images = images[: len(keep)]
    if labels is not None:
        labels = labels[: len(keep)]
    return Split(ids=keep, images=images, labels=labels, skipped=skipped)
