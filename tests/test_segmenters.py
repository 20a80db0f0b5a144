"""Segmenters: the common contract for every arch, GroupNorm small CNN, local weights, checkpoints."""
from __future__ import annotations

import dataclasses
import sys
import time
from typing import get_args

import pytest
import torch
from torch import nn

from dass_ray.checkpoints import CheckpointError, save_state
from dass_ray.config import SegArch, SegmenterConfig
from dass_ray.precision import Bf16Forward
from dass_ray.segmenters import (Segmenter, SmallCNN, build_segmenter, load_pretrained_backbone, load_segmenter,
                                 read_segmenter_meta, save_segmenter)
from dass_ray.segmenters.base import IMAGENET_MEAN, IMAGENET_STD

C = 5


def _x(b: int = 2, s: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(b, 3, s, s, generator=torch.Generator().manual_seed(seed)) * 2 - 1


# --------------------------------------------------------------------------- every arch

FEATURE_DIM = {"small_cnn": 96, "deeplabv2_r101": 2048, "fcn8s_vgg16": 4096, "segformer_b0": 256,
               "deeplabv3plus_r50": 2048, "deeplabv3plus_r101": 2048}
SLOW = {"deeplabv2_r101", "fcn8s_vgg16", "deeplabv3plus_r101"}  # > ~5 s each on 2 CPU cores


def test_every_config_arch_has_a_test():
    assert set(get_args(SegArch)) == set(FEATURE_DIM)


@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a
                                  for a in get_args(SegArch)])
def test_arch_builds_and_runs(arch):
    torch.manual_seed(0)
    t0 = time.time()
    model = build_segmenter(SegmenterConfig(arch=arch), C)
    assert isinstance(model, Segmenter) and model.arch == arch and model.num_classes == C
    x = _x().requires_grad_(True)
    model.train()
    logits, pooled = model.forward_features(x)
    assert logits.shape == (2, C, 64, 64)
    assert pooled.shape == (2, FEATURE_DIM[arch])
    assert torch.isfinite(logits).all() and torch.isfinite(pooled).all()
    # gradients reach the diffusion-space input through the model's own normalisation
    (logits.logsumexp(1).mean() + pooled.mean()).backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        plain = model(x)
        again, _ = model(x, return_features=True)
    assert plain.shape == (2, C, 64, 64) and torch.allclose(plain, again)
    # segmenter.precision / guidance.precision bf16: the same contract, float32 outputs near fp32's
    with torch.no_grad():
        lb, pb = Bf16Forward(model, "bf16")(x, return_features=True)
    assert lb.dtype == pb.dtype == torch.float32 and lb.shape == plain.shape and pb.shape == pooled.shape
    assert float((lb - plain).abs().mean()) < 0.05 * float(plain.abs().mean()) + 1e-3
    print(f"{arch}: {sum(p.numel() for p in model.parameters()) / 1e6:.2f} M params, "
          f"build+fwd/bwd+fwd {time.time() - t0:.1f} s")


@pytest.mark.slow
def test_output_strides_of_the_resnet_models():
    v2 = build_segmenter(SegmenterConfig(arch="deeplabv2_r101"), C).eval()
    v3 = build_segmenter(SegmenterConfig(arch="deeplabv3plus_r50"), C).eval()
    with torch.no_grad():
        x = v2.normalize(_x(1))
        assert v2.logits_and_features(x)[1].shape[-2:] == (8, 8)  # output stride 8
        assert v3.logits_and_features(x)[1].shape[-2:] == (4, 4)  # output stride 16


def test_deeplabv2_head_is_aspp_v2():
    from dass_ray.segmenters.zoo import ASPPV2

    head = ASPPV2(16, 3)
    assert [c.dilation[0] for c in head.convs] == [6, 12, 18, 24]
    f = torch.randn(1, 16, 9, 9)
    assert torch.allclose(head(f), sum(c(f) for c in head.convs), atol=1e-6)


def test_segformer_needs_transformers(monkeypatch):
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers -> ImportError
    with pytest.raises(ImportError, match=r"dass-ray\[zodi\]"):
        build_segmenter(SegmenterConfig(arch="segformer_b0"), C)


# --------------------------------------------------------------------------- normalisation

def test_normalize_maps_diffusion_space_to_imagenet_statistics():
    from dass_ray.segmenters.zoo import SegFormer

    model = SegFormer(C)
    x = torch.stack([torch.full((3, 2, 2), -1.0), torch.full((3, 2, 2), 1.0)])
    out = model.normalize(x)
    mean, std = torch.tensor(IMAGENET_MEAN), torch.tensor(IMAGENET_STD)
    assert torch.allclose(out[0, :, 0, 0], (0 - mean) / std)
    assert torch.allclose(out[1, :, 0, 0], (1 - mean) / std)
    assert "_mean" not in model.state_dict()  # statistics are not checkpointed
    assert torch.equal(SmallCNN(C).normalize(x), x)  # small_cnn: trained on [-1, 1] as is


