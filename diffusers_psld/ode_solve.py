r"""One guarded ODE solve for the package's adaptive and fixed-step integrations (PF-ODE sampling, bits/dim).

:func:`solve_ode` integrates ``dy/dt = func(t, y)`` from ``t0`` to ``t1`` with torchdiffeq (``dopri5``, ``rk4``,
``euler``) or SciPy (``scipy_rk45``: ``solve_ivp(method="RK45")``) and adds what the raw solvers lack:

* **a bound on work**: at most ``max_nfe`` evaluations of ``func`` (and, optionally, ``max_seconds`` of wall
  time); past it :class:`ODESolveError` says how far the solve got. An adaptive solver facing a noisy or
  discontinuous right-hand side otherwise shrinks its step for minutes without a result;
* **progress**: a tqdm bar over the fraction of ``[t0, t1]`` covered, with the evaluation count;
* **non-finite values named**: a NaN/inf returned by ``func`` (or a state that overflowed) raises
  :class:`~diffusers_psld.NonFiniteError` with the time and evaluation number, where a fixed-step method would
  return NaN results and an adaptive one would feed the NaN into its step size (torchdiffeq then fails with
  "underflow in dt", or the model is called with a NaN time);
* **solver failures explained**: torchdiffeq's ``underflow in dt`` and SciPy's "Required step size is less than
  spacing between numbers" become :class:`ODESolveError` naming the cause (a right-hand side too rough for the
  tolerances) and the remedies. SciPy's failure is detected from ``solve_ivp``'s status (torchdiffeq's SciPy
  wrapper does not check it and would return the initial state as the result).
"""
from __future__ import annotations

import math
import sys
import time
from typing import Callable, Optional, Sequence, Tuple, Union

import torch

__all__ = ["ODESolveError", "solve_ode", "SOLVE_METHODS", "DEFAULT_MAX_NFE"]

SOLVE_METHODS = ("dopri5", "rk4", "euler", "scipy_rk45")

#: default bound on right-hand-side evaluations. An RK45 solve of a trained diffusion model's PF-ODE takes a few
#: hundred at rtol = atol = 1e-5 (the PSLD and CLD papers report ~150-500 for sampling and likelihood); far more
#: means the right-hand side is too rough for the tolerances.
DEFAULT_MAX_NFE = 5000

State = Union[torch.Tensor, Tuple[torch.Tensor, ...]]


class ODESolveError(RuntimeError):
    """An ODE solve stopped without a result: the work bound was reached or the step size underflowed.

    Attributes:
        nfe: right-hand-side evaluations done.
        t: the last time evaluated (about how far the solve got).
        cause: ``"max_nfe"``, ``"max_seconds"`` or ``"step_size"``.
    """

    def __init__(self, message: str, nfe: int, t: float, cause: str):
        super().__init__(message)
        self.nfe, self.t, self.cause = nfe, t, cause


def _positive_int(value, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}")
    return value


def _tensors(y: State) -> Sequence[torch.Tensor]:
    return y if isinstance(y, tuple) else (y,)


