"""ZoDi transfer on tiny random components: modes, determinism, batching, loading errors."""
import pytest
import torch

from dass_ray.config import ConfigError, ZodiConfig
from dass_ray.zodi.components import (
    BASE_COMPONENTS,
    load_components,
    tiny_random_components,
    weights_id,
)
from dass_ray.zodi.control import CITYSCAPES_PALETTE
from dass_ray.zodi.transfer import (
    DEFAULT_STRENGTH,
    k_from_strength,
    resolve_prompt,
    resolve_strength,
    start_timesteps,
    zodi_transfer,
)

IDS = ["aachen_000001", "bochum_000002", "zurich_000003"]
MODES = ("zodi", "no_si", "sdedit", "inst")


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    # tiny models on a shared 2-core machine: one thread avoids oversubscription
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def comps():
    return tiny_random_components(seed=0, image_size=32)


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 3, 32, 32, generator=g) * 2 - 1
    y = torch.randint(0, 19, (3, 32, 32), generator=g)
    y[:, :4] = 255
    return x, y


def _cfg(**kw):
    base = dict(steps=3, strength=0.7, guidance_scale=9.0, eta=1.0, batch_size=4)
    base.update(kw)
    return ZodiConfig(**base)


@pytest.fixture(scope="module")
def outputs(comps, batch):
    x, y = batch
    return {m: zodi_transfer(x, y, comps, _cfg(mode=m), CITYSCAPES_PALETTE, IDS, seed=0) for m in MODES}


def test_tiny_tokenizer_tokenizes_prompt(comps):
    tok = comps.tokenizer
    ids = tok("driving night, best quality").input_ids
    toks = tok.convert_ids_to_tokens(ids)
    assert toks[0] == "<|startoftext|>" and toks[-1] == "<|endoftext|>"
    assert "<|endoftext|>" not in toks[1:-1]  # no unknown tokens (unk = endoftext)
    assert "driving</w>" in toks and "night</w>" in toks and "best</w>" in toks
    assert resolve_prompt(ZodiConfig(domain="night")) == "driving night, best quality"
    padded = tok(["driving night, best quality"], padding="max_length", max_length=tok.model_max_length,
                 return_tensors="pt").input_ids
    assert padded.shape == (1, 77)
    assert comps.text_encoder(padded)[0].shape == (1, 77, 32)


def test_tiny_components_deterministic():
    a, b = tiny_random_components(seed=3), tiny_random_components(seed=3)
    c = tiny_random_components(seed=4)
    pa = torch.cat([p.flatten() for p in a.unet.parameters()])
    assert torch.equal(pa, torch.cat([p.flatten() for p in b.unet.parameters()]))
    assert not torch.equal(pa, torch.cat([p.flatten() for p in c.unet.parameters()]))
    assert weights_id(a) == "tiny-random-3"


@pytest.mark.parametrize("mode", MODES)
def test_every_mode_runs(outputs, batch, mode):
    x, _ = batch
    out = outputs[mode]
    assert out.shape == x.shape and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    assert float(out.min()) >= -1 and float(out.max()) <= 1


def test_modes_differ(outputs):
    # stochastic inversion changes the start latent; ControlNet changes every step
    assert (outputs["zodi"] - outputs["no_si"]).abs().max() > 1e-3
    assert (outputs["zodi"] - outputs["inst"]).abs().max() > 1e-3
    assert (outputs["no_si"] - outputs["sdedit"]).abs().max() > 1e-3


def test_deterministic_for_seed(comps, batch, outputs):
    x, y = batch
    again = zodi_transfer(x, y, comps, _cfg(mode="zodi"), CITYSCAPES_PALETTE, IDS, seed=0)
    assert torch.equal(again, outputs["zodi"])
    other = zodi_transfer(x, y, comps, _cfg(mode="zodi"), CITYSCAPES_PALETTE, IDS, seed=1)
    assert (other - outputs["zodi"]).abs().max() > 1e-3


def test_batch_equals_one_at_a_time_and_keeps_order(comps, batch, outputs):
    x, y = batch
    cfg = _cfg(mode="zodi")
    single = torch.cat([zodi_transfer(x[i:i + 1], y[i:i + 1], comps, cfg, CITYSCAPES_PALETTE, [IDS[i]], seed=0)
                        for i in range(3)])
    assert (single - outputs["zodi"]).abs().max() <= 1e-4
    chunked = zodi_transfer(x, y, comps, _cfg(mode="zodi", batch_size=2), CITYSCAPES_PALETTE, IDS, seed=0)
    assert (chunked - outputs["zodi"]).abs().max() <= 1e-4
    perm = [2, 0, 1]
    permuted = zodi_transfer(x[perm], y[perm], comps, cfg, CITYSCAPES_PALETTE, [IDS[i] for i in perm], seed=0)
    assert (permuted - outputs["zodi"][perm]).abs().max() <= 1e-4


def test_control_map_conditions_only_controlnet_modes(comps, batch, outputs):
    x, y = batch
    y2 = torch.full_like(y, 10)  # all sky
    for mode, uses in (("no_si", True), ("sdedit", False)):
        out = zodi_transfer(x, y2, comps, _cfg(mode=mode), CITYSCAPES_PALETTE, IDS, seed=0)
        changed = (out - outputs[mode]).abs().max() > 1e-3
        assert bool(changed) == uses


