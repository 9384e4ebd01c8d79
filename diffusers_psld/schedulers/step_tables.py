r"""Float64 step tables of the samplers: what every model call of a schedule does, built once per time grid.

A schedule of N model calls is a list of calls. Every call but a PF-Heun stage is the affine map

    z' = P z + R ε + S ξ,        ξ ~ N(0, I)

with k×k float64 matrices (``M ⊗ I_d`` on the channel-stacked state, :mod:`diffusers_psld.sde.blocks`); a Heun
step is a predictor call (Euler slope ``P z + R ε``) followed by a corrector call (trapezoid with the slope at the
predicted state). This module holds

* :class:`Calls` — a run of calls: kinds, evaluation and state times, P/R/S, step sizes, step starts;
* the pure builders of the package's step samplers on a descending grid of forward times
  (:func:`em_calls`, :func:`pf_euler_calls`, :func:`pf_heun_calls`, :func:`sscs_calls`);
* :func:`entry_maps` — the replacement map of a call that opens a mid-schedule run (img2img);
* :class:`StepTables` — the installed tables with their per-call HSM kernels, x̂₀ weights and the
  network-boundary maps, and cast copies per (device, dtype) (:class:`CastTables`).

All builders take float64 CPU tensors and return float64 CPU tensors; only cast copies reach the device.
"""
from __future__ import annotations

from typing import List

import numpy as np
import torch

from .. import parameterization, sampling
from ..sde import RecipeSDE, blocks

__all__ = ["AFFINE", "HEUN_PRED", "HEUN_CORR", "Calls", "StepTables", "CastTables", "all_finite", "em_calls",
           "pf_euler_calls", "pf_heun_calls", "sscs_calls", "entry_maps"]

# kinds of model-evaluation calls in a step table
AFFINE, HEUN_PRED, HEUN_CORR = 0, 1, 2


def all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum (NaN/inf propagate; ~10x cheaper than ``isfinite(x).all()``), and the
    exact check only when the sum is not finite (it can overflow on huge finite entries)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(torch.sum(x, dtype=acc))) or bool(torch.isfinite(x).all())


class Calls:
    """A run of model calls: kinds, evaluation times, P/R/S ``[n, k, k]`` (S may be None), h, state times, and
    whether each call starts a step (False for a PF-Heun corrector or a later call of a naive splitting step)."""

    def __init__(self, kinds, eval_times, P, R, S, h, state_times=None, starts=None):
        self.kinds, self.eval_times, self.h = list(kinds), [float(x) for x in eval_times], [float(x) for x in h]
        self.P, self.R = P, R
        self.noisy = [S is not None] * len(self.kinds)
        self.S = S if S is not None else torch.zeros_like(P)
        self.state_times = [float(x) for x in (state_times if state_times is not None else eval_times)]
        self.starts = [bool(x) for x in starts] if starts is not None else [True] * len(self.kinds)

    @classmethod
    def single(cls, kind, t_eval, P, R, S, h, t_state=None, starts=True):
        """One call from ``[k, k]`` matrices (S may be None)."""
        return cls([kind], [t_eval], P[None], R[None], None if S is None else S[None], [h],
                   None if t_state is None else [t_state], [starts])

    @staticmethod
    def cat(runs):
        out = Calls([], [], torch.cat([r.P for r in runs]), torch.cat([r.R for r in runs]), None, [])
        out.S = torch.cat([r.S for r in runs])
        for name in ("kinds", "eval_times", "h", "noisy", "state_times", "starts"):
            setattr(out, name, [x for r in runs for x in getattr(r, name)])
        return out

    @staticmethod
    def of(runs) -> "Calls":
        """One :class:`Calls` from a list of runs (``Calls`` or ``(kind, t_eval, P, R, S, h[, t_state[, starts]])``
        tuples, one call each)."""
        return Calls.cat([r if isinstance(r, Calls) else Calls.single(*r) for r in runs])


# ---------------------------------------------------------------------------------------------- builders
def em_calls(sde: RecipeSDE, ts: torch.Tensor) -> Calls:
    """Euler–Maruyama steps of the reverse SDE between consecutive times of the descending grid ``ts``."""
    n = len(ts) - 1
    P, R, S = sampling.em_step(sde, ts[:-1], ts[1:])
    return Calls([AFFINE] * n, ts[:-1].tolist(), P, R, S, [0.0] * n)