class _Guard:
    """Counts evaluations, enforces the bounds, checks finiteness and drives the progress bar."""

    def __init__(self, what, t0, t1, method, rtol, atol, max_nfe, max_seconds, progress):
        from tqdm.auto import tqdm

        self.what, self.t0, self.t1, self.method, self.rtol, self.atol = what, t0, t1, method, rtol, atol
        self.max_nfe, self.max_seconds = max_nfe, max_seconds
        self.nfe, self.t, self.start = 0, t0, time.perf_counter()
        self.frac = 0.0
        disable = (not sys.stderr.isatty()) if progress is None else not progress
        self.bar = tqdm(total=1000, desc=what, disable=disable, leave=False,
                        bar_format="{desc}: {percentage:3.0f}% of [t0, t1] |{bar}| {elapsed} {postfix}")

    def remedy(self) -> str:
        fixed = "a fixed-step method ('rk4', 'euler')"
        return (f"loosen `rtol`/`atol` (now {self.rtol:g}/{self.atol:g}), raise `max_nfe` (now {self.max_nfe})"
                + (f" or `max_seconds` (now {self.max_seconds:g})" if self.max_seconds else "") + f", or use {fixed}")

    def reached(self) -> str:
        done = abs(self.t - self.t0) / abs(self.t1 - self.t0)
        return (f"after {self.nfe} evaluations it was evaluating at t = {self.t:.6g} ({100 * done:.1f} % of "
                f"[{self.t0:g}, {self.t1:g}])")

    def before(self, t: float, y: State) -> None:
        from .pipelines.guidance import NonFiniteError

        if not math.isfinite(t):
            raise ODESolveError(f"{self.what}: the {self.method} solver proposed a non-finite time {t} "
                                f"({self.reached()})", self.nfe, self.t, "step_size")
        if self.nfe >= self.max_nfe:
            raise ODESolveError(
                f"{self.what}: stopped at the bound of {self.max_nfe} right-hand-side evaluations ({self.method}): "
                f"{self.reached()}. The right-hand side is likely too rough (a noisy or discontinuous model output) "
                f"for adaptive step-size control at these tolerances; {self.remedy()}", self.nfe, self.t, "max_nfe")
        if self.max_seconds is not None and time.perf_counter() - self.start > self.max_seconds:
            raise ODESolveError(f"{self.what}: stopped at the bound of {self.max_seconds:g} s ({self.method}): "
                                f"{self.reached()}; {self.remedy()}", self.nfe, self.t, "max_seconds")
        for y_i in _tensors(y):
            if not bool(torch.isfinite(y_i).all()):
                raise NonFiniteError(
                    f"{self.what}: the ODE state is not finite at t = {t:.6g} (evaluation {self.nfe + 1}): the "
                    "integration overflowed (an unbounded model output or a time outside the model's range)",
                    cause="state overflow")
        self.nfe += 1
        self.t = t
        frac = abs(t - self.t0) / abs(self.t1 - self.t0)
        if frac > self.frac:
            self.frac = min(frac, 1.0)
            self.bar.n = int(1000 * self.frac)
        self.bar.set_postfix_str(f"t={t:.4g} nfe={self.nfe}", refresh=False)
        self.bar.refresh() if self.nfe % 10 == 0 else None

    def after(self, t: float, out: State) -> None:
        from .pipelines.guidance import NonFiniteError

        for o in _tensors(out):
            if not bool(torch.isfinite(o).all()):
                raise NonFiniteError(
                    f"{self.what}: the right-hand side is not finite at t = {t:.6g} (evaluation {self.nfe}); with a "
                    "finite state this comes from the model output (check its weights and input range)",
                    cause="model output")

    def step_size_error(self, detail: str) -> ODESolveError:
        return ODESolveError(
            f"{self.what}: the {self.method} step size underflowed ({detail}): {self.reached()}. The right-hand "
            f"side is too rough (noisy or discontinuous model output) for the error control; {self.remedy()}",
            self.nfe, self.t, "step_size")


