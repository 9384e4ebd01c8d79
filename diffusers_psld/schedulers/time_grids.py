r"""Time grids of the schedulers: small pure functions of descending float64 forward times, and the noise level σ_t.

**Noise level.** For the HSM kernel ``z_t = a_t x₀ + L_t ε`` the sufficient statistic of x₀ in z_t is a VP-like
channel with signal-to-noise ratio ``SNR_t = aᵀΣ_t⁻¹a`` (:func:`diffusers_psld.parameterization.snr`), so

    σ_t = (aᵀ Σ_t⁻¹ a)^{-1/2}

is the noise level of an equivalent VE / EDM model (for VP, σ_t = σ/α = √((1 - ᾱ)/ᾱ), the σ of Karras et al. and
of diffusers' Euler / DPM-Solver schedulers). σ_t increases from 0 at t = 0 to σ(1) (about 258 for the PSLD preset,
152 for VP, 248 for CLD), so EDM's ρ-schedule, Karras σ and Align-Your-Steps σ lists mean the same thing here.
:func:`noise_level` computes σ_t, :func:`time_for_noise_level` inverts it (float64; closed form for k = 1 (VP),
else bracketed root finding on a log-σ table, relative error <= 1e-12; :mod:`diffusers_psld.sde.noise_level`).

**Grids** (``n`` steps → ``n + 1`` times from ``t_hi`` down to ``t_lo``, end points exact, strictly decreasing):

=============  ================================================================================
name           grid
=============  ================================================================================
``uniform``    uniform in t
``power``      t = t_lo + (t_hi - t_lo) s^ρ, s uniform in [0, 1]: ρ = 2 is the quadratic striding, 2.5
               gDDIM's default; larger ρ puts more steps at small t
``logsnr``     uniform in log σ_t (= uniform in log-SNR; DPM-Solver's λ)
``edm``        EDM's ρ-schedule in σ: σ^{1/ρ} uniform between σ(t_hi) and σ(t_lo) (ρ = 7 in EDM)
=============  ================================================================================

An optimized grid is a list passed as ``timesteps=`` / ``sigmas=`` to ``set_timesteps`` (or stored in the
scheduler config as ``custom_timesteps`` / ``custom_sigmas``); :func:`check_custom_grid` validates it.
"""
from __future__ import annotations

import numbers
from typing import Optional, Sequence

import numpy as np
import torch

from .. import parameterization
from ..sde.noise_level import NoiseLevel

__all__ = ["STRIDINGS", "TIME_GRIDS", "DEFAULT_RHO", "MAX_POWER_RHO", "MAX_EDM_RHO", "MIN_TIME", "time_grid",
           "uniform_grid", "power_grid", "logsnr_grid", "edm_grid", "named_grid", "noise_level",
           "time_for_noise_level", "min_time", "check_custom_grid"]

STRIDINGS = ("uniform", "quadratic")
TIME_GRIDS = ("uniform", "power", "logsnr", "edm")
#: The default ρ of each grid when the config leaves it unset (the quadratic striding for "power", EDM's 7 for "edm").
DEFAULT_RHO = {"power": 2.0, "edm": 7.0}
#: The largest ρ of the power grid. Already at ρ = 8 the grid puts ~60 % of the steps below t = 0.01 (ρ = 2-3 is the useful
#: range); larger powers collapse the last grid points onto the last time in float64
MAX_POWER_RHO = 8.0
#: largest ρ of the EDM grid (ρ → ∞ is the log-σ grid; EDM uses 7)
MAX_EDM_RHO = 1000.0
#: smallest forward time a schedule may list (or the scheduler's ``sampling_eps`` if that is smaller). σ(1e-5) is
#: 8.9e-4 for the PSLD preset, 1.0e-3 for VP and 8.2e-7 for CLD, so EDM's σ_min = 0.002 is inside every preset's range.
MIN_TIME = 1e-5



def time_grid(n: int, eps: float, striding: str) -> torch.Tensor:
    """The shared ``striding`` option: ``n + 1`` descending float64 forward times from 1 to ``eps``, uniform or
    quadratic (= :func:`power_grid` with ρ = 2)."""
    frac = (n - torch.arange(n + 1, dtype=torch.float64)) / n  # 1 → 0
    if striding == "uniform":
        grid = eps + (1.0 - eps) * frac
    elif striding == "quadratic":
        grid = eps + (1.0 - eps) * frac ** 2
    else:
        raise ValueError(f"`striding` must be one of {STRIDINGS}, got {striding!r}")
    grid[0], grid[-1] = 1.0, eps  # exact end points
    return grid


def _frac(n: int) -> np.ndarray:
    return (n - np.arange(n + 1, dtype=np.float64)) / n  # 1 → 0


