"""Segmenter training losses (no Ray, no schedule import).

- :func:`seg_ce`: pixel cross-entropy, ignore label 255, mean over the counted pixels.
- :func:`similarity_loss`: ZoDi Eq. 7/8, ``mean_b (1 - cos(F(I)_b, F(I')_b))``.
- :func:`finetune_loss`: PTL Eq. 12 (+ ZoDi's similarity term, Eq. 8):
  ``L_ft = CE(g(X^n), Y) + [l_src] CE(g(X^S), Y) + w (1 - cos(F(X^S), F(X^n)))``.
- :func:`noisy_masked_augment`: App. C of the label-guided paper, noisy (Eq. 2) and
  class-masked copies of part of a batch, so g can classify the inputs SGG shows it.

Images are diffusion-space ``float [B, 3, H, W]`` in [-1, 1], labels ``int64 [B, H, W]``
(255 = ignore), logits ``[B, C, H, W]``.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

IGNORE_INDEX = 255


def seg_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of ``logits [B, C, H, W]`` vs ``labels [B, H, W]``, mean over pixels != 255.

    A batch with no counted pixel gives 0 (still attached to the graph, so ``backward``
    works and yields zero gradients) instead of the NaN of ``F.cross_entropy``'s mean.
    """
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum()
    return total / count.clamp(min=1).to(total.dtype)


def similarity_loss(f_src: torch.Tensor, f_trans: torch.Tensor) -> torch.Tensor:
    """ZoDi Eq. 7/8: ``mean_b (1 - cos(f_src_b, f_trans_b))`` for pooled features ``[B, D]``.

    0 for parallel features, 1 for orthogonal, 2 for opposite ones.
    """
    if f_src.shape != f_trans.shape or f_src.dim() != 2:
        raise ValueError(f"similarity_loss expects two [B, D] tensors of the same shape, "
                         f"got {tuple(f_src.shape)} and {tuple(f_trans.shape)}")
    return (1.0 - F.cosine_similarity(f_src, f_trans, dim=1, eps=1e-8)).mean()