# --------------------------------------------------------------------------- small_cnn

def test_small_cnn_size_and_full_resolution_head():
    model = SmallCNN(11, width=32)
    n = sum(p.numel() for p in model.parameters())
    assert 100_000 <= n <= 450_000, n
    logits, feat = model.logits_and_features(_x(2, 32))
    assert logits.shape == (2, 11, 32, 32)  # no interpolation needed at 32x32
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    assert sum(p.numel() for p in SmallCNN(11, width=8).parameters()) < n


def test_small_cnn_is_batch_and_mode_independent():
    torch.manual_seed(0)
    model = SmallCNN(C, width=16)
    x = _x(4, 32)
    model.train()
    batched = model(x)
    single = torch.cat([model(x[i:i + 1]) for i in range(4)])
    model.eval()
    evald = model(x)
    assert torch.allclose(batched, single, atol=1e-5)
    assert torch.allclose(batched, evald, atol=1e-5)


def test_small_cnn_odd_sizes():
    model = SmallCNN(C, width=8)
    assert model(_x(1, 20)).shape == (1, C, 20, 20)
    assert model(_x(1, 8)).shape == (1, C, 8, 8)


def test_forward_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        SmallCNN(C, width=8)(torch.zeros(1, 1, 8, 8))


# --------------------------------------------------------------------------- checkpoints

def test_save_load_roundtrip_and_meta(tmp_path):
    torch.manual_seed(0)
    cfg = SegmenterConfig(width=8)
    model = build_segmenter(cfg, C).eval()
    path = tmp_path / "g.safetensors"
    save_segmenter(path, model, {"level": 3})
    meta = read_segmenter_meta(path)
    assert meta["arch"] == "small_cnn" and meta["num_classes"] == str(C) and meta["level"] == "3"
    loaded = load_segmenter(path, cfg, C).eval()
    x = _x(2, 16)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


class _FakeDDP(nn.Module):
    def __init__(self, m: nn.Module) -> None:
        super().__init__()
        self.module = m


def test_ddp_prefixes_are_stripped(tmp_path):
    torch.manual_seed(0)
    cfg = SegmenterConfig(width=8)
    model = build_segmenter(cfg, C).eval()
    x = _x(1, 16)
    # saving a DDP-like wrapper writes plain keys
    save_segmenter(tmp_path / "a.safetensors", _FakeDDP(model))
    # a checkpoint written with "module." keys loads too
    save_state(tmp_path / "b.safetensors", _FakeDDP(model).state_dict())
    for name in ("a", "b"):
        loaded = load_segmenter(tmp_path / f"{name}.safetensors", cfg, C).eval()
        with torch.no_grad():
            assert torch.equal(model(x), loaded(x))


def test_load_mismatches_raise_checkpoint_error(tmp_path):
    path = tmp_path / "g.safetensors"
    save_segmenter(path, build_segmenter(SegmenterConfig(width=8), C))
    with pytest.raises(CheckpointError, match="width"):
        load_segmenter(path, SegmenterConfig(width=16), C)
    with pytest.raises(CheckpointError, match="classes"):
        load_segmenter(path, SegmenterConfig(width=8), C + 1)
    with pytest.raises(CheckpointError, match="segformer_b0"):
        load_segmenter(path, SegmenterConfig(arch="segformer_b0"), C)


def test_load_segmenter_ignores_pretrained_path(tmp_path):
    """The checkpoint replaces the ImageNet weights: a pretrained file absent on this machine is fine."""
    path = tmp_path / "g.safetensors"
    save_segmenter(path, build_segmenter(SegmenterConfig(arch="segformer_b0"), C))
    cfg = SegmenterConfig(arch="segformer_b0", pretrained=str(tmp_path / "absent.pth"))
    assert isinstance(load_segmenter(path, cfg, C), Segmenter)


# --------------------------------------------------------------------------- pretrained weights

def test_missing_pretrained_file_names_the_path(tmp_path):
    p = tmp_path / "nope" / "resnet50.pth"
    with pytest.raises(FileNotFoundError, match="resnet50.pth"):
        build_segmenter(SegmenterConfig(arch="deeplabv3plus_r50", pretrained=str(p)), C)
    with pytest.raises(FileNotFoundError, match="nope"):
        build_segmenter(SegmenterConfig(arch="segformer_b0", pretrained=str(p)), C)