def _finish(grid: np.ndarray, t_lo: float, t_hi: float, what: str) -> torch.Tensor:
    grid[0], grid[-1] = t_hi, t_lo  # exact end points
    if not np.all(np.diff(grid) < 0):
        i = int(np.argmax(np.diff(grid) >= 0))
        raise ValueError(f"the {what} repeats a time in float64 at grid point {i + 1} (t = {float(grid[i + 1])!r}, "
                         f"near its last time {t_lo:g}): lower the exponent or `num_inference_steps`")
    return torch.from_numpy(grid)


def uniform_grid(n: int, t_lo: float, t_hi: float = 1.0) -> torch.Tensor:
    """``n + 1`` times uniform in t from ``t_hi`` down to ``t_lo``."""
    return _finish(t_lo + (t_hi - t_lo) * _frac(n), t_lo, t_hi, f"uniform grid with {n} steps")


def power_grid(n: int, t_lo: float, t_hi: float = 1.0, rho: float = 2.0, what: str = "") -> torch.Tensor:
    """``n + 1`` times ``t_lo + (t_hi - t_lo) s^ρ`` with s uniform from 1 down to 0."""
    return _finish(t_lo + (t_hi - t_lo) * _frac(n) ** rho, t_lo, t_hi, what or f"power grid with {n} steps (rho={rho})")


def logsnr_grid(sde, n: int, t_lo: float, t_hi: float = 1.0) -> torch.Tensor:
    """``n + 1`` times uniform in log σ_t (log-SNR) from ``t_hi`` down to ``t_lo``."""
    hi, lo = np.log(noise_level(sde, [t_hi, t_lo]))
    grid = np.empty(n + 1)
    grid[1:-1] = time_for_noise_level(sde, np.exp(hi + (lo - hi) * (1.0 - _frac(n)[1:-1])))
    return _finish(grid, t_lo, t_hi, f"log-SNR grid with {n} steps")


def edm_grid(sde, n: int, t_lo: float, t_hi: float = 1.0, rho: float = 7.0) -> torch.Tensor:
    """``n + 1`` times whose σ_t follow EDM's ρ-schedule (Karras et al. 2022, Eq. 5):
    σ_i = (σ_max^{1/ρ} + i/n (σ_min^{1/ρ} - σ_max^{1/ρ}))^ρ between σ(t_hi) and σ(t_lo)."""
    s_hi, s_lo = noise_level(sde, [t_hi, t_lo])
    ramp = 1.0 - _frac(n)[1:-1]
    sig = (s_hi ** (1.0 / rho) + ramp * (s_lo ** (1.0 / rho) - s_hi ** (1.0 / rho))) ** rho
    grid = np.empty(n + 1)
    grid[1:-1] = time_for_noise_level(sde, sig)
    return _finish(grid, t_lo, t_hi, f"EDM grid with {n} steps (rho={rho})")


def named_grid(sde, name: str, n: int, t_lo: float, t_hi: float = 1.0, rho: Optional[float] = None,
               what: str = "") -> torch.Tensor:
    """The grid ``name`` (one of ``TIME_GRIDS``) with ``n`` steps from ``t_hi`` to ``t_lo`` (ρ defaults:
    :data:`DEFAULT_RHO`)."""
    if name == "uniform":
        return uniform_grid(n, t_lo, t_hi)
    if name == "power":
        return power_grid(n, t_lo, t_hi, DEFAULT_RHO["power"] if rho is None else float(rho), what)
    if name == "logsnr":
        return logsnr_grid(sde, n, t_lo, t_hi)
    if name == "edm":
        return edm_grid(sde, n, t_lo, t_hi, DEFAULT_RHO["edm"] if rho is None else float(rho))
    raise ValueError(f"`time_grid` must be one of {TIME_GRIDS} (or None), got {name!r}")


# ---------------------------------------------------------------------------------------------- noise level
def noise_level(sde, t) -> np.ndarray:
    """σ_t = (aᵀΣ_t⁻¹a)^{-1/2} (float64 array of ``t``'s size) for forward times ``t`` in (0, 1]."""
    tt = torch.as_tensor(np.asarray(t, dtype=np.float64).reshape(-1))
    kern = sde.hsm_kernel(tt)
    return parameterization.snr(kern.mean_coef, kern.chol).rsqrt().numpy()


def time_for_noise_level(sde, sigma, t_lo: float = MIN_TIME * 1e-3) -> np.ndarray:
    """The forward times t with σ_t = ``sigma`` (float64, elementwise; σ in [σ(t_lo), σ(1)], which the callers
    check): :meth:`diffusers_psld.sde.noise_level.NoiseLevel.time` on ``[t_lo, 1]``."""
    sig = np.asarray(sigma, dtype=np.float64).reshape(-1)
    if sig.size == 0:
        return sig.copy()
    return NoiseLevel(sde, t_lo=t_lo, t_hi=1.0).time(torch.from_numpy(sig)).numpy()


