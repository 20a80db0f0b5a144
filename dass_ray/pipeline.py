"""``dass-ray run``: the stages a config declares, in order, resumable.

method ``ptl``:         data -> target DDPM -> g_0 (source) -> PTL levels -> evaluation
method ``source_only``: data -> g_0 -> evaluation
method ``oracle``:      data -> g on target-train labels (upper bound, clearly marked) -> evaluation
method ``zodi``:        data -> ZoDi transfer -> adaptation training -> evaluation

Every stage records itself in ``state.json`` when it finishes; a re-run with
the same DIR skips what is done. At the end ``metrics.json`` is written and a
table printed.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .checkpoints import atomic_write_json
from .config import ExperimentConfig
from .run_state import RunDir
from .tracking import Tracker


def _eval_remote(cfg: ExperimentConfig, ckpt: Path, domain: str, split: str) -> dict:
    """Evaluate a checkpoint on a split, as a Ray task with a train worker's resources."""
    import ray

    def _run(cfg_dict: dict, ckpt: str, domain: str, split: str) -> dict:
        from .config import ExperimentConfig as EC, from_dict
        from .evaluation import evaluate, summary
        from .metrics import PROTOCOLS
        from .ray_utils import pick_device
        from .seg_training import load_trained
        from .stages import common

        c = from_dict(EC, cfg_dict)
        common.env_threads(c.ray.worker_threads())
        device = pick_device(c.ray.device, c.ray.gpus_per_worker)
        data = common.load(c, domain, split)
        model = load_trained(Path(ckpt), c.segmenter, c.data.num_classes).to(device)
        cm = evaluate(model, data.images, data.labels, c.data.num_classes, c.segmenter.eval_batch_size, device)
        p = PROTOCOLS[c.data.protocol]
        return {**summary(cm, list(p.names), p.classes), "skipped": len(data.skipped)}

    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker)(_run)
    return ray.get(task.remote(cfg.to_dict(), str(ckpt), domain, split))


def _sample_grid_remote(cfg: ExperimentConfig, unet_path: Path, out_png: Path) -> Path:
    """The DDPM sample grid + target scores, as a Ray task with a train worker's resources."""
    import ray

    def _run(cfg_dict: dict, unet_path: str, out_png: str) -> str:
        from .config import ExperimentConfig as EC, from_dict
        from .stages import common
        from .stages.ddpm_samples import sample_grid

        c = from_dict(EC, cfg_dict)
        common.env_threads(c.ray.worker_threads())
        return str(sample_grid(c, Path(unet_path), Path(out_png)))

    task = ray.remote(num_cpus=cfg.ray.cpus_per_worker, num_gpus=cfg.ray.gpus_per_worker)(_run)
    return Path(ray.get(task.remote(cfg.to_dict(), str(unet_path), str(out_png))))


def evaluate_checkpoint(cfg: ExperimentConfig, ckpt: Path, domain: Optional[str] = None,
                        split: Optional[str] = None) -> dict:
    from .ray_utils import ensure_ray

    ensure_ray(cfg.ray)
    return _eval_remote(cfg, ckpt, domain or cfg.data.target_domain, split or cfg.data.target_val_split)


def _stage_eval(rd: RunDir, key: str, cfg: ExperimentConfig, ckpt: Path) -> dict:
    if rd.is_done(key):
        return rd.record(key)["result"]
    res = _eval_remote(cfg, ckpt, cfg.data.target_domain, cfg.data.target_val_split)
    rd.mark_done(key, {"result": res})
    return res


