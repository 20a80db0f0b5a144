"""The target-domain noise estimator eps_theta: a ``diffusers.UNet2DModel`` (Sec. 4.1, 5.1).

``build_unet`` maps a :class:`DiffusionConfig` onto ``UNet2DModel``; :class:`EMA`
keeps shadow weights; ``save_unet``/``load_unet`` use the project's checksummed
safetensors; ``load_unet_dir`` reads a diffusers directory (local files only);
``ddpm_loss`` is the training objective (Eq. 5).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from diffusers import UNet2DModel

from dass_ray.checkpoints import CheckpointError, load_state, save_state
from dass_ray.config import DiffusionConfig
from dass_ray.diffusion.schedule import DDPMSchedule
from dass_ray.precision import bf16_autocast


def build_unet(cfg: DiffusionConfig) -> UNet2DModel:
    """A ``UNet2DModel`` for 3-channel ``[B, 3, S, S]`` images, S = ``cfg.image_size``.

    One down/up block per entry of ``block_out_channels``; the lowest resolution
    (last down block, first up block) uses attention blocks only when
    ``cfg.attention``. The mid block is diffusers' default ``UNetMidBlock2D`` (with
    its self-attention) either way: the (32, 64, 64) no-attention config then has
    the 1.06 M parameters the prototype measured. GroupNorm groups = gcd of the
    channels (at most 32), so small test widths such as (8, 16) work.
    """
    ch = list(cfg.block_out_channels)
    down = ["DownBlock2D"] * len(ch)
    up = ["UpBlock2D"] * len(ch)
    if cfg.attention:
        down[-1] = "AttnDownBlock2D"
        up[0] = "AttnUpBlock2D"
    groups = min(32, math.gcd(*ch))
    return UNet2DModel(
        sample_size=cfg.image_size, in_channels=3, out_channels=3,
        block_out_channels=tuple(ch), layers_per_block=cfg.layers_per_block,
        down_block_types=tuple(down), up_block_types=tuple(up),
        norm_num_groups=groups, attention_head_dim=math.gcd(8, ch[-1]),
    )


class EMA:
    """Exponential moving average of a model's parameters (float32 shadow copies).

    ``decay_t = min(decay, (1 + t) / (10 + t))`` after t updates (the usual warm-up,
    so a short run is not dominated by the random initialisation).
    Pass the unwrapped model (not a DDP wrapper) so parameter names match.
    """

    COUNT_KEY = "__ema_num_updates__"

    def __init__(self, model: torch.nn.Module, decay: float = 0.999) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must satisfy 0 <= decay < 1, got {decay}")
        self.decay = decay
        self.num_updates = 0
        self.shadow = {n: p.detach().float().clone() for n, p in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for n, p in model.named_parameters():
            s = self.shadow[n]
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
        self.num_updates += 1

    def to(self, device: str | torch.device) -> "EMA":
        """Move the shadow weights to ``device`` (kept float32); returns self."""
        self.shadow = {n: t.to(device) for n, t in self.shadow.items()}
        return self

    @torch.no_grad()
    def copy_to(self, model: torch.nn.Module) -> None:
        """Overwrite ``model``'s parameters with the shadow weights."""
        for n, p in model.named_parameters():
            p.copy_(self.shadow[n].to(device=p.device, dtype=p.dtype))

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Shadow weights by parameter name, plus the update count (saveable with ``save_state``)."""
        out = {n: t.clone() for n, t in self.shadow.items()}
        out[self.COUNT_KEY] = torch.tensor(self.num_updates, dtype=torch.long)
        return out

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        state = dict(state)
        count = state.pop(self.COUNT_KEY, None)
        if set(state) != set(self.shadow):
            missing = sorted(set(self.shadow) - set(state))[:3]
            extra = sorted(set(state) - set(self.shadow))[:3]
            raise ValueError(f"EMA state does not match the model: missing {missing}, unexpected {extra}")
        self.shadow = {n: t.detach().float().clone() for n, t in state.items()}
        self.num_updates = int(count) if count is not None else 0


def save_unet(path: str | Path, unet: UNet2DModel) -> str:
    """Write ``unet``'s weights to ``path`` (safetensors + .sha256); return the digest."""
    return save_state(path, unet.state_dict(), meta={"kind": "UNet2DModel"})


def load_unet(path: str | Path, cfg: DiffusionConfig, device: str | torch.device = "cpu") -> UNet2DModel:
    """``build_unet(cfg)`` with the weights of ``path`` (checksum verified), in eval mode."""
    state = load_state(path, device=device)
    unet = build_unet(cfg).to(device)
    try:
        unet.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit the UNet of this diffusion config "
                              f"(block_out_channels={cfg.block_out_channels}, attention={cfg.attention}): {e}") from e
    return unet.eval()


def load_unet_dir(path: str | Path) -> UNet2DModel:
    """A ``UNet2DModel`` from a local diffusers directory (``config.json`` + weights), no download."""
    p = Path(path)
    if not (p / "config.json").is_file():
        raise CheckpointError(f"UNet directory {str(p)!r} does not exist or has no config.json "
                              "(expected a diffusers UNet2DModel directory, e.g. from save_pretrained)")
    try:
        return UNet2DModel.from_pretrained(str(p), local_files_only=True).eval()
    except Exception as e:  # diffusers raises OSError / EnvironmentError / ValueError
        raise CheckpointError(f"UNet directory {str(p)!r} cannot be loaded: {e}") from e


def ddpm_loss(unet: UNet2DModel, schedule: DDPMSchedule, x0: torch.Tensor,
              generator: Optional[torch.Generator] = None, precision: str = "fp32") -> torch.Tensor:
    """Eq. 5: mean over elements of (eps_theta(x_k, k) - eps)^2, k ~ U{1..T}, eps ~ N(0, I).

    ``x0 [B, 3, H, W]`` in [-1, 1]; k and eps are drawn from ``generator`` (on its
    own device, then moved to ``x0``'s). ``precision="bf16"``: the UNet forward under
    bfloat16 autocast (the loss in float32). Returns a scalar tensor.
    """
    B = x0.shape[0]
    gdev = generator.device if generator is not None else torch.device("cpu")
    k = torch.randint(1, schedule.T + 1, (B,), generator=generator, device=gdev).cpu()
    noise = torch.randn(x0.shape, generator=generator, device=gdev, dtype=x0.dtype).to(x0.device)
    x_k = schedule.q_sample(x0, k, noise)
    with bf16_autocast(x0.device, precision):
        pred = unet(x_k, (k - 1).to(x0.device)).sample
    return F.mse_loss(pred.float(), noise)
