"""Pictures and a statistic of a trained target DDPM: does phi^n move source images to the target?

Rows of the grid: source images, phi^n(source) for a few n up to T (phi^T is a
sample from noise), and real target-train images. Next to it, JSON with the
domain classifier's target score (:mod:`dass_ray.domain_stats`) of each row.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..checkpoints import atomic_write_json
from ..config import ExperimentConfig, GuidanceConfig
from . import common


def phi_n(cfg: ExperimentConfig, unet, images: np.ndarray, n: int, ids: Sequence[str]) -> np.ndarray:
    """Unguided phi^n of uint8 [B,H,W,3] images -> uint8 [B,H,W,3]."""
    from ..data.transforms import from_diffusion, to_diffusion
    from ..diffusion.schedule import DDPMSchedule
    from ..translate import translate_level

    x = to_diffusion(images)
    y = torch.zeros(x.shape[0], *x.shape[-2:], dtype=torch.long)
    out = translate_level(x, y, n, None, unet, DDPMSchedule(cfg.diffusion), GuidanceConfig(scale=0.0, arrangement="none"),
                          cfg.data.num_classes, ids=list(ids), seed=cfg.seed, steps=cfg.diffusion.sample_steps)
    return from_diffusion(out)


def sample_grid(cfg: ExperimentConfig, unet_path: Path, out_png: Path, count: int = 8,
                levels: Optional[list[int]] = None, stat_count: int = 64) -> Path:
    """The grid (``count`` images a row) and, in ``<out_png>.json``, per row the classifier's
    target score and the Fréchet feature distances to target / source (``stat_count`` images
    a row, held out of the statistics' fit)."""
    from ..diffusion.unet import load_unet
    from ..domain_stats import DomainClassifier, DomainGap
    from ..pictures import grid, save_png

    torch.set_num_threads(max(1, torch.get_num_threads()))
    from ..translate import for_translation

    unet = for_translation(load_unet(unet_path, cfg.diffusion), precision=cfg.diffusion.precision)
    src = common.load(cfg, cfg.data.source_domain, cfg.data.source_split, labels=False)
    tgt = common.load(cfg, cfg.data.target_domain, cfg.data.target_train_split, labels=False)
    m = max(count, min(stat_count, len(src.ids) // 2, len(tgt.ids) // 2))
    ids = src.ids[:m]
    T = cfg.diffusion.num_train_timesteps
    levels = levels or sorted({max(1, cfg.ptl.N // 2), cfg.ptl.N, T})
    rows = [src.images[:count]]
    # fitted on images other than the ones scored below (held out)
    clf = DomainClassifier.fit(src.images[m:m + 500], tgt.images[m:m + 500], seed=cfg.seed)
    gap = DomainGap.fit(src.images[m:m + 500], tgt.images[m:m + 500])
    scores = {"source": clf.target_score(src.images[:m])}
    dist = {"source": gap.distances(src.images[:m])}
    for n in levels:
        img = phi_n(cfg, unet, src.images[:m], n, ids)
        rows.append(img[:count])
        scores[f"phi_{n}"] = clf.target_score(img)
        dist[f"phi_{n}"] = gap.distances(img)
    rows.append(tgt.images[:count])
    scores["target"] = clf.target_score(tgt.images[:m])
    dist["target"] = gap.distances(tgt.images[:m])
    save_png(out_png, grid([list(r) for r in rows], scale=4 if src.images.shape[1] <= 64 else 1))
    atomic_write_json(out_png.with_suffix(".json"), {"rows": ["source", *[f"phi_{n}" for n in levels], "target"],
                                                     "target_score": scores, "frechet": dist,
                                                     "images_per_row_statistics": m,
                                                     "classifier_train_accuracy": clf.train_accuracy})
    return out_png
