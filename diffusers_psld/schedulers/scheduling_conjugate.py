r"""``ConjugateScheduler``: conjugate integrators and λ-DDIM (Pandey, Rudolph & Mandt, "Efficient
Integrators for Diffusion Generative Models", ICLR 2024, arXiv 2310.07894, Sec. 3) for the recipe
diffusions (PSLD, CLD, VP) with ε-prediction, behind the Diffusers scheduler API.

Derivation (re-derived here; the paper body was not available, see
``/work/shared/notes/integrators_reference.md`` §2). Forward time t, probability-flow ODE with the
ε-parameterised score ``s = -L_t^{-T} ε`` (C_skip = 0, C_out = -L_t^{-T}, the HSM Cholesky factor):

    dz/dt = β_t F z + β_t D L_t^{-T} ε(z, t).

For a chosen k×k matrix B_t let ``dA_t/dt = A_t (B_t - β_t F)``, A_0 = I. Then ẑ = A_t z obeys
``dẑ/dt = A_t B_t A_t^{-1} ẑ + Φ̇_t ε`` with ``Φ̇_t = A_t β_t D L_t^{-T}`` (direct differentiation).
One Euler step of the B-term with ε frozen at ε_i and its weight integrated exactly, from t_i down
to t_{i+1} = t_i - h, mapped back with A_{t_{i+1}}^{-1}, is

    z_{i+1} = P_i z_i + Q_i ε_i,
    P_i = V_i(t_i) (I - h B_{t_i}),      Q_i = -∫_{t_{i+1}}^{t_i} V_i(s) β_s D L_s^{-T} ds,

where ``V_i(s) = A_{t_{i+1}}^{-1} A_s`` solves ``dV/ds = V (B_s - β_s F)``, V(t_{i+1}) = I. Only these
relative factors appear, so A_t itself (entries ~e^8 for PSLD) is never formed.

* V in closed form: ``expm((s - a)(B - βF))`` for constant β; ``e^{λ(s-a)} expm(-F ∫_a^s β)`` when B
  commutes with F (B = λI, or k = 1); otherwise a DOP853 solve (rtol 1e-12) of the matrix ODE.
* Q by composite Gauss–Legendre quadrature after the substitution s = u² (``L_s^{-T}`` behaves like
  s^{-1/2} near 0 for PSLD, which makes the integrand smooth in u and lets the last step reach t = 0),
  ``quadrature_nodes`` nodes per piece, pieces geometric in u with u_hi/u_lo <= 2 (a single wide first
  interval [sampling_eps, 1] otherwise limits the accuracy to ~1e-8); every node of every interval is
  evaluated in one batched float64 call. The tests check the quadrature
  against an adaptive ODE solve of a constant-ε manufactured solution.

Choices of B (``conjugate_b``):

* ``"zero"``: B = 0, the zeroth-order exponential integrator (DEIS-type; paper Prop. 2). For VP it is
  exactly DDIM (η = 0) (paper Prop. 1): P_i = α_{i+1}/α_i, Q_i = σ_{i+1} - α_{i+1}σ_i/α_i (tested).
* ``"identity"``: λ-DDIM with B = λ I ("λ-DDIM-I"); ``P_i = e^{λh}(1 - λh) Ψ(t_{i+1}, t_i)``.
* ``"ones"``: λ-DDIM with B = λ 𝟏 (all-ones k×k matrix, couples x and m; "λ-DDIM-II").

With λ = 0 every choice reduces to ``"zero"`` (tested). The final (N-th) call integrates the same
conjugate step from ``sampling_eps`` down to t = 0. ``num_inference_steps`` is the exact NFE: N - 1
conjugate steps on a uniform or quadratic grid plus the final step.

ε basis (``eps_basis``): which re-expression of the network output the step freezes over an interval.

* ``"cholesky"``: ε itself, i.e. C_out = -L_t^{-T} (the checkpoints' native parameterisation).
* ``"gddim"``: gDDIM's (Zhang, Tao & Chen, ICLR 2023) ε_R = R_t^{-1} L_t ε with C_out = -R_t^{-T}, where
  ``dR/dt = β(F + D Σ_t^{-1}) R`` and ``R Rᵀ = Σ_t`` (the ODE preserves R Rᵀ = Σ because
  dΣ/dt = βFΣ + βΣFᵀ + 2βD). Since R Rᵀ = L Lᵀ, R_t = L_t O_t with O_t orthogonal: ε_R is a rotation of ε
  and the same network output is used, no retraining. For point-mass data the exact ε_R is constant
  along the exact PF-ODE (z_t - a_t x₀ = R_t ε_R and d(R_t ε_R)/dt = β(F + DΣ⁻¹)R_t ε_R is the
  PF-ODE drift minus β F a_t x₀), so every B = 0 step is exact for any N (tested; the Cholesky basis is
  not, which is why it fails at low NFE). Only the transition ``Ψ(s, t) = R_s R_t^{-1}`` of the matrix
  ODE ``dK/dτ = β_τ(F + D Σ_τ^{-1}) K`` is needed; it does not depend on R's initial value. For k = 2
  the orthogonal factor is a rotation by θ_t, and differentiating R = L O gives
  ``O' Oᵀ = L^{-1} β(F + DΣ^{-1}) L - L^{-1} L'``; the last term is lower triangular, so
  ``θ'(t) = -[L^{-1} β(F L + D L^{-T})]_{01}`` (no derivative of L needed), and
  ``Ψ(s, t) = L_s Rot(θ_s - θ_t) L_t^{-1}``. θ' ~ t^{-1/2} near 0 for Γ > 0 (integrable; the quadrature
  runs in u = √t), so Ψ(0, t) exists: its x-row is 0 (Σ_0 has zero x-variance). For Γ = 0 (CLD) the
  rotated basis mixes ε_x into every step, and a CLD network does not learn ε_x (masked in the loss), so
  the gDDIM basis is refused for CLD. VP: k = 1,
  Ψ = σ_s/σ_t. With C_out = -R^{-T} the ε-weight of a step becomes
  ``Q_i = -∫ V_i(s) β_s D L_s^{-T} Rot(θ_s - θ_{t_i}) ds`` (R_s^{-T} R_{t_i}ᵀ L_{t_i}^{-T} = L_s^{-T} O_s O_{t_i}ᵀ).
  Tests: Ψ against a DOP853 solve of the matrix ODE and R Rᵀ = Σ; B = 0 equals the data-prediction form
  ``z_s = a_s x̂₀ + Ψ(s, t)(z_t - a_t x̂₀)`` (exact ε); Dirac data exact for any N; VP equals DDIM.
"""
from __future__ import annotations

