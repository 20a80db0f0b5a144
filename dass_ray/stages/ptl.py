"""Stage: Progressive Translation Learning (Sec. 4.3, Eq. 11, 12), streamed.

One Ray Train run (one ``fit()``, its ~20 s start-up paid once) walks all
remaining levels n = s, 2s, ..., N. At each level the training worker builds
the level's translation pipeline: rows ``{level, ids}`` through a Ray Data
actor pool of :class:`~dass_ray.stages.translator.Translator` guided by
g_{n-1}, and fine-tunes on its output as it streams in (the first batches
train while the actors translate the rest). Then it publishes g_n.

Why a pipeline per level and not one dataset over all levels fed through
``get_dataset_shard``: level n+1 needs g_n, which exists only after level n's
last batch was consumed. With one dataset, the actors translating level n+1
must wait for g_n, and Ray Data 2.60 holds back the tail of level n's output
while its actor is busy (measured: the consumer stalls after the first block
and never receives the rest) -- a deadlock. A pipeline per level has no such
cycle. Its cost is one actor start-up per level (process, imports, UNet;
~14 s on 2 cores). With ``ptl.prestart_next_level`` level n+1's pipeline
(:class:`_LevelStream`) starts as soon as level n's translations are consumed:
its actor starts while level n replays and waits for g_n's checksum file
before translating. On 2 cores that moved the start-up's CPU time into the
replay and made PTL slower overall (docs/measurements.md, What the demo measures), so it is
off by default. A level's record has ``first_batch_s`` (its start to its first
translated batch) and ``pipeline_lead_s``.

Each level translates only what its fine-tuning consumes: ``iters_per_level x
batch_size`` source images (per worker), so the UNet evaluations are
sum_n n x iters x batch, not N(N+1)/2 x |X^S|.

After a level: g_n checkpoint, the level's translated rows as Parquet (with
provenance), and ``record.json`` (loss, mIoU when evaluated). Re-running resumes
after the last level with a record.

A translation actor that dies is restarted and its batch retried, up to
``ray.max_actor_restarts`` times per actor and level; after that the level fails
with a :class:`~dass_ray.stages.translator.TranslationActorError` naming the
level and the batch, without a record, so a re-run resumes at that level.
"""
from __future__ import annotations

import json
import queue
import shutil
import threading
import time
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np

from ..checkpoints import atomic_write_bytes, atomic_write_json
from ..config import ExperimentConfig
from . import common

SEG_FILE = "segmenter.safetensors"


def level_dir(run_dir: Path, n: int) -> Path:
    return run_dir / "ptl" / "levels" / f"{n:05d}"


def done_levels(run_dir: Path) -> list[int]:
    base = run_dir / "ptl" / "levels"
    if not base.exists():
        return []
    return sorted(int(p.name) for p in base.iterdir() if (p / "record.json").exists() and (p / (SEG_FILE + ".sha256")).exists())


def level_ids(cfg: ExperimentConfig, source_ids: list[str], n: int, rank: int) -> list[str]:
    """The source ids level n translates for worker ``rank``: iters x batch, seeded by (seed, n, rank).

    The first id is the same at every level (the "probe" of the Fig. 4 grid).
    """
    k = cfg.ptl.iters_per_level * cfg.ptl.batch_size
    rng = common.seeded_rng(cfg.seed, n, rank, 7)
    replace = k > len(source_ids)
    pick = rng.choice(len(source_ids), size=k, replace=replace)
    ids = [source_ids[i] for i in pick]
    probe = source_ids[0]
    if rank == 0 and probe not in ids[:1]:
        ids[0] = probe
    return ids


