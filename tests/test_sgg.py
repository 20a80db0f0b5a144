"""Semantic Gradient Guidance: arrangements, LCG batched == Eq. 9, sign, ignore pixels, errors."""
from __future__ import annotations

import pytest
import torch

from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
from dass_ray.guidance.sgg import (
    GuidanceError,
    gsg_loss,
    gsg_step,
    lcg_class_loss,
    lcg_loss_and_grad,
    lcg_loss_batched,
    lcg_loss_naive,
    lcg_step,
    make_cond_fn,
    module_sequence,
)

from _tiny import TinySegmenter, tiny_batch, tiny_diffusion_config, tiny_segmenter, tiny_unet

C = 3
L, G = "lcg", "gsg"


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_diffusion_config()
    sched = DDPMSchedule(cfg)
    eps_model = EpsModel(tiny_unet(cfg))
    seg = tiny_segmenter(C)
    for p in seg.parameters():
        p.requires_grad_(False)
    x0, y = tiny_batch(4, 8, C, seed=0)
    g = torch.Generator().manual_seed(1)
    k = 10
    x_k = sched.q_sample(x0, k, torch.randn(x0.shape, generator=g))
    z = torch.randn(x0.shape, generator=g)
    return sched, eps_model, seg, y, k, x_k, z


# --------------------------------------------------------------------------- arrangements

@pytest.mark.parametrize("arrangement, n4, n5", [
    ("alternate", [L, G, L, G], [L, G, L, G, L]),
    ("lcg_then_gsg", [L, L, G, G], [L, L, L, G, G]),
    ("gsg_then_lcg", [G, G, L, L], [G, G, L, L, L]),
    ("lcg_only", [L] * 4, [L] * 5),
    ("gsg_only", [G] * 4, [G] * 5),
    ("none", ["none"] * 4, ["none"] * 5),
])
def test_module_sequence_explicit(arrangement, n4, n5):
    assert module_sequence(4, arrangement, 0) == n4
    assert module_sequence(5, arrangement, 0) == n5
    assert module_sequence(0, arrangement, 0) == []


