"""Typed experiment configuration: one dataclass per concern, loaded from YAML.

Every field is typed; :func:`from_dict` checks unknown keys and types, each
dataclass's ``__post_init__`` checks ranges, so a bad value fails before any
work starts with a message naming the key, the value and what is allowed.

Configs are plain data: no ``**cfg`` dicts are read by key elsewhere, code
receives these objects.
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union, get_args, get_origin

import yaml


class ConfigError(ValueError):
    """A config key, type or value is not allowed. The message names all three."""


def _fail(key: str, value: Any, allowed: str) -> None:
    raise ConfigError(f"config key '{key}': got {value!r}; allowed: {allowed}")


def _check(cond: bool, key: str, value: Any, allowed: str) -> None:
    if not cond:
        _fail(key, value, allowed)


def _finite(key: str, value: float) -> None:
    _check(isinstance(value, (int, float)) and math.isfinite(value), key, value, "a finite number")


# --------------------------------------------------------------------------- sections

DIGITS_CLASSES = 11

Precision = Literal["auto", "fp32", "bf16"]  # dass_ray.precision: bf16 autocast, "auto" where native
Arrangement = Literal["alternate", "lcg_then_gsg", "gsg_then_lcg", "random", "lcg_only", "gsg_only", "none"]
Method = Literal["ptl", "zodi", "source_only", "oracle"]
SegArch = Literal[
    "small_cnn",
    "deeplabv2_r101",
    "fcn8s_vgg16",
    "segformer_b0",
    "deeplabv3plus_r50",
    "deeplabv3plus_r101",
]
Protocol = Literal["digits", "cityscapes19", "synthia16", "synthia13"]


@dataclass
class DataConfig:
    """Where the data lives (DESIGN.md section 5 layout) and how samples are prepared.

    ``root/<domain>/<split>/{images,labels}/<id>.png``. With ``dataset: digits`` the
    benchmark is built under ``root`` when absent (relative roots resolve against
    the working directory).
    """

    dataset: Literal["digits", "folder"] = "digits"
    root: str = "data/digits"
    source_domain: str = "source"
    source_split: str = "train"
    target_domain: str = "target"
    target_train_split: str = "train"
    target_val_split: str = "val"
    protocol: Protocol = "digits"
    num_classes: int = DIGITS_CLASSES
    image_size: Optional[list[int]] = None  # [H, W] resize (nearest for labels); None keeps size
    crop_size: Optional[list[int]] = None  # [H, W] random crop during training
    flip: bool = False  # random horizontal flip during training
    skip_bad: bool = False  # skip (and count) unreadable / inconsistent samples instead of failing
    max_samples: Optional[int] = None  # cap per split (toy runs); None = all
    seed: int = 0  # seed for building `digits`
    # source-val: this many source-train samples (a fixed seeded subset) are held out of every
    # training path and used to pick checkpoints without target labels (0 = none held out)
    source_val_holdout: int = 0

    def __post_init__(self) -> None:
        _check(self.num_classes >= 2, "data.num_classes", self.num_classes, "an integer >= 2")
        _check(self.source_val_holdout >= 0, "data.source_val_holdout", self.source_val_holdout, "an integer >= 0")
        _check(self.num_classes <= 255, "data.num_classes", self.num_classes, "<= 255 (255 is the ignore label)")
        for name in ("image_size", "crop_size"):
            v = getattr(self, name)
            if v is not None:
                _check(len(v) == 2 and all(x > 0 for x in v), f"data.{name}", v, "[height, width] of positive integers")
        if self.max_samples is not None:
            _check(self.max_samples > 0, "data.max_samples", self.max_samples, "a positive integer or null")
        for name in ("source_domain", "target_domain", "source_split", "target_train_split", "target_val_split"):
            v = getattr(self, name)
            _check(bool(v) and "/" not in v and v not in (".", ".."), f"data.{name}", v, "a non-empty directory name")


@dataclass
class DiffusionConfig:
    """The target DDPM (paper Sec. 3, 5.1): schedule, UNet2DModel shape, training.

    Schedule: linear beta from ``beta_start`` to ``beta_end`` over ``num_train_timesteps``.
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    image_size: int = 32
    block_out_channels: list[int] = field(default_factory=lambda: [32, 64, 64])
    layers_per_block: int = 1
    attention: bool = False  # attention blocks at the lowest resolution
    train_steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    warmup_steps: int = 50
    ema_decay: float = 0.999
    checkpoint_every: int = 200
    log_every: int = 50
    sample_steps: Optional[int] = None  # reverse steps of phi^n (respaced, Nichol & Dhariwal); None = n (paper)
    clip_sample: bool = False  # reverse mean from x0_hat clipped to [-1, 1] (False: Eq. 4 exactly)
    reverse_variance: Literal["auto", "beta", "posterior"] = "auto"  # auto: beta_k (paper), posterior when respaced
    # null: the DDPM reverse step (Eq. 4, variance above). A number in [0, 1]: the DDIM step (Song et al.
    # 2021) with that eta on the same (respaced) chain; 1 is the posterior-variance DDPM step, 0 deterministic
    ddim_eta: Optional[float] = None
    # UNet arithmetic in training and sampling: bf16 autocast is ~1.5x faster on CPUs with
    # native bf16 (AVX512) and on recent GPUs, but 14x slower where it is emulated (measured on an
    # AVX2-only EPYC): "auto" picks bf16 only where it is native. The guidance gradient and the schedule
    # stay float32/64.
    precision: Precision = "fp32"
    # the DDPM's training seed: the trained model is cached by (data, this section), so runs
    # with other run seeds (ablation seeds, Tune trials) share one DDPM
    seed: int = 0
    weights: Optional[str] = None  # a local directory with a trained UNet; skips training
    cache_dir: Optional[str] = "runs/_cache/ddpm"  # shared across runs, keyed by (data, DDPM config) hash

    def __post_init__(self) -> None:
        _check(2 <= self.num_train_timesteps <= 10000, "diffusion.num_train_timesteps", self.num_train_timesteps, "2..10000")
        _finite("diffusion.beta_start", self.beta_start)
        _finite("diffusion.beta_end", self.beta_end)
        _check(0 < self.beta_start < self.beta_end < 1, "diffusion.beta_start/beta_end",
               (self.beta_start, self.beta_end), "0 < beta_start < beta_end < 1")
        _check(self.image_size >= 8, "diffusion.image_size", self.image_size, "an integer >= 8")
        _check(len(self.block_out_channels) >= 1 and all(c > 0 for c in self.block_out_channels),
               "diffusion.block_out_channels", self.block_out_channels, "a non-empty list of positive integers")
        _check(self.image_size % (2 ** (len(self.block_out_channels) - 1)) == 0, "diffusion.image_size",
               self.image_size, f"divisible by 2**(len(block_out_channels)-1) = {2 ** (len(self.block_out_channels) - 1)}")
        _check(self.layers_per_block >= 1, "diffusion.layers_per_block", self.layers_per_block, "an integer >= 1")
        _check(self.train_steps >= 0, "diffusion.train_steps", self.train_steps, "an integer >= 0")
        _check(self.batch_size >= 1, "diffusion.batch_size", self.batch_size, "an integer >= 1")
        _finite("diffusion.lr", self.lr)
        _check(self.lr > 0, "diffusion.lr", self.lr, "a positive number")
        _check(self.warmup_steps >= 0, "diffusion.warmup_steps", self.warmup_steps, "an integer >= 0")
        _check(0.0 <= self.ema_decay < 1.0, "diffusion.ema_decay", self.ema_decay, "0 <= ema_decay < 1")
        _check(self.checkpoint_every >= 1, "diffusion.checkpoint_every", self.checkpoint_every, "an integer >= 1")
        _check(self.log_every >= 1, "diffusion.log_every", self.log_every, "an integer >= 1")
        if self.sample_steps is not None:
            _check(self.sample_steps >= 1, "diffusion.sample_steps", self.sample_steps, "an integer >= 1 or null")
        if self.ddim_eta is not None:
            _finite("diffusion.ddim_eta", self.ddim_eta)
            _check(0.0 <= self.ddim_eta <= 1.0, "diffusion.ddim_eta", self.ddim_eta, "null or a number in [0, 1]")


