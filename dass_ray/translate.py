"""``translate_level``: the baseline translation phi^n (Sec. 4.1) under SGG (Sec. 4.2).

x_n = q_sample(x_0, n, eps) (Eq. 2), then n reverse steps k = n..1 with the
module of :func:`module_sequence` at each step (LCG / GSG / unguided). The noise of
sample ``id`` at level ``n`` (the forward eps, then z_k for k = n..2) comes from
its own ``torch.Generator`` seeded by :func:`noise_seed` ``(seed, n, id)``, so a
sample's output does not depend on its batch or on which worker translated it.
"""
from __future__ import annotations

import hashlib
from typing import Callable, Optional, Sequence

import torch

from dass_ray.config import GuidanceConfig
from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
from dass_ray.guidance.sgg import check_labels, gsg_step, lcg_step, module_sequence
from dass_ray.precision import Bf16Forward, resolve_precision


class TranslationError(RuntimeError):
    """The translation produced non-finite images; the message names the level and ids."""


def noise_seed(seed: int, n: int, sample_id) -> int:
    """A stable 63-bit generator seed from ``(seed, n, id)`` (sha256; not Python's salted ``hash``)."""
    blob = f"{seed}|{n}|{sample_id}".encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") & ((1 << 63) - 1)


def _noise(gens: list[torch.Generator], shape: Sequence[int], like: torch.Tensor) -> torch.Tensor:
    """One standard-normal ``shape`` draw per generator, stacked: ``[B, *shape]`` on ``like``'s device."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=like.dtype) for g in gens]).to(like.device)


def spaced_timesteps(n: int, steps: int) -> list[int]:
    """About ``steps`` timesteps evenly spaced in 1..n, increasing, always ending at n."""
    if steps >= n:
        return list(range(1, n + 1))
    import numpy as np

    return sorted({int(round(t)) for t in np.linspace(1, n, steps)} | {n})


class _Respaced:
    """eps model on a respaced chain: position k -> the original timestep ``timestep_map[k-1]``."""

    def __init__(self, eps_model: Callable, timestep_map: torch.Tensor):
        self.eps_model, self.map = eps_model, timestep_map

    def __call__(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        return self.eps_model(x, self.map.to(k.device)[k - 1])


def for_translation(module: torch.nn.Module, device: torch.device | str = "cpu",
                    precision: str = "fp32") -> torch.nn.Module:
    """``module`` on ``device`` in eval mode, with channels-last weights on CPU when it runs in
    float32 (returned for chaining). ``precision``: the one its forward runs in
    (``diffusion.precision`` for the UNet, ``guidance.precision`` for the segmenter).

    Only the inference side uses it (the UNet forward, the segmenter forward and its
    backward w.r.t. the input in SGG). Measured with the digits models at batch 32 on one
    thread: in float32 (2-core AVX2 EPYC, torch 2.14) channels-last made the unguided step
    11 % faster and the LCG / GSG steps 14 % / 9 % faster, outputs agreeing to ~1e-6; under
    bf16 autocast (AMX Xeon) it made them slower (UNet forward 137 vs 105 ms, the segmenter's
    GSG forward + backward 61 vs 57 ms), so bf16 keeps the default layout. Training steps were
    not faster either way (the UNet's 12 % slower in fp32), so training keeps the default
    layout. Not measured on GPUs: there the layout is left as it is.
    """
    module = module.to(device).eval()
    if torch.device(device).type == "cpu" and resolve_precision(precision, device) == "fp32":
        module = module.to(memory_format=torch.channels_last)
    return module


def translate_level(images: torch.Tensor, labels: torch.Tensor, n: int, segmenter: Optional[torch.nn.Module],
                    unet: Callable, schedule: DDPMSchedule, guidance: GuidanceConfig, num_classes: int,
                    ids: Sequence, seed: int, steps: Optional[int] = None) -> torch.Tensor:
    """phi^n + SGG: translate ``images [B, 3, H, W]`` (in [-1, 1]) guided by ``labels int64 [B, H, W]``.

    ``unet`` is a ``UNet2DModel`` (wrapped in :class:`EpsModel`) or already an
    ``eps_model(x, k)`` callable taking the paper's k. ``segmenter`` may be None when
    ``guidance.scale == 0`` or the arrangement is ``none``: then the result is
    phi^n exactly and no segmenter work is done. During translation the segmenter
    is in eval mode with ``requires_grad`` off on its parameters (both restored after).
    ``n = 0`` returns a copy of the input. Returns ``[B, 3, H, W]`` clamped to [-1, 1].

    ``steps``: reverse with ``steps`` respaced steps instead of n (``DDPMSchedule.respaced``;
    None or >= n is the paper's n steps). The forward diffusion still goes to x_n, and
    the SGG modules are arranged over the ``steps`` reverse steps.
    """
    B = images.shape[0]
    if images.ndim != 4 or labels.shape != (B, *images.shape[-2:]):
        raise ValueError(f"expected images [B, 3, H, W] and labels [B, H, W], got {tuple(images.shape)} "
                         f"and {tuple(labels.shape)}")
    if len(ids) != B:
        raise ValueError(f"got {len(ids)} ids for a batch of {B} images")
    if not 0 <= n <= schedule.T:
        raise ValueError(f"level n must lie in 0..{schedule.T}, got {n}")
    if n == 0:
        return images.clone()
    guided = guidance.scale > 0 and guidance.arrangement != "none"
    chain = schedule
    if steps is not None and steps < n:
        chain = schedule.respaced(spaced_timesteps(n, steps))
    m = chain.T if chain is not schedule else n
    modules = module_sequence(m, guidance.arrangement, guidance.seed) if guided else ["none"] * m
    if guided:
        if segmenter is None:
            raise ValueError(f"guidance (scale {guidance.scale}, arrangement {guidance.arrangement!r}) needs a segmenter")
        check_labels(labels, num_classes)
    eps_model = EpsModel(unet, getattr(schedule, "precision", "fp32")) if isinstance(unet, torch.nn.Module) else unet
    if chain is not schedule:
        eps_model = _Respaced(eps_model, chain.timestep_map)
    module_of_unet = unet if isinstance(unet, torch.nn.Module) else None

    gens = [torch.Generator().manual_seed(noise_seed(seed, n, i)) for i in ids]
    restore = []
    if guided:
        restore = [(p, p.requires_grad) for p in segmenter.parameters()]
        seg_training = segmenter.training
        segmenter.eval()
        for p, _ in restore:
            p.requires_grad_(False)
        seg_fn = Bf16Forward(segmenter, guidance.precision)  # the segmenter's forward in guidance.precision
    unet_training = module_of_unet.training if module_of_unet is not None else False
    if module_of_unet is not None:
        module_of_unet.eval()
    try:
        with torch.no_grad():
            x = schedule.q_sample(images, n, _noise(gens, images.shape[1:], images))
        for step, k in enumerate(range(m, 0, -1)):
            z = _noise(gens, images.shape[1:], images) if k > 1 else None
            module = modules[step]
            if module == "none":
                x = chain.guided_reverse_step(eps_model, x, k, z)
            else:
                if module == "lcg":
                    x = lcg_step(eps_model, chain, x, k, z, seg_fn, labels, guidance.scale, num_classes, level=n,
                                 ids=ids, space=guidance.space, lcg_chunk=guidance.lcg_chunk)
                else:
                    x = gsg_step(eps_model, chain, x, k, z, seg_fn, labels, guidance.scale, num_classes, level=n,
                                 ids=ids, space=guidance.space)
    finally:
        if guided:
            for p, req in restore:
                p.requires_grad_(req)
            segmenter.train(seg_training)
        if module_of_unet is not None:
            module_of_unet.train(unet_training)
    finite = torch.isfinite(x).flatten(1).all(1)
    if not bool(finite.all()):
        bad = [ids[i] for i in (~finite).nonzero().flatten().tolist()]
        raise TranslationError(f"translation at level n={n} produced non-finite images for ids {bad}")
    return x.clamp(-1.0, 1.0)
