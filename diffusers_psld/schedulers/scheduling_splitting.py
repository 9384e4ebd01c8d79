r"""``SplittingScheduler``: splitting integrators for PSLD / CLD (Pandey, Rudolph & Mandt, "Efficient
Integrators for Diffusion Generative Models", ICLR 2024, arXiv 2310.07894, Sec. 4-5; stochastic
variants also in arXiv 2402.07211), naive, reduced and conjugate, behind the Diffusers scheduler API.

The paper's algorithms were not available to us; the sub-flows, orders and evaluation points below
are the reconstruction of ``/work/shared/notes/integrators_reference.md`` §3-4, re-derived from PSLD
paper Eq. 11 and checked here with exact scores (they converge to the exact marginals; tests).

Reverse dynamics (step h > 0 backwards in forward time t; s = -L_t^{-T} ε; w = ½ for the
probability-flow ODE, 1 for the reverse SDE), in recipe form ``-β F = β (D + Q) A``:

    ẋ = (β/2)(Γ x - M⁻¹ m) + 2w β D_xx s_x        (+ √(2β D_xx) ẇ_x)
    ṁ = (β/2)(x + ν m)     + 2w β D_mm s_m        (+ √(2β D_mm) ẇ_m)

Sub-flows (each one an affine map of (z, ε, ξ) with k×k float64 coefficients):

* deterministic: **A** = the whole x-row (m frozen), **B** = the whole m-row (x frozen), w = ½;
* stochastic: **O** = x self-term + x score (weight w_x) + x noise λ_s √(2βD_xx h) ξ;
  **B** = whole m-row with score weight 1 and noise √(2βD_mm h) ξ;
  **A** = x transport -(β/2)M⁻¹ m only.
  λ_s (``lambda_s``) scales the x-space noise. With ``lambda_s_mode="marginal"`` (default) the x score
  weight is w_x = ½(1 + λ_s²) so the O-flow keeps the marginals for any λ_s (λ_s = 1: reverse SDE in
  x; λ_s = 0: probability flow in x); ``"scale"`` keeps w_x = 1 and only scales the noise.

Schemes (``sampler``): sequences of (sub-flow, fraction of h)

=============  =====================================  ====================
name           sequence                               model calls per step
=============  =====================================  ====================
nse / rse      A(h) B(h)                              2 / 1
nvv / rvv      B(h/2) A(h) B(h/2)                     3 / 1
noba / roba    O(h) B(h) A(h)                         2 / 1
nbaoab/rbaoab  B(h/2) A(h/2) O(h) A(h/2) B(h/2)       3 / 1
cse, cvv       A(h) B(h) / B(h/2) A(h) B(h/2), conj   1
coba           O(h) B(h) A(h), O and B conjugate      1
=============  =====================================  ====================

* **Naive** (n…): a fresh model evaluation before every score-using sub-flow, at the current
  (partially updated) state; its time is the clock of the A sub-flow (time advances with position
  transport, as in velocity Verlet where the force is evaluated at the new position).
* **Reduced** (r…; the paper's adjusted schemes): one evaluation per step at the step start, reused by
  every sub-flow, each sub-flow using the freshest x and m (sequential composition).
* **Conjugate splitting** (c…): as reduced, but each score-using sub-flow on component j is a scalar
  conjugate step (paper Sec. 5; notes §4.2) with B = λ (``conjugate_lambda``): its self-term β F_jj is
  integrated exactly (tilted by e^{λ(s - t_lo)} with the (1 - λh) Euler factor of λ-DDIM), the
  coupling term is one Euler step mapped back by the same factor, the score weight ∫ V(s) 2wβ_s D_jj
  (L_s^{-T})_{j·} ds with ε frozen is integrated by Gauss-Legendre in √s, and the noise variance is
  the exact ∫ V(s)² 2β_s D_jj ds of the conjugated OU part. With λ = 0 this is the split scheme with
  each variable's self-linear term and score weight integrated exactly.

Each step's sub-flows between two model calls compose into one affine map ``z' = P z + R ε + S ξ``
(independent noises merged into one Cholesky factor: the same law, per coordinate), so the base
class's :meth:`PSLDScheduler.step` runs every scheme. ``num_inference_steps`` is the exact NFE: with
c calls per step, ``N - 1 = c·n + r`` gives n full steps followed by r reduced steps, then the final
call (``final_step``: by default the EM mean for stochastic schemes, probability-flow Euler for deterministic ones,
as in :class:`PSLDScheduler`, and the exponential-integrator step to 0 for the conjugate deterministic schemes).
``order`` = c, so every c-th call starts a step (diffusers' img2img slice ``timesteps[t_start * order:]``).
A custom grid of M times (``set_timesteps(timesteps=...)``) runs M - 1 full steps: N = c·(M - 1) + 1.
β and L in plain Euler sub-flows are taken at the step's evaluation time.
"""
from __future__ import annotations

