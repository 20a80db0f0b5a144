"""ZoDi zero-shot image transfer: ControlNet + stochastic inversion (DESIGN.md section 4).

- :mod:`.control`: ADE20K palette, Cityscapes -> ADE20K class map, control maps, palette files.
- :mod:`.components`: SD 1.5 + ControlNet from local directories, tiny random components.
- :mod:`.transfer`: :func:`zodi_transfer` (modes ``zodi``, ``no_si``, ``sdedit``, ``inst``).

No Ray or MLflow here. ``diffusers`` / ``transformers`` are imported lazily by the
functions that need them.
"""
from dass_ray.zodi.components import (
    ZodiComponents,
    load_components,
    tiny_random_components,
    weights_id,
)
from dass_ray.zodi.control import (
    ADE20K_CLASSES,
    ADE20K_PALETTE,
    CITYSCAPES_PALETTE,
    CITYSCAPES_TO_ADE20K,
    DIGITS,
    control_map,
    load_palette_file,
    resolve_palette,
)
from dass_ray.zodi.transfer import (
    DEFAULT_STRENGTH,
    k_from_strength,
    resolve_prompt,
    resolve_strength,
    zodi_transfer,
)

__all__ = [
    "ADE20K_CLASSES",
    "ADE20K_PALETTE",
    "CITYSCAPES_PALETTE",
    "CITYSCAPES_TO_ADE20K",
    "DEFAULT_STRENGTH",
    "DIGITS",
    "ZodiComponents",
    "control_map",
    "k_from_strength",
    "load_components",
    "load_palette_file",
    "resolve_palette",
    "resolve_prompt",
    "resolve_strength",
    "tiny_random_components",
    "weights_id",
    "zodi_transfer",
]
