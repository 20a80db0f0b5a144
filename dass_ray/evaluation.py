"""Evaluate a segmenter on a split: confusion matrix -> mIoU (no Ray)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from .data.transforms import to_diffusion
from .metrics import ConfusionMatrix


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    batch_size: int = 100,
    device: torch.device | str = "cpu",
) -> ConfusionMatrix:
    """Confusion matrix of ``model`` on ``images`` uint8 [N,H,W,3] vs ``labels`` uint8 [N,H,W]."""
    was_training = model.training
    model.eval()
    cm = ConfusionMatrix(num_classes)
    for i in range(0, len(images), batch_size):
        x = to_diffusion(images[i : i + batch_size]).to(device)
        pred = model(x).argmax(1).cpu().numpy()
        cm.update(pred, labels[i : i + batch_size])
    model.train(was_training)
    return cm


def summary(cm: ConfusionMatrix, class_names: list[str], classes: Optional[list[int]] = None) -> dict:
    """mIoU (percent) and the per-class IoU table, JSON-ready."""
    iou = cm.iou()
    return {
        "miou": float(cm.miou(classes)),
        "per_class": {name: (None if np.isnan(v) else round(float(v) * 100, 2)) for name, v in zip(class_names, iou)},
    }