@dataclass
class GuidanceConfig:
    """Semantic Gradient Guidance (Sec. 4.2, Eq. 7-10, sign corrected: DESIGN.md section 3).

    ``scale`` is lambda in mu_hat = mu - lambda * beta_k * grad_{x_k} L. The loss
    ``L`` is the cross-entropy averaged over the counted pixels of each image
    and summed over the images of the batch (LCG: over the pixels of each class
    mask, summed over classes), so lambda does not depend on the batch size and
    the loss value does not grow with the image size. The per-pixel gradient
    carries 1 / (counted pixels), so at the same lambda larger images (or class
    regions) get a smaller push per pixel: re-tune lambda when the image size
    changes (see ``guidance/sgg.py``).
    """

    scale: float = 1000.0
    arrangement: Arrangement = "alternate"
    seed: int = 0  # for the `random` arrangement
    # where the segmenter reads and the step is taken: "x_k" (the paper, Eq. 7: mu - lambda beta_k grad_{x_k} L) or
    # "x0_hat" (beyond the paper: the denoised estimate takes the step x0_hat - lambda grad L,
    # the mean follows from it; DDPMSchedule.guided_reverse_step). lambda's scale differs between them.
    space: Literal["x_k", "x0_hat"] = "x_k"
    # LCG's class-masked copies go through the segmenter in chunks of at most this many
    # (0 = all at once). It changes no output (beyond float rounding; not hashed): it bounds
    # LCG's memory at paper scale, and on CPU chunks of ~64 copies run faster per copy than
    # one batch of ~200 (bench_translate's batched LCG). sgg.lcg_loss_and_grad.
    lcg_chunk: int = 64
    # the segmenter's forward inside guidance under bf16 autocast ("auto": only where bf16 is native,
    # as diffusion.precision); the gradient w.r.t. the image and the step stay float32
    precision: Precision = "fp32"

    def __post_init__(self) -> None:
        _finite("guidance.scale", self.scale)
        _check(self.scale >= 0, "guidance.scale", self.scale, "a finite number >= 0")
        _check(self.lcg_chunk >= 0, "guidance.lcg_chunk", self.lcg_chunk, "an integer >= 0 (0 = all copies at once)")


