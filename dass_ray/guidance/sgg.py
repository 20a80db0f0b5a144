"""Semantic Gradient Guidance (paper Sec. 4.2): LCG (Eq. 6, 8, 9), GSG (Eq. 10).

The sampler (:meth:`DDPMSchedule.guided_reverse_step`) takes a
``cond_fn(x_k, k) -> grad_{x_k} L`` and knows nothing of segmenters; this module
builds those ``cond_fn`` s from a segmenter ``g`` and a source label map ``y``.

Conventions: ``x`` is ``float [B, 3, H, W]`` in diffusion space; ``y`` is
``int64 [B, H, W]`` with train ids in ``0..num_classes-1`` and 255 = ignore.
``segmenter(x)`` takes diffusion-space input, normalises it itself (so gradients
w.r.t. x_k flow through that normalisation) and returns logits ``[B, C, h, w]``
(a tensor, or a tuple / object whose first element / ``.logits`` is one); logits
of another size than the labels are resized bilinearly.

Loss reduction (what lambda multiplies): cross-entropy **averaged over the
counted pixels of each image** (GSG: all non-ignore pixels; LCG: the pixels of
each class mask, summed over the classes present) and **summed over the images**.
The gradient for one image therefore does not depend on the batch it was in, so
lambda does not depend on the batch size, and the loss value does not grow with
the image size. Note what this implies per pixel: d L / d x_pixel carries a factor
1 / (number of counted pixels), so at equal lambda the guidance step on each pixel
shrinks as the image (for LCG: the class region) grows; moving a lambda to another
resolution means scaling it by the ratio of pixel counts (see the note at the end).
"""
from __future__ import annotations

import random
from typing import TYPE_CHECKING, Callable, Optional, Sequence

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # annotations only: importing sgg does not import diffusers
    from dass_ray.diffusion.schedule import DDPMSchedule, EpsFn, Steps

IGNORE = 255
MODULES = ("lcg", "gsg", "none")
ARRANGEMENTS = ("alternate", "lcg_then_gsg", "gsg_then_lcg", "random", "lcg_only", "gsg_only", "none")


class GuidanceError(RuntimeError):
    """Guidance produced a non-finite loss or gradient; the message names level, step and ids."""


# --------------------------------------------------------------------------- arrangement (Sec. 4.2, Tab. 5)

def module_sequence(n: int, arrangement: str, seed: int = 0) -> list[str]:
    """The module (``"lcg"``, ``"gsg"`` or ``"none"``) applied at k = n, n-1, ..., 1 (list index 0 is k = n).

    ``alternate``: LCG at k = n, n-2, ...; GSG at n-1, n-3, ... (the paper's default).
    ``lcg_then_gsg``: ceil(n/2) LCG steps, then floor(n/2) GSG steps.
    ``gsg_then_lcg``: floor(n/2) GSG steps, then ceil(n/2) LCG steps.
    ``random``: ceil(n/2) LCG and floor(n/2) GSG, order shuffled by ``random.Random(seed)``.
    In every mixed arrangement LCG gets the extra step when n is odd, so the module
    counts are the same across arrangements. ``lcg_only``, ``gsg_only``, ``none``: ablations.
    """
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    n_lcg, n_gsg = (n + 1) // 2, n // 2
    if arrangement == "alternate":
        return ["lcg" if i % 2 == 0 else "gsg" for i in range(n)]
    if arrangement == "lcg_then_gsg":
        return ["lcg"] * n_lcg + ["gsg"] * n_gsg
    if arrangement == "gsg_then_lcg":
        return ["gsg"] * n_gsg + ["lcg"] * n_lcg
    if arrangement == "random":
        seq = ["lcg"] * n_lcg + ["gsg"] * n_gsg
        random.Random(seed).shuffle(seq)
        return seq
    if arrangement == "lcg_only":
        return ["lcg"] * n
    if arrangement == "gsg_only":
        return ["gsg"] * n
    if arrangement == "none":
        return ["none"] * n
    raise ValueError(f"unknown guidance arrangement {arrangement!r}; allowed: {', '.join(ARRANGEMENTS)}")


# --------------------------------------------------------------------------- losses