def test_small_cnn_has_no_pretrained_backbone(tmp_path):
    with pytest.raises(ValueError, match="small_cnn"):
        build_segmenter(SegmenterConfig(pretrained=str(tmp_path / "x.pth")), C)


def test_torchvision_resnet_weights_load_into_the_backbone(tmp_path):
    from torchvision.models import resnet50

    torch.manual_seed(1)
    ref = resnet50(weights=None).state_dict()  # a torchvision classification state dict
    pth = tmp_path / "resnet50.pth"
    torch.save(ref, pth)
    model = build_segmenter(SegmenterConfig(arch="deeplabv3plus_r50", pretrained=str(pth)), C)
    got = model.backbone.state_dict()
    assert all(torch.equal(got[k], ref[k]) for k in got)
    assert model.pretrained_report["unexpected"] == ["fc.bias", "fc.weight"]
    assert model.pretrained_report["missing"] == []
    # the same as safetensors, with DDP prefixes
    from safetensors.torch import save_file

    st = tmp_path / "resnet50.safetensors"
    save_file({f"module.{k}": v.contiguous() for k, v in ref.items()}, str(st))
    with torch.no_grad():
        model.backbone.layer4[2].conv3.weight.zero_()
    load_pretrained_backbone(model, st)
    assert torch.equal(model.backbone.state_dict()["layer4.2.conv3.weight"], ref["layer4.2.conv3.weight"])
    # strict for backbone keys: a missing layer or a wrong shape fails naming the file
    partial = {k: v for k, v in ref.items() if not k.startswith("layer3.")}
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(ValueError, match="partial.pth.*layer3"):
        load_pretrained_backbone(model, tmp_path / "partial.pth")
    bad = dict(ref, **{"conv1.weight": torch.zeros(64, 3, 3, 3)})
    torch.save(bad, tmp_path / "bad.pth")
    with pytest.raises(ValueError, match="bad.pth.*conv1.weight"):
        load_pretrained_backbone(model, tmp_path / "bad.pth")


def test_segformer_weights_from_file_and_hf_directory(tmp_path):
    from transformers import SegformerConfig, SegformerModel

    from dass_ray.segmenters.zoo import SegFormer

    torch.manual_seed(2)
    src = SegFormer(C)
    enc = {f"segformer.{k}": v for k, v in src.backbone.state_dict().items()}
    enc["classifier.weight"] = torch.zeros(1000, 256)
    save_state(tmp_path / "mit_b0.safetensors", enc)
    model = build_segmenter(SegmenterConfig(arch="segformer_b0", pretrained=str(tmp_path / "mit_b0.safetensors")), C)
    assert all(torch.equal(v, src.backbone.state_dict()[k]) for k, v in model.backbone.state_dict().items())
    assert model.pretrained_report["unexpected"] == ["classifier.weight"]
    # a local Hugging Face directory (what save_pretrained / a hub snapshot holds)
    hf = SegformerModel(SegformerConfig(num_labels=C))
    hf.save_pretrained(tmp_path / "mit-b0")
    model2 = build_segmenter(SegmenterConfig(arch="segformer_b0", pretrained=str(tmp_path / "mit-b0")), C)
    assert all(torch.equal(v, hf.state_dict()[k]) for k, v in model2.backbone.state_dict().items())


@pytest.mark.slow
def test_vgg16_weights_fill_fcn8s_fc6_fc7(tmp_path):
    from torchvision.models import vgg16

    torch.manual_seed(3)
    ref = vgg16(weights=None).state_dict()
    pth = tmp_path / "vgg16.pth"
    torch.save(ref, pth)
    del ref
    model = build_segmenter(SegmenterConfig(arch="fcn8s_vgg16", pretrained=str(pth)), C)
    ref = torch.load(pth, weights_only=True)
    bb = model.backbone.state_dict()
    assert torch.equal(bb["features.28.weight"], ref["features.28.weight"])
    assert torch.equal(bb["fc6.weight"], ref["classifier.0.weight"].view(4096, 512, 7, 7))
    assert torch.equal(bb["fc7.weight"].flatten(1), ref["classifier.3.weight"])
    assert model.pretrained_report["unexpected"] == ["classifier.6.bias", "classifier.6.weight"]
    # features only (no classifier): fc6/fc7 stay random and are reported missing
    torch.save({k: v for k, v in ref.items() if k.startswith("features.")}, tmp_path / "feat.pth")
    rep = load_pretrained_backbone(model, tmp_path / "feat.pth")
    assert rep["missing"] == ["fc6.bias", "fc6.weight", "fc7.bias", "fc7.weight"]


def test_build_dispatch_matches_config_width():
    m8 = build_segmenter(dataclasses.replace(SegmenterConfig(), width=8), C)
    assert isinstance(m8, SmallCNN) and m8.width == 8