def test_strength_to_k():
    """k = floor(T * S) (Eq. 9, App. A), then DDIM steps of T // steps down to > 0."""
    from diffusers import DDIMScheduler
    from dass_ray.zodi.components import SD15_SCHEDULER

    s = DDIMScheduler(**SD15_SCHEDULER)
    assert k_from_strength(1000, 0.9) == 900
    assert k_from_strength(1000, 0.65) == 650
    assert k_from_strength(1000, 0.6) == 600
    assert k_from_strength(1000, 1.0) == 999  # capped at the last timestep
    assert k_from_strength(100, 0.29) == 29  # no floating-point step lost (0.29 * 100 = 28.999...)
    for S, k, n in ((0.9, 900, 18), (0.65, 650, 13), (0.6, 600, 12)):
        ts = start_timesteps(s, S, 20)
        assert ts[0] == k == k_from_strength(1000, S)
        assert len(ts) == n == int(20 * S)
        assert ts == list(range(k, 0, -50)) and ts[-1] == 50
        assert s.num_inference_steps == 20  # scheduler.step uses the same spacing
    for S in (0.3, 0.5, 0.6, 0.65, 0.9, 1.0):
        for steps in (4, 20, 50):
            ts = start_timesteps(s, S, steps)
            assert ts[0] == k_from_strength(1000, S) and min(ts) > 0
            assert all(a - b == 1000 // steps for a, b in zip(ts, ts[1:]))
            assert abs(len(ts) - steps * S) <= 1
    assert start_timesteps(s, 0.5, 4) == [500, 250]
    with pytest.raises(ValueError, match="no denoising step"):
        k_from_strength(1000, 0.0005)
    with pytest.raises(ValueError, match="strength"):
        start_timesteps(s, 1.5, 20)


def test_default_strengths():
    assert resolve_strength(ZodiConfig(domain="night")) == 0.9
    assert resolve_strength(ZodiConfig(domain="snow")) == DEFAULT_STRENGTH["snow"] == 0.65
    assert resolve_strength(ZodiConfig(domain="fog", strength=0.3)) == 0.3
    with pytest.raises(ConfigError, match="zodi.strength"):
        resolve_strength(ZodiConfig(domain="dusk"))


def test_resolution_output_keeps_input_size(comps, batch):
    x, y = batch
    out = zodi_transfer(x[:1], y[:1], comps, _cfg(mode="sdedit", resolution=[16, 16]), CITYSCAPES_PALETTE,
                        IDS[:1], seed=0)
    assert out.shape == (1, 3, 32, 32) and torch.isfinite(out).all()


def test_controlnet_required_for_zodi(batch):
    x, y = batch
    c = tiny_random_components(seed=0, with_controlnet=False)
    with pytest.raises(ConfigError, match="zodi.controlnet"):
        zodi_transfer(x[:1], y[:1], c, _cfg(mode="zodi"), CITYSCAPES_PALETTE, IDS[:1], seed=0)
    with pytest.raises(ValueError, match="ids"):
        zodi_transfer(x[:2], y[:2], c, _cfg(mode="sdedit"), CITYSCAPES_PALETTE, IDS[:1], seed=0)


def test_missing_component_names_component_and_path(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        load_components(str(tmp_path), None)
    assert "'unet'" in str(e.value) and str(tmp_path / "unet") in str(e.value)

    for name, (sub, files) in BASE_COMPONENTS.items():
        (tmp_path / sub).mkdir()
        (tmp_path / sub / files[0]).write_text("{}")
    cn = tmp_path / "controlnet-seg"
    with pytest.raises(FileNotFoundError) as e:
        load_components(str(tmp_path), str(cn))
    assert "'controlnet'" in str(e.value) and str(cn) in str(e.value)

    (tmp_path / "scheduler" / "scheduler_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        load_components(str(tmp_path), None)
    assert "'scheduler'" in str(e.value) and str(tmp_path / "scheduler") in str(e.value)

    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="single file"):
        load_components(str(single), None)


def test_load_components_from_local_directories(tmp_path, comps, batch):
    from diffusers import DDIMScheduler, PNDMScheduler

    base, cn = tmp_path / "sd", tmp_path / "cn"
    comps.unet.save_pretrained(base / "unet")
    comps.vae.save_pretrained(base / "vae")
    comps.text_encoder.save_pretrained(base / "text_encoder")
    comps.tokenizer.save_pretrained(base / "tokenizer")
    # SD 1.5 ships a PNDM scheduler config; load_components builds DDIM from it
    PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                  set_alpha_to_one=False, steps_offset=1).save_pretrained(base / "scheduler")
    comps.controlnet.save_pretrained(cn)
    loaded = load_components(str(base), str(cn), device="cpu", dtype=torch.float32)
    assert loaded.controlnet is not None and loaded.vae_scale_factor == 2
    assert isinstance(loaded.scheduler, DDIMScheduler) and loaded.scheduler.config.clip_sample is False
    wid = weights_id(loaded)
    assert wid.startswith("sd-") and wid == weights_id(load_components(str(base), str(cn)))
    x, y = batch
    cfg = _cfg(mode="zodi")
    a = zodi_transfer(x[:1], y[:1], loaded, cfg, CITYSCAPES_PALETTE, IDS[:1], seed=0)
    b = zodi_transfer(x[:1], y[:1], comps, cfg, CITYSCAPES_PALETTE, IDS[:1], seed=0)
    assert (a - b).abs().max() <= 1e-4
