"""The diffusion components ZoDi runs on (DESIGN.md section 4).

Real runs load Stable Diffusion 1.5 and the ControlNet v1.1 segmentation model
from local diffusers directories only: nothing is ever downloaded.
Tests and smoke runs build tiny random components from configs instead
(:func:`tiny_random_components`).

Single-file checkpoints (``*.safetensors`` / ``*.ckpt``) are NOT accepted:
``from_single_file`` needs the diffusers model configs, which it fetches from
the hub unless a local diffusers directory is passed as ``config=`` anyway.
Convert once (on a machine with the configs) with
``StableDiffusionPipeline.from_single_file(...).save_pretrained(dir)`` and
point ``zodi.base_model`` at ``dir``.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch

# Expected layout of a diffusers Stable Diffusion directory:
# component -> (subfolder, files of which at least one must exist)
BASE_COMPONENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "unet": ("unet", ("config.json",)),
    "vae": ("vae", ("config.json",)),
    "text_encoder": ("text_encoder", ("config.json",)),
    "tokenizer": ("tokenizer", ("vocab.json", "tokenizer.json")),
    "scheduler": ("scheduler", ("scheduler_config.json",)),
}

# SD 1.5's noise schedule (the DDIM sampler ZoDi uses is configured from it).
SD15_SCHEDULER = dict(
    num_train_timesteps=1000,
    beta_start=0.00085,
    beta_end=0.012,
    beta_schedule="scaled_linear",
    clip_sample=False,
    set_alpha_to_one=False,
    steps_offset=1,
    timestep_spacing="leading",
    prediction_type="epsilon",
)

TINY_MAX_TOKENS = 77


@dataclass
class ZodiComponents:
    """Everything :func:`dass_ray.zodi.transfer.zodi_transfer` needs.

    ``controlnet`` is ``None`` when only the ``sdedit`` / ``inst`` ablations are run.
    ``origin`` records where the weights came from (for :func:`weights_id`).
    """

    unet: Any  # diffusers.UNet2DConditionModel
    vae: Any  # diffusers.AutoencoderKL
    text_encoder: Any  # transformers.CLIPTextModel
    tokenizer: Any  # transformers.CLIPTokenizer
    controlnet: Optional[Any]  # diffusers.ControlNetModel | None
    scheduler: Any  # diffusers.DDIMScheduler
    origin: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.unet.parameters()).dtype

    @property
    def vae_scale_factor(self) -> int:
        """Pixels per latent cell along each axis (8 for SD 1.5)."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    def to(self, device: Union[str, torch.device]) -> "ZodiComponents":
        for m in (self.unet, self.vae, self.text_encoder, self.controlnet):
            if m is not None:
                m.to(device)
        return self


# --------------------------------------------------------------------------- loading

def _check_dir(component: str, path: Path, files: tuple[str, ...]) -> None:
    if not path.is_dir():
        raise FileNotFoundError(
            f"ZoDi component '{component}' not found: expected the directory {str(path)!r} "
            f"(a local diffusers layout; nothing is downloaded)")
    if not any((path / f).is_file() for f in files):
        raise FileNotFoundError(
            f"ZoDi component '{component}' is incomplete: {str(path)!r} has none of "
            f"{', '.join(files)}")


def _reject_single_file(what: str, path: Path) -> None:
    if path.is_file():
        raise FileNotFoundError(
            f"ZoDi {what}: {str(path)!r} is a single file; a local diffusers directory is required "
            f"(from_single_file would need configs from the hub). Convert it once with "
            f"`from_single_file(...).save_pretrained(dir)` and pass the directory")


def check_layout(base_model: str | os.PathLike, controlnet: str | os.PathLike | None) -> None:
    """Raise ``FileNotFoundError`` naming the first missing component and its expected path."""
    base = Path(base_model).expanduser()
    _reject_single_file("base_model", base)
    if not base.is_dir():
        raise FileNotFoundError(
            f"ZoDi base_model: the directory {str(base)!r} does not exist "
            f"(expected a local diffusers Stable Diffusion directory with "
            f"{', '.join(sub for sub, _ in BASE_COMPONENTS.values())}/)")
    for component, (sub, files) in BASE_COMPONENTS.items():
        _check_dir(component, base / sub, files)
    if controlnet is not None:
        cn = Path(controlnet).expanduser()
        _reject_single_file("controlnet", cn)
        _check_dir("controlnet", cn, ("config.json",))


