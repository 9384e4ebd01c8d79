r"""The schedule options of every scheduler config, validated in one place: which times the model calls use and how
the schedule ends.

Config keys (shared by every scheduler class, same defaults, so ``Other.from_config(config)`` keeps them):

* ``time_grid`` (None, ``"uniform"``, ``"power"``, ``"logsnr"``, ``"edm"``; :mod:`.time_grids`) and ``rho`` (the
  exponent of ``"power"`` / ``"edm"``; default 2 / 7): the named grid ``set_timesteps(num_inference_steps)`` builds.
  ``None`` keeps the legacy keys, which load and mean what they always meant: ``striding`` ("uniform" = uniform,
  "quadratic" = power with ρ = 2) and, for ``GDDIMMultistepScheduler``, ``time_spacing`` / ``spacing_power``. When
  ``time_grid`` is set, it alone decides the grid (the legacy keys are then unused).
* ``sigma_min`` / ``sigma_max``: the noise levels σ_t (:func:`.time_grids.noise_level`) of the last and first grid
  time; None: σ(``sampling_eps``) and σ(1), i.e. the grid runs from t = 1 down to ``sampling_eps``.
* ``custom_timesteps`` / ``custom_sigmas``: a stored custom schedule (forward times, or noise levels σ_t with an
  optional trailing 0), the grid of ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)``, which write
  it here so that a saved pipeline samples with it again.
* ``final_step`` (``FINAL_STEPS``): the last model call, from the last grid time to t = 0: ``"euler"`` (the
  sampler's own noiseless first-order step: the mean of an Euler–Maruyama step for the stochastic samplers, a
  probability-flow Euler step for PF-Euler / PF-Heun / the deterministic splitting schemes, the exponential
  integrator's step for the conjugate, gDDIM and conjugate-splitting samplers) or ``"tweedie"`` (the posterior mean
  E[z₀ | z_t] from this call's x̂₀: x = x̂₀, diffusers' ``final_sigmas_type="zero"``; see
  :func:`diffusers_psld.sampling.tweedie_step`).

:class:`ScheduleMixin` (part of :class:`~.scheduling_psld.PSLDScheduler`) turns the resolved options into what
``set_timesteps`` builds: the grid of a schedule, the NFE of a custom grid, the final call's map, the first state's
law, and diffusers' ``order``.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Optional

import torch

from .. import sampling
from ..sde.kernels import psd_cholesky
from .time_grids import (MAX_EDM_RHO, MAX_POWER_RHO, TIME_GRIDS, check_custom_grid, min_time, named_grid,
                         noise_level, time_for_noise_level)
from .validation import MAX_INFERENCE_STEPS, check_real

__all__ = ["FINAL_STEPS", "CUSTOM_KEYS", "ScheduleOptions", "ScheduleMixin", "schedule_options"]

FINAL_STEPS = ("euler", "tweedie")
CUSTOM_KEYS = {"timesteps": "custom_timesteps", "sigmas": "custom_sigmas"}


@dataclass(frozen=True)
class ScheduleOptions:
    """The resolved schedule of a config.

    Attributes:
        grid, rho: the named grid of ``set_timesteps(num_inference_steps)`` and its exponent (None: the default).
        t_lo, t_hi: its last and first forward time (float64; ``sampling_eps`` and 1 unless σ_min / σ_max are set).
        t_min: the smallest time a schedule may list (:func:`.time_grids.min_time`).
        final_step: one of ``FINAL_STEPS``.
        custom: the stored custom grid (descending float64 forward times) or None; ``custom_name`` is
            ``"timesteps"`` or ``"sigmas"`` (the argument it came from).
        legacy: the config key the named grid comes from (``"time_grid"``, ``"striding"``, ``"spacing_power"``, ...),
            for messages.
    """

    grid: str
    rho: Optional[float]
    t_lo: float
    t_hi: float
    t_min: float
    final_step: str
    custom: Optional[torch.Tensor] = None
    custom_name: Optional[str] = None
    legacy: str = "time_grid"

    def with_custom(self, times: Optional[torch.Tensor], name: Optional[str]) -> "ScheduleOptions":
        return replace(self, custom=times, custom_name=name)


def _sigma_bound(cfg, name: str, sde, t_min: float) -> Optional[float]:
    value = getattr(cfg, name)
    if value is None:
        return None
    v = check_real(value, name, 0.0, strict=True)
    lo, hi = noise_level(sde, [t_min, 1.0])
    if not lo * (1 - 1e-12) <= v <= hi * (1 + 1e-12):
        raise ValueError(f"`{name}` = {value!r} is outside the recipe's noise-level range [σ(t={t_min:g}), σ(t=1)] = "
                         f"[{lo:.6g}, {hi:.6g}]")
    return 1.0 if v >= hi else float(time_for_noise_level(sde, [max(v, lo)])[0])


def schedule_options(cfg, sde, legacy_grid, legacy_rho, legacy_key: str) -> ScheduleOptions:
    """Validate the schedule keys of ``cfg`` (module docstring) for the recipe ``sde`` and resolve them.

    ``legacy_grid`` / ``legacy_rho`` / ``legacy_key``: the grid the class's legacy keys select (used when
    ``time_grid`` is None). Raises ``ValueError`` naming the key, its value and what is allowed.
    """
    eps = float(cfg.sampling_eps)
    t_min = min_time(eps)
    if cfg.time_grid is not None and cfg.time_grid not in TIME_GRIDS:
        raise ValueError(f"`time_grid` must be one of {TIME_GRIDS} or None (the legacy `striding`), got {cfg.time_grid!r}")
    grid, rho, key = (cfg.time_grid, cfg.rho, "time_grid") if cfg.time_grid is not None else (legacy_grid, legacy_rho, legacy_key)
    if cfg.rho is not None:
        if cfg.time_grid not in ("power", "edm"):
            raise ValueError(f"`rho` = {cfg.rho!r} is the exponent of `time_grid='power'` or `'edm'`; with "
                             f"`time_grid={cfg.time_grid!r}` it would be unused (set `time_grid`, or `rho=None`)")
        top = MAX_POWER_RHO if cfg.time_grid == "power" else MAX_EDM_RHO
        check_real(cfg.rho, "rho", 0.0, strict=True, high=top)
    if cfg.final_step not in FINAL_STEPS:
        raise ValueError(f"`final_step` must be one of {FINAL_STEPS}, got {cfg.final_step!r}")
    if cfg.final_step == "tweedie" and cfg.prediction_type == "epsilon" and not bool(sde.eps_mask().all()):
        raise ValueError("`final_step='tweedie'` needs gamma > 0 or VP with prediction_type='epsilon': x̂₀ uses ε_x, "
                         "which a CLD (gamma = 0) network does not learn (use final_step='euler' or a C-channel "
                         "prediction_type)")
    t_hi = _sigma_bound(cfg, "sigma_max", sde, t_min)
    t_lo = _sigma_bound(cfg, "sigma_min", sde, t_min)
    t_hi = 1.0 if t_hi is None else t_hi
    t_lo = eps if t_lo is None else t_lo
    if not t_lo < t_hi:
        what = "`sigma_min`" if cfg.sigma_min is not None else f"σ(sampling_eps={eps:g})"
        top = "`sigma_max`" if cfg.sigma_max is not None else "σ(1)"
        raise ValueError(f"{what} (t = {t_lo:.6g}) must be below {top} (t = {t_hi:.6g})")
    opts = ScheduleOptions(grid, rho, t_lo, t_hi, t_min, cfg.final_step, legacy=key)
    given = [name for name, k in CUSTOM_KEYS.items() if getattr(cfg, k) is not None]
    if len(given) > 1:
        raise ValueError("set at most one of `custom_timesteps` and `custom_sigmas` (the stored custom schedule), "
                         "got both")
    if given:
        name = given[0]
        times, _ = check_custom_grid(getattr(cfg, CUSTOM_KEYS[name]), name, sde, t_min, CUSTOM_KEYS[name])
        opts = opts.with_custom(times, name)
    return opts


class ScheduleMixin:
    """The grid, NFE, final call and first state of a schedule (needs ``self.config``, ``self.sde``, ``self._schedule``
    and, while ``set_timesteps`` builds a custom schedule, ``self._custom_grid``)."""

    @property
    def calls_per_step(self) -> int:
        """How many model calls one step of the configured sampler takes; 2 for PF-Heun (predictor and corrector), else 1."""
        return 2 if self.config.sampler == "pf_heun" else 1

    @property
    def order(self) -> int:
        """Diffusers' ``order``: model calls per step (:attr:`calls_per_step`; 2 for PF-Heun, as diffusers' Heun
        schedulers). Every ``order``-th entry of ``timesteps`` starts a step, so diffusers' img2img slice
        ``timesteps[t_start * scheduler.order:]`` begins on a step."""
        return self.calls_per_step

    def _store_schedule(self, **values):
        """Write the custom-schedule keys into the config; a key set to a list leaves ``_use_default_values`` (else
        Diffusers' ``Other.from_config`` would drop it as an implicit default), a key reset to None joins it again."""
        self.register_to_config(**values)
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in values]
        defaults += [k for k, v in values.items() if v is None]
        self.register_to_config(_use_default_values=defaults)

    def _calls_for_grid(self, grid: torch.Tensor, name: str) -> int:
        """Model calls of a custom grid of M times: (M - 1) steps of ``calls_per_step`` calls and the final call."""
        n = (len(grid) - 1) * self.calls_per_step + 1
        if n > MAX_INFERENCE_STEPS:
            raise ValueError(f"`{name}` lists {len(grid)} times, i.e. {n} model calls for sampler "
                             f"{self.config.sampler!r}; at most {MAX_INFERENCE_STEPS} are supported")
        return n

    def _legacy_grid(self):
        """``(grid, rho, key)`` that the legacy config keys select when ``time_grid`` is None."""
        return ("uniform", None, "striding") if self.config.striding == "uniform" else ("power", 2.0, "striding")

    def _grid(self, n: int) -> torch.Tensor:
        """The ``n + 1`` descending float64 grid times of the schedule being built (a custom grid while
        ``set_timesteps`` builds one, else the configured named grid)."""
        if self._custom_grid is not None:
            if n != len(self._custom_grid) - 1:
                raise RuntimeError(f"{type(self).__name__} asked for a {n}-step grid of a {len(self._custom_grid) - 1}-step "
                                   "custom schedule")
            grid = self._custom_grid.clone()
        else:
            o = self._schedule
            rho = "" if o.rho is None else f" ({'rho' if o.legacy == 'time_grid' else o.legacy}={o.rho:g})"
            grid = named_grid(self.sde, o.grid, n, o.t_lo, o.t_hi, o.rho, f"{o.grid!r} time grid with {n} steps{rho}")
        self._grid_start, self._grid_end = float(grid[0]), float(grid[-1])
        return grid

    def _final_map(self, t: float):
        """``(P, R)`` of the final call from forward time ``t`` to 0 (``final_step``)."""
        if self.config.final_step == "tweedie":
            return sampling.tweedie_step(self.sde, t)
        return self._euler_final(t)

    def _euler_final(self, t: float):
        """The sampler's own noiseless first-order step from ``t`` to 0: the mean of an Euler–Maruyama step (EM,
        SSCS) or a probability-flow Euler step (PF-Euler, PF-Heun), as the paper's code."""
        if self.config.sampler in ("em", "sscs"):
            P, R, _ = sampling.em_step(self.sde, t, 0.0, noise=False)
        else:
            P, R, _ = sampling.pf_euler_step(self.sde, t, 0.0)
        return P, R

    def _initial_scale(self, t0: float, t_state: float):
        """The Cholesky factor of the first state's law (``sample_prior``) for a grid starting at ``t0``: None (the
        prior N(0, A⁻¹)) for t0 = 1; else the data-free kernel marginal N(0, Σ_t0) (the law of z_t0 for x₀ = 0), pushed
        by the exact SSCS linear part to ``t_state`` where the first state lives there (SSCS)."""
        if t0 >= 1.0:
            return None
        cov = self.sde.hsm_kernel(t0).cov
        if t_state != t0:
            phi, L = sampling.sscs_linear(self.sde, t0, t_state)
            cov = phi @ cov @ phi.T + L @ L.T
        return psd_cholesky(0.5 * (cov + cov.T), "initial state covariance")