def run(cfg: ExperimentConfig, out: Path, log: Callable[[str], None] = print,
        fail_after: Optional[int] = None) -> dict:
    """Run what ``cfg`` declares into ``out`` (resuming when ``out`` has finished stages)."""
    from .ray_utils import ensure_ray
    from .stages import common
    from .stages.ddpm import run_ddpm_stage
    from .stages.source import BEST_FILE, EQUAL_FILE, G0_FILE, run_source_stage

    from .config import absolute_paths

    cfg = absolute_paths(cfg)  # Ray workers do not share the driver's working directory
    t0 = time.time()
    rd = RunDir(out, cfg)
    work_before = _work_s_before(rd)
    ran_levels = False
    tracker = Tracker(cfg, rd.path)
    tracker.start(run_name=f"{cfg.name}-{rd.path.name}", resume_run_id=rd.state.get("mlflow_run_id"))
    if tracker.parent_run_id:
        rd.set("mlflow_run_id", tracker.parent_run_id)
    status = "FAILED"
    try:
        log(f"[dass-ray] {cfg.name}: method {cfg.method}, run dir {rd.path}")
        if rd.stale_tmp_removed:
            log(f"[dass-ray] removed {len(rd.stale_tmp_removed)} partial file(s) of an interrupted run: "
                + ", ".join(rd.stale_tmp_removed[:5]))
        common.ensure_data(cfg, log)
        ensure_ray(cfg.ray)
        metrics: dict = {"name": cfg.name, "method": cfg.method, "config_hash": rd.config_hash}
        res0: Optional[dict] = None
        if cfg.method in ("source_only", "oracle", "ptl"):
            stage = "oracle" if cfg.method == "oracle" else "source"
            # source-only is also run at PTL's budget: the same number of segmenter updates
            extra = len(cfg.ptl.levels()) * cfg.ptl.updates_per_level() if cfg.method == "source_only" else 0
            if not rd.is_done(stage):
                run_source_stage(cfg, rd.path, oracle=cfg.method == "oracle", tracker=tracker, log=log,
                                 extra_iters=extra)
                rd.mark_done(stage)
            g0 = rd.path / stage / G0_FILE
            res0 = _stage_eval(rd, f"eval_{stage}", cfg, g0)
            key = "oracle_miou" if cfg.method == "oracle" else "source_only_miou"
            metrics[key] = res0["miou"]
            metrics["target_miou"] = res0["miou"]
            metrics["per_class"] = res0["per_class"]
            final_ckpt = g0
            best = rd.path / stage / BEST_FILE
            if cfg.method != "oracle" and best.exists():  # checkpoint picked on source-val, no target label read
                metrics["source_only_best_source_val_miou"] = _stage_eval(rd, "eval_source_best", cfg, best)["miou"]
                metrics["source_best_iter"] = json.loads((rd.path / stage / "best_source_val.json").read_text())["iter"]
            if extra:
                equal = _stage_eval(rd, "eval_source_equal_budget", cfg, rd.path / stage / EQUAL_FILE)
                metrics["source_only_equal_budget_miou"] = equal["miou"]
                metrics["target_miou"] = equal["miou"]
                metrics["per_class"] = equal["per_class"]
                metrics["segmenter_updates"] = cfg.segmenter.source_iters + extra
                final_ckpt = rd.path / stage / EQUAL_FILE
        if cfg.method == "ptl":
            from .stages.ptl import done_levels, run_ptl_stage

            if not rd.is_done("ddpm"):
                unet_path = run_ddpm_stage(cfg, rd.path, tracker=tracker, log=log)
                rd.mark_done("ddpm", {"unet": str(unet_path)})
            unet_path = Path(rd.record("ddpm")["unet"])
            if not rd.is_done("ddpm_samples"):
                grid_png = _sample_grid_remote(cfg, unet_path, rd.sub("pictures") / "ddpm_samples.png")
                stats = json.loads(grid_png.with_suffix(".json").read_text())
                tracker.log_artifact(grid_png, "pictures")
                rd.mark_done("ddpm_samples", {"target_score": stats["target_score"], "frechet": stats["frechet"]})
            metrics["ddpm_target_score"] = rd.record("ddpm_samples")["target_score"]
            metrics["ddpm_frechet"] = rd.record("ddpm_samples").get("frechet")
            if fail_after is None:
                fail_after = cfg.ray.fault_translator_after_batches  # test-only fault injection
            levels_before = done_levels(rd.path)
            levels = run_ptl_stage(cfg, rd.path, unet_path, g0, tracker=tracker, log=log, fail_after=fail_after)
            ran_levels = bool(set(levels) - set(levels_before))
            final_ckpt = _finish_ptl(cfg, rd, levels, metrics, res0, tracker)
        if cfg.method == "zodi":
            from .stages.zodi import run_zodi_stages

            final_ckpt = run_zodi_stages(cfg, rd, metrics, tracker=tracker, log=log)
        metrics["skipped_samples"] = {**common.skipped_counts(rd.path),
                                      **({"eval_target_val": res0.get("skipped", 0)} if res0 else {})}
        # wall_s: the time the run's work took, summed over the invocations that did some. A re-run
        # that found every stage and level done ran nothing: it keeps the total (it used to report
        # its own few seconds).
        wall_s = work_before + (time.time() - t0 if rd.marked or ran_levels else 0.0)
        metrics["wall_s"] = round(wall_s, 1)
        metrics["tracking_errors"] = len(tracker.errors)
        atomic_write_json(rd.path / "metrics.json", metrics)
        tracker.log_metrics({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        tracker.log_artifact(rd.path / "metrics.json")
        tracker.log_artifact(final_ckpt, "checkpoint")
        _print_table(metrics, log)
        if tracker.errors:
            log(f"[dass-ray] WARNING: MLflow tracking failed {len(tracker.errors)} time(s) at {tracker.uri} (first: "
                f"{tracker.errors[0]}); the MLflow records of this run are incomplete and are not replayed. "
                f"The run's own records in {rd.path} (checkpoints, metrics.json) are complete.")
        status = "FINISHED"
        return metrics
    finally:
        # an interrupted invocation did (part of) the run's work: its time counts (a SIGKILLed one's is lost)
        rd.set("work_s", wall_s if status == "FINISHED" else work_before + time.time() - t0)
        tracker.end(status=status)


def _work_s_before(rd: RunDir) -> float:
    """Seconds of the run's work done by earlier invocations (``state.json`` ``work_s``)."""
    st = rd.state
    if "work_s" in st:
        return float(st["work_s"])
    # a run directory of an earlier version: its state kept only the interrupted invocations
    # ("wall_s_before"); when it finished, the total is the wall_s of its metrics.json
    try:
        return float(json.loads((rd.path / "metrics.json").read_text())["wall_s"])
    except (OSError, ValueError, KeyError, TypeError):
        return float(st.get("wall_s_before", 0.0))


def _finish_ptl(cfg: ExperimentConfig, rd: RunDir, levels: list[int], metrics: dict, res0: dict, tracker) -> Path:
    from .pictures import grid, per_class_rows, plot_series, save_png, write_table
    from .stages.ptl import SEG_FILE, level_dir

    from .data.layout import list_ids, read_sample
    from .stages import common

    records = [json.loads((level_dir(rd.path, n) / "record.json").read_text()) for n in levels]
    final = records[-1]
    metrics["target_miou"] = final.get("target_miou", metrics.get("target_miou"))
    metrics["per_class"] = final.get("per_class", metrics.get("per_class"))
    metrics["levels"] = [{k: v for k, v in r.items() if k != "per_class"} for r in records]
    per_level = cfg.ptl.iters_per_level * cfg.ptl.batch_size * cfg.ray.num_workers
    steps = cfg.diffusion.sample_steps
    # one UNet evaluation per reverse step: n per image at level n (fewer when respaced)
    metrics["unet_evals"] = int(sum(min(n, steps) if steps else n for n in levels) * per_level)
    metrics["translated_images"] = int(len(levels) * per_level)
    metrics["segmenter_updates"] = cfg.segmenter.source_iters + len(levels) * cfg.ptl.updates_per_level()
    metrics["level_seconds_mean"] = float(np.mean([r["seconds"] for r in records]))
    metrics["translator_actor_restarts"] = int(sum(r.get("actor_restarts", 0) for r in records))
    pics = rd.sub("pictures")
    # Fig. 4: one source image through the intermediate domains
    from .data.layout import DataError

    for probe_id in common.source_train_ids(cfg, list_ids(common.data_root(cfg), cfg.data.source_domain,
                                                          cfg.data.source_split)):
        try:  # the first readable source-train image (with data.skip_bad the bad ones were skipped)
            img, lbl = read_sample(common.data_root(cfg), cfg.data.source_domain, cfg.data.source_split, probe_id,
                                   cfg.data.num_classes)
            break
        except DataError:
            if not cfg.data.skip_bad:
                raise
    from PIL import Image

    shots = [np.asarray(Image.open(level_dir(rd.path, n) / "probe.png").convert("RGB"))
             for n in levels if (level_dir(rd.path, n) / "probe.png").exists()]
    step = max(1, len(shots) // 10)
    save_png(pics / "intermediate_domains.png", grid([[img, *shots[::step][-10:]], ], scale=4 if img.shape[0] <= 64 else 1))
    plot_series(pics / "translation_vs_level.png", levels,
                {"target score (domain classifier)": [r.get("target_score", float("nan")) for r in records],
                 "consistency mIoU / 100 (g_{n-1} on translations)": [r.get("consistency_miou", float("nan")) / 100
                                                                      for r in records]},
                "level n", "score", f"{cfg.name}: translations per level")
    evald = [(r["level"], r["target_miou"]) for r in records if "target_miou" in r]
    plot_series(pics / "miou_vs_level.png", [0] + [n for n, _ in evald], {"target-val mIoU": [res0["miou"]] + [m for _, m in evald]},
                "level n", "mIoU (%)", f"{cfg.name}: PTL")
    write_table(pics / "per_class_iou.csv", per_class_rows(metrics["per_class"], source_only=res0["per_class"]))
    for f in ("intermediate_domains.png", "miou_vs_level.png", "translation_vs_level.png", "per_class_iou.csv"):
        tracker.log_artifact(pics / f, "pictures")
    return level_dir(rd.path, levels[-1]) / SEG_FILE


def _print_table(metrics: dict, log: Callable[[str], None]) -> None:
    lines = [f"\n== {metrics['name']} ({metrics['method']}) =="]
    for k in ("source_only_miou", "oracle_miou", "target_miou"):
        if k in metrics and metrics[k] is not None:
            lines.append(f"{k:>20}: {metrics[k]:6.2f}")
    if "unet_evals" in metrics:
        lines.append(f"{'unet_evals':>20}: {metrics['unet_evals']}")
    lines.append(f"{'wall_s':>20}: {metrics['wall_s']}")
    pc = metrics.get("per_class") or {}
    if pc:
        lines.append("per-class IoU: " + ", ".join(f"{k} {'-' if v is None else f'{v:.1f}'}" for k, v in pc.items()))
    log("\n".join(lines))
