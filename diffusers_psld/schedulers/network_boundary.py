r"""The network boundary of the schedulers: what the network receives (``model_time``, ``scale_model_input``) and
how its output becomes ε (``prediction_type``, :mod:`diffusers_psld.parameterization`).

:class:`NetworkBoundaryMixin` is part of :class:`~.scheduling_psld.PSLDScheduler`; it needs ``self.config``,
``self.num_components`` and the installed step tables (``self._tables``, per-call float64 maps), and falls back to
computing the maps at any other time (adaptive ODE solvers, likelihood).
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
import torch

from .. import parameterization
from ..sde import blocks
from .validation import check_float_tensor, timestep_value

__all__ = ["NetworkBoundaryMixin"]


class NetworkBoundaryMixin:
    """``model_time``, ``scale_model_input``, ``output_channels``, ``check_unet`` and the output ↔ ε maps."""

    def model_time(self, t, batch_size: Optional[int] = None, device=None) -> torch.Tensor:
        """What the UNet (and a time-dependent classifier) receives for forward time ``t``.

        Returns a float32 tensor ``t * time_scale`` of shape ``[batch_size]`` (or ``t``'s shape), on ``device``
        (default: ``t``'s device for a tensor, else the CPU). A float32 tensor ``t`` is scaled where it is (the
        float32 product is correctly rounded, equal to the float64 route for ``time_scale`` = 1000); numbers and
        float64 tensors are scaled in float64 on the CPU. Use this everywhere (training, sampling, guidance) so
        the network sees one convention. ``ValueError`` if ``t`` has neither 1 nor ``batch_size`` entries.
        """
        scale = float(self.config.time_scale)
        if batch_size is not None and (isinstance(batch_size, (bool, np.bool_))
                                       or not isinstance(batch_size, (int, np.integer)) or batch_size < 1):
            raise ValueError(f"`batch_size` must be a positive int (or None), got {batch_size!r}")
        if isinstance(t, torch.Tensor):
            if t.dtype == torch.bool or t.is_complex():
                raise TypeError(f"`t` must hold real forward times, got a {t.dtype} tensor")
            if not bool(torch.isfinite(t).all()) or bool((t < 0).any()):
                raise ValueError(f"`t` must be finite forward times >= 0, got {t!r}")
            if t.dtype == torch.float64 or not torch.is_floating_point(t):
                out = (t.detach().to("cpu").to(torch.float64) * scale).to(torch.float32)
                device = t.device if device is None else device
            else:
                out = t.detach().to(torch.float32) * scale
        else:
            # any finite t >= 0 (adaptive ODE solvers, e.g. torchdiffeq's dopri5, evaluate stages past t = 1)
            out = torch.tensor(timestep_value(t, "t", upper=math.inf) * scale, dtype=torch.float32)
        if batch_size is not None:
            if out.numel() == 1:
                out = out.reshape(-1).expand(int(batch_size))
            elif out.numel() == int(batch_size):
                out = out.reshape(int(batch_size))
            else:
                raise ValueError(f"`t` has {out.numel()} entries but `batch_size` is {batch_size}: pass one time or one per sample")
        return out if device is None else out.to(device)

    def output_channels(self, data_channels: int) -> int:
        """Output channels of the network for data of ``data_channels`` = C channels: ``k*C`` for
        ``prediction_type="epsilon"``, ``C`` for ``"sample"`` / ``"sufficient_epsilon"``."""
        if isinstance(data_channels, bool) or not isinstance(data_channels, int) or data_channels <= 0:
            raise ValueError(f"`data_channels` must be an int > 0, got {data_channels!r}")
        return parameterization.output_components(self.config.prediction_type, self.num_components) * data_channels

    def check_unet(self, unet, what: str = "unet") -> int:
        """Raise ``ValueError`` unless ``unet`` (anything with ``config.in_channels``/``out_channels``) matches this
        config: ``in_channels = k*C`` and ``out_channels = output_channels(C)``. Returns C."""
        cfg = getattr(getattr(unet, "module", unet), "config", unet)
        return parameterization.check_unet_channels(getattr(cfg, "in_channels", None), getattr(cfg, "out_channels", None),
                                                    self.num_components, self.config.prediction_type, what)

    def _maps_at(self, timestep, work, device):
        """``(OutputMaps, c_in or None)`` at ``timestep``: this call's table entry when it matches, else computed."""
        i = self._call_index_for(timestep) if not isinstance(timestep, str) else None
        if i is not None:  # the current call's time (float32 ``timesteps`` entries included): its float64 table entry
            cast = self._tables.on(device, work)
            return cast.out_maps[i], (cast.c_in[i] if cast.c_in is not None else None)
        t = torch.as_tensor(timestep, dtype=torch.float64).detach().cpu().reshape(-1)
        if not torch.all(torch.isfinite(t)) or torch.any(t < 0):  # past t = 1 is fine (adaptive ODE stages)
            raise ValueError(f"`timestep` must be finite forward times >= 0, got {timestep!r}")
        kern = self.sde.hsm_kernel(t)
        maps = parameterization.output_maps(self.config.prediction_type, kern.mean_coef, kern.chol)
        c_in = (parameterization.input_scaling(kern.mean_coef, kern.cov, self.config.sigma_data)
                if self.config.input_preconditioning else None)
        if t.numel() == 1:
            maps, c_in = maps[0], (None if c_in is None else c_in[0])
        return maps.to(device, work), (None if c_in is None else c_in.to(device, work))

    def model_output_to_eps(self, model_output: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """ε ``[B, k*C, ...]`` from the network output (``prediction_type``) at state ``sample`` and forward
        time ``timestep`` (scalar or ``[B]``); identity for ``"epsilon"``. Differentiable; in ``sample``'s dtype
        (float32 at least). ``TypeError`` for non-float inputs, ``ValueError`` for a wrong shape."""
        check_float_tensor(model_output, "model_output")
        check_float_tensor(sample, "sample")
        self._check_output_shape(model_output, sample)
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        maps, _ = self._maps_at(timestep, work, sample.device)
        return maps.to_eps(model_output.to(work), sample.to(work))

    def eps_to_model_output(self, eps: torch.Tensor, sample: torch.Tensor, timestep) -> torch.Tensor:
        """The network output that gives ``eps`` (``prediction_type``; identity for ``"epsilon"``). For the
        C-channel types an inconsistent ε is projected (the result lifts back to ``project_eps``'s ε').
        ``TypeError`` for non-float inputs, ``ValueError`` unless ``eps`` has ``sample``'s shape."""
        check_float_tensor(eps, "eps")
        check_float_tensor(sample, "sample")
        self._check_output_shape(eps, sample, "eps", self.num_components)
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        maps, _ = self._maps_at(timestep, work, sample.device)
        return maps.from_eps(eps.to(work), sample.to(work))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        """What the network receives for state ``sample`` ``[B, k*C, ...]`` at forward time ``timestep``
        (scalar or ``[B]``): the state itself, or with ``input_preconditioning`` the whitened state
        c_in(t) z, c_in(t) = (Σ_t + σ_data² a_t a_tᵀ)^{-1/2} (float64 tables, product in ``sample``'s dtype).
        Training (:func:`diffusers_psld.losses.hsm_loss`) calls the same function. ``TypeError`` unless ``sample``
        is a floating-point tensor."""
        check_float_tensor(sample, "sample")
        if not self.config.input_preconditioning:
            return sample
        if timestep is None:
            raise ValueError("`timestep` is required by scale_model_input when `input_preconditioning=True`")
        _, c_in = self._maps_at(timestep, sample.dtype, sample.device)
        return blocks.apply(c_in, sample)

    def _check_output_shape(self, model_output, sample, name: str = "model_output", j: Optional[int] = None):
        """``ValueError`` unless ``sample`` is ``[B, k*C, ...]`` and ``model_output`` (called ``name``) has ``j*C``
        channels (default: the ``prediction_type``'s output components) and ``sample``'s other dimensions."""
        k = self.num_components
        if sample.ndim < 2 or sample.shape[1] % k != 0:
            raise ValueError(f"`sample` must have shape [B, {k}*C, ...] ({k} stacked components), got {tuple(sample.shape)}")
        if j is None:
            j = parameterization.output_components(self.config.prediction_type, k)
        expected_shape = (sample.shape[0], j * (sample.shape[1] // k), *sample.shape[2:])
        if tuple(model_output.shape) != expected_shape:
            what = (f"predict ε for all {sample.shape[1]} channels of the state" if j == k else
                    f"have C = {sample.shape[1] // k} channels for prediction_type={self.config.prediction_type!r}")
            raise ValueError(f"`{name}` must {what}, i.e. have shape {expected_shape}; got {tuple(model_output.shape)}")