def load_components(base_model: str | os.PathLike, controlnet: str | os.PathLike | None,
                    device: Union[str, torch.device] = "cpu",
                    dtype: torch.dtype = torch.float32) -> ZodiComponents:
    """Load SD 1.5 (+ a segmentation ControlNet) from local diffusers directories.

    ``base_model`` must hold ``unet/ vae/ text_encoder/ tokenizer/ scheduler/``;
    ``controlnet`` is a ControlNet directory (``config.json`` + weights) or
    ``None``. Everything is loaded with ``local_files_only=True``. The scheduler
    is a ``DDIMScheduler`` built from the base model's scheduler config
    (SD 1.5 ships a PNDM config; its betas, offset and spacing are what matter),
    with ``clip_sample=False``.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    check_layout(base_model, controlnet)
    base = str(Path(base_model).expanduser().resolve())
    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", torch_dtype=dtype, **kw)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", torch_dtype=dtype, **kw)
    text_encoder = CLIPTextModel.from_pretrained(base, subfolder="text_encoder", dtype=dtype, **kw)
    tokenizer = CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw)
    # clip_sample=False: SD latents are not in [-1, 1]; a PNDM config without the key would
    # otherwise give DDIM's default True (diffusers' SD pipelines force the same fix).
    scheduler = DDIMScheduler.from_pretrained(base, subfolder="scheduler", clip_sample=False, **kw)
    cn = None
    cn_path = None
    if controlnet is not None:
        cn_path = str(Path(controlnet).expanduser().resolve())
        cn = ControlNetModel.from_pretrained(cn_path, torch_dtype=dtype, **kw)
    comps = ZodiComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                           controlnet=cn, scheduler=scheduler,
                           origin={"kind": "local", "base_model": base, "controlnet": cn_path})
    for m in (unet, vae, text_encoder, cn):
        if m is not None:
            m.eval().requires_grad_(False)
    return comps.to(device)


# --------------------------------------------------------------------------- tiny random

def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2 / CLIP byte -> printable unicode character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


# A handful of merges so the tiny tokenizer produces multi-character tokens for the
# default prompts; everything else falls back to single characters (never unknown).
_TINY_MERGES = [
    "i n", "in g</w>", "d r", "dr i", "dri v", "driv ing</w>",  # driving
    "g h", "n i", "ni gh", "nigh t</w>",  # night
    "b e", "s t</w>", "be st</w>",  # best
    "q u", "a l", "i t", "t y</w>",  # quality
    "s n", "o w</w>", "sn ow</w>", "r a", "f o", "o g</w>", "fo g</w>",  # snow, rain, fog
]


def write_tiny_clip_tokenizer(directory: str | os.PathLike) -> Path:
    """Write a minimal CLIP BPE tokenizer (``vocab.json``, ``merges.txt``) into ``directory``.

    The vocab follows CLIP's construction: the 256 byte characters, the same
    with ``</w>``, one token per merge, then ``<|startoftext|>`` and
    ``<|endoftext|>``. Any text tokenizes (byte-level fallback).
    """
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    chars = list(_bytes_to_unicode().values())
    vocab_list = chars + [c + "</w>" for c in chars]
    merges = [tuple(m.split(" ")) for m in _TINY_MERGES]
    for a, b in merges:
        vocab_list.append(a + b)
    vocab_list += ["<|startoftext|>", "<|endoftext|>"]
    vocab = {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}
    (d / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False), encoding="utf-8")
    (d / "merges.txt").write_text("#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n",
                                  encoding="utf-8")
    (d / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "CLIPTokenizer", "model_max_length": TINY_MAX_TOKENS,
        "bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>",
        "unk_token": "<|endoftext|>", "pad_token": "<|endoftext|>",
    }), encoding="utf-8")
    return d


def tiny_clip_tokenizer():
    """A tiny ``CLIPTokenizer`` built in a temporary directory (nothing downloaded)."""
    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory(prefix="dass_ray_tiny_clip_") as tmp:
        write_tiny_clip_tokenizer(tmp)
        tok = CLIPTokenizer.from_pretrained(tmp, local_files_only=True)
    tok.model_max_length = TINY_MAX_TOKENS
    return tok


def tiny_random_components(seed: int = 0, image_size: int = 32, with_controlnet: bool = True) -> ZodiComponents:
    """Tiny random SD-like components for tests and smoke runs (CPU, float32).

    - VAE: ``AutoencoderKL`` with 2 blocks (8, 16 channels): latent 4 channels,
      downsample factor **2** (SD 1.5 has 8), ``scaling_factor`` 0.18215.
    - UNet: ``UNet2DConditionModel`` with blocks (32, 64), cross-attention dim 32.
    - Text encoder: ``CLIPTextModel`` (hidden 32, 2 layers, 4 heads, 77 positions)
      and a tiny CLIP BPE tokenizer written to a temp directory by code.
    - ControlNet: ``ControlNetModel.from_unet(unet)`` with a conditioning embedding
      of one stride-2 stage (16, 32) so it matches the VAE factor 2; its zero
      convolutions are re-initialised randomly (small normal) so the control map
      actually changes the output (zero convs would make ControlNet a no-op).
    - Scheduler: ``DDIMScheduler`` configured like SD 1.5 (scaled_linear
      0.00085..0.012, 1000 steps, leading spacing, offset 1).

    Deterministic for ``seed``; the global torch RNG is left untouched.
    """
    from diffusers import AutoencoderKL, ControlNetModel, DDIMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    tokenizer = tiny_clip_tokenizer()
    latent = image_size // 2
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(
            in_channels=3, out_channels=3,
            down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
            up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
            block_out_channels=(8, 16), layers_per_block=1, latent_channels=4,
            norm_num_groups=8, sample_size=image_size,
        )
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(
            sample_size=latent, in_channels=4, out_channels=4,
            down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
            up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
            block_out_channels=(32, 64), layers_per_block=1, cross_attention_dim=32,
            attention_head_dim=(4, 8), norm_num_groups=32,
        )
        torch.manual_seed(seed + 2)
        text_config = CLIPTextConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=37, num_hidden_layers=2,
            num_attention_heads=4, max_position_embeddings=TINY_MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id, projection_dim=32,
        )
        text_encoder = CLIPTextModel(text_config)
        controlnet = None
        if with_controlnet:
            torch.manual_seed(seed + 3)
            controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(16, 32))
            zero_modules = list(controlnet.controlnet_down_blocks) + [
                controlnet.controlnet_mid_block, controlnet.controlnet_cond_embedding.conv_out]
            for m in zero_modules:
                torch.nn.init.normal_(m.weight, std=0.05)
                torch.nn.init.zeros_(m.bias)
    scheduler = DDIMScheduler(**SD15_SCHEDULER)
    for m in (unet, vae, text_encoder, controlnet):
        if m is not None:
            m.eval().requires_grad_(False)
    return ZodiComponents(unet=unet, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer,
                          controlnet=controlnet, scheduler=scheduler,
                          origin={"kind": "tiny-random", "seed": int(seed), "image_size": int(image_size)})


# --------------------------------------------------------------------------- provenance

def _config_dict(m: Any) -> Any:
    if m is None:
        return None
    cfg = getattr(m, "config", None)
    if cfg is None:
        return None
    if hasattr(cfg, "to_dict"):
        return cfg.to_dict()
    return dict(cfg)


def weights_id(components: ZodiComponents) -> str:
    """A short id of the weights for provenance.

    ``tiny-random-<seed>`` for tiny components; otherwise ``sd-<hash>`` where the
    hash (12 hex) covers the resolved directory paths and every component config.
    """
    origin = components.origin or {}
    if origin.get("kind") == "tiny-random":
        return f"tiny-random-{origin['seed']}"
    blob = {
        "origin": origin,
        "configs": {name: _config_dict(getattr(components, name))
                    for name in ("unet", "vae", "text_encoder", "controlnet", "scheduler")},
        "tokenizer": getattr(components.tokenizer, "name_or_path", None),
    }
    digest = hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"sd-{digest}"
