"""DDPM schedule (Eq. 2, 4, 7 step), k convention, and the UNet helpers (build, EMA, save/load, Eq. 5)."""
from __future__ import annotations

import math

import pytest
import torch

from dass_ray.checkpoints import CheckpointError
from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
from dass_ray.diffusion.unet import EMA, build_unet, ddpm_loss, load_unet, load_unet_dir, save_unet

from _tiny import tiny_diffusion_config, tiny_unet

T = 20


@pytest.fixture(scope="module")
def sched():
    return DDPMSchedule(tiny_diffusion_config(num_train_timesteps=T))


def _hand(k: int, cfg=None):
    """beta_k, alpha_k, alphabar_k by hand from the linear schedule (paper's k, 1-based)."""
    cfg = cfg or tiny_diffusion_config(num_train_timesteps=T)
    betas = [cfg.beta_start + (cfg.beta_end - cfg.beta_start) * i / (T - 1) for i in range(T)]
    beta = betas[k - 1]
    abar = math.prod(1 - b for b in betas[:k])
    return beta, 1 - beta, abar


def test_betas_are_the_linear_schedule(sched):
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    want = torch.linspace(cfg.beta_start, cfg.beta_end, T, dtype=torch.float64)
    assert sched.T == T
    torch.testing.assert_close(sched.betas, want, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(sched.alphas_cumprod, torch.cumprod(1 - want, 0), rtol=1e-5, atol=1e-8)


def test_k_convention(sched):
    # k = 1 is the first (least noisy) step: beta_1 = beta_start; k = T uses the last entry.
    assert float(sched.betas[0]) == pytest.approx(1e-4, rel=1e-5)
    x0 = torch.ones(1, 3, 2, 2)
    noise = torch.zeros_like(x0)
    for k in (1, 7, T):
        _, _, abar = _hand(k)
        assert float(sched.q_sample(x0, k, noise)[0, 0, 0, 0]) == pytest.approx(math.sqrt(abar), rel=1e-6)
    torch.testing.assert_close(sched.q_sample(x0, 0, torch.randn_like(x0)), x0)  # k = 0: no noise
    for bad in (-1, T + 1):
        with pytest.raises(ValueError, match="k must lie in"):
            sched.q_sample(x0, bad, noise)
    with pytest.raises(ValueError, match="k must lie in"):
        sched.p_mean_variance(noise, x0, 0)

    seen = []

    class Rec(torch.nn.Module):
        def forward(self, x, t):
            seen.append(t.clone())
            return type("O", (), {"sample": torch.zeros_like(x)})()

    EpsModel(Rec())(torch.zeros(2, 3, 2, 2), torch.tensor([1, T]))
    assert seen[0].tolist() == [0, T - 1]  # the UNet sees the diffusers index k - 1


def test_q_sample_formula_per_sample_k(sched):
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(3, 3, 4, 4, generator=g), torch.randn(3, 3, 4, 4, generator=g)
    k = torch.tensor([1, 10, 20])
    out = sched.q_sample(x0, k, noise)
    for i, kk in enumerate(k.tolist()):
        _, _, abar = _hand(kk)
        torch.testing.assert_close(out[i], math.sqrt(abar) * x0[i] + math.sqrt(1 - abar) * noise[i], rtol=1e-5, atol=1e-6)


def test_p_mean_variance_eq4_by_hand(sched):
    g = torch.Generator().manual_seed(1)
    x, eps = torch.randn(2, 3, 4, 4, generator=g), torch.randn(2, 3, 4, 4, generator=g)
    for k in (1, 5, T):
        beta, alpha, abar = _hand(k)
        mean, var = sched.p_mean_variance(eps, x, k)
        want = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        torch.testing.assert_close(mean, want, rtol=1e-5, atol=1e-6)
        assert var.shape == (2, 1, 1, 1) and float(var[0]) == pytest.approx(beta, rel=1e-6)


def _const_eps(value: float = 0.3):
    return lambda x, k: torch.full_like(x, value)


def test_reverse_step_noise_and_no_noise_at_k1(sched):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    z = torch.randn_like(x) * 100
    eps = _const_eps()
    mean1, _ = sched.p_mean_variance(eps(x, None), x, 1)
    torch.testing.assert_close(sched.guided_reverse_step(eps, x, 1, z), mean1)  # no noise at k = 1
    torch.testing.assert_close(sched.guided_reverse_step(eps, x, 1, None), mean1)
    mean5, var5 = sched.p_mean_variance(eps(x, None), x, 5)
    torch.testing.assert_close(sched.guided_reverse_step(eps, x, 5, z), mean5 + var5.sqrt() * z)
    with pytest.raises(ValueError, match="noise is required"):
        sched.guided_reverse_step(eps, x, 5, None)


def test_guided_step_sign_scale_zero_and_mask(sched):
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(3))
    z = torch.randn_like(x)
    grad = torch.randn_like(x)
    calls = []

    def cond_fn(x_k, k):
        calls.append(k)
        return grad

    eps = _const_eps()
    unguided = sched.guided_reverse_step(eps, x, 6, z)
    torch.testing.assert_close(sched.guided_reverse_step(eps, x, 6, z, cond_fn, 0.0), unguided)
    assert calls == []  # scale 0: cond_fn is not evaluated
    beta, _, _ = _hand(6)
    out = sched.guided_reverse_step(eps, x, 6, z, cond_fn, 50.0)
    torch.testing.assert_close(out, unguided - 50.0 * beta * grad, rtol=1e-5, atol=1e-6)  # mu_hat = mu - s beta grad
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[:, :, :2] = True
    out_m = sched.guided_reverse_step(eps, x, 6, z, cond_fn, 50.0, guide_mask=mask)
    torch.testing.assert_close(out_m[:, :, :2], out[:, :, :2])
    torch.testing.assert_close(out_m[:, :, 2:], unguided[:, :, 2:])


