"""Segmentation control maps for the ControlNet v1.1 segmentation model.

The segmentation ControlNet was trained on ADE20K label maps drawn with the
ADE20K colour palette (``ade_palette()`` of the ControlNet seg demos, the same
list as mmsegmentation's ADE20K palette). So the control map of a Cityscapes
label map must use the ADE20K colour of the *corresponding ADE20K class*, not
the Cityscapes palette (a flaw of the public ZoDi code), and it must be resized
with nearest-neighbour interpolation (the public code resizes linearly, which
blends colours at class borders into colours of unrelated classes).

A ``class_to_rgb`` palette is a ``uint8`` array ``[C, 3]``: row ``c`` is the
colour of train id ``c``. Ignore (255) is drawn black.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from dass_ray.config import ConfigError

IGNORE = 255

# ADE20K (SceneParsing 150) class names, index = ADE20K class index (0-based, "other" excluded).
ADE20K_CLASSES: tuple[str, ...] = (
    "wall", "building", "sky", "floor", "tree", "ceiling", "road", "bed", "windowpane", "grass",
    "cabinet", "sidewalk", "person", "earth", "door", "table", "mountain", "plant", "curtain", "chair",
    "car", "water", "painting", "sofa", "shelf", "house", "sea", "mirror", "rug", "field",
    "armchair", "seat", "fence", "desk", "rock", "wardrobe", "lamp", "bathtub", "railing", "cushion",
    "base", "box", "column", "signboard", "chest of drawers", "counter", "sand", "sink", "skyscraper", "fireplace",
    "refrigerator", "grandstand", "path", "stairs", "runway", "case", "pool table", "pillow", "screen door", "stairway",
    "river", "bridge", "bookcase", "blind", "coffee table", "toilet", "flower", "book", "hill", "bench",
    "countertop", "stove", "palm", "kitchen island", "computer", "swivel chair", "boat", "bar", "arcade machine", "hovel",
    "bus", "towel", "light", "truck", "tower", "chandelier", "awning", "streetlight", "booth", "television receiver",
    "airplane", "dirt track", "apparel", "pole", "land", "bannister", "escalator", "ottoman", "bottle", "buffet",
    "poster", "stage", "van", "ship", "fountain", "conveyer belt", "canopy", "washer", "plaything", "swimming pool",
    "stool", "barrel", "basket", "waterfall", "tent", "bag", "minibike", "cradle", "oven", "ball",
    "food", "step", "tank", "trade name", "microwave", "pot", "animal", "bicycle", "lake", "dishwasher",
    "screen", "blanket", "sculpture", "hood", "sconce", "vase", "traffic light", "tray", "ashcan", "fan",
    "pier", "crt screen", "plate", "monitor", "bulletin board", "shower", "radiator", "glass", "clock", "flag",
)

# The ADE20K palette (RGB), row i = colour of ADE20K_CLASSES[i].
ADE20K_PALETTE: tuple[tuple[int, int, int], ...] = (
    (120, 120, 120), (180, 120, 120), (6, 230, 230), (80, 50, 50), (4, 200, 3),
    (120, 120, 80), (140, 140, 140), (204, 5, 255), (230, 230, 230), (4, 250, 7),
    (224, 5, 255), (235, 255, 7), (150, 5, 61), (120, 120, 70), (8, 255, 51),
    (255, 6, 82), (143, 255, 140), (204, 255, 4), (255, 51, 7), (204, 70, 3),
    (0, 102, 200), (61, 230, 250), (255, 6, 51), (11, 102, 255), (255, 7, 71),
    (255, 9, 224), (9, 7, 230), (220, 220, 220), (255, 9, 92), (112, 9, 255),
    (8, 255, 214), (7, 255, 224), (255, 184, 6), (10, 255, 71), (255, 41, 10),
    (7, 255, 255), (224, 255, 8), (102, 8, 255), (255, 61, 6), (255, 194, 7),
    (255, 122, 8), (0, 255, 20), (255, 8, 41), (255, 5, 153), (6, 51, 255),
    (235, 12, 255), (160, 150, 20), (0, 163, 255), (140, 140, 140), (250, 10, 15),
    (20, 255, 0), (31, 255, 0), (255, 31, 0), (255, 224, 0), (153, 255, 0),
    (0, 0, 255), (255, 71, 0), (0, 235, 255), (0, 173, 255), (31, 0, 255),
    (11, 200, 200), (255, 82, 0), (0, 255, 245), (0, 61, 255), (0, 255, 112),
    (0, 255, 133), (255, 0, 0), (255, 163, 0), (255, 102, 0), (194, 255, 0),
    (0, 143, 255), (51, 255, 0), (0, 82, 255), (0, 255, 41), (0, 255, 173),
    (10, 0, 255), (173, 255, 0), (0, 255, 153), (255, 92, 0), (255, 0, 255),
    (255, 0, 245), (255, 0, 102), (255, 173, 0), (255, 0, 20), (255, 184, 184),
    (0, 31, 255), (0, 255, 61), (0, 71, 255), (255, 0, 204), (0, 255, 194),
    (0, 255, 82), (0, 10, 255), (0, 112, 255), (51, 0, 255), (0, 194, 255),
    (0, 122, 255), (0, 255, 163), (255, 153, 0), (0, 255, 10), (255, 112, 0),
    (143, 255, 0), (82, 0, 255), (163, 255, 0), (255, 235, 0), (8, 184, 170),
    (133, 0, 255), (0, 255, 92), (184, 0, 255), (255, 0, 31), (0, 184, 255),
    (0, 214, 255), (255, 0, 112), (92, 255, 0), (0, 224, 255), (112, 224, 255),
    (70, 184, 160), (163, 0, 255), (153, 0, 255), (71, 255, 0), (255, 0, 163),
    (255, 204, 0), (255, 0, 143), (0, 255, 235), (133, 255, 0), (255, 0, 235),
    (245, 0, 255), (255, 0, 122), (255, 245, 0), (10, 190, 212), (214, 255, 0),
    (0, 204, 255), (20, 0, 255), (255, 255, 0), (0, 153, 255), (0, 41, 255),
    (0, 255, 204), (41, 0, 255), (41, 255, 0), (173, 0, 255), (0, 245, 255),
    (71, 0, 255), (122, 0, 255), (0, 255, 184), (0, 92, 255), (184, 255, 0),
    (0, 133, 255), (255, 214, 0), (25, 194, 194), (102, 255, 0), (92, 0, 255),
)

ADE20K_INDEX: dict[str, int] = {name: i for i, name in enumerate(ADE20K_CLASSES)}

CITYSCAPES_CLASSES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign",
    "vegetation", "terrain", "sky", "person", "rider", "car", "truck", "bus", "train",
    "motorcycle", "bicycle",
)

# Cityscapes train id -> ADE20K class name. Not 1:1 by name:
#   traffic sign -> signboard, vegetation -> tree, terrain -> grass, rider -> person,
#   motorcycle -> minibike, and train -> bus: ADE20K has no train / tram / railway
#   vehicle class; "bus" is the closest large road vehicle with windows (the
#   alternatives, truck or van, are further in appearance).
CITYSCAPES_TO_ADE20K_NAMES: tuple[str, ...] = (
    "road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "signboard",
    "tree", "grass", "sky", "person", "person", "car", "truck", "bus", "bus",
    "minibike", "bicycle",
)

# Cityscapes train id -> ADE20K class index:
# (6, 11, 1, 0, 32, 93, 136, 43, 4, 9, 2, 12, 12, 20, 83, 80, 80, 116, 127)
CITYSCAPES_TO_ADE20K: tuple[int, ...] = tuple(ADE20K_INDEX[n] for n in CITYSCAPES_TO_ADE20K_NAMES)

# Fallback for the `digits` benchmark (11 classes): 11 distinct ADE20K colours,
# class 0 (background) -> wall, digits 0..9 -> classes 1..10.
DIGITS_ADE20K_NAMES: tuple[str, ...] = (
    "wall", "building", "sky", "tree", "road", "grass", "sidewalk", "person", "car", "signboard", "fence",
)


def ade20k_colours(indices: Sequence[int]) -> np.ndarray:
    """``uint8 [len(indices), 3]`` ADE20K colours of the given ADE20K class indices."""
    pal = np.asarray(ADE20K_PALETTE, dtype=np.uint8)
    return pal[np.asarray(indices, dtype=np.int64)]


CITYSCAPES_PALETTE: np.ndarray = ade20k_colours(CITYSCAPES_TO_ADE20K)  # [19, 3]
DIGITS: np.ndarray = ade20k_colours([ADE20K_INDEX[n] for n in DIGITS_ADE20K_NAMES])  # [11, 3]


# --------------------------------------------------------------------------- control maps

def _as_palette(class_to_rgb) -> torch.Tensor:
    pal = np.asarray(class_to_rgb)
    if pal.ndim != 2 or pal.shape[1] != 3 or pal.shape[0] < 1:
        raise ValueError(f"class_to_rgb: expected an array [C, 3], got shape {pal.shape}")
    if pal.shape[0] > IGNORE:
        raise ValueError(f"class_to_rgb: at most {IGNORE} classes (255 is ignore), got {pal.shape[0]}")
    if not np.all(np.isfinite(pal)) or pal.min() < 0 or pal.max() > 255:
        raise ValueError("class_to_rgb: colours must be in 0..255")
    return torch.as_tensor(pal.astype(np.float32) / 255.0)


def control_map(labels: torch.Tensor, size: Sequence[int], class_to_rgb) -> torch.Tensor:
    """Colour label maps for the segmentation ControlNet.

    ``labels``: ``int64 [B, H, W]`` train ids, 255 = ignore (drawn black).
    ``size``: ``(H', W')`` of the output; labels are resized with nearest
    neighbour (PIL-style pixel centres, ``nearest-exact``) *before* colouring,
    so every output pixel is exactly a palette colour or black.
    Returns ``float32 [B, 3, H', W']`` in ``[0, 1]`` on the labels' device.
    Raises ``ValueError`` for a label id without a colour.
    """
    if labels.ndim != 3:
        raise ValueError(f"labels: expected [B, H, W], got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point:
        raise ValueError(f"labels: expected an integer tensor, got {labels.dtype}")
    pal = _as_palette(class_to_rgb).to(labels.device)
    C = pal.shape[0]
    lab = labels.long()
    bad = (lab != IGNORE) & ((lab < 0) | (lab >= C))
    if bool(bad.any()):
        vals = sorted(set(lab[bad].unique().tolist()))[:10]
        raise ValueError(f"labels: ids {vals} have no colour (palette has {C} classes, 255 = ignore)")
    H, W = int(size[0]), int(size[1])
    if (H, W) != tuple(lab.shape[-2:]):
        # exact for integers < 2**24 stored as float32; nearest never blends
        lab = F.interpolate(lab[:, None].float(), size=(H, W), mode="nearest-exact")[:, 0].round().long()
    lut = torch.zeros(256, 3, dtype=torch.float32, device=labels.device)  # 255 (and unused ids) -> black
    lut[:C] = pal
    out = lut[lab.clamp(0, 255)]  # [B, H, W, 3]
    return out.permute(0, 3, 1, 2).contiguous()


# --------------------------------------------------------------------------- palette files

def _colour_of(value, where: str) -> tuple[int, int, int]:
    if isinstance(value, str):
        name = value.strip().lower()
        if name not in ADE20K_INDEX:
            raise ConfigError(f"{where}: {value!r} is not an ADE20K class name")
        return tuple(int(v) for v in ADE20K_PALETTE[ADE20K_INDEX[name]])  # type: ignore[return-value]
    if (not isinstance(value, (list, tuple)) or len(value) != 3
            or not all(isinstance(v, int) and not isinstance(v, bool) for v in value)
            or not all(0 <= v <= 255 for v in value)):
        raise ConfigError(f"{where}: got {value!r}; expected [r, g, b] with integers 0..255 "
                          f"or an ADE20K class name")
    return (int(value[0]), int(value[1]), int(value[2]))


def load_palette_file(path: str | os.PathLike, num_classes: Optional[int] = None) -> np.ndarray:
    """Read a class palette: a YAML or JSON mapping ``class id -> [r, g, b]``.

    Values may also be ADE20K class names (``road``, ``tree``, ...), meaning that
    class's ADE20K colour. Ids must cover ``0..C-1`` exactly (``C = num_classes``
    when given, else the largest id + 1). Returns ``uint8 [C, 3]``.
    Raises :class:`~dass_ray.config.ConfigError` naming the file and the bad entry.
    """
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"palette file {str(p)!r} does not exist")
    text = p.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if p.suffix.lower() == ".json" else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as e:
        raise ConfigError(f"palette file {str(p)!r}: cannot parse: {e}") from None
    if not isinstance(data, dict) or not data:
        raise ConfigError(f"palette file {str(p)!r}: expected a non-empty mapping class id -> [r, g, b], "
                          f"got {type(data).__name__}")
    colours: dict[int, tuple[int, int, int]] = {}
    for key, value in data.items():
        where = f"palette file {str(p)!r}, entry {key!r}"
        cid = None
        if isinstance(key, int) and not isinstance(key, bool):
            cid = key
        elif isinstance(key, str) and key.strip().isdigit():
            cid = int(key.strip())
        if cid is None or not 0 <= cid < IGNORE:
            raise ConfigError(f"{where}: the key must be a class id 0..254")
        if cid in colours:
            raise ConfigError(f"{where}: class id {cid} is given twice")
        colours[cid] = _colour_of(value, where)
    C = num_classes if num_classes is not None else max(colours) + 1
    extra = sorted(c for c in colours if c >= C)
    if extra:
        raise ConfigError(f"palette file {str(p)!r}, entry {extra[0]!r}: class id >= num_classes ({C})")
    missing = [c for c in range(C) if c not in colours]
    if missing:
        raise ConfigError(f"palette file {str(p)!r}: no colour for class ids {missing[:10]} "
                          f"(ids 0..{C - 1} are needed)")
    return np.asarray([colours[c] for c in range(C)], dtype=np.uint8)


def resolve_palette(num_classes: int, class_palette: Optional[str] = None) -> np.ndarray:
    """The palette for a run: the file when given, else Cityscapes (19) or digits (11)."""
    if class_palette is not None:
        return load_palette_file(class_palette, num_classes)
    if num_classes == len(CITYSCAPES_PALETTE):
        return CITYSCAPES_PALETTE.copy()
    if num_classes == len(DIGITS):
        return DIGITS.copy()
    raise ConfigError(f"config key 'zodi.class_palette': got None; allowed: a YAML/JSON palette file "
                      f"(class id -> [r, g, b] or ADE20K class name) for {num_classes} classes "
                      f"(built-in palettes exist for 19 Cityscapes and 11 digits classes only)")