def pf_euler_calls(sde: RecipeSDE, ts: torch.Tensor) -> Calls:
    """Euler steps of the probability-flow ODE between consecutive times of ``ts``."""
    n = len(ts) - 1
    P, R, _ = sampling.pf_euler_step(sde, ts[:-1], ts[1:])
    return Calls([AFFINE] * n, ts[:-1].tolist(), P, R, None, [0.0] * n)


def pf_heun_calls(sde: RecipeSDE, ts: torch.Tensor, n_euler: int = 0) -> List[Calls]:
    """Heun steps of the probability-flow ODE on the descending grid ``ts`` (two calls each: the predictor at the
    interval start, the corrector at its end), except the last ``n_euler`` intervals, which are single-call
    probability-flow Euler steps (last, so that every second call starts a step: diffusers' Heun layout, ``order`` 2)."""
    calls = []
    n_heun = len(ts) - 1 - n_euler
    t, tn = ts[:n_heun], ts[1:n_heun + 1]
    if n_heun:
        Pa, Ra = sampling.pf_drift(sde, t)
        Pb, Rb = sampling.pf_drift(sde, tn)
        h = (t - tn).tolist()
        # interleave predictor (slope at t) and corrector (slope at t_next) calls
        P = torch.stack([Pa, Pb], 1).reshape(-1, sde.k, sde.k)
        R = torch.stack([Ra, Rb], 1).reshape(-1, sde.k, sde.k)
        times = torch.stack([t, tn], 1).reshape(-1).tolist()
        calls.append(Calls([HEUN_PRED, HEUN_CORR] * n_heun, times, P, R, None, [x for x in h for _ in (0, 1)],
                           starts=[True, False] * n_heun))
    if n_euler:
        calls.append(pf_euler_calls(sde, ts[n_heun:]))
    return calls


def sscs_calls(sde: RecipeSDE, ts: torch.Tensor, score_time: str = "start") -> Calls:
    """Modified SSCS (PSLD paper Eq. 12) on the descending grid ``ts``, one call per step.

    The trailing half-step of step i is merged with the leading half-step of step i + 1 (exact), so the state
    handed to call i lives at the interval midpoint; the last call ends at ``ts[-1]``. ``score_time``: the
    score is evaluated at the interval ``"start"`` or its ``"midpoint"``."""
    n = len(ts) - 1
    hs = ts[:-1] - ts[1:]
    mids = ts[:-1] - 0.5 * hs
    t_eval = mids if score_time == "midpoint" else ts[:-1]
    Ps, Rs = sampling.sscs_score_step(sde, hs, t_eval)
    t_to = torch.cat([mids[1:], ts[-1:]])
    phi, L = sampling.sscs_linear(sde, mids, t_to)
    return Calls([AFFINE] * n, t_eval.tolist(), phi @ Ps, phi @ Rs, L, [0.0] * n, mids.tolist())


def entry_maps(sde: RecipeSDE, tables: "StepTables"):
    """Float64 replacement maps ``(P, R, S)`` ``[n, k, k]`` and their noise flags for the first call i > 0 of a
    loop that begins with a state at forward time ``eval_times[i]`` (see :class:`~.scheduling_psld.PSLDScheduler`):

    * a call inside a multi-call step: one Euler step to the step's end (probability-flow Euler, or
      Euler–Maruyama for noisy calls) — the identity for a PF-Heun corrector, which evaluates at that end;
    * an SSCS call whose state lives at the interval midpoint (``sscs_score_time="start"``): the model output
      was evaluated at the state at ``eval_times[i]`` itself, so the step is the score part S(h) there followed
      by the exact linear part A from ``eval_times[i]`` to the next call's state time (Lie order A(h)∘S(h)
      for this one step instead of A(h/2)∘S(h)∘A(h/2): both first order, as the score part is);
    * any other call: the call's own map (unused).
    """
    t_eval = torch.tensor(tables.eval_times, dtype=torch.float64)
    t_end = torch.tensor(tables.step_end, dtype=torch.float64)
    Pp, Rp, _ = sampling.pf_euler_step(sde, t_eval, t_end)
    Pem, Rem, Sem = sampling.em_step(sde, t_eval, t_end)
    noisy = torch.tensor(tables.noisy)[:, None, None]
    P, R = torch.where(noisy, Pem, Pp), torch.where(noisy, Rem, Rp)
    S = torch.where(noisy, Sem, torch.zeros_like(Sem))
    part_noisy = list(tables.noisy)
    t_state = torch.tensor(tables.state_times, dtype=torch.float64)
    moved = ((t_state - t_eval).abs() > 0).nonzero().reshape(-1).tolist()
    if moved:  # SSCS "start": S(h) at eval time, then A from eval time to the next call's state time
        i = torch.tensor(moved)
        h = 2.0 * (t_eval[i] - t_state[i])  # the state sits at the midpoint of [t_i - h, t_i]
        Ps, Rs = sampling.sscs_score_step(sde, h, t_eval[i])
        phi, L = sampling.sscs_linear(sde, t_eval[i], t_state[i + 1])
        P[i], R[i], S[i] = phi @ Ps, phi @ Rs, L
        for j in moved:
            part_noisy[j] = True
    return P, R, S, part_noisy


