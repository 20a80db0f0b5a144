"""translate_level: phi^n (Sec. 4.1) + SGG, determinism per (seed, n, id), batch independence."""
from __future__ import annotations

import pytest
import torch

from dass_ray.config import GuidanceConfig
from dass_ray.diffusion.schedule import DDPMSchedule, EpsModel
from dass_ray.guidance.sgg import GuidanceError, gsg_loss
from dass_ray.translate import noise_seed, translate_level

from _tiny import tiny_batch, tiny_diffusion_config, tiny_segmenter, tiny_unet

C = 3
IDS = ["s0", "s1", "s2", "s3"]


@pytest.fixture(scope="module")
def setup():
    cfg = tiny_diffusion_config()
    x, y = tiny_batch(4, 8, C, seed=3)
    return DDPMSchedule(cfg), tiny_unet(cfg), tiny_segmenter(C), x, y


def _run(setup, n=4, scale=1e4, arrangement="alternate", seed=0, sl=slice(None), seg="default"):
    sched, unet, s, x, y = setup
    g = GuidanceConfig(scale=scale, arrangement=arrangement)
    return translate_level(x[sl], y[sl], n, s if seg == "default" else seg, unet, sched, g, C, IDS[sl], seed)


def test_n0_is_identity(setup):
    _, _, _, x, _ = setup
    out = _run(setup, n=0)
    assert out is not x and torch.equal(out, x)


def test_deterministic_for_a_seed(setup):
    a, b = _run(setup, seed=1), _run(setup, seed=1)
    assert torch.equal(a, b)
    assert not torch.allclose(a, _run(setup, seed=2))
    assert noise_seed(1, 4, "s0") == noise_seed(1, 4, "s0") != noise_seed(1, 4, "s1")


def test_batch_equals_halves(setup):
    full = _run(setup)
    halves = torch.cat([_run(setup, sl=slice(0, 2)), _run(setup, sl=slice(2, 4))])
    torch.testing.assert_close(full, halves, rtol=0, atol=1e-5)


def test_lambda0_and_none_equal_phi_n(setup):
    sched, unet, _, x, _ = setup
    n, seed = 4, 0
    # phi^n by hand: per-sample generators seeded by (seed, n, id): forward eps, then z_k for k = n..2
    gens = [torch.Generator().manual_seed(noise_seed(seed, n, i)) for i in IDS]
    draw = lambda: torch.stack([torch.randn(x.shape[1:], generator=g) for g in gens])  # noqa: E731
    eps_model = EpsModel(unet)
    xk = sched.q_sample(x, n, draw())
    for k in range(n, 0, -1):
        xk = sched.guided_reverse_step(eps_model, xk, k, draw() if k > 1 else None)
    want = xk.clamp(-1, 1)
    torch.testing.assert_close(_run(setup, n=n, scale=0.0, seg=None), want, rtol=0, atol=0)
    torch.testing.assert_close(_run(setup, n=n, scale=1e4, arrangement="none", seg=None), want, rtol=0, atol=0)
    assert not torch.allclose(_run(setup, n=n, scale=1e4), want)  # guidance changes it


def test_output_finite_in_range_and_guidance_helps(setup):
    sched, unet, seg, x, y = setup
    guided, unguided = _run(setup, n=6, scale=1e5), _run(setup, n=6, scale=0.0)
    assert guided.shape == x.shape and torch.isfinite(guided).all()
    assert guided.min() >= -1 and guided.max() <= 1
    with torch.no_grad():
        assert float(gsg_loss(seg, guided, y)) < float(gsg_loss(seg, unguided, y))


def test_segmenter_state_restored_and_errors(setup):
    sched, unet, _, x, y = setup
    seg = tiny_segmenter(C).train()
    _run(setup, seg=seg)
    assert seg.training and all(p.requires_grad for p in seg.parameters())
    with pytest.raises(ValueError, match="needs a segmenter"):
        _run(setup, seg=None)
    with pytest.raises(ValueError, match="ids"):
        translate_level(x, y, 2, seg, unet, sched, GuidanceConfig(), C, IDS[:2], 0)
    nan_seg = tiny_segmenter(C)
    with torch.no_grad():
        nan_seg.net[0].bias.fill_(float("nan"))
    with pytest.raises(GuidanceError, match=r"level n=3, step k=3.*'s0', 's1', 's2', 's3'"):
        _run(setup, n=3, seg=nan_seg)
    assert all(p.requires_grad for p in nan_seg.parameters())  # restored after the error too