from typing import List, Literal, Optional

import numpy as np
import scipy.integrate
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (name needed by diffusers' loader)

from ..sde import RecipeSDE, kernels
from .scheduling_psld import _AFFINE, PSLDScheduler
from .validation import check_quadrature_nodes, check_real

__all__ = ["ConjugateScheduler", "CONJUGATE_B", "EPS_BASES", "conjugate_coefficients", "gauss_legendre_sqrt",
           "gddim_angle", "gddim_transition"]

CONJUGATE_B = ("zero", "identity", "ones")
EPS_BASES = ("cholesky", "gddim")
_GL_NODES = 24
_PIECE_RATIO = 2.0  # composite quadrature: u_hi/u_lo <= 2 per piece (u = √t)


# ---------------------------------------------------------------------------------------------- helpers
#: the λ-part of a conjugate step multiplies by f(x) = e^x (1 - x), x = λ·μ·h (μ an eigenvalue of B/λ); |f(x)| <= 1
#: iff x <= 1 + W(1/e) = 1.2785 (f decreases from f(0) = 1 and reaches -1 there; x < 0 is always stable)
STABLE_LAMBDA_H = 1.2784645427610738
#: largest accepted amplification Π max(1, |f(x_i)|) of the λ-parts over a run (beyond it the run blows up:
#: λ = 30 at 10 steps amplifies by ~1e32 and overflows float32)
MAX_CONJUGATE_GROWTH = 1e3


def check_conjugate_stability(lam: float, mu: float, steps, name: str = "conjugate_lambda", context: str = ""):
    """``ValueError`` naming ``name`` and a safe range when the λ-DDIM Euler factors e^x(1 - x), x = λ·μ·h over the
    step sizes ``steps``, amplify the state by more than ``MAX_CONJUGATE_GROWTH`` over a run."""
    h = np.asarray(steps, dtype=np.float64)
    x = lam * mu * h
    with np.errstate(over="ignore"):
        f = np.abs(np.exp(x) * (1.0 - x))
    growth = float(np.prod(np.maximum(1.0, f)))
    if not growth <= MAX_CONJUGATE_GROWTH:  # also catches inf / nan
        safe = STABLE_LAMBDA_H / (mu * float(h.max()))
        raise ValueError(
            f"`{name}`={lam} is unstable{context}: each step multiplies by e^x(1 - x) with x = λ·μ·h up to "
            f"{float(x.max()):.3g} (μ = {mu:g}, largest step h = {float(h.max()):.3g}), amplifying the state by "
            f"{growth:.3g} over the run (the samples overflow to NaN/inf). Use {name} <= {safe:.3g} (every step "
            f"stable: x <= {STABLE_LAMBDA_H:.4f}) or more inference steps."
        )


def expm_batch(M: np.ndarray) -> np.ndarray:
    """Matrix exponential of a batch ``[n, k, k]`` (NumPy front-end of :func:`diffusers_psld.sde.kernels.expm`)."""
    return kernels.expm(torch.from_numpy(np.asarray(M, dtype=np.float64))).numpy()


def gauss_legendre_sqrt(lo: np.ndarray, hi: np.ndarray, n: int = _GL_NODES, max_ratio: Optional[float] = None):
    """Nodes ``s [m, q]`` and weights ``w [m, q]`` for ∫_lo^hi f(s) ds with s = u² (ds = 2u du).

    With ``max_ratio`` every interval with lo > 0 is split into the same number p of pieces, geometric in u,
    so that u_hi/u_lo <= max_ratio per piece (composite rule, q = p·n); intervals from 0 are split evenly in u.
    """
    x, wx = np.polynomial.legendre.leggauss(n)
    ulo, uhi = np.sqrt(np.asarray(lo, dtype=np.float64)), np.sqrt(np.asarray(hi, dtype=np.float64))
    p = 1
    if max_ratio is not None:
        pos = ulo > 0
        if np.any(pos):
            p = max(1, int(np.ceil(np.log(np.max(uhi[pos] / ulo[pos])) / np.log(max_ratio) - 1e-12)))
    frac = np.arange(p + 1) / p
    geo = ulo[:, None] * (uhi[:, None] / np.where(ulo > 0, ulo, 1.0)[:, None]) ** frac[None]
    lin = ulo[:, None] + (uhi - ulo)[:, None] * frac[None]
    edges = np.where((ulo > 0)[:, None], geo, lin)  # [m, p + 1]
    a, b = edges[:, :-1, None], edges[:, 1:, None]
    u = 0.5 * (b - a) * x + 0.5 * (b + a)  # [m, p, n]
    w = 0.5 * (b - a) * wx * 2.0 * u
    m = len(ulo)
    return (u * u).reshape(m, p * n), w.reshape(m, p * n)


def _b_matrix(kind: str, lam: float, k: int) -> np.ndarray:
    if kind == "zero":
        return np.zeros((k, k))
    if kind == "identity":
        return lam * np.eye(k)
    if kind == "ones":
        return lam * np.ones((k, k))
    raise ValueError(f"`conjugate_b` must be one of {CONJUGATE_B}, got {kind!r}")


# ---------------------------------------------------------------------------------------------- gDDIM basis
# background grid in u = √t for the angle quadrature (consecutive u ratio ≈ 1.2; 8 Gauss–Legendre nodes each)
_ANGLE_BASE_T = np.geomspace(1e-4, 1.0, 49) ** 2
_ANGLE_NODES = 8


def gddim_angle_rate(sde: RecipeSDE, t) -> np.ndarray:
    """θ'(t) = -[L_t^{-1} β_t (F L_t + D L_t^{-T})]_{01} for ``t > 0`` (k = 2); see the module docstring."""
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64).reshape(-1))
    L = sde.hsm_kernel(tt).chol
    linvt = kernels.lower_inverse_transpose(L)
    inner = sde.F @ L + sde.D @ linvt
    M = torch.linalg.solve_triangular(L, inner, upper=False)
    return -(sde.beta(tt) * M[:, 0, 1]).numpy()


