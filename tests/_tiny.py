"""Tiny, seeded models and batches for fast tests (8x8 images, channels (8, 16), T = 20)."""
from __future__ import annotations

import torch
from torch import nn

from dass_ray.config import DiffusionConfig


def tiny_diffusion_config(image_size: int = 8, num_train_timesteps: int = 20, attention: bool = False) -> DiffusionConfig:
    return DiffusionConfig(image_size=image_size, block_out_channels=[8, 16], layers_per_block=1,
                           num_train_timesteps=num_train_timesteps, attention=attention, cache_dir=None)


def tiny_unet(cfg: DiffusionConfig | None = None, seed: int = 0):
    """A random ``UNet2DModel`` of :func:`tiny_diffusion_config` (eval mode)."""
    from dass_ray.diffusion.unet import build_unet

    torch.manual_seed(seed)
    return build_unet(cfg or tiny_diffusion_config()).eval()


class TinySegmenter(nn.Module):
    """Diffusion-space input -> own normalisation ((x+1)/2 - mean)/std -> 3 convs -> logits [B, C, H, W]."""

    def __init__(self, num_classes: int = 3, width: int = 8, mean: float = 0.5, std: float = 0.25) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.register_buffer("mean", torch.full((1, 3, 1, 1), float(mean)))
        self.register_buffer("std", torch.full((1, 3, 1, 1), float(std)))
        self.net = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, width, 3, padding=1), nn.SiLU(),
                                 nn.Conv2d(width, num_classes, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(((x + 1) * 0.5 - self.mean) / self.std)


def tiny_segmenter(num_classes: int = 3, seed: int = 0, **kw) -> TinySegmenter:
    torch.manual_seed(seed)
    return TinySegmenter(num_classes, **kw).eval()


def tiny_batch(batch: int = 4, size: int = 8, num_classes: int = 3, seed: int = 0, ignore_frac: float = 0.1):
    """Images ``[B, 3, S, S]`` in [-1, 1] and blocky labels ``int64 [B, S, S]`` with some 255 pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(batch, 3, size, size, generator=g) * 2 - 1
    coarse = torch.randint(0, num_classes, (batch, size // 2, size // 2), generator=g)
    y = coarse.repeat_interleave(2, 1).repeat_interleave(2, 2)
    y[torch.rand(batch, size, size, generator=g) < ignore_frac] = 255
    return x, y
