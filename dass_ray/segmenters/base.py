"""The segmenter contract: logits + pooled backbone features from diffusion-space images.

Every segmentation model g of the engine is a :class:`Segmenter`:

- input ``x``: ``float [B, 3, H, W]`` in diffusion space ([-1, 1]). The model maps it to
  what its backbone expects (:meth:`Segmenter.normalize`) *inside* ``forward``, so the
  gradient of a loss w.r.t. ``x`` (SGG guidance, Eq. 7 of the label-guided paper) flows
  through the normalisation;
- ``forward(x) -> logits [B, C, H, W]`` (bilinearly upsampled to the input size);
- ``forward(x, return_features=True)`` / ``forward_features(x) -> (logits, pooled [B, D])``
  where ``pooled`` is the global average pool of the backbone's last feature map: ZoDi's
  ``F`` in the similarity loss (Eq. 7, 8 of ZoDi). Under DDP call the wrapper itself with
  ``return_features=True`` (``ddp_model(x, return_features=True)``) so DDP sees the
  forward; ``forward_features`` is the same call on the bare module.

Weights: :func:`save_segmenter` / :func:`load_segmenter` write and read the whole model
through :mod:`dass_ray.checkpoints` (safetensors + sha256). ImageNet backbone weights
(``SegmenterConfig.pretrained``) come only from a local file (never downloaded), see
:func:`load_pretrained_backbone`.
"""
from __future__ import annotations

import abc
import dataclasses
import logging
import os
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from dass_ray.checkpoints import CheckpointError, load_state, save_state
from dass_ray.config import SegmenterConfig

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class Segmenter(nn.Module, metaclass=abc.ABCMeta):
    """Base class: a backbone + a head, evaluated on diffusion-space images.

    Subclasses set ``self.backbone`` (the module ImageNet weights load into) and
    implement :meth:`logits_and_features`, which receives the *normalised* input and
    returns ``(logits [B, C, h, w] at any resolution, last backbone feature map [B, D, h', w'])``.

    Args:
        num_classes: C.
        arch: the ``SegmenterConfig.arch`` value this model was built for (recorded in
            checkpoints and checked on load).
        imagenet_norm: True: ``normalize(x) = ((x + 1) / 2 - mean) / std`` with the
            ImageNet statistics (torchvision / SegFormer backbones); False: identity
            (models trained from scratch on diffusion-space inputs, e.g. ``small_cnn``).
    """

    backbone: nn.Module

    def __init__(self, num_classes: int, arch: str, imagenet_norm: bool) -> None:
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        self.num_classes = int(num_classes)
        self.arch = arch
        self.imagenet_norm = bool(imagenet_norm)
        # Non-persistent: not part of checkpoints, follow .to(device) / .double().
        self.register_buffer("_mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("_std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    # ------------------------------------------------------------------ contract
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Diffusion space [-1, 1] -> the backbone's input (differentiable)."""
        if not self.imagenet_norm:
            return x
        return ((x + 1.0) * 0.5 - self._mean) / self._std

    @abc.abstractmethod
    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised ``x [B, 3, H, W]`` -> (logits [B, C, h, w], feature map [B, D, h', w'])."""

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """``x [B, 3, H, W]`` in [-1, 1] -> logits ``[B, C, H, W]``
        (or ``(logits, pooled [B, D])`` with ``return_features=True``)."""
        if x.dim() != 4 or x.shape[1] != 3:
            raise ValueError(f"{type(self).__name__} expects images [B, 3, H, W], got {tuple(x.shape)}")
        logits, feat = self.logits_and_features(self.normalize(x))
        if logits.shape[-2:] != x.shape[-2:]:
            logits = F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)
        if return_features:
            return logits, feat.mean(dim=(2, 3))
        return logits

    def forward_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(logits [B, C, H, W], pooled [B, D])``: pooled = GAP of the last backbone map (ZoDi's F)."""
        return self.forward(x, return_features=True)

    # ------------------------------------------------------------------ pretrained weights
    def pretrained_state(self, path: str) -> dict[str, torch.Tensor]:
        """Read ``path`` and return a state dict in ``self.backbone``'s key layout.

        Default: a torchvision-style state dict whose keys match the backbone's (keys the
        backbone does not have, e.g. ``fc.*``, are reported as unexpected and ignored).
        Subclasses override to rename / reshape (FCN-8s: VGG ``classifier`` -> fc6/fc7).
        """
        return read_state_dict(path)

    def required_backbone_keys(self) -> set[str]:
        """Backbone keys a pretrained file must provide (default: all of them)."""
        return set(self.backbone.state_dict().keys())


# --------------------------------------------------------------------------- weight files

def _strip_prefix(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Remove ``prefix`` from every key that has it (DDP's ``module.``)."""
    return {(k[len(prefix):] if k.startswith(prefix) else k): v for k, v in state.items()}


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A state dict from a local file: ``.safetensors`` or a ``torch.save`` file.

    ``torch.load`` runs with ``weights_only=True`` (no pickle code execution). A dict
    wrapping the weights under ``state_dict`` or ``model`` is unwrapped; DDP ``module.``
    prefixes are stripped. Raises FileNotFoundError naming the path when it is missing.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"pretrained weights file {str(p)!r} does not exist (weights are never downloaded; "
                                f"set segmenter.pretrained to a local file or null)")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(p), device="cpu")
    else:
        state = torch.load(str(p), map_location="cpu", weights_only=True)
        for wrapper in ("state_dict", "model"):
            if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
                state = state[wrapper]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ValueError(f"pretrained weights file {str(p)!r} does not hold a state dict of tensors")
    return _strip_prefix(dict(state), "module.")


def load_pretrained_backbone(model: Segmenter, path: str | os.PathLike) -> dict[str, list[str]]:
    """Load local ImageNet weights into ``model.backbone``; return the key report.

    Strict for the keys the backbone should match (:meth:`Segmenter.required_backbone_keys`):
    a missing one or a shape mismatch raises ValueError naming the file. Keys of the file
    the backbone does not have (a classifier ``fc.*``, a decode head, ...) are ignored and
    reported. Returns ``{"loaded": [...], "missing": [...], "unexpected": [...]}``
    (``missing`` lists optional backbone keys left at their initialisation); the report is
    also logged and kept as ``model.pretrained_report``.
    """
    path = str(path)
    state = model.pretrained_state(path)
    own = model.backbone.state_dict()
    unexpected = sorted(k for k in state if k not in own)
    bad_shape = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                 for k in state if k in own and state[k].shape != own[k].shape]
    if bad_shape:
        raise ValueError(f"pretrained weights {path!r} do not fit the {model.arch} backbone: "
                         + "; ".join(bad_shape[:5]) + (" ..." if len(bad_shape) > 5 else ""))
    usable = {k: v for k, v in state.items() if k in own}
    result = model.backbone.load_state_dict(usable, strict=False)
    missing = sorted(result.missing_keys)
    required_missing = [k for k in missing if k in model.required_backbone_keys()]
    if required_missing:
        raise ValueError(f"pretrained weights {path!r} lack {len(required_missing)} keys the {model.arch} backbone needs, "
                         f"e.g. {required_missing[:5]}; unexpected keys in the file: {unexpected[:5]}")
    report = {"loaded": sorted(usable), "missing": missing, "unexpected": unexpected}
    log.info("loaded %d backbone tensors from %s; missing (left initialised): %s; unexpected (ignored): %s",
             len(usable), path, missing, unexpected)
    model.pretrained_report = report
    return report