def test_guided_step_in_x0_hat_space_by_hand(sched):
    """space="x0_hat": x0' = x0_hat - s grad(x0_hat); mu_hat = c0 x0' + ck x_k, i.e. the guided
    sample is the unguided one shifted by -c0_k s grad, and cond_fn reads x0_hat, not x_k."""
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(5))
    z = torch.randn_like(x)
    grad = torch.randn_like(x)
    seen = []

    def cond_fn(x0, k):
        seen.append(x0.clone())
        return grad

    eps_fn = _const_eps()
    k = 6
    beta, alpha, abar = _hand(k)
    _, _, abar_prev = _hand(k - 1)
    eps = eps_fn(x, torch.full((2,), k))
    unguided = sched.guided_reverse_step(eps_fn, x, k, z)
    out = sched.guided_reverse_step(eps_fn, x, k, z, cond_fn, 50.0, space="x0_hat")
    torch.testing.assert_close(seen[0], (x - math.sqrt(1 - abar) * eps) / math.sqrt(abar), rtol=1e-5, atol=1e-5)
    c0 = math.sqrt(abar_prev) * beta / (1 - abar)
    # atol 3e-5: float32 rounding of a difference of O(1) terms (1.1e-5 was seen once on an AVX512 Xeon)
    torch.testing.assert_close(out, unguided - c0 * 50.0 * grad, rtol=1e-5, atol=3e-5)
    # at k = 1 (c0 = 1, no noise) the output is the stepped estimate itself
    out1 = sched.guided_reverse_step(eps_fn, x, 1, None, cond_fn, 50.0, space="x0_hat")
    # (c0_1 = beta_1 / (1 - alphabar_1) = 1 up to diffusers' float32 alphabar: ~2e-4 relative)
    torch.testing.assert_close(out1, seen[-1] - 50.0 * grad, rtol=1e-3, atol=1e-3 * 50.0)
    with pytest.raises(ValueError, match="guidance space"):
        sched.guided_reverse_step(eps_fn, x, k, z, cond_fn, 50.0, space="x0")