@dataclass
class SegmenterConfig:
    """The segmentation model g and its source training (Sec. 5.1, App. C)."""

    arch: SegArch = "small_cnn"
    width: int = 32  # channels of `small_cnn`
    pretrained: Optional[str] = None  # local path to ImageNet backbone weights (never downloaded)
    source_iters: int = 600
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    augment: bool = True  # App. C: noisy + class-masked copies on `augment_fraction` of samples
    augment_fraction: float = 0.1
    augment_max_n: Optional[int] = None  # largest n for the noisy copies; None = ptl.N
    similarity_weight: float = 0.0  # ZoDi Eq. 8 lambda (1 - cos) between source and translated features
    eval_batch_size: int = 100
    # the training forward (source, PTL, ZoDi) under bf16 autocast ("auto": only where bf16 is native,
    # as diffusion.precision); evaluation stays float32, guidance has guidance.precision
    precision: Precision = "fp32"
    # g_0 (and the oracle) shared across runs, keyed by (data, this section, schedule, seed):
    # ablations, seeds' variants and Tune trials with the same source training reuse it
    cache_dir: Optional[str] = "runs/_cache/source"

    def __post_init__(self) -> None:
        _check(self.width >= 4, "segmenter.width", self.width, "an integer >= 4")
        _check(self.source_iters >= 0, "segmenter.source_iters", self.source_iters, "an integer >= 0")
        _check(self.batch_size >= 1, "segmenter.batch_size", self.batch_size, "an integer >= 1")
        for k in ("lr", "momentum", "weight_decay", "similarity_weight", "augment_fraction"):
            _finite(f"segmenter.{k}", getattr(self, k))
        _check(self.lr > 0, "segmenter.lr", self.lr, "a positive number")
        _check(0 <= self.momentum < 1, "segmenter.momentum", self.momentum, "0 <= momentum < 1")
        _check(self.weight_decay >= 0, "segmenter.weight_decay", self.weight_decay, ">= 0")
        _check(0 <= self.augment_fraction <= 1, "segmenter.augment_fraction", self.augment_fraction, "0..1")
        _check(self.similarity_weight >= 0, "segmenter.similarity_weight", self.similarity_weight, ">= 0")
        _check(self.eval_batch_size >= 1, "segmenter.eval_batch_size", self.eval_batch_size, "an integer >= 1")
        if self.augment_max_n is not None:
            _check(self.augment_max_n >= 1, "segmenter.augment_max_n", self.augment_max_n, "an integer >= 1 or null")