# ---------------------------------------------------------------------------------------------- installed tables
class StepTables:
    """Per-call float64 coefficient tables, with cached copies per (device, dtype)."""

    def __init__(self, sde: RecipeSDE, calls: Calls):
        for name in ("kinds", "eval_times", "noisy", "h", "state_times", "starts", "P", "R", "S"):
            setattr(self, name, getattr(calls, name))
        self.eval_array = np.asarray(self.eval_times, dtype=np.float64)  # exact times for the timestep lookup
        # the state time after each call's step (next step-starting call's state time; 0 after the last)
        self.step_end, nxt = [0.0] * len(self.kinds), 0.0
        for i in range(len(self.kinds) - 1, -1, -1):
            self.step_end[i] = nxt
            if self.starts[i]:
                nxt = self.state_times[i]
        kern = sde.hsm_kernel(torch.tensor(self.eval_times, dtype=torch.float64))
        self.kernel = kern  # per-call float64 kernels (guidance / inpainting reuse them)
        a = kern.mean_coef  # [n, k]
        self.x0_w = a / (a * a).sum(-1, keepdim=True)  # aᵀ / aᵀa
        self.x0_L = kern.chol
        self.proj_z, self.proj_e = sampling.eps_projection(a, kern.chol)  # ``project_eps``
        self._cache = {}

    def add_entry_steps(self, maps):
        """Install the mid-schedule first-call maps of :func:`entry_maps`."""
        self.part_P, self.part_R, self.part_S, self.part_noisy = maps
        self._cache = {}

    def add_model_maps(self, prediction_type: str, sigma_data):
        """Per-call float64 tables of the network boundary: output → ε maps and (``sigma_data`` not None) c_in."""
        kern = self.kernel
        self.out_maps = parameterization.output_maps(prediction_type, kern.mean_coef, kern.chol)
        self.c_in = None if sigma_data is None else parameterization.input_scaling(kern.mean_coef, kern.cov, sigma_data)
        self._cache = {}

    def on(self, device, dtype):
        key = (str(device), dtype)
        if key not in self._cache:
            self._cache[key] = CastTables(self, device, dtype)
        return self._cache[key]

    def project_x0(self, tab, i, z, eps):
        v = z - blocks.apply(tab.x0_L[i], eps)
        k = tab.x0_w.shape[-1]
        comps = v.reshape(v.shape[0], k, -1)
        x0 = torch.einsum("j,bjn->bn", tab.x0_w[i], comps)
        return x0.reshape(v.shape[0], v.shape[1] // k, *v.shape[2:])


class CastTables:
    """The tables of a :class:`StepTables` cast to one (device, dtype)."""

    def __init__(self, tables: StepTables, device, dtype):
        for name in ("P", "R", "S", "x0_w", "x0_L", "proj_z", "proj_e", "part_P", "part_R", "part_S"):
            setattr(self, name, getattr(tables, name).to(device=device, dtype=dtype))
        self.out_maps = tables.out_maps.to(device, dtype)
        self.c_in = None if tables.c_in is None else tables.c_in.to(device=device, dtype=dtype)