def _write_parquet(path: Path, rows: dict[str, list]) -> None:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({
        "id": pa.array(rows["id"], pa.string()),
        "level": pa.array(rows["level"], pa.int32()),
        "image_png": pa.array(rows["image_png"], pa.binary()),
        "seed": pa.array(rows["seed"], pa.int64()),
        "segmenter_id": pa.array(rows["segmenter_id"], pa.string()),
        "config_hash": pa.array(rows["config_hash"], pa.string()),
    })
    buf = io.BytesIO()
    pq.write_table(table, buf)
    atomic_write_bytes(path, buf.getvalue())


def _png(img: np.ndarray) -> bytes:
    import io

    from PIL import Image

    b = io.BytesIO()
    Image.fromarray(img).save(b, format="PNG")
    return b.getvalue()


def ptl_loop(loop_config: dict) -> None:
    """Ray Train worker loop over the remaining levels (fine-tuning, Eq. 12)."""
    import ray.train
    import ray.train.torch
    import torch

    from ..evaluation import evaluate, summary
    from ..metrics import PROTOCOLS, ConfusionMatrix
    from ..ray_utils import train_device
    from ..seg_training import SegTrainer, load_trained
    from ..data.transforms import to_diffusion
    from .translator import translation_dataset, translation_rows

    cfg = common.worker_config(loop_config)
    run_dir = Path(loop_config["run_dir"])
    levels: list[int] = loop_config["levels"]
    start_ckpt = Path(loop_config["start_ckpt"])
    per_level = cfg.ptl.iters_per_level * cfg.ptl.batch_size
    rank, world = common.rank_info()
    device = train_device(cfg.ray.device, cfg.ray.gpus_per_worker)

    torch.manual_seed(cfg.seed)
    raw = load_trained(start_ckpt, cfg.segmenter, cfg.data.num_classes).to(device)
    model = ray.train.torch.prepare_model(raw) if world > 1 else raw
    trainer = SegTrainer(model, raw, cfg.ptl.lr, cfg.ptl.momentum, cfg.segmenter.weight_decay, device,
                         precision=cfg.segmenter.precision)
    val = common.load(cfg, cfg.data.target_domain, cfg.data.target_val_split) if rank == 0 else None
    names = list(PROTOCOLS[cfg.data.protocol].names)
    classes = PROTOCOLS[cfg.data.protocol].classes
    source_ids = loop_config["source_ids"]
    prev_ckpt = str(start_ckpt)
    # How target-like are the translations (label-free; DESIGN.md sec. 5 / issue 8): a frozen
    # domain classifier fitted on source vs target-train *images* (no target labels read).
    clf = None
    if rank == 0:
        from ..domain_stats import DomainClassifier, DomainGap

        src_imgs = common.load(cfg, cfg.data.source_domain, cfg.data.source_split, labels=False).images
        tgt_imgs = common.load(cfg, cfg.data.target_domain, cfg.data.target_train_split, labels=False).images
        clf = DomainClassifier.fit(src_imgs[:500], tgt_imgs[:500], seed=cfg.seed)
        gap = DomainGap.fit(src_imgs[:500], tgt_imgs[:500])
        del src_imgs, tgt_imgs

    def start_level(n: int, seg_ckpt: str) -> "_LevelStream":
        # The level's translations: a Ray Data actor pool guided by g_{n-1} (seg_ckpt, which the
        # actors wait for when it is not published yet), pulled from now on by a background thread.
        rows = translation_rows({n: level_ids(cfg, source_ids, n, rank)}, cfg.ptl.translate_batch_size)
        events = level_dir(run_dir, n) / f"actors-r{rank}"  # actor starts of this attempt at the level
        shutil.rmtree(events, ignore_errors=True)
        events.mkdir(parents=True)
        ds = translation_dataset(cfg, rows, loop_config["unet_path"], {n: seg_ckpt}, loop_config.get("fail_after"),
                                 events_dir=str(events))
        return _LevelStream(_level_batches(ds, cfg, n, rank, events), events, name=f"ptl-level-{n}")

    stream = start_level(levels[0], prev_ckpt) if levels else None
    for li, n in enumerate(levels):
        t_level = time.time()
        # While the level translates, the worker shares the machine with its translation actors:
        # only the CPUs it was given (RayConfig.streaming_threads).
        common.env_threads(cfg.ray.streaming_threads())
        events, stream_started = stream.events, stream.started
        buf_rows: dict[str, list] = {k: [] for k in ("id", "level", "image_png", "seed", "segmenter_id", "config_hash")}
        losses: list[float] = []
        probe: Optional[np.ndarray] = None
        first_batch_s: Optional[float] = None
        consistency = ConfusionMatrix(cfg.data.num_classes)
        level_images: list[np.ndarray] = []
        replay: dict[str, list[np.ndarray]] = {"image": [], "source": [], "label": []}
        # streamed into the fine-tuning: the first batches train while the actors translate the rest
        for batch in stream:
            if first_batch_s is None:
                first_batch_s = time.time() - t_level
            x_t = to_diffusion(batch["image"])
            x_s = to_diffusion(batch["source"])
            y = torch.from_numpy(batch["label"].astype(np.int64))
            # segmenter consistency: does g_{n-1} (before this step) still read the source label?
            with torch.no_grad():
                raw.eval()
                consistency.update(raw(x_t.to(device)).argmax(1).cpu().numpy(), batch["label"])
            level_images.append(batch["image"])
            if cfg.ptl.epochs_per_level > 1:
                for key in replay:
                    replay[key].append(batch[key])
            parts = trainer.step_pair(x_t, x_s, y, l_src=cfg.ptl.l_src,
                                      similarity_weight=cfg.segmenter.similarity_weight)
            losses.append(parts["loss"])
            for j in range(len(batch["id"])):
                if probe is None and rank == 0:
                    probe = batch["image"][j]
                buf_rows["id"].append(str(batch["id"][j]))
                buf_rows["level"].append(int(batch["level"][j]))
                buf_rows["image_png"].append(_png(batch["image"][j]))
                buf_rows["seed"].append(int(batch["seed"][j]))
                buf_rows["segmenter_id"].append(str(batch["segmenter_id"][j]))
                buf_rows["config_hash"].append(str(batch["config_hash"][j]))
        consumed = len(buf_rows["id"])
        if consumed != per_level or set(buf_rows["level"]) != {n}:
            raise RuntimeError(f"level {n} (rank {rank}): got {consumed} translated images of {per_level}")
        nxt = None
        if cfg.ptl.prestart_next_level and li + 1 < len(levels):
            # level n+1's actor starts now, while this level replays; it translates once g_n is published
            nxt = start_level(levels[li + 1], str(level_dir(run_dir, n) / SEG_FILE))
        # the level's actors are done: its replay epochs and evaluation may use their CPUs
        # (measured on 2 cores: docs/measurements.md, What the demo measures)
        common.env_threads(cfg.ray.replay_threads())
        t_replay = time.time()
        if cfg.ptl.epochs_per_level > 1:  # replay the level's translations (no new UNet work)
            losses += _replay(trainer, {k: np.concatenate(v) for k, v in replay.items()}, cfg,
                              common.seeded_rng(cfg.seed, n, rank, 11))
        # ---- level n complete on this worker
        d = level_dir(run_dir, n)
        d.mkdir(parents=True, exist_ok=True)
        _write_parquet(d / f"translated-r{rank}.parquet", buf_rows)
        if world > 1:
            torch.distributed.barrier()
        record = {"level": n, "loss": float(np.mean(losses)), "iters": len(losses),
                  "translated": consumed, "seconds": time.time() - t_level,
                  "first_batch_s": first_batch_s, "consistency_miou": float(consistency.miou(classes)),
                  "translate_s": t_replay - t_level, "replay_s": time.time() - t_replay,
                  # how long before the level began its translation pipeline was started (0 for the
                  # first level of a run; with ptl.prestart_next_level the previous level's replay and more)
                  "pipeline_lead_s": 0.0 if li == 0 else round(max(0.0, t_level - stream_started), 1),
                  "replay_threads": torch.get_num_threads()}
        # translation actors that died during the level and were restarted by Ray Data
        record["actor_restarts"] = max(0, len(list(events.glob("actor-*.json"))) - cfg.ray.num_actors)
        if record["actor_restarts"]:
            print(f"[ptl] WARNING: level {n} (rank {rank}): {record['actor_restarts']} translation actor(s) died "
                  f"and were restarted; their batches were retried, all {consumed} ids translated once")
        if clf is not None:
            record["target_score"] = clf.target_score(np.concatenate(level_images))
            if consumed >= 2:
                fd = gap.distances(np.concatenate(level_images))
                record["frechet_to_target"], record["frechet_to_source"] = fd["to_target"], fd["to_source"]
        if rank == 0:
            last = li == len(levels) - 1
            if last or (li + 1) % cfg.ptl.eval_every == 0:
                cm = evaluate(raw, val.images, val.labels, cfg.data.num_classes, cfg.segmenter.eval_batch_size, device)
                s = summary(cm, names, classes)
                record.update({"target_miou": s["miou"], "per_class": s["per_class"]})
            if probe is not None:
                atomic_write_bytes(d / "probe.png", _png(probe))
            trainer.save(d / SEG_FILE, {"level": n})  # publishes g_n: level n+1's translators wait on it
            atomic_write_json(d / "record.json", record)
            print(f"[ptl] level {n}: loss {record['loss']:.4f}"
                  + (f", target mIoU {record['target_miou']:.2f}" if "target_miou" in record else "")
                  + f" ({record['seconds']:.1f}s)")
        ray.train.report({k: v for k, v in record.items() if isinstance(v, (int, float))})
        prev_ckpt = str(d / SEG_FILE)
        if li + 1 < len(levels):
            stream = nxt or start_level(levels[li + 1], prev_ckpt)


