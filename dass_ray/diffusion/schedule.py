"""The DDPM schedule and the (guided) reverse step (paper Sec. 3, Eq. 2-5, 7).

Timestep convention
-------------------
Every function here takes the **paper's k, in 1..T** (``q_sample`` also accepts
k = 0, meaning "no noise": alphabar_0 = 1). Arrays are indexed ``betas[k - 1]``,
``alphas_cumprod[k - 1]``. Diffusers numbers the same steps 0..T-1, so the UNet
sees ``t = k - 1`` (:class:`EpsModel` does the shift; nothing else should).

Betas and alphabar come from ``diffusers.DDPMScheduler`` (linear schedule), not
re-derived; its ``.step`` is not used because the guided step needs
Sigma = beta_k I (Sec. 5.1) and a hook on the mean (Eq. 7).

Shapes: images ``x`` are ``float [B, C, H, W]`` (diffusion space, [-1, 1] for
data); ``k`` is an ``int`` or a ``LongTensor [B]``.
"""
from __future__ import annotations

from typing import Sequence, Callable, Optional, Union

import torch
from diffusers import DDPMScheduler

from dass_ray.config import DiffusionConfig
from dass_ray.precision import bf16_autocast

Steps = Union[int, torch.Tensor]
EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_k [B,C,H,W], k LongTensor [B]) -> eps
CondFn = Callable[[torch.Tensor, Steps], torch.Tensor]  # (x, k) -> grad_x L, same shape as x (x_k or x0_hat)
GUIDANCE_SPACES = ("x_k", "x0_hat")  # what the segmenter reads in a guided step (GuidanceConfig.space)


