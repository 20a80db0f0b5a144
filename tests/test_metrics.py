"""Confusion matrix, IoU / mIoU against hand-computed numbers, merging, ignore handling, protocols."""
from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from dass_ray.metrics import PROTOCOLS, ConfusionMatrix, get_protocol

# 4 classes; class 3 appears in neither prediction nor target. The last pixel is ignored.
TARGET = np.array([[0, 0, 1], [1, 2, 255]])
PRED = np.array([[0, 1, 1], [1, 0, 2]])
# By hand (rows target, columns prediction), ignored pixel left out:
#   t0: p0 once, p1 once;  t1: p1 twice;  t2: p0 once
EXPECTED = np.array([[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]])
# IoU = TP / (TP + FP + FN):
#   class 0: 1 / (1 + 1 + 1) = 1/3    class 1: 2 / (2 + 1 + 0) = 2/3
#   class 2: 0 / (0 + 0 + 1) = 0      class 3: absent -> NaN
# mIoU = (1/3 + 2/3 + 0) / 3 = 33.333...%;  over classes [0, 1]: 50 %


def test_hand_computed_example() -> None:
    cm = ConfusionMatrix(4).update(PRED, TARGET)
    np.testing.assert_array_equal(cm.matrix, EXPECTED)
    iou = cm.iou()
    assert iou[0] == pytest.approx(1 / 3) and iou[1] == pytest.approx(2 / 3) and iou[2] == 0
    assert math.isnan(iou[3])
    assert cm.miou() == pytest.approx(100 / 3)
    assert cm.miou([0, 1]) == pytest.approx(50.0)
    assert cm.miou([3]) != cm.miou([3])  # only an absent class: NaN
    assert cm.total == 5 and cm.pixel_accuracy() == pytest.approx(60.0)
    table = cm.per_class_table(["a", "b", "c", "d"])
    assert [r["name"] for r in table] == ["a", "b", "c", "d"]
    assert table[1] == {"class_id": 1, "name": "b", "iou": pytest.approx(200 / 3), "target_pixels": 2, "pred_pixels": 3}
    assert math.isnan(table[3]["iou"])


def test_merge_across_workers_and_serialise() -> None:
    flat_t, flat_p = TARGET.ravel(), PRED.ravel()
    w1 = ConfusionMatrix(4).update(flat_p[:3], flat_t[:3])
    w2 = ConfusionMatrix(4).update(torch.tensor(flat_p[3:]), torch.tensor(flat_t[3:]))  # torch input too
    # shipped across workers as plain data
    w1b = ConfusionMatrix.from_dict(json.loads(json.dumps(w1.to_dict())))
    w2b = ConfusionMatrix.from_dict(json.loads(json.dumps(w2.to_dict())))
    total = w1b + w2b
    np.testing.assert_array_equal(total.matrix, EXPECTED)
    np.testing.assert_array_equal(w1b.matrix + w2b.matrix, EXPECTED)  # __add__ did not modify its operands
    w1b.merge(w2b)
    np.testing.assert_array_equal(w1b.matrix, EXPECTED)
    assert total.miou() == pytest.approx(100 / 3)
    with pytest.raises(ValueError, match="cannot merge"):
        ConfusionMatrix(4).merge(ConfusionMatrix(5))


def test_ignore_and_range_checks() -> None:
    cm = ConfusionMatrix(3)
    # a prediction out of range is fine on an ignored pixel, the pixel is skipped
    cm.update(np.array([0, 9]), np.array([0, 255]))
    np.testing.assert_array_equal(cm.matrix, [[1, 0, 0], [0, 0, 0], [0, 0, 0]])
    with pytest.raises(ValueError, match="target ids out of range: 3, 7"):
        cm.update(np.array([0, 0, 0]), np.array([3, 7, 255]))
    with pytest.raises(ValueError, match="predicted ids out of range: 4"):
        cm.update(np.array([4]), np.array([1]))
    with pytest.raises(ValueError, match="shapes must match"):
        cm.update(np.zeros(3, int), np.zeros(4, int))
    with pytest.raises(TypeError):
        cm.update(np.zeros(2, float), np.zeros(2, int))
    other = ConfusionMatrix(3, ignore_index=-1)
    other.update(np.array([1, 2]), np.array([-1, 2]))
    np.testing.assert_array_equal(other.matrix[2], [0, 0, 1])
    with pytest.raises(ValueError, match="collides"):
        ConfusionMatrix(3, ignore_index=2)
    # nothing counted: NaN, not an error
    assert math.isnan(ConfusionMatrix(3).miou())


def test_protocols() -> None:
    assert PROTOCOLS["digits"].num_classes == 11 and PROTOCOLS["digits"].names[0] == "background"
    assert PROTOCOLS["cityscapes19"].num_classes == 19
    s16, s13 = PROTOCOLS["synthia16"], PROTOCOLS["synthia13"]
    assert s16.num_classes == s13.num_classes == 16
    assert len(s13.classes) == 13 and set(s13.eval_names).isdisjoint({"wall", "fence", "pole"})
    assert s13.eval_names == tuple(n for n in s16.names if n not in ("wall", "fence", "pole"))
    # 16-class predictions; by hand:
    #   class 0: TP 1, FP 1 (target 3 predicted 0) -> 1/2;  class 3: FN 1 -> 0
    #   classes 4, 5: perfect -> 1;  class 6: FN 1 -> 0;  class 7: FP 1 -> 0;  others NaN
    #   synthia16 = (0.5 + 0 + 1 + 1 + 0 + 0) / 6 = 41.67 %;  synthia13 (no 3, 4, 5) = 0.5 / 3 = 16.67 %
    cm = s16.new_matrix().update(np.array([0, 0, 4, 5, 7]), np.array([0, 3, 4, 5, 6]))
    assert s16.miou(cm) == pytest.approx(250 / 6)
    assert s13.miou(cm) == pytest.approx(50 / 3)
    assert [r["name"] for r in s13.table(cm)] == list(s13.eval_names)
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("gta")
    with pytest.raises(ValueError, match="19 classes"):
        PROTOCOLS["cityscapes19"].miou(cm)