class _LevelStream:
    """A level's translated batches (``batches``: :func:`_level_batches`), pulled by a background
    thread from the moment it is made, so that the level's Ray Data pipeline (its
    actor start-up, and the translations once g_{n-1} exists) runs while the caller is still busy
    with the previous level. Iterating yields the batches in order; an error of the pipeline
    (e.g. :class:`~dass_ray.stages.translator.TranslationActorError`) is raised there.
    The queue is unbounded: a level's translations are all kept for its replay anyway."""

    _END = object()

    def __init__(self, batches: Iterable, events: Path, name: str):
        self.events = events  # the level's actor-start records (read after the level)
        self.started = time.time()
        self._q: queue.Queue = queue.Queue()
        self._thread = threading.Thread(target=self._pull, args=(batches,), daemon=True, name=name)
        self._thread.start()

    def _pull(self, batches: Iterable) -> None:
        try:
            for batch in batches:
                self._q.put(batch)
        except BaseException as e:  # handed to the consumer, raised in its thread
            self._q.put(e)
        else:
            self._q.put(self._END)

    def __iter__(self):
        while True:
            item = self._q.get()
            if item is self._END:
                self._thread.join()
                return
            if isinstance(item, BaseException):
                raise item
            yield item


def _level_batches(ds, cfg: ExperimentConfig, n: int, rank: int, events: Path):
    """``ds.iter_batches`` of level ``n``; translation actors that died with no restart left
    (``ray.max_actor_restarts``) end it with a :class:`TranslationActorError` naming the level
    and the batches that were being translated when they died."""
    import ray.exceptions

    from ..ray_utils import error_summary
    from .translator import TranslationActorError, crashed_batches

    try:
        yield from ds.iter_batches(batch_size=cfg.ptl.batch_size, batch_format="numpy")
    except ray.exceptions.RayActorError as e:
        starts = len(list(events.glob("actor-*.json")))
        batches = "; ".join(f"ids {ids} ({k} actor process(es) died on it)" for ids, k in crashed_batches(events)[:3])
        raise TranslationActorError(
            f"PTL level {n} (rank {rank}) failed: translation actors died and their ray.max_actor_restarts="
            f"{cfg.ray.max_actor_restarts} restart(s) are used up ({starts} actor start(s) at this level; "
            f"Ray: {error_summary(e)}). Batches in flight when actors died: {batches or 'none recorded'}. "
            f"Level {n} is not recorded as done: re-running the same command resumes at level {n} (fix or remove "
            f"those images; if the crashes are sporadic, raise ray.max_actor_restarts)."
        ) from e