@dataclass
class PTLConfig:
    """Progressive Translation Learning (Sec. 4.3, Eq. 11, 12).

    Levels n = stride, 2*stride, ..., N (from ``first_level`` when set). Each level translates
    ``iters_per_level * batch_size`` source images with phi^n + SGG(g_{n-1})
    and fine-tunes g on them as they stream in; ``epochs_per_level`` > 1 then
    replays the level's translations (kept in memory) that many times in all, so
    a level makes ``iters_per_level * epochs_per_level`` updates for the price of
    one translation pass (1 = the paper: each translation used once).
    """

    N: int = 600
    stride: int = 1
    iters_per_level: int = 300
    batch_size: int = 2
    lr: float = 2.5e-4
    momentum: float = 0.9
    l_src: bool = True  # Eq. 12 second term; False = "L_ada only" (Tab. 3)
    eval_every: int = 1  # evaluate target-val mIoU every k-th level (and always at the last)
    translate_batch_size: int = 32
    epochs_per_level: int = 1
    # Start level n+1's translation pipeline (its actors: process, imports, UNet) as soon as level
    # n's translations are consumed, instead of when level n+1 begins; the actors wait for g_n.
    # Same images, same order. Measured on 2 cores (docs/measurements.md): the first batch comes ~13 s sooner,
    # but the actors' start-up and the waiting pipeline slow the replay by more, so it is off.
    prestart_next_level: bool = False
    # The first level (None: stride). Beyond the paper, whose walk starts at n = 1: a later start
    # spends the same budget on levels nearer N, whose translations cross the gap. On digits,
    # 700, 800, 900, 1000 scored 29.4 +- 9.0 against 33.9 +- 0.6 for 250..1000 (3 seeds; docs/measurements.md,
    # Ablations: the early levels adapt g before it guides the levels near N).
    first_level: Optional[int] = None

    def __post_init__(self) -> None:
        _check(self.N >= 1, "ptl.N", self.N, "an integer >= 1")
        if self.first_level is not None:
            _check(1 <= self.first_level <= self.N, "ptl.first_level", self.first_level,
                   f"null or an integer in 1..ptl.N ({self.N})")
        _check(self.stride >= 1, "ptl.stride", self.stride, "an integer >= 1")
        _check(self.stride <= self.N, "ptl.stride", self.stride, f"1..ptl.N ({self.N})")
        _check(self.iters_per_level >= 1, "ptl.iters_per_level", self.iters_per_level, "an integer >= 1")
        _check(self.batch_size >= 1, "ptl.batch_size", self.batch_size, "an integer >= 1")
        _finite("ptl.lr", self.lr)
        _check(self.lr > 0, "ptl.lr", self.lr, "a positive number")
        _check(0 <= self.momentum < 1, "ptl.momentum", self.momentum, "0 <= momentum < 1")
        _check(self.eval_every >= 1, "ptl.eval_every", self.eval_every, "an integer >= 1")
        _check(self.translate_batch_size >= 1, "ptl.translate_batch_size", self.translate_batch_size, "an integer >= 1")
        _check(self.epochs_per_level >= 1, "ptl.epochs_per_level", self.epochs_per_level, "an integer >= 1")

    def updates_per_level(self) -> int:
        """Segmenter updates one level makes (per worker)."""
        return self.iters_per_level * self.epochs_per_level

    def levels(self) -> list[int]:
        """n = f, f + s, f + 2s, ... (f = ``first_level``, default s), and always N last."""
        first = self.stride if self.first_level is None else self.first_level
        out = list(range(first, self.N + 1, self.stride))
        if out[-1] != self.N:
            out.append(self.N)
        return out


