r"""The forward process behind the schedulers: the prior, ``add_noise`` (the HSM kernel, PSLD paper Eq. 10) and the
per-time kernel maps that guidance, inpainting and likelihood use (ε ↔ score, the consistent ε).

:class:`ForwardProcessMixin` is part of :class:`~.scheduling_psld.PSLDScheduler`; it needs ``self.sde`` (the
:class:`~diffusers_psld.RecipeSDE`), ``self._prior_scale`` and the installed step tables (``self._tables``).
All kernel math is float64 on the CPU; only cast copies reach the device.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor

from .. import sampling
from ..sde import blocks, kernels
from ..sde.recipe import HSMKernel
from .validation import (check_batch, check_finite, check_float_dtype, check_float_tensor, check_generator,
                         check_state_shape)

__all__ = ["ForwardProcessMixin"]


class ForwardProcessMixin:
    """``sample_prior``, ``add_noise``, ``hsm_kernel_at`` and the ε ↔ score maps at a forward time."""

    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Draw the state the first call of the schedule expects.

        For a schedule that starts at t = 1 (a named grid without ``sigma_max``, the classic grids, and before
        ``set_timesteps``; ``GDDIMMultistepScheduler``'s EDM NFE bands start below it): the prior N(0, diag(masses))
        per component (x ~ N(0, I), m ~ N(0, M I)). With the SSCS sampler this is also exact for the state its
        first step expects (the SSCS linear part keeps the prior invariant, so its leading half-step needs no
        simulation).

        For a schedule that starts at t₀ < 1 (``timesteps`` / ``sigmas`` / ``sigma_max`` below σ(1), e.g. EDM's
        σ_max = 80): the data-free kernel marginal N(0, Σ_t₀), the law of z_t₀ for x₀ = 0 (the HSM covariance at t₀;
        diffusers' ``init_noise_sigma = σ_max`` for its "linspace" / "trailing" spacings). For data of per-pixel
        variance v it differs from the true marginal by v·a aᵀ, relative size v/σ_t₀² (< 0.1 % for σ_t₀ = 80 and
        v = 1). For SSCS the draw is the exact push of that law through the leading half-step's linear part.

        ``shape`` is ``[B, k*C, ...]``; ``generator`` is None, a ``torch.Generator`` or a list of B of them
        (``TypeError`` otherwise). Raises ``ValueError`` for a shape with a non-positive or non-int size and
        ``TypeError`` for a ``dtype`` that is not a floating-point ``torch.dtype``.
        """
        shape = check_state_shape(shape, self.num_components)
        dtype = check_float_dtype(dtype)
        generator = check_generator(generator, shape[0])
        noise = randn_tensor(shape, generator=generator, device=torch.device(device) if device else None, dtype=dtype)
        scale = self._prior_scale if getattr(self, "_init_scale", None) is None else self._init_scale
        return blocks.apply(scale, noise)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """z_t = a(t) x₀ + L_t ε from the HSM kernel p(z_t | x₀) (paper Eq. 10), for training and mid-schedule starts.

        Args:
            original_samples: data x₀ ``[B, C, ...]`` (floating-point tensor).
            noise: ε ``[B, k*C, ...]`` (floating-point tensor).
            timesteps: forward times in [0, 1]: a number, or a tensor of 1 or B entries (one entry is broadcast).

        Returns ``[B, k*C, ...]`` in ``noise``'s dtype, computed in float32 (float64 if an input is float64) on
        ``noise``'s device; the kernel is computed in float64 on the CPU and only cast copies reach the device.
        Raises ``TypeError`` for non-tensors or integer/bool tensors, ``ValueError`` for shapes or times.
        """
        check_float_tensor(original_samples, "original_samples")
        check_float_tensor(noise, "noise")
        check_batch(original_samples, "original_samples")
        check_finite(original_samples, "original_samples")
        check_finite(noise, "noise")
        k = self.num_components
        if noise.ndim < 2 or noise.shape[0] != original_samples.shape[0] or noise.shape[1] != k * original_samples.shape[1] \
                or noise.shape[2:] != original_samples.shape[2:]:
            raise ValueError(
                f"`noise` must have shape [B, {k}*C, ...] for `original_samples` of shape [B, C, ...]: got "
                f"noise {tuple(noise.shape)} and original_samples {tuple(original_samples.shape)}"
            )
        t = self._check_times(timesteps, original_samples.shape[0])
        kern = self.sde.hsm_kernel(t)
        work = torch.float64 if torch.float64 in (noise.dtype, original_samples.dtype) else torch.float32
        z = blocks.apply(kern.chol.to(device=noise.device, dtype=work), noise.to(work))
        x0 = original_samples.to(device=noise.device, dtype=work).reshape(noise.shape[0], 1, -1)
        z = z + (kern.mean_coef.to(device=noise.device, dtype=work)[:, :, None] * x0).reshape(noise.shape)
        return z.to(noise.dtype)

    @staticmethod
    def _check_times(timesteps, batch: int) -> torch.Tensor:
        """Forward times as a float64 CPU tensor ``[batch]`` (a single time is broadcast)."""
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dtype == torch.bool or timesteps.is_complex():
                raise TypeError(f"`timesteps` must hold real forward times, got a {timesteps.dtype} tensor")
            t = timesteps.detach().to("cpu").to(torch.float64)
        else:
            if isinstance(timesteps, str) or timesteps is None:
                raise TypeError(f"`timesteps` must be forward times in [0, 1] (a number or a tensor), got {timesteps!r}")
            try:
                t = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
            except (TypeError, ValueError) as err:
                raise TypeError(f"`timesteps` must be forward times in [0, 1] (a number or a tensor), got {timesteps!r}") from err
        if t.numel() == 1:
            t = t.reshape(()).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"`timesteps` must be a scalar or have shape [{batch}] (or one entry), got {tuple(t.shape)}")
        if not torch.all(torch.isfinite(t)) or torch.any(t < 0) or torch.any(t > 1):
            raise ValueError(f"`timesteps` must be forward times in [0, 1], got range "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t

    def hsm_kernel_at(self, t: float) -> HSMKernel:
        """The float64 HSM kernel (``mean_coef``, ``cov``, ``chol``) at forward time ``t``: taken from the
        step tables when ``t`` is the current call's time (the per-step case of guidance and inpainting),
        computed otherwise."""
        i = self._call_index_for(t)
        if i is not None:  # the call's own time: the exact float64 table entry
            k = self._tables.kernel
            return HSMKernel(k.mean_coef[i], k.cov[i], k.chol[i])
        return self.sde.hsm_kernel(float(t))

    def _call_index_for(self, t) -> Optional[int]:
        """The index of the current (or, before the loop, the first) call when ``t`` is its time, else None.

        ``t`` (a number or one-element tensor) matches within a relative 2e-6, so the float32 entries of
        ``timesteps`` find their exact float64 table entry: per-step helpers (kernels, network-boundary maps)
        should look their tables up through this, not by exact equality."""
        tab = self._tables
        if tab is None:
            return None
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                return None
            t = t.reshape(())
        if i < len(tab.eval_times) and abs(tab.eval_times[i] - float(t)) <= 2e-6 * tab.eval_times[i]:
            return i
        return None

    def _chol(self, t: float) -> torch.Tensor:
        return self.hsm_kernel_at(t).chol

    def eps_to_score(self, eps: torch.Tensor, t: float) -> torch.Tensor:
        """score = -L_t^{-T} ε (HSM kernel factor at forward time ``t``)."""
        return blocks.apply(-kernels.lower_inverse_transpose(self._chol(t)), eps)

    def consistent_eps(self, sample: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """The ``project_eps`` map at forward time ``t``: ε' = L⁻¹(z - a x̂₀), x̂₀ = aᵀ(z - Lε)/aᵀa, in
        ``eps``'s dtype (see :func:`diffusers_psld.sampling.eps_projection`). Applied regardless of the
        config flag; for score functions outside ``step()`` (likelihood)."""
        kern = self.hsm_kernel_at(t)
        Mz, Me = sampling.eps_projection(kern.mean_coef, kern.chol)
        return blocks.apply(Mz, sample.to(eps.dtype)) + blocks.apply(Me, eps)

    def score_to_eps_shift(self, grad: torch.Tensor, t: float) -> torch.Tensor:
        """``Lᵀ g``: adding ``g`` to the score equals subtracting ``Lᵀ g`` from ε (used for guidance)."""
        return blocks.apply(self._chol(t).transpose(-1, -2), grad)
