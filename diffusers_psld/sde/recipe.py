r"""The complete recipe for linear diffusions (PSLD paper, Sec. 3, Eq. 6-7), in float64.

Notation (paper → code):

==================  =======================  ================================================
symbol              name                     meaning
==================  =======================  ================================================
z = [x; m]          ``z``                    stacked state, k components (x = data)
D                   ``D``                    k×k symmetric PSD dissipation (per unit β)
Q                   ``Q``                    k×k skew-symmetric conservative coupling
H = ½ zᵀ A z        ``A`` = diag(1/masses)    Hamiltonian; prior N(0, A⁻¹) = N(0, diag(masses))
β(t)                ``beta(t)``              linear β_min → β_max on t ∈ [0, 1]
B(s, t) = ∫β        ``beta_integral``        β-integral; kernels depend on t only through it
F = -(D+Q)A         ``F``                    drift matrix:  dz = β F z dt + sqrt(2βD) dw
Φ, Σ                ``transition``           forward transition matrix and noise covariance
κ                   ``kappa``                HSM initial auxiliary variance factor: m₀ ~ N(0, κ·M)
L_t                 ``hsm_kernel(t).chol``   lower Cholesky factor of the HSM covariance
==================  =======================  ================================================

The recipe guarantees that N(0, A⁻¹) is stationary for any PSD D and skew Q because
``F A⁻¹ + A⁻¹ Fᵀ + 2D = -(D+Q) - (D+Q)ᵀ + 2D = 0`` (tested as the Lyapunov residual).

Presets (one code path, only the matrices differ):

* ``vp``:   k = 1, D = ½, Q = 0, masses = (1,); linear β 0.1 → 20. Drift -½βx, diffusion √β.
* ``psld``: k = 2, D = ½ diag(Γ, Mν), Q = ½ [[0, -1], [1, 0]], masses = (1, M) with critical
  damping M⁻¹ = (ν - Γ)²/4 unless given; constant β = 8. Reproduces paper Eq. 7.
* ``cld``:  ``psld`` with Γ = 0 (the paper's mapping: ν̄ = Mν, β̄ = β/2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from . import kernels

__all__ = ["RecipeSDE", "HSMKernel"]


def _as_float64(value, name: str, what: str) -> torch.Tensor:
    """``value`` as a float64 tensor: numbers only (a string, bytes or bool is refused, not coerced)."""
    if isinstance(value, (str, bytes)):
        raise ValueError(f"`{name}` must be {what}, got the string {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool or value.is_complex():
            raise ValueError(f"`{name}` must be {what} (real, not {value.dtype}), got {value!r}")
        return value.detach().to("cpu", torch.float64)
    try:
        arr = np.asarray(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be {what}, got {value!r}") from err
    if arr.dtype.kind not in "iuf":  # bool, complex, strings, objects (ragged lists)
        raise ValueError(f"`{name}` must be {what}, got {value!r}")
    return torch.as_tensor(arr, dtype=torch.float64)


def _as_matrix(value, name: str) -> torch.Tensor:
    m = _as_float64(value, name, "a square matrix of numbers")
    if m.ndim == 0:
        m = m.reshape(1, 1)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise ValueError(f"`{name}` must be a square k×k matrix, got shape {tuple(m.shape)}")
    if not torch.all(torch.isfinite(m)):
        raise ValueError(f"`{name}` must be finite, got {m.tolist()}")
    return m.clone()


def _check_scalar(value, name: str, low: float = 0.0, strict: bool = False) -> float:
    if isinstance(value, (str, bytes, bool, np.bool_)) or (isinstance(value, torch.Tensor) and value.dtype == torch.bool):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise ValueError(f"`{name}` must be a real number, got {value!r}") from err
    if math.isnan(v) or math.isinf(v) or (v <= low if strict else v < low):
        rng = f"> {low}" if strict else f">= {low}"
        raise ValueError(f"`{name}` must be finite and {rng}, got {value!r}")
    return v


@dataclass(frozen=True)
class HSMKernel:
    """p(z_t | x_0) with the auxiliary components marginalised (m₀ ~ N(0, κ·masses)).

    ``z_t = mean_coef · x_0 + L ε``: ``mean_coef`` ``[..., k]`` multiplies the data, ``cov``/``chol``
    are ``[..., k, k]``.
    """

    mean_coef: torch.Tensor
    cov: torch.Tensor
    chol: torch.Tensor

    def inv_chol_t(self) -> torch.Tensor:
        """``L^{-T}``: score = -L^{-T} ε."""
        return kernels.lower_inverse_transpose(self.chol)


class RecipeSDE:
    """A diffusion from the complete recipe: ``dz = -β(t)(D+Q)∇H dt + sqrt(2β(t)D) dw``.

    Args:
        D: k×k symmetric positive semi-definite matrix.
        Q: k×k skew-symmetric matrix.
        masses: k positive numbers; the prior is N(0, diag(masses)) per coordinate.
        beta_min, beta_max: linear β(t) = β_min + t (β_max - β_min), 0 < β_min <= β_max.
        kappa: HSM initial auxiliary variance factor (m₀ ~ N(0, κ·mass)), >= 0.
    """

    def __init__(self, D, Q, masses, beta_min: float, beta_max: float, kappa: float = 0.0):
        D = _as_matrix(D, "D")
        Q = _as_matrix(Q, "Q")
        masses = _as_float64(masses, "masses", "k positive numbers").reshape(-1)
        k = D.shape[0]
        if k == 0:
            raise ValueError("`D` must be a k×k matrix with k >= 1 (the number of stacked components), got an empty matrix")
        if Q.shape != D.shape or masses.numel() != k:
            raise ValueError(
                f"dimension mismatch: D is {tuple(D.shape)}, Q is {tuple(Q.shape)} and masses has "
                f"{masses.numel()} entries; all must describe the same k"
            )
        if not torch.allclose(D, D.T, atol=1e-12):
            raise ValueError(f"`D` must be symmetric, got {D.tolist()}")
        eig_min = torch.linalg.eigvalsh(D).min().item()
        if eig_min < -1e-12:
            raise ValueError(f"`D` must be positive semi-definite, smallest eigenvalue {eig_min:.3e}")
        if not torch.allclose(Q, -Q.T, atol=1e-12):
            raise ValueError(f"`Q` must be skew-symmetric (Q = -Qᵀ), got {Q.tolist()}")
        if not torch.all(torch.isfinite(masses)) or torch.any(masses <= 0):
            raise ValueError(f"`masses` must be finite and > 0, got {masses.tolist()}")
        self.beta_min = _check_scalar(beta_min, "beta_min", 0.0, strict=True)
        self.beta_max = _check_scalar(beta_max, "beta_max", 0.0, strict=True)
        if self.beta_max < self.beta_min:
            raise ValueError(f"`beta_max` ({beta_max}) must be >= `beta_min` ({beta_min})")
        self.kappa = _check_scalar(kappa, "kappa", 0.0)
        self.k = k
        self.D, self.Q, self.masses = D, Q, masses
        self.A = torch.diag(1.0 / masses)
        self.prior_cov = torch.diag(masses)
        self.F = -(D + Q) @ self.A
        init = masses * self.kappa
        init[0] = 0.0
        self.init_cov = torch.diag(init)  # HSM: x₀ given, auxiliaries ~ N(0, κ·mass)
        if k > 1 and self.kappa == 0.0:
            raise ValueError("`kappa` must be > 0 for augmented diffusions (k > 1): the HSM kernel "
                             "needs a non-degenerate initial momentum")
        self._check_representable()

    def _check_representable(self) -> None:
        """Every finite parameter set is not a usable one: refuse those whose float64 matrices or transition
        kernel at t = 1 (the largest β-integral) are not finite, naming the parameters."""
        probe = (self.A, self.F, self.init_cov)
        try:
            ok = all(bool(torch.isfinite(m).all()) for m in probe)
            if ok:
                kern = self.hsm_kernel(1.0)
                ok = all(bool(torch.isfinite(m).all()) for m in (kern.mean_coef, kern.cov, kern.chol))
        except (ValueError, RuntimeError, OverflowError):  # a non-finite / non-PSD covariance in the kernel
            ok = False
        if not ok:
            raise ValueError(
                f"the diffusion's parameters overflow float64 (D={self.D.tolist()}, masses={self.masses.tolist()}, "
                f"beta=[{self.beta_min}, {self.beta_max}], kappa={self.kappa}): the drift or the transition kernel at "
                "t = 1 is not finite; use parameters of a usable magnitude (the presets: gamma ~ 0.01, nu ~ 4, beta <= 20)")

    # ---------------------------------------------------------------- presets
    @classmethod
    def vp(cls, beta_min: float = 0.1, beta_max: float = 20.0) -> "RecipeSDE":
        """VP-SDE (Song et al.): k = 1, drift -½β x, diffusion √β."""
        return cls(D=[[0.5]], Q=[[0.0]], masses=[1.0], beta_min=beta_min, beta_max=beta_max)

    @classmethod
    def psld(cls, gamma: float = 0.01, nu: float = 4.01, beta_min: float = 8.0, beta_max: float = 8.0,
             kappa: float = 0.04, m_inv: float | None = None) -> "RecipeSDE":
        """PSLD (paper Eq. 6-7). ``m_inv=None`` applies critical damping M⁻¹ = (ν - Γ)²/4."""
        gamma = _check_scalar(gamma, "gamma")
        nu = _check_scalar(nu, "nu")
        if m_inv is None:
            m_inv = (nu - gamma) / 2.0 * ((nu - gamma) / 2.0)  # no OverflowError: float products overflow to inf
            if m_inv <= 0:
                raise ValueError(f"critical damping M⁻¹ = (ν - Γ)²/4 needs `nu` != `gamma` (and (ν - Γ)² > 0 in float64), "
                                 f"got gamma={gamma}, nu={nu}")
        m_inv = _check_scalar(m_inv, "m_inv", 0.0, strict=True) if math.isfinite(m_inv) else m_inv
        mass = 1.0 / m_inv
        d_m = 0.5 * mass * nu
        if not (math.isfinite(m_inv) and math.isfinite(mass) and mass > 0 and math.isfinite(d_m)):
            raise ValueError(f"`gamma`={gamma!r}, `nu`={nu!r}, `m_inv`={m_inv!r} overflow float64: M⁻¹ = (ν - Γ)²/4 (critical "
                             "damping), M = 1/M⁻¹ and M ν must be finite and > 0; the presets use gamma ~ 0.01, nu ~ 4")
        return cls(D=[[0.5 * gamma, 0.0], [0.0, d_m]], Q=[[0.0, -0.5], [0.5, 0.0]],
                   masses=[1.0, mass], beta_min=beta_min, beta_max=beta_max, kappa=kappa)

    @classmethod
    def cld(cls, nu: float = 4.0, beta_min: float = 8.0, beta_max: float = 8.0, kappa: float = 0.04,
            m_inv: float | None = None) -> "RecipeSDE":
        """CLD (Dockhorn et al.) in PSLD units: ``psld`` with Γ = 0."""
        return cls.psld(gamma=0.0, nu=nu, beta_min=beta_min, beta_max=beta_max, kappa=kappa, m_inv=m_inv)

    # ---------------------------------------------------------------- schedule
    def beta(self, t) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64)
        return self.beta_min + t * (self.beta_max - self.beta_min)

    def beta_integral(self, t, s=0.0) -> torch.Tensor:
        """B(s, t) = ∫_s^t β(u) du (exact for the linear schedule)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        s = torch.as_tensor(s, dtype=torch.float64)
        big_b = lambda u: self.beta_min * u + 0.5 * u * u * (self.beta_max - self.beta_min)  # noqa: E731
        return big_b(t) - big_b(s)

    # ---------------------------------------------------------------- derived quantities
    def lyapunov_residual(self) -> float:
        """``max |F A⁻¹ + A⁻¹ Fᵀ + 2D|``: zero iff the prior N(0, A⁻¹) is stationary."""
        r = self.F @ self.prior_cov + self.prior_cov @ self.F.T + 2 * self.D
        return r.abs().max().item()

    def diffusion(self, t) -> torch.Tensor:
        """G(t) with G Gᵀ = 2β(t) D, ``[..., k, k]`` (lower triangular)."""
        beta = self.beta(t)[..., None, None]
        return kernels.psd_cholesky(2.0 * beta * self.D.expand(*beta.shape[:-2], self.k, self.k), "2βD")

    def drift_matrix(self, t) -> torch.Tensor:
        """β(t) F: the forward drift is ``drift_matrix(t) @ z``."""
        return self.beta(t)[..., None, None] * self.F

    def reverse_drift_matrices(self, t, probability_flow: bool = False):
        """Forward-time drift of the reverse SDE / PF-ODE as ``(P, S)``: ``f̄ = P z + S score``.

        Reverse SDE: ``f - G Gᵀ ∇log p``; probability flow: ``f - ½ G Gᵀ ∇log p`` (paper Eq. 11).
        """
        beta = self.beta(t)[..., None, None]
        weight = 1.0 if probability_flow else 2.0
        return beta * self.F, -weight * beta * self.D

    def transition(self, s, t):
        """Φ, Σ of p(z_t | z_s) for forward times s <= t (batched)."""
        b = self.beta_integral(t, s)
        return kernels.transition(self.F, self.D, self.prior_cov, b)

    def hsm_kernel(self, t) -> HSMKernel:
        """p(z_t | x₀) with auxiliary components marginalised (paper Sec. 3.2, Eq. 10)."""
        phi, sigma = kernels.transition(self.F, self.D, self.prior_cov, self.beta_integral(t))
        cov = phi @ self.init_cov @ phi.transpose(-1, -2) + sigma
        cov = 0.5 * (cov + cov.transpose(-1, -2))
        return HSMKernel(mean_coef=phi[..., :, 0], cov=cov, chol=kernels.psd_cholesky(cov, "HSM covariance"))

    def eps_mask(self) -> torch.Tensor:
        """Which ε components reach the reverse dynamics (through ``D L⁻ᵀ``).

        VP and PSLD use all components; CLD (Γ = 0) uses only ε_m, so its loss ignores ε_x.
        """
        linvt = self.hsm_kernel(0.5).inv_chol_t()
        return (self.D @ linvt).abs().amax(dim=0) > 0

    def __repr__(self) -> str:
        return (f"RecipeSDE(k={self.k}, D={self.D.tolist()}, Q={self.Q.tolist()}, masses={self.masses.tolist()}, "
                f"beta=[{self.beta_min}, {self.beta_max}], kappa={self.kappa})")