@dataclass
class ZodiConfig:
    """ZoDi transfer (Azuma et al., Eq. 4-8; DESIGN.md section 4).

    Weights come only from local directories. ``mode`` selects the ablations:
    ``zodi`` (ControlNet + stochastic inversion), ``no_si`` (random noise),
    ``sdedit`` (no ControlNet, no SI), ``inst`` (no ControlNet, with SI).
    """

    base_model: Optional[str] = None  # local diffusers directory of SD 1.5 (unet/, vae/, text_encoder/, tokenizer/, scheduler/)
    controlnet: Optional[str] = None  # local directory of the segmentation ControlNet
    domain: str = "night"
    prompt: Optional[str] = None  # default "driving <domain>, best quality"
    negative_prompt: str = "lower quality, worst quality"
    strength: Optional[float] = None  # default per domain (App. A)
    steps: int = 20
    eta: float = 1.0
    guidance_scale: float = 9.0
    mode: Literal["zodi", "no_si", "sdedit", "inst"] = "zodi"
    resolution: Optional[list[int]] = None  # [H, W] generation size; None = input size
    batch_size: int = 4
    tiny_random: bool = False  # build tiny random components (tests / smoke runs only)
    class_palette: Optional[str] = None  # YAML/JSON file: class id -> ADE20K colour [r, g, b]
    seed: int = 0

    def __post_init__(self) -> None:
        if self.strength is not None:
            _finite("zodi.strength", self.strength)
            _check(0 < self.strength <= 1, "zodi.strength", self.strength, "0 < strength <= 1")
        _check(self.steps >= 1, "zodi.steps", self.steps, "an integer >= 1")
        _finite("zodi.eta", self.eta)
        _check(0 <= self.eta <= 1, "zodi.eta", self.eta, "0..1")
        _finite("zodi.guidance_scale", self.guidance_scale)
        _check(self.guidance_scale >= 1, "zodi.guidance_scale", self.guidance_scale, ">= 1")
        _check(self.batch_size >= 1, "zodi.batch_size", self.batch_size, "an integer >= 1")
        if self.resolution is not None:
            _check(len(self.resolution) == 2 and all(r % 8 == 0 and r > 0 for r in self.resolution),
                   "zodi.resolution", self.resolution, "[height, width], positive multiples of 8")