def min_time(sampling_eps: float) -> float:
    """The smallest forward time a schedule may list: :data:`MIN_TIME`, or ``sampling_eps`` if smaller."""
    return min(MIN_TIME, float(sampling_eps))


# ---------------------------------------------------------------------------------------------- custom grids
def check_custom_grid(values, kind: str, sde, t_min: float, name: Optional[str] = None):
    """Validate a user grid and return ``(times, trailing_zero)``: descending float64 forward times as a tensor.

    ``kind`` is ``"timesteps"`` (forward times in [t_min, 1]) or ``"sigmas"`` (noise levels σ_t in [σ(t_min), σ(1)],
    converted with :func:`time_for_noise_level`; a trailing 0, diffusers' / k-diffusion's final-sigma marker, is
    accepted and dropped: every schedule here ends at σ = 0 with its final call). ``name``: the argument named in
    messages (default ``kind``). Raises ``TypeError`` for a non-numeric input, ``ValueError`` (naming the
    argument, the index and value, and the allowed range) for fewer than 2 entries, a NaN / inf, an entry out of
    range, a non-decreasing pair, or two entries that ``scheduler.timesteps`` (float32) cannot tell apart.
    """
    name = name or kind
    if isinstance(values, torch.Tensor):
        if values.dtype == torch.bool or values.is_complex():
            raise TypeError(f"`{name}` must hold real numbers, got a {values.dtype} tensor")
        if values.ndim > 1:
            raise ValueError(f"`{name}` must be 1-D (one schedule), got a tensor of shape {tuple(values.shape)}")
        arr = values.detach().to("cpu", torch.float64).numpy().reshape(-1)
    else:
        if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, np.ndarray)):
            raise TypeError(f"`{name}` must be a list (or 1-D array / tensor) of numbers, got {type(values).__name__}")
        if any(isinstance(v, (bool, np.bool_)) or not isinstance(v, (numbers.Real, np.floating, np.integer))
               for v in np.asarray(values, dtype=object).reshape(-1)):
            raise TypeError(f"`{name}` must be a list of real numbers, got {list(values)!r}")
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim > 1:
            raise ValueError(f"`{name}` must be 1-D (one schedule), got an array of shape {arr.shape}")
        arr = arr.reshape(-1)
    bad = np.nonzero(~np.isfinite(arr))[0]
    if len(bad):
        raise ValueError(f"`{name}`[{bad[0]}] = {float(arr[bad[0]])!r} is not finite; every entry must be a finite number")
    trailing_zero = kind == "sigmas" and len(arr) > 1 and arr[-1] == 0.0
    if trailing_zero:
        arr = arr[:-1]
    if len(arr) < 2:
        raise ValueError(f"`{name}` must list at least 2 {'noise levels' if kind == 'sigmas' else 'times'} (a step and "
                         f"the final call), got {len(arr)}" + (" besides the trailing 0" if trailing_zero else ""))
    if kind == "sigmas":
        lo, hi = noise_level(sde, [t_min, 1.0])
        unit, rng = "noise level σ_t", f"[σ(t={t_min:g}), σ(t=1)] = [{lo:.6g}, {hi:.6g}]"
    else:
        lo, hi, unit, rng = t_min, 1.0, "forward time", f"[{t_min:g}, 1]"
    for i, v in enumerate(arr.tolist()):
        if not lo * (1 - 1e-12) <= v <= hi * (1 + 1e-12):
            zero = " (only a trailing 0 is accepted, as the final-sigma marker)" if kind == "sigmas" and v == 0 else ""
            raise ValueError(f"`{name}`[{i}] = {v!r} is outside the recipe's {unit} range {rng}{zero}")
    steps = np.diff(arr)
    if np.any(steps >= 0):
        i = int(np.argmax(steps >= 0))
        raise ValueError(f"`{name}` must be strictly decreasing (from noise to data), but `{name}`[{i}] = "
                         f"{float(arr[i])!r} and `{name}`[{i + 1}] = {float(arr[i + 1])!r}")
    arr = np.clip(arr, lo, hi)
    times = time_for_noise_level(sde, arr) if kind == "sigmas" else arr.copy()
    if kind == "sigmas" and arr[0] == hi:
        times[0] = 1.0  # σ(1) itself: the prior's time exactly
    t32 = times.astype(np.float32)
    if np.any(np.diff(t32) >= 0):
        i = int(np.argmax(np.diff(t32) >= 0))
        raise ValueError(f"`{name}`[{i}] and `{name}`[{i + 1}] give forward times {float(times[i])!r} and "
                         f"{float(times[i + 1])!r}, "
                         "which float32 `scheduler.timesteps` cannot tell apart; space them further")
    return torch.from_numpy(np.ascontiguousarray(times)), trailing_zero
