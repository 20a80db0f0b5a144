"""Translation benchmark: SGG cost, batched LCG, Ray Data actor scaling, pool vs loop.

Measured side by side in one run on this machine with the ``digits`` default UNet
(``diffusion`` of experiments/digits_ptl.yaml, random weights) and segmenter
(``small_cnn``, width 32, 11 classes), 32x32 images:

- ``guided_over_unguided``: time of one SGG step (LCG and GSG alternate: the mean of
  the two) / one unguided reverse step, same batch; also LCG-only and GSG-only ratios;
- ``batched_lcg_speedup``: naive per-class LCG (``lcg_loss_naive`` + backward) /
  batched LCG (``lcg_loss_batched`` + backward) with >= 5 classes present per image (headline: 6);
  ``by_classes_present`` repeats it at 5, 8 and 11 classes present beside the copy
  ratio C*B / copies (the naive loop's excess work);
- ``actors2_over_actors1``: images/s through ``translation_dataset`` with 2 actors
  (1 CPU, 1 thread each) / 1 actor (1 thread; and 2 threads); beside it the machine's
  ceiling: 2 plain processes / 1 on the same batches, without Ray (``machine_ceiling``);
  full mode measures 2 pairs of runs (1 2, then 2 1: ``pairs``, ``mean_of_pairs``) and the
  cores the driver and Ray's own processes take (``ray_overhead_cores``);
- ``pool_over_loop``: 1-actor Ray Data images/s / the plain in-process loop calling
  ``translate_level`` on the same batches (after actor start-up and overall);
- ``profile``: torch.profiler over one LCG and one GSG step: the share of UNet forward,
  segmenter forward and the backward pass.

    python benchmarks/bench_translate.py [--quick] [--set KEY=VALUE ...] --out bench.json

Timings on a shared 2-core machine are noisy: the load average is recorded next to
every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONFIG = REPO / "experiments" / "digits_ptl.yaml"


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def timeit_together(fns: dict, reps: int, warmup: int = 1) -> dict:
    """Median / min seconds of several functions, their repetitions interleaved (A B C A B C ...):
    a ratio of two of them is then not skewed by load or clock drift between their runs."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    ts: dict = {name: [] for name in fns}
    for _ in range(reps):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            fn()
            ts[name].append(time.perf_counter() - t0)
    ld = load()
    return {name: {"median_s": statistics.median(v), "min_s": min(v), "reps": reps, "load": ld} for name, v in ts.items()}


# --------------------------------------------------------------------------- inputs

