r"""``GDDIMMultistepScheduler``: a multistep exponential integrator for PSLD / VP in gDDIM's basis, in
data-prediction (x̂₀) form — the phase-space analogue of DPM-Solver++(2M/3M) / DEIS.

Derivation (forward time t, descending grid t_0 = 1 > ... > t_{N-1} = sampling_eps, then 0). With the
HSM kernel p(z_t | x₀) = N(a_t x₀, Σ_t) (a_t the k-vector mean coefficient, momentum marginalised),
Tweedie gives ``∇log p_t(z) = -Σ_t^{-1}(z - a_t x̂₀(z, t))`` with x̂₀ = E[x₀ | z_t]; the network's ε gives
``x̂₀ = aᵀ(z - L_t ε)/aᵀa`` per pixel (:meth:`PSLDScheduler.step`'s ``pred_original_sample``; exact
when ε is; for a learned ε the component of z - L_t ε orthogonal to a_t is dropped, so the first-order
step equals ``ConjugateScheduler(eps_basis="gddim", conjugate_b="zero")`` only for a consistent ε). The probability-flow ODE ``dz/dt = β(F z + D Σ^{-1}(z - a x̂₀))`` is linear in z up to the
x̂₀ term:

    dz/dt = A_t z - β_t D Σ_t^{-1} a_t x̂₀(z, t),        A_t = β_t (F + D Σ_t^{-1}),

whose transition matrix is gDDIM's ``Ψ(s, t) = R_s R_t^{-1} = L_s Rot(θ_s - θ_t) L_t^{-1}``
(:func:`~diffusers_psld.schedulers.scheduling_conjugate.gddim_transition`). Variation of constants:

    z_s = Ψ(s, t) z_t + ∫_s^t Ψ(s, τ) β_τ D Σ_τ^{-1} a_τ x̂₀(τ) dτ.

Replacing x̂₀(τ) by the Lagrange polynomial through the last p evaluations (in ρ = log-SNR or in t,
``interpolation``) gives ``z_{i+1} = Ψ_i z_i + Σ_j W_{i,j} x̂₀_{i-j}`` with k-vector weights

    W_{i,j} = ∫_{t_{i+1}}^{t_i} Ψ(t_{i+1}, τ) β_τ D Σ_τ^{-1} a_τ ℓ_j(ρ(τ)) dτ,

precomputed in float64 in :meth:`set_timesteps` by composite Gauss–Legendre quadrature in u = √τ
(pieces with u_hi/u_lo <= 2). Because ``a_s - Ψ(s, t) a_t`` solves the same ODE with x̂₀ ≡ 1,
``Σ_j W_{i,j} = a_{t_{i+1}} - Ψ_i a_{t_i}`` exactly (tested against the quadrature) and the first-order
step is the closed form ``z_s = a_s x̂₀ + Ψ(s, t)(z_t - a_t x̂₀)``: gDDIM / deterministic DDIM (for VP
exactly DDIM). Every order is exact for point-mass data (x̂₀ constant); the order-p step has local
error O(h^{p+1}) (tests: observed orders on Gaussian data with the exact ε). The log-SNR is
``ρ(t) = ½ log(aᵀ Σ_t^{-1} a)`` (the precision of the best linear estimate of x₀ from z_t; for VP
log(α/σ), DPM-Solver's λ).

Corrector (``corrector="unic"``, UniPC's UniC: Zhao et al., "UniPC", NeurIPS 2023). The same integral with the
Lagrange nodes {t_{i+1}, t_i, ..., t_{i-p+1}} (:func:`corrector_coefficients`, one shared quadrature with the
predictor's weights, :func:`step_weights`) gives an implicit, Adams–Moulton-like order-(p + 1) step. When call
i + 1 has received x̂₀ at the predicted z_{i+1}, it recomputes ``z_{i+1} = Ψ_i z_i + Σ_j Wc_{i,j} x̂₀_{i+1-j}``
from the corrected z_i and predicts from there; x̂₀_{i+1} is not re-evaluated, so the NFE is unchanged and the
observed order rises from p to p + 1 (tested for p = 1-4, PSLD and VP). For VP with ``interpolation="logsnr"``
this is UniPC's data-prediction update with the exact integrals of the interpolant: on the same σ grid it agrees
with Diffusers' ``UniPCMultistepScheduler`` of the same order to ~1e-3 of either's error (tested at order 3);
UniPC's only differences are its fixed constants ρ = 1/2 for the order-2 predictor and the order-1 corrector,
whose accuracy depends on its B(h) choice (``bh1``/``bh2``), where this integrator uses the exact weights.

Analytic first step (``analytic_first_step``). A schedule may start at t_0 < 1 (a σ_max below σ(1)): the step
from the prior at t = 1 to t_0 then uses the node t_0 only, ``z_{t_0} = Ψ(t_0, 1) z_1 + (a_{t_0} - Ψ(t_0, 1) a_1)
x̂₀(t_0)``, and needs no evaluation at t = 1 (where x̂₀ is nearly the data mean): the first call receives the
data-free start N(0, Σ_{t_0}) of ``sample_prior`` (the flow Ψ(t_0, 1) z_1 of z_1 ~ N(0, Σ_1)) and adds the second
term. Exact for point-mass data; local error O(h²) in h = 1 - t_0 on Gaussian data (tested). On the exact-score
benchmark (``benchmarks/low_nfe_sweep.py``) this, a σ_max of 10-30 and a σ_min of 0.06-0.16 decide NFE 5-10.

Warm-up: step i uses order min(solver_order, i + 1); a loop that begins at call k (``set_begin_index(k)`` or
stepping with ``timesteps[k]``: img2img) has no earlier x̂₀, so it warms up again from k: step i uses order
min(order_i, i - k + 1), with weights recomputed for the lower orders (as DPM-Solver). With ``lower_order_final`` (as in Diffusers'
DPM-Solver, for N < 15) the last steps drop to orders 1–2. The final (N-th) call goes from
``sampling_eps`` to 0 at first order: its x half is x̂₀ (Tweedie's denoiser at sampling_eps), its
momentum half Ψ(0, ε)(z - a x̂₀). ``num_inference_steps`` is the exact NFE.

Needs Γ > 0 or VP (the gDDIM basis; see ``scheduling_conjugate``). Time grids: the shared ``time_grid`` when set
(:mod:`.time_grids`: "uniform", "power", "logsnr", "edm"; or a ``timesteps=`` / ``sigmas=`` list), else the legacy
``time_spacing="power"`` (default; t = ε + (1 - ε) s^ρ, s uniform, ρ = ``spacing_power`` = 2.5; ρ = 2 is the
quadratic striding), ``"logsnr"`` (uniform in ρ(t) between t = 1 and sampling_eps) or ``"striding"`` (the shared
``striding``). The orders of the updates: :func:`multistep_orders`; the final call: ``final_step``.
The uniform grid is a poor choice for every order (large errors below ~40 NFE, measured).
"""
from __future__ import annotations