def gddim_angle(sde: RecipeSDE, times) -> np.ndarray:
    """θ(t) = ∫_0^t θ'(τ) dτ (float64) at ``times`` in [0, 1]: the rotation angle of gDDIM's R_t = L_t Rot(θ_t).

    Zeros for k = 1. Gauss–Legendre in u = √τ on the union of ``times`` and a fixed geometric background
    grid (the integrand θ'(u²)·2u is smooth in u: θ' ~ t^{-1/2} near 0), accumulated from 0.
    """
    t = np.asarray(times, dtype=np.float64).reshape(-1)
    if sde.k == 1:
        return np.zeros_like(t)
    if sde.k != 2:
        raise ValueError(f"the gDDIM basis is implemented for k <= 2, got k = {sde.k}")
    if np.any(t < 0) or np.any(t > 1) or not np.all(np.isfinite(t)):
        raise ValueError("times must lie in [0, 1]")
    pts = np.unique(np.concatenate([[0.0], t, _ANGLE_BASE_T]))
    s, w = gauss_legendre_sqrt(pts[:-1], pts[1:], _ANGLE_NODES)
    rate = gddim_angle_rate(sde, s.reshape(-1)).reshape(s.shape)
    cum = np.concatenate([[0.0], np.cumsum((w * rate).sum(1))])
    return cum[np.searchsorted(pts, t)]