def digit_batch(root: Path, n: int, num_classes: int) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The first n source images + labels of a digits build (2 classes per image: background + digit)."""
    from dass_ray.data.layout import list_ids, read_sample
    from dass_ray.data.transforms import to_diffusion

    ids = list_ids(root, "source", "train")[:n]
    pairs = [read_sample(root, "source", "train", i, num_classes) for i in ids]
    x = to_diffusion(np.stack([p[0] for p in pairs]))
    y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
    return x, y, ids


def multiclass_labels(batch: int, size: int, num_classes: int, per_image: int, seed: int = 0) -> torch.Tensor:
    """Labels with ``per_image`` classes present in every image: digit-like blobs on a background.

    Class 0 is the background; ``per_image - 1`` distinct digit classes are each painted as a
    random disc/ellipse blob, so every image has exactly ``per_image`` classes present.
    """
    g = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size]
    out = np.zeros((batch, size, size), dtype=np.int64)
    for b in range(batch):
        classes = g.choice(np.arange(1, num_classes), size=per_image - 1, replace=False)
        for c in classes:
            while True:
                cy, cx = g.uniform(3, size - 3, 2)
                ry, rx = g.uniform(2.5, size / 5, 2)
                blob = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
                if (blob & (out[b] == 0)).sum() >= 4:
                    out[b][blob & (out[b] == 0)] = c
                    break
    return torch.from_numpy(out)


# --------------------------------------------------------------------------- step timings

def classes_present(y: torch.Tensor, C: int) -> float:
    """Mean number of classes present per image of y (B, H, W); ignore-label (255) pixels excluded."""
    return float(torch.stack([torch.bincount(yi[yi != 255].flatten(), minlength=C) > 0 for yi in y])
                 .sum(1).float().mean())


def bench_steps(cfg, unet, seg, x: torch.Tensor, y_digits: torch.Tensor, y_multi: torch.Tensor, reps: int,
                sweep_present: tuple[int, ...] = ()) -> dict:
    from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
    from dass_ray.guidance.sgg import gsg_step, lcg_step
    from dass_ray.precision import Bf16Forward, resolve_precision

    sched = DDPMSchedule(cfg.diffusion)
    eps = EpsModel(unet, cfg.diffusion.precision)
    # the recipe's guidance space (x0_hat: the segmenter reads the denoised estimate); ddim_eta only recorded
    scale, C, space = cfg.guidance.scale, cfg.data.num_classes, cfg.guidance.space
    k = 300
    g = torch.Generator().manual_seed(0)
    xk = torch.randn(x.shape, generator=g) * 0.7 + x * 0.3
    z = torch.randn(x.shape, generator=g)
    for p in seg.parameters():
        p.requires_grad_(False)
    seg_fn = Bf16Forward(seg, cfg.guidance.precision)  # as translate_level calls it

    res: dict = {"batch": int(x.shape[0]), "k": k, "torch_threads": torch.get_num_threads(),
                 "guidance_space": space, "ddim_eta": cfg.diffusion.ddim_eta,
                 "guidance_precision": resolve_precision(cfg.guidance.precision, "cpu"),
                 "unet_precision": resolve_precision(cfg.diffusion.precision, "cpu")}
    labels = {"digits_labels": y_digits, "multiclass_labels": y_multi}
    fns = {"unguided": lambda: sched.guided_reverse_step(eps, xk, k, z)}
    for name, y in labels.items():
        fns[name + "/lcg"] = lambda y=y: lcg_step(eps, sched, xk, k, z, seg_fn, y, scale, C, space=space,
                                                  lcg_chunk=cfg.guidance.lcg_chunk)
        fns[name + "/gsg"] = lambda y=y: gsg_step(eps, sched, xk, k, z, seg_fn, y, scale, C, space=space)
    t = timeit_together(fns, reps)
    un = t["unguided"]
    out = {"unguided_step": un}
    for name, y in labels.items():
        present = classes_present(y, C)
        lcg, gsg = t[name + "/lcg"], t[name + "/gsg"]
        sgg = 0.5 * (lcg["median_s"] + gsg["median_s"])
        out[name] = {
            "classes_present_per_image": present,
            "lcg_step": lcg, "gsg_step": gsg,
            "guided_over_unguided": sgg / un["median_s"],
            "lcg_over_unguided": lcg["median_s"] / un["median_s"],
            "gsg_over_unguided": gsg["median_s"] / un["median_s"],
        }
    res["steps"] = out

    # batched vs naive LCG (loss + backward w.r.t. x), >= 5 classes present per image
    res["batched_lcg"] = lcg_speedup(seg, xk, y_multi, C, cfg.guidance.lcg_chunk, reps, one_backward=True)
    # the same comparison at other class counts: the naive loop always runs C x B copies, the batched path
    # only the present (image, class) pairs, so the speedup should follow the copy ratio C / present
    res["batched_lcg_by_classes_present"] = [
        lcg_speedup(seg, xk, multiclass_labels(xk.shape[0], xk.shape[-1], C, per_image=n), C,
                    cfg.guidance.lcg_chunk, reps) for n in sweep_present]
    return res


def lcg_speedup(seg, xk: torch.Tensor, y: torch.Tensor, C: int, chunk: int, reps: int,
                one_backward: bool = False) -> dict:
    """Naive per-class LCG (loss + backward w.r.t. x) against the chunked batched LCG the guidance runs.

    xk: (B, 3, H, W), y: (B, H, W). ``copy_ratio`` = C*B / copies is what the naive loop does in excess.
    """
    from dass_ray.guidance.sgg import lcg_loss_and_grad, lcg_loss_batched, lcg_loss_naive, lcg_pairs

    def lcg_grad(fn):
        xg = xk.detach().requires_grad_(True)
        (gr,) = torch.autograd.grad(fn(seg, xg, y, C), xg)
        return gr

    def chunked():  # what the guidance runs: lcg_loss_and_grad in chunks of guidance.lcg_chunk copies
        return lcg_loss_and_grad(seg, xk, y, C, chunk)[1]

    fns = {"naive": lambda: lcg_grad(lcg_loss_naive), "batched": chunked}
    if one_backward:
        fns["one"] = lambda: lcg_grad(lcg_loss_batched)
    t = timeit_together(fns, reps)
    copies = int(lcg_pairs(y, C)[0].numel())
    out = {"classes_present_per_image": classes_present(y, C), "copies": copies, "lcg_chunk": chunk,
           "copy_ratio": C * y.shape[0] / copies, "naive": t["naive"], "batched": t["batched"],
           "speedup": t["naive"]["median_s"] / t["batched"]["median_s"],
           "max_abs_grad_difference": float((lcg_grad(lcg_loss_naive) - chunked()).abs().max())}
    if one_backward:
        out["one_backward"] = t["one"]
        out["one_backward_speedup"] = t["naive"]["median_s"] / t["one"]["median_s"]
    return out


def flop_bound(unet, seg, x: torch.Tensor, copies_digits: float, copies_multi: float) -> dict:
    """Matmul/conv FLOPs per image (torch's FlopCounterMode): UNet forward, segmenter forward +
    backward w.r.t. the input. At equal FLOP rates an LCG step with K masked copies costs
    1 + K r unguided steps and a GSG step 1 + r (r = segmenter / UNet FLOPs): the SGG ratio
    the models allow before any implementation cost is 1 + r (K + 1) / 2."""
    from torch.utils.flop_counter import FlopCounterMode

    x1 = x[:1]
    with FlopCounterMode(display=False) as fc, torch.no_grad():
        unet(x1, torch.tensor([300])).sample
    unet_f = fc.get_total_flops()
    xg = x1.detach().clone().requires_grad_(True)
    with FlopCounterMode(display=False) as fc:
        out = seg(xg)
        out = out if torch.is_tensor(out) else out[0]
        out.logsumexp(1).sum().backward()  # input gradient only: the parameters are frozen
    seg_f = fc.get_total_flops()
    r = seg_f / unet_f
    return {"unet_forward_mflop_per_image": unet_f / 1e6, "segmenter_fwd_bwd_input_mflop_per_image": seg_f / 1e6,
            "segmenter_over_unet": r,
            "sgg_over_unguided_digits_labels": 1 + r * (copies_digits + 1) / 2,
            "sgg_over_unguided_multiclass_labels": 1 + r * (copies_multi + 1) / 2,
            "gsg_over_unguided": 1 + r,
            "note": "the SGG / unguided ratio at equal FLOP rates (conv and matmul FLOPs only)"}


def bench_profile(cfg, unet, seg, x: torch.Tensor, y: torch.Tensor) -> dict:
    """torch.profiler over one LCG step and one GSG step, with UNet / segmenter forwards labelled."""
    from torch.profiler import ProfilerActivity, profile, record_function

    from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
    from dass_ray.guidance.sgg import gsg_step, lcg_step

    sched = DDPMSchedule(cfg.diffusion)
    eps_inner = EpsModel(unet, cfg.diffusion.precision)

    def eps(xx, kk):
        with record_function("unet_forward"):
            return eps_inner(xx, kk)

    class Labelled(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.m = m

        def forward(self, xx):
            with record_function("segmenter_forward"):
                return self.m(xx)

    lseg = Labelled(seg).eval()
    scale, C, k, space = cfg.guidance.scale, cfg.data.num_classes, 300, cfg.guidance.space
    g = torch.Generator().manual_seed(1)
    xk, z = torch.randn(x.shape, generator=g), torch.randn(x.shape, generator=g)
    lcg_step(eps, sched, xk, k, z, lseg, y, scale, C, space=space)  # warm-up
    gsg_step(eps, sched, xk, k, z, lseg, y, scale, C, space=space)
    out = {}
    for name, fn in (("lcg", lcg_step), ("gsg", gsg_step)):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            with record_function("step"):
                fn(eps, sched, xk, k, z, lseg, y, scale, C, space=space)
        ev = {e.key: e for e in prof.key_averages()}
        us = lambda key: float(ev[key].cpu_time_total) if key in ev else 0.0  # noqa: E731
        step, unet_f, seg_f = us("step"), us("unet_forward"), us("segmenter_forward")
        # autograd's backward runs as top-level "autograd::engine::evaluate_function" events
        bwd = sum(float(e.cpu_time_total) for k_, e in ev.items() if k_.startswith("autograd::engine::evaluate_function"))
        top = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)[:12]
        out[name] = {
            "step_ms": step / 1e3,
            "unet_forward_share": unet_f / step,
            "segmenter_forward_share": seg_f / step,
            "segmenter_backward_share": bwd / step,
            "other_share": max(0.0, 1 - (unet_f + seg_f + bwd) / step),
            "top_ops_by_self_cpu": [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
                                     "calls": e.count} for e in top],
        }
    out["load"] = load()
    out["torch_threads"] = torch.get_num_threads()
    return out


# --------------------------------------------------------------------------- Ray Data

def process_cpu() -> dict[int, tuple[str, float]]:
    """pid -> (name, CPU seconds user + system) of every process, from /proc ({} without /proc)."""
    out: dict[int, tuple[str, float]] = {}
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    for d in Path("/proc").glob("[0-9]*"):
        try:
            s = (d / "stat").read_text()
        except OSError:
            continue
        name = s[s.index("(") + 1:s.rindex(")")]
        f = s[s.rindex(")") + 2:].split()
        out[int(d.name)] = (name, (int(f[11]) + int(f[12])) / tick)
    return out


class CpuSampler:
    """:func:`process_cpu` every ``period`` s in a background thread, for :func:`cpu_cores_by_role`.

    ``with CpuSampler() as s: ...`` then ``s.before`` / ``s.after``: ``after`` holds each
    process's last reading, so a process that exits before the block ends still counts up
    to its last sample (Ray Data releases an actor of the pool once it has no batch left: a
    snapshot taken after the dataset is consumed missed that actor, ~0.9 cores in a
    2-actor run of 2026-11-30).
    """

    def __init__(self, period: float = 1.0) -> None:
        self.period = period
        self.before: dict = {}
        self.after: dict = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True, name="cpu-sampler")

    def _sample(self) -> None:
        self.after.update(process_cpu())

    def _run(self) -> None:
        while not self._stop.wait(self.period):
            self._sample()

    def __enter__(self) -> "CpuSampler":
        self.before = process_cpu()
        self.after = dict(self.before)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()


def cpu_cores_by_role(before: dict, after: dict, seconds: float, actor_pids: set[int]) -> dict:
    """Cores used between two :func:`process_cpu` snapshots, by role: the translation actors,
    this driver (Ray Data's executor runs here), Ray's own processes (raylet, GCS, its helper
    actors and agents; those of any other Ray on the machine too: run the benchmark on a machine
    to itself) and everything else. A process that started in between counts whole."""
    roles = {"actors": 0.0, "driver": 0.0, "ray_other": 0.0, "other": 0.0}
    for pid, (name, cpu) in after.items():
        used = cpu - before.get(pid, (name, 0.0))[1]
        if pid in actor_pids:
            role = "actors"
        elif pid == os.getpid():
            role = "driver"
        elif "ray" in name or name == "gcs_server":  # ray::<actor>, raylet, ray-dashboard ...
            role = "ray_other"
        else:
            try:
                cmd = (Path("/proc") / str(pid) / "cmdline").read_bytes()
            except OSError:
                cmd = b""
            role = "ray_other" if b"/ray/" in cmd else "other"
        roles[role] += used
    return {k: round(v / seconds, 3) for k, v in roles.items()}


def _timed_translator_cls():
    """A Translator subclass adding per-batch timestamps and the actor's pid (columns t0, t1, pid)."""
    from dass_ray.stages.translator import Translator

    class TimedTranslator(Translator):
        def __call__(self, batch):
            t0 = time.time()
            out = super().__call__(batch)
            t1 = time.time()
            n = len(out["id"])
            out["t0"] = np.full(n, t0)
            out["t1"] = np.full(n, t1)
            out["pid"] = np.full(n, os.getpid())
            out["nice"] = np.full(n, os.getpriority(os.PRIO_PROCESS, 0))
            return out

    return TimedTranslator


def ray_throughput(cfg, rows, unet_path: str, segs: dict, actors: int, threads: int) -> dict:
    import dataclasses

    from ray.data import DataContext

    from dass_ray.stages import translator as tr

    rcfg = dataclasses.replace(cfg, ray=dataclasses.replace(cfg.ray, num_actors=actors, cpus_per_actor=1.0,
                                                            threads_per_actor=threads))
    orig = tr.Translator
    tr.Translator = _timed_translator_cls()  # translation_dataset passes this to map_batches
    # every actor of the pool up before the first batch is handed out: otherwise the actor that
    # starts first may take all the batches (--quick has 6 small ones), and "2 actors" measures one
    ctx = DataContext.get_current()
    orig_wait, ctx.wait_for_min_actors_s = ctx.wait_for_min_actors_s, 600
    try:
        with CpuSampler() as cpu:
            t_start = time.time()
            ds = tr.translation_dataset(rcfg, rows, unet_path, segs)
            seen = []
            ids, t0s, t1s, pids, nices = [], [], [], [], set()
            for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
                seen.append((time.time(), len(b["id"])))
                ids += [str(i) for i in b["id"]]
                t0s += list(b["t0"])
                t1s += list(b["t1"])
                pids += list(b["pid"])
                nices |= {int(v) for v in b["nice"]}
            t_end = time.time()
    finally:
        tr.Translator = orig
        ctx.wait_for_min_actors_s = orig_wait
    n = len(ids)
    first_t, first_n = seen[0]
    per_pid: dict[int, dict[float, list]] = {}  # pid -> batch start -> [duration, images]
    for a, b_, p in zip(t0s, t1s, pids):
        e = per_pid.setdefault(int(p), {}).setdefault(float(a), [b_ - a, 0])
        e[1] += 1
    return {
        "actors": actors, "threads_per_actor": threads, "images": n, "unique_ids": len(set(ids)),
        "overall_images_per_s": n / (t_end - t_start),
        "overall_s": t_end - t_start,
        # after actor start-up: from the first batch an actor started computing to the last one finishing
        "compute_window_images_per_s": n / (max(t1s) - min(t0s)),
        # as the driver sees it: rows after the first output batch / time since the first output row
        "from_first_output_images_per_s": (n - first_n) / (t_end - first_t) if t_end > first_t else None,
        "actors_seen": len(per_pid),
        "actor_niceness": sorted(nices),
        "batches_per_actor": sorted(len(v) for v in per_pid.values()),
        # sum over actors of each actor's own rate while computing (ignores idle time and start-up)
        "busy_images_per_s": sum(sum(e[1] for e in v.values()) / sum(e[0] for e in v.values())
                                 for v in per_pid.values()),
        # where the cores went over the whole run (start-up included): on 2 cores, what Ray's own
        # processes and the driver take is not available to the actors
        "cpu_cores": cpu_cores_by_role(cpu.before, cpu.after, t_end - t_start, {int(p) for p in per_pid}),
        "load": load(),
    }


def loop_throughput(cfg, rows, unet_path: str, seg_path, threads: int) -> dict:
    """The same batches through translate_level in this process (after loading the models)."""
    from dass_ray.data.layout import read_sample
    from dass_ray.data.transforms import from_diffusion, to_diffusion
    from dass_ray.diffusion.schedule import DDPMSchedule
    from dass_ray.diffusion.unet import load_unet
    from dass_ray.seg_training import load_trained
    from dass_ray.stages.common import data_root
    from dass_ray.translate import for_translation, translate_level

    prev = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        t_setup = time.time()
        # the same model preparation as the Ray actors (Translator), so the ratio compares like with like
        unet = for_translation(load_unet(unet_path, cfg.diffusion), precision=cfg.diffusion.precision)
        sched = DDPMSchedule(cfg.diffusion)
        seg = (for_translation(load_trained(Path(seg_path), cfg.segmenter, cfg.data.num_classes),
                               precision=cfg.guidance.precision) if seg_path else None)
        root = data_root(cfg)
        t0 = time.time()
        n = 0
        for r in rows:
            pairs = [read_sample(root, cfg.data.source_domain, cfg.data.source_split, i, cfg.data.num_classes)
                     for i in r["ids"]]
            x = to_diffusion(np.stack([p[0] for p in pairs]))
            y = torch.from_numpy(np.stack([p[1] for p in pairs]).astype(np.int64))
            out = translate_level(x, y, r["level"], seg, unet, sched, cfg.guidance, cfg.data.num_classes,
                                  ids=r["ids"], seed=cfg.seed, steps=cfg.diffusion.sample_steps)
            from_diffusion(out)
            n += len(r["ids"])
        t1 = time.time()
    finally:
        torch.set_num_threads(prev)
    return {"threads": threads, "images": n, "images_per_s": n / (t1 - t0),
            "overall_images_per_s": n / (t1 - t_setup), "seconds": t1 - t0, "load": load()}


def _loop_process(cfg, rows, unet_path: str, seg_path, ready, go, q) -> None:
    """One process of :func:`machine_scaling`: load the models, wait for the others, translate."""
    torch.set_num_threads(1)
    loop_throughput(cfg, rows[:1], unet_path, seg_path, threads=1)  # warm-up: model load, first kernels
    ready.put(os.getpid())
    go.wait()
    q.put(loop_throughput(cfg, rows, unet_path, seg_path, threads=1)["images_per_s"])


def machine_scaling(cfg, rows, unet_path: str, seg_path, procs: int) -> dict:
    """What this machine gives ``procs`` independent processes of the translation workload.

    Each process runs the plain loop (1 torch thread) over the same rows, all starting
    together after loading their models; no Ray. 2 processes / 1 process is the ceiling
    for Ray Data's 2-actor scaling on this machine (cores that share a host, memory
    bandwidth and turbo clocks are invisible from inside the VM).
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    ready, q, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    ps = [ctx.Process(target=_loop_process, args=(cfg, rows, unet_path, str(seg_path), ready, go, q))
          for _ in range(procs)]
    for p in ps:
        p.start()
    for _ in ps:
        ready.get(timeout=600)
    go.set()
    rates = [q.get(timeout=3600) for _ in ps]
    for p in ps:
        p.join()
    return {"processes": procs, "images_per_s": sum(rates), "per_process_images_per_s": rates, "load": load()}


# --------------------------------------------------------------------------- main

def start_ray_in_background(ray_cfg) -> dict:
    """--quick: Ray starts beside the in-process measurements instead of after them (~8 s less).

    Returns a dict whose ``ready`` event is set when ``ray.init`` returned (with ``seconds`` or
    ``error``); set its ``release`` event after ``ray.shutdown()``. The thread must outlive Ray:
    Ray starts its raylet with PR_SET_PDEATHSIG, which fires when the *thread* that spawned it
    ends, so a thread that returned right after ``ray.init`` took the raylet down with it."""
    from dass_ray.ray_utils import ensure_ray

    box: dict = {"ready": threading.Event(), "release": threading.Event()}

    def _start() -> None:
        t = time.time()
        try:
            ensure_ray(ray_cfg)
        except BaseException as e:  # re-raised in the main thread by the caller
            box["error"] = e
        box["seconds"] = time.time() - t
        box["ready"].set()
        box["release"].wait()

    threading.Thread(target=_start, name="ray-init", daemon=True).start()
    return box


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer repetitions and smaller translation batches")
    ap.add_argument("--out", required=True, help="JSON file to write")
    ap.add_argument("--data-root", default=None,
                    help="an existing digits build (default: the recipe's data.root when the demo built it there, "
                         "else a new build in a tmp dir)")
    ap.add_argument("--skip-ray", action="store_true", help="only the in-process measurements")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="override a key of the digits recipe (e.g. segmenter.width=16), as in dass-ray run")
    ap.add_argument("--actor-pairs", type=int, default=None,
                    help="1-actor / 2-actor runs measured back to back, the second pair in reverse order so a "
                         "linear drift of the VM's speed cancels (default: 2; --quick: 1)")
    ap.add_argument("--worker-niceness", type=int, default=None,
                    help="RAY_worker_niceness for the local Ray (Ray's default runs workers at nice 15, which on a "
                         "loaded machine gives the actors far less CPU than the nice-0 in-process loop)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    if args.worker_niceness is not None:
        os.environ["RAY_worker_niceness"] = str(args.worker_niceness)
    t_all = time.time()
    from dass_ray.checkpoints import save_state
    from dass_ray.config import load_config
    from dass_ray.data.digits import build_digits
    from dass_ray.diffusion.unet import build_unet, save_unet
    from dass_ray.segmenters import build_segmenter
    from dass_ray.translate import for_translation

    quick = args.quick
    tmp = Path(tempfile.mkdtemp(prefix="bench_translate_"))
    # the digits build is deterministic: reuse the demo's
    recipe_root = Path(load_config(CONFIG, args.overrides).data.root)
    root = (Path(args.data_root) if args.data_root
            else recipe_root if (recipe_root / "digits.json").exists() else tmp / "digits").resolve()
    t0 = time.time()
    if not (root / "digits.json").exists():
        build_digits(root, seed=0)
    t_data = time.time() - t0
    # The Ray Data part translates what one PTL level of the digits recipe does: level N with
    # the respaced chain (diffusion.sample_steps reverse steps), 12 batches, so that each of 2
    # actors gets several and a batch's compute (seconds) dwarfs Ray Data's per-batch overhead
    # as in a real level (a toy level of 4 steps measured the overhead, not the pool). With 8
    # batches the second actor's later start (a few s) weighed ~10 % in the 2-actor window.
    # --quick (a smoke run within 60 s: its ratios are not the measurement) shrinks that level
    # to 6 batches of 4 images and 4 reverse steps, and skips the machine-ceiling processes.
    tbatch = 4 if quick else 32  # ptl.translate_batch_size of the digits recipe is 32
    n_images = (6 if quick else 12) * tbatch
    cfg = load_config(CONFIG, list(args.overrides) + [f"data.root={root}", f"ptl.translate_batch_size={tbatch}"]
                      + (["diffusion.sample_steps=4"] if quick else []))
    level = cfg.ptl.N
    # --quick overlaps Ray's start with the in-process measurements (which it slows: its
    # ratios are a smoke test); the full run starts Ray only after them
    ray_bg = start_ray_in_background(cfg.ray) if quick and not args.skip_ray else None
    torch.set_num_threads(1)  # what a translation actor runs with (ray.threads_per_actor: 1)
    torch.manual_seed(0)
    unet = build_unet(cfg.diffusion).eval()
    torch.manual_seed(0)
    seg = build_segmenter(cfg.segmenter, cfg.data.num_classes).eval()
    unet_path = tmp / "unet.safetensors"
    seg_path = tmp / "seg.safetensors"
    save_unet(unet_path, unet)
    save_state(seg_path, {"model." + k: v for k, v in seg.state_dict().items()})
    # the step timings use the models as translation prepares them (channels-last on CPU)
    unet = for_translation(unet, precision=cfg.diffusion.precision)
    seg = for_translation(seg, precision=cfg.guidance.precision)

    batch = 4 if quick else 32  # ptl.translate_batch_size of the digits default is 32
    x, y_dig, _ = digit_batch(root, batch, cfg.data.num_classes)
    y_multi = multiclass_labels(batch, 32, cfg.data.num_classes, per_image=6)
    reps = 2 if quick else 10

    result: dict = {
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "quick": quick,
        "machine": {"cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
                    "python": platform.python_version(), "load_at_start": load(),
                    "driver_niceness": os.getpriority(os.PRIO_PROCESS, 0),
                    "RAY_worker_niceness": os.environ.get("RAY_worker_niceness")},
        "setup": {"unet_block_out_channels": cfg.diffusion.block_out_channels, "segmenter": cfg.segmenter.arch,
                  "segmenter_width": cfg.segmenter.width, "num_classes": cfg.data.num_classes, "image": [32, 32],
                  "guidance_scale": cfg.guidance.scale, "digits_build_s": round(t_data, 1), "overrides": args.overrides,
                  "unet_params": sum(p.numel() for p in unet.parameters()),
                  "segmenter_params": sum(p.numel() for p in seg.parameters())},
    }
    phases = {"setup_s": round(time.time() - t_all, 1)}
    t_phase = time.time()
    # the headline speedup stays at 6 classes present; the sweep shows how it follows the copy ratio
    st = bench_steps(cfg, unet, seg, x, y_dig, y_multi, reps, sweep_present=(5, 8, cfg.data.num_classes))
    phases["steps_s"] = round(time.time() - t_phase, 1)
    result["step_timings"] = st
    dig = st["steps"]["digits_labels"]
    mul = st["steps"]["multiclass_labels"]
    result["guided_over_unguided"] = {
        "goal": "<= 1.3",
        "digits_labels": {k: dig[k] for k in ("guided_over_unguided", "lcg_over_unguided", "gsg_over_unguided",
                                              "classes_present_per_image")},
        "multiclass_labels": {k: mul[k] for k in ("guided_over_unguided", "lcg_over_unguided", "gsg_over_unguided",
                                                  "classes_present_per_image")},
        "unguided_images_per_s": batch / st["steps"]["unguided_step"]["median_s"],
        "guided_images_per_s_digits": batch / (0.5 * (dig["lcg_step"]["median_s"] + dig["gsg_step"]["median_s"])),
        "note": "per reverse step, batch %d, torch threads 1; SGG = mean of one LCG and one GSG step" % batch,
    }
    fb = flop_bound(unet, seg, x, dig["classes_present_per_image"], mul["classes_present_per_image"])
    result["guided_over_unguided"]["flop_bound"] = fb
    bl = st["batched_lcg"]
    result["batched_lcg_speedup"] = {
        "speedup": bl["speedup"], "classes_present_per_image": bl["classes_present_per_image"],
        "naive_images_per_s": batch / bl["naive"]["median_s"],
        "batched_images_per_s": batch / bl["batched"]["median_s"],
        "copies": bl["copies"], "lcg_chunk": bl["lcg_chunk"], "one_backward_speedup": bl["one_backward_speedup"],
        # the naive loop runs every class over the whole batch (C x B copies), batched only the present pairs
        "copy_ratio": bl["copy_ratio"],
        "max_abs_grad_difference": bl["max_abs_grad_difference"], "load": bl["batched"]["load"],
        "by_classes_present": [
            {**{k: r[k] for k in ("classes_present_per_image", "copies", "copy_ratio", "speedup",
                                  "max_abs_grad_difference")},
             "naive_median_s": r["naive"]["median_s"], "batched_median_s": r["batched"]["median_s"]}
            for r in st["batched_lcg_by_classes_present"]],
    }
    t_phase = time.time()
    result["profile"] = bench_profile(cfg, unet, seg, x[:batch], y_dig[:batch])
    phases["profile_s"] = round(time.time() - t_phase, 1)
    t_phase = time.time()

    if not args.skip_ray:
        from dass_ray.ray_utils import ensure_ray
        from dass_ray.stages.translator import translation_rows
        from dass_ray.data.layout import list_ids

        ids = list_ids(root, "source", "train")[:n_images]
        rows = translation_rows({level: ids}, tbatch)
        segs = {level: str(seg_path)}
        rp = {"images": n_images, "level": level, "reverse_steps": cfg.diffusion.sample_steps or level,
              "translate_batch_size": tbatch,
              "guided": True, "arrangement": cfg.guidance.arrangement}
        loop1 = loop_throughput(cfg, rows, str(unet_path), seg_path, threads=1)
        import ray

        t_ray = time.time()
        if ray_bg is None:
            ensure_ray(cfg.ray)
        else:
            ray_bg["ready"].wait()
            if "error" in ray_bg:
                raise ray_bg["error"]
            rp["ray_init_in_background_s"] = round(ray_bg["seconds"], 1)
        rp["ray_init_s"] = round(time.time() - t_ray, 1)  # waited for here
        n_pairs = args.actor_pairs or (1 if quick else 2)
        try:
            a1 = ray_throughput(cfg, rows, str(unet_path), segs, actors=1, threads=1)
            a2 = ray_throughput(cfg, rows, str(unet_path), segs, actors=2, threads=1)
            # more pairs, alternately reversed (1 2 | 2 1 | 1 2 ...): on this VM the speed drifts between
            # runs by more than the goal's margin, and a ratio of two runs in a fixed order takes it in
            more = []
            for i in range(1, n_pairs):
                order = (2, 1) if i % 2 else (1, 2)
                got = {k: ray_throughput(cfg, rows, str(unet_path), segs, actors=k, threads=1) for k in order}
                more.append((got[1], got[2]))
            # --quick skips the 1-actor 2-thread run (an actor start-up costs ~10 s here)
            a1t2 = None if quick else ray_throughput(cfg, rows, str(unet_path), segs, actors=1, threads=2)
        finally:
            ray.shutdown()
            if ray_bg is not None:
                ray_bg["release"].set()
        # the loop is timed again after Ray (load drifts); --quick keeps the one before
        loop1b = loop1 if quick else loop_throughput(cfg, rows, str(unet_path), seg_path, threads=1)
        loop2 = None if quick else loop_throughput(cfg, rows, str(unet_path), seg_path, threads=2)
        # the machine's own ceiling for 2 actors: 2 plain processes / 1, same batches, no Ray
        m1 = None if quick else machine_scaling(cfg, rows, str(unet_path), seg_path, procs=1)
        m2 = None if quick else machine_scaling(cfg, rows, str(unet_path), seg_path, procs=2)
        rp["machine_scaling"] = {"processes1": m1, "processes2": m2}
        rp.update({"loop_threads1_before_ray": loop1, "loop_threads1_after_ray": loop1b, "loop_threads2": loop2,
                   "actors1_threads1": a1, "actors2_threads1": a2, "actors1_threads2": a1t2,
                   "more_pairs_actors1_actors2": more})
        # the loop reference: mean of the runs before and after the Ray measurements (load drifts)
        loop1 = {"images_per_s": 0.5 * (loop1["images_per_s"] + loop1b["images_per_s"]),
                 "overall_images_per_s": 0.5 * (loop1["overall_images_per_s"] + loop1b["overall_images_per_s"])}
        result["ray_data"] = rp

        def ratio(a, b, key):
            return a[key] / b[key] if a.get(key) and b.get(key) else None

        def scaling(base):  # 2 actors are only measured when both got batches (else: None)
            return {k: ratio(a2, base, k) if a2["actors_seen"] == 2 else None
                    for k in ("overall_images_per_s", "compute_window_images_per_s", "from_first_output_images_per_s")}

        ceiling = m2["images_per_s"] / m1["images_per_s"] if m1 else None
        pair_ratios = [b["compute_window_images_per_s"] / a["compute_window_images_per_s"]
                       for a, b in [(a1, a2)] + more if b["actors_seen"] == 2]
        result["actors2_over_actors1"] = {
            "goal": ">= 1.8",
            "vs_1actor_1thread": scaling(a1),
            "vs_1actor_2threads": None if a1t2 is None else scaling(a1t2),
            "images_per_s": {"actors2_threads1": a2["compute_window_images_per_s"],
                             "actors1_threads1": a1["compute_window_images_per_s"],
                             "actors1_threads2": a1t2["compute_window_images_per_s"] if a1t2 else None},
            "actors_seen": a2["actors_seen"],
            # 2 plain processes / 1 on the same batches (no Ray): what the cores give at best
            "machine_ceiling": ceiling,
            "of_machine_ceiling": (ratio(a2, a1, "compute_window_images_per_s") / ceiling
                                   if a2["actors_seen"] == 2 and ceiling else None),
            # 2 actors / 1 actor (compute window) of every pair, the first pair first; their mean
            "pairs": pair_ratios,
            "mean_of_pairs": statistics.mean(pair_ratios) if pair_ratios else None,
            # cores the driver (Ray Data's executor) and Ray's own processes used during the 2-actor run
            "ray_overhead_cores": (a2["cpu_cores"]["driver"] + a2["cpu_cores"]["ray_other"]
                                   if a2.get("cpu_cores") else None),
            "note": "compute_window = images / (last batch end - first batch start) inside the actors (after "
                    "actor start-up); from_first_output = as the driver sees rows (Ray Data hands outputs over in "
                    "bursts, so this over-states the rate); overall includes actor start-up",
        }
        result["pool_over_loop"] = {
            "goal": ">= 0.9",
            "after_startup": a1["compute_window_images_per_s"] / loop1["images_per_s"],
            "after_first_output_row": (a1["from_first_output_images_per_s"] / loop1["images_per_s"]
                                       if a1["from_first_output_images_per_s"] else None),
            "overall": a1["overall_images_per_s"] / loop1["overall_images_per_s"],
            "images_per_s": {"actor1_compute_window": a1["compute_window_images_per_s"],
                             "actor1_overall": a1["overall_images_per_s"], "loop_threads1_mean": loop1["images_per_s"],
                             "loop_threads1_with_model_load": loop1["overall_images_per_s"]},
            "note": "after_startup: images / (last batch end - first batch start) inside the actor; overall: "
                    "from dataset creation (actor start-up included) vs loop incl. model loading",
        }
    result["machine"]["load_at_end"] = load()
    phases["ray_data_s"] = round(time.time() - t_phase, 1)
    result["phases"] = phases
    result["total_s"] = round(time.time() - t_all, 1)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, default=float))
    print(json.dumps({k: result[k] for k in result if k not in ("step_timings", "profile", "ray_data")},
                     indent=2, default=float))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