def check_labels(y: torch.Tensor, num_classes: int) -> None:
    """Raise ValueError unless ``y`` is int64 ``[B, H, W]`` of ``0..num_classes-1`` or 255."""
    if y.dtype != torch.long or y.ndim != 3:
        raise ValueError(f"labels must be int64 [B, H, W], got {y.dtype} {tuple(y.shape)}")
    bad = (y != IGNORE) & ((y < 0) | (y >= num_classes))
    if bool(bad.any()):
        vals = sorted(set(y[bad].unique().tolist()))[:5]
        raise ValueError(f"labels contain ids {vals} outside 0..{num_classes - 1} (and not the ignore label 255)")


def _logits(segmenter: Callable, x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """``segmenter(x)`` as logits ``[B, C, *size]``."""
    out = segmenter(x)
    if not torch.is_tensor(out):
        out = out.logits if hasattr(out, "logits") else out[0]
    if tuple(out.shape[-2:]) != tuple(size):
        out = F.interpolate(out, size=tuple(size), mode="bilinear", align_corners=False)
    return out


def _per_image_mean_ce(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """CE averaged over the non-ignore pixels of each image: ``[B]`` (0 for an image with none)."""
    ce = F.cross_entropy(logits, target, ignore_index=IGNORE, reduction="none")  # [B, H, W], 0 at ignore
    count = (target != IGNORE).flatten(1).sum(1)
    return ce.flatten(1).sum(1) / count.clamp(min=1)


def gsg_loss(segmenter: Callable, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Eq. 10: L_global = CE(g(x_k), y) over the whole image, ignore 255.

    ``x [B, 3, H, W]``, ``y [B, H, W]`` -> scalar: per-image mean over counted pixels,
    summed over the batch (so lambda is independent of batch size, see module doc).
    """
    return _per_image_mean_ce(_logits(segmenter, x, y.shape[-2:]), y).sum()


def lcg_pairs(y: torch.Tensor, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The (image, class) pairs LCG masks: ``(img [M], cls [M])``, every class present in each image, image-major."""
    B = y.shape[0]
    yc = torch.where(y != IGNORE, y, torch.full_like(y, num_classes))  # ignore -> extra bin
    counts = torch.zeros(B, num_classes + 1, dtype=torch.long, device=y.device)
    counts.scatter_add_(1, yc.flatten(1), torch.ones_like(yc.flatten(1)))
    img, cls = (counts[:, :num_classes] > 0).nonzero(as_tuple=True)
    return img, cls


def _lcg_pairs_loss(segmenter: Callable, x: torch.Tensor, y: torch.Tensor, img: torch.Tensor,
                    cls: torch.Tensor) -> torch.Tensor:
    """Eq. 6 over the given pairs: the masked copies ``x[img] * m_cls`` ``[M, 3, H, W]`` in one forward."""
    H, W = y.shape[-2:]
    masks = y[img] == cls.view(-1, 1, 1)  # [M, H, W]
    xm = x[img] * masks.unsqueeze(1).to(x.dtype)  # [M, 3, H, W]
    target = torch.where(masks, cls.view(-1, 1, 1).expand(-1, H, W), torch.full_like(masks, IGNORE, dtype=torch.long))
    return _per_image_mean_ce(_logits(segmenter, xm, (H, W)), target).sum()


def lcg_loss_batched(segmenter: Callable, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Eq. 6 summed over the classes present in each image, in ONE segmenter forward.

    For every (image i, class c present in y_i): the masked copy ``x_i * m_c``
    (m_c = (y_i == c), broadcast over channels); CE(g(x_i * m_c), y_i) counted on
    m_c only, averaged over |m_c|. The copies are stacked into one batch
    ``[sum_i |C_i|, 3, H, W]``; the result is summed over classes and images.

    Because d L_c / d x is zero outside m_c and the masks are disjoint, the gradient
    of this sum w.r.t. x equals, pixel by pixel, the gradient of the pixel's own
    class loss: one backward gives Eq. 9's per-class updates combined.
    """
    img, cls = lcg_pairs(y, num_classes)
    if img.numel() == 0:
        return (x * 0).sum()
    return _lcg_pairs_loss(segmenter, x, y, img, cls)


def lcg_loss_and_grad(segmenter: Callable, x: torch.Tensor, y: torch.Tensor, num_classes: int,
                      chunk: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(L_LCG, grad_x L_LCG)`` of :func:`lcg_loss_batched`, the masked copies in chunks of at most ``chunk``.

    ``x [B, 3, H, W]`` (need not require grad) -> ``(loss scalar, grad [B, 3, H, W])``, both
    detached. The loss is a sum over (image, class) pairs, so summing the chunks' losses
    and gradients gives the same values (up to float rounding); each chunk's graph is freed
    after its backward, so peak memory is that of ``chunk`` copies instead of all
    ``sum_i |C_i|`` (19 classes of a batch of 512 x 1024 crops at paper scale).
    ``chunk = 0``: all copies in one forward/backward.
    """
    if chunk < 0:
        raise ValueError(f"LCG chunk must be >= 0 (0 = all copies at once), got {chunk}")
    img, cls = lcg_pairs(y, num_classes)
    x = x.detach().requires_grad_(True)
    total, grad = torch.zeros((), dtype=x.dtype, device=x.device), torch.zeros_like(x)
    step = chunk or max(int(img.numel()), 1)
    with torch.enable_grad():
        for s in range(0, int(img.numel()), step):
            loss = _lcg_pairs_loss(segmenter, x, y, img[s:s + step], cls[s:s + step])
            if loss.requires_grad:
                (g,) = torch.autograd.grad(loss, x, allow_unused=True)
                if g is not None:
                    grad += g
            total = total + loss.detach()
    return total, grad


def lcg_class_loss(segmenter: Callable, x: torch.Tensor, y: torch.Tensor, c: int) -> torch.Tensor:
    """Eq. 6 for one class c: sum over the images containing c of CE(g(x * m_c), y) averaged over m_c.

    One segmenter forward over the whole batch masked by m_c (reference implementation).
    """
    m = y == c  # [B, H, W]
    target = torch.where(m, y, torch.full_like(y, IGNORE))
    return _per_image_mean_ce(_logits(segmenter, x * m.unsqueeze(1).to(x.dtype), y.shape[-2:]), target).sum()


def lcg_loss_naive(segmenter: Callable, x: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """The per-class loop reference of :func:`lcg_loss_batched` (a forward per class)."""
    return sum((lcg_class_loss(segmenter, x, y, c) for c in range(num_classes)), (x * 0).sum())


# --------------------------------------------------------------------------- cond_fn and steps

def make_cond_fn(segmenter: Callable, y: torch.Tensor, module: str, num_classes: int, *,
                 level: Optional[int] = None, ids: Optional[Sequence] = None,
                 lcg_chunk: int = 0) -> Callable[[torch.Tensor, Steps], torch.Tensor]:
    """``cond_fn(x_k, k) -> grad_{x_k} L`` (``[B, 3, H, W]``) for ``module`` ``"lcg"`` or ``"gsg"``.

    Differentiates the segmenter (including its normalisation) at a detached copy of
    x_k. Raises :class:`GuidanceError` naming level n, step k and the sample ids when
    the loss or the gradient is not finite. ``level`` and ``ids`` only feed that message.
    ``lcg_chunk``: at most this many LCG masked copies per segmenter forward/backward
    (:func:`lcg_loss_and_grad`; 0 = all at once).
    """
    if module not in ("lcg", "gsg"):
        raise ValueError(f"guidance module must be 'lcg' or 'gsg', got {module!r}")
    check_labels(y, num_classes)

    def cond_fn(x_k: torch.Tensor, k: Steps) -> torch.Tensor:
        if module == "lcg":
            loss, grad = lcg_loss_and_grad(segmenter, x_k, y, num_classes, lcg_chunk)
        else:
            with torch.enable_grad():
                x = x_k.detach().requires_grad_(True)
                loss = gsg_loss(segmenter, x, y)
                grad = None
                if loss.requires_grad:
                    (grad,) = torch.autograd.grad(loss, x, allow_unused=True)
            if grad is None:
                grad = torch.zeros_like(x_k)
        finite = torch.isfinite(grad).flatten(1).all(1)
        if not bool(torch.isfinite(loss)) or not bool(finite.all()):
            batch_ids = list(ids) if ids is not None else list(range(x_k.shape[0]))
            bad = [batch_ids[i] for i in (~finite).nonzero().flatten().tolist()] or batch_ids
            kk = k if isinstance(k, int) else torch.as_tensor(k).tolist()
            raise GuidanceError(f"non-finite {module.upper()} guidance (loss {float(loss.detach())}) at level n={level}, "
                                f"step k={kk}, sample ids {bad} (batch ids {batch_ids})")
        return grad.detach()

    return cond_fn


def gsg_step(eps_model: EpsFn, schedule: DDPMSchedule, x_k: torch.Tensor, k: Steps, noise: Optional[torch.Tensor],
             segmenter: Callable, y: torch.Tensor, scale: float, num_classes: int, *,
             level: Optional[int] = None, ids: Optional[Sequence] = None, space: str = "x_k") -> torch.Tensor:
    """GSG (Eq. 10 in Eq. 7, 8): x_{k-1} ~ N(mu - scale beta_k grad L_global, beta_k).

    ``space="x0_hat"``: L_global is evaluated on the denoised estimate (see
    :meth:`DDPMSchedule.guided_reverse_step`)."""
    cond = make_cond_fn(segmenter, y, "gsg", num_classes, level=level, ids=ids)
    return schedule.guided_reverse_step(eps_model, x_k, k, noise, cond, scale, space=space)


def lcg_step(eps_model: EpsFn, schedule: DDPMSchedule, x_k: torch.Tensor, k: Steps, noise: Optional[torch.Tensor],
             segmenter: Callable, y: torch.Tensor, scale: float, num_classes: int, *,
             level: Optional[int] = None, ids: Optional[Sequence] = None, space: str = "x_k",
             lcg_chunk: int = 0) -> torch.Tensor:
    """LCG (Eq. 6-9): x_{k-1} = sum_c m_c x_{k-1,c}, all classes from ONE batched backward.

    Pixels in no class mask (label 255) take the unguided sample mu + sqrt(beta_k) z
    (same z): ``where(ignore, unguided, guided)``. ``space="x0_hat"``: the masked copies are
    of the denoised estimate (see :meth:`DDPMSchedule.guided_reverse_step`). ``lcg_chunk``:
    the batched backward split into chunks of at most that many copies (0 = one backward).
    """
    cond = make_cond_fn(segmenter, y, "lcg", num_classes, level=level, ids=ids, lcg_chunk=lcg_chunk)
    guide = (y != IGNORE).unsqueeze(1)  # [B, 1, H, W]
    return schedule.guided_reverse_step(eps_model, x_k, k, noise, cond, scale, guide_mask=guide, space=space)


# --------------------------------------------------------------------------- lambda
LAMBDA_NOTE = """\
How the paper's lambda = 80 relates to ours. The paper gives lambda = 80 (Sec. 5.1,
Fig. 5) but not the reduction of L_ce, its translation batch size or the scale of the
tensor it differentiates. If its L_ce was torch's default (mean over all labelled
pixels of the batch) at batch 1 in the same [-1, 1] space, it is exactly our
reduction at the paper's resolution (GTA5 / Cityscapes crops of ~10^5-10^6 pixels);
with a batch of B it corresponds to our lambda = 80 / B. Because our loss is a per-
pixel mean, the step on one pixel is lambda * beta_k * (1 / #pixels) * dCE/dx_pixel:
keeping the per-pixel push when the resolution changes from P_paper to P_ours pixels
means lambda_ours = 80 * P_ours / P_paper, which for 32x32 digits gives 0.1-1, far
below the ~1e3 the prototype found best (DESIGN.md sec. 5). The gradient magnitude
also depends on the segmenter (its normalisation: d((x+1)/2 - mean)/std / dx = 1/(2 std),
its calibration) and the DDPM, so lambda does not carry over between setups: treat
80 as a starting point for the paper's setting only and tune lambda (the Tune space
does) for any other.
"""
__doc__ += "\n" + LAMBDA_NOTE