def test_module_sequence_random_equal_counts_and_seeded():
    for n in (4, 5, 10, 11):
        seq = module_sequence(n, "random", 3)
        assert (seq.count(L), seq.count(G)) == ((n + 1) // 2, n // 2)
        assert seq == module_sequence(n, "random", 3)
    orders = {tuple(module_sequence(10, "random", s)) for s in range(8)}
    assert len(orders) > 1  # the seed shuffles
    with pytest.raises(ValueError, match="unknown guidance arrangement"):
        module_sequence(4, "zigzag", 0)


# --------------------------------------------------------------------------- LCG batched == naive (Eq. 9)

def test_lcg_batched_equals_naive_loss_and_grad(setup):
    _, _, seg, y, _, x_k, _ = setup
    xa = x_k.clone().requires_grad_(True)
    xb = x_k.clone().requires_grad_(True)
    la, lb = lcg_loss_batched(seg, xa, y, C), lcg_loss_naive(seg, xb, y, C)
    torch.testing.assert_close(la, lb, rtol=1e-5, atol=1e-5)
    ga, gb = torch.autograd.grad(la, xa)[0], torch.autograd.grad(lb, xb)[0]
    torch.testing.assert_close(ga, gb, rtol=1e-5, atol=1e-7)
    assert float(ga.abs().max()) > 0
    assert torch.all(ga.abs().sum(1)[y == 255] == 0)  # no class mask, no gradient


def test_lcg_in_chunks_equals_one_backward(setup):
    """Chunks of masked copies (memory bound at paper scale) give the one-backward loss and gradient."""
    _, _, seg, y, _, x_k, _ = setup
    xa = x_k.clone().requires_grad_(True)
    la = lcg_loss_batched(seg, xa, y, C)
    ga = torch.autograd.grad(la, xa)[0]
    pairs = int(sum(len(set(yi[yi != 255].tolist())) for yi in y))
    assert pairs > 3  # the chunk sizes below really split the copies
    for chunk in (0, 1, 3, pairs, pairs + 5):
        loss, grad = lcg_loss_and_grad(seg, x_k, y, C, chunk)
        torch.testing.assert_close(loss, la.detach(), rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(grad, ga, rtol=1e-5, atol=1e-7)
        assert not loss.requires_grad and not grad.requires_grad
    # the step itself: chunked and one-shot LCG steps agree
    sched, eps_model, k, z = setup[0], setup[1], setup[4], setup[6]
    torch.testing.assert_close(lcg_step(eps_model, sched, x_k, k, z, seg, y, 1e4, C, lcg_chunk=2),
                               lcg_step(eps_model, sched, x_k, k, z, seg, y, 1e4, C), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="LCG chunk must be >= 0"):
        lcg_loss_and_grad(seg, x_k, y, C, -1)
    # no labelled pixel: zero loss and gradient, no segmenter call needed
    loss, grad = lcg_loss_and_grad(seg, x_k, torch.full_like(y, 255), C, 2)
    assert float(loss) == 0 and float(grad.abs().max()) == 0


def test_lcg_step_equals_eq9_per_class_combination(setup):
    sched, eps_model, seg, y, k, x_k, z = setup
    scale = 1e5
    got = lcg_step(eps_model, sched, x_k, k, z, seg, y, scale, C)
    # Eq. 6-9 literally: per class c, mu_hat(c), x_{k-1,c} ~ N(mu_hat(c), beta_k) with the same z,
    # x_{k-1} = sum_c m_c x_{k-1,c}; pixels in no mask take the unguided sample.
    eps = eps_model(x_k, torch.full((x_k.shape[0],), k))
    mean, var = sched.p_mean_variance(eps, x_k, k)
    unguided = sched.p_sample(mean, var, k, z)
    out = (y == 255).unsqueeze(1) * unguided
    for c in range(C):
        xc = x_k.clone().requires_grad_(True)
        grad_c = torch.autograd.grad(lcg_class_loss(seg, xc, y, c), xc)[0]
        x_c = sched.p_sample(mean - scale * var * grad_c, var, k, z)
        out = out + (y == c).unsqueeze(1) * x_c
    torch.testing.assert_close(got, out, rtol=0, atol=1e-5)
    assert float((got - unguided).abs().max()) > 1e-2  # the guidance did something


# --------------------------------------------------------------------------- sign, scale 0, ignore

def test_guided_step_lowers_ce_vs_unguided(setup):
    sched, eps_model, seg, y, k, x_k, z = setup
    unguided = sched.guided_reverse_step(eps_model, x_k, k, z)
    xg = gsg_step(eps_model, sched, x_k, k, z, seg, y, 1e5, C)
    xl = lcg_step(eps_model, sched, x_k, k, z, seg, y, 1e5, C)
    with torch.no_grad():
        assert float(gsg_loss(seg, xg, y)) < float(gsg_loss(seg, unguided, y)) - 0.05
        assert float(lcg_loss_batched(seg, xl, y, C)) < float(lcg_loss_batched(seg, unguided, y, C)) - 0.05
        for i in range(y.shape[0]):  # image by image, too
            assert float(gsg_loss(seg, xg[i:i + 1], y[i:i + 1])) < float(gsg_loss(seg, unguided[i:i + 1], y[i:i + 1]))


def test_x0_hat_space_step_lowers_ce_vs_unguided(setup):
    """GSG and LCG with space="x0_hat": at k = 1 the output is the stepped estimate, whose CE
    under g is lower than the unguided output's; at k > 1 the sample moves too; LCG's ignore
    pixels still take the unguided sample."""
    sched, eps_model, seg, y, k, x_k, z = setup
    for kk, noise in ((1, None), (k, z)):
        unguided = sched.guided_reverse_step(eps_model, x_k, kk, noise)
        xg = gsg_step(eps_model, sched, x_k, kk, noise, seg, y, 2000.0, C, space="x0_hat")
        xl = lcg_step(eps_model, sched, x_k, kk, noise, seg, y, 2000.0, C, space="x0_hat")
        assert float((xg - unguided).abs().max()) > 1e-3 and float((xl - unguided).abs().max()) > 1e-3
        if kk == 1:
            with torch.no_grad():
                assert float(gsg_loss(seg, xg, y)) < float(gsg_loss(seg, unguided, y)) - 0.05
                assert float(lcg_loss_batched(seg, xl, y, C)) < float(lcg_loss_batched(seg, unguided, y, C)) - 0.05
    y2 = y.clone()
    y2[0] = 255
    unguided = sched.guided_reverse_step(eps_model, x_k, k, z)
    got = lcg_step(eps_model, sched, x_k, k, z, seg, y2, 2000.0, C, space="x0_hat")
    ign = (y2 == 255).unsqueeze(1).expand_as(got)
    torch.testing.assert_close(got[ign], unguided[ign], rtol=0, atol=0)


def test_scale_zero_equals_unguided_and_skips_segmenter(setup):
    sched, eps_model, _, y, k, x_k, z = setup

    def boom(x):
        raise AssertionError("segmenter called at scale 0")

    unguided = sched.guided_reverse_step(eps_model, x_k, k, z)
    torch.testing.assert_close(gsg_step(eps_model, sched, x_k, k, z, boom, y, 0.0, C), unguided, rtol=0, atol=0)
    torch.testing.assert_close(lcg_step(eps_model, sched, x_k, k, z, boom, y, 0.0, C), unguided, rtol=0, atol=0)


def test_lcg_ignore_pixels_take_unguided_sample(setup):
    sched, eps_model, seg, y, k, x_k, z = setup
    y = y.clone()
    y[0] = 255  # an image with no labelled pixel at all
    unguided = sched.guided_reverse_step(eps_model, x_k, k, z)
    got = lcg_step(eps_model, sched, x_k, k, z, seg, y, 1e5, C)
    ign = (y == 255).unsqueeze(1).expand_as(got)
    torch.testing.assert_close(got[ign], unguided[ign], rtol=0, atol=0)
    assert float((got - unguided)[~ign].abs().max()) > 1e-2


# --------------------------------------------------------------------------- errors, normalisation

def test_nonfinite_gradient_raises_with_level_step_ids(setup):
    _, _, seg, y, _, x_k, _ = setup
    ids = ["a", "b", "c", "d"]
    nan_seg = lambda x: seg(x) * float("nan")  # noqa: E731
    for module in ("gsg", "lcg"):
        cond = make_cond_fn(nan_seg, y, module, C, level=7, ids=ids)
        with pytest.raises(GuidanceError, match=r"level n=7, step k=5.*'a', 'b', 'c', 'd'"):
            cond(x_k, 5)

    def one_bad(x):  # NaN for images whose max is <= 0 (only image 'b' below)
        return seg(x) + 0 * torch.log(x.amax(dim=(1, 2, 3), keepdim=True))

    xb = x_k.clone().abs() + 0.1
    xb[1] = -1.0
    with pytest.raises(GuidanceError, match=r"sample ids \['b'\]"):
        make_cond_fn(one_bad, y, "gsg", C, level=3, ids=ids)(xb, 2)


def test_bad_labels_raise(setup):
    _, _, seg, y, _, _, _ = setup
    y = y.clone()
    y[0, 0, 0] = 7
    with pytest.raises(ValueError, match=r"\[7\] outside 0..2"):
        make_cond_fn(seg, y, "lcg", C)


def test_gradient_flows_through_segmenter_normalisation(setup):
    _, _, seg, y, _, x_k, _ = setup
    # seg2 normalises with std 0.5 instead of 0.25 (same weights, mean 0.5): seg2(x) = seg(x / 2),
    # so the chain rule gives grad_x L(seg2)(x) = 0.5 * grad L(seg)(x / 2).
    seg2 = TinySegmenter(C, std=0.5).eval()
    seg2.net.load_state_dict(seg.net.state_dict())
    for module in ("gsg", "lcg"):
        g1 = make_cond_fn(seg, y, module, C)(x_k / 2, 10)
        g2 = make_cond_fn(seg2, y, module, C)(x_k, 10)
        assert float(g2.abs().max()) > 0
        torch.testing.assert_close(g2, 0.5 * g1, rtol=1e-4, atol=1e-7)
    # and it is the true derivative (central differences, float64)
    segd = tiny_segmenter(C).double()
    xd = x_k.double()
    grad = make_cond_fn(segd, y, "lcg", C)(xd, 10)
    d = torch.randn(xd.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    h = 1e-5
    with torch.no_grad():
        fd = (lcg_loss_batched(segd, xd + h * d, y, C) - lcg_loss_batched(segd, xd - h * d, y, C)) / (2 * h)
    assert float((grad * d).sum()) == pytest.approx(float(fd), rel=1e-5)


def test_ddim_guided_steps_lower_ce_in_both_spaces(setup):
    """With the DDIM step (eta 0) guidance still lowers the CE: on x_k through the noise
    estimate, on x0_hat through the stepped estimate (at k = 1 the output is that estimate)."""
    sched, eps_model, seg, y, k, x_k, z = setup
    cfg = tiny_diffusion_config()
    ddim = DDPMSchedule(cfg.__class__(**{**cfg.__dict__, "ddim_eta": 0.0}))
    for kk, space, scale in ((k, "x_k", 1e5), (1, "x0_hat", 2000.0)):  # the scales of the DDPM tests above
        unguided = ddim.guided_reverse_step(eps_model, x_k, kk, z)
        xg = gsg_step(eps_model, ddim, x_k, kk, z, seg, y, scale, C, space=space)
        with torch.no_grad():
            assert float(gsg_loss(seg, xg, y)) < float(gsg_loss(seg, unguided, y)) - 0.05, space
