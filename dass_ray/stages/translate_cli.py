"""``dass-ray translate``: one level of phi^n + SGG over source images, as a Ray Data job.

Output in ``--out``: ``translated/`` (Parquet, one row per image: id, level,
image, label, source, seed, segmenter_id, config_hash) and ``grid.png``
(source | label | translation for a few images).
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import numpy as np

from ..checkpoints import atomic_write_json
from ..config import ExperimentConfig
from . import common


def resolve_unet(cfg: ExperimentConfig, unet: Optional[str], run_dir: Path) -> Path:
    from .ddpm import DDPM_FILE, ddpm_dir

    if unet:
        p = Path(unet)
    elif cfg.diffusion.weights:
        p = Path(cfg.diffusion.weights)
    else:
        p = ddpm_dir(cfg, run_dir) / DDPM_FILE
    if not p.exists():
        raise FileNotFoundError(f"DDPM weights {str(p)!r} do not exist: train them first with "
                                f"`dass-ray train-ddpm CONFIG` (or pass --unet PATH)")
    return p


def translate_command(cfg: ExperimentConfig, out: Path, level: int, segmenter: Optional[str],
                      unet: Optional[str], limit: Optional[int]) -> dict:
    from ..data.layout import list_ids
    from ..pictures import grid, save_png, colorize
    from ..ray_utils import ensure_ray
    from .translator import translation_dataset, translation_rows

    if level < 0 or level > cfg.diffusion.num_train_timesteps:
        from ..config import ConfigError

        raise ConfigError(f"--level {level}: allowed 0..{cfg.diffusion.num_train_timesteps}")
    if segmenter and not Path(segmenter).exists():
        raise FileNotFoundError(f"segmenter checkpoint {segmenter!r} does not exist")
    if not segmenter and cfg.guidance.scale > 0 and cfg.guidance.arrangement != "none":
        # No --segmenter means phi^n (see the CLI help): without this the actors would be given a
        # guided config and no segmenter, and translate_level raises "guidance ... needs a segmenter".
        import dataclasses

        cfg = dataclasses.replace(cfg, guidance=dataclasses.replace(cfg.guidance, arrangement="none"))
    out.mkdir(parents=True, exist_ok=True)
    common.ensure_data(cfg)
    unet_path = resolve_unet(cfg, unet, out)
    ensure_ray(cfg.ray)
    ids = list_ids(common.data_root(cfg), cfg.data.source_domain, cfg.data.source_split)
    ids = ids[:limit] if limit else ids
    rows = translation_rows({level: ids}, cfg.ptl.translate_batch_size)
    t0 = time.time()
    ds = translation_dataset(cfg, rows, str(unet_path), {level: str(Path(segmenter).resolve()) if segmenter else None})
    ds = ds.materialize()
    dest = out / "translated"
    ds.write_parquet(str(dest.resolve()))
    seconds = time.time() - t0
    sample = ds.take(8)
    pics = [[r["source"] for r in sample], [colorize(r["label"]) for r in sample], [r["image"] for r in sample]]
    save_png(out / "grid.png", grid(pics, scale=4 if sample[0]["image"].shape[0] <= 64 else 1))
    count = ds.count()
    info = {"level": level, "images": count, "seconds": round(seconds, 2), "images_per_s": round(count / seconds, 2),
            "segmenter": segmenter, "unet": str(unet_path), "guided": bool(segmenter) and cfg.guidance.scale > 0}
    atomic_write_json(out / "translate.json", info)
    print(json.dumps(info, indent=2))
    return info