def _replay(trainer, pool: dict[str, np.ndarray], cfg: ExperimentConfig, rng: np.random.Generator) -> list[float]:
    """``epochs_per_level - 1`` more shuffled epochs of L_ft over a level's translations.

    ``pool``: ``image`` / ``source`` uint8 ``[M, H, W, 3]``, ``label`` ``[M, H, W]``.
    Same batch size and loss as the streamed epoch; returns the step losses.
    """
    import torch

    from ..data.transforms import to_diffusion

    losses = []
    m, b = len(pool["image"]), cfg.ptl.batch_size
    for _ in range(cfg.ptl.epochs_per_level - 1):
        order = rng.permutation(m)
        for s in range(0, m - b + 1, b):
            j = order[s:s + b]
            parts = trainer.step_pair(to_diffusion(pool["image"][j]), to_diffusion(pool["source"][j]),
                                      torch.from_numpy(pool["label"][j].astype(np.int64)), l_src=cfg.ptl.l_src,
                                      similarity_weight=cfg.segmenter.similarity_weight)
            losses.append(parts["loss"])
    return losses


class _LevelLogger(threading.Thread):
    """Logs each level's record to MLflow as soon as the training loop writes it."""

    def __init__(self, run_dir: Path, tracker, run_id: Optional[str]):
        super().__init__(daemon=True)
        self.run_dir, self.tracker, self.run_id = run_dir, tracker, run_id
        self.seen: set[int] = set()
        self.stop = threading.Event()

    def poll(self) -> None:
        for n in done_levels(self.run_dir):
            if n in self.seen:
                continue
            self.seen.add(n)
            rec = json.loads((level_dir(self.run_dir, n) / "record.json").read_text())
            m = {"ptl_loss": rec["loss"], "level_seconds": rec["seconds"],
                 "consistency_miou": rec.get("consistency_miou", float("nan")),
                 "target_score": rec.get("target_score", float("nan")),
                 "frechet_to_target": rec.get("frechet_to_target", float("nan")),
                 "actor_restarts": rec.get("actor_restarts", 0)}
            for key in ("translate_s", "replay_s"):  # records of older runs lack them
                if key in rec:
                    m["level_" + key.replace("_s", "_seconds")] = rec[key]
            if "target_miou" in rec:
                m["target_miou"] = rec["target_miou"]
            self.tracker.log_metrics(m, step=n, run_id=self.run_id)

    def run(self) -> None:
        while not self.stop.wait(2.0):
            self.poll()