@dataclass
class RayConfig:
    """Where and with what resources the stages run.

    ``address``: None starts a local Ray in-process (or uses ``RAY_ADDRESS``).
    Fractional CPUs let actors and train workers share a 2-core machine.
    """

    address: Optional[str] = None
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the task was given a GPU
    num_workers: int = 1  # Ray Train workers (DDP)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0
    # torch threads of a DDPM / source training worker; None = max(1, int(cpus_per_worker)).
    # PTL workers use int(cpus_per_worker) while a level translates (they share the CPUs with
    # the translation actors) and this many again for the level's replay epochs and evaluation
    # once its actors are done, when there is one worker (RayConfig.replay_threads).
    threads_per_worker: Optional[int] = None
    num_actors: int = 1  # translation actor pool size
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    threads_per_actor: int = 1  # torch.set_num_threads in each actor
    object_store_mb: Optional[int] = 512  # local Ray only
    num_cpus: Optional[int] = None  # local Ray only; None = all cores
    # How often Ray Data may restart each translation actor of a PTL level, and each ZoDi
    # transfer actor, after it died (its batch is retried on the restarted actor). Ray Data's
    # own default is unlimited, so a batch that kills its actor every time would hang the run;
    # once the restarts are used up the PTL level fails, naming the batch, or the ZoDi transfer
    # fails, publishing nothing. 0 = the first crash fails the level / transfer.
    max_actor_restarts: int = 3
    # TEST-ONLY fault injection: each translation actor exits (os._exit) when it is handed
    # its (k+1)-th batch; Ray Data restarts it and retries the batch. None = off.
    fault_translator_after_batches: Optional[int] = None

    def worker_threads(self) -> int:
        return self.threads_per_worker or max(1, int(self.cpus_per_worker))

    def streaming_threads(self) -> int:
        """Torch threads of a PTL worker while its level's translation actors run beside it."""
        return max(1, int(self.cpus_per_worker))

    def replay_threads(self) -> int:
        """Torch threads of a PTL worker after its level's translations are done (replay epochs, eval).

        With one worker the level's actor pool has finished by then, so the worker may use the
        CPUs the actors held: ``worker_threads()``. With several workers (DDP) other ranks' actors
        can still run on the same node, so it keeps ``streaming_threads()``.
        """
        return self.worker_threads() if self.num_workers == 1 else self.streaming_threads()

    def __post_init__(self) -> None:
        _check(self.num_workers >= 1, "ray.num_workers", self.num_workers, "an integer >= 1")
        _check(self.num_actors >= 1, "ray.num_actors", self.num_actors, "an integer >= 1")
        if self.threads_per_worker is not None:
            _check(self.threads_per_worker >= 1, "ray.threads_per_worker", self.threads_per_worker, "an integer >= 1 or null")
        _check(self.threads_per_actor >= 1, "ray.threads_per_actor", self.threads_per_actor, "an integer >= 1")
        _check(self.max_actor_restarts >= 0, "ray.max_actor_restarts", self.max_actor_restarts,
               "an integer >= 0 (restarts per translation actor and PTL level, or per ZoDi transfer actor; "
               "0: the first crash fails the level / transfer)")
        for k in ("cpus_per_worker", "gpus_per_worker", "cpus_per_actor", "gpus_per_actor"):
            v = getattr(self, k)
            _finite(f"ray.{k}", v)
            _check(v >= 0, f"ray.{k}", v, "a number >= 0")
        if self.fault_translator_after_batches is not None:
            _check(self.fault_translator_after_batches >= 1, "ray.fault_translator_after_batches",
                   self.fault_translator_after_batches, "an integer >= 1 or null (test-only fault injection)")
        if self.object_store_mb is not None:
            _check(self.object_store_mb >= 64, "ray.object_store_mb", self.object_store_mb, ">= 64 or null")
        if self.device == "cuda":
            _check(self.gpus_per_worker > 0 or self.gpus_per_actor > 0, "ray.device", self.device,
                   "'cuda' only with gpus_per_worker or gpus_per_actor > 0")


@dataclass
class TrackingConfig:
    """MLflow: default a sqlite store inside the run directory.

    ``uri`` (or ``MLFLOW_TRACKING_URI``) selects a server.
    """

    enabled: bool = True
    uri: Optional[str] = None
    experiment: Optional[str] = None  # default: the config's name

    def __post_init__(self) -> None:
        pass


# Keys that change no output, so ExperimentConfig.hash() does not see their value: a run can be
# resumed with another one (after a PTL level failed on an actor's restarts, with more of them;
# with another LCG chunk size; with more translation actors; starting pipelines earlier). Keys
# added after runs existed are left out (OMIT), older ones are hashed at their default, so that
# runs made before keep their hash (those that used the default). The actor pools' size and CPU
# share change no image: each image draws its noise from its own generator (translate.noise_seed,
# zodi.transfer.sample_seed) and the pool hands batches over in order (tests/test_translate_ray.py:
# 2 actors give the images of 1).
OMIT = object()
UNHASHED: dict[tuple[str, str], Any] = {
    ("ray", "max_actor_restarts"): OMIT,
    ("guidance", "lcg_chunk"): OMIT,
    ("ptl", "prestart_next_level"): OMIT,
    ("ray", "num_actors"): 1,
    ("ray", "cpus_per_actor"): 1.0,
}
# Keys added after runs existed that DO change the output: hashed only when set to something
# other than this default, so that the runs made before (which had the default) keep their hash.
HASHED_UNLESS_DEFAULT: dict[tuple[str, str], Any] = {
    ("ptl", "first_level"): None,
}


