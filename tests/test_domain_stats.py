"""The label-free domain statistic (``dass_ray.domain_stats``) on the ``digits`` benchmark (no Ray)."""
from __future__ import annotations

import numpy as np
import pytest

from dass_ray.domain_stats import DomainClassifier, feature_distance, image_features


@pytest.fixture(scope="module")
def digits(digits_root):
    from dass_ray.data.layout import load_split

    def images(domain: str, split: str, n: int) -> np.ndarray:
        return load_split(digits_root, domain, split, num_classes=11, max_samples=n, require_labels=False).images

    src, tgt, val = images("source", "train", 600), images("target", "train", 600), images("target", "val", 200)
    clf = DomainClassifier.fit(src[:300], tgt[:300], seed=0)
    return {"src": src, "tgt": tgt, "val": val, "clf": clf}


def _blend(a: np.ndarray, b: np.ndarray, alpha: float) -> np.ndarray:
    return np.clip((1 - alpha) * a.astype(np.float64) + alpha * b.astype(np.float64) + 0.5, 0, 255).astype(np.uint8)


def test_features_shape_and_finite(digits):
    f = image_features(digits["src"][:10])
    # 3 means + 3 stds + 16 histogram bins + colourfulness + gradient energy + 2 deciles
    # (the docstring of image_features says 27)
    assert f.shape == (10, 26) and np.isfinite(f).all()


def test_held_out_source_near_0_target_near_1(digits):
    clf = digits["clf"]
    assert clf.train_accuracy > 0.95
    s_src = clf.target_score(digits["src"][300:600])  # held out
    s_tgt = clf.target_score(digits["tgt"][300:600])  # held out, same split
    s_val = clf.target_score(digits["val"])  # another target split
    assert s_src < 0.1, s_src
    assert s_tgt > 0.9, s_tgt
    assert s_val > 0.9, s_val
    p = clf.prob_target(digits["src"][300:310])
    assert p.shape == (10,) and ((p >= 0) & (p <= 1)).all()


def test_half_way_images_score_in_between(digits):
    clf = digits["clf"]
    src, tgt = digits["src"][300:500], digits["tgt"][300:500]
    scores = [clf.target_score(_blend(src, tgt, a)) for a in (0.0, 0.25, 0.5, 0.75, 1.0)]
    assert scores[0] < scores[2] < scores[4], scores
    # Measured (seed 0): [0.03, 0.81, 0.90, 0.93, 0.98]: the score saturates fast (a quarter of a photo
    # already removes the black background the source is recognised by), so half-way is in between
    # but near the target end, not near 0.5.
    assert 0.1 < scores[2] < scores[4] - 0.02, scores
    assert scores[0] <= scores[1] <= scores[2] <= scores[3] <= scores[4], scores


def test_feature_distance_sanity(digits):
    src, tgt = digits["src"], digits["tgt"]
    a, b = src[300:450], src[450:600]
    assert feature_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    d_same = feature_distance(a, b)
    d_cross = feature_distance(a, tgt[300:450])
    assert d_same < 0.5 * d_cross, (d_same, d_cross)
    assert feature_distance(tgt[300:450], a) == pytest.approx(d_cross, rel=1e-6)  # symmetric
    half = _blend(a, tgt[300:450], 0.5)
    assert feature_distance(half, tgt[450:600]) < feature_distance(a, tgt[450:600])


def test_frechet_gap_orders_domains_and_blends(digits):
    from dass_ray.domain_stats import DomainGap

    gap = DomainGap.fit(digits["src"][:300], digits["tgt"][:300])
    src_held, tgt_held = digits["src"][300:400], digits["tgt"][300:400]
    d_src, d_tgt = gap.distances(src_held), gap.distances(tgt_held)
    assert d_src["to_source"] < d_src["to_target"] and d_tgt["to_target"] < d_tgt["to_source"]
    assert gap.distances(digits["val"][:100])["to_target"] < d_src["to_target"] / 3
    # halfway blends sit between; more target in the blend -> closer to the target, monotonically
    dists = [gap.distances(_blend(src_held, tgt_held, a))["to_target"] for a in (0.0, 0.3, 0.6, 1.0)]
    assert dists == sorted(dists, reverse=True)
    with pytest.raises(ValueError, match="at least 2"):
        gap.distances(src_held[:1])
