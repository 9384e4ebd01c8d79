r"""The exact bridge between a recipe scheduler's state and a denoiser (float64 per-call tables).

For a state ``z`` ``[B, k*C, ...]`` at forward time t of a scheduler of this package:

* :func:`sufficient_statistic` — the reduction ``(z, t) ↦ (y, σ)``: ``y = cᵀz`` per pixel with
  ``c = σ_t² Σ_t⁻¹ a_t`` and σ_t² = 1/(a_tᵀΣ_t⁻¹a_t), so ``y = x₀ + σ_t n`` and ``E[x₀ | z_t] = D(y; σ_t)``
  (:func:`diffusers_psld.parameterization.sufficient_statistic`);
* :func:`denoised_to_eps` — the lift of x̂₀ to the state's ε, ``ε = L_t⁻¹(z - a_t x̂₀)`` (the score
  ``-Σ_t⁻¹(z - a_t x̂₀)``, Tweedie), exact when x̂₀ is;
* :func:`denoiser_to_model_output` — both plus the scheduler's own ``eps_to_model_output``: what ``scheduler.step``
  expects from its network, in the scheduler's ``prediction_type`` (x̂₀ itself for ``"sample"``).

The kernel comes from ``scheduler.hsm_kernel_at(t)``: the float64 step-table entry when t is the current call's time
(so the float32 ``timesteps`` find their exact float64 time), else computed. So every sampler of the package (every
class, every ``sampler``, the psld / cld / vp presets) samples a denoiser unchanged::

    scheduler.set_timesteps(20)
    z = scheduler.sample_prior((batch, k * C, H, W), generator=g)
    for t in scheduler.timesteps:
        out = denoiser_to_model_output(scheduler, denoiser, z, t)   # or scheduler.denoiser_to_model_output(...)
        z = scheduler.step(out, t, z, generator=g).prev_sample
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import parameterization

__all__ = ["sufficient_statistic", "denoised_to_eps", "denoiser_to_model_output"]


def _kernel(scheduler, timestep, batch: int):
    """``(a, L)`` float64 at ``timestep``: ``[k]``, ``[k, k]`` for one time (a number or a 1-element tensor: the step
    table's entry when it is the current call's time), ``[B, k]``, ``[B, k, k]`` for ``[B]`` times."""
    if isinstance(timestep, torch.Tensor) and timestep.numel() > 1:
        t = timestep.detach().to("cpu", torch.float64).reshape(-1)
        if t.numel() != batch:
            raise ValueError(f"`timestep` must have 1 or {batch} (the batch size) entries, got {t.numel()}")
        kern = scheduler.sde.hsm_kernel(t)
        return kern.mean_coef, kern.chol
    t = float(timestep.reshape(()) if isinstance(timestep, torch.Tensor) else timestep)
    kern = scheduler.hsm_kernel_at(t)
    return kern.mean_coef, kern.chol


def _work(sample: torch.Tensor) -> torch.dtype:
    return torch.float64 if sample.dtype == torch.float64 else torch.float32


def _check_state(scheduler, sample):
    k = scheduler.num_components
    if not isinstance(sample, torch.Tensor) or not torch.is_floating_point(sample):
        raise TypeError(f"`sample` must be a floating-point tensor [B, {k}*C, ...]")
    if sample.ndim < 2 or sample.shape[1] % k:
        raise ValueError(f"`sample` must have shape [B, {k}*C, ...] ({k} stacked components), got {tuple(sample.shape)}")
    return k


def sufficient_statistic(scheduler, sample: torch.Tensor, timestep):
    """``(y, σ)``: y ``[B, C, ...]`` (float32, float64 for a float64 ``sample``) and σ (float64 CPU ``[B]``) of the
    state ``sample`` ``[B, k*C, ...]`` at forward time ``timestep`` (module docstring). Differentiable in ``sample``."""
    k = _check_state(scheduler, sample)
    B = sample.shape[0]
    a, L = _kernel(scheduler, timestep, B)
    c, sigma = parameterization.sufficient_statistic(a, L)
    z = sample.to(_work(sample))
    eq = "j,bjn->bn" if c.ndim == 1 else "bj,bjn->bn"
    y = torch.einsum(eq, c.to(device=z.device, dtype=z.dtype), z.reshape(B, k, -1))
    return y.reshape(B, sample.shape[1] // k, *sample.shape[2:]), sigma.reshape(-1).expand(B).contiguous()


def denoised_to_eps(scheduler, denoised: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
    """ε = L⁻¹(z - a x̂₀) ``[B, k*C, ...]`` for x̂₀ = ``denoised`` ``[B, C, ...]`` at the state ``sample`` and forward time
    ``timestep`` (the ``"sample"`` output map of :mod:`diffusers_psld.parameterization`). Differentiable."""
    k = _check_state(scheduler, sample)
    if tuple(denoised.shape) != (sample.shape[0], sample.shape[1] // k, *sample.shape[2:]):
        raise ValueError(f"`denoised` must have shape {(sample.shape[0], sample.shape[1] // k, *sample.shape[2:])} (the "
                         f"data channels of the state), got {tuple(denoised.shape)}")
    a, L = _kernel(scheduler, timestep, sample.shape[0])
    maps = parameterization.output_maps("sample", a, L).to(sample.device, _work(sample))
    return maps.to_eps(denoised.to(_work(sample)), sample.to(_work(sample)))


def denoiser_to_model_output(scheduler, denoiser, sample: torch.Tensor, timestep,
                             class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The model output ``scheduler.step`` expects (its ``prediction_type``) when the network is ``denoiser``
    (anything called as ``denoiser(y, sigma, class_labels)`` → x̂₀, e.g. a :class:`~diffusers_psld.denoisers.Denoiser`),
    at the state ``sample`` ``[B, k*C, ...]`` and forward time ``timestep``. In float64 for a float64 ``sample``, else
    float32. Exact: with the exact denoiser of the data this is the exact ε (or x̂₀, or uᵀε) of the recipe."""
    y, sigma = sufficient_statistic(scheduler, sample, timestep)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    x0 = denoiser(y, sigma, **kwargs).to(y.dtype)
    if scheduler.config.prediction_type == "sample":
        return x0
    eps = denoised_to_eps(scheduler, x0, sample, timestep)
    return scheduler.eps_to_model_output(eps, sample.to(eps.dtype), timestep)
