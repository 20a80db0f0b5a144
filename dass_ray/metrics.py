"""Segmentation metrics: a confusion matrix, IoU per class, mIoU over a protocol's classes.

The matrix is ``int64 [C, C]``, rows = target class, columns = predicted class;
pixels whose target is ``ignore_index`` are not counted. It is a sum, so
matrices from different workers merge by addition (:meth:`ConfusionMatrix.merge`)
and travel as plain dicts (:meth:`ConfusionMatrix.to_dict`).

IoU_c = TP_c / (TP_c + FP_c + FN_c); a class absent from both prediction and
target has IoU NaN and is left out of the mean (``nanmean``), the usual
Cityscapes-style mIoU accumulated over the whole evaluation set (not averaged
per image).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import numpy as np

from dass_ray.data.digits import CLASS_NAMES as DIGITS_CLASSES
from dass_ray.data.public import CITYSCAPES19_CLASSES, SYNTHIA13_IN_16, SYNTHIA16_CLASSES


def _as_numpy(x: Any) -> np.ndarray:
    """numpy or torch (any device) integer array -> numpy int64, flattened."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu().numpy()
    a = np.asarray(x)
    if not np.issubdtype(a.dtype, np.integer):
        raise TypeError(f"expected an integer array of class ids, got dtype {a.dtype}")
    return a.reshape(-1).astype(np.int64, copy=False)


