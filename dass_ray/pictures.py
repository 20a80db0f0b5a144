"""Image grids, plots and tables written next to a run (and logged as artifacts). No Ray."""
from __future__ import annotations

import csv
import os
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

# A fixed colour per class id for label pictures (255 = ignore -> white).
_PALETTE = np.array(
    [[0, 0, 0], [230, 25, 75], [60, 180, 75], [255, 225, 25], [0, 130, 200], [245, 130, 48], [145, 30, 180],
     [70, 240, 240], [240, 50, 230], [210, 245, 60], [250, 190, 212], [0, 128, 128], [220, 190, 255],
     [170, 110, 40], [255, 250, 200], [128, 0, 0], [170, 255, 195], [128, 128, 0], [255, 215, 180], [0, 0, 128]],
    dtype=np.uint8,
)


def colorize(label: np.ndarray) -> np.ndarray:
    """uint8 [H,W] train ids -> uint8 [H,W,3] colours."""
    out = _PALETTE[label % len(_PALETTE)]
    out[label == 255] = 255
    return out


def grid(rows: Sequence[Sequence[np.ndarray]], scale: int = 1, pad: int = 2) -> np.ndarray:
    """Tile images uint8 [H,W,3] (all the same size) into one picture, rows x columns."""
    h, w = rows[0][0].shape[:2]
    ncol = max(len(r) for r in rows)
    out = np.full(((h + pad) * len(rows) + pad, (w + pad) * ncol + pad, 3), 255, np.uint8)
    for i, r in enumerate(rows):
        for j, im in enumerate(r):
            y, x = pad + i * (h + pad), pad + j * (w + pad)
            out[y : y + h, x : x + w] = im if im.ndim == 3 else np.repeat(im[..., None], 3, -1)
    if scale > 1:
        out = np.kron(out, np.ones((scale, scale, 1), np.uint8))
    return out


def save_png(path: str | os.PathLike, img: np.ndarray) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(img).save(path)
    return path


def _plt():
    os.environ.setdefault("MPLCONFIGDIR", str(Path(tempfile.gettempdir()) / "dass-ray-mpl"))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_series(path: str | os.PathLike, xs: Sequence[float], series: dict[str, Sequence[float]], xlabel: str,
                ylabel: str, title: str, hlines: Optional[dict[str, float]] = None) -> Path:
    plt = _plt()
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, ys in series.items():
        ax.plot(xs[: len(ys)], ys, marker="o", label=name)
    for name, v in (hlines or {}).items():
        ax.axhline(v, linestyle="--", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return Path(path)


def write_table(path: str | os.PathLike, rows: list[dict]) -> Path:
    """A CSV of ``rows`` (dicts with the same keys)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0].keys()))
        w.writeheader()
        w.writerows(rows)
    return path


def per_class_rows(per_class: dict[str, Optional[float]], **columns: dict[str, Optional[float]]) -> list[dict]:
    """Rows ``{class, iou, <other columns>...}`` for the per-class IoU table."""
    return [{"class": name, "iou": v, **{k: c.get(name) for k, c in columns.items()}} for name, v in per_class.items()]