def test_respaced_with_every_timestep_is_the_original_schedule(setup):
    sched = setup[0]
    full = sched.respaced(list(range(1, sched.T + 1)))
    # diffusers keeps alphabar in float32, so betas recovered from it agree to float32 precision
    assert torch.allclose(full.betas, sched.betas, atol=1e-6)
    assert torch.equal(full.alphas_cumprod, sched.alphas_cumprod)


def test_respaced_chain_keeps_alphabar_and_ends_at_n(setup):
    from dass_ray.translate import spaced_timesteps

    sched = setup[0]
    ts = spaced_timesteps(10, 4)
    assert ts[-1] == 10 and ts[0] == 1 and len(ts) == 4 and ts == sorted(ts)
    r = sched.respaced(ts)
    assert torch.allclose(r.alphas_cumprod, sched.alphas_cumprod[torch.tensor(ts) - 1])
    # the product of the respaced alphas telescopes to alphabar_n
    assert torch.allclose(r.alphas.prod(), sched.alphas_cumprod[9])
    with pytest.raises(ValueError):
        sched.respaced([3, 2])


def test_steps_at_least_n_equals_paper_chain(setup):
    sched, unet, s, x, y = setup
    g = GuidanceConfig(scale=1e4, arrangement="alternate")
    a = translate_level(x, y, 4, s, unet, sched, g, C, IDS, 0)
    b = translate_level(x, y, 4, s, unet, sched, g, C, IDS, 0, steps=4)
    assert torch.equal(a, b)


def test_respaced_translation_is_guided_finite_and_batch_independent(setup):
    sched, unet, s, x, y = setup
    g = GuidanceConfig(scale=1e4, arrangement="alternate")
    none = GuidanceConfig(scale=0.0, arrangement="none")
    out = translate_level(x, y, 10, s, unet, sched, g, C, IDS, 0, steps=3)
    assert out.shape == x.shape and torch.isfinite(out).all()
    halves = torch.cat([translate_level(x[:2], y[:2], 10, s, unet, sched, g, C, IDS[:2], 0, steps=3),
                        translate_level(x[2:], y[2:], 10, s, unet, sched, g, C, IDS[2:], 0, steps=3)])
    assert torch.allclose(out, halves, atol=1e-5)
    plain = translate_level(x, y, 10, None, unet, sched, none, C, IDS, 0, steps=3)
    with torch.no_grad():
        assert gsg_loss(s, out, y) < gsg_loss(s, plain, y)


def test_guidance_precision_runs_the_segmenter_in_bf16_and_still_guides(setup):
    sched, unet, seg, x, y = setup
    seen = []
    h = seg.register_forward_hook(lambda mod, i, o: seen.append(o.dtype))
    try:
        outs = {p: translate_level(x, y, 6, seg, unet, sched, GuidanceConfig(scale=1e5, precision=p), C, IDS, 0)
                for p in ("fp32", "bf16")}
    finally:
        h.remove()
    assert torch.float32 in seen and torch.bfloat16 in seen  # the fp32 run, then the bf16 run
    assert outs["bf16"].dtype == torch.float32 and torch.isfinite(outs["bf16"]).all()
    unguided = _run(setup, n=6, scale=0.0)
    with torch.no_grad():  # bf16 guidance still lowers the (float32) CE, and stays near the fp32 result
        assert float(gsg_loss(seg, outs["bf16"], y)) < float(gsg_loss(seg, unguided, y))
    assert float((outs["bf16"] - outs["fp32"]).abs().mean()) < 0.25 * float((outs["fp32"] - unguided).abs().mean())


def test_for_translation_uses_channels_last_only_in_float32():
    from dass_ray.translate import for_translation

    def layout(m):
        w = next(p for p in m.parameters() if p.ndim == 4)
        return w.is_contiguous(memory_format=torch.channels_last) and not w.is_contiguous()

    seg = tiny_segmenter(C).train()
    assert layout(for_translation(tiny_segmenter(C), precision="fp32"))
    out = for_translation(seg, precision="bf16")
    assert not out.training and not layout(out)  # bf16 autocast on CPU: the default layout is faster
