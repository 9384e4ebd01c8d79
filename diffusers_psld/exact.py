r"""Exact ε for Gaussian-mixture data under any recipe diffusion (no training involved).

For data x₀ ~ Σ_j w_j N(μ_j, Σ_j) in d dimensions and the HSM kernel ``z_t = a(t) ⊗ x₀ + (L_t ⊗ I) ε``,
the marginal of z_t is the mixture of ``N(a ⊗ μ_j, (a aᵀ) ⊗ Σ_j + Σ_t ⊗ I_d)``; its score is closed form
and the ε-prediction optimum is ``ε*(z, t) = -(L_t ⊗ I)ᵀ ∇ log p_t(z)``. Used by the tests (samplers
must reproduce the data law) and by ``benchmarks/sampler_accuracy.py``.

States are ``[B, k*d]`` tensors (components stacked, data index fastest), the same layout as the
channel stacking of :mod:`diffusers_psld.sde.blocks` with ``C = d`` and no spatial axes.
"""
from __future__ import annotations

import math

import torch

from .sde import RecipeSDE

__all__ = ["GaussianMixture"]


class GaussianMixture:
    """Mixture of Gaussians in ``d`` dimensions (float64).

    Args:
        weights: ``[J]`` positive, normalised internally.
        means: ``[J, d]``.
        covs: ``[J, d, d]`` symmetric positive definite.
    """

    def __init__(self, weights, means, covs):
        self.weights = torch.as_tensor(weights, dtype=torch.float64)
        self.weights = self.weights / self.weights.sum()
        self.means = torch.as_tensor(means, dtype=torch.float64)
        self.covs = torch.as_tensor(covs, dtype=torch.float64)
        self.d = self.means.shape[1]

    @classmethod
    def gaussian(cls, mean, cov):
        mean = torch.as_tensor(mean, dtype=torch.float64).reshape(1, -1)
        return cls([1.0], mean, torch.as_tensor(cov, dtype=torch.float64).reshape(1, mean.shape[1], mean.shape[1]))

    # ------------------------------------------------------------------ data law
    def mean(self) -> torch.Tensor:
        return (self.weights[:, None] * self.means).sum(0)

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        dev = self.means - mu
        return (self.weights[:, None, None] * (self.covs + dev[:, :, None] * dev[:, None, :])).sum(0)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        comp = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        chol = torch.linalg.cholesky(self.covs)
        noise = torch.randn(n, self.d, dtype=torch.float64, generator=generator)
        return self.means[comp] + torch.einsum("nij,nj->ni", chol[comp], noise)

    # ------------------------------------------------------------------ marginals under a recipe
    def marginal(self, sde: RecipeSDE, t: float):
        """Means ``[J, k*d]`` and covariances ``[J, k*d, k*d]`` of z_t, plus the HSM kernel."""
        kern = sde.hsm_kernel(float(t))
        a = kern.mean_coef
        eye = torch.eye(self.d, dtype=torch.float64)
        means = torch.einsum("i,jd->jid", a, self.means).reshape(len(self.weights), -1)
        covs = torch.stack([torch.kron(torch.outer(a, a), c) + torch.kron(kern.cov, eye) for c in self.covs])
        return means, covs, kern

    def score(self, sde: RecipeSDE, z: torch.Tensor, t: float) -> torch.Tensor:
        """∇_z log p_t(z) for states ``z`` ``[B, k*d]`` (float64)."""
        means, covs, _ = self.marginal(sde, t)
        z = z.to(torch.float64)
        chol = torch.linalg.cholesky(covs)  # [J, n, n]
        diff = z[None] - means[:, None]  # [J, B, n]
        sol = torch.cholesky_solve(diff.transpose(1, 2), chol).transpose(1, 2)  # C⁻¹(z - m)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logp = -0.5 * (diff * sol).sum(-1) - half_logdet[:, None] - 0.5 * z.shape[1] * math.log(2 * math.pi)
        resp = torch.softmax(logp + torch.log(self.weights)[:, None], dim=0)  # [J, B]
        return -(resp[:, :, None] * sol).sum(0)

    def eps(self, sde: RecipeSDE, z: torch.Tensor, t: float) -> torch.Tensor:
        """The exact ε-prediction ``-(L_t ⊗ I)ᵀ ∇ log p_t(z)``, in ``z``'s dtype."""
        s = self.score(sde, z, t)
        L = sde.hsm_kernel(float(t)).chol
        out = -torch.einsum("ji,bjn->bin", L, s.reshape(s.shape[0], sde.k, -1)).reshape(s.shape)
        return out.to(z.dtype)