# --------------------------------------------------------------------------- unet.py

def test_build_unet_shapes_and_attention():
    for attention in (False, True):
        cfg = tiny_diffusion_config(attention=attention)
        unet = build_unet(cfg)
        kinds = [type(b).__name__ for b in unet.down_blocks]
        assert kinds == (["DownBlock2D", "AttnDownBlock2D"] if attention else ["DownBlock2D", "DownBlock2D"])
        x = torch.randn(2, 3, 8, 8)
        assert unet(x, torch.tensor([0, 19])).sample.shape == (2, 3, 8, 8)
    default = build_unet(tiny_diffusion_config().__class__())  # the digits default: (32, 64, 64), no attention
    assert 1.0e6 < sum(p.numel() for p in default.parameters()) < 1.1e6


def test_ema_update_copy_and_state():
    unet = tiny_unet()
    ema = EMA(unet, decay=0.5)
    before = {n: p.detach().clone() for n, p in unet.named_parameters()}
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(1.0)
    ema.update(unet)  # warm-up: decay_0 = min(0.5, 1/10) = 0.1
    name = next(iter(before))
    torch.testing.assert_close(ema.shadow[name], before[name] + 0.9)
    other = EMA(tiny_unet(seed=1), decay=0.5)
    other.load_state_dict(ema.state_dict())
    assert other.num_updates == 1
    target = tiny_unet(seed=2)
    other.copy_to(target)
    torch.testing.assert_close(dict(target.named_parameters())[name].detach(), before[name] + 0.9)
    with pytest.raises(ValueError, match="does not match"):
        other.load_state_dict({"nope": torch.zeros(1)})


def test_save_load_unet_roundtrip_and_errors(tmp_path):
    cfg = tiny_diffusion_config()
    unet = tiny_unet(cfg)
    save_unet(tmp_path / "unet.safetensors", unet)
    back = load_unet(tmp_path / "unet.safetensors", cfg)
    x = torch.randn(1, 3, 8, 8)
    torch.testing.assert_close(back(x, 3).sample, unet(x, 3).sample)
    wrong = tiny_diffusion_config()
    wrong.block_out_channels = [8, 8]
    with pytest.raises(CheckpointError, match="unet.safetensors"):
        load_unet(tmp_path / "unet.safetensors", wrong)
    with pytest.raises(CheckpointError, match="missing_dir"):
        load_unet_dir(tmp_path / "missing_dir")
    unet.save_pretrained(tmp_path / "hf")
    torch.testing.assert_close(load_unet_dir(tmp_path / "hf")(x, 3).sample, unet(x, 3).sample)


