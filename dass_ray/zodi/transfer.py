"""ZoDi zero-shot image transfer (Azuma et al., Sec. 3.2, Eq. 3-5, App. A).

Source images are moved to the target domain with Stable Diffusion +
a segmentation ControlNet, started from the source image itself:

1. ``z_0 = E(x) * scaling_factor`` (the mean of the VAE posterior: deterministic).
2. Start step ``k = floor(T * S)`` from the strength ``S`` (Eq. 9, App. A;
   ``T`` = the scheduler's ``num_train_timesteps``), capped at ``T - 1`` (the
   last timestep that exists, for ``S = 1``). The denoising runs DDIM over
   ``k, k - T//steps, k - 2 T//steps, ...`` (every timestep > 0), i.e. about
   ``int(steps * S)`` steps on a grid of spacing ``T // steps`` anchored at k;
   the last step lands on ``alphabar_0``. For T = 1000, 20 steps: S = 0.9 / 0.65 /
   0.6 gives k = 900 / 650 / 600 and 18 / 13 / 12 steps. (diffusers' img2img
   rule, which the public code inherits, instead keeps the last ``int(steps S)``
   timesteps of the ``leading`` grid 951, 901, ..., 1, so k = 851 / 601 / 551:
   one grid step plus the offset below Eq. 9's k. We follow the paper.)
3. Modes (``ZodiConfig.mode``, the ablations of Sec. 4.3 / Tab. 2):

   - ``zodi``: ControlNet + stochastic inversion (Eq. 4, 5):
     ``z_k = q_sample(z_0, k, noise)``, ``eps_k = eps_theta(z_k, k, c_p, y)``
     (with classifier-free guidance, as every denoising step),
     ``z'_k = sqrt(abar_k) z_0 + sqrt(1 - abar_k) eps_k``; denoise ``z'_k`` from k.
   - ``no_si`` ("ours w/o SI"): ControlNet, but the denoising starts from
     ``z_k = q_sample(z_0, k, noise)`` with random noise (SDEdit start + ControlNet).
   - ``sdedit`` (SDEdit, Meng et al.): no ControlNet, no SI: ``z_k = q_sample``.
   - ``inst`` ("InST"): stochastic inversion without ControlNet. The paper's InST
     baseline is "likewise without ControlNet"; InST's learned textual-inversion
     style embedding is not used (the same text prompt as the other modes).

   Denoising is DDIM over the kept timesteps with ``eta = cfg.eta`` (1 in the
   paper), classifier-free guidance ``eps_neg + g (eps_cond - eps_neg)`` with the
   negative prompt as the unconditional branch (cond/uncond in one batch), and
   the ControlNet (scale 1) applied to both branches, as in diffusers'
   ``StableDiffusionControlNetPipeline`` without guess mode.
4. ``x' = D(z / scaling_factor)`` clamped to [-1, 1].

All noise of sample ``id`` (the q_sample noise and every DDIM step's noise)
comes from a generator seeded by a stable hash of ``(seed, id)``, so the output
of a sample does not depend on the batch it was in. Outputs are returned in the
input order.
"""
from __future__ import annotations

import hashlib
import json
import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from dass_ray.config import ConfigError, ZodiConfig
from dass_ray.zodi.components import ZodiComponents
from dass_ray.zodi.control import control_map

# App. A: strength per target domain.
DEFAULT_STRENGTH: dict[str, float] = {"night": 0.9, "snow": 0.65, "rain": 0.65, "fog": 0.6, "game": 0.6}

MODES = ("zodi", "no_si", "sdedit", "inst")
USES_CONTROLNET = {"zodi": True, "no_si": True, "sdedit": False, "inst": False}
USES_SI = {"zodi": True, "no_si": False, "sdedit": False, "inst": True}


# --------------------------------------------------------------------------- settings

def resolve_strength(cfg: ZodiConfig) -> float:
    """``cfg.strength``, else the App. A default of ``cfg.domain``."""
    if cfg.strength is not None:
        return float(cfg.strength)
    if cfg.domain in DEFAULT_STRENGTH:
        return DEFAULT_STRENGTH[cfg.domain]
    raise ConfigError(
        f"config key 'zodi.strength': got None for domain {cfg.domain!r}; allowed: a number in (0, 1] "
        f"(App. A defaults exist only for {', '.join(sorted(DEFAULT_STRENGTH))})")


def resolve_prompt(cfg: ZodiConfig) -> str:
    """``cfg.prompt``, else ``"driving <domain>, best quality"``."""
    return cfg.prompt if cfg.prompt is not None else f"driving {cfg.domain}, best quality"


def k_from_strength(T: int, strength: float) -> int:
    """Start step of strength S: ``k = floor(T * S)`` (Eq. 9, App. A), capped at ``T - 1``.

    E.g. T = 1000: S = 0.9 -> 900, 0.65 -> 650, 0.6 -> 600, 1.0 -> 999. The product
    is rounded to 9 decimals before the floor so that binary fractions do not
    lose a step (``0.29 * 100`` is 28.999999999999996 in floating point).
    Raises ``ValueError`` when S is outside (0, 1] or k would be 0.
    """
    if not 0 < strength <= 1:
        raise ValueError(f"strength must be in (0, 1], got {strength}")
    k = min(math.floor(round(T * strength, 9)), T - 1)
    if k < 1:
        raise ValueError(f"zodi: strength {strength} with T = {T} gives k = {k}: no denoising step; "
                         f"raise zodi.strength")
    return k


