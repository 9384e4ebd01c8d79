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
* Q by Gauss–Legendre quadrature after the substitution s = u² (``L_s^{-T}`` behaves like s^{-1/2}
  near 0 for PSLD, which makes the integrand smooth in u and lets the last step reach t = 0); every
  node of every interval is evaluated in one batched float64 call. The tests check the quadrature
  against an adaptive ODE solve of a constant-ε manufactured solution.

Choices of B (``conjugate_b``):

* ``"zero"``: B = 0, the zeroth-order exponential integrator (DEIS-type; paper Prop. 2). For VP it is
  exactly DDIM (η = 0) (paper Prop. 1): P_i = α_{i+1}/α_i, Q_i = σ_{i+1} - α_{i+1}σ_i/α_i (tested).
* ``"identity"``: λ-DDIM with B = λ I ("λ-DDIM-I"); ``P_i = e^{λh}(1 - λh) Ψ(t_{i+1}, t_i)``.
* ``"ones"``: λ-DDIM with B = λ 𝟏 (all-ones k×k matrix, couples x and m; "λ-DDIM-II").

With λ = 0 every choice reduces to ``"zero"`` (tested). The final (N-th) call integrates the same
conjugate step from ``sampling_eps`` down to t = 0. ``num_inference_steps`` is the exact NFE: N - 1
conjugate steps on a uniform or quadratic grid plus the final step. Not implemented: gDDIM's
C_out = -R_t^{-T} preconditioning (notes §2.4c, §2.6).
"""
from __future__ import annotations

import math
from typing import Literal, Optional

import numpy as np
import scipy.integrate
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (name needed by diffusers' loader)

from ..sde import RecipeSDE, kernels
from .scheduling_psld import _AFFINE, PSLDScheduler

__all__ = ["ConjugateScheduler", "CONJUGATE_B", "conjugate_coefficients", "gauss_legendre_sqrt"]

CONJUGATE_B = ("zero", "identity", "ones")
_GL_NODES = 24


# ---------------------------------------------------------------------------------------------- helpers
def check_real(value, name: str, low: Optional[float] = None, strict: bool = False) -> float:
    """A finite real number (optionally bounded below); ValueError naming ``name`` otherwise."""
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a real number, got {value!r}") from err
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {low}, got {value!r}")
    return v


def expm_batch(M: np.ndarray) -> np.ndarray:
    """Matrix exponential of a batch ``[n, k, k]`` (NumPy front-end of :func:`diffusers_psld.sde.kernels.expm`)."""
    return kernels.expm(torch.from_numpy(np.asarray(M, dtype=np.float64))).numpy()


def gauss_legendre_sqrt(lo: np.ndarray, hi: np.ndarray, n: int = _GL_NODES):
    """Nodes ``s [m, n]`` and weights ``w [m, n]`` for ∫_lo^hi f(s) ds with s = u² (ds = 2u du)."""
    x, wx = np.polynomial.legendre.leggauss(n)
    ulo, uhi = np.sqrt(lo)[:, None], np.sqrt(hi)[:, None]
    u = 0.5 * (uhi - ulo) * x[None] + 0.5 * (uhi + ulo)
    w = 0.5 * (uhi - ulo) * wx[None] * 2.0 * u
    return u * u, w


def _b_matrix(kind: str, lam: float, k: int) -> np.ndarray:
    if kind == "zero":
        return np.zeros((k, k))
    if kind == "identity":
        return lam * np.eye(k)
    if kind == "ones":
        return lam * np.ones((k, k))
    raise ValueError(f"`conjugate_b` must be one of {CONJUGATE_B}, got {kind!r}")


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
                           nodes: int = _GL_NODES):
    """``(P, Q)`` (``[n, k, k]`` float64 tensors) of the conjugate step for each interval of the
    descending grid ``times`` (``t_0 > t_1 > ... > t_n >= 0``). See the module docstring."""
    t = np.asarray(torch.as_tensor(times, dtype=torch.float64).tolist(), dtype=np.float64)
    k = sde.k
    Bm = _b_matrix(conjugate_b, lam, k)
    hi, lo = t[:-1], t[1:]
    s, w = gauss_legendre_sqrt(lo, hi, nodes)  # [n, q]
    flat = torch.from_numpy(s.reshape(-1))
    linvt = sde.hsm_kernel(flat).inv_chol_t().numpy()  # [n*q, k, k]
    weight = sde.beta(flat).numpy()[:, None, None] * (sde.D.numpy()[None] @ linvt)  # β D L^{-T}
    weight = weight.reshape(len(hi), nodes, k, k)
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
        quadrature_nodes (`int`, defaults to 24): Gauss–Legendre nodes per interval (in u = √t), >= 4.
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
        conjugate_b: Literal["zero", "identity", "ones"] = "ones",
        conjugate_lambda: float = 0.0,
        quadrature_nodes: int = _GL_NODES,
    ):
        self._setup()

    _samplers = ("conjugate",)

    def _setup(self):
        cfg = self.config
        if cfg.conjugate_b not in CONJUGATE_B:
            raise ValueError(f"`conjugate_b` must be one of {CONJUGATE_B}, got {cfg.conjugate_b!r}")
        check_real(cfg.conjugate_lambda, "conjugate_lambda")
        q = cfg.quadrature_nodes
        if isinstance(q, bool) or not isinstance(q, int) or q < 4:
            raise ValueError(f"`quadrature_nodes` must be an int >= 4, got {q!r}")
        super()._setup()

    def _build_calls(self, n: int) -> list:
        """Grid with ``n - 1`` conjugate steps down to sampling_eps, then one to 0."""
        cfg = self.config
        times = torch.cat([self._grid(n - 1), torch.zeros(1, dtype=torch.float64)])
        P, Q = conjugate_coefficients(self.sde, times, cfg.conjugate_b, float(cfg.conjugate_lambda),
                                      cfg.quadrature_nodes)
        return [(_AFFINE, float(times[i]), P[i], Q[i], None, float(times[i] - times[i + 1])) for i in range(n)]