def test_ddpm_loss_eq5(sched):
    unet = tiny_unet().train()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    l1 = ddpm_loss(unet, sched, x0, torch.Generator().manual_seed(0))
    l2 = ddpm_loss(unet, sched, x0, torch.Generator().manual_seed(0))
    assert l1.ndim == 0 and torch.isfinite(l1) and l1.item() == l2.item()
    l1.backward()
    assert all(p.grad is not None for p in unet.parameters() if p.requires_grad)
    # by hand with the same draws
    g = torch.Generator().manual_seed(0)
    k = torch.randint(1, T + 1, (4,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        want = torch.mean((unet(sched.q_sample(x0, k, noise), k - 1).sample - noise) ** 2)
    assert l1.item() == pytest.approx(float(want), rel=1e-5)


# ---------------------------------------------------------------- clipped mean, posterior variance
def test_clipped_mean_equals_eq4_when_nothing_is_clipped():
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    plain = DDPMSchedule(cfg)
    clip = DDPMSchedule(cfg.__class__(**{**cfg.__dict__, "clip_sample": True}))
    torch.manual_seed(0)
    x0 = torch.rand(3, 3, 4, 4) * 1.6 - 0.8  # inside [-1, 1]
    eps = torch.randn_like(x0)
    for k in (1, 7, T):
        xk = plain.q_sample(x0, k, eps)
        m1, v1 = plain.p_mean_variance(eps, xk, k)  # eps is the true noise: x0_hat = x0, not clipped
        m2, v2 = clip.p_mean_variance(eps, xk, k)
        torch.testing.assert_close(m1, m2, rtol=1e-3, atol=5e-4)  # float32 x0_hat round trip
        torch.testing.assert_close(v1, v2)


def test_clipped_mean_keeps_x0_hat_in_range():
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    clip = DDPMSchedule(cfg.__class__(**{**cfg.__dict__, "clip_sample": True}))
    k = T
    beta, alpha, abar = _hand(k)
    _, _, abar_prev = _hand(k - 1)
    xk = torch.full((1, 3, 2, 2), 5.0)  # x0_hat far above 1 with eps = 0
    mean, _ = clip.p_mean_variance(torch.zeros_like(xk), xk, k)
    c0 = math.sqrt(abar_prev) * beta / (1 - abar)
    ck = math.sqrt(alpha) * (1 - abar_prev) / (1 - abar)
    torch.testing.assert_close(mean, torch.full_like(xk, c0 * 1.0 + ck * 5.0))


def test_posterior_variance_and_auto_on_respaced_chains():
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    post = DDPMSchedule(cfg.__class__(**{**cfg.__dict__, "reverse_variance": "posterior"}))
    x = torch.zeros(1, 3, 2, 2)
    for k in (2, 9):
        beta, _, abar = _hand(k)
        _, _, abar_prev = _hand(k - 1)
        _, var = post.p_mean_variance(torch.zeros_like(x), x, k)
        assert float(var.flatten()[0]) == pytest.approx((1 - abar_prev) / (1 - abar) * beta, rel=1e-3)
    auto = DDPMSchedule(cfg)
    _, var_full = auto.p_mean_variance(torch.zeros_like(x), x, 5)
    assert float(var_full.flatten()[0]) == pytest.approx(_hand(5)[0], rel=1e-5)  # the paper's beta_k
    r = auto.respaced([2, 6, 12])
    _, var_r = r.p_mean_variance(torch.zeros_like(x), x, 3)
    beta_r = 1 - _hand(12)[2] / _hand(6)[2]
    assert float(var_r.flatten()[0]) == pytest.approx((1 - _hand(6)[2]) / (1 - _hand(12)[2]) * beta_r, rel=1e-3)
    beta_only = DDPMSchedule(cfg.__class__(**{**cfg.__dict__, "reverse_variance": "beta"})).respaced([2, 6, 12])
    _, var_b = beta_only.p_mean_variance(torch.zeros_like(x), x, 3)
    assert float(var_b.flatten()[0]) == pytest.approx(beta_r, rel=1e-3)


def _unet_fp32_bf16():
    """A tiny UNet, an input batch, two steps, and its fp32 / bf16 eps predictions."""
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    unet = tiny_unet(cfg)
    torch.manual_seed(0)
    x = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    k = torch.tensor([3, T])
    return cfg, unet, x, k, EpsModel(unet)(x, k), EpsModel(unet, "bf16")(x, k)


def test_bf16_unet_calls_stay_close_to_fp32():
    cfg, unet, x, k, e32, e16 = _unet_fp32_bf16()
    assert e16.dtype == torch.float32 and not torch.equal(e32, e16)  # really computed in bf16
    assert float((e32 - e16).abs().max()) < 0.1 * float(e32.abs().max()) + 1e-3
    g = torch.Generator().manual_seed(0)
    loss = ddpm_loss(unet, DDPMSchedule(cfg), x.clamp(-1, 1), g, precision="bf16")
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    loss.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in unet.parameters())


def test_auto_precision_is_bf16_only_where_bf16_is_native(monkeypatch):
    from dass_ray import precision as sch

    _, unet, x, k, e32, e16 = _unet_fp32_bf16()
    assert sch.resolve_precision("fp32", "cpu") == "fp32" and sch.resolve_precision("bf16", "cpu") == "bf16"
    for native, want in ((False, e32), (True, e16)):  # "auto" follows the probe, both ways
        monkeypatch.setattr(sch, "bf16_is_native", lambda device, native=native: native)
        assert sch.resolve_precision("auto", "cpu") == ("bf16" if native else "fp32")
        assert torch.equal(EpsModel(unet, "auto")(x, k), want)
    monkeypatch.undo()
    # the real probe answers without raising on this machine, and a non-CPU/CUDA device is never native
    assert isinstance(sch.bf16_is_native("cpu"), bool) and sch.bf16_is_native("meta") is False


def _with(cfg, **kw):
    return cfg.__class__(**{**cfg.__dict__, **kw})


def test_ddim_eta1_is_the_posterior_ddpm_step_and_eta0_is_deterministic():
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    unet = tiny_unet(cfg)
    eps_model = EpsModel(unet)
    torch.manual_seed(0)
    x_k = torch.randn(2, 3, cfg.image_size, cfg.image_size)
    z1, z2 = torch.randn_like(x_k), torch.randn_like(x_k)
    for clip in (False, True):
        post = DDPMSchedule(_with(cfg, reverse_variance="posterior", clip_sample=clip)).respaced([2, 7, 13, T])
        eta1 = DDPMSchedule(_with(cfg, ddim_eta=1.0, clip_sample=clip)).respaced([2, 7, 13, T])
        eta0 = DDPMSchedule(_with(cfg, ddim_eta=0.0, clip_sample=clip)).respaced([2, 7, 13, T])
        for k in (4, 3, 2):
            torch.testing.assert_close(eta1.guided_reverse_step(eps_model, x_k, k, z1),
                                       post.guided_reverse_step(eps_model, x_k, k, z1), rtol=1e-5, atol=1e-5)
            a, b = eta0.guided_reverse_step(eps_model, x_k, k, z1), eta0.guided_reverse_step(eps_model, x_k, k, z2)
            torch.testing.assert_close(a, b, rtol=0, atol=0)  # no noise enters at eta = 0
            assert float((a - eta1.guided_reverse_step(eps_model, x_k, k, z1)).abs().max()) > 1e-3


def test_ddim_step_by_hand_with_the_true_noise():
    """Song et al. Eq. 12 at eta = 0: with the model's eps equal to the noise that made x_k from x0,
    x_{k-1} = sqrt(abar_{k-1}) x0 + sqrt(1 - abar_{k-1}) eps exactly (the DDIM path)."""
    cfg = tiny_diffusion_config(num_train_timesteps=T)
    sched = DDPMSchedule(_with(cfg, ddim_eta=0.0))
    torch.manual_seed(1)
    x0, eps = torch.rand(2, 3, 4, 4) * 1.6 - 0.8, torch.randn(2, 3, 4, 4)
    for k in (9, 2):
        x_k = sched.q_sample(x0, k, eps)
        got = sched.guided_reverse_step(lambda x, kk: eps, x_k, k, torch.randn_like(x0))
        _, _, abar_prev = _hand(k - 1)
        torch.testing.assert_close(got, math.sqrt(abar_prev) * x0 + math.sqrt(1 - abar_prev) * eps,
                                   rtol=1e-4, atol=1e-5)


def test_ddim_eta_is_validated():
    from dass_ray.config import ConfigError

    cfg = tiny_diffusion_config(num_train_timesteps=T)
    for bad in (-0.1, 1.5, float("nan")):
        with pytest.raises(ConfigError, match="ddim_eta"):
            _with(cfg, ddim_eta=bad)
