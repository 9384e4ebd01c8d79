r"""Adaptive probability-flow ODE sampler (Dormand–Prince RK45) for the recipe diffusions.

Integrates the probability-flow ODE (PSLD paper Eq. 11 without noise, Song et al. 2021)

    dz/dt = β_t F z + β_t D L_t^{-T} ε_θ(z, t)        (score = -L_t^{-T} ε)

from t = 1 down to ``sampling_eps`` with an embedded Dormand–Prince 5(4) method and adaptive step
size (``torchdiffeq.odeint(method="dopri5")``, or SciPy's ``solve_ivp(method="RK45")``), in float64, then takes the same final noiseless denoising step to t = 0 as the
deterministic :class:`~diffusers_psld.PSLDScheduler` samplers (probability-flow Euler; one call).
This is the PSLD paper's "PF-ODE (RK45)" sampler.

It cannot be a step-by-step Diffusers scheduler: the accepted step sizes and the number of model
evaluations depend on the error estimates of the model outputs, so the time grid is not known in
``set_timesteps``. It is therefore a function that owns the loop; the NFE it used (all model calls,
rejected steps included, plus the final call) is returned with the samples. The error norm of
torchdiffeq is the RMS over the whole batch, so the step sequence (and NFE) depends on the batch. The solve is
bounded (``max_nfe``, ``max_seconds``), shows progress, and names non-finite model outputs and step-size
failures (:mod:`diffusers_psld.ode_solve`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import parameterization, sampling
from .ode_solve import DEFAULT_MAX_NFE, ODESolveError, solve_ode  # noqa: F401  (ODESolveError: documented here)
from .pipelines.guidance import check_finite
from .sde import RecipeSDE, blocks

__all__ = ["probability_flow_sample", "ODESampleOutput", "ODE_METHODS"]

ODE_METHODS = ("dopri5", "scipy_rk45")  # adaptive RK45: torchdiffeq / SciPy solve_ivp


@dataclass
class ODESampleOutput:
    """Result of :func:`probability_flow_sample`.

    Args:
        samples: final states ``[B, k*C, ...]`` at t = 0 (the data half is ``blocks.project(samples, k)``).
        nfe: the exact number of model evaluations used (ODE solve + final denoising call).
        nfe_ode: model evaluations inside the ODE solve.
    """

    samples: torch.Tensor
    nfe: int
    nfe_ode: int


def _check_tol(value, name: str) -> float:
    if isinstance(value, bool):
        raise ValueError(f"`{name}` must be a positive real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` must be a positive real number, got {value!r}") from err
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"`{name}` must be finite and > 0, got {value!r}")
    return v


def probability_flow_sample(
    model: Callable[[torch.Tensor, float], torch.Tensor],
    sde: RecipeSDE,
    z_init: torch.Tensor,
    rtol: float = 1e-5,
    atol: float = 1e-5,
    sampling_eps: float = 1e-3,
    method: str = "dopri5",
    t_start: float = 1.0,
    denoise: bool = True,
    project_eps: bool = False,
    prediction_type: str = "epsilon",
    max_nfe: int = DEFAULT_MAX_NFE,
    max_seconds: Optional[float] = None,
    progress: Optional[bool] = None,
) -> ODESampleOutput:
    """Sample by integrating the probability-flow ODE with adaptive Dormand–Prince RK45.

    Args:
        model: ``model(z, t) -> output`` with ``z`` ``[B, k*C, ...]`` (float32 unless the input is float64)
            and ``t`` the forward time as a Python float; the output is of ``prediction_type``. For a UNet use
            ``lambda z, t: unet(scheduler.scale_model_input(z, t), scheduler.model_time(t, z.shape[0])).sample``
            (``scale_model_input`` applies the scheduler's input preconditioning, if any).
        sde: the :class:`~diffusers_psld.RecipeSDE` (``scheduler.sde``).
        z_init: the prior sample at ``t_start`` (``scheduler.sample_prior(...)``).
        rtol, atol: relative / absolute tolerances of the step-size control (> 0).
        sampling_eps: the ODE is solved down to this time (in (0, t_start)).
        method: ``"dopri5"`` (torchdiffeq) or ``"scipy_rk45"`` (SciPy ``RK45`` via torchdiffeq).
        t_start: initial forward time, default 1.
        denoise: take the final probability-flow Euler step from ``sampling_eps`` to 0 (one call).
        project_eps: replace the model's ε by the consistent ε' = L⁻¹(z - a x̂₀) at every evaluation
            (:func:`diffusers_psld.sampling.eps_projection`; the schedulers' ``project_eps``). Needs Γ > 0
            for k = 2 and ``prediction_type="epsilon"`` (the C-channel types are consistent: it is the identity).
        prediction_type: the model's output, ``"epsilon"`` (k*C channels), ``"sample"`` or
            ``"sufficient_epsilon"`` (C channels); converted to ε with :mod:`diffusers_psld.parameterization`
            (``scheduler.config.prediction_type``).
        max_nfe: bound on model evaluations inside the ODE solve (default 5000; a trained model takes a few
            hundred at the default tolerances). A noisy or discontinuous model output makes the step size
            shrink without end: the solve stops there with :class:`~diffusers_psld.ode_solve.ODESolveError`.
        max_seconds: optional wall-time bound of the solve.
        progress: tqdm bar over the time interval (``None``: only when stderr is a terminal).

    Returns:
        :class:`ODESampleOutput` with the samples and the exact NFE.

    Raises:
        ODESolveError: the work bound was reached or the step size underflowed (how far it got, what to change).
        NonFiniteError: the model returned a NaN/inf (named with the time and evaluation number).
    """
    rtol = _check_tol(rtol, "rtol")
    atol = _check_tol(atol, "atol")
    t_start = _check_tol(t_start, "t_start")
    eps = _check_tol(sampling_eps, "sampling_eps")
    if eps >= t_start:
        raise ValueError(f"`sampling_eps` ({sampling_eps}) must be < `t_start` ({t_start})")
    if method not in ODE_METHODS:
        raise ValueError(f"`method` must be one of {ODE_METHODS}, got {method!r}")
    if not isinstance(z_init, torch.Tensor) or z_init.ndim < 2 or z_init.shape[1] % sde.k != 0:
        raise ValueError(f"`z_init` must be a tensor [B, {sde.k}*C, ...], got "
                         f"{tuple(z_init.shape) if isinstance(z_init, torch.Tensor) else type(z_init)}")
    if not isinstance(project_eps, bool):
        raise ValueError(f"`project_eps` must be a bool, got {project_eps!r}")
    parameterization.check_prediction_type(prediction_type)
    if project_eps and prediction_type == "epsilon":
        sampling.check_eps_projection(sde)
    model_dtype = torch.float64 if z_init.dtype == torch.float64 else torch.float32
    counter = [0]

    def call(z, tf):
        eps_out = model(z.to(model_dtype), tf).to(torch.float64)
        counter[0] += 1
        if prediction_type != "epsilon":
            eps_out = parameterization.maps_for_times(sde, prediction_type, tf).to_eps(eps_out, z)
        if project_eps:
            kern = sde.hsm_kernel(tf)
            Mz, Me = sampling.eps_projection(kern.mean_coef, kern.chol)
            eps_out = blocks.apply(Mz, z) + blocks.apply(Me, eps_out)
        return eps_out

    def rhs(t, z):
        tf = float(t)
        P, R = sampling.pf_drift(sde, tf)
        return blocks.apply(P, z) + blocks.apply(R, call(z, tf))

    z0 = z_init.to(torch.float64)
    # dopri5's step_t: the last accepted step ends exactly at sampling_eps (no evaluation beyond it, where
    # torchdiffeq would otherwise step past the end and interpolate)
    options = {"step_t": torch.tensor([eps], dtype=torch.float64)} if method == "dopri5" else None
    z, _ = solve_ode(rhs, z0, t_start, eps, method=method, rtol=rtol, atol=atol, options=options, max_nfe=max_nfe,
                     max_seconds=max_seconds, progress=progress, what="probability_flow_sample")
    nfe_ode = counter[0]
    if denoise:
        P, R, _ = sampling.pf_euler_step(sde, eps, 0.0)
        z = blocks.apply(P, z) + blocks.apply(R, check_finite(call(z, eps), f"the model output at t = {eps:g} (final "
                                                              "denoising step)", "check the model's weights and input"))
    return ODESampleOutput(samples=z.to(z_init.dtype), nfe=counter[0], nfe_ode=nfe_ode)
