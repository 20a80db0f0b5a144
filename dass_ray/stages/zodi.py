"""Stages of the ``zodi`` method (ZoDi, DESIGN.md section 4): transfer, adaptation, evaluation.

1. **Transfer** (:func:`run_transfer`): the source split through a Ray Data
   actor pool of :class:`ZodiTransferActor` (ControlNet + stochastic inversion,
   :func:`dass_ray.zodi.zodi_transfer`). Input rows are transfer batches
   ``{ids: list[str]}`` of ``zodi.batch_size`` ids; each actor builds the
   diffusion components once and reads the images and labels of its ids
   itself. Output, streamed to disk as it arrives: ``transferred.parquet``
   (``id``, ``image_png`` and the provenance ``prompt, strength, start_step,
   steps, mode, seed, weights_id, config_hash``; written to a temporary file
   and renamed, so a published file is always complete) and
   ``images/<id>.png``. Every source id comes out exactly once (else the
   stage fails naming the missing / duplicate ids) and the output is
   deterministic for ``zodi.seed`` (the noise of a sample is seeded by
   ``(seed, id)``, independent of batching and actors). Re-running with the
   same transfer hash (:func:`transfer_hash`) reuses the file. A dead actor is
   restarted and its batch retried at most ``ray.max_actor_restarts`` times per
   actor; after that the transfer fails with :class:`ZodiTransferActorError`
   and publishes nothing.
2. **Adaptation** (:func:`adapt_loop`, Ray Train): ZoDi's Eq. 6-8,
   ``L = CE(H(F(I)), y) + CE(H(F(I')), y) + lambda (1 - cos(F(I), F(I')))``
   with ``lambda = segmenter.similarity_weight`` (0.1 in the paper), SGD with a
   poly learning rate over ``segmenter.source_iters`` iterations. The source
   image I and its transfer I' are paired **by id** (never by directory
   order, a flaw of the public code) and get **the same** random crop and
   flip, as does the label (:func:`paired_transform`).
3. **Evaluation** of the adapted model on the target val split, a grid
   source | control map | transferred, metrics and MLflow child runs
   (:func:`run_zodi_stages`).
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from ..checkpoints import atomic_write_bytes, atomic_write_json
from ..config import ExperimentConfig, from_dict
from . import common

TRANSFER_FILE = "transferred.parquet"
MANIFEST_FILE = "transfer.json"
IMAGES_DIR = "images"
ADAPTED_FILE = "adapted.safetensors"
LAST_FILE = "last.safetensors"
GRID_IDS = 8

# The data fields that decide what the transfer reads (crop, flip and the target
# splits only matter for training / evaluation).
_TRANSFER_DATA_KEYS = ("dataset", "root", "source_domain", "source_split", "num_classes", "image_size",
                       "skip_bad", "max_samples", "seed")


class ZodiTransferActorError(RuntimeError):
    """A transfer actor died more often than ``ray.max_actor_restarts`` allows."""


# --------------------------------------------------------------------------- helpers

def transfer_hash(cfg: ExperimentConfig) -> str:
    """A short hash of everything the transferred images depend on (zodi section + source data)."""
    data = cfg.to_dict()["data"]
    blob = {
        "zodi": cfg.to_dict()["zodi"],
        "data": {k: data[k] for k in _TRANSFER_DATA_KEYS},
        "root": str(common.data_root(cfg)),
        "version": 1,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:16]


def source_ids(cfg: ExperimentConfig) -> list[str]:
    """The source ids the transfer covers: the sorted split, the first ``data.max_samples``."""
    from ..data.layout import list_ids

    ids = list_ids(common.data_root(cfg), cfg.data.source_domain, cfg.data.source_split)
    return ids[: cfg.data.max_samples] if cfg.data.max_samples else ids


def transfer_rows(ids: list[str], batch_size: int) -> list[dict]:
    """Rows ``{ids}`` of at most ``batch_size`` ids each, in order."""
    return [{"ids": list(ids[i : i + batch_size])} for i in range(0, len(ids), batch_size)]


def generation_size(cfg: ExperimentConfig) -> int:
    """Image side the tiny random components are configured for (their ``sample_size``)."""
    if cfg.zodi.resolution is not None:
        return int(cfg.zodi.resolution[0])
    if cfg.data.image_size is not None:
        return int(cfg.data.image_size[0])
    return 32


def build_components(cfg: ExperimentConfig, device):
    """Tiny random components (``zodi.tiny_random``) or SD 1.5 + ControlNet from local directories."""
    from ..config import ConfigError
    from ..zodi import load_components, tiny_random_components

    z = cfg.zodi
    if z.tiny_random:
        return tiny_random_components(seed=z.seed, image_size=generation_size(cfg),
                                      with_controlnet=z.mode in ("zodi", "no_si")).to(device)
    if not z.base_model:
        raise ConfigError("config key 'zodi.base_model': got None; allowed: a local diffusers directory of "
                          "Stable Diffusion 1.5 (or set zodi.tiny_random: true for a smoke run)")
    return load_components(z.base_model, z.controlnet if z.mode in ("zodi", "no_si") else None, device=device)


def _png(img: np.ndarray) -> bytes:
    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    return b.getvalue()


def _unpng(data: bytes) -> np.ndarray:
    from PIL import Image

    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=np.uint8)


def _column(arrays: list[np.ndarray]) -> np.ndarray:
    """Stack equal-shaped images; a ragged batch becomes an object array (Ray makes a ragged tensor)."""
    if arrays and all(a.shape == arrays[0].shape for a in arrays):
        return np.stack(arrays)
    out = np.empty(len(arrays), dtype=object)
    out[:] = arrays
    return out


def _shown(ids: list[str], n: int = 10) -> str:
    return ", ".join(ids[:n]) + (f" and {len(ids) - n} more" if len(ids) > n else "")


# --------------------------------------------------------------------------- transfer actor

class ZodiTransferActor:
    """Callable class for ``Dataset.map_batches(..., compute=ActorPoolStrategy(size=k), batch_size=1)``.

    Rows in: ``{ids: list[str]}`` (one transfer batch). Rows out, one per image:
    ``id, image (uint8 [H, W, 3]), prompt, strength, start_step, steps, mode,
    seed, weights_id, config_hash, error, t_start, t_end`` (``error`` is empty, or the
    :class:`~dass_ray.data.layout.DataError` of a bad sample skipped under
    ``data.skip_bad``; its image is then a black placeholder). The images have
    the size of the source sample after ``data.image_size`` (the transfer runs
    at ``zodi.resolution`` and is resized back), so they stay paired with the
    source labels. ``t_start`` / ``t_end`` (``time.time()``) bound the call that
    made the row's batch: actor compute time, apart from start-up and queueing.

    Also usable in-process without Ray (the tests call it directly).
    """

    def __init__(self, config: dict, source_root: Optional[str] = None, fail_after: Optional[int] = None):
        import torch

        from ..ray_utils import pick_device
        from ..zodi import resolve_palette, resolve_prompt, resolve_strength, weights_id
        from ..zodi.transfer import k_from_strength

        self.cfg: ExperimentConfig = from_dict(ExperimentConfig, config)
        r, z = self.cfg.ray, self.cfg.zodi
        torch.set_num_threads(r.threads_per_actor)
        self.device = pick_device(r.device, r.gpus_per_actor)
        self.root = Path(source_root) if source_root else common.data_root(self.cfg)
        self.comps = build_components(self.cfg, self.device)
        self.palette = resolve_palette(self.cfg.data.num_classes, z.class_palette)
        self.prompt = resolve_prompt(z)
        self.strength = resolve_strength(z)
        self.start_step = k_from_strength(int(self.comps.scheduler.config.num_train_timesteps), self.strength)
        self.weights_id = weights_id(self.comps)
        self.config_hash = transfer_hash(self.cfg)
        self.batches = 0
        self.fail_after = fail_after  # fault injection for the reliability tests

    def _read(self, sample_id: str) -> tuple[np.ndarray, np.ndarray]:
        from ..data.layout import read_sample
        from ..data.transforms import resize_pair

        d = self.cfg.data
        img, lbl = read_sample(self.root, d.source_domain, d.source_split, sample_id, d.num_classes)
        if d.image_size is not None:
            img, lbl = resize_pair(img, lbl, d.image_size)
        return img, lbl

    def transfer(self, ids: list[str]) -> dict[str, list]:
        """Transfer the samples ``ids``; columns as lists (see the class doc)."""
        import torch

        from ..data.layout import DataError
        from ..data.transforms import from_diffusion, to_diffusion
        from ..zodi import zodi_transfer

        good: list[tuple[str, np.ndarray, np.ndarray]] = []
        errors: dict[str, str] = {}
        for i in ids:
            try:
                img, lbl = self._read(i)
            except DataError as e:
                if not self.cfg.data.skip_bad:
                    raise
                errors[i] = str(e)
                continue
            good.append((i, img, lbl))
        outputs: dict[str, np.ndarray] = {}
        # same-size samples go through zodi_transfer together (sizes differ only without data.image_size)
        by_shape: dict[tuple, list[int]] = {}
        for j, (_, img, _) in enumerate(good):
            by_shape.setdefault(img.shape, []).append(j)
        for members in by_shape.values():
            gid = [good[j][0] for j in members]
            x = to_diffusion(np.stack([good[j][1] for j in members])).to(self.device)
            y = torch.from_numpy(np.stack([good[j][2] for j in members]).astype(np.int64)).to(self.device)
            xt = zodi_transfer(x, y, self.comps, self.cfg.zodi, self.palette, gid, seed=self.cfg.zodi.seed)
            for i, im in zip(gid, from_diffusion(xt.cpu())):
                outputs[i] = im
        fallback = next(iter(outputs.values())).shape if outputs else (8, 8, 3)
        z = self.cfg.zodi
        out: dict[str, list] = {k: [] for k in ("id", "image", "prompt", "strength", "start_step", "steps", "mode",
                                                "seed", "weights_id", "config_hash", "error")}
        for i in ids:  # input order
            out["id"].append(i)
            out["image"].append(outputs[i] if i in outputs else np.zeros(fallback, np.uint8))
            out["prompt"].append(self.prompt)
            out["strength"].append(self.strength)
            out["start_step"].append(self.start_step)
            out["steps"].append(z.steps)
            out["mode"].append(z.mode)
            out["seed"].append(z.seed)
            out["weights_id"].append(self.weights_id)
            out["config_hash"].append(self.config_hash)
            out["error"].append(errors.get(i, ""))
        return out

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        if self.fail_after is not None and self.batches >= self.fail_after:
            os._exit(1)  # simulated actor crash (reliability test); Ray Data restarts the actor
        self.batches += 1
        cols: dict[str, list] = {}
        for ids in batch["ids"]:
            t_start = time.time()
            part = self.transfer([str(i) for i in ids])
            part["t_start"] = [t_start] * len(part["id"])
            part["t_end"] = [time.time()] * len(part["id"])
            for k, v in part.items():
                cols.setdefault(k, []).extend(v)
        return {k: (_column(v) if k == "image" else np.asarray(v)) for k, v in cols.items()}


def transfer_dataset(cfg: ExperimentConfig, rows: list[dict], fail_after: Optional[int] = None):
    """A lazy Ray dataset: the rows through an actor pool of :class:`ZodiTransferActor`.

    ``fail_after``: TEST-ONLY fault injection, each actor process exits when handed its
    ``(fail_after + 1)``-th batch (0: on every batch)."""
    from ..ray_utils import actor_pool_dataset

    return actor_pool_dataset(rows, ZodiTransferActor, cfg.ray,
                              dict(config=cfg.to_dict(), source_root=str(common.data_root(cfg)), fail_after=fail_after),
                              # as for PTL translation (translator.translation_dataset): Ray 2.60's default,
                              # max_restarts=-1, retries a batch that kills its actor forever; with k the
                              # actor starts k+1 times, then the iterator raises (run_transfer names it).
                              # max_task_retries=-1 retries the batch in flight on the restarted actor.
                              max_restarts=cfg.ray.max_actor_restarts, max_task_retries=-1)


# --------------------------------------------------------------------------- transfer stage

_SCHEMA_FIELDS = (("id", "string"), ("image_png", "binary"), ("prompt", "string"), ("strength", "float64"),
                  ("start_step", "int32"), ("steps", "int32"), ("mode", "string"), ("seed", "int64"),
                  ("weights_id", "string"), ("config_hash", "string"))


def _schema(config_hash: str):
    import pyarrow as pa

    return pa.schema([pa.field(n, getattr(pa, t)()) for n, t in _SCHEMA_FIELDS],
                     metadata={"dass_ray.config_hash": config_hash})


def read_transferred(path: str | os.PathLike, columns: Optional[list[str]] = None):
    """The transferred rows as a ``pyarrow.Table``."""
    import pyarrow.parquet as pq

    return pq.read_table(str(path), columns=columns)


def _parquet_hash(path: Path) -> Optional[str]:
    import pyarrow.parquet as pq

    try:
        meta = pq.read_schema(str(path)).metadata or {}
    except Exception:
        return None
    v = meta.get(b"dass_ray.config_hash")
    return v.decode() if v else None


def check_exactly_once(expected: list[str], seen: list[str]) -> None:
    """Raise ``RuntimeError`` naming missing, duplicate and unexpected ids unless ``seen`` is a permutation of ``expected``."""
    counts = Counter(seen)
    exp = set(expected)
    missing = sorted(exp - set(counts))
    dups = sorted(i for i, c in counts.items() if c > 1)
    extra = sorted(set(counts) - exp)
    if missing or dups or extra:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing: {_shown(missing)}")
        if dups:
            parts.append(f"{len(dups)} duplicated: {_shown([f'{i} (x{counts[i]})' for i in dups])}")
        if extra:
            parts.append(f"{len(extra)} not in the source split: {_shown(extra)}")
        raise RuntimeError("zodi transfer: every source id must come out exactly once; " + "; ".join(parts))


def _actor_died(e: BaseException) -> bool:
    """Ray's actor-death error, as Ray Data 2.60 raises it from ``iter_batches`` once an actor's
    restarts are used up (measured: the bare ``ActorDiedError``, a ``RayActorError``; not wrapped
    in a ``RayTaskError``). Imports Ray only on this failure path."""
    import sys

    if "ray" not in sys.modules:  # an in-process rows_source (tests): Ray was never involved
        return False
    import ray.exceptions

    return isinstance(e, ray.exceptions.RayActorError)


def _restore_pngs(parquet: Path, images: Path) -> int:
    """Write ``images/<id>.png`` for rows whose PNG is missing (a resumed run); return how many."""
    t = read_transferred(parquet, ["id", "image_png"])
    n = 0
    for i, b in zip(t.column("id").to_pylist(), t.column("image_png").to_pylist()):
        p = images / f"{i}.png"
        if not p.exists():
            atomic_write_bytes(p, b)
            n += 1
    return n


def run_transfer(cfg: ExperimentConfig, out_dir: str | os.PathLike, log: Callable[[str], None] = print,
                 rows_source: Optional[Callable[[ExperimentConfig, list[dict]], Any]] = None,
                 fail_after: Optional[int] = None) -> dict:
    """Transfer the source split into ``out_dir`` (parquet + PNGs + ``transfer.json``); return the manifest.

    Needs a running Ray (``ray_utils.ensure_ray``). Skips the work when
    ``out_dir`` already holds a complete transfer with the same
    :func:`transfer_hash` (``resumed: True`` in the result). ``rows_source``
    replaces :func:`transfer_dataset` (an iterable of numpy batches; tests).
    Actors that died with no restart left raise :class:`ZodiTransferActorError`;
    ``fail_after`` is :func:`transfer_dataset`'s TEST-ONLY fault injection.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    h = transfer_hash(cfg)
    parquet, manifest_path, images = out / TRANSFER_FILE, out / MANIFEST_FILE, out / IMAGES_DIR
    if parquet.exists() and manifest_path.exists():
        m = json.loads(manifest_path.read_text())
        if m.get("config_hash") == h and _parquet_hash(parquet) == h:
            images.mkdir(exist_ok=True)
            restored = _restore_pngs(parquet, images)
            log(f"[zodi] transfer already done ({m['images']} images, hash {h})"
                + (f"; restored {restored} PNGs" if restored else ""))
            return {**m, "resumed": True}
        log(f"[zodi] {parquet} has another transfer hash ({_parquet_hash(parquet)} != {h}): transferring again")
    if images.exists():
        shutil.rmtree(images)
    images.mkdir()

    ids = source_ids(cfg)
    rows = transfer_rows(ids, cfg.zodi.batch_size)
    log(f"[zodi] transferring {len(ids)} source images ({cfg.data.source_domain}/{cfg.data.source_split}) "
        f"in {len(rows)} batches of {cfg.zodi.batch_size} on {cfg.ray.num_actors} actor(s)")
    t0 = time.time()
    if rows_source is None:
        ds = transfer_dataset(cfg, rows, fail_after=fail_after)
        batches = ds.iter_batches(batch_size=None, batch_format="numpy")
    else:
        batches = rows_source(cfg, rows)
    seen: list[str] = []
    skipped: list[dict] = []
    provenance: dict[str, Any] = {}
    spans: dict[tuple[float, float], None] = {}  # (t_start, t_end) of each actor call
    tmp_path = out / f".{TRANSFER_FILE}.{os.getpid()}.tmp"
    writer = pq.ParquetWriter(str(tmp_path), _schema(h))
    try:
        for b in batches:
            cols: dict[str, list] = {n: [] for n, _ in _SCHEMA_FIELDS}
            for j in range(len(b["id"])):
                i = str(b["id"][j])
                seen.append(i)
                if "t_start" in b:
                    spans[(float(b["t_start"][j]), float(b["t_end"][j]))] = None
                if str(b["error"][j]):
                    skipped.append({"id": i, "error": str(b["error"][j])})
                    continue
                if str(b["config_hash"][j]) != h:
                    raise RuntimeError(f"zodi transfer: row {i} has config hash {b['config_hash'][j]}, expected {h}")
                png = _png(np.asarray(b["image"][j], dtype=np.uint8))
                atomic_write_bytes(images / f"{i}.png", png)
                cols["id"].append(i)
                cols["image_png"].append(png)
                for name in ("prompt", "mode", "weights_id", "config_hash"):
                    cols[name].append(str(b[name][j]))
                cols["strength"].append(float(b["strength"][j]))
                for name in ("start_step", "steps", "seed"):
                    cols[name].append(int(b[name][j]))
                provenance = {k: cols[k][-1] for k in ("prompt", "strength", "start_step", "steps", "mode", "seed",
                                                       "weights_id")}
            if cols["id"]:
                writer.write_table(pa.table(cols, schema=_schema(h)))
        writer.close()
        seconds = time.time() - t0
        check_exactly_once(ids, seen)
        with open(tmp_path, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp_path, parquet)
    except BaseException as e:
        writer.close()
        if tmp_path.exists():
            tmp_path.unlink()
        if _actor_died(e):
            from ..ray_utils import error_summary

            raise ZodiTransferActorError(
                f"zodi transfer failed: a transfer actor died more than ray.max_actor_restarts="
                f"{cfg.ray.max_actor_restarts} time(s) (Ray: {error_summary(e)}); {len(seen)} of "
                f"{len(ids)} source ids had come out. The transfer is all-or-nothing: nothing was published "
                f"({TRANSFER_FILE} and {MANIFEST_FILE} are not written) and re-running the same command "
                f"transfers all {len(ids)} ids again (if the crashes are sporadic, raise ray.max_actor_restarts)."
            ) from e
        raise
    n_ok = len(seen) - len(skipped)
    manifest = {
        "config_hash": h,
        "images": n_ok,
        "skipped": skipped,
        "source": f"{cfg.data.source_domain}/{cfg.data.source_split}",
        "seconds": round(seconds, 2),
        "images_per_s": round(n_ok / max(seconds, 1e-9), 3),
        "actor_busy_s": round(sum(e - s for s, e in spans), 2),
        # until the first actor call began: actor start-up (imports, components) + scheduling
        "actor_startup_s": round(min(s for s, _ in spans) - t0, 2) if spans else None,
        "num_actors": cfg.ray.num_actors,
        "batch_size": cfg.zodi.batch_size,
        **provenance,
    }
    atomic_write_json(manifest_path, manifest)
    log(f"[zodi] transferred {n_ok} images in {seconds:.1f}s ({manifest['images_per_s']:.2f} img/s)"
        + (f", skipped {len(skipped)} bad samples" if skipped else ""))
    return {**manifest, "resumed": False}