# --------------------------------------------------------------------------- building

def build_segmenter(cfg: SegmenterConfig, num_classes: int) -> Segmenter:
    """The model ``cfg.arch`` for ``num_classes`` classes, with local backbone weights if
    ``cfg.pretrained`` is set (FileNotFoundError if that file does not exist)."""
    arch = cfg.arch
    if arch == "small_cnn":
        from dass_ray.segmenters.small_cnn import SmallCNN

        model: Segmenter = SmallCNN(num_classes, width=cfg.width)
    elif arch == "deeplabv2_r101":
        from dass_ray.segmenters.zoo import DeepLabV2

        model = DeepLabV2(num_classes, depth=101)
    elif arch == "fcn8s_vgg16":
        from dass_ray.segmenters.zoo import FCN8s

        model = FCN8s(num_classes)
    elif arch == "segformer_b0":
        from dass_ray.segmenters.zoo import SegFormer

        model = SegFormer(num_classes)
    elif arch == "deeplabv3plus_r50":
        from dass_ray.segmenters.zoo import DeepLabV3Plus

        model = DeepLabV3Plus(num_classes, depth=50)
    elif arch == "deeplabv3plus_r101":
        from dass_ray.segmenters.zoo import DeepLabV3Plus

        model = DeepLabV3Plus(num_classes, depth=101)
    else:  # the config's Literal makes this unreachable for validated configs
        raise ValueError(f"segmenter.arch {arch!r}: unknown architecture")
    if cfg.pretrained is not None:
        if arch == "small_cnn":
            raise ValueError("segmenter.pretrained: small_cnn has no ImageNet backbone; set it to null")
        load_pretrained_backbone(model, cfg.pretrained)
    return model


def save_segmenter(path: str | os.PathLike, model: nn.Module, meta: Optional[dict] = None) -> str:
    """Write ``model``'s weights (DDP-wrapped or not) as a checksummed safetensors file.

    ``arch`` and ``num_classes`` are added to ``meta`` and checked by :func:`load_segmenter`.
    Returns the file's sha256.
    """
    inner = model.module if isinstance(getattr(model, "module", None), Segmenter) else model
    state = _strip_prefix(inner.state_dict(), "module.")
    m = {str(k): str(v) for k, v in (meta or {}).items()}
    if isinstance(inner, Segmenter):
        m["arch"] = inner.arch
        m["num_classes"] = str(inner.num_classes)
    return save_state(path, state, m)


def read_segmenter_meta(path: str | os.PathLike) -> dict[str, str]:
    """The metadata stored with a segmenter checkpoint (no tensors loaded)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


def load_segmenter(path: str | os.PathLike, cfg: SegmenterConfig, num_classes: int,
                   device: str | torch.device = "cpu") -> Segmenter:
    """Build ``cfg.arch`` (without the ImageNet weights: the checkpoint replaces them) and
    load the checkpoint at ``path`` strictly; :class:`CheckpointError` on any mismatch."""
    state = _strip_prefix(load_state(path), "module.")
    meta = read_segmenter_meta(path)
    if "arch" in meta and meta["arch"] != cfg.arch:
        raise CheckpointError(f"checkpoint {str(path)!r} holds a {meta['arch']!r} segmenter, config asks for {cfg.arch!r}")
    if "num_classes" in meta and meta["num_classes"] != str(num_classes):
        raise CheckpointError(f"checkpoint {str(path)!r} has {meta['num_classes']} classes, expected {num_classes}")
    model = build_segmenter(dataclasses.replace(cfg, pretrained=None), num_classes)
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"checkpoint {str(path)!r} does not fit a {cfg.arch} segmenter "
                              f"(width/num_classes?): {e}") from e
    return model.to(device)