def _rotation(theta: np.ndarray, k: int) -> np.ndarray:
    theta = np.asarray(theta, dtype=np.float64).reshape(-1)
    if k == 1:
        return np.ones((len(theta), 1, 1))
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def gddim_transition(sde: RecipeSDE, s, t) -> torch.Tensor:
    """Ψ(s, t) = R_s R_t^{-1} = L_s Rot(θ_s - θ_t) L_t^{-1} (``[n, k, k]`` float64) for times ``t > 0``, ``s >= 0``:
    the transition matrix of ``dK/dτ = β_τ (F + D Σ_τ^{-1}) K`` from τ = t to τ = s."""
    s = np.asarray(s, dtype=np.float64).reshape(-1)
    t = np.asarray(t, dtype=np.float64).reshape(-1)
    s, t = np.broadcast_arrays(s, t)
    th = gddim_angle(sde, np.concatenate([s, t]))
    rot = torch.from_numpy(_rotation(th[: len(s)] - th[len(s):], sde.k))
    Ls = sde.hsm_kernel(torch.from_numpy(s.copy())).chol
    Lt = sde.hsm_kernel(torch.from_numpy(t.copy())).chol
    eye = torch.eye(sde.k, dtype=torch.float64).expand_as(Lt)
    return Ls @ rot @ torch.linalg.solve_triangular(Lt, eye, upper=False)


def _relative_factor(sde: RecipeSDE, Bm: np.ndarray, a: float, s: np.ndarray) -> np.ndarray:
    """``V(s) = A_a^{-1} A_s`` for the nodes ``s`` (``[n]``) ≥ a: ``[n, k, k]`` float64."""
    F = sde.F.numpy()
    k = F.shape[0]
    s = np.asarray(s, dtype=np.float64)
    commutes = np.allclose(Bm @ F, F @ Bm, atol=1e-14)
    if commutes:
        b = sde.beta_integral(torch.from_numpy(s), a).numpy()  # ∫_a^s β
        lam_part = Bm[None] * (s - a)[:, None, None]
        return expm_batch(lam_part - F[None] * b[:, None, None])
    if sde.beta_min == sde.beta_max:
        return expm_batch((s - a)[:, None, None] * (Bm - sde.beta_min * F)[None])
    # generic: dV/ds = V (B - β_s F), V(a) = I, solved to tight tolerance
    def rhs(u, y):
        V = y.reshape(k, k)
        return (V @ (Bm - float(sde.beta(u)) * F)).reshape(-1)

    order = np.argsort(s)
    sol = scipy.integrate.solve_ivp(rhs, (a, float(s.max())), np.eye(k).reshape(-1), method="DOP853",
                                    t_eval=s[order], rtol=1e-12, atol=1e-14)
    out = np.empty((len(s), k, k))
    out[order] = sol.y.T.reshape(-1, k, k)
    return out