def solve_ode(
    func: Callable[[float, State], State],
    y0: State,
    t0: float,
    t1: float,
    method: str = "dopri5",
    rtol: float = 1e-5,
    atol: float = 1e-5,
    options: Optional[dict] = None,
    max_nfe: int = DEFAULT_MAX_NFE,
    max_seconds: Optional[float] = None,
    progress: Optional[bool] = None,
    what: str = "ODE solve",
) -> Tuple[State, int]:
    """Integrate ``dy/dt = func(t, y)`` from ``t0`` to ``t1``; returns ``(y(t1), nfe)``.

    Args:
        func: ``func(t, y)`` with ``t`` a Python float and ``y`` a tensor or a tuple of tensors (the structure
            of ``y0``); returns the derivative in the same structure.
        y0: initial state (a tensor or a tuple of tensors).
        t0, t1: start and end times (either order).
        method: ``"dopri5"``, ``"rk4"``, ``"euler"`` (torchdiffeq; fixed-step ones need ``options["step_size"]``)
            or ``"scipy_rk45"`` (``scipy.integrate.solve_ivp``, RK45, on the flattened float64 state).
        rtol, atol: tolerances of the adaptive methods.
        options: torchdiffeq ``options`` (e.g. ``step_t``, ``step_size``).
        max_nfe: bound on evaluations of ``func`` (int >= 1).
        max_seconds: optional wall-time bound (> 0), checked before every evaluation.
        progress: show a tqdm bar (``None``: only when stderr is a terminal).
        what: names the solve in messages and on the bar.

    Raises:
        ODESolveError: the work bound was reached or the step size underflowed (the message says how far the
            solve got and what to change).
        NonFiniteError: ``func`` returned a NaN/inf, or the state stopped being finite.
    """
    if method not in SOLVE_METHODS:
        raise ValueError(f"`method` must be one of {SOLVE_METHODS}, got {method!r}")
    max_nfe = _positive_int(max_nfe, "max_nfe")
    if max_seconds is not None and (isinstance(max_seconds, bool) or not isinstance(max_seconds, (int, float))
                                    or not max_seconds > 0 or not math.isfinite(max_seconds)):
        raise ValueError(f"`max_seconds` must be a finite number > 0 or None, got {max_seconds!r}")
    if progress is not None and not isinstance(progress, bool):
        raise ValueError(f"`progress` must be a bool or None, got {progress!r}")
    guard = _Guard(what, float(t0), float(t1), method, rtol, atol, max_nfe, max_seconds, progress)

    def guarded(t: float, y: State) -> State:
        guard.before(t, y)
        out = func(t, y)
        guard.after(t, out)
        return out

    try:
        if method == "scipy_rk45":
            return _solve_scipy(guarded, guard, y0, t0, t1, rtol, atol), guard.nfe
        from torchdiffeq import odeint

        like = _tensors(y0)[0]
        ts = torch.tensor([t0, t1], dtype=like.dtype, device=like.device)
        try:
            sol = odeint(lambda t, y: guarded(float(t), y), y0, ts, rtol=rtol, atol=atol, method=method,
                         options=options or {})
        except AssertionError as err:  # torchdiffeq's `assert t0 + dt > t0, "underflow in dt ..."`
            if "underflow in dt" not in str(err):
                raise
            raise guard.step_size_error(f"torchdiffeq: {err}") from None
        y1 = tuple(s[-1] for s in sol) if isinstance(y0, tuple) else sol[-1]
        return y1, guard.nfe
    finally:
        guard.bar.close()


def _solve_scipy(guarded, guard: _Guard, y0: State, t0: float, t1: float, rtol: float, atol: float) -> State:
    import numpy as np
    from scipy.integrate import solve_ivp

    parts = _tensors(y0)
    like = parts[0]
    sizes = [p.numel() for p in parts]

    def unflat(y):
        flat = torch.as_tensor(y, dtype=torch.float64).to(like.device)
        out = tuple(c.reshape(p.shape).to(p.dtype) for c, p in zip(torch.split(flat, sizes), parts))
        return out if isinstance(y0, tuple) else out[0]

    def rhs(t, y):
        out = guarded(float(t), unflat(y))
        return np.concatenate([o.detach().reshape(-1).to("cpu", torch.float64).numpy() for o in _tensors(out)])

    flat0 = np.concatenate([p.detach().reshape(-1).to("cpu", torch.float64).numpy() for p in parts])
    sol = solve_ivp(rhs, (float(t0), float(t1)), flat0, rtol=rtol, atol=atol, method="RK45")
    if not sol.success:
        raise guard.step_size_error(f"scipy: {sol.message}") if "step size" in str(sol.message) else \
            ODESolveError(f"{guard.what}: scipy RK45 failed ({sol.message}): {guard.reached()}", guard.nfe, guard.t,
                          "step_size")
    return unflat(sol.y[:, -1])
