"""Losses: masked CE, ZoDi's similarity loss (values + gradients), Eq. 12, App. C augmentation."""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dass_ray.losses import (IGNORE_INDEX, augment_count, finetune_loss, noisy_masked_augment, seg_ce,
                             similarity_loss)
from dass_ray.segmenters import SmallCNN


def _linear_abar(T: int = 1000) -> torch.Tensor:
    return torch.cumprod(1 - torch.linspace(1e-4, 0.02, T, dtype=torch.float64), 0).float()


# --------------------------------------------------------------------------- seg_ce

def test_seg_ce_is_mean_over_counted_pixels():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 4, 5, 5, generator=g)
    y = torch.randint(0, 4, (2, 5, 5), generator=g)
    y[0, :2] = IGNORE_INDEX
    per_pixel = F.cross_entropy(logits, y.clamp(max=3), reduction="none")
    keep = y != IGNORE_INDEX
    assert torch.allclose(seg_ce(logits, y), per_pixel[keep].mean())
    assert torch.allclose(seg_ce(logits, y), F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX))


def test_seg_ce_all_ignored_is_zero_with_grad():
    logits = torch.randn(2, 3, 4, 4, requires_grad=True)
    y = torch.full((2, 4, 4), IGNORE_INDEX)
    loss = seg_ce(logits, y)
    assert loss.item() == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert logits.grad is not None and torch.all(logits.grad == 0)


# --------------------------------------------------------------------------- similarity

def test_similarity_loss_toy_values():
    a = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    assert similarity_loss(a, a).item() == pytest.approx(0.0, abs=1e-7)  # identical
    assert similarity_loss(a, 3 * a).item() == pytest.approx(0.0, abs=1e-7)  # scale-invariant
    assert similarity_loss(a, -a).item() == pytest.approx(2.0)  # opposite
    orth = torch.tensor([[0.0, 5.0], [-1.0, 0.0]])
    assert similarity_loss(a, orth).item() == pytest.approx(1.0)  # orthogonal
    # mean over the batch: one identical pair (0) and one opposite pair (2) -> 1
    assert similarity_loss(a, torch.stack([a[0], -a[1]])).item() == pytest.approx(1.0)


