"""The papers' segmenters, assembled from maintained libraries (no weights downloaded).

- :class:`DeepLabV2` (``deeplabv2_r101``, label-guided DASS Sec. 5.1): DeepLab-V2's head
  (ASPP-V2: four parallel 3x3 convolutions with dilation 6, 12, 18, 24 whose class scores
  are summed) on **torchvision's** ResNet-101 with ``replace_stride_with_dilation=[False,
  True, True]`` (output stride 8). It is not the original Caffe DeepLab-V2 ResNet-101
  (which puts the stride in the 1x1 convolution and freezes BatchNorm): the head is
  DeepLab-V2's, the backbone torchvision's, so torchvision ImageNet weights load.
- :class:`FCN8s` (``fcn8s_vgg16``): FCN-8s (Long et al.) on torchvision's VGG16
  ``features``: fc6 / fc7 as 7x7 / 1x1 convolutions (4096 channels, loadable from VGG16's
  ``classifier.0`` / ``classifier.3``), score layers on pool3 / pool4 (zero-initialised)
  fused with x2 transposed-convolution upsampling (bilinear init), x8 bilinear upsampling
  to the input. fc6 is padded (3) instead of the original padding of 100 + cropping, so
  sizes align for inputs divisible by 32 (others are aligned by interpolation).
- :class:`DeepLabV3Plus` (``deeplabv3plus_r50`` / ``deeplabv3plus_r101``, ZoDi): torchvision
  ResNet with output stride 16 (``replace_stride_with_dilation=[False, False, True]``),
  torchvision's ASPP (rates 6, 12, 18, 256 channels), the DeepLabV3+ decoder (layer1
  projected to 48 channels, concatenated with the x4-upsampled ASPP output, two 3x3
  convolutions). Note: torchvision's ASPP has an image-pooling branch with BatchNorm, so
  training mode needs at least 2 images per batch (per DDP worker).
- :class:`SegFormer` (``segformer_b0``): ``transformers``' SegFormer (MiT-b0 encoder + all-MLP
  decoder) built from a config (an optional extra: ``pip install 'dass-ray[zodi]'``).

Pooled features (ZoDi's F): the global average pool of the last backbone map (ResNet
layer4, VGG fc7, the last SegFormer encoder stage). Every model takes diffusion-space
inputs and applies the ImageNet normalisation inside ``forward``.

ImageNet weights (``SegmenterConfig.pretrained``), local files only:
ResNet / VGG: a torchvision classification state dict (``resnet101-*.pth`` or its
safetensors conversion); SegFormer: a state dict in the installed transformers' key layout
(``segformer.`` prefix optional), or a local Hugging Face model *directory* (e.g. a saved
``nvidia/mit-b0``), read with ``from_pretrained(..., local_files_only=True)`` so
transformers renames legacy keys.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dass_ray.segmenters.base import Segmenter, read_state_dict


def _resnet(depth: int, replace_stride_with_dilation: list[bool]) -> nn.Module:
    from torchvision.models import resnet50, resnet101

    if depth == 50:
        return resnet50(weights=None, replace_stride_with_dilation=replace_stride_with_dilation)
    if depth == 101:
        return resnet101(weights=None, replace_stride_with_dilation=replace_stride_with_dilation)
    raise ValueError(f"ResNet depth must be 50 or 101, got {depth}")


def _resize_to(x: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
    if x.shape[-2:] == ref.shape[-2:]:
        return x
    return F.interpolate(x, size=ref.shape[-2:], mode="bilinear", align_corners=False)


# --------------------------------------------------------------------------- DeepLab-V2

class ASPPV2(nn.Module):
    """DeepLab-V2 classifier: sum of 3x3 convolutions to class scores at several dilations."""

    def __init__(self, in_channels: int, num_classes: int, rates: tuple[int, ...] = (6, 12, 18, 24)) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(in_channels, num_classes, 3, padding=r, dilation=r, bias=True) for r in rates
        )
        for c in self.convs:
            nn.init.normal_(c.weight, 0.0, 0.01)
            nn.init.zeros_(c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.convs[0](x)
        for c in self.convs[1:]:
            out = out + c(x)
        return out


class DeepLabV2(Segmenter):
    """DeepLab-V2's ASPP-V2 head on torchvision's ResNet-101 (output stride 8)."""

    def __init__(self, num_classes: int, depth: int = 101) -> None:
        super().__init__(num_classes, arch=f"deeplabv2_r{depth}", imagenet_norm=True)
        from torchvision.models._utils import IntermediateLayerGetter

        resnet = _resnet(depth, [False, True, True])
        self.backbone = IntermediateLayerGetter(resnet, return_layers={"layer4": "out"})
        self.classifier = ASPPV2(2048, num_classes, (6, 12, 18, 24))

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.backbone(x)["out"]
        return self.classifier(f), f


# --------------------------------------------------------------------------- FCN-8s

def _bilinear_kernel(channels: int, size: int) -> torch.Tensor:
    """Per-channel bilinear upsampling kernel for a ConvTranspose2d (FCN's initialisation)."""
    factor = (size + 1) // 2
    center = factor - 1 if size % 2 == 1 else factor - 0.5
    og = torch.arange(size, dtype=torch.float32)
    filt = (1 - (og - center).abs() / factor)
    k2 = filt[:, None] * filt[None, :]
    w = torch.zeros(channels, channels, size, size)
    w[range(channels), range(channels)] = k2
    return w


class VGG16FCNBackbone(nn.Module):
    """torchvision's VGG16 ``features`` (pool3 / pool4 / pool5 taps) + fc6 / fc7 as convolutions."""

    POOL3, POOL4 = 17, 24  # features[:17] ends with pool3, features[17:24] with pool4

    def __init__(self) -> None:
        super().__init__()
        from torchvision.models.vgg import cfgs, make_layers

        self.features = make_layers(cfgs["D"], batch_norm=False)
        self.fc6 = nn.Conv2d(512, 4096, 7, padding=3)
        self.fc7 = nn.Conv2d(4096, 4096, 1)
        self.drop = nn.Dropout2d(0.5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """-> (pool3 [256, /8], pool4 [512, /16], fc7 [4096, /32])."""
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i == self.POOL3 - 1:
                pool3 = x
            elif i == self.POOL4 - 1:
                pool4 = x
        h = self.drop(F.relu(self.fc6(x), inplace=True))
        h = self.drop(F.relu(self.fc7(h), inplace=True))
        return pool3, pool4, h


class FCN8s(Segmenter):
    """FCN-8s on torchvision's VGG16 (see the module docstring)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, arch="fcn8s_vgg16", imagenet_norm=True)
        C = num_classes
        self.backbone = VGG16FCNBackbone()
        self.score_fr = nn.Conv2d(4096, C, 1)
        self.score_pool4 = nn.Conv2d(512, C, 1)
        self.score_pool3 = nn.Conv2d(256, C, 1)
        for m in (self.score_pool4, self.score_pool3):
            nn.init.zeros_(m.weight)
            nn.init.zeros_(m.bias)
        self.upscore2 = nn.ConvTranspose2d(C, C, 4, stride=2, padding=1, bias=False)
        self.upscore_pool4 = nn.ConvTranspose2d(C, C, 4, stride=2, padding=1, bias=False)
        with torch.no_grad():
            self.upscore2.weight.copy_(_bilinear_kernel(C, 4))
            self.upscore_pool4.weight.copy_(_bilinear_kernel(C, 4))

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        pool3, pool4, fc7 = self.backbone(x)
        s = _resize_to(self.upscore2(self.score_fr(fc7)), pool4) + self.score_pool4(pool4)
        s = _resize_to(self.upscore_pool4(s), pool3) + self.score_pool3(pool3)
        return s, fc7  # stride 8; the base class upsamples bilinearly (FCN's fixed upscore8)

    def pretrained_state(self, path: str) -> dict[str, torch.Tensor]:
        """torchvision VGG16: ``features.*`` as is, ``classifier.0`` / ``classifier.3`` -> fc6 / fc7."""
        state = read_state_dict(path)
        out = {k: v for k, v in state.items() if not k.startswith(("classifier.0.", "classifier.3."))}
        for src, dst, shape in (("classifier.0", "fc6", (4096, 512, 7, 7)), ("classifier.3", "fc7", (4096, 4096, 1, 1))):
            w = state.get(f"{src}.weight")
            if w is not None and w.numel() == torch.Size(shape).numel():
                out[f"{dst}.weight"] = w.reshape(shape)
                if f"{src}.bias" in state:
                    out[f"{dst}.bias"] = state[f"{src}.bias"]
            elif w is not None:
                out[f"{src}.weight"] = w  # reported as unexpected
        return out

    def required_backbone_keys(self) -> set[str]:
        """The VGG16 convolutions; fc6 / fc7 load when the file has the classifier, else stay random."""
        return {k for k in self.backbone.state_dict() if k.startswith("features.")}


# --------------------------------------------------------------------------- DeepLabV3+

class DeepLabV3Plus(Segmenter):
    """DeepLabV3+ (Chen et al. 2018) on a torchvision ResNet-50/101, output stride 16."""

    def __init__(self, num_classes: int, depth: int = 101) -> None:
        super().__init__(num_classes, arch=f"deeplabv3plus_r{depth}", imagenet_norm=True)
        from torchvision.models._utils import IntermediateLayerGetter
        from torchvision.models.segmentation.deeplabv3 import ASPP

        resnet = _resnet(depth, [False, False, True])
        self.backbone = IntermediateLayerGetter(resnet, return_layers={"layer1": "low", "layer4": "out"})
        self.aspp = ASPP(2048, [6, 12, 18], 256)
        self.low_proj = nn.Sequential(nn.Conv2d(256, 48, 1, bias=False), nn.BatchNorm2d(48), nn.ReLU(inplace=True))
        self.decoder = nn.Sequential(
            nn.Conv2d(256 + 48, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
            nn.Conv2d(256, 256, 3, padding=1, bias=False), nn.BatchNorm2d(256), nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(256, num_classes, 1)

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        feats = self.backbone(x)
        low, out = feats["low"], feats["out"]
        a = _resize_to(self.aspp(out), low)
        d = self.decoder(torch.cat([a, self.low_proj(low)], dim=1))
        return self.classifier(d), out


# --------------------------------------------------------------------------- SegFormer

def _segformer_classes():
    try:
        from transformers import SegformerConfig, SegformerForSemanticSegmentation, SegformerModel
    except ImportError as e:
        raise ImportError("segmenter.arch 'segformer_b0' needs the transformers package: "
                          "pip install 'dass-ray[zodi]'") from e
    return SegformerConfig, SegformerForSemanticSegmentation, SegformerModel


class SegFormer(Segmenter):
    """SegFormer-B0 from ``transformers`` (MiT-b0 encoder, all-MLP decoder at stride 4)."""

    def __init__(self, num_classes: int) -> None:
        super().__init__(num_classes, arch="segformer_b0", imagenet_norm=True)
        SegformerConfig, SegformerForSemanticSegmentation, _ = _segformer_classes()
        config = SegformerConfig(  # MiT-b0, written out so a changed library default cannot change the model
            num_labels=num_classes, num_encoder_blocks=4, depths=[2, 2, 2, 2], sr_ratios=[8, 4, 2, 1],
            hidden_sizes=[32, 64, 160, 256], patch_sizes=[7, 3, 3, 3], strides=[4, 2, 2, 2],
            num_attention_heads=[1, 2, 5, 8], mlp_ratios=[4, 4, 4, 4], decoder_hidden_size=256,
        )
        net = SegformerForSemanticSegmentation(config)
        self.backbone = net.segformer
        self.decode_head = net.decode_head

    def logits_and_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.backbone(x, output_hidden_states=True).hidden_states  # 4 maps, strides 4..32
        return self.decode_head(hidden), hidden[-1]

    def pretrained_state(self, path: str) -> dict[str, torch.Tensor]:
        """A local HF model directory (``from_pretrained``, local files only) or a state-dict file."""
        p = Path(path)
        if p.is_dir():
            _, _, SegformerModel = _segformer_classes()
            encoder = SegformerModel.from_pretrained(str(p), local_files_only=True)
            return dict(encoder.state_dict())
        state = read_state_dict(p)
        return {(k[len("segformer."):] if k.startswith("segformer.") else k): v for k, v in state.items()}
