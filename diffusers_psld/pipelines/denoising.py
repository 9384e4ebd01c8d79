r"""The one denoising loop of the PSLD pipelines, and the conversion of the final state into images.

:func:`denoise` runs ``scheduler.timesteps[begin_index:]`` (``begin_index = 0``: the full schedule of
:class:`PSLDPipeline`; ``> 0``: the mid-schedule start of :class:`PSLDImg2ImgPipeline`, diffusers'
``set_begin_index`` pattern). Per call: ε from the composed ε-function (:mod:`.guidance`), a finiteness
check, ``scheduler.step``, a finiteness check of the new state, an optional ``after_step`` hook (inpainting's
replacement of the known pixels) and the user's ``callback_on_step_end``. A NaN or inf raises
:class:`~.guidance.NonFiniteError` naming the call, its forward time and the likely cause, instead of
returning black images.
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import numpy as np
import torch

from .guidance import EpsFn, NonFiniteError, check_finite

__all__ = ["STATE_NAMES", "denoise", "to_output"]

#: callback tensor names that denote the full ``[x ; m]`` state (diffusers' ``latents``; ``sample`` kept)
STATE_NAMES = ("latents", "sample")


def denoise(pipe, z: torch.Tensor, eps_fn: EpsFn, generator=None, begin_index: int = 0,
            after_step: Optional[Callable[[torch.Tensor, int], torch.Tensor]] = None,
            callback=None, callback_tensor_inputs: Sequence[str] = ("sample",)) -> torch.Tensor:
    """Run the scheduler from call ``begin_index`` to the end; returns the final state.

    Args:
        pipe: the pipeline (``scheduler``, ``progress_bar``, ``interrupt``; ``_num_timesteps`` is set here).
        z: float32 state ``[B, k*C, H, W]`` at ``scheduler.state_time(begin_index)``.
        eps_fn: ``(z, t) -> ε``, t the forward time of the call (a Python float).
        generator: passed to ``scheduler.step`` (its noise).
        begin_index: first call of the schedule (``scheduler.set_begin_index`` is called when > 0).
        after_step: ``(z, next_call_index) -> z`` applied after every step (inpainting).
        callback, callback_tensor_inputs: diffusers' ``callback_on_step_end`` and the names it receives
            (``"latents"`` / ``"sample"``: the state, ``"pred_original_sample"``: x̂₀); a returned
            ``"latents"`` or ``"sample"`` replaces the state. ``i`` counts the calls of this run from 0.

    Raises:
        NonFiniteError: ε or the new state has a NaN / inf (message: call, time, likely cause).
    """
    sched = pipe.scheduler
    if begin_index:
        sched.set_begin_index(begin_index)
    n_total = len(sched.timesteps)
    run = sched.timesteps[begin_index:]
    times = [float(t) for t in run.tolist()]  # one host copy; the loop never builds float64 tensors from t
    pipe._num_timesteps = len(run)
    pipe._interrupt = False
    for i, t in enumerate(pipe.progress_bar(run)):
        if pipe.interrupt:
            break
        t_f, call = times[i], begin_index + i
        where = f"sampling call {call + 1}/{n_total} (forward time t = {t_f:.6g})"
        try:
            eps = check_finite(eps_fn(z, t_f), "ε", "the guided / corrected ε overflowed")
        except NonFiniteError as err:
            raise NonFiniteError(f"{where}: {err}", err.cause) from None
        # back to the network's `prediction_type` (identity for "epsilon"; for the consistent C-channel types a
        # guided / corrected ε is projected onto the consistent set, i.e. `project_eps`)
        out = sched.step(sched.eps_to_model_output(eps, z, t_f), t, z, generator=generator)
        z = out.prev_sample
        if not bool(torch.isfinite(z).all()):
            cause = "scheduler update: its coefficients or step size are not finite for this configuration"
            raise NonFiniteError(f"{where}: the state returned by {type(sched).__name__}.step is not finite ({cause})", cause)
        if after_step is not None:
            z = after_step(z, call + 1)
        if callback is not None:
            tensors = {"latents": z, "sample": z, "pred_original_sample": out.pred_original_sample}
            passed = {name: tensors[name] for name in callback_tensor_inputs}
            z = _callback_state(callback(pipe, i, t, passed), passed, z, callback,
                                getattr(pipe, "_callback_tensor_inputs", STATE_NAMES))
    return z


def _callback_state(cb_out, passed, z: torch.Tensor, callback, allowed) -> torch.Tensor:
    """The state after ``callback_on_step_end`` returned ``cb_out``: a returned ``"latents"`` / ``"sample"``
    (checked: a finite float tensor of ``z``'s shape on its device), else ``z``.

    Raises:
        TypeError: ``cb_out`` is not None or a dict; a returned state is not a float tensor.
        ValueError: an unknown key (typos are not ignored), a returned state of the wrong shape / device or
            non-finite, two different returned states, or a changed ``"pred_original_sample"`` (it cannot be
            replaced).
    """
    cb_name = getattr(callback, "__name__", type(callback).__name__)
    if cb_out is None:
        return z
    if not isinstance(cb_out, dict):
        raise TypeError(
            f"`callback_on_step_end` ({cb_name}) must return None or a dict of tensors, got {type(cb_out).__name__} {cb_out!r:.80}"
        )
    unknown = [key for key in cb_out if key not in allowed]
    if unknown:
        raise ValueError(
            f"`callback_on_step_end` ({cb_name}) returned unknown key(s) {unknown}; allowed: {list(allowed)} "
            f"(\"latents\" / \"sample\" replace the state)"
        )
    for key, val in cb_out.items():
        if key not in STATE_NAMES and (key not in passed or val is not passed[key]):
            raise ValueError(
                f"`callback_on_step_end` ({cb_name}) returned a changed {key!r}; only {list(STATE_NAMES)} can be "
                f"replaced (return {key!r} unchanged or leave it out)"
            )
    new = [(key, cb_out[key]) for key in STATE_NAMES if key in cb_out and cb_out[key] is not z]
    if len(new) == 2 and new[0][1] is not new[1][1]:
        raise ValueError(
            f"`callback_on_step_end` ({cb_name}) returned both 'latents' and 'sample' as different tensors; return one"
        )
    if not new:
        return z
    key, val = new[0]
    what = f"`callback_on_step_end` ({cb_name}) returned {key!r}"
    if not isinstance(val, torch.Tensor) or val.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        desc = f"tensor of dtype {val.dtype}" if isinstance(val, torch.Tensor) else type(val).__name__
        raise TypeError(f"{what} as {desc}; expected a float32 tensor of shape {tuple(z.shape)} (the state)")
    if tuple(val.shape) != tuple(z.shape):
        raise ValueError(f"{what} with shape {tuple(val.shape)}; expected the state's shape {tuple(z.shape)}")
    if val.device != z.device:
        raise ValueError(f"{what} on {val.device}; expected the state's device {z.device}")
    if not bool(torch.isfinite(val).all()):
        raise ValueError(f"{what} with NaN or inf values")
    return val.to(torch.float32)


def to_output(z: torch.Tensor, data_channels: int, output_type: str, return_momentum: bool, numpy_to_pil):
    """Final state → ``(images, momentum)``: x mapped from [-1, 1] to [0, 1] (clamped) as PIL / NumPy
    ``[B, H, W, C]`` / tensor ``[B, C, H, W]``; the raw momentum half when requested, else None."""
    C = data_channels
    images = (z[:, :C] / 2 + 0.5).clamp(0, 1)
    momentum = z[:, C:] if return_momentum else None
    if output_type != "pt":
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if momentum is not None:
            momentum = momentum.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "pil":
            images = numpy_to_pil(images)
    return images, momentum