class ConfusionMatrix:
    """Accumulates ``[C, C]`` pixel counts (rows target, columns prediction)."""

    def __init__(self, num_classes: int, ignore_index: int = 255) -> None:
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index {ignore_index} collides with a class id (num_classes {num_classes})")
        self.num_classes = int(num_classes)
        self.ignore_index = int(ignore_index)
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, pred: Any, target: Any) -> "ConfusionMatrix":
        """Add a batch: ``pred`` and ``target`` integer arrays of the same shape (any shape).

        Pixels with ``target == ignore_index`` are skipped. A target id outside
        ``0..C-1`` that is not the ignore id, or a prediction outside ``0..C-1``
        on a counted pixel, raises ValueError (a wrong label space, not noise).
        """
        p, t = _as_numpy(pred), _as_numpy(target)
        if p.shape != t.shape:
            raise ValueError(f"pred has {p.size} elements, target {t.size}: shapes must match")
        keep = t != self.ignore_index
        p, t = p[keep], t[keep]
        C = self.num_classes
        bad_t = (t < 0) | (t >= C)
        if bad_t.any():
            vals = ", ".join(str(v) for v in np.unique(t[bad_t])[:10])
            raise ValueError(f"target ids out of range: {vals}; allowed 0..{C - 1} and {self.ignore_index} (ignore)")
        bad_p = (p < 0) | (p >= C)
        if bad_p.any():
            vals = ", ".join(str(v) for v in np.unique(p[bad_p])[:10])
            raise ValueError(f"predicted ids out of range: {vals}; allowed 0..{C - 1}")
        self.matrix += np.bincount(t * C + p, minlength=C * C).reshape(C, C)
        return self

    def _check_compatible(self, other: "ConfusionMatrix") -> None:
        if not isinstance(other, ConfusionMatrix):
            raise TypeError(f"cannot merge ConfusionMatrix with {type(other).__name__}")
        if (other.num_classes, other.ignore_index) != (self.num_classes, self.ignore_index):
            raise ValueError(f"cannot merge matrices of {other.num_classes} classes / ignore {other.ignore_index} "
                             f"into {self.num_classes} classes / ignore {self.ignore_index}")

    def merge(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        """Add ``other``'s counts into this matrix (in place); returns self."""
        self._check_compatible(other)
        self.matrix += other.matrix
        return self

    def __add__(self, other: "ConfusionMatrix") -> "ConfusionMatrix":
        self._check_compatible(other)
        out = ConfusionMatrix(self.num_classes, self.ignore_index)
        out.matrix = self.matrix + other.matrix
        return out

    def to_dict(self) -> dict[str, Any]:
        """Plain Python data (JSON / Ray-serialisable)."""
        return {"num_classes": self.num_classes, "ignore_index": self.ignore_index, "matrix": self.matrix.tolist()}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ConfusionMatrix":
        cm = cls(int(d["num_classes"]), int(d.get("ignore_index", 255)))
        m = np.asarray(d["matrix"], dtype=np.int64)
        if m.shape != (cm.num_classes, cm.num_classes) or (m < 0).any():
            raise ValueError(f"matrix must be non-negative [{cm.num_classes}, {cm.num_classes}], got shape {m.shape}")
        cm.matrix = m
        return cm

    @property
    def total(self) -> int:
        """Counted (non-ignored) pixels."""
        return int(self.matrix.sum())

    def iou(self) -> np.ndarray:
        """IoU per class, ``float64 [C]`` in 0..1; NaN where the class is in neither prediction nor target."""
        tp = np.diag(self.matrix).astype(np.float64)
        denom = self.matrix.sum(0) + self.matrix.sum(1) - tp
        out = np.full(self.num_classes, np.nan)
        np.divide(tp, denom, out=out, where=denom > 0)
        return out

    def miou(self, classes: Optional[Sequence[int]] = None) -> float:
        """Mean IoU in percent (0..100) over ``classes`` (default all), ignoring NaN classes; NaN if all are."""
        iou = self.iou()
        if classes is not None:
            idx = np.asarray(list(classes), dtype=np.int64)
            if idx.size == 0 or (idx < 0).any() or (idx >= self.num_classes).any():
                raise ValueError(f"classes must be non-empty indices in 0..{self.num_classes - 1}, got {list(classes)}")
            iou = iou[idx]
        valid = iou[~np.isnan(iou)]
        return float(valid.mean() * 100.0) if valid.size else float("nan")

    def pixel_accuracy(self) -> float:
        """Correct / counted pixels, percent; NaN when nothing was counted."""
        return float(np.trace(self.matrix) / self.total * 100.0) if self.total else float("nan")

    def per_class_table(self, class_names: Sequence[str], classes: Optional[Sequence[int]] = None) -> list[dict[str, Any]]:
        """One row per class (or per index of ``classes``): id, name, IoU %, target and predicted pixel counts."""
        if len(class_names) != self.num_classes:
            raise ValueError(f"{len(class_names)} class names for {self.num_classes} classes")
        iou = self.iou()
        idx = range(self.num_classes) if classes is None else classes
        rows = []
        for c in idx:
            rows.append({
                "class_id": int(c),
                "name": class_names[c],
                "iou": float(iou[c] * 100.0),  # NaN when absent in both
                "target_pixels": int(self.matrix[c].sum()),
                "pred_pixels": int(self.matrix[:, c].sum()),
            })
        return rows

    def __repr__(self) -> str:
        return f"ConfusionMatrix(num_classes={self.num_classes}, pixels={self.total}, mIoU={self.miou():.2f})"


@dataclass(frozen=True)
class Protocol:
    """An evaluation protocol: the model's label space and the classes the mIoU averages.

    ``class_names`` are the model's ``num_classes`` classes; ``eval_classes``
    indexes into them (``synthia13`` evaluates 16-class predictions on 13).
    """

    name: str
    class_names: tuple[str, ...]
    eval_classes: tuple[int, ...]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def eval_names(self) -> tuple[str, ...]:
        return tuple(self.class_names[i] for i in self.eval_classes)

    # Short aliases: ``names`` = the model's class names, ``classes`` = the evaluated indices.
    @property
    def names(self) -> tuple[str, ...]:
        return self.class_names

    @property
    def classes(self) -> list[int]:
        return list(self.eval_classes)

    def new_matrix(self, ignore_index: int = 255) -> ConfusionMatrix:
        return ConfusionMatrix(self.num_classes, ignore_index)

    def miou(self, cm: ConfusionMatrix) -> float:
        self._check(cm)
        return cm.miou(self.eval_classes)

    def table(self, cm: ConfusionMatrix) -> list[dict[str, Any]]:
        self._check(cm)
        return cm.per_class_table(self.class_names, self.eval_classes)

    def _check(self, cm: ConfusionMatrix) -> None:
        if cm.num_classes != self.num_classes:
            raise ValueError(f"protocol {self.name} is over {self.num_classes} classes, matrix has {cm.num_classes}")


def _all(names: Sequence[str]) -> tuple[int, ...]:
    return tuple(range(len(names)))


PROTOCOLS: dict[str, Protocol] = {
    "digits": Protocol("digits", tuple(DIGITS_CLASSES), _all(DIGITS_CLASSES)),
    "cityscapes19": Protocol("cityscapes19", CITYSCAPES19_CLASSES, _all(CITYSCAPES19_CLASSES)),
    "synthia16": Protocol("synthia16", SYNTHIA16_CLASSES, _all(SYNTHIA16_CLASSES)),
    "synthia13": Protocol("synthia13", SYNTHIA16_CLASSES, SYNTHIA13_IN_16),
}


def get_protocol(name: str) -> Protocol:
    """The protocol called ``name`` (ValueError listing the known ones otherwise)."""
    try:
        return PROTOCOLS[name]
    except KeyError:
        raise ValueError(f"unknown protocol {name!r}; known: {', '.join(PROTOCOLS)}") from None