@dataclass
class ExperimentConfig:
    """A whole run: what to do (``method``) and one section per concern."""

    name: str = "experiment"
    method: Method = "ptl"
    seed: int = 0
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    guidance: GuidanceConfig = field(default_factory=GuidanceConfig)
    segmenter: SegmenterConfig = field(default_factory=SegmenterConfig)
    ptl: PTLConfig = field(default_factory=PTLConfig)
    zodi: ZodiConfig = field(default_factory=ZodiConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        _check(bool(self.name) and all(c.isalnum() or c in "-_." for c in self.name), "name", self.name,
               "a non-empty name of letters, digits, '-', '_', '.'")
        if self.diffusion.weights is None:
            _check(self.ptl.N <= self.diffusion.num_train_timesteps, "ptl.N", self.ptl.N,
                   f"1..diffusion.num_train_timesteps ({self.diffusion.num_train_timesteps})")
        if self.ray.device == "cuda":  # every stage trains in workers; ptl and zodi also translate in actors
            _check(self.ray.gpus_per_worker > 0, "ray.gpus_per_worker", self.ray.gpus_per_worker,
                   "> 0 with ray.device 'cuda' (or device 'auto': CUDA only where a GPU was given)")
            if self.method in ("ptl", "zodi"):
                _check(self.ray.gpus_per_actor > 0, "ray.gpus_per_actor", self.ray.gpus_per_actor,
                       f"> 0 with ray.device 'cuda' and method {self.method!r}, whose actors translate "
                       "(or device 'auto': CUDA only where a GPU was given)")

    # ------------------------------------------------------------------ helpers
    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def hash(self, *sections: str) -> str:
        """A short stable hash of the whole config, or of the named sections only.

        Keys in :data:`UNHASHED` are left out or hashed at a fixed value; keys in
        :data:`HASHED_UNLESS_DEFAULT` are left out while they have that default.
        """
        d = self.to_dict()
        for (section, key), default in HASHED_UNLESS_DEFAULT.items():
            if d[section][key] == default:
                d[section].pop(key)
        for (section, key), value in UNHASHED.items():
            if value is OMIT:
                d[section].pop(key)
            else:
                d[section][key] = value
        if sections:
            d = {s: d[s] for s in sections}
        blob = json.dumps(d, sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


# --------------------------------------------------------------------------- loading

def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    if origin is list:
        (inner,) = get_args(tp)
        return f"a list of {_type_name(inner)}"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it (ints widen to floats)."""
    origin = get_origin(tp)
    if origin is Literal:
        if value in get_args(tp) and not isinstance(value, bool):
            return value
        _fail(key, value, _type_name(tp))
    if origin in (Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(a, value, key)
            except ConfigError:
                continue
        _fail(key, value, _type_name(tp))
    if origin is list:
        (inner,) = get_args(tp)
        if not isinstance(value, (list, tuple)):
            _fail(key, value, _type_name(tp))
        return [_coerce(inner, v, f"{key}[{i}]") for i, v in enumerate(value)]
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            _fail(key, value, f"a mapping of {tp.__name__} fields")
        return from_dict(tp, value, prefix=key + ".")
    if tp is bool:
        if isinstance(value, bool):
            return value
        _fail(key, value, "true/false")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        _fail(key, value, "an integer")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        _fail(key, value, "a number")
    if tp is str:
        if isinstance(value, str):
            return value
        _fail(key, value, "a string")
    raise TypeError(f"unsupported annotation {tp!r} for {key}")  # a bug in this module, not user input


T = typing.TypeVar("T")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass ``cls`` from ``data``, failing on unknown keys and wrong types."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for k in data:
        if k not in names:
            raise ConfigError(f"config key '{prefix}{k}': unknown key; allowed keys here: {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in data.items()}
    return cls(**kwargs)


def _parse_scalar(text: str) -> Any:
    """A ``--set`` value is YAML: ``3``, ``1e3``, ``true``, ``null``, ``[8, 16]``, ``name``."""
    v = yaml.safe_load(text)
    # YAML 1.1 reads "1e3" as a string; numbers written that way are meant as numbers.
    if isinstance(v, str):
        try:
            return float(v) if any(c in v for c in ".eE") else int(v)
        except ValueError:
            return v
    return v


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply ``section.key=value`` overrides to a raw config dict (validated afterwards)."""
    data = copy.deepcopy(data)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected section.key=value")
        path, text = item.split("=", 1)
        parts = path.strip().split(".")
        node = data
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {item!r}: '{p}' is not a section")
        node[parts[-1]] = _parse_scalar(text)
    return data


def set_path(cfg: ExperimentConfig, path: str, value: Any) -> ExperimentConfig:
    """A validated copy of ``cfg`` with ``path`` (``section.key``) set to ``value``."""
    d = cfg.to_dict()
    parts = path.split(".")
    node = d
    for p in parts[:-1]:
        if p not in node or not isinstance(node[p], dict):
            raise ConfigError(f"config key '{path}': unknown section '{p}'")
        node = node[p]
    if parts[-1] not in node:
        raise ConfigError(f"config key '{path}': unknown key")
    node[parts[-1]] = value
    return from_dict(ExperimentConfig, d)


def absolute_paths(cfg: ExperimentConfig, base: Optional[str | os.PathLike] = None) -> ExperimentConfig:
    """A copy of ``cfg`` with its relative file paths made absolute against ``base`` (default: cwd).

    Ray workers run in Ray's session directory, not the driver's working directory,
    so every path a worker opens must be absolute before the config is shipped.
    """
    base_path = Path(base or os.getcwd())

    def fix(p: Optional[str]) -> Optional[str]:
        if p is None or "://" in p or Path(p).expanduser().is_absolute():
            return None if p is None else str(Path(p).expanduser()) if "://" not in p else p
        return str((base_path / p).resolve())

    d = cfg.to_dict()
    d["data"]["root"] = fix(d["data"]["root"])
    for sec, key in (("diffusion", "weights"), ("diffusion", "cache_dir"), ("segmenter", "pretrained"),
                     ("segmenter", "cache_dir"),
                     ("zodi", "base_model"), ("zodi", "controlnet"), ("zodi", "class_palette")):
        d[sec][key] = fix(d[sec][key])
    return from_dict(ExperimentConfig, d)


def _read_yaml(p: Path, chain: tuple[Path, ...] = ()) -> dict:
    """``p`` as a mapping, with ``extends: other.yaml`` (relative to ``p``) merged underneath.

    The child's keys win; sections (mappings) merge key by key, lists and scalars are
    replaced. Ablation files state only what differs from the experiment they vary.
    """
    if not p.is_file():
        raise ConfigError(f"config file {str(p)!r} does not exist"
                          + (f" (extended by {str(chain[-1])!r})" if chain else ""))
    if p.resolve() in chain:
        raise ConfigError(f"config file {str(p)!r}: 'extends' forms a cycle: "
                          + " -> ".join(str(c) for c in (*chain, p.resolve())))
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {str(p)!r}: expected a mapping at top level, got {type(data).__name__}")
    parent = data.pop("extends", None)
    if parent is None:
        return data
    if not isinstance(parent, str):
        raise ConfigError(f"config key 'extends' in {str(p)!r}: got {parent!r}; allowed: a path to a YAML file")
    base = _read_yaml(p.parent / parent, (*chain, p.resolve()))
    base.pop("name", None)  # a variant is named after its own file unless it says otherwise
    return _deep_merge(base, data)


def _deep_merge(base: dict, top: dict) -> dict:
    out = dict(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def load_config(path: str | os.PathLike, overrides: Optional[list[str]] = None) -> ExperimentConfig:
    """Load ``path`` (YAML, ``yaml.safe_load``; ``extends:`` merged), apply ``--set`` overrides, validate."""
    p = Path(path)
    data = _read_yaml(p)
    data.setdefault("name", p.stem)
    data = apply_overrides(data, overrides or [])
    return from_dict(ExperimentConfig, data)
