r"""Mid-schedule starts (img2img / SDEdit): Diffusers' ``set_begin_index`` and index-by-timestep rule.

:class:`MidScheduleMixin` is part of :class:`~.scheduling_psld.PSLDScheduler`; it reads the installed step tables
(``self._tables``, :mod:`.step_tables`) and the loop state (``_step_index``, ``_begin_index``, ``_run_start``).
What a run that begins at call k does is stated in the ``PSLDScheduler`` class docstring; the replacement maps of
its first call are :func:`.step_tables.entry_maps`.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

from .validation import timestep_value

__all__ = ["MidScheduleMixin"]


class MidScheduleMixin:
    """``step_index`` / ``begin_index``, ``set_begin_index``, ``index_for_timestep``, ``state_time`` and the mode of
    each call of a run (normal, the replacement first call, or skipped)."""

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start the next sampling loop at call ``begin_index`` (img2img / SDEdit; call after ``set_timesteps``).

        Any k in [0, ``num_inference_steps``) is valid for every sampler; the state handed to that call is taken
        to be at forward time ``timesteps[k]`` (see the class docstring for calls inside a multi-call step)."""
        if isinstance(begin_index, (bool, np.bool_)) or not isinstance(begin_index, (int, np.integer)):
            raise ValueError(f"`begin_index` must be an int, got {begin_index!r}")
        begin_index = int(begin_index)
        n = self.num_inference_steps
        if begin_index < 0 or (n is not None and begin_index >= n):
            raise ValueError(f"`begin_index` must be in [0, {n if n is not None else 'num_inference_steps'}), got {begin_index}")
        self._begin_index = begin_index

    def index_for_timestep(self, timestep) -> int:
        """The call index of ``timestep`` in this schedule (Diffusers' index-by-timestep rule).

        Matches within a relative 2e-6 (``timesteps`` is float32); of the closest matches, the call that starts
        a step is taken (PF-Heun's corrector at t_{n+1} and the next predictor share a time: Diffusers' Heun
        also takes the second). ``ValueError`` if the time is not in the schedule."""
        if self._tables is None:
            raise ValueError("call `set_timesteps(num_inference_steps)` before `step`")
        t = timestep_value(timestep)
        times = self._tables.eval_array
        dist = np.abs(times - t)
        close = np.nonzero(dist <= 2e-6 * np.maximum(times, 1e-12))[0]
        if len(close) == 0:
            j = int(np.argmin(dist))
            raise ValueError(f"`timestep` {t:.6g} is not one of `scheduler.timesteps` (nearest: call {j} at "
                             f"{times[j]:.6g}); pass an entry of `scheduler.timesteps`, or call `set_begin_index`")
        best = close[dist[close] <= dist[close].min() + 1e-12]  # the same time up to float64 rounding
        starts = [int(i) for i in best if self._tables.starts[int(i)]]
        return starts[-1] if starts else int(best[0])

    def state_time(self, index: Optional[int] = None) -> float:
        """Forward time of the state passed to call ``index`` (default: the next call).

        Equals ``timesteps[index]`` except for SSCS with ``sscs_score_time='start'``, where the state
        sits at the interval midpoint (but not on the first call of a mid-schedule start, which receives the
        state at ``timesteps[index]``), and after the final call (0.0).
        """
        if index is None:
            index = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if index >= self.num_inference_steps:
            return 0.0
        start = self._run_start if self._run_start is not None else self._begin_index
        if start and index == start:  # a mid-schedule start hands over the state at timesteps[start]
            return self._tables.eval_times[index]
        return self._tables.state_times[index]

    def _call_mode(self, i: int) -> str:
        """How call ``i`` runs: ``"normal"``; ``"first"`` (first call of a mid-schedule start inside a multi-call
        step, or at an SSCS step whose state time differs from ``timesteps[i]``: the maps of
        :func:`.step_tables.entry_maps`); ``"skip"`` (the later calls of a step that such a first call completed).
        See the class docstring."""
        start, tab = self._run_start, self._tables
        if not start:  # None or 0: a loop from the first call
            return "normal"
        if i == start:
            return "first" if not tab.starts[i] or tab.state_times[i] != tab.eval_times[i] else "normal"
        if not tab.starts[start] and not any(tab.starts[start + 1: i + 1]):
            return "skip"
        return "normal"