def test_similarity_loss_gradient_explicit():
    # L = 1 - a.b / (|a||b|), dL/da = -(b / (|a||b|) - (a.b) a / (|a|^3 |b|)); B = 1 (mean over 1)
    a = torch.tensor([[3.0, 4.0]], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    similarity_loss(a, b).backward()
    na, nb, dot = 5.0, 1.0, 3.0
    expected = -(b[0] / (na * nb) - dot * a.detach()[0] / (na ** 3 * nb))  # = (-0.128, 0.096)
    assert torch.allclose(a.grad[0], expected)
    assert torch.allclose(a.grad[0], torch.tensor([-0.128, 0.096], dtype=torch.float64))
    # orthogonal unit vectors: dL/da = -b
    a2 = torch.tensor([[1.0, 0.0]], dtype=torch.float64, requires_grad=True)
    similarity_loss(a2, torch.tensor([[0.0, 1.0]], dtype=torch.float64)).backward()
    assert torch.allclose(a2.grad, torch.tensor([[0.0, -1.0]], dtype=torch.float64))


def test_similarity_loss_gradcheck():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(similarity_loss, (a, b))


def test_similarity_loss_shape_check():
    with pytest.raises(ValueError, match="same shape"):
        similarity_loss(torch.zeros(2, 3), torch.zeros(2, 4))


# --------------------------------------------------------------------------- finetune_loss

def _model_and_batch(seed: int = 0):
    torch.manual_seed(seed)
    model = SmallCNN(5, width=8)
    g = torch.Generator().manual_seed(seed)
    x_t = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    x_s = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    y = torch.randint(0, 5, (2, 16, 16), generator=g)
    y[:, 0] = IGNORE_INDEX
    return model, x_t, x_s, y


def test_finetune_loss_without_source_is_ce_on_translated():
    model, x_t, x_s, y = _model_and_batch()
    loss, parts = finetune_loss(model, x_t, x_s, y, l_src=False, similarity_weight=0.0)
    assert torch.allclose(loss, seg_ce(model(x_t), y))
    assert set(parts) == {"loss", "ce_trans"} and parts["loss"] == pytest.approx(loss.item())
    loss2, _ = finetune_loss(model, x_t, None, y, l_src=False, similarity_weight=0.0)  # x_src unused
    assert torch.allclose(loss, loss2)


def test_finetune_loss_terms():
    model, x_t, x_s, y = _model_and_batch()
    ce_t, ce_s = seg_ce(model(x_t), y), seg_ce(model(x_s), y)
    sim = similarity_loss(model.forward_features(x_s)[1], model.forward_features(x_t)[1])
    loss, parts = finetune_loss(model, x_t, x_s, y, l_src=True, similarity_weight=0.5)
    assert torch.allclose(loss, ce_t + ce_s + 0.5 * sim, atol=1e-5)  # GroupNorm: batch-independent
    assert parts["ce_trans"] == pytest.approx(ce_t.item(), abs=1e-5)
    assert parts["ce_src"] == pytest.approx(ce_s.item(), abs=1e-5)
    assert parts["similarity"] == pytest.approx(sim.item(), abs=1e-5)
    # similarity only (L_ada + lambda sim): source CE reported but not added
    loss3, parts3 = finetune_loss(model, x_t, x_s, y, l_src=False, similarity_weight=2.0)
    assert torch.allclose(loss3, ce_t + 2.0 * sim, atol=1e-5)
    assert "ce_src" in parts3
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_finetune_loss_one_forward_over_concatenated_batch():
    model, x_t, x_s, y = _model_and_batch()
    calls = []
    model.register_forward_hook(lambda m, inp, out: calls.append(inp[0].shape[0]))
    finetune_loss(model, x_t, x_s, y, l_src=True, similarity_weight=0.1)
    assert calls == [4]


def test_finetune_loss_needs_source_when_used():
    model, x_t, _, y = _model_and_batch()
    with pytest.raises(ValueError, match="x_src"):
        finetune_loss(model, x_t, None, y, l_src=True, similarity_weight=0.0)


# --------------------------------------------------------------------------- App. C augmentation

def _digits_like_batch(b: int = 10, s: int = 16, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, 3, s, s, generator=g) * 2 - 1
    y = torch.zeros(b, s, s, dtype=torch.int64)
    for i in range(b):
        y[i, 4:12, 4:10] = 1 + i % 3
        y[i, 0, :3] = IGNORE_INDEX
    return x, y


@pytest.mark.parametrize("fraction,b", [(0.1, 10), (0.3, 10), (0.1, 32), (1.0, 6), (0.0, 8)])
def test_augment_changes_exactly_round_fraction_samples(fraction, b):
    x, y = _digits_like_batch(b)
    xa, ya = noisy_masked_augment(x, y, fraction, 50, _linear_abar(), torch.Generator().manual_seed(1))
    changed = [i for i in range(b) if not torch.equal(xa[i], x[i])]
    assert len(changed) == round(fraction * b) == augment_count(fraction, b)
    for i in range(b):
        if i not in changed:
            assert torch.equal(ya[i], y[i])


def test_augment_masks_one_class_and_ignores_the_rest():
    x, y = _digits_like_batch(8)
    abar = _linear_abar()
    xa, ya = noisy_masked_augment(x, y, 0.5, 30, abar, torch.Generator().manual_seed(3))
    changed = [i for i in range(8) if not torch.equal(xa[i], x[i])]
    assert len(changed) == 4
    for i in changed:
        kept = ya[i] != IGNORE_INDEX
        classes = torch.unique(ya[i][kept])
        assert classes.numel() == 1  # one class c of the original label
        c = int(classes)
        assert torch.equal(kept, y[i] == c)  # label = y on m_c, 255 elsewhere
        assert torch.all(xa[i][:, ~kept] == 0)  # image zero outside m_c
        assert xa[i][:, kept].abs().sum() > 0
        # inside the mask: a noisy version sqrt(abar) x0 + sqrt(1-abar) eps, n in 1..30
        r = xa[i][:, kept] - x[i][:, kept]
        assert r.abs().max() > 0
        assert r.abs().max() < 5 * math.sqrt(1 - abar[29].item()) + (1 - abar[29].sqrt().item()) + 1e-4


def test_augment_noise_follows_eq2():
    # max_n = 1: x = sqrt(abar_1) x0 + sqrt(1 - abar_1) eps; an all-ignore label is only noised
    x = torch.full((1, 3, 8, 8), 0.5)
    y = torch.full((1, 8, 8), IGNORE_INDEX)
    abar = _linear_abar()
    xa, ya = noisy_masked_augment(x, y, 1.0, 1, abar, torch.Generator().manual_seed(0))
    eps = (xa - abar[0].sqrt() * x) / (1 - abar[0]).sqrt()
    assert torch.equal(ya, y)
    assert 0.5 < eps.std().item() < 1.5 and abs(eps.mean().item()) < 0.3


def test_augment_is_deterministic_and_leaves_inputs_alone():
    x, y = _digits_like_batch(10)
    x0, y0 = x.clone(), y.clone()
    a = noisy_masked_augment(x, y, 0.3, 100, _linear_abar(), torch.Generator().manual_seed(7))
    b = noisy_masked_augment(x, y, 0.3, 100, _linear_abar(), torch.Generator().manual_seed(7))
    c = noisy_masked_augment(x, y, 0.3, 100, _linear_abar(), torch.Generator().manual_seed(8))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0])
    assert torch.equal(x, x0) and torch.equal(y, y0)


def test_augment_checks_arguments():
    x, y = _digits_like_batch(4)
    with pytest.raises(ValueError, match="max_n"):
        noisy_masked_augment(x, y, 0.5, 2000, _linear_abar(), torch.Generator())
    with pytest.raises(ValueError, match="fraction"):
        noisy_masked_augment(x, y, 1.5, 10, _linear_abar(), torch.Generator())