# --------------------------------------------------------------------------- adaptation

def paired_transform(transform, src: np.ndarray, trans: np.ndarray, lbl: np.ndarray,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Apply ``transform`` (a :class:`~dass_ray.data.transforms.PairTransform`) to a source image, its
    transferred image and their label with **one** random draw: the same crop window and the same flip.

    One integer is drawn from ``rng`` and seeds a fresh generator for each of the two
    calls, so both replay the identical random stream.
    """
    if src.shape != trans.shape or src.shape[:2] != lbl.shape:
        raise ValueError(f"paired_transform: source {src.shape}, transferred {trans.shape} and label "
                         f"{lbl.shape} must have the same height and width")
    seed = int(rng.integers(0, 2**63 - 1))
    s, ls = transform(src, lbl, np.random.default_rng(seed))
    t, lt = transform(trans, lbl, np.random.default_rng(seed))
    if not np.array_equal(ls, lt):  # cannot happen with a PairTransform; guards other transforms
        raise RuntimeError("paired_transform: the transform drew different geometry for a pair")
    return s, t, ls


class PairReader:
    """Reads ``(source image, transferred image, label)`` by id: the pair is joined on the id."""

    def __init__(self, cfg: ExperimentConfig, images_dir: Path, source_root: Optional[Path] = None):
        self.cfg = cfg
        self.images_dir = Path(images_dir)
        self.root = source_root or common.data_root(cfg)

    def __call__(self, sample_id: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        from ..data.layout import DataError, read_image, read_sample
        from ..data.transforms import resize_pair

        d = self.cfg.data
        src, lbl = read_sample(self.root, d.source_domain, d.source_split, sample_id, d.num_classes)
        if d.image_size is not None:
            src, lbl = resize_pair(src, lbl, d.image_size)
        p = self.images_dir / f"{sample_id}.png"
        trans = read_image(p)
        if trans.shape != src.shape:
            raise DataError(f"{p}: transferred image {trans.shape} does not match its source {src.shape} "
                            f"(id {sample_id})")
        return src, trans, lbl


def sample_pairs(reader: PairReader, ids: list[str], batch: int, rng: np.random.Generator, transform):
    """A random batch of pairs -> ``(x_trans, x_src, y)``: ``float32 [B, 3, H, W]`` x2, ``int64 [B, H, W]``."""
    import torch

    from ..data.transforms import to_diffusion

    pick = rng.integers(0, len(ids), size=batch)
    srcs, transs, lbls = [], [], []
    for k in pick:
        s, t, l = reader(ids[int(k)])
        s, t, l = paired_transform(transform, s, t, l, rng)
        srcs.append(s)
        transs.append(t)
        lbls.append(l)
    return (to_diffusion(np.stack(transs)), to_diffusion(np.stack(srcs)),
            torch.from_numpy(np.stack(lbls).astype(np.int64)))


def adapt_loop(loop_config: dict) -> None:
    """Ray Train worker loop: ZoDi adaptation (Eq. 6-8) on source + transferred pairs."""
    import ray.train
    import ray.train.torch
    import torch

    from ..data.transforms import PairTransform
    from ..ray_utils import train_device
    from ..seg_training import poly_lr, start_training

    cfg = common.worker_config(loop_config)
    out = Path(loop_config["out_dir"])
    ids: list[str] = list(loop_config["ids"])
    rank, world = common.rank_info()
    common.env_threads(cfg.ray.worker_threads())
    device = train_device(cfg.ray.device, cfg.ray.gpus_per_worker)
    s = cfg.segmenter

    trainer, start = start_training(s, cfg.data.num_classes, device, world, cfg.seed, out / LAST_FILE, "zodi")
    # sizes were applied when reading (data.image_size); crop and flip here, shared by each pair
    transform = PairTransform(crop_size=tuple(cfg.data.crop_size) if cfg.data.crop_size else None,
                              flip=cfg.data.flip, train=True)
    reader = PairReader(cfg, Path(loop_config["images_dir"]), Path(loop_config["source_root"]))
    history_path = out / "loss_history.json"
    history = json.loads(history_path.read_text()) if (history_path.exists() and start) else []
    sums: dict[str, float] = {}
    count, t0 = 0, time.time()
    # history + last checkpoint 10 times a run. ray.train.report is called once at the end
    # only: in Ray Train 2.60 each report blocks ~1.6 s (measured here), longer than a toy step.
    every = max(1, s.source_iters // 10)
    rec: dict[str, float] = {}
    for it in range(start, s.source_iters):
        rng = common.seeded_rng(cfg.seed, it, rank, 11)
        x_t, x_s, y = sample_pairs(reader, ids, s.batch_size, rng, transform)
        trainer.set_lr(poly_lr(s.lr, it, s.source_iters))
        parts = trainer.step_pair(x_t, x_s, y, l_src=True, similarity_weight=s.similarity_weight)
        for k, v in parts.items():
            sums[k] = sums.get(k, 0.0) + float(v)
        count += 1
        done = it + 1
        if done % every == 0 or done == s.source_iters:
            rec = {"iter": done, **{k: v / count for k, v in sums.items()}, "s": time.time() - t0}
            sums, count = {}, 0
            if rank == 0:
                history.append(rec)
                print(f"[zodi] adapt iter {done}/{s.source_iters} loss {rec['loss']:.4f}")
                trainer.save(out / LAST_FILE, {"iter": done})
                atomic_write_json(history_path, history)
    if rank == 0:
        trainer.save(out / ADAPTED_FILE, {"iter": s.source_iters, "method": "zodi"})
        atomic_write_json(history_path, history)
    ray.train.report({k: v for k, v in rec.items() if isinstance(v, (int, float))})


def run_adapt(cfg: ExperimentConfig, out_dir: Path, transfer_dir: Path, log: Callable[[str], None] = print) -> Path:
    """Train the segmenter on source + transferred pairs (Ray Train); return ``adapted.safetensors``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    ids = read_transferred(transfer_dir / TRANSFER_FILE, ["id"]).column("id").to_pylist()
    if not ids:
        raise RuntimeError(f"zodi adaptation: {transfer_dir / TRANSFER_FILE} holds no transferred image")
    t0 = time.time()
    common.fit(adapt_loop, {"out_dir": str(out_dir.resolve()), "ids": ids,
                            "images_dir": str((transfer_dir / IMAGES_DIR).resolve()),
                            "source_root": str(common.data_root(cfg))},
               cfg, out_dir.parent, name="zodi_adapt", max_failures=2)
    log(f"[zodi] adapted in {time.time() - t0:.0f}s on {len(ids)} pairs -> {out_dir / ADAPTED_FILE}")
    return out_dir / ADAPTED_FILE


# --------------------------------------------------------------------------- pictures + orchestration

def transfer_grid(cfg: ExperimentConfig, transfer_dir: Path, n: int = GRID_IDS, max_width: int = 512) -> np.ndarray:
    """Rows ``source | control map | transferred`` for the first ``n`` transferred ids (uint8 picture)."""
    import torch

    from ..data.transforms import resize_pair
    from ..pictures import grid
    from ..zodi import control_map, resolve_palette

    ids = read_transferred(transfer_dir / TRANSFER_FILE, ["id"]).column("id").to_pylist()[:n]
    reader = PairReader(cfg, transfer_dir / IMAGES_DIR)
    palette = resolve_palette(cfg.data.num_classes, cfg.zodi.class_palette)
    rows = []
    for i in ids:
        src, trans, lbl = reader(i)
        h, w = lbl.shape
        if w > max_width:
            size = (max(1, round(h * max_width / w)), max_width)
            src, lbl = resize_pair(src, lbl, size)
            trans, _ = resize_pair(trans, None, size)
        ctrl = control_map(torch.from_numpy(lbl.astype(np.int64))[None], lbl.shape, palette)[0]
        ctrl = (ctrl.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
        rows.append([src, ctrl, trans])
    h = rows[0][0].shape[0]
    return grid(rows, scale=4 if h <= 64 else 1)


def run_zodi_stages(cfg: ExperimentConfig, rd, metrics: dict, tracker=None,
                    log: Callable[[str], None] = print) -> Path:
    """Transfer -> adaptation -> evaluation, each resumable; fills ``metrics``; returns the adapted checkpoint."""
    from ..pictures import per_class_rows, plot_series, save_png, write_table
    from ..pipeline import _stage_eval

    transfer_dir = rd.path / "zodi_transfer"
    adapt_dir = rd.path / "zodi_adapt"
    pics = rd.sub("pictures")

    # ---- 1. transfer
    if not rd.is_done("zodi_transfer"):
        with _stage(tracker, "zodi_transfer", {"zodi": cfg.to_dict()["zodi"]}) as rid:
            res = run_transfer(cfg, transfer_dir, log=log)
            save_png(pics / "zodi_transfer.png", transfer_grid(cfg, transfer_dir))
            if tracker is not None:
                tracker.log_metrics({"transferred_images": res["images"], "transfer_images_per_s": res["images_per_s"],
                                     "transfer_seconds": res["seconds"]}, run_id=rid)
                tracker.log_artifact(pics / "zodi_transfer.png", "pictures", run_id=rid)
                tracker.log_artifact(transfer_dir / MANIFEST_FILE, "zodi", run_id=rid)
        rd.mark_done("zodi_transfer", {k: v for k, v in res.items() if k != "skipped"})
    tr = rd.record("zodi_transfer")
    metrics["transferred_images"] = tr["images"]
    metrics["transfer_images_per_s"] = tr["images_per_s"]
    metrics["transfer_seconds"] = tr["seconds"]
    metrics["zodi_start_step"] = tr.get("start_step")
    metrics["zodi_weights_id"] = tr.get("weights_id")

    # ---- 2. adaptation
    if not rd.is_done("zodi_adapt"):
        with _stage(tracker, "zodi_adapt", {"segmenter": cfg.to_dict()["segmenter"]}) as rid:
            ckpt = run_adapt(cfg, adapt_dir, transfer_dir, log=log)
            hist_path = adapt_dir / "loss_history.json"
            hist = json.loads(hist_path.read_text()) if hist_path.exists() else []
            if tracker is not None:
                for h in hist:
                    tracker.log_metrics({f"adapt_{k}": v for k, v in h.items() if k not in ("iter", "s")},
                                        step=h["iter"], run_id=rid)
            if hist:
                plot_series(pics / "zodi_adapt_loss.png", [h["iter"] for h in hist],
                            {k: [h[k] for h in hist] for k in hist[0] if k not in ("iter", "s")},
                            "iteration", "loss", f"{cfg.name}: ZoDi adaptation (Eq. 8)")
                if tracker is not None:
                    tracker.log_artifact(pics / "zodi_adapt_loss.png", "pictures", run_id=rid)
        rd.mark_done("zodi_adapt", {"checkpoint": str(ckpt)})
    ckpt = Path(rd.record("zodi_adapt")["checkpoint"])

    # ---- 3. evaluation on the target val split
    res = _stage_eval(rd, "eval_zodi", cfg, ckpt)
    metrics["target_miou"] = res["miou"]
    metrics["per_class"] = res["per_class"]
    write_table(pics / "per_class_iou.csv", per_class_rows(res["per_class"]))
    if tracker is not None:
        tracker.log_artifact(pics / "per_class_iou.csv", "pictures")
        tracker.log_artifact(pics / "zodi_transfer.png", "pictures")
    return ckpt


class _NullStage:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _stage(tracker, name: str, params: Optional[dict] = None):
    return tracker.stage(name, params) if tracker is not None else _NullStage()