def conjugate_coefficients(sde: RecipeSDE, times, conjugate_b: str = "zero", lam: float = 0.0,
                           nodes: int = _GL_NODES, eps_basis: str = "cholesky"):
    """``(P, Q)`` (``[n, k, k]`` float64 tensors) of the conjugate step for each interval of the
    descending grid ``times`` (``t_0 > t_1 > ... > t_n >= 0``); ``Q`` multiplies the network's ε
    (for ``eps_basis="gddim"`` the rotation to ε_R at the interval start is folded in). See the module
    docstring."""
    if eps_basis not in EPS_BASES:
        raise ValueError(f"`eps_basis` must be one of {EPS_BASES}, got {eps_basis!r}")
    t = np.asarray(torch.as_tensor(times, dtype=torch.float64).tolist(), dtype=np.float64)
    k = sde.k
    Bm = _b_matrix(conjugate_b, lam, k)
    hi, lo = t[:-1], t[1:]
    s, w = gauss_legendre_sqrt(lo, hi, nodes, _PIECE_RATIO)  # [n, q]
    flat = torch.from_numpy(s.reshape(-1))
    linvt = sde.hsm_kernel(flat).inv_chol_t().numpy()  # [n*q, k, k]
    weight = sde.beta(flat).numpy()[:, None, None] * (sde.D.numpy()[None] @ linvt)  # β D L^{-T}
    q = s.shape[1]
    weight = weight.reshape(len(hi), q, k, k)
    if eps_basis == "gddim":  # β D L_s^{-T} Rot(θ_s - θ_{t_i})
        th = gddim_angle(sde, np.concatenate([s.reshape(-1), hi]))
        rel = th[: s.size].reshape(s.shape) - th[s.size:][:, None]
        weight = weight @ _rotation(rel.reshape(-1), k).reshape(len(hi), q, k, k)
    P, Q = [], []
    for i in range(len(hi)):
        V = _relative_factor(sde, Bm, lo[i], np.concatenate([s[i], [hi[i]]]))
        Q.append(-np.einsum("q,qij,qjk->ik", w[i], V[:-1], weight[i]))
        P.append(V[-1] @ (np.eye(k) - (hi[i] - lo[i]) * Bm))
    return torch.from_numpy(np.stack(P)), torch.from_numpy(np.stack(Q))