from typing import List, Literal, Optional

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (name needed by diffusers' loader)

from .. import sampling
from ..sde import RecipeSDE
from ..sde.kernels import psd_cholesky
from .scheduling_conjugate import check_conjugate_stability, conjugate_coefficients, gauss_legendre_sqrt
from .validation import check_quadrature_nodes, check_real
from .scheduling_psld import _AFFINE, PSLDScheduler

__all__ = ["SplittingScheduler", "SPLITTING_SAMPLERS", "splitting_calls"]

# name -> (sequence of (sub-flow, fraction), naive?, conjugate?, stochastic?)
_SCHEMES = {
    "nse": ((("A", 1.0), ("B", 1.0)), True, False, False),
    "rse": ((("A", 1.0), ("B", 1.0)), False, False, False),
    "nvv": ((("B", 0.5), ("A", 1.0), ("B", 0.5)), True, False, False),
    "rvv": ((("B", 0.5), ("A", 1.0), ("B", 0.5)), False, False, False),
    "noba": ((("O", 1.0), ("B", 1.0), ("A", 1.0)), True, False, True),
    "roba": ((("O", 1.0), ("B", 1.0), ("A", 1.0)), False, False, True),
    "nbaoab": ((("B", .5), ("A", .5), ("O", 1.0), ("A", .5), ("B", .5)), True, False, True),
    "rbaoab": ((("B", .5), ("A", .5), ("O", 1.0), ("A", .5), ("B", .5)), False, False, True),
    "cse": ((("A", 1.0), ("B", 1.0)), False, True, False),
    "cvv": ((("B", 0.5), ("A", 1.0), ("B", 0.5)), False, True, False),
    "coba": ((("O", 1.0), ("B", 1.0), ("A", 1.0)), False, True, True),
}
SPLITTING_SAMPLERS = tuple(_SCHEMES)
_REDUCED_OF = {"nse": "rse", "nvv": "rvv", "noba": "roba", "nbaoab": "rbaoab"}


def _terms(flow: str, stochastic: bool, lambda_s: float, marginal: bool):
    """(component j, self, coupling, score weight w, noise variance factor) of a sub-flow."""
    if not stochastic:
        return {"A": (0, True, True, 0.5, 0.0), "B": (1, True, True, 0.5, 0.0)}[flow]
    wx = 0.5 * (1.0 + lambda_s ** 2) if marginal else 1.0
    return {"O": (0, True, False, wx, lambda_s ** 2), "B": (1, True, True, 1.0, 1.0),
            "A": (0, False, True, 0.0, 0.0)}[flow]


class _Nodes:
    """Batched float64 quadrature data (nodes, weights, β, L^{-T}) for many sub-intervals at once."""

    def __init__(self, sde: RecipeSDE, intervals, nodes: int):
        self.index = {}
        if not intervals:
            return
        lo = np.array([a for a, _ in intervals])
        hi = np.array([b for _, b in intervals])
        s, w = gauss_legendre_sqrt(lo, hi, nodes)
        flat = torch.from_numpy(s.reshape(-1))
        linvt = sde.hsm_kernel(flat).inv_chol_t().numpy().reshape(len(lo), nodes, sde.k, sde.k)
        beta = sde.beta(flat).numpy().reshape(len(lo), nodes)
        b = sde.beta_integral(flat, torch.from_numpy(np.repeat(lo, nodes))).numpy().reshape(len(lo), nodes)
        for i, key in enumerate(intervals):
            self.index[key] = (s[i], w[i], beta[i], linvt[i], b[i])


def _sub_step(sde: RecipeSDE, terms, t_hi: float, t_lo: float, t_eval: float, conj: bool, lam: float,
              linvt_eval: np.ndarray, quad: "_Nodes"):
    """``(M, N, C)``: z ← M z + N ε + noise with covariance C, for one sub-flow over [t_lo, t_hi]."""
    j, self_t, coup_t, w, nvar = terms
    k = sde.k
    o = 1 - j
    F, D = sde.F.numpy(), sde.D.numpy()
    h = t_hi - t_lo
    M, N, C = np.eye(k), np.zeros((k, k)), np.zeros((k, k))
    if conj and self_t and w > 0:
        s, wq, beta_n, linvt, b_nodes = quad.index[(t_lo, t_hi)]
        V = np.exp(lam * (s - t_lo) - F[j, j] * b_nodes)  # scalar conjugate factor at the nodes
        U = float(np.exp(lam * h - F[j, j] * float(sde.beta_integral(t_hi, t_lo))))
        M[j, j] = U * (1.0 - h * lam)
        if coup_t:
            M[j, o] = -h * float(sde.beta(t_hi)) * F[j, o] * U
        N[j, :] = -np.einsum("q,q,qk->k", wq, V * 2.0 * w * beta_n * D[j, j], linvt[:, j, :])
        if nvar > 0:
            C[j, j] = nvar * float(np.sum(wq * V * V * 2.0 * beta_n * D[j, j]))
        return M, N, C
    beta = float(sde.beta(t_eval))
    if self_t:
        M[j, j] -= h * beta * F[j, j]
    if coup_t:
        M[j, o] -= h * beta * F[j, o]
    if w > 0:
        N[j, :] = -h * 2.0 * w * beta * (D @ linvt_eval)[j, :]
    if nvar > 0:
        C[j, j] = nvar * 2.0 * beta * D[j, j] * h
    return M, N, C


def splitting_calls(sde: RecipeSDE, times, scheme: str, lambda_s: float = 1.0, marginal: bool = True,
                    lam: float = 0.0, nodes: int = 24, reduced_steps: int = 0):
    """Affine call tuples for the splitting scheme on the descending grid ``times`` (no final step).

    The last ``reduced_steps`` intervals use the scheme's reduced variant (1 call each; last, so that every
    ``calls_per_step``-th call starts a step: diffusers' ``order`` convention)."""
    seq, naive, conj, stoch = _SCHEMES[scheme]
    k = sde.k
    t = [float(v) for v in times]
    calls = []
    intervals = []
    if conj:  # all conjugate sub-intervals first, so their quadrature data is one batched evaluation
        for i in range(len(t) - 1):
            clock = {"A": 0.0, "B": 0.0, "O": 0.0}
            for flow, frac in seq:
                h = t[i] - t[i + 1]
                intervals.append((t[i] - (clock[flow] + frac) * h, t[i] - clock[flow] * h))
                clock[flow] += frac
    quad = _Nodes(sde, intervals, nodes)
    linvt_grid = sde.hsm_kernel(torch.tensor(t, dtype=torch.float64)).inv_chol_t().numpy()
    for i in range(len(t) - 1):
        t0, h = t[i], t[i] - t[i + 1]
        fresh = naive and i < len(t) - 1 - reduced_steps
        clock = {"A": 0.0, "B": 0.0, "O": 0.0}
        P, R, C = np.eye(k), np.zeros((k, k)), np.zeros((k, k))
        t_eval, used, state_time = t0, False, t0
        linvt = linvt_grid[i]

        first = [True]  # the first call of a step starts it (a mid-schedule start may begin there)

        def flush(next_eval):
            S = None
            if np.any(C != 0):
                S = psd_cholesky(torch.from_numpy(0.5 * (C + C.T)), "splitting step noise covariance")
            calls.append((_AFFINE, t_eval, torch.from_numpy(P.copy()), torch.from_numpy(R.copy()), S,
                          h, state_time, first[0]))
            first[0] = False

        for flow, frac in seq:
            terms = _terms(flow, stoch, lambda_s, marginal)
            if fresh and terms[3] > 0 and used:  # naive: new evaluation at the current state
                flush(None)
                t_eval = t0 - clock["A"] * h
                state_time = t_eval
                linvt = sde.hsm_kernel(t_eval).inv_chol_t().numpy()
                P, R, C = np.eye(k), np.zeros((k, k)), np.zeros((k, k))
                used = False
            t_hi = t0 - clock[flow] * h
            t_lo = t0 - (clock[flow] + frac) * h
            clock[flow] += frac
            M, Nn, Cn = _sub_step(sde, terms, t_hi, t_lo, t_eval, conj, lam, linvt, quad)
            P, R, C = M @ P, M @ R + Nn, M @ C @ M.T + Cn
            used = used or terms[3] > 0
        flush(None)
    return calls


class SplittingScheduler(PSLDScheduler):
    r"""Splitting integrators for PSLD / CLD (arXiv 2310.07894, Sec. 4-5): naive, reduced and
    conjugate splitting, deterministic and stochastic (see the module docstring for the schemes).

    All shared arguments and defaults are those of :class:`PSLDScheduler`; in addition:

    Args:
        sampler (`str`, defaults to `"roba"`): one of ``SPLITTING_SAMPLERS``.
        lambda_s (`float`, defaults to 1.0): x-space noise scale λ_s of the stochastic schemes (>= 0).
        lambda_s_mode (`str`, defaults to `"marginal"`): `"marginal"` (x score weight ½(1 + λ_s²)) or
            `"scale"` (score weight 1, noise scaled only).
        conjugate_lambda (`float`, defaults to 0.0): λ of the conjugate splitting schemes (finite). ``set_timesteps``
            refuses a λ whose sub-flow factors e^x(1 - x), x = λ·(fraction of h), amplify the state by more than
            10³ over the run (as :class:`~diffusers_psld.ConjugateScheduler`).
        quadrature_nodes (`int`, defaults to 24): Gauss-Legendre nodes per sub-interval, in [4, 64].
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
        sampler: str = "roba",
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
        lambda_s: float = 1.0,
        lambda_s_mode: Literal["marginal", "scale"] = "marginal",
        conjugate_lambda: float = 0.0,
        quadrature_nodes: int = 24,
    ):
        self._setup()

    _samplers = SPLITTING_SAMPLERS
    _setup_seconds_per_step = 1e-3  # quadrature coefficients: ~1 ms per step (set_timesteps warns above 5000)

    def _setup(self):
        cfg = self.config
        if cfg.diffusion != "psld":
            raise ValueError(f"splitting integrators need the augmented diffusion `diffusion='psld'`, got {cfg.diffusion!r}")
        check_real(cfg.lambda_s, "lambda_s", low=0.0)
        if cfg.lambda_s_mode not in ("marginal", "scale"):
            raise ValueError(f"`lambda_s_mode` must be 'marginal' or 'scale', got {cfg.lambda_s_mode!r}")
        check_real(cfg.conjugate_lambda, "conjugate_lambda")
        check_quadrature_nodes(cfg.quadrature_nodes)
        super()._setup()

    @property
    def calls_per_step(self) -> int:
        """Model evaluations per full step of the configured scheme."""
        seq, naive, _, stoch = _SCHEMES[self.config.sampler]
        if not naive:
            return 1
        return sum(1 for f, _ in seq if _terms(f, stoch, 1.0, True)[3] > 0)

    def _build_calls(self, n_calls: int) -> list:
        """``n_calls`` model calls: full steps (+ trailing reduced steps) and the final call."""
        cfg = self.config
        c = self.calls_per_step
        n_full, rem = divmod(n_calls - 1, c)
        times = self._grid(n_full + rem)
        seq, naive, conj, stoch = _SCHEMES[cfg.sampler]
        if conj:  # each conjugate sub-flow over a fraction of h multiplies by e^x(1 - x), x = λ·frac·h
            h = (times[:-1] - times[1:]).numpy()
            fracs = [frac for flow, frac in seq if _terms(flow, stoch, 1.0, True)[1] and _terms(flow, stoch, 1.0, True)[3] > 0]
            check_conjugate_stability(float(cfg.conjugate_lambda), 1.0, np.concatenate([f * h for f in fracs]),
                                      context=f" for sampler {cfg.sampler!r} at num_inference_steps={n_calls}")
        calls = splitting_calls(self.sde, times, cfg.sampler, float(cfg.lambda_s), cfg.lambda_s_mode == "marginal",
                                float(cfg.conjugate_lambda), cfg.quadrature_nodes, reduced_steps=rem)
        t_last = float(times[-1])
        P, R = self._final_map(t_last)
        calls.append((_AFFINE, t_last, P, R, None, 0.0))
        return calls

    def _euler_final(self, t: float):
        """The noiseless first-order step from ``t`` to 0: the EM mean for the stochastic schemes, the exponential
        integrator's step for the conjugate deterministic ones, a probability-flow Euler step otherwise."""
        cfg = self.config
        _, _, conj, stoch = _SCHEMES[cfg.sampler]
        if stoch:
            P, R, _ = sampling.em_step(self.sde, t, 0.0, noise=False)
        elif conj:
            Pc, Qc = conjugate_coefficients(self.sde, torch.tensor([t, 0.0], dtype=torch.float64), "zero", 0.0,
                                            cfg.quadrature_nodes)
            P, R = Pc[0], Qc[0]
        else:
            P, R, _ = sampling.pf_euler_step(self.sde, t, 0.0)
        return P, R
