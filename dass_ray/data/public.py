"""Converters from the public datasets' own layouts onto the common layout.

Each ``convert_<name>(src_root, out_root, split, ...) -> count`` writes
``<out_root>/<domain>/<split>/images/<id>.png`` (the source PNG's bytes when it
is already an 8-bit RGB PNG at the wanted size, else re-encoded) and
``.../labels/<id>.png`` (uint8 train ids, 255 = ignore) and returns the number
of samples written. A sample whose label is missing, unreadable or of another
size than its image raises :class:`DataError` naming the files; with
``skip_bad=True`` it is left out and its ``(id, reason)`` appended to
``skipped`` when a list is passed.

Id mappings (module constants, 256-entry lookup tables, 255 elsewhere):

- Cityscapes ``labelIds`` -> 19 train ids (cityscapesScripts ``labels.py``);
  used for Cityscapes gtFine, GTA5 and ACDC labels.
- SYNTHIA RAND-CITYSCAPES class ids -> 16 classes (the DASS protocol: the 19
  Cityscapes classes less terrain, truck, train), evaluated on 16 or on the
  13-class subset (less wall, fence, pole): :data:`SYNTHIA13_IN_16`.
- Cityscapes 19 train ids -> the 16 SYNTHIA classes
  (:data:`CITYSCAPES19_TO_SYNTHIA16`) for target data of a SYNTHIA run.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Iterable, Literal, Optional, Sequence

import numpy as np
from PIL import Image

from dass_ray.data.layout import IGNORE_INDEX, DataError, split_dir

# --------------------------------------------------------------------------- class names

CITYSCAPES19_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)
SYNTHIA16_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "sky", "person", "rider", "car", "bus", "motorcycle", "bicycle",
)
# The 13-class protocol evaluates 16-class predictions on these indices (no wall, fence, pole).
SYNTHIA13_IN_16: tuple[int, ...] = tuple(i for i, n in enumerate(SYNTHIA16_CLASSES) if n not in ("wall", "fence", "pole"))
SYNTHIA13_CLASSES: tuple[str, ...] = tuple(SYNTHIA16_CLASSES[i] for i in SYNTHIA13_IN_16)


def _lut(pairs: dict[int, int]) -> np.ndarray:
    lut = np.full(256, IGNORE_INDEX, dtype=np.uint8)
    for k, v in pairs.items():
        lut[k] = v
    lut.setflags(write=False)
    return lut


# Cityscapes labelId -> trainId (cityscapesScripts helpers/labels.py); every other id,
# including the void ids and "-1 license plate" stored as 255, is ignore.
CITYSCAPES_LABELID_TO_TRAINID: dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
CITYSCAPES_LUT = _lut(CITYSCAPES_LABELID_TO_TRAINID)

# SYNTHIA RAND-CITYSCAPES class id (its README: 0 void, 1 sky, 2 building, 3 road,
# 4 sidewalk, 5 fence, 6 vegetation, 7 pole, 8 car, 9 traffic sign, 10 pedestrian,
# 11 bicycle, 12 motorcycle, 13 parking-slot, 14 road-work, 15 traffic light,
# 16 terrain, 17 rider, 18 truck, 19 bus, 20 train, 21 wall, 22 lanemarking)
# -> the 16 classes of SYNTHIA16_CLASSES. Parking-slot, road-work, lanemarking and
# the classes absent from the 16 are ignored, as in the DASS code bases.
SYNTHIA_ID_TO_16: dict[int, int] = {
    3: 0, 4: 1, 2: 2, 21: 3, 5: 4, 7: 5, 15: 6, 9: 7, 6: 8, 1: 9,
    10: 10, 17: 11, 8: 12, 19: 13, 12: 14, 11: 15,
}
SYNTHIA_LUT = _lut(SYNTHIA_ID_TO_16)

# Cityscapes trainId (19) -> SYNTHIA 16 (terrain 9, truck 14, train 16 -> ignore).
CITYSCAPES19_TO_SYNTHIA16: dict[int, int] = {
    t: SYNTHIA16_CLASSES.index(n) for t, n in enumerate(CITYSCAPES19_CLASSES) if n in SYNTHIA16_CLASSES
}
CITYSCAPES19_TO_SYNTHIA16_LUT = _lut(CITYSCAPES19_TO_SYNTHIA16)

ACDC_CONDITIONS: tuple[str, ...] = ("night", "snow", "rain", "fog")

LabelSpace = Literal["cityscapes19", "synthia16"]


# --------------------------------------------------------------------------- reading

def read_synthia_label(path: str | os.PathLike) -> np.ndarray:
    """The class ids of a SYNTHIA RAND-CITYSCAPES ``GT/LABELS`` PNG as ``uint16 [H, W]``.

    Assumed format (SYNTHIA README; DAFormer's converter reads it with
    ``cv2.imread(..., IMREAD_UNCHANGED)[:, :, -1]``, the last channel in BGR
    order): a 16-bit-per-channel RGB PNG whose first (R) channel is the class
    id and second the instance id. Pillow opens such a PNG as 8-bit RGB keeping
    only the high byte of each sample (all zeros for ids < 256), so the file is
    decoded twice, once with the raw mode swapped to the little-endian variant
    (which yields the low bytes), and the two bytes are combined. 8-bit RGB /
    grey and 16-bit grey PNGs are accepted as well (class id in the first or
    only channel).
    """
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: label file is missing")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            tile = im.tile[0] if len(im.tile) == 1 else None
            raw = tile.args if tile is not None else None
            rawmode = raw if isinstance(raw, str) else (raw[0] if isinstance(raw, tuple) and raw else None)
            if im.format == "PNG" and rawmode in ("RGB;16B", "RGBA;16B"):
                lo_mode = rawmode.replace("16B", "16L")
                args = lo_mode if isinstance(raw, str) else (lo_mode,) + tuple(raw[1:])
                im.tile = [tile._replace(args=args)]
                im.load()
                lo = np.asarray(im)[:, :, 0].astype(np.uint16)
                with Image.open(path) as im2:
                    im2.load()
                    hi = np.asarray(im2)[:, :, 0].astype(np.uint16)
                return (hi << 8) | lo
            im.load()
            a = np.asarray(im)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: unreadable or truncated SYNTHIA label ({type(e).__name__}: {e})") from e
    if a.ndim == 3:
        a = a[:, :, 0]
    return a.astype(np.uint16)


def _read_id_label(path: Path) -> np.ndarray:
    """A single-channel 8-bit id label (Cityscapes / ACDC labelIds, GTA5 palette PNG) as ``uint8 [H, W]``."""
    if not path.is_file():
        raise DataError(f"{path}: label file is missing")
    try:
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("L", "P"):
                raise DataError(f"{path}: label has mode {im.mode}; expected single-channel label ids "
                                "(a *_color.png was probably given instead of *_labelIds.png)")
            return np.asarray(im, dtype=np.uint8).copy()
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: unreadable or truncated label ({type(e).__name__}: {e})") from e


def _map(ids: np.ndarray, lut: np.ndarray) -> np.ndarray:
    """Map ids through a 256-entry table; ids >= 256 (16-bit inputs) are ignore."""
    if ids.dtype == np.uint8:
        return lut[ids]
    out = np.full(ids.shape, IGNORE_INDEX, dtype=np.uint8)
    ok = (ids >= 0) & (ids < 256)
    out[ok] = lut[ids[ok].astype(np.int64)]
    return out


# --------------------------------------------------------------------------- writing

def _write_sample(
    img_src: Path,
    label: np.ndarray,
    label_src: Path,
    out_root: Path,
    domain: str,
    split: str,
    id: str,
    image_size: Optional[Sequence[int]],
) -> None:
    from dass_ray.data.transforms import resize_pair

    if not img_src.is_file():
        raise DataError(f"{img_src}: image file is missing")
    try:
        with Image.open(img_src) as im:
            im.load()  # decode fully even when the bytes are copied: a truncated file fails here
            size, mode, fmt = im.size, im.mode, im.format
            if mode in ("I", "I;16", "I;16B", "I;16L", "F"):
                raise DataError(f"{img_src}: image has {mode} (16-bit / float) pixels; expected 8-bit RGB")
            copy_bytes = image_size is None and mode == "RGB" and fmt == "PNG"
            img = None if copy_bytes else np.asarray(im.convert("RGB"))
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{img_src}: unreadable or truncated image ({type(e).__name__}: {e})") from e
    if (label.shape[1], label.shape[0]) != size:
        raise DataError(f"{label_src}: label size {label.shape[1]}x{label.shape[0]} (WxH) does not match "
                        f"image {img_src} size {size[0]}x{size[1]}")
    d = split_dir(out_root, domain, split)
    (d / "images").mkdir(parents=True, exist_ok=True)
    (d / "labels").mkdir(parents=True, exist_ok=True)
    if image_size is not None:
        assert img is not None
        img, label = resize_pair(img, label, image_size)
    if img is None:
        shutil.copyfile(img_src, d / "images" / f"{id}.png")  # already an 8-bit RGB PNG: keep its bytes
    else:
        Image.fromarray(img).save(d / "images" / f"{id}.png", format="PNG")
    Image.fromarray(np.ascontiguousarray(label, dtype=np.uint8)).save(d / "labels" / f"{id}.png", format="PNG")


def _convert_pairs(
    pairs: Iterable[tuple[str, Path, Path]],
    read_label,
    out_root: str | os.PathLike,
    domain: str,
    split: str,
    image_size: Optional[Sequence[int]],
    skip_bad: bool,
    skipped: Optional[list[tuple[str, str]]],
    src_dir: Path,
) -> int:
    out_root = Path(out_root)
    n = 0
    seen: set[str] = set()
    for id, img_src, lbl_src in pairs:
        if id in seen:
            raise DataError(f"{img_src}: id {id!r} occurs twice in {src_dir}")
        seen.add(id)
        try:
            label = read_label(lbl_src)
            _write_sample(img_src, label, lbl_src, out_root, domain, split, id, image_size)
        except DataError as e:
            if not skip_bad:
                raise
            if skipped is not None:
                skipped.append((id, str(e)))
            continue
        n += 1
    if n == 0 and not seen:
        raise DataError(f"{src_dir}: no images found")
    return n


def _require_dir(d: Path, what: str) -> None:
    if not d.is_dir():
        raise DataError(f"{d}: {what} directory does not exist")


def _to_space(lbl19: np.ndarray, labels: LabelSpace) -> np.ndarray:
    if labels == "cityscapes19":
        return lbl19
    if labels == "synthia16":
        return CITYSCAPES19_TO_SYNTHIA16_LUT[lbl19]
    raise ValueError(f"labels must be 'cityscapes19' or 'synthia16', got {labels!r}")


# --------------------------------------------------------------------------- converters

def convert_cityscapes(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str,
    domain: str = "cityscapes",
    labels: LabelSpace = "cityscapes19",
    image_size: Optional[Sequence[int]] = None,
    skip_bad: bool = False,
    skipped: Optional[list[tuple[str, str]]] = None,
) -> int:
    """Cityscapes ``leftImg8bit/<split>/<city>/<name>_leftImg8bit.png`` +
    ``gtFine/<split>/<city>/<name>_gtFine_labelIds.png`` -> ``<out_root>/<domain>/<split>``.

    Id = ``<name>`` (``<city>_<seq>_<frame>``, unique across cities). Labels are
    the 19 train ids, or the 16 SYNTHIA classes with ``labels="synthia16"`` (the
    target of a SYNTHIA -> Cityscapes run). ``image_size`` ``(H, W)`` resizes
    (bilinear image, nearest label). Returns the number of samples written.
    """
    src = Path(src_root)
    img_dir, gt_dir = src / "leftImg8bit" / split, src / "gtFine" / split
    _require_dir(img_dir, "Cityscapes image")
    _require_dir(gt_dir, "Cityscapes gtFine")
    suffix = "_leftImg8bit.png"
    pairs = []
    for p in sorted(img_dir.glob(f"*/*{suffix}")):
        name = p.name[: -len(suffix)]
        pairs.append((name, p, gt_dir / p.parent.name / f"{name}_gtFine_labelIds.png"))
    return _convert_pairs(pairs, lambda lp: _to_space(CITYSCAPES_LUT[_read_id_label(lp)], labels),
                          out_root, domain, split, image_size, skip_bad, skipped, img_dir)


def _flat_pairs(img_dir: Path, lbl_dir: Path, ids: Optional[Sequence[str]]) -> list[tuple[str, Path, Path]]:
    """(id, image, label) for datasets storing ``<img_dir>/<id>.png`` beside ``<lbl_dir>/<id>.png``."""
    names = sorted(p.name[:-4] for p in img_dir.glob("*.png")) if ids is None else list(ids)
    return [(n, img_dir / f"{n}.png", lbl_dir / f"{n}.png") for n in names]


def convert_gta5(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str = "train",
    domain: str = "gta5",
    ids: Optional[Sequence[str]] = None,
    image_size: Optional[Sequence[int]] = None,
    skip_bad: bool = False,
    skipped: Optional[list[tuple[str, str]]] = None,
) -> int:
    """GTA5 ``images/<id>.png`` + ``labels/<id>.png`` (palette PNGs of Cityscapes
    labelIds) -> 19 train ids under ``<out_root>/<domain>/<split>``.

    GTA5 has no split directories: ``split`` names the output split and ``ids``
    (e.g. read from a split list) restricts the samples. A few GTA5 labels
    differ in size from their image: they raise, or are skipped with ``skip_bad``.
    """
    src = Path(src_root)
    img_dir, lbl_dir = src / "images", src / "labels"
    _require_dir(img_dir, "GTA5 image")
    _require_dir(lbl_dir, "GTA5 label")
    return _convert_pairs(_flat_pairs(img_dir, lbl_dir, ids), lambda lp: CITYSCAPES_LUT[_read_id_label(lp)],
                          out_root, domain, split, image_size, skip_bad, skipped, img_dir)


def convert_synthia(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str = "train",
    domain: str = "synthia",
    ids: Optional[Sequence[str]] = None,
    image_size: Optional[Sequence[int]] = None,
    skip_bad: bool = False,
    skipped: Optional[list[tuple[str, str]]] = None,
) -> int:
    """SYNTHIA RAND-CITYSCAPES ``RGB/<id>.png`` + ``GT/LABELS/<id>.png`` -> the 16
    classes of :data:`SYNTHIA16_CLASSES` under ``<out_root>/<domain>/<split>``.

    Labels are read by :func:`read_synthia_label` (16-bit PNG, class id in the
    first channel) and mapped by :data:`SYNTHIA_ID_TO_16`. The 13-class protocol
    uses the same labels, evaluated on :data:`SYNTHIA13_IN_16`.
    """
    src = Path(src_root)
    img_dir, lbl_dir = src / "RGB", src / "GT" / "LABELS"
    _require_dir(img_dir, "SYNTHIA RGB")
    _require_dir(lbl_dir, "SYNTHIA GT/LABELS")
    return _convert_pairs(_flat_pairs(img_dir, lbl_dir, ids), lambda lp: _map(read_synthia_label(lp), SYNTHIA_LUT),
                          out_root, domain, split, image_size, skip_bad, skipped, img_dir)


def convert_acdc(
    src_root: str | os.PathLike,
    out_root: str | os.PathLike,
    split: str,
    conditions: Sequence[str] = ACDC_CONDITIONS,
    domain_prefix: str = "acdc_",
    labels: LabelSpace = "cityscapes19",
    image_size: Optional[Sequence[int]] = None,
    skip_bad: bool = False,
    skipped: Optional[list[tuple[str, str]]] = None,
) -> int:
    """ACDC ``rgb_anon/<cond>/<split>/<seq>/<name>_rgb_anon.png`` +
    ``gt/<cond>/<split>/<seq>/<name>_gt_labelIds.png`` -> 19 train ids, one
    domain per condition: ``<out_root>/<domain_prefix><cond>/<split>``.

    Id = ``<name>`` (``<seq>_frame_<n>``). Returns the total written over the conditions.
    """
    src = Path(src_root)
    total = 0
    for cond in conditions:
        if cond not in ACDC_CONDITIONS:
            raise ValueError(f"ACDC condition {cond!r}: expected one of {', '.join(ACDC_CONDITIONS)}")
        img_dir, gt_dir = src / "rgb_anon" / cond / split, src / "gt" / cond / split
        _require_dir(img_dir, f"ACDC {cond} image")
        _require_dir(gt_dir, f"ACDC {cond} gt")
        suffix = "_rgb_anon.png"
        pairs = []
        for p in sorted(img_dir.glob(f"*/*{suffix}")):
            name = p.name[: -len(suffix)]
            pairs.append((name, p, gt_dir / p.parent.name / f"{name}_gt_labelIds.png"))
        total += _convert_pairs(pairs, lambda lp: _to_space(CITYSCAPES_LUT[_read_id_label(lp)], labels),
                                out_root, f"{domain_prefix}{cond}", split, image_size, skip_bad, skipped, img_dir)
    return total
