"""Exact moment propagation of a scheduler's step tables for Gaussian data with the exact ε.

For data x₀ ~ N(μ, Σ_x) (d dims) the marginal of z_t is N(a ⊗ μ, (a aᵀ) ⊗ Σ_x + Σ_t ⊗ I) and the optimal
ε-prediction is affine, ``ε(z) = (L_t ⊗ I)ᵀ C_t⁻¹ (z - m_t)``; every step of the tables is then an affine
map with Gaussian noise, so the law of the sampler's output is computed exactly, without Monte Carlo.
Independent of :mod:`diffusers_psld.exact` (built from ``RecipeSDE.hsm_kernel`` directly).
"""
import torch

from diffusers_psld.schedulers.scheduling_psld import _AFFINE, _HEUN_PRED


def exact_eps_affine(sde, mu, cov_x, times):
    """Lists of (K, c) with ε(z) = K z + c at each forward time in ``times``."""
    d = mu.numel()
    kern = sde.hsm_kernel(torch.as_tensor(times, dtype=torch.float64))
    eye = torch.eye(d, dtype=torch.float64)
    out = []
    for a, cov_t, chol in zip(kern.mean_coef, kern.cov, kern.chol):
        m = torch.kron(a, mu)
        C = torch.kron(torch.outer(a, a), cov_x) + torch.kron(cov_t, eye)
        K = torch.linalg.solve(C, torch.kron(chol, eye)).T  # Lᵀ C⁻¹ (C symmetric)
        out.append((K, -K @ m))
    return out


def propagate(scheduler, mu, cov_x, start_mean=None, start_cov=None):
    """Mean and covariance of the state after all calls, starting from the prior (or a given law)."""
    sde, tab = scheduler.sde, scheduler._tables
    d = mu.numel()
    eye_d = torch.eye(d, dtype=torch.float64)
    big = lambda m: torch.kron(m, eye_d)  # noqa: E731
    mean = torch.zeros(sde.k * d, dtype=torch.float64) if start_mean is None else start_mean
    cov = big(sde.prior_cov) if start_cov is None else start_cov
    pending = None
    affine = exact_eps_affine(sde, mu, cov_x, tab.eval_times)
    for i, kind in enumerate(tab.kinds):
        K, c = affine[i]
        P, R = big(tab.P[i]), big(tab.R[i])
        slope_A, slope_b = P + R @ K, R @ c  # P z + R ε(z)  (Heun: the slope)
        if kind == _AFFINE:
            mean = slope_A @ mean + slope_b
            cov = slope_A @ cov @ slope_A.T
            if tab.noisy[i]:
                S = big(tab.S[i])
                cov = cov + S @ S.T
        elif kind == _HEUN_PRED:
            h = tab.h[i]
            pending = (slope_A, slope_b, h)
            # z̃ = z - h (A1 z + b1); keep the map from z (the interval start) for the corrector
            pending_map = (torch.eye(len(mean), dtype=torch.float64) - h * slope_A, -h * slope_b)
        else:
            A1, b1, h = pending
            M1, c1 = pending_map
            # z' = z - h/2 (A1 z + b1 + A2 (M1 z + c1) + b2)
            lin = torch.eye(len(mean), dtype=torch.float64) - 0.5 * h * (A1 + slope_A @ M1)
            off = -0.5 * h * (b1 + slope_A @ c1 + slope_b)
            mean, cov = lin @ mean + off, lin @ cov @ lin.T
        cov = 0.5 * (cov + cov.T)
    return mean[:d], cov[:d, :d], mean, cov
