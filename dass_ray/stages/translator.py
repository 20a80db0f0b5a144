"""The Ray Data actor that runs guided reverse diffusion (phi^n + SGG), and its datasets.

One actor holds one copy of the UNet and of the segmenter on its device.
Input rows are *translation batches*: ``{level: int, ids: list[str]}``, so a
batch never mixes levels (a level's segmenter g_{n-1} may not exist yet while
an earlier level is still training). The actor reads the source images and
labels of the ids itself, translates them with :func:`dass_ray.translate.translate_level`
and returns one row per image with provenance columns.

When a level's segmenter checkpoint is not yet published (PTL streams level
n+1 behind level n's fine-tuning), the actor waits for it.

A dead actor is restarted by Ray Data and its batch retried, at most
``ray.max_actor_restarts`` times per actor; with ``events_dir`` each actor keeps
the ids it is translating in ``inflight-<pid>.json`` there, so the batches that
were running when actors died can be named (:func:`crashed_batches`).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..checkpoints import checkpoint_id
from ..config import ExperimentConfig, from_dict


class TranslationActorError(RuntimeError):
    """Translation actors died more often than ``ray.max_actor_restarts`` allows (message only: it
    crosses the Ray Train worker / driver boundary pickled)."""


class Translator:
    """Callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy(size=k))``."""

    def __init__(self, config: dict, unet_path: str, segmenters: dict[int, Optional[str]], source_root: str,
                 source_domain: str, source_split: str, wait_timeout_s: float = 6 * 3600,
                 fail_after: Optional[int] = None, events_dir: Optional[str] = None):
        from ..data.layout import read_sample  # noqa: F401  (import cost paid once per actor)
        from ..diffusion.schedule import DDPMSchedule
        from ..diffusion.unet import load_unet
        from ..ray_utils import pick_device
        from ..translate import for_translation

        self.cfg: ExperimentConfig = from_dict(ExperimentConfig, config)
        r = self.cfg.ray
        torch.set_num_threads(r.threads_per_actor)
        self.device = pick_device(r.device, r.gpus_per_actor)
        self.unet = for_translation(load_unet(unet_path, self.cfg.diffusion), self.device,
                                    self.cfg.diffusion.precision)
        self.schedule = DDPMSchedule(self.cfg.diffusion).to(self.device)
        self.segmenters = {int(k): v for k, v in segmenters.items()}
        self.root = Path(source_root)
        self.domain, self.split = source_domain, source_split
        self.wait_timeout_s = wait_timeout_s
        self.config_hash = self.cfg.hash()
        self._seg_path: Optional[str] = None
        self._seg = None
        self._seg_id = "none"
        self.batches = 0
        self.fail_after = fail_after  # fault injection for the reliability tests
        self.events_dir = Path(events_dir) if events_dir else None
        if events_dir:
            # one file per actor start: a start beyond the pool size is a restart after a crash
            # (counted per level by the PTL loop; the test reads the PID to kill an actor)
            from ..checkpoints import atomic_write_json

            atomic_write_json(Path(events_dir) / f"actor-{os.getpid()}-{time.time_ns()}.json",
                              {"pid": os.getpid(), "time": time.time()})

    # ------------------------------------------------------------------ segmenter per level
    def _segmenter(self, level: int):
        path = self.segmenters.get(level)
        if path is None or not self._guided():
            return None, "none"
        if path != self._seg_path:
            side = Path(path + ".sha256")
            t0 = time.time()
            while not side.exists():  # published by the training loop when level n-1 is done
                if time.time() - t0 > self.wait_timeout_s:
                    raise TimeoutError(f"segmenter checkpoint {path} for level {level} never appeared")
                time.sleep(0.2)
            from ..seg_training import load_trained
            from ..translate import for_translation

            seg = load_trained(Path(path), self.cfg.segmenter, self.cfg.data.num_classes)
            self._seg = for_translation(seg, self.device, self.cfg.guidance.precision)
            self._seg_path = path
            self._seg_id = checkpoint_id(path)
        return self._seg, self._seg_id

    def _guided(self) -> bool:
        g = self.cfg.guidance
        return g.scale > 0 and g.arrangement != "none"

    # ------------------------------------------------------------------ batches
    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from ..data.layout import read_sample
        from ..data.transforms import from_diffusion, to_diffusion
        from ..translate import translate_level

        inflight = None
        if self.events_dir is not None:
            # left behind if this process dies on the batch: names the batch that killed the actor
            from ..checkpoints import atomic_write_json

            inflight = self.events_dir / f"inflight-{os.getpid()}.json"
            atomic_write_json(inflight, {"pid": os.getpid(), "ids": [str(i) for ids in batch["ids"] for i in ids]})
        if self.fail_after is not None and self.batches >= self.fail_after:
            os._exit(1)  # simulated actor crash (reliability test); Ray Data restarts the actor
        self.batches += 1
        out: dict[str, list] = {k: [] for k in ("id", "level", "image", "label", "source", "seed",
                                                "segmenter_id", "config_hash")}
        for level, ids in zip(batch["level"], batch["ids"]):
            level = int(level)
            ids = [str(i) for i in ids]
            pairs = [read_sample(self.root, self.domain, self.split, i, self.cfg.data.num_classes) for i in ids]
            src = np.stack([p[0] for p in pairs])
            lbl = np.stack([p[1] for p in pairs])
            seg, seg_id = self._segmenter(level)
            x = to_diffusion(src).to(self.device)
            y = torch.from_numpy(lbl.astype(np.int64)).to(self.device)
            xt = translate_level(x, y, level, seg, self.unet, self.schedule, self.cfg.guidance,
                                 self.cfg.data.num_classes, ids=ids, seed=self.cfg.seed,
                                 steps=self.cfg.diffusion.sample_steps)
            img = from_diffusion(xt.cpu())
            for j, i in enumerate(ids):
                out["id"].append(i)
                out["level"].append(level)
                out["image"].append(img[j])
                out["label"].append(lbl[j])
                out["source"].append(src[j])
                out["seed"].append(self.cfg.seed)
                out["segmenter_id"].append(seg_id)
                out["config_hash"].append(self.config_hash)
        if inflight is not None:
            inflight.unlink(missing_ok=True)
        return {k: np.stack(v) if k in ("image", "label", "source") else np.asarray(v) for k, v in out.items()}


def crashed_batches(events_dir: str | os.PathLike) -> list[tuple[list[str], int]]:
    """(ids, number of actor processes that died on them) of the batches left in flight in
    ``events_dir``, most often first. A batch an actor was still translating when the level
    failed is listed too, with a count of 1."""
    counts: dict[tuple[str, ...], int] = {}
    for f in sorted(Path(events_dir).glob("inflight-*.json")):
        try:
            ids = tuple(json.loads(f.read_text())["ids"])
        except (OSError, ValueError, KeyError):
            continue
        counts[ids] = counts.get(ids, 0) + 1
    return [(list(ids), k) for ids, k in sorted(counts.items(), key=lambda kv: -kv[1])]


def translation_rows(ids_per_level: dict[int, list[str]], batch_size: int) -> list[dict]:
    """Rows ``{level, ids}`` of at most ``batch_size`` ids, level by level, in order."""
    rows = []
    for level in sorted(ids_per_level):
        ids = ids_per_level[level]
        for i in range(0, len(ids), batch_size):
            rows.append({"level": level, "ids": list(ids[i : i + batch_size])})
    return rows


def translation_dataset(cfg: ExperimentConfig, rows: list[dict], unet_path: str, segmenters: dict[int, Optional[str]],
                        fail_after: Optional[int] = None, events_dir: Optional[str] = None):
    """A lazy Ray dataset: the rows (one translation batch per block, so batches never merge across
    levels) through an actor pool of :class:`Translator`."""
    from ..ray_utils import actor_pool_dataset
    from .common import data_root

    r = cfg.ray
    return actor_pool_dataset(
        rows, Translator, r,
        dict(config=cfg.to_dict(), unet_path=str(unet_path), segmenters={int(k): v for k, v in segmenters.items()},
             source_root=str(data_root(cfg)), source_domain=cfg.data.source_domain,
             source_split=cfg.data.source_split, fail_after=fail_after, events_dir=events_dir),
        # Ray 2.60's actor pool defaults to max_restarts=-1: a batch that kills its actor every
        # time is retried forever. Measured: with max_restarts=k an actor starts k+1 times, then
        # the iterator raises ActorDiedError. max_task_retries=-1 retries the batch in flight on
        # the restarted actor (with 0 it is lost: ActorUnavailableError at the first crash); it
        # is bounded by the restarts.
        max_restarts=r.max_actor_restarts, max_task_retries=-1)