def finetune_loss(model: nn.Module, x_trans: torch.Tensor, x_src: Optional[torch.Tensor], y: torch.Tensor,
                  l_src: bool = True, similarity_weight: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """PTL Eq. 12 with ZoDi's feature-similarity term (Eq. 8).

    ``L = CE(g(x_trans), y) + [l_src] CE(g(x_src), y) + similarity_weight * (1 - cos(F(x_src), F(x_trans)))``

    ``x_trans`` and ``x_src`` are paired (same source image, same crop / flip), both
    labelled by ``y``. When the source batch is needed (``l_src`` or a similarity weight
    > 0) the model runs once over ``cat([x_trans, x_src])``; otherwise only on ``x_trans``
    (``x_src`` may then be None). ``model`` may be DDP-wrapped: features are requested with
    ``model(x, return_features=True)`` so DDP sees the forward.

    Returns ``(loss, parts)``; ``parts`` holds floats: ``loss``, ``ce_trans``, and when the
    source batch was evaluated ``ce_src`` (reported even when ``l_src`` is off: it is free)
    and ``similarity`` (reported even with weight 0).
    """
    use_src = l_src or similarity_weight > 0
    if not use_src:
        ce_t = seg_ce(model(x_trans), y)
        return ce_t, {"loss": float(ce_t.detach()), "ce_trans": float(ce_t.detach())}
    if x_src is None:
        raise ValueError("finetune_loss: x_src is required when l_src is on or similarity_weight > 0")
    if x_src.shape != x_trans.shape:
        raise ValueError(f"finetune_loss: x_src {tuple(x_src.shape)} and x_trans {tuple(x_trans.shape)} differ")
    b = x_trans.shape[0]
    logits, pooled = model(torch.cat([x_trans, x_src], dim=0), return_features=True)
    ce_t = seg_ce(logits[:b], y)
    ce_s = seg_ce(logits[b:], y)
    sim = similarity_loss(pooled[b:], pooled[:b])
    loss = ce_t
    if l_src:
        loss = loss + ce_s
    if similarity_weight > 0:
        loss = loss + similarity_weight * sim
    parts = {"loss": float(loss.detach()), "ce_trans": float(ce_t.detach()), "ce_src": float(ce_s.detach()),
             "similarity": float(sim.detach())}
    return loss, parts


def augment_count(fraction: float, batch_size: int) -> int:
    """How many samples :func:`noisy_masked_augment` changes: ``round(fraction * B)``, halves up."""
    return min(batch_size, int(fraction * batch_size + 0.5))


def noisy_masked_augment(images: torch.Tensor, labels: torch.Tensor, fraction: float, max_n: int,
                         alphas_cumprod: torch.Tensor, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """App. C: replace ``round(fraction * B)`` random samples by noisy, class-masked copies.

    For each chosen sample: draw ``n`` uniformly in 1..max_n and noise the image with
    Eq. 2, ``x_n = sqrt(abar_n) x_0 + sqrt(1 - abar_n) eps``; then pick one class ``c``
    present in its label (255 excluded) and multiply by its binary mask, ``x_n * m_c`` (the
    input LCG gives the segmenter, Eq. 8); the label becomes 255 outside ``m_c``.

    The paper only says it "masks the noisy images using binary masks provided by source
    labels". Ignoring the label outside the mask is our choice: there the input is a flat
    0 carrying no evidence of the true class, and LCG counts its loss on ``m_c`` only, so
    the model is trained for exactly what guidance asks of it (the class of the unmasked
    pixels) and is not taught to call zeroed regions one class. A sample whose label is
    all 255 is only noised.

    Args:
        images: ``[B, 3, H, W]`` in [-1, 1]; labels: ``int64 [B, H, W]``.
        fraction: share of the batch to change (``round(fraction * B)`` samples, halves
            up; with small batches this may be 0).
        max_n: largest noise level n (>= 1, <= len(alphas_cumprod)).
        alphas_cumprod: ``[T]``, ``alphas_cumprod[n - 1]`` = alphabar_n (diffusers' /
            ``DiffusionSchedule.alphas_cumprod`` layout), passed in so this module needs
            no schedule import.
        generator: a CPU generator; all randomness (samples, n, noise, class) comes from it.

    Returns new ``(images, labels)`` tensors (inputs are not modified).
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in 0..1, got {fraction}")
    if not 1 <= max_n <= alphas_cumprod.numel():
        raise ValueError(f"max_n must be in 1..{alphas_cumprod.numel()} (the schedule length), got {max_n}")
    if images.dim() != 4 or labels.dim() != 3 or images.shape[0] != labels.shape[0] \
            or images.shape[-2:] != labels.shape[-2:]:
        raise ValueError(f"expected images [B, 3, H, W] and labels [B, H, W], got {tuple(images.shape)} and "
                         f"{tuple(labels.shape)}")
    b = images.shape[0]
    k = augment_count(fraction, b)
    images, labels = images.clone(), labels.clone()
    if k == 0:
        return images, labels
    chosen = torch.randperm(b, generator=generator)[:k].tolist()
    ns = torch.randint(1, max_n + 1, (k,), generator=generator).tolist()
    abar = alphas_cumprod.detach().to("cpu", torch.float64)
    for i, n in zip(chosen, ns):
        eps = torch.randn(images.shape[1:], generator=generator, dtype=images.dtype).to(images.device)
        a = float(abar[n - 1])
        x = a ** 0.5 * images[i] + (1.0 - a) ** 0.5 * eps
        lab = labels[i]
        present = torch.unique(lab[lab != IGNORE_INDEX].cpu())
        if present.numel() > 0:
            c = int(present[torch.randint(0, present.numel(), (1,), generator=generator)])
            m = lab == c
            x = x * m.to(x.dtype)
            labels[i] = torch.where(m, lab, torch.full_like(lab, IGNORE_INDEX))
        images[i] = x
    return images, labels