def start_timesteps(scheduler, strength: float, steps: int) -> list[int]:
    """The DDIM timesteps to run: ``k, k - T//steps, k - 2 T//steps, ...`` (all > 0), first = k.

    ``k = floor(T * S)`` (:func:`k_from_strength`); ``T // steps`` is the spacing
    of a ``steps``-step DDIM trajectory over all T, so about ``int(steps * S)``
    steps run (18 / 13 / 12 for S = 0.9 / 0.65 / 0.6 and 20 steps).
    Calls ``scheduler.set_timesteps(steps)`` so that ``scheduler.step`` uses the
    same spacing (its previous timestep is ``t - T // steps``; below 0 it uses
    the scheduler's final alphabar).
    """
    T = int(scheduler.config.num_train_timesteps)
    if not 1 <= steps <= T:
        raise ValueError(f"zodi: steps must be in 1..{T}, got {steps}")
    k = k_from_strength(T, strength)
    scheduler.set_timesteps(steps)
    return list(range(k, 0, -(T // steps)))


def sample_seed(seed: int, sample_id: str) -> int:
    """A stable 63-bit seed for sample ``sample_id`` (independent of batching and process)."""
    blob = json.dumps(["zodi", int(seed), str(sample_id)]).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "little") & ((1 << 63) - 1)


def _randn(gens: list[torch.Generator], shape: Sequence[int], device, dtype) -> torch.Tensor:
    """Per-sample normal noise from per-sample CPU generators (device independent)."""
    return torch.stack([torch.randn(tuple(shape), generator=g, dtype=torch.float32) for g in gens]).to(device, dtype)


# --------------------------------------------------------------------------- model calls

@torch.no_grad()
def encode_prompts(comps: ZodiComponents, prompts: list[str]) -> torch.Tensor:
    """CLIP text embeddings ``[len(prompts), L, D]`` (padded to the tokenizer max length)."""
    tok = comps.tokenizer
    ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
              return_tensors="pt").input_ids.to(comps.text_encoder.device)
    return comps.text_encoder(ids)[0]


def _to_eps(pred: torch.Tensor, z_t: torch.Tensor, abar_t: torch.Tensor, prediction_type: str) -> torch.Tensor:
    if prediction_type == "epsilon":
        return pred
    if prediction_type == "v_prediction":
        return abar_t.sqrt() * pred + (1 - abar_t).sqrt() * z_t
    if prediction_type == "sample":
        return (z_t - abar_t.sqrt() * pred) / (1 - abar_t).sqrt()
    raise ValueError(f"unsupported scheduler prediction_type {prediction_type!r}")


def _guided_model_output(comps: ZodiComponents, z: torch.Tensor, t: int, text: torch.Tensor,
                         control: Optional[torch.Tensor], guidance_scale: float) -> torch.Tensor:
    """The UNet output (the scheduler's parameterisation) with CFG; ``text`` is [2, L, D] (neg, cond)."""
    B = z.shape[0]
    cfg_on = guidance_scale > 1.0
    if cfg_on:
        z_in = torch.cat([z, z])
        enc = torch.cat([text[0:1].expand(B, -1, -1), text[1:2].expand(B, -1, -1)])
        ctrl = torch.cat([control, control]) if control is not None else None
    else:
        z_in, enc, ctrl = z, text[1:2].expand(B, -1, -1), control
    z_in = comps.scheduler.scale_model_input(z_in, t)
    tt = torch.full((z_in.shape[0],), t, device=z.device, dtype=torch.long)
    extra = {}
    if ctrl is not None:
        down, mid = comps.controlnet(z_in, tt, encoder_hidden_states=enc, controlnet_cond=ctrl,
                                     conditioning_scale=1.0, guess_mode=False, return_dict=False)
        extra = dict(down_block_additional_residuals=down, mid_block_additional_residual=mid)
    out = comps.unet(z_in, tt, encoder_hidden_states=enc, return_dict=False, **extra)[0]
    if cfg_on:
        neg, cond = out.chunk(2)
        out = neg + guidance_scale * (cond - neg)
    return out


# --------------------------------------------------------------------------- transfer

def _check_inputs(images: torch.Tensor, labels: torch.Tensor, ids: Sequence[str]) -> None:
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images: expected [B, 3, H, W], got shape {tuple(images.shape)}")
    if labels.ndim != 3 or labels.shape[0] != images.shape[0] or labels.shape[-2:] != images.shape[-2:]:
        raise ValueError(f"labels: expected [B, H, W] matching images {tuple(images.shape)}, "
                         f"got {tuple(labels.shape)}")
    if len(ids) != images.shape[0]:
        raise ValueError(f"ids: expected {images.shape[0]} ids, got {len(ids)}")
    if len(set(ids)) != len(ids):
        raise ValueError("ids: duplicate sample ids in one call")


@torch.no_grad()
def zodi_transfer(images: torch.Tensor, labels: torch.Tensor, comps: ZodiComponents, cfg: ZodiConfig,
                  class_to_rgb, ids: Sequence[str], seed: int) -> torch.Tensor:
    """Transfer ``images`` (``[B, 3, H, W]`` in [-1, 1]) to ``cfg.domain``; see the module doc.

    ``labels`` (``int64 [B, H, W]``, 255 ignore) give the ControlNet control map
    (coloured with ``class_to_rgb``, ``[C, 3]`` in 0..255, resized nearest);
    ``ids`` name the samples (noise is seeded by ``(seed, id)``). Generation runs
    at ``cfg.resolution`` (None = the input size) in chunks of ``cfg.batch_size``;
    the result is resized back to the input size so it stays paired with
    ``labels``. Returns ``float32 [B, 3, H, W]`` in [-1, 1], in the input order,
    on the input device.
    """
    if cfg.mode not in MODES:
        raise ConfigError(f"config key 'zodi.mode': got {cfg.mode!r}; allowed: {', '.join(MODES)}")
    _check_inputs(images, labels, ids)
    use_cn = USES_CONTROLNET[cfg.mode]
    if use_cn and comps.controlnet is None:
        raise ConfigError(f"config key 'zodi.controlnet': got None; allowed: a local ControlNet directory "
                          f"(mode {cfg.mode!r} needs a ControlNet; modes 'sdedit' and 'inst' do not)")
    strength = resolve_strength(cfg)
    in_device, (H, W) = images.device, tuple(images.shape[-2:])
    gH, gW = (int(cfg.resolution[0]), int(cfg.resolution[1])) if cfg.resolution is not None else (H, W)
    f = comps.vae_scale_factor
    if gH % f or gW % f:
        raise ValueError(f"zodi: generation size {gH}x{gW} must be divisible by the VAE factor {f} "
                         f"(set zodi.resolution)")
    if use_cn:
        cn_f = 2 ** (len(comps.controlnet.config.conditioning_embedding_out_channels) - 1)
        if cn_f != f:
            raise ValueError(f"zodi: the ControlNet downsamples the control map by {cn_f}, the VAE by {f}")

    device, dtype = comps.device, comps.dtype
    # A private scheduler: set_timesteps mutates state, components may be shared.
    scheduler = type(comps.scheduler).from_config(comps.scheduler.config)
    timesteps = start_timesteps(scheduler, strength, cfg.steps)
    k = timesteps[0]
    abar = scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    ptype = scheduler.config.prediction_type
    local = ZodiComponents(unet=comps.unet, vae=comps.vae, text_encoder=comps.text_encoder,
                           tokenizer=comps.tokenizer, controlnet=comps.controlnet if use_cn else None,
                           scheduler=scheduler, origin=comps.origin)
    text = encode_prompts(comps, [cfg.negative_prompt, resolve_prompt(cfg)]).to(dtype)
    sf = float(comps.vae.config.scaling_factor)
    shift = getattr(comps.vae.config, "shift_factor", None) or 0.0

    out = torch.empty(images.shape[0], 3, H, W, dtype=torch.float32, device=in_device)
    for s in range(0, images.shape[0], cfg.batch_size):
        sl = slice(s, s + cfg.batch_size)
        x = images[sl].to(device=device, dtype=torch.float32)
        if (gH, gW) != (H, W):
            x = F.interpolate(x, size=(gH, gW), mode="bilinear", align_corners=False, antialias=True)
        gens = [torch.Generator("cpu").manual_seed(sample_seed(seed, i)) for i in ids[sl]]
        control = control_map(labels[sl].to(device), (gH, gW), class_to_rgb).to(dtype) if use_cn else None

        z0 = (comps.vae.encode(x.to(dtype)).latent_dist.mean - shift) * sf
        noise = _randn(gens, z0.shape[1:], device, z0.dtype)
        tk = torch.full((z0.shape[0],), k, dtype=torch.long, device=device)
        z = scheduler.add_noise(z0, noise, tk)  # q_sample(z_0, k)
        if USES_SI[cfg.mode]:
            a = abar[k]
            pred = _guided_model_output(local, z, k, text, control, cfg.guidance_scale)
            eps_k = _to_eps(pred.float(), z.float(), a, ptype)  # Eq. 4
            z = (a.sqrt() * z0.float() + (1 - a).sqrt() * eps_k).to(z0.dtype)  # Eq. 5
        for t in timesteps:
            pred = _guided_model_output(local, z, t, text, control, cfg.guidance_scale)
            vnoise = _randn(gens, z.shape[1:], device, z.dtype) if cfg.eta > 0 else None
            z = scheduler.step(pred, t, z, eta=cfg.eta, variance_noise=vnoise, return_dict=False)[0]
        x_out = comps.vae.decode(z / sf + shift, return_dict=False)[0].float()
        if (gH, gW) != (H, W):
            x_out = F.interpolate(x_out, size=(H, W), mode="bilinear", align_corners=False, antialias=True)
        out[sl] = x_out.clamp(-1, 1).to(in_device)
    return out
