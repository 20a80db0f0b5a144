"""How target-like are translated images? A label-free statistic (no Ray).

A small, fixed domain classifier: logistic regression on low-level image
statistics (per-channel mean / std, colourfulness, a 16-bin grey histogram,
gradient energy, the mean of the darkest and brightest deciles), fitted once
on source vs target-train images and then frozen. ``target_score(images)`` is
the mean predicted probability of "target": about 0 for source images, about
1 for target images; a translation that crosses the gap moves it towards 1.

It reads no labels. The features are the low-level statistics in which
``digits``' domains differ (DESIGN.md section 5: black vs photo backgrounds).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def image_features(images: np.ndarray) -> np.ndarray:
    """uint8 [N,H,W,3] -> float [N, 26] low-level statistics."""
    x = images.astype(np.float32) / 255.0
    n = x.shape[0]
    flat = x.reshape(n, -1, 3)
    mean = flat.mean(1)
    std = flat.std(1)
    grey = flat.mean(2)
    hist = np.stack([np.histogram(g, bins=16, range=(0.0, 1.0))[0] for g in grey]).astype(np.float32) / grey.shape[1]
    colourful = (flat.max(2) - flat.min(2)).mean(1, keepdims=True)
    g2 = x.mean(3)
    grad = (np.abs(np.diff(g2, axis=1)).mean((1, 2)) + np.abs(np.diff(g2, axis=2)).mean((1, 2)))[:, None]
    q = np.quantile(grey, [0.1, 0.9], axis=1).T
    return np.concatenate([mean, std, hist, colourful, grad, q], axis=1)


@dataclass
class DomainClassifier:
    """Frozen logistic regression on :func:`image_features`: P(target | image)."""

    coef: np.ndarray
    intercept: float
    mu: np.ndarray
    sd: np.ndarray
    train_accuracy: float

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray, seed: int = 0) -> "DomainClassifier":
        from sklearn.linear_model import LogisticRegression

        f = np.concatenate([image_features(source), image_features(target)])
        y = np.concatenate([np.zeros(len(source)), np.ones(len(target))])
        mu, sd = f.mean(0), f.std(0) + 1e-6
        clf = LogisticRegression(C=1.0, max_iter=1000, random_state=seed).fit((f - mu) / sd, y)
        acc = float(clf.score((f - mu) / sd, y))
        return cls(clf.coef_[0].astype(np.float64), float(clf.intercept_[0]), mu, sd, acc)

    def prob_target(self, images: np.ndarray) -> np.ndarray:
        z = ((image_features(images) - self.mu) / self.sd) @ self.coef + self.intercept
        return 1.0 / (1.0 + np.exp(-z))

    def target_score(self, images: np.ndarray) -> float:
        """Mean P(target) over ``images`` uint8 [N,H,W,3]: 0 = source-like, 1 = target-like."""
        return float(self.prob_target(images).mean())


def feature_distance(images: np.ndarray, reference: np.ndarray) -> float:
    """Distance between the mean standardised features of ``images`` and of ``reference``."""
    fa, fb = image_features(images), image_features(reference)
    sd = np.concatenate([fa, fb]).std(0) + 1e-6
    return float(np.linalg.norm((fa.mean(0) - fb.mean(0)) / sd))


@dataclass
class DomainGap:
    """Fréchet distance (as in FID, on :func:`image_features` instead of Inception features).

    Fitted once on source and target-train images, then frozen: the features are
    standardised with the pooled statistics of those two sets, so distances of
    different image sets are on one scale. ``distances(images)`` gives the distance
    to the target and to the source set: a translation that crosses the gap has
    ``to_target < to_source`` (source images themselves sit at ~0 from the source).
    Unlike the classifier's score it does not saturate at 1 once images leave the
    source; it keeps measuring how far from the target they are. Needs >= 2 images.
    """

    mu: np.ndarray
    sd: np.ndarray
    source_stats: tuple[np.ndarray, np.ndarray]
    target_stats: tuple[np.ndarray, np.ndarray]

    @staticmethod
    def _stats(z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if len(z) < 2:
            raise ValueError(f"the Fréchet distance needs at least 2 images, got {len(z)}")
        # a small ridge: constant features (e.g. the empty histogram bins of black backgrounds)
        # make the covariance singular and its square root ill-defined
        return z.mean(0), np.cov(z, rowvar=False) + 1e-4 * np.eye(z.shape[1])

    @classmethod
    def fit(cls, source: np.ndarray, target: np.ndarray) -> "DomainGap":
        fs, ft = image_features(source), image_features(target)
        f = np.concatenate([fs, ft])
        mu, sd = f.mean(0), f.std(0) + 1e-6
        return cls(mu, sd, cls._stats((fs - mu) / sd), cls._stats((ft - mu) / sd))

    @staticmethod
    def frechet(a: tuple[np.ndarray, np.ndarray], b: tuple[np.ndarray, np.ndarray]) -> float:
        """||mu_a - mu_b||^2 + Tr(C_a + C_b - 2 (C_a C_b)^(1/2))."""
        from scipy import linalg

        (ma, ca), (mb, cb) = a, b
        covmean = linalg.sqrtm(ca @ cb)
        if np.iscomplexobj(covmean):
            covmean = covmean.real
        return float(max(0.0, ((ma - mb) ** 2).sum() + np.trace(ca + cb - 2.0 * covmean)))

    def distances(self, images: np.ndarray) -> dict[str, float]:
        """``{"to_target": ..., "to_source": ...}`` for uint8 ``[N, H, W, 3]`` images (N >= 2)."""
        s = self._stats((image_features(images) - self.mu) / self.sd)
        return {"to_target": self.frechet(s, self.target_stats), "to_source": self.frechet(s, self.source_stats)}