def check_level_provenance(cfg: ExperimentConfig, run_dir: Path, levels: list[int]) -> None:
    """Refuse to resume from finished levels whose translations another config made.

    Each translated row carries the hash of the config that made it; a level offered
    for resume (copied in, or left by a run whose ``state.json`` was lost) must carry
    this run's hash, else :class:`~dass_ray.config.ConfigError` names the file and both hashes.
    """
    import pyarrow.parquet as pq

    from ..config import ConfigError

    want = cfg.hash()
    for n in levels:
        for f in sorted(level_dir(run_dir, n).glob("translated-r*.parquet")):
            got = set(pq.read_table(f, columns=["config_hash"]).column("config_hash").to_pylist())
            if got != {want}:
                raise ConfigError(f"{f}: translated dataset of level {n} was made by config hash "
                                  f"{', '.join(sorted(map(str, got)))}, this run's config hash is {want}; it cannot be "
                                  f"resumed with this config (use another --out, or delete {f.parent})")


def drop_stale_checkpoints(run_dir: Path, levels: list[int]) -> None:
    """Remove the g_n checkpoints (and checksums) of ``levels``, the levels about to run.

    A checkpoint of a level without a record (an attempt killed between the two writes) is
    stale: level n+1's translators, started while level n replays, would take it for g_n.
    """
    for n in levels:
        for f in (level_dir(run_dir, n) / SEG_FILE, level_dir(run_dir, n) / (SEG_FILE + ".sha256")):
            f.unlink(missing_ok=True)


