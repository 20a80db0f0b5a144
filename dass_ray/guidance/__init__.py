"""Semantic Gradient Guidance (Sec. 4.2): LCG (Eq. 6, 8, 9), GSG (Eq. 10), arrangements."""
from dass_ray.guidance.sgg import (
    GuidanceError,
    gsg_loss,
    gsg_step,
    lcg_class_loss,
    lcg_loss_batched,
    lcg_loss_naive,
    lcg_step,
    make_cond_fn,
    module_sequence,
)

__all__ = ["GuidanceError", "gsg_loss", "gsg_step", "lcg_class_loss", "lcg_loss_batched", "lcg_loss_naive",
           "lcg_step", "make_cond_fn", "module_sequence"]
