r"""Negative log-likelihood (bits/dim) through the probability-flow ODE.

Maths
-----
The PF-ODE of a recipe diffusion is, in forward time, ``dz/dt = f̄(z, t) = P(t) z + S(t) ∇log p_t(z)``
with ``(P, S) = sde.reverse_drift_matrices(t, probability_flow=True)`` acting as ``M ⊗ I``. Along a
trajectory the instantaneous change of variables gives ``d log p_t(z_t)/dt = -∇·f̄(z_t, t)``, so with
integration from ``t = eps`` to ``1``::

    -log p_eps(z_eps) = -log p_1(z_1) - ∫_eps^1 ∇·f̄(z_t, t) dt,      p_1 ≈ prior N(0, diag(masses)).

The divergence is split into the exact linear part ``d · tr P(t)`` (d = data dims per component) and
the score part ``∇·(S ∇log p)``, the latter either exact (full Jacobian, small d only) or by the
Hutchinson estimator ``E_v[vᵀ J v]`` with one Rademacher/Gaussian ``v`` per trajectory (unbiased).

Augmented diffusions (k > 1, PSLD/CLD): the ODE gives ``log p_eps(x, m₀)`` for a draw of the initial
auxiliaries ``m₀ ~ q = N(0, κ·M)`` (the HSM initial law, independent of x). Since
``E_q[-log p(x, m₀)] - H(q) = -log p(x) + KL(q ‖ p(m₀|x)) ≥ -log p(x)`` (and KL = 0 at t = 0 because
m₀ is drawn independently of x), subtracting the entropy ``H(q) = Σ_j ½ d (1 + log 2π κ M_j)``
yields an (upper) bound on -log p(x), as in CLD-SGM (``likelihood.py``); the official PSLD code omits
this correction and reports the joint NLL of (x, m₀).

Discrete images (``n_bins`` levels, 8-bit: 256): with uniform dequantisation ``y = (k + u)/n_bins``,
``u ~ U[0,1)^d`` and the model's data in ``x = 2y - 1 ∈ [-1, 1]``,
``P(k) = ∫ p_y((k+u)/n_bins) n_bins^{-d} du`` and ``p_y(y) = 2^d p_x(2y - 1)``, hence by Jensen::

    -log₂ P(k) / d ≤ E_u[-log p_x(x)] / (d ln 2) + log₂(n_bins) - 1,

i.e. the offset is ``log₂(n_bins / 2)`` = **+7 bits/dim for 256 levels** with data in [-1, 1]
(the same +7 as CLD-SGM's ``bpd = nll / (d ln 2) + 7``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from .. import training_record
from ..ode_solve import DEFAULT_MAX_NFE, solve_ode
from ..pipelines.guidance import check_finite
from ..sampling import check_eps_projection
from ..sde import RecipeSDE, blocks

__all__ = [
    "ScoreFn",
    "LikelihoodResult",
    "exact_score_fn",
    "eps_model_score_fn",
    "prior_logp",
    "aux_entropy",
    "dequantize",
    "bpd_offset",
    "ode_likelihood",
    "bits_per_dim",
    "sample_aux",
]

#: ``score_fn(z, t) -> ∇_z log p_t(z)`` for states ``[B, k*C, ...]`` and a float forward time t.
ScoreFn = Callable[[torch.Tensor, float], torch.Tensor]

SOLVERS = ("dopri5", "rk4", "euler", "scipy_rk45")
ESTIMATORS = ("hutchinson", "exact")
NOISES = ("rademacher", "gaussian")


@dataclass
class LikelihoodResult:
    """Per-sample results of :func:`ode_likelihood` / :func:`bits_per_dim`.

    Attributes:
        nll: ``[B]`` nats for the data part (entropy correction applied when k > 1 and requested).
        bpd: ``[B]`` bits per data dimension (including the dequantisation offset for images).
        joint_nll: ``[B]`` nats of ``-log p_eps(z_eps)`` for the full state (x and auxiliaries).
        prior_logp: ``[B]`` ``log p_prior(z_1)``.
        delta_logp: ``[B]`` ``∫ div f̄ dt``.
        nfe: number of drift evaluations by the solver.
        z1: ``[B, k*C, ...]`` the state at t = 1.
    """

    nll: torch.Tensor
    bpd: torch.Tensor
    joint_nll: torch.Tensor
    prior_logp: torch.Tensor
    delta_logp: torch.Tensor
    nfe: int
    z1: torch.Tensor


# ---------------------------------------------------------------------------------------- scores
def exact_score_fn(mixture, sde: RecipeSDE) -> ScoreFn:
    """Score callable from :class:`diffusers_psld.exact.GaussianMixture` for states ``[B, k*d]``."""

    def fn(z: torch.Tensor, t: float) -> torch.Tensor:
        return mixture.score(sde, z, float(t)).to(z.dtype)

    return fn


def eps_model_score_fn(unet, scheduler, project_eps: Optional[bool] = None) -> ScoreFn:
    """Score callable from an ε-prediction network and a :class:`PSLDScheduler`.

    ``unet(scheduler.scale_model_input(z, t), scheduler.model_time(t, B))`` may return a tensor or an object with
    ``.sample`` (diffusers ``UNet2DModel``) of the scheduler's ``prediction_type``; it is converted to ε with
    ``scheduler.model_output_to_eps`` and the score is ``scheduler.eps_to_score(ε, t) = -L_t^{-T} ε``.
    ``project_eps`` (default: the scheduler's ``config.project_eps``) first replaces ε by the consistent
    ε' (:meth:`PSLDScheduler.consistent_eps`), so the likelihood is that of the ODE the projected samplers
    integrate. ``ValueError`` if the scheduler contradicts the network's training record
    (:mod:`diffusers_psld.training_record`).
    """
    training_record.check(unet, scheduler)  # the recipe / prediction_type the network records, if any
    if project_eps is None:
        project_eps = bool(getattr(scheduler.config, "project_eps", False))
    if not isinstance(project_eps, bool):
        raise ValueError(f"`project_eps` must be a bool or None, got {project_eps!r}")
    ptype = getattr(scheduler.config, "prediction_type", "epsilon")
    if project_eps and ptype == "epsilon":
        check_eps_projection(scheduler.sde)

    def fn(z: torch.Tensor, t: float) -> torch.Tensor:
        param = next(iter(unet.parameters()), None) if hasattr(unet, "parameters") else None
        dtype = param.dtype if param is not None else z.dtype
        out = unet(scheduler.scale_model_input(z, float(t)).to(dtype), scheduler.model_time(t, z.shape[0], device=z.device))
        eps = out.sample if hasattr(out, "sample") else out
        eps = scheduler.model_output_to_eps(eps.to(z.dtype), z, float(t)).to(z.dtype)
        if project_eps:
            eps = scheduler.consistent_eps(z, eps, float(t))
        return scheduler.eps_to_score(eps, float(t))

    return fn


# ---------------------------------------------------------------------------------------- densities
def prior_logp(sde: RecipeSDE, z: torch.Tensor) -> torch.Tensor:
    """``log N(z; 0, diag(masses) ⊗ I)`` per sample for states ``[B, k*C, ...]``."""
    k = sde.k
    comps = z.reshape(z.shape[0], k, -1)
    d = comps.shape[-1]
    m = sde.masses.to(device=z.device, dtype=z.dtype)
    quad = (comps ** 2).sum(-1) / m  # [B, k]
    return (-0.5 * quad - 0.5 * d * torch.log(2 * math.pi * m)).sum(-1)


def aux_entropy(sde: RecipeSDE, data_dims: int) -> float:
    """Entropy (nats) of the initial auxiliaries q(m₀) = N(0, κ·M_j) for components j = 2..k."""
    if sde.k == 1:
        return 0.0
    var = sde.kappa * sde.masses[1:]
    return float((0.5 * data_dims * (1.0 + torch.log(2 * math.pi * var))).sum())


def bpd_offset(n_bins: int = 256) -> float:
    """Bits/dim added to the continuous NLL of data in [-1, 1] for ``n_bins``-level images: log₂(n_bins/2)."""
    if isinstance(n_bins, bool) or not isinstance(n_bins, int) or n_bins < 2:
        raise ValueError(f"`n_bins` must be an int >= 2, got {n_bins!r}")
    return math.log2(n_bins / 2)


def dequantize(images: torch.Tensor, n_bins: int = 256, generator: Optional[torch.Generator] = None,
               dtype=torch.float64) -> torch.Tensor:
    """Uniform dequantisation of integer images in ``{0, …, n_bins-1}`` to ``[-1, 1]``: ``2 (k + u)/n_bins - 1``."""
    bpd_offset(n_bins)
    k = images.to(dtype)
    if torch.any(k < 0) or torch.any(k > n_bins - 1) or torch.any(k != k.round()):
        raise ValueError(f"`images` must hold integers in [0, {n_bins - 1}] (e.g. uint8), got range "
                         f"[{k.min().item()}, {k.max().item()}]")
    u = torch.rand(k.shape, generator=generator, dtype=dtype, device=images.device)
    return 2.0 * (k + u) / n_bins - 1.0


# ---------------------------------------------------------------------------------------- divergence
def _exact_divergence(g: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """tr(∂g/∂z) per sample via one backward pass per dimension (small states only)."""
    b = z.shape[0]
    gf, n = g.reshape(b, -1), z[0].numel()
    div = torch.zeros(b, dtype=z.dtype, device=z.device)
    for i in range(n):
        (grad,) = torch.autograd.grad(gf[:, i].sum(), z, retain_graph=True)
        div = div + grad.reshape(b, -1)[:, i]
    return div


def _hutchinson_divergence(g: torch.Tensor, z: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """vᵀ (∂g/∂z) v per sample (one vector-Jacobian product)."""
    (grad,) = torch.autograd.grad((g * v).sum(), z)
    return (grad * v).reshape(z.shape[0], -1).sum(-1)


# ---------------------------------------------------------------------------------------- ODE
def ode_likelihood(
    sde: RecipeSDE,
    score_fn: ScoreFn,
    z0: torch.Tensor,
    eps: float = 1e-5,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    method: str = "dopri5",
    estimator: str = "hutchinson",
    noise: str = "rademacher",
    generator: Optional[torch.Generator] = None,
    entropy_correction: bool = True,
    n_bins: Optional[int] = None,
    dtype=torch.float64,
    max_nfe: int = DEFAULT_MAX_NFE,
    max_seconds: Optional[float] = None,
    progress: Optional[bool] = None,
) -> LikelihoodResult:
    """Integrate the PF-ODE from ``eps`` to 1 with the log-density change; NLL and bits/dim of ``z0``.

    Args:
        sde: the diffusion (``scheduler.sde``).
        score_fn: ``(z, t) -> ∇log p_t(z)`` (see :func:`exact_score_fn`, :func:`eps_model_score_fn`).
        z0: initial states ``[B, k*C, ...]`` at time ``eps``: data first, then the auxiliaries (draw
            them with :func:`bits_per_dim` or ``m₀ ~ N(0, κ M)`` yourself).
        eps: start time in (0, 1).
        rtol, atol: solver tolerances (> 0; unused by fixed-step methods).
        method: torchdiffeq method (``"dopri5"``, ``"rk4"``, ``"euler"``; fixed-step ones take
            ``step_size = (1 - eps) / 100``) or ``"scipy_rk45"`` (scipy ``solve_ivp``, as CLD-SGM).
        estimator: ``"hutchinson"`` (one probe vector per trajectory) or ``"exact"`` (full Jacobian trace;
            one backward pass per state dimension, small states only).
        noise: Hutchinson probe distribution, ``"rademacher"`` or ``"gaussian"``.
        generator: for the probe vectors.
        entropy_correction: subtract H(m₀) for k > 1 so the NLL bounds -log p(x).
        n_bins: if given, add the dequantisation offset log₂(n_bins/2) to the bits/dim.
        dtype: integration dtype (float64 default).
        max_nfe: bound on drift evaluations (default 5000; a trained model takes a few hundred with dopri5 at
            the default tolerances). A noisy or discontinuous score makes adaptive steps shrink without end: the
            solve stops there with :class:`~diffusers_psld.ode_solve.ODESolveError`.
        max_seconds: optional wall-time bound of the solve.
        progress: tqdm bar over [eps, 1] (``None``: only when stderr is a terminal).

    Raises:
        ValueError: a bad argument.
        ODESolveError: the work bound was reached or the step size underflowed (how far it got, what to change).
        NonFiniteError: ``score_fn`` returned a NaN/inf (named with the time and the evaluation number).
    """
    if not (isinstance(eps, (int, float)) and 0.0 < eps < 1.0):
        raise ValueError(f"`eps` must be in (0, 1), got {eps!r}")
    for name, val in (("rtol", rtol), ("atol", atol)):
        if not (isinstance(val, (int, float)) and val > 0):
            raise ValueError(f"`{name}` must be > 0, got {val!r}")
    if method not in SOLVERS:
        raise ValueError(f"`method` must be one of {SOLVERS}, got {method!r}")
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}")
    if noise not in NOISES:
        raise ValueError(f"`noise` must be one of {NOISES}, got {noise!r}")
    k = sde.k
    if z0.ndim < 2 or z0.shape[1] % k != 0:
        raise ValueError(f"`z0` must have shape [B, {k}*C, ...] ({k} stacked components), got {tuple(z0.shape)}")

    z0 = z0.detach().to(dtype)
    shape, b = z0.shape, z0.shape[0]
    d = z0[0].numel() // k  # data dims per component
    if estimator == "hutchinson":
        if noise == "rademacher":
            v = torch.randint(0, 2, shape, generator=generator, dtype=torch.int64).to(z0.device, dtype) * 2 - 1
        else:
            v = torch.randn(shape, generator=generator, dtype=dtype).to(z0.device)
    nfe = [0]

    def drift_and_div(t: float, z: torch.Tensor):
        nfe[0] += 1
        P, S = sde.reverse_drift_matrices(t, probability_flow=True)
        with torch.enable_grad():
            zz = z.detach().requires_grad_(True)
            score = score_fn(zz, t)
            check_finite(score, f"the score at t = {t:.6g} (drift evaluation {nfe[0]})",
                         "the score function / model output is NaN or inf: check the model's weights and input range")
            g = blocks.apply(S, score)
            div = _exact_divergence(g, zz) if estimator == "exact" else _hutchinson_divergence(g, zz, v)
        f = blocks.apply(P, z) + g.detach()
        return f.detach(), div.detach() + d * float(torch.diagonal(P).sum())

    def func(t: float, state):
        f, div = drift_and_div(t, state[0])
        return f, div

    opts = None if method in ("dopri5", "scipy_rk45") else {"step_size": (1.0 - eps) / 100}
    (z1, delta), _ = solve_ode(func, (z0, torch.zeros(b, dtype=dtype, device=z0.device)), eps, 1.0, method=method,
                               rtol=rtol, atol=atol, options=opts, max_nfe=max_nfe, max_seconds=max_seconds,
                               progress=progress, what="likelihood ODE")

    lp = prior_logp(sde, z1)
    joint_nll = -(lp + delta)
    nll = joint_nll - (aux_entropy(sde, d) if entropy_correction else 0.0)
    bpd = nll / (d * math.log(2.0))
    if n_bins is not None:
        bpd = bpd + bpd_offset(n_bins)
    return LikelihoodResult(nll=nll, bpd=bpd, joint_nll=joint_nll, prior_logp=lp, delta_logp=delta,
                            nfe=nfe[0], z1=z1)


def sample_aux(sde: RecipeSDE, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Stack data ``x`` ``[B, C, ...]`` with initial auxiliaries m₀ ~ N(0, κ·M_j) (HSM law) → ``[B, kC, ...]``."""
    if sde.k == 1:
        return x
    std = (sde.kappa * sde.masses[1:]).sqrt().to(x.dtype)
    aux = torch.randn((x.shape[0], (sde.k - 1) * x.shape[1], *x.shape[2:]), generator=generator,
                      dtype=x.dtype).to(x.device)
    aux = (aux.reshape(x.shape[0], sde.k - 1, -1) * std[None, :, None].to(x.device)).reshape(aux.shape)
    return blocks.lift(x, sde.k, aux)


def bits_per_dim(
    sde: RecipeSDE,
    score_fn: ScoreFn,
    images: torch.Tensor,
    n_bins: Optional[int] = 256,
    generator: Optional[torch.Generator] = None,
    **kwargs,
) -> LikelihoodResult:
    """Bits/dim of data ``[B, C, ...]``: dequantise (if ``n_bins``), draw m₀, integrate the PF-ODE.

    Args:
        images: integer images in ``{0, …, n_bins-1}`` (e.g. uint8) when ``n_bins`` is given; otherwise
            continuous data already in the model's space ([-1, 1] for images).
        n_bins: quantisation levels (256 for 8-bit) or ``None`` for continuous data (no offset).
        generator: drives dequantisation noise, m₀ and the Hutchinson probes.
        **kwargs: forwarded to :func:`ode_likelihood` (``eps``, ``rtol``, ``atol``, ``method``, ...).
    """
    dtype = kwargs.get("dtype", torch.float64)
    x = dequantize(images, n_bins, generator, dtype) if n_bins is not None else images.to(dtype)
    z0 = sample_aux(sde, x, generator)
    return ode_likelihood(sde, score_fn, z0, generator=generator, n_bins=n_bins, **kwargs)