def run_ptl_stage(cfg: ExperimentConfig, run_dir: Path, unet_path: Path, g0_path: Path, tracker=None,
                  log: Callable[[str], None] = print, fail_after: Optional[int] = None) -> list[int]:
    """Run the remaining PTL levels; return all finished levels."""
    from ..data.layout import list_ids

    all_levels = cfg.ptl.levels()
    finished = done_levels(run_dir)
    check_level_provenance(cfg, run_dir, finished)
    todo = [n for n in all_levels if n not in finished]
    if not todo:
        log(f"[ptl] all {len(all_levels)} levels already done")
        return finished
    drop_stale_checkpoints(run_dir, todo)
    prev_level = max([n for n in finished if n < todo[0]], default=None)
    start_ckpt = level_dir(run_dir, prev_level) / SEG_FILE if prev_level else g0_path
    source_ids = list_ids(common.data_root(cfg), cfg.data.source_domain, cfg.data.source_split)
    if cfg.data.skip_bad:
        # the samples the source stage skipped (data.skip_bad) are not offered to the translators either
        bad = {r["id"] for f in (run_dir / "source").glob("skipped-*.json") for r in json.loads(f.read_text())}
        source_ids = [i for i in source_ids if i not in bad]
    if cfg.data.max_samples:
        source_ids = source_ids[: cfg.data.max_samples]
    source_ids = common.source_train_ids(cfg, source_ids)  # never the held-out source-val
    log(f"[ptl] levels {todo[0]}..{todo[-1]} ({len(todo)} to run, {len(finished)} done), "
        f"{cfg.ptl.iters_per_level * cfg.ptl.batch_size} images per level per worker")
    logger = None
    rid = None
    if tracker is not None:
        rid = tracker.child("ptl", {"levels": len(all_levels)})
        logger = _LevelLogger(run_dir, tracker, rid)
        logger.start()
    t0 = time.time()
    ok = False
    try:
        common.fit(ptl_loop, {"run_dir": str(run_dir.resolve()), "levels": todo, "start_ckpt": str(start_ckpt),
                              "unet_path": str(unet_path), "source_ids": source_ids, "fail_after": fail_after},
                   cfg, run_dir, name="ptl")
        ok = True
    except Exception as e:
        # Ray Train wraps a worker's error (WorkerGroupError.worker_failures: rank -> error); a level
        # that failed on its translation actors is raised as such, with its own message
        from .translator import TranslationActorError

        for err in (getattr(e, "worker_failures", None) or {}).values():
            if isinstance(err, TranslationActorError):
                raise TranslationActorError(str(err)) from e
        raise
    finally:
        if logger is not None:
            logger.stop.set()
            logger.join()
            logger.poll()
            tracker.end(rid, "FINISHED" if ok else "FAILED")
    log(f"[ptl] {len(todo)} levels in {time.time() - t0:.0f}s")
    for n in todo:
        rec = json.loads((level_dir(run_dir, n) / "record.json").read_text())
        if rec.get("actor_restarts"):
            log(f"[ptl] WARNING: level {n}: {rec['actor_restarts']} translation actor failure(s), recovered by "
                f"Ray Data (batches retried; {rec['translated']} ids, each once)")
    return done_levels(run_dir)
