r"""Reverse-time steps of the recipe SDE as affine maps, built once per time grid in float64.

With ε-prediction the score is ``s = -L_t^{-T} ε`` (HSM kernel factor), so every step used here is

    z' = P z + R ε + S ξ,       ξ ~ N(0, I),

with k×k matrices P, R, S acting as ``M ⊗ I_d`` (see :mod:`diffusers_psld.sde.blocks`). Builders take
forward times ``t`` (start) and ``t_next < t`` — floats or 1-D float64 tensors, so a whole grid is
built in one vectorised call — and return ``(P, R, S)`` of shape ``[..., k, k]`` (S is ``None`` for
deterministic steps). Heun's two-stage step is written with :func:`pf_drift` pieces.

* :func:`em_step` — Euler–Maruyama on the reverse SDE (PSLD paper Eq. 11).
* :func:`pf_euler_step` — Euler on the probability-flow ODE (drift ``f - ½ G Gᵀ s``).
* :func:`sscs_linear` and :func:`sscs_score_step` — modified SSCS (paper Eq. 12): exact linear half-step ``A``, Euler step of
  the score part ``S``, exact half-step ``A``. Splitting the reverse drift as
  ``-βFz + 2βD s = β(Q - D)A z + 2βD(s + Az)`` shows that the linear part is the recipe SDE with
  ``Q → -Q`` (paper Eq. 12's ``A``), whose kernel the recipe already computes exactly and whose
  stationary law is the same prior N(0, A⁻¹).
* :func:`eps_projection` — the consistent part of a network's ε (``project_eps`` of the schedulers).
* :func:`tweedie_step` — the jump to the posterior mean E[z₀ | z_t] (``final_step="tweedie"``), built from
  :func:`posterior_mean_maps`.
"""
from __future__ import annotations

import torch

from .sde import RecipeSDE
from .sde.kernels import psd_cholesky, transition

__all__ = ["em_step", "eps_projection", "check_eps_projection", "pf_euler_step", "pf_drift", "sscs_linear", "sscs_score_step",
           "posterior_mean_maps", "tweedie_step"]


def _eye(sde: RecipeSDE) -> torch.Tensor:
    return torch.eye(sde.k, dtype=torch.float64)


def _col(x) -> torch.Tensor:
    """A float or ``[n]`` tensor as ``[..., 1, 1]`` for broadcasting against k×k matrices."""
    return torch.as_tensor(x, dtype=torch.float64)[..., None, None]


def _score_matrix(sde: RecipeSDE, t) -> torch.Tensor:
    """``-L_t^{-T}``: multiplies ε to give the score at forward time ``t``."""
    return -sde.hsm_kernel(t).inv_chol_t()


def eps_projection(mean_coef: torch.Tensor, chol: torch.Tensor):
    r"""``(M_z, M_ε)`` with ``ε' = M_z z + M_ε ε``: the ε that is consistent with the network's own x̂₀.

    For the exact ε = E[ε | z_t], ``z - L ε = a E[x₀ | z_t]`` lies along the mean coefficient a (per
    pixel). A learned ε of a k = 2 model has two numbers per pixel and need not satisfy this; the
    projection keeps only what the data explain::

        x̂₀ = aᵀ(z - L ε) / aᵀa,        ε' = L⁻¹(z - a x̂₀),

    so ``M_z = L⁻¹(I - a wᵀ)`` and ``M_ε = L⁻¹ a wᵀ L`` with ``w = a / aᵀa``. It is idempotent, keeps
    x̂₀, and is the identity on the exact ε and for k = 1 (VP). The score it implies,
    ``-L⁻ᵀε' = -Σ⁻¹(z - a x̂₀)``, is the data-prediction form gDDIM integrates.

    Args:
        mean_coef: a ``[..., k]`` (float64), e.g. ``sde.hsm_kernel(t).mean_coef``.
        chol: L ``[..., k, k]`` (lower triangular), e.g. ``sde.hsm_kernel(t).chol``.
    """
    a = torch.as_tensor(mean_coef, dtype=torch.float64)
    L = torch.as_tensor(chol, dtype=torch.float64)
    w = a / (a * a).sum(-1, keepdim=True)
    aw = a[..., :, None] * w[..., None, :]  # a wᵀ
    eye = torch.eye(a.shape[-1], dtype=torch.float64)
    Mz = torch.linalg.solve_triangular(L, eye - aw, upper=False)
    Me = torch.linalg.solve_triangular(L, aw @ L, upper=False)
    return Mz, Me


def check_eps_projection(sde: RecipeSDE) -> None:
    """Raise unless :func:`eps_projection` applies: it uses every ε component, so each must reach the reverse
    dynamics (:meth:`RecipeSDE.eps_mask`; fails for CLD, whose network does not learn ε_x)."""
    if not bool(sde.eps_mask().all()):
        raise ValueError("`project_eps=True` needs gamma > 0: the projection uses ε_x, which a CLD (gamma = 0) network "
                         "does not learn (CLD's reverse dynamics only use ε_m, so there is nothing to make consistent)")