from typing import List, Literal, NamedTuple, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (name needed by diffusers' loader)

from .. import sampling
from ..sde import RecipeSDE, blocks
from .scheduling_conjugate import _PIECE_RATIO, _rotation, gauss_legendre_sqrt, gddim_angle, gddim_transition
from .scheduling_psld import _AFFINE, PSLDScheduler, PSLDSchedulerOutput, _Calls
from .nfe_bands import NFEBand, band_for
from .time_grids import DEFAULT_RHO, named_grid, noise_level, time_for_noise_level
from .validation import check_generator, check_quadrature_nodes, check_real

#: the power of ``time_spacing="power"`` when ``spacing_power`` is None
DEFAULT_SPACING_POWER = 2.5
#: largest ``spacing_power``: already at ρ = 8 the grid puts ~60 % of the steps below t = 0.01 (ρ = 2-3 is the useful
#: range); larger powers collapse the last grid points onto ``sampling_eps`` in float64 (ρ = 1e6 gives a grid of
#: repeated times), which the constructor refuses instead of ``set_timesteps``
MAX_SPACING_POWER = 8.0


class _Resolved(NamedTuple):
    """What ``set_timesteps`` resolved: the band row (:mod:`.nfe_bands`), the grid's name and exponent, and the
    band's ``(grid, rho, t_lo, t_hi)`` when the band (not the config) decides the grid, else None."""

    kind: str
    band: NFEBand
    grid: str
    rho: Optional[float]
    band_grid: Optional[tuple]


__all__ = ["GDDIMMultistepScheduler", "multistep_coefficients", "corrector_coefficients", "step_weights",
           "multistep_orders", "log_snr", "spacing_grid", "TIME_SPACINGS", "CORRECTORS"]

TIME_SPACINGS = ("striding", "logsnr", "power")
INTERPOLATIONS = ("logsnr", "time")
SOLVER_ORDERS = (1, 2, 3, 4)
CORRECTORS = ("none", "unic")


def log_snr(sde: RecipeSDE, t) -> np.ndarray:
    """ρ(t) = ½ log(aᵀ Σ_t^{-1} a) (float64), decreasing in t; for VP log(α/σ)."""
    kern = sde.hsm_kernel(torch.as_tensor(np.asarray(t, dtype=np.float64).reshape(-1)))
    a = kern.mean_coef
    sol = torch.linalg.solve(kern.cov, a[..., None])[..., 0]
    return (0.5 * torch.log((a * sol).sum(-1))).numpy()


def spacing_grid(sde: RecipeSDE, n: int, eps: float, spacing: str, power: float = 2.0) -> torch.Tensor:
    """``n + 1`` descending float64 forward times from 1 to ``eps`` for the legacy ``time_spacing`` in
    ("logsnr", "power") (:func:`~diffusers_psld.schedulers.time_grids.named_grid`)."""
    if spacing not in ("logsnr", "power"):
        raise ValueError(f"`time_spacing` must be one of {TIME_SPACINGS}, got {spacing!r}")
    return named_grid(sde, spacing, n, eps, 1.0, power if spacing == "power" else None,
                      f"{spacing!r} time grid with {n} steps (spacing_power={power})")


def multistep_orders(n_steps: int, solver_order: int, lower_order_final: bool, euler_at_final: bool = False) -> list:
    """The order of each of the ``n_steps`` multistep updates (the final call to 0 is first order, not listed):
    warm-up min(solver_order, i + 1); with ``lower_order_final`` and N = n_steps + 1 < 15 calls, order <= 2 on the
    second-to-last and 1 on the last update (Diffusers' DPM-Solver rule); ``euler_at_final``: 1 on the last update
    for any N."""
    orders = [min(solver_order, i + 1) for i in range(n_steps)]
    if lower_order_final and n_steps + 1 < 15:
        if n_steps >= 1:
            orders[-1] = 1
        if n_steps >= 2:
            orders[-2] = min(orders[-2], 2)
    if euler_at_final and n_steps >= 1:
        orders[-1] = 1
    return orders


def _lagrange(nodes: np.ndarray, x: np.ndarray) -> np.ndarray:
    """Lagrange basis ``ℓ_j(x)`` for ``nodes`` [p] at points x [q]: ``[p, q]``."""
    p = len(nodes)
    out = np.ones((p, len(x)))
    for j in range(p):
        for m in range(p):
            if m != j:
                out[j] *= (x - nodes[m]) / (nodes[j] - nodes[m])
    return out


def step_weights(sde: RecipeSDE, times, *node_sets, interpolation: str = "logsnr", nodes: int = 16,
                 width: Optional[int] = None):
    """Variation-of-constants weights of the steps t_i → t_{i+1} of the descending grid ``times`` (all > 0) for
    Lagrange interpolation of x̂₀ through the grid points ``times[node_sets[i][j]]`` (any grid indices, the step's
    end t_{i+1} included):

        W_{i,j} = ∫_{t_{i+1}}^{t_i} Ψ(t_{i+1}, τ) β_τ D Σ_τ^{-1} a_τ ℓ_j(ρ(τ)) dτ      (k-vectors, float64).

    One quadrature (composite Gauss–Legendre in u = √τ) serves every family of node sets passed: returns one
    ``[n, width, k]`` tensor per family (``width`` defaults to the family's largest node set; unused slots 0).
    With the nodes {t_i, ..., t_{i-p+1}} this is the explicit order-p multistep step (:func:`multistep_coefficients`);
    with {t_{i+1}, t_i, ..., t_{i-p+1}} the implicit (Adams–Moulton-like) order-(p + 1) corrector
    (:func:`corrector_coefficients`). Σ_j W_{i,j} = a_{t_{i+1}} - Ψ_i a_{t_i} for every node set (x̂₀ ≡ 1)."""
    t = np.asarray(torch.as_tensor(times, dtype=torch.float64).tolist(), dtype=np.float64)
    n, k = len(t) - 1, sde.k
    if np.any(t <= 0):
        raise ValueError("multistep coefficients need times > 0 (the step to 0 is the first-order closed form)")
    hi, lo = t[:-1], t[1:]
    s, w = gauss_legendre_sqrt(lo, hi, nodes, _PIECE_RATIO)  # [n, q]
    q = s.shape[1]
    flat = s.reshape(-1)
    kern = sde.hsm_kernel(torch.from_numpy(flat))
    L, a = kern.chol.numpy(), kern.mean_coef.numpy()
    beta = sde.beta(torch.from_numpy(flat)).numpy()
    # v = β D Σ^{-1} a, then L_τ^{-1} v (Ψ(t_{i+1}, τ) = L_{i+1} Rot(θ_{i+1} - θ_τ) L_τ^{-1})
    v = beta[:, None] * np.einsum("ij,nj->ni", sde.D.numpy(), np.linalg.solve(kern.cov.numpy(), a[..., None])[..., 0])
    linv_v = np.linalg.solve(L, v[..., None])[..., 0]  # [n*q, k]
    th = gddim_angle(sde, np.concatenate([flat, lo]))
    rel = th[n * q:].repeat(q) - th[: n * q]
    rv = np.einsum("nij,nj->ni", _rotation(rel, k), linv_v).reshape(n, q, k)
    Llo = sde.hsm_kernel(torch.from_numpy(lo.copy())).chol.numpy()
    integrand = np.einsum("nij,nqj->nqi", Llo, rv) * w[..., None]  # w · Ψ(t_{i+1}, τ) v(τ)  [n, q, k]
    rho_of = (lambda x: log_snr(sde, x)) if interpolation == "logsnr" else (lambda x: np.asarray(x, dtype=np.float64))
    rho_nodes = rho_of(flat).reshape(n, q)
    rho_t = rho_of(t)
    out = []
    for sets in node_sets:
        if len(sets) != n:
            raise ValueError(f"need one node set per step ({n}), got {len(sets)}")
        wd = max(len(x) for x in sets) if width is None else width
        W = np.zeros((n, wd, k))
        for i, idx in enumerate(sets):
            ell = _lagrange(rho_t[list(idx)], rho_nodes[i])  # [p, q]
            W[i, : len(idx)] = np.einsum("pq,qk->pk", ell, integrand[i])
        out.append(torch.from_numpy(W))
    return tuple(out)


def _past_nodes(orders):
    return [[i - j for j in range(int(p))] for i, p in enumerate(orders)]


def multistep_coefficients(sde: RecipeSDE, times, orders, interpolation: str = "logsnr", nodes: int = 16,
                           width: int = 3):
    """Ψ_i ``[n, k, k]`` and W_{i,j} ``[n, width, k]`` (float64) for the steps t_i → t_{i+1} of the descending grid
    ``times`` (all > 0), step i using ``orders[i]`` past x̂₀ values (j = 0 is the newest). See the module docstring."""
    (W,) = step_weights(sde, times, _past_nodes(orders), interpolation=interpolation, nodes=nodes,
                        width=max(width, max(int(p) for p in orders)))
    t = torch.as_tensor(times, dtype=torch.float64)
    return gddim_transition(sde, t[1:].tolist(), t[:-1].tolist()), W


def corrector_coefficients(sde: RecipeSDE, times, orders, interpolation: str = "logsnr", nodes: int = 16,
                           width: Optional[int] = None):
    """UniC-type corrector weights ``Wc [n, width, k]`` (float64): the step t_i → t_{i+1} recomputed with x̂₀
    interpolated through {t_{i+1}, t_i, ..., t_{i-p+1}} (p = ``orders[i]``, the predictor's order): ``Wc[i, 0]``
    weights x̂₀ at t_{i+1} (evaluated at the predicted state), ``Wc[i, j + 1]`` weights x̂₀_{i-j}. Local order p + 1
    at no extra model evaluation (UniPC's corrector, Zhao et al. 2023, in this integrator's exact-quadrature form)."""
    sets = [[i + 1] + nodes_i for i, nodes_i in enumerate(_past_nodes(orders))]
    (W,) = step_weights(sde, times, sets, interpolation=interpolation, nodes=nodes, width=width)
    return W


class GDDIMMultistepScheduler(PSLDScheduler):
    r"""Multistep exponential integrator in gDDIM's basis, data-prediction form (PSLD with Γ > 0, or VP).

    Deterministic; one model evaluation per call; ``num_inference_steps`` = N is the exact NFE: N - 1
    multistep updates from t = 1 to ``sampling_eps`` and a final first-order update to 0 whose x half
    is x̂₀. Shared arguments and defaults are those of :class:`PSLDScheduler`; in addition:

    Args:
        sampler (`str`, defaults to `"gddim_multistep"`): must be `"gddim_multistep"`.
        solver_order (`int`, defaults to 3): 1 (gDDIM, = DDIM for VP), 2, 3 or 4 past x̂₀ values.
        interpolation (`str`, defaults to `"time"`): Lagrange interpolation of x̂₀ in t (`"time"`) or in the
            log-SNR ρ(t) = ½ log(aᵀΣ_t⁻¹a) (`"logsnr"`). In t measured more accurate at 10-20 NFE.
        lower_order_final (`bool`, *optional*): True: for N < 15, order <= 2 on the second-to-last and order 1 on
            the last update (as Diffusers' DPM-Solver). None (default): the NFE band's (True for VP, False for
            phase space up to 12 NFE, True above).
        time_spacing (`str`, *optional*): the legacy grid keys, used while `time_grid`, `sigma_min` and
            `sigma_max` are None: `"power"` (t = ε + (1 - ε) s^ρ, s uniform, ρ = `spacing_power`; ρ = 2 is the
            quadratic striding), `"logsnr"` (uniform in ρ(t)) or `"striding"` (the shared `striding` option). None
            (default): the NFE band's grid (`schedule_preset="auto"`), `"power"` for `"classic"`. Setting it (or
            `spacing_power`) selects the legacy grid from t = 1 to `sampling_eps`.
        spacing_power (`float`, *optional*): exponent of `time_spacing="power"`, in (0, 8]; None: 2.5.
        quadrature_nodes (`int`, defaults to 16): Gauss–Legendre nodes per quadrature piece, in [4, 64].
        euler_at_final (`bool`, defaults to False): the last multistep update (to the last grid time) at first order
            for any N (Diffusers' DPM-Solver option; `lower_order_final` does it only for N < 15).
        corrector (`str`, *optional*): `"none"` or `"unic"`; None (default): the NFE band's (`"unic"`). `"unic"` adds UniPC's corrector (Zhao et al. 2023, UniC): when call
            i + 1 receives x̂₀ at the state z_{i+1} that step i predicted, z_{i+1} is first recomputed with the
            weights of the same variation-of-constants integral whose Lagrange nodes include t_{i+1}
            ({t_{i+1}, t_i, ..., t_{i-p+1}} for a step of order p), and step i + 1 starts from the corrected
            state. This raises the local order of every step by one at no extra model evaluation (x̂₀_{i+1}
            itself is not re-evaluated). The final call's correction only moves the momentum half (its x half
            is x̂₀ of the predicted state).
        disable_corrector (`list` of `int`, *optional*): call indices i whose result is not corrected (as
            Diffusers' UniPC `disable_corrector`; e.g. `[0, 1, 2]` under strong guidance). Ignored unless
            `corrector="unic"`.
        analytic_first_step (`bool`, *optional*): None (default): the NFE band's (True). For a schedule whose first time t_0 is below 1
            (`sigma_max` below σ(1), or a `timesteps=` / `sigmas=` list), the step from t = 1 to t_0 is taken without
            a model evaluation at t = 1 (AMED's "analytical first step", Zhou et al. 2024, in data-prediction form).
            The first call receives the data-free state that :meth:`sample_prior` draws for such a schedule,
            N(0, Σ_{t_0}) = the flow Ψ(t_0, 1) z_1 of z_1 ~ N(0, Σ_1), and adds (a_{t_0} - Ψ(t_0, 1) a_1) x̂₀(t_0):
            the step's x̂₀ node is t_0, the first evaluation (exact for point-mass data, tested). This supplies the
            data term that the data-free start lacks and saves the evaluation at t = 1, where x̂₀ is nearly the data
            mean. Only for a loop that starts at call 0; no effect when t_0 = 1.
        schedule_preset (`str`, defaults to `"auto"`): what the keys left at None mean. `"auto"`: the measured
            defaults per NFE band (:mod:`~diffusers_psld.schedulers.nfe_bands`): for VP an EDM ρ = 7 grid from
            σ_max = 10 to σ_min = 0.16 with the UniC corrector and the analytic first step; for PSLD / CLD the
            same with σ_max = 10 up to 7 NFE and σ_max = 80 at 8–12 NFE, and `lower_order_final=False`; from 13
            NFE the classic power-2.5 grid from t = 1 to `sampling_eps` with the UniC corrector and
            `lower_order_final=True`. Measured on
            trained digits networks (N = 2000, offline FID, 5 seeds on the deciding cells): VP gDDIM at NFE 5 /
            10 / 20 beats Diffusers' UniPC and DPM-Solver++ on the same network (see the documentation's
            *Samplers* page for the figures). `"classic"`: the earlier fixed defaults (power-2.5 grid from t = 1
            to `sampling_eps`, no corrector, no analytic first step, `lower_order_final=True`). Explicitly set keys
            always win; :attr:`resolved_options` reports what `set_timesteps` built.

    The time grid: `time_grid` (shared by every class) when set, else `time_spacing` / `spacing_power`; the final
    call: `final_step` (`"euler"`: the first-order gDDIM step above; `"tweedie"`: x = x̂₀ as well, the momentum its
    posterior mean instead of Ψ(0, t)(z - a x̂₀)). The orders of the updates: :func:`multistep_orders`.
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
        sampler: Literal["gddim_multistep"] = "gddim_multistep",
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
        solver_order: int = 3,
        interpolation: Literal["logsnr", "time"] = "time",
        lower_order_final: Optional[bool] = None,
        time_spacing: Optional[Literal["striding", "logsnr", "power"]] = None,
        spacing_power: Optional[float] = None,
        quadrature_nodes: int = 16,
        euler_at_final: bool = False,
        corrector: Optional[Literal["none", "unic"]] = None,
        disable_corrector: Optional[List[int]] = None,
        analytic_first_step: Optional[bool] = None,
        schedule_preset: Literal["auto", "classic"] = "auto",
    ):
        self._setup()

    _samplers = ("gddim_multistep",)
    _setup_seconds_per_step = 1e-3  # quadrature coefficients: ~1 ms per step (set_timesteps warns above 5000)
    order = 1

    def _setup(self):
        cfg = self.config
        o = cfg.solver_order
        if isinstance(o, bool) or not isinstance(o, int) or o not in SOLVER_ORDERS:
            raise ValueError(f"`solver_order` must be one of {SOLVER_ORDERS}, got {o!r}")
        if cfg.corrector is not None and cfg.corrector not in CORRECTORS:
            raise ValueError(f"`corrector` must be one of {CORRECTORS} or None (the NFE band's), got {cfg.corrector!r}")
        band_for(1, 2, cfg.schedule_preset)  # ValueError for an unknown preset
        dc = cfg.disable_corrector
        if dc is not None and (not isinstance(dc, (list, tuple)) or any(
                isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0 for x in dc)):
            raise ValueError(f"`disable_corrector` must be a list of call indices (ints >= 0) or None, got {dc!r}")
        if dc is not None and any(not isinstance(x, int) for x in dc):  # NumPy ints: plain ints (the config is JSON)
            self.register_to_config(disable_corrector=[int(x) for x in dc])
        if cfg.interpolation not in INTERPOLATIONS:
            raise ValueError(f"`interpolation` must be one of {INTERPOLATIONS}, got {cfg.interpolation!r}")
        if not isinstance(cfg.euler_at_final, bool):
            raise ValueError(f"`euler_at_final` must be a bool, got {cfg.euler_at_final!r}")
        for name in ("lower_order_final", "analytic_first_step"):
            if getattr(cfg, name) is not None and not isinstance(getattr(cfg, name), bool):
                raise ValueError(f"`{name}` must be a bool or None (the NFE band's), got {getattr(cfg, name)!r}")
        if cfg.time_spacing is not None and cfg.time_spacing not in TIME_SPACINGS:
            raise ValueError(f"`time_spacing` must be one of {TIME_SPACINGS} or None, got {cfg.time_spacing!r}")
        if cfg.spacing_power is not None:
            check_real(cfg.spacing_power, "spacing_power", 0.0, strict=True, high=MAX_SPACING_POWER)
        check_quadrature_nodes(cfg.quadrature_nodes)
        if cfg.diffusion == "psld" and cfg.gamma == 0 and cfg.prediction_type == "epsilon":
            raise ValueError("`gamma` must be > 0 for GDDIMMultistepScheduler: for CLD (gamma = 0) gDDIM's rotated "
                             "basis uses ε_x, which a CLD network does not learn (use a C-channel prediction_type)")
        super()._setup()
        self._history: List[torch.Tensor] = []
        self._corrected_from = None  # (call index, state it started from) for the corrector
        self._afs = None  # analytic first step weight (set by set_timesteps)
        self._resolved = None  # the settings of the schedule set_timesteps built (`resolved_options`)

    def _legacy_grid(self):
        """gDDIM's legacy keys: ``time_spacing`` "power" (``spacing_power``), "logsnr", or "striding" (the shared one)."""
        cfg = self.config
        spacing = "power" if cfg.time_spacing is None else cfg.time_spacing
        if spacing == "striding":
            return super()._legacy_grid()
        if spacing == "power":
            return "power", DEFAULT_SPACING_POWER if cfg.spacing_power is None else float(cfg.spacing_power), "spacing_power"
        return "logsnr", None, "time_spacing"

    def _orders(self, n_steps: int) -> list:
        cfg = self.config
        return multistep_orders(n_steps, cfg.solver_order, self._option("lower_order_final"), cfg.euler_at_final)

    def _option(self, name: str):
        """A solver option of the schedule being built or last built: the config's value, else its NFE band's."""
        value = getattr(self.config, name)
        if value is not None:
            return value
        if self._resolved is None:
            raise RuntimeError("call `set_timesteps` first")
        return getattr(self._resolved.band, name)

    @property
    def resolved_options(self) -> dict:
        """What the last ``set_timesteps`` built with: ``{"band": "vp" | "phase" | "classic", "time_grid", "rho",
        "sigma_max", "sigma_min", "corrector", "analytic_first_step", "lower_order_final"}`` — config values where
        set, else the NFE band's (:mod:`~diffusers_psld.schedulers.nfe_bands`); ``sigma_max`` / ``sigma_min`` are the
        noise levels of the grid's first and last time. Raises ``ValueError`` before ``set_timesteps``."""
        if self._resolved is None or self._tables is None:
            raise ValueError("call `set_timesteps` first")
        r = self._resolved
        times = torch.tensor([self._grid_start, self._grid_end], dtype=torch.float64)
        s_hi, s_lo = (float(v) for v in noise_level(self.sde, times))
        return {"band": r.kind, "time_grid": r.grid, "rho": r.rho, "sigma_max": s_hi, "sigma_min": s_lo,
                **{name: self._option(name) for name in ("corrector", "analytic_first_step", "lower_order_final")}}

    def _band_grid(self, band):
        """``(grid, rho, t_lo, t_hi)`` of the band's named grid, or None where the config decides the grid (a
        ``time_grid`` / ``sigma_min`` / ``sigma_max`` key is set, a custom schedule is being built, or the band
        keeps the classic grid)."""
        cfg = self.config
        if (self._custom_grid is not None or band.time_grid is None or cfg.time_grid is not None
                or cfg.sigma_min is not None or cfg.sigma_max is not None or cfg.time_spacing is not None
                or cfg.spacing_power is not None):
            return None
        # σ_min is never below σ(sampling_eps): `sampling_eps` stays the schedule's smallest time
        lo, hi = (float(v) for v in noise_level(self.sde, torch.tensor([self._schedule.t_lo, 1.0],
                                                                         dtype=torch.float64)))
        s_hi = min(band.sigma_max, hi)
        s_lo = max(band.sigma_min, lo)
        if s_lo >= 0.5 * s_hi:  # a large sampling_eps or a weak recipe (small σ(1)) leaves no room: classic grid
            return None
        t_hi = 1.0 if s_hi >= hi else float(time_for_noise_level(self.sde, [s_hi])[0])
        t_lo = float(time_for_noise_level(self.sde, [s_lo])[0])
        return band.time_grid, band.rho, t_lo, t_hi

    def _grid(self, n: int) -> torch.Tensor:
        band_grid = None if self._resolved is None else self._resolved.band_grid
        if band_grid is None:
            return super()._grid(n)
        grid_name, rho, t_lo, t_hi = band_grid
        grid = named_grid(self.sde, grid_name, n, t_lo, t_hi, rho,
                          f"{grid_name!r} time grid with {n} steps (NFE band of schedule_preset='auto')")
        self._grid_start, self._grid_end = float(grid[0]), float(grid[-1])
        return grid

    def _build_calls(self, n: int) -> list:
        sde, k = self.sde, self.sde.k
        kind, band = band_for(k, n, self.config.schedule_preset)
        band_grid = self._band_grid(band)
        o = self._schedule
        grid_name, rho = (band_grid[0], band_grid[1]) if band_grid is not None else (
            "custom" if self._custom_grid is not None else o.grid, None if self._custom_grid is not None else o.rho)
        if rho is None and grid_name in DEFAULT_RHO:  # the exponent the grid really used
            rho = DEFAULT_RHO[grid_name]
        self._resolved = _Resolved(kind, band, grid_name, rho, band_grid)
        ts = self._grid(n - 1)
        eps = float(ts[-1])
        orders = self._orders(n - 1)
        psi, W, Wc = self._weights(ts, orders)
        W0 = torch.zeros(1, W.shape[1], k, dtype=torch.float64)
        if self.config.final_step == "tweedie":  # z' = G z + c x̂₀ (the posterior mean)
            G, c = sampling.posterior_mean_maps(sde, eps)
            psi0, W0[0, 0] = G[None], c
        else:  # final first-order step eps -> 0: W = a_0 - Ψ(0, eps) a_eps
            psi0 = gddim_transition(sde, [0.0], [eps])
            a0, ae = sde.hsm_kernel(torch.tensor([0.0, eps], dtype=torch.float64)).mean_coef
            W0[0, 0] = a0 - psi0[0] @ ae
        self._psi, self._W = torch.cat([psi, psi0]), torch.cat([W, W0])
        self._Wc = Wc  # [n - 1, order + 1, k] (None without corrector): corrects the state step i produced
        self._orders_used = orders + [1]
        afs = self._analytic_first_step_weight(ts)
        self._afs = None if afs is None else [float(c) for c in afs]  # plain floats: no float64 op in the loop
        # for warm-ups from a begin index
        self._grid_times, self._full = ts, (self._W, list(self._orders_used), self._Wc)
        # the step tables hold the first-order (gDDIM) affine map z' = P z + R ε (used for x̂₀, guidance's L_t)
        times = torch.cat([ts, torch.zeros(1, dtype=torch.float64)])
        kern = sde.hsm_kernel(times[:-1])
        wv = kern.mean_coef / (kern.mean_coef ** 2).sum(-1, keepdim=True)  # aᵀ/aᵀa
        w0 = self._W[:, 0, :, None] * wv[:, None, :]  # W_{i,0} wᵀ  [n, k, k]
        P, R = self._psi + w0, -w0 @ kern.chol
        return [_Calls([_AFFINE] * n, times[:-1].tolist(), P, R, None, (times[:-1] - times[1:]).tolist())]

    def _analytic_first_step_weight(self, ts):
        """``c = a_{t_0} - Ψ(t_0, 1) a_1`` (float64 k-vector) for ``analytic_first_step`` when the grid starts at
        t_0 < 1, else None: the first-order step 1 → t_0 whose x̂₀ node is t_0 adds ``c x̂₀(t_0)`` to the data-free
        flow Ψ(t_0, 1) z_1 of the prior draw."""
        t0 = float(ts[0])
        if not self._option("analytic_first_step") or t0 >= 1.0:
            return None
        a = self.sde.hsm_kernel(torch.tensor([t0, 1.0], dtype=torch.float64)).mean_coef
        return a[0] - gddim_transition(self.sde, [t0], [1.0])[0] @ a[1]

    def _weights(self, ts, orders):
        """Ψ, predictor weights W ``[n, max(3, order), k]`` and (``corrector="unic"``) corrector weights Wc
        ``[n, order + 1, k]`` for the multistep updates on the grid ``ts`` (float64, one shared quadrature)."""
        cfg = self.config
        width = max(3, cfg.solver_order)
        sets = [_past_nodes(orders)]
        corrector = self._option("corrector")
        if corrector == "unic":
            sets.append([[i + 1] + nd for i, nd in enumerate(sets[0])])
        Ws = step_weights(self.sde, ts, *sets, interpolation=cfg.interpolation, nodes=cfg.quadrature_nodes)
        W = torch.zeros(len(ts) - 1, width, self.sde.k, dtype=torch.float64)
        W[:, : Ws[0].shape[1]] = Ws[0]
        Wc = None
        if corrector == "unic":
            Wc = torch.zeros(len(ts) - 1, cfg.solver_order + 1, self.sde.k, dtype=torch.float64)
            Wc[:, : Ws[1].shape[1]] = Ws[1]
        t = torch.as_tensor(ts, dtype=torch.float64)
        return gddim_transition(self.sde, t[1:].tolist(), t[:-1].tolist()), W, Wc

    def _install_calls(self, runs, n_calls: int, device=None):
        super()._install_calls(runs, n_calls, device)
        self._history = []
        self._corrected_from = None
        self._ms_cache = {}
        self._warm_from = 0

    def set_begin_index(self, begin_index: int = 0):
        """As :meth:`PSLDScheduler.set_begin_index`; also prepares the lower-order warm-up weights from there
        (float64, CPU), so the sampling loop itself only uses cast tables."""
        super().set_begin_index(begin_index)
        if self._tables is not None:
            self._warm_up_from(self._begin_index)

    def _warm_up_from(self, k: int):
        """Orders and weights for a loop that begins at call ``k``: step i >= k uses order
        min(order_i, i - k + 1) (no x̂₀ before k), with W recomputed for each lowered order."""
        if k == self._warm_from:
            return
        W, orders, Wc = self._full[0].clone(), list(self._full[1]), self._full[2]
        Wc = None if Wc is None else Wc.clone()
        ts, n_ms = self._grid_times, len(self._grid_times) - 1  # multistep updates; the final step is first order
        for i in range(k, min(n_ms, k + self.config.solver_order - 1)):
            p = min(orders[i], i - k + 1)
            if p < orders[i]:
                sub = ts[i - p + 1: i + 2]
                _, Wp, Wcp = self._weights(sub, [1] * (p - 1) + [p])
                W[i] = Wp[-1]
                if Wc is not None:
                    Wc[i] = 0.0
                    Wc[i, : p + 1] = Wcp[-1, : p + 1]
                orders[i] = p
        self._W, self._Wc, self._orders_used, self._warm_from = W, Wc, orders, k
        self._ms_cache = {}

    def _ms_tables(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._ms_cache:
            self._ms_cache[key] = tuple(None if x is None else x.to(device=device, dtype=dtype)
                                        for x in (self._psi, self._W, self._Wc))
        return self._ms_cache[key]

    def _corrects(self, i: int) -> bool:
        """Whether call ``i`` corrects the state it received (the result of call i - 1 of this run)."""
        cfg = self.config
        return (self._option("corrector") == "unic" and self._corrected_from is not None and self._corrected_from[0] == i - 1
                and (i - 1) not in (cfg.disable_corrector or ()))

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ) -> Union[PSLDSchedulerOutput, Tuple]:
        """One multistep update (see the module docstring); ``generator`` is unused (deterministic) but validated
        like the other schedulers' (``TypeError`` for anything but None, a ``torch.Generator`` or a list of them)."""
        i, z, _, _, x0, work = self._begin_step(model_output, timestep, sample)
        check_generator(generator, z.shape[0])
        self._history = ([x0] + self._history)[: self.config.solver_order + 1]
        psi, W, Wc = self._ms_tables(sample.device, work)
        p = self._orders_used[i]
        if len(self._history) < p:  # not reachable through step(): the warm-up lowers the order
            raise RuntimeError(f"call {i} needs {p} past x̂₀ values, the loop has {len(self._history)}")
        if i == 0 and self._afs is not None and self._run_start == 0:  # analytic first step 1 -> t_0
            z = z + torch.cat([c * x0 for c in self._afs], dim=1).to(work)
        if self._corrects(i):  # UniC: redo step i - 1 with x̂₀ at its end point among the nodes
            z = self._combine(psi[i - 1], self._corrected_from[1], Wc[i - 1], self._orders_used[i - 1] + 1)
        if self._option("corrector") == "unic":
            self._corrected_from = (i, z)
        out = self._combine(psi[i], z, W[i], p)
        return self._end_step(out, x0, sample, return_dict)

    def _combine(self, psi, z, W, p):
        """Ψ z + Σ_{j<p} W_j x̂₀_j over the newest ``p`` x̂₀ values (k-vector weights act per component)."""
        out = blocks.apply(psi, z)
        k = self.sde.k
        for j in range(p):
            xj = self._history[j]
            out = out + torch.cat([W[j, c] * xj for c in range(k)], dim=1)
        return out

    def _on_first_step(self):
        super()._on_first_step()
        self._history = []
        self._corrected_from = None
        self._warm_up_from(self._step_index)
