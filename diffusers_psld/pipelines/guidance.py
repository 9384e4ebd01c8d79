r"""The ε that the denoising loop hands to ``scheduler.step``, built by composing small wrappers.

An *ε-function* maps ``(z, t)`` -- the float32 state ``[B, k*C, H, W]`` and the forward time ``t`` (a
Python float) -- to ε of the same shape. The pipelines start from the network's ε and wrap it, one concern
per wrapper (the k-diffusion ``CFGDenoiser`` idea)::

    eps_fn = cfg_eps_fn(pipe._unet_eps, ...)                  # classifier-free guidance (or the plain UNet)
    eps_fn = with_tweedie_inpainting(eps_fn, ...)           # inpainting correction (optional)
    eps_fn = with_classifier_guidance(eps_fn, ...)          # classifier guidance (optional)

* **Classifier guidance** (PSLD paper Eq. 13-14): with a time-dependent classifier p(y | z_t) on the full
  state the score becomes ``s_θ + w · ∇_z log p(y | z_t)`` (both x and m), i.e. in ε-space
  ``ε - w · Lᵀ ∇_z log p(y | z_t)`` (:meth:`PSLDScheduler.score_to_eps_shift`); every sampler then applies
  its own reverse-drift weighting ``G Gᵀ`` to the guided score (Eq. 14). The classifier receives the
  **forward** time ``scheduler.model_time(t)``, like the UNet.
* **Classifier-free guidance**: ``ε = ε_u + w (ε_c - ε_u)`` with a class-conditional UNet whose last class
  index is the null class; ``w = 1`` is the conditional model (one pass), ``0`` the unconditional one,
  otherwise the batch is doubled ``[cond ; null]``.
* **Tweedie inpainting** adds ∇ log p(x₀ᴷ | z_t) (see :mod:`diffusers_psld.inpainting`).

Each wrapper checks that what it adds is finite and raises :class:`NonFiniteError` naming the likely
cause; the loop (:mod:`.denoising`) adds the step and the time to the message.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

from .. import inpainting as _inpainting

__all__ = ["EpsFn", "NonFiniteError", "check_finite", "cfg_eps_fn", "classifier_log_prob_grad",
           "with_classifier_guidance", "with_tweedie_inpainting"]

EpsFn = Callable[[torch.Tensor, float], torch.Tensor]


class NonFiniteError(FloatingPointError):
    """A NaN or inf appeared during sampling. ``cause`` names the likely source."""

    def __init__(self, message: str, cause: str = ""):
        super().__init__(message)
        self.cause = cause


def check_finite(tensor: torch.Tensor, what: str, cause: str) -> torch.Tensor:
    """Raise :class:`NonFiniteError` if ``tensor`` has a NaN or inf (``what`` names it, ``cause`` explains)."""
    if not bool(torch.isfinite(tensor).all()):
        raise NonFiniteError(f"{what} is not finite ({cause})", cause=cause)
    return tensor


def cfg_eps_fn(unet_eps: Callable[[torch.Tensor, float, Optional[torch.Tensor]], torch.Tensor],
               labels: Optional[torch.Tensor], null: Optional[torch.Tensor], scale: float) -> EpsFn:
    """ε-function of the UNet, classifier-free guided when ``labels`` is given (``null`` = the null class).

    ``unet_eps(z, t, class_labels)`` is the network's ε. Without a class-conditional UNet pass ``null=None``
    and ``labels=None``: the plain UNet. NFE: 1 per call, 2 when ``scale ∉ {0, 1}``.
    """
    if null is None or labels is None or scale == 0.0:
        def eps_fn(z, t):
            return unet_eps(z, t, null)
    elif scale == 1.0:
        def eps_fn(z, t):
            return unet_eps(z, t, labels)
    else:
        def eps_fn(z, t):
            eps_c, eps_u = unet_eps(torch.cat([z, z]), t, torch.cat([labels, null])).chunk(2)
            return eps_u + scale * (eps_c - eps_u)
    return eps_fn


def classifier_log_prob_grad(classifier, scheduler, z: torch.Tensor, t: float, labels: torch.Tensor) -> torch.Tensor:
    """∇_z log p(y | z_t) w.r.t. the full state ``z`` ``[B, k*C, H, W]`` (per sample), in ``z``'s dtype.

    The classifier gets the forward model time ``scheduler.model_time(t)`` and the state in its own dtype."""
    tm = scheduler.model_time(t, z.shape[0], device=z.device)
    with torch.enable_grad():
        zin = z.detach().to(classifier.dtype).requires_grad_(True)
        out = classifier(zin, tm)
        logits = (out.logits if hasattr(out, "logits") else out).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
        (grad,) = torch.autograd.grad(logp, zin)
    return grad.to(z.dtype)


def with_classifier_guidance(eps_fn: EpsFn, grad_fn: Callable[[torch.Tensor, float], torch.Tensor], scheduler,
                             scale: float) -> EpsFn:
    """``ε - scale · Lᵀ ∇_z log p(y | z_t)`` (PSLD Eq. 13-14); ``grad_fn(z, t)`` is the classifier gradient."""
    if scale == 0.0:
        return eps_fn

    def guided(z, t):
        eps = eps_fn(z, t)
        grad = check_finite(grad_fn(z, t), "the classifier gradient ∇ log p(y | z_t)",
                            "classifier output or its gradient non-finite")
        shift = scale * scheduler.score_to_eps_shift(grad, t)
        return check_finite(eps - shift, "the classifier-guided ε",
                            f"guidance_scale={scale:g} times the classifier gradient overflows; lower `guidance_scale`")
    return guided


def with_tweedie_inpainting(eps_fn: EpsFn, scheduler, x_known: torch.Tensor, mask: torch.Tensor, cg_iters: int,
                            cg_tol: float, ridge: float, info: List) -> EpsFn:
    """ε plus the conditional-score correction ``J_Kᵀ C_KK⁻¹ (y - x̂₀_K)`` of second-order Tweedie inpainting
    (:func:`diffusers_psld.inpainting.tweedie_correction`); appends one ``TweedieInfo`` per call to ``info``."""
    def corrected(z, t):
        kern = scheduler.hsm_kernel_at(t)
        eps, g, call_info = _inpainting.tweedie_correction(
            lambda zz: eps_fn(zz, t), z, x_known, mask, kern.mean_coef, kern.cov, kern.chol, t=t,
            cg_iters=cg_iters, cg_tol=cg_tol, ridge=ridge)
        info.append(call_info)
        return eps - scheduler.score_to_eps_shift(g, t)
    return corrected
