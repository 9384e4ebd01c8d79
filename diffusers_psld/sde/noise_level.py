r"""The noise level σ_t of a recipe and its inverse t(σ) — the one σ ↔ t map of the package.

Per pixel the HSM kernel gives ``z_t = a_t x₀ + L_t ε``; its sufficient statistic for x₀ is a VP observation
``y_t = x₀ + σ_t n`` with ``σ_t = (a_tᵀΣ_t⁻¹a_t)^{-1/2}`` (:func:`diffusers_psld.parameterization.sufficient_statistic`).
σ_t is the noise level that VP and VE/EDM models are conditioned on, so a σ schedule written for them (EDM's
ρ-schedule, Karras σ, Align-Your-Steps) and a σ-conditioned denoiser mean the same thing for every recipe. The
schedulers' ``set_timesteps(sigmas=...)`` (:mod:`diffusers_psld.schedulers.time_grids`) and the bridge's
:class:`~diffusers_psld.denoisers.recipe.RecipeDenoiser` both invert σ_t here.

Inversion (float64): closed form for k = 1 (``σ² = mass·(e^{-2F·B(t)} − 1)``, B the β integral); otherwise the
bracketing cell of a 2049-point log-σ table geometric in t (built once per :class:`NoiseLevel`), refined by Illinois
regula falsi on log σ against log t (monotone and nearly linear there) to ``|Δ log σ| ≤ 1e-15``.
"""
from __future__ import annotations

import math

import torch

from .. import parameterization

__all__ = ["NoiseLevel"]

_TABLE_POINTS = 2049


class NoiseLevel:
    """σ_t and t(σ) for a :class:`~diffusers_psld.RecipeSDE` on forward times ``[t_lo, t_hi]``.

    Args:
        sde: the recipe.
        t_lo, t_hi: the time range of the table (default [1e-8, 2]: wider than any schedule, so that σ of a
            source model outside the recipe's sampling range still maps to a time).

    Raises:
        ValueError: σ_t is not strictly increasing on the range (the noise level does not determine the time).
    """

    def __init__(self, sde, t_lo: float = 1e-8, t_hi: float = 2.0):
        if not (0 < t_lo < t_hi < math.inf):
            raise ValueError(f"need 0 < t_lo < t_hi < inf, got t_lo={t_lo!r}, t_hi={t_hi!r}")
        self.sde, self.t_lo, self.t_hi = sde, float(t_lo), float(t_hi)
        self.log_t = torch.linspace(math.log(t_lo), math.log(t_hi), _TABLE_POINTS, dtype=torch.float64)
        self.log_sigma = self._log_sigma(self.log_t)
        if not bool((self.log_sigma.diff() > 0).all()):
            raise ValueError(f"σ_t is not increasing in t for {sde!r}: the noise level does not determine the time")

    def _log_sigma(self, log_t: torch.Tensor) -> torch.Tensor:
        kern = self.sde.hsm_kernel(torch.exp(log_t))
        return -0.5 * torch.log(parameterization.snr(kern.mean_coef, kern.chol))

    @property
    def sigma_range(self):
        """(σ(t_lo), σ(t_hi)) as floats."""
        return float(self.log_sigma[0].exp()), float(self.log_sigma[-1].exp())

    def sigma(self, t) -> torch.Tensor:
        """σ_t (float64, ``t``'s shape) at forward times ``t`` > 0."""
        t = torch.as_tensor(t, dtype=torch.float64)
        return torch.exp(self._log_sigma(torch.log(t.reshape(-1)))).reshape(t.shape)

    def time(self, sigma) -> torch.Tensor:
        """t(σ) (float64, ``sigma``'s shape) for σ > 0; σ outside ``sigma_range`` gives the range's end time."""
        sig = torch.as_tensor(sigma, dtype=torch.float64)
        shape = sig.shape
        target = torch.log(sig.reshape(-1)).clamp(float(self.log_sigma[0]), float(self.log_sigma[-1]))
        if self.sde.k == 1:
            f, mass = float(self.sde.F[0, 0]), float(self.sde.masses[0])
            b = torch.log1p(torch.exp(2.0 * target) / mass) / (-2.0 * f)  # B(t) = β_min t + ½ Δβ t²
            b0, db = self.sde.beta_min, self.sde.beta_max - self.sde.beta_min
            t = 2.0 * b / (b0 + torch.sqrt(b0 * b0 + 2.0 * db * b))  # the root, without cancellation
            return t.clamp(self.t_lo, self.t_hi).reshape(shape)
        n = self.log_t.numel()
        hi = torch.searchsorted(self.log_sigma, target).clamp(1, n - 1)
        xa, xb = self.log_t[hi - 1], self.log_t[hi]
        fa, fb = self.log_sigma[hi - 1] - target, self.log_sigma[hi] - target
        for _ in range(100):  # Illinois (regula falsi with halving): superlinear, keeps the bracket
            done = (fb.abs() <= 1e-15) | (fa.abs() <= 1e-15) | ((xb - xa).abs() <= 1e-15)
            if bool(done.all()):
                break
            denom = fb - fa
            xc = torch.where(denom != 0, xb - fb * (xb - xa) / torch.where(denom != 0, denom, 1.0), 0.5 * (xa + xb))
            fc = self._log_sigma(xc) - target
            flip = (fc * fb) < 0
            xa, fa = torch.where(done, xa, torch.where(flip, xb, xa)), torch.where(done, fa, torch.where(flip, fb, 0.5 * fa))
            xb, fb = torch.where(done, xb, xc), torch.where(done, fb, fc)
        return torch.exp(torch.where(fb.abs() <= fa.abs(), xb, xa)).reshape(shape)