def pf_drift(sde: RecipeSDE, t):
    """Probability-flow drift as ``(P, R)``: ``dz/dt = P z + R ε`` (forward time)."""
    drift, score_w = sde.reverse_drift_matrices(t, probability_flow=True)
    return drift, score_w @ _score_matrix(sde, t)


def em_step(sde: RecipeSDE, t: float, t_next: float, noise: bool = True):
    """Euler–Maruyama step of the reverse SDE from ``t`` to ``t_next`` (paper Eq. 11).

    ``noise=False`` gives the mean of the step (used for the final denoising step).
    """
    h = _col(torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(t_next, dtype=torch.float64))
    drift, score_w = sde.reverse_drift_matrices(t)
    P = _eye(sde) - h * drift
    R = -h * score_w @ _score_matrix(sde, t)
    S = sde.diffusion(t) * h.sqrt() if noise else None
    return P, R, S


def pf_euler_step(sde: RecipeSDE, t: float, t_next: float):
    """Euler step of the probability-flow ODE from ``t`` to ``t_next``."""
    h = _col(torch.as_tensor(t, dtype=torch.float64) - torch.as_tensor(t_next, dtype=torch.float64))
    P, R = pf_drift(sde, t)
    return _eye(sde) - h * P, -h * R, None


def sscs_linear(sde: RecipeSDE, t_from, t_to):
    """Exact transition of the SSCS linear part ``A`` from forward time ``t_from`` down to ``t_to``.

    ``A`` is the recipe SDE with ``Q → -Q`` run over the β-integral ``B(t_to, t_from)``.
    Returns ``(Φ, L)`` with ``z' = Φ z + L ξ``.
    """
    b = sde.beta_integral(t_from, t_to)
    f_linear = -(sde.D - sde.Q) @ sde.A
    phi, sigma = transition(f_linear, sde.D, sde.prior_cov, b)
    return phi, psd_cholesky(sigma, "SSCS half-step covariance")


def sscs_score_step(sde: RecipeSDE, h: float, t_eval: float):
    """Euler step of the SSCS score part ``S``: ``z += h·2β D (s + A z)``, s at ``t_eval``."""
    w = 2.0 * _col(h) * _col(sde.beta(t_eval)) * sde.D
    return _eye(sde) + w @ sde.A, w @ _score_matrix(sde, t_eval)


def posterior_mean_maps(sde: RecipeSDE, t):
    r"""``(G, c)`` with ``E[z₀ | z_t] = G z_t + c x̂₀`` when x̂₀ = E[x₀ | z_t] (shapes ``[..., k, k]`` and ``[..., k]``).

    Given x₀, z₀ = (x₀, m₀) with auxiliaries m₀ ~ N(0, C₀) (C₀ = ``sde.init_cov``, zero x-row: κM for PSLD) and
    z_t = Φ_t z₀ + ξ with Φ_t = exp(F B(t)), so ``E[z₀ | x₀, z_t] = e_x x₀ + C₀ Φ_tᵀ Σ_t⁻¹ (z_t - a_t x₀)`` (Gaussian
    conditioning; Σ_t = Φ_t C₀ Φ_tᵀ + Σ(0, t) is the HSM covariance, a_t = Φ_t e_x). It is affine in x₀, so the tower
    rule gives E[z₀ | z_t] with x₀ replaced by E[x₀ | z_t]: ``G = C₀ Φ_tᵀ Σ_t⁻¹``, ``c = e_x - G a_t``. For VP
    (C₀ = 0) it is x̂₀ itself.
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    kern = sde.hsm_kernel(t)
    phi, _ = sde.transition(0.0, t)
    G = torch.linalg.solve(kern.cov, phi @ sde.init_cov).transpose(-1, -2)  # (Σ⁻¹ Φ C₀)ᵀ = C₀ Φᵀ Σ⁻¹
    e_x = torch.zeros(sde.k, dtype=torch.float64)
    e_x[0] = 1.0
    return G, e_x - (G @ kern.mean_coef[..., None])[..., 0]


def tweedie_step(sde: RecipeSDE, t):
    r"""The jump from forward time ``t`` to t = 0 onto the posterior mean, as ``(P, R)``: ``z' = P z + R ε``.

    With the package's x̂₀ = aᵀ(z - Lε)/aᵀa (the schedulers' ``pred_original_sample``, = E[x₀ | z_t] for the exact ε),
    ``z' = G z + c x̂₀`` (:func:`posterior_mean_maps`): the x half of z' is x̂₀ itself (diffusers'
    ``final_sigmas_type="zero"``, DDIM's last step), the auxiliary half its posterior mean. Exact in law of the
    mean: for the exact ε, z' = E[z₀ | z_t].
    """
    t = torch.as_tensor(t, dtype=torch.float64)
    G, c = posterior_mean_maps(sde, t)
    kern = sde.hsm_kernel(t)
    a = kern.mean_coef
    w = a / (a * a).sum(-1, keepdim=True)
    cw = c[..., :, None] * w[..., None, :]  # c wᵀ
    return G + cw, -cw @ kern.chol