class EpsModel:
    """eps_theta(x_k, k) from a ``diffusers.UNet2DModel``: ``unet(x_k, k - 1).sample``.

    Evaluated under ``torch.no_grad``: guidance differentiates the segmenter
    only, never the UNet (as in Dhariwal & Nichol). ``k`` is the paper's step.
    """

    def __init__(self, unet: torch.nn.Module, precision: str = "fp32") -> None:
        self.unet = unet
        self.precision = precision

    def __call__(self, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        with torch.no_grad(), bf16_autocast(x.device, self.precision):
            return self.unet(x, (k - 1).to(x.device)).sample.to(x.dtype)


class DDPMSchedule:
    """Linear-beta DDPM schedule of a :class:`DiffusionConfig` (T = num_train_timesteps)."""

    def __init__(self, cfg: DiffusionConfig) -> None:
        # clip_sample: the mean is computed from x0_hat clipped to [-1, 1] (the usual DDPM sampler
        # practice; without clipping it is Eq. 4 exactly). variance: "beta" (Sigma = beta_k, Sec. 5.1)
        # or "posterior" (beta~_k = (1 - abar_{k-1}) / (1 - abar_k) beta_k); "auto" = beta on this
        # chain, posterior on respaced chains, whose large beta' would leave visible noise in the output.
        self.clip_sample = bool(getattr(cfg, "clip_sample", False))
        self.precision = getattr(cfg, "precision", "fp32")  # of the UNet calls made through this schedule
        self.variance_kind = getattr(cfg, "reverse_variance", "auto")
        # ddim_eta: None = the DDPM step above; else the DDIM step (Song et al. 2021, Eq. 12) with this eta
        self.ddim_eta = getattr(cfg, "ddim_eta", None)
        sched = DDPMScheduler(num_train_timesteps=cfg.num_train_timesteps, beta_start=cfg.beta_start,
                              beta_end=cfg.beta_end, beta_schedule="linear")
        self.T = cfg.num_train_timesteps
        # float64 copies of diffusers' float32 arrays: sqrt/divisions done in double, cast on use.
        self.betas = sched.betas.double()  # [T], betas[k-1] = beta_k
        self.alphas = 1.0 - self.betas  # [T], alpha_k
        self.alphas_cumprod = sched.alphas_cumprod.double()  # [T], alphabar_k

    def respaced(self, timesteps: Sequence[int]) -> "DDPMSchedule":
        """The schedule restricted to ``timesteps`` t_1 < ... < t_m (paper k, 1..T): a shorter reverse chain.

        Respacing as in Nichol & Dhariwal (2021): position i of the new chain has
        alphabar'_i = alphabar_{t_i} and beta'_i = 1 - alphabar_{t_i} / alphabar_{t_{i-1}}
        (alphabar_{t_0} = 1), so Eq. 4 and Sigma = beta' hold unchanged on the new chain.
        With every timestep 1..n it is the original schedule exactly. ``timestep_map``
        [m] gives the original t of each position (the UNet is called with it).
        """
        ts = torch.as_tensor(list(timesteps), dtype=torch.long)
        if ts.ndim != 1 or len(ts) == 0 or bool((ts[1:] <= ts[:-1]).any()) or int(ts[0]) < 1 or int(ts[-1]) > self.T:
            raise ValueError(f"timesteps must be strictly increasing within 1..{self.T}, got {ts.tolist()}")
        new = object.__new__(DDPMSchedule)
        new.clip_sample = self.clip_sample
        new.precision = self.precision
        new.variance_kind = "posterior" if self.variance_kind == "auto" else self.variance_kind
        new.ddim_eta = self.ddim_eta
        abar = self.alphas_cumprod[(ts - 1).to(self.alphas_cumprod.device)]
        prev = torch.cat([abar.new_ones(1), abar[:-1]])
        new.T = len(ts)
        new.alphas_cumprod = abar
        new.alphas = abar / prev
        new.betas = 1.0 - new.alphas
        new.timestep_map = ts
        return new

    def to(self, device: str | torch.device) -> "DDPMSchedule":
        """Keep the (float64) schedule arrays on ``device``; returns self."""
        self.betas, self.alphas, self.alphas_cumprod = (
            a.to(device) for a in (self.betas, self.alphas, self.alphas_cumprod))
        return self

    # ------------------------------------------------------------------ helpers
    def _k(self, k: Steps, batch: int, allow_zero: bool = False) -> torch.Tensor:
        """``k`` as a CPU LongTensor [B], checked to lie in 1..T (0..T with ``allow_zero``)."""
        kt = torch.as_tensor(k, dtype=torch.long).detach().to("cpu")
        if kt.ndim == 0:
            kt = kt.expand(batch)
        if kt.shape != (batch,):
            raise ValueError(f"k must be an int or a LongTensor [{batch}], got shape {tuple(kt.shape)}")
        lo = 0 if allow_zero else 1
        if bool((kt < lo).any()) or bool((kt > self.T).any()):
            raise ValueError(f"k must lie in {lo}..{self.T} (paper convention), got {kt.tolist()}")
        return kt

    def _alphas_cumprod_prev(self) -> torch.Tensor:
        """``[T]``: alphabar_{k-1} at index k-1 (alphabar_0 = 1), for the posterior and DDIM terms."""
        return torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod[:-1]])

    @staticmethod
    def _take(arr: torch.Tensor, idx: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``arr[idx]`` as ``[B, 1, 1, 1]`` in ``like``'s dtype and device."""
        return arr[idx.to(arr.device)].to(dtype=like.dtype, device=like.device).view(-1, *([1] * (like.ndim - 1)))

    # ------------------------------------------------------------------ Eq. 2
    def q_sample(self, x0: torch.Tensor, k: Steps, noise: torch.Tensor) -> torch.Tensor:
        """Eq. 2: x_k = sqrt(alphabar_k) x_0 + sqrt(1 - alphabar_k) noise. k = 0 returns x_0."""
        kt = self._k(k, x0.shape[0], allow_zero=True)
        abar = torch.cat([self.alphas_cumprod.new_ones(1), self.alphas_cumprod])  # abar[0] = 1
        a = self._take(abar.sqrt(), kt, x0)
        s = self._take((1.0 - abar).sqrt(), kt, x0)
        return a * x0 + s * noise

    # ------------------------------------------------------------------ Eq. 4
    def predict_x0(self, eps: torch.Tensor, x_k: torch.Tensor, k: Steps) -> torch.Tensor:
        """x0_hat = (x_k - sqrt(1 - alphabar_k) eps) / sqrt(alphabar_k), ``[B, C, H, W]``;
        clipped to [-1, 1] with ``clip_sample``."""
        idx = self._k(k, x_k.shape[0]) - 1
        abar = self._take(self.alphas_cumprod, idx, x_k)
        x0 = (x_k - (1.0 - abar).sqrt() * eps) / abar.sqrt()
        return x0.clamp(-1.0, 1.0) if self.clip_sample else x0

    def posterior_mean(self, x0: torch.Tensor, x_k: torch.Tensor, k: Steps) -> torch.Tensor:
        """Mean of q(x_{k-1} | x_k, x_0) (Ho et al. Eq. 7): c0 x_0 + ck x_k, ``[B, C, H, W]``.
        With the unclipped x0_hat of eps it equals Eq. 4's mu exactly."""
        idx = self._k(k, x_k.shape[0]) - 1
        abar_prev_all = self._alphas_cumprod_prev()
        c0 = self._take(abar_prev_all.sqrt() * self.betas / (1.0 - self.alphas_cumprod), idx, x_k)
        ck = self._take(self.alphas.sqrt() * (1.0 - abar_prev_all) / (1.0 - self.alphas_cumprod), idx, x_k)
        return c0 * x0 + ck * x_k

    def variance(self, k: Steps, like: torch.Tensor) -> torch.Tensor:
        """Sigma of the reverse step, ``[B, 1, 1, 1]``: beta_k (Sec. 5.1) or, with the posterior
        variance, beta~_k = (1 - alphabar_{k-1}) / (1 - alphabar_k) beta_k; on the DDIM step
        sigma_k^2 = eta^2 beta~_k."""
        idx = self._k(k, like.shape[0]) - 1
        if self.ddim_eta is not None or self.variance_kind == "posterior":
            abar_prev_all = self._alphas_cumprod_prev()
            tilde = (1.0 - abar_prev_all) / (1.0 - self.alphas_cumprod) * self.betas
            return self._take(tilde if self.ddim_eta is None else self.ddim_eta ** 2 * tilde, idx, like)
        return self._take(self.betas, idx, like)

    def ddim_mean(self, x0: torch.Tensor, x_k: torch.Tensor, k: Steps) -> torch.Tensor:
        """Mean of the DDIM step (Song et al. 2021, Eq. 12), ``[B, C, H, W]``:
        sqrt(alphabar_{k-1}) x0 + sqrt(1 - alphabar_{k-1} - sigma_k^2) eps(x0), with the noise
        re-derived from ``x0`` (clipped or guided): eps(x0) = (x_k - sqrt(alphabar_k) x0) / sqrt(1 - alphabar_k).
        With eta = 1 it equals :meth:`posterior_mean`."""
        idx = self._k(k, x_k.shape[0]) - 1
        abar_prev_all = self._alphas_cumprod_prev()
        abar = self._take(self.alphas_cumprod, idx, x_k)
        abar_prev = self._take(abar_prev_all, idx, x_k)
        var = self.variance(k, x_k)
        eps = (x_k - abar.sqrt() * x0) / (1.0 - abar).sqrt()
        return abar_prev.sqrt() * x0 + (1.0 - abar_prev - var).clamp(min=0.0).sqrt() * eps

    def mean_from_x0(self, x0: torch.Tensor, x_k: torch.Tensor, k: Steps) -> torch.Tensor:
        """The reverse step's mean given a (clipped or guided) x0 estimate: the DDPM posterior
        mean, or the DDIM mean when ``ddim_eta`` is set."""
        if self.ddim_eta is not None:
            return self.ddim_mean(x0, x_k, k)
        return self.posterior_mean(x0, x_k, k)

    def p_mean_variance(self, eps: torch.Tensor, x_k: torch.Tensor, k: Steps) -> tuple[torch.Tensor, torch.Tensor]:
        """Eq. 4: mu = (x_k - beta_k / sqrt(1 - alphabar_k) eps) / sqrt(alpha_k); var = beta_k.

        Returns ``mean [B, C, H, W]`` and ``var [B, 1, 1, 1]`` (Sigma = beta_k I, Sec. 5.1).
        With ``clip_sample`` the mean is the posterior mean of q(x_{k-1} | x_k, x0_hat) with
        x0_hat = (x_k - sqrt(1 - alphabar_k) eps) / sqrt(alphabar_k) clipped to [-1, 1] (equal
        to Eq. 4 when nothing is clipped). With the posterior variance, var = beta~_k. With
        ``ddim_eta`` set: the DDIM mean (:meth:`ddim_mean`) and var = eta^2 beta~_k.
        """
        var = self.variance(k, x_k)
        if self.ddim_eta is not None:
            return self.ddim_mean(self.predict_x0(eps, x_k, k), x_k, k), var
        if not self.clip_sample:
            idx = self._k(k, x_k.shape[0]) - 1
            coef = self._take(self.betas / (1.0 - self.alphas_cumprod).sqrt(), idx, x_k)
            inv_sqrt_alpha = self._take(self.alphas.rsqrt(), idx, x_k)
            return inv_sqrt_alpha * (x_k - coef * eps), var
        return self.posterior_mean(self.predict_x0(eps, x_k, k), x_k, k), var

    def p_sample(self, mean: torch.Tensor, var: torch.Tensor, k: Steps, noise: Optional[torch.Tensor]) -> torch.Tensor:
        """x_{k-1} = mean + sqrt(var) noise, with no noise where k = 1 (``noise`` may be None then)."""
        kt = self._k(k, mean.shape[0])
        if noise is None:
            if bool((kt > 1).any()):
                raise ValueError("noise is required for steps k > 1")
            return mean
        keep = (kt > 1).to(dtype=mean.dtype, device=mean.device).view(-1, *([1] * (mean.ndim - 1)))
        return mean + keep * var.sqrt() * noise

    # ------------------------------------------------------------------ Eq. 7
    def guided_reverse_step(self, eps_model: EpsFn, x_k: torch.Tensor, k: Steps, noise: Optional[torch.Tensor],
                            cond_fn: Optional[CondFn] = None, scale: float = 0.0,
                            guide_mask: Optional[torch.Tensor] = None, space: str = "x_k") -> torch.Tensor:
        """One reverse step x_k -> x_{k-1}, optionally guided (Eq. 4, 7, 8).

        ``space="x_k"`` (the paper): ``mu_hat = mu - scale * beta_k * cond_fn(x_k, k)``: with
        ``cond_fn`` the gradient of a loss, this *lowers* the loss (the paper's Eq. 7 writes
        ``+``; DESIGN.md sec. 3). ``x_{k-1} = mu_hat + sqrt(beta_k) noise`` (no noise at k = 1).

        ``space="x0_hat"`` (an option beyond the paper): the loss is evaluated on the denoised
        estimate x0_hat (:meth:`predict_x0`) instead of the noisy x_k, and the estimate takes a
        gradient step, ``x0' = x0_hat - scale * cond_fn(x0_hat, k)`` (clipped with
        ``clip_sample``); ``mu_hat`` is the posterior mean from x0' (:meth:`posterior_mean`).
        The segmenter then reads an image like the ones it was trained on (a clean estimate,
        not an image at noise level k), and the push on x_{k-1} is c0_k * scale * grad: small
        at large k, where the next UNet calls still re-denoise it, and the full step at k = 1.

        With ``ddim_eta`` set, the step is DDIM's (:meth:`ddim_mean`); ``space="x_k"`` then guides the
        noise estimate, ``eps_hat = eps + sqrt(1 - alphabar_k) * scale * cond_fn(x_k, k)``, since
        the DDIM variance (0 at eta = 0) cannot carry the push.

        ``guide_mask`` (bool, broadcastable to x, e.g. ``[B, 1, H, W]``): where False the
        unguided sample ``mu + sqrt(beta_k) noise`` (same noise) is taken instead.
        ``cond_fn`` is not called when it is None or ``scale == 0``. Returns a detached tensor.
        """
        if space not in GUIDANCE_SPACES:
            raise ValueError(f"guidance space must be one of {GUIDANCE_SPACES}, got {space!r}")
        B = x_k.shape[0]
        kt = self._k(k, B)
        x_k = x_k.detach()
        eps = eps_model(x_k, kt.to(x_k.device))
        mean, var = self.p_mean_variance(eps, x_k, kt)
        unguided = self.p_sample(mean, var, kt, noise)
        if cond_fn is None or scale == 0:
            return unguided.detach()
        if space == "x_k" and self.ddim_eta is None:
            mean_hat = mean - scale * var * cond_fn(x_k, k)
        elif space == "x_k":
            # DDIM has no (or little) variance to scale the push by: guide the noise estimate
            # instead, eps_hat = eps + sqrt(1 - alphabar_k) * scale * grad (Dhariwal & Nichol, Alg. 2)
            abar = self._take(self.alphas_cumprod, kt - 1, x_k)
            eps_hat = eps + (1.0 - abar).sqrt() * scale * cond_fn(x_k, k)
            mean_hat, _ = self.p_mean_variance(eps_hat, x_k, kt)
        else:
            x0 = self.predict_x0(eps, x_k, kt)
            x0 = x0 - scale * cond_fn(x0, k)
            mean_hat = self.mean_from_x0(x0.clamp(-1.0, 1.0) if self.clip_sample else x0, x_k, kt)
        guided = self.p_sample(mean_hat, var, kt, noise)
        if guide_mask is not None:
            guided = torch.where(guide_mask.to(guided.device), guided, unguided)
        return guided.detach()