# ---------------------------------------------------------------------------------------------- scheduler
class ConjugateScheduler(PSLDScheduler):
    r"""Conjugate integrator / λ-DDIM sampler (arXiv 2310.07894, Sec. 3) for PSLD, CLD and VP.

    Deterministic; one model evaluation per step; ``num_inference_steps`` is the exact NFE (N - 1
    steps on [sampling_eps, 1] plus the final conjugate step from sampling_eps to 0). All shared
    arguments and defaults are those of :class:`PSLDScheduler`; in addition:

    Args:
        sampler (`str`, defaults to `"conjugate"`): must be `"conjugate"`.
        conjugate_b (`str`, defaults to `"ones"`): B_t = 0 (`"zero"`), λI (`"identity"`) or λ𝟏 (`"ones"`).
        conjugate_lambda (`float`, defaults to 0.0): λ (finite real). λ = 0 is the exponential integrator.
            ``set_timesteps`` refuses a λ whose Euler factors e^x(1 - x), x = λ·μ·h (μ = 1 for `"identity"`, k for
            `"ones"`), amplify the state by more than 10³ over the run (λ = 30 at 10 steps overflows);
            λ·μ·h <= 1.2785 on every step is always accepted.
        quadrature_nodes (`int`, defaults to 24): Gauss–Legendre nodes per quadrature piece (in u = √t), in [4, 64].
        eps_basis (`str`, defaults to `"cholesky"`): the ε frozen over a step: the network's ε
            (`"cholesky"`, C_out = -L_t^{-T}) or gDDIM's rotated ε_R (`"gddim"`, C_out = -R_t^{-T}; exact
            for point-mass data, needs gamma > 0 or VP). See the module docstring.
    """

    @register_to_config
    def __init__(
        self,
        diffusion: Literal["psld", "vp"] = "psld",
        gamma: float = 0.01,
        nu: float = 4.01,
        m_inv: Optional[float] = None,
        beta_min: Optional[float] = None,
        beta_max: Optional[float] = None,
        kappa: float = 0.04,
        sampling_eps: float = 1e-3,
        time_scale: float = 1000.0,
        sampler: Literal["conjugate"] = "conjugate",
        striding: Literal["uniform", "quadratic"] = "uniform",
        sscs_score_time: Literal["midpoint", "start"] = "start",
        project_eps: bool = False,
        prediction_type: Literal["epsilon", "sample", "sufficient_epsilon"] = "epsilon",
        input_preconditioning: bool = False,
        sigma_data: float = 0.5,
        time_grid: Optional[Literal["uniform", "power", "logsnr", "edm"]] = None,
        rho: Optional[float] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        final_step: Literal["euler", "tweedie"] = "euler",
        custom_timesteps: Optional[List[float]] = None,
        custom_sigmas: Optional[List[float]] = None,
        conjugate_b: Literal["zero", "identity", "ones"] = "ones",
        conjugate_lambda: float = 0.0,
        quadrature_nodes: int = _GL_NODES,
        eps_basis: Literal["cholesky", "gddim"] = "cholesky",
    ):
        self._setup()

    _samplers = ("conjugate",)
    _setup_seconds_per_step = 1e-3  # quadrature coefficients: ~1 ms per step (set_timesteps warns above 5000)

    def _setup(self):
        cfg = self.config
        if cfg.conjugate_b not in CONJUGATE_B:
            raise ValueError(f"`conjugate_b` must be one of {CONJUGATE_B}, got {cfg.conjugate_b!r}")
        check_real(cfg.conjugate_lambda, "conjugate_lambda")
        check_quadrature_nodes(cfg.quadrature_nodes)
        if cfg.eps_basis not in EPS_BASES:
            raise ValueError(f"`eps_basis` must be one of {EPS_BASES}, got {cfg.eps_basis!r}")
        if cfg.eps_basis == "gddim" and cfg.diffusion == "psld" and cfg.gamma == 0 and cfg.prediction_type == "epsilon":
            raise ValueError("`eps_basis='gddim'` needs gamma > 0: for CLD (gamma = 0) the rotated basis uses ε_x, "
                             "which a CLD network does not learn (masked in the loss)")
        super()._setup()

    def _build_calls(self, n: int) -> list:
        """Grid with ``n - 1`` conjugate steps down to the last grid time, then the final call to 0 (the conjugate step
        itself for ``final_step="euler"``)."""
        cfg = self.config
        times = torch.cat([self._grid(n - 1), torch.zeros(1, dtype=torch.float64)])
        mu = {"zero": 0.0, "identity": 1.0, "ones": float(self.sde.k)}[cfg.conjugate_b]  # largest eigenvalue of B/λ
        check_conjugate_stability(float(cfg.conjugate_lambda), mu, (times[:-1] - times[1:]).numpy(),
                                  context=f" with conjugate_b={cfg.conjugate_b!r} at num_inference_steps={n}")
        P, Q = conjugate_coefficients(self.sde, times, cfg.conjugate_b, float(cfg.conjugate_lambda),
                                      cfg.quadrature_nodes, cfg.eps_basis)
        if cfg.final_step != "euler":  # the last interval (to 0) is the conjugate step itself unless replaced
            P[-1], Q[-1] = self._final_map(float(times[-2]))
        return [(_AFFINE, float(times[i]), P[i], Q[i], None, float(times[i] - times[i + 1])) for i in range(n)]
