r"""Any denoiser behind diffusers' UNet call signature, answering as a VP ε-model on a DDPM schedule.

:class:`VPEpsilonModel` is what :meth:`diffusers_psld.PSLDPipeline.to_vp` returns as ``unet``: for
``x_τ = √ᾱ_τ x₀ + √(1-ᾱ_τ) ε`` it computes ``y = x_τ/√ᾱ_τ = x₀ + σ_τ ε`` (σ_τ = √((1-ᾱ_τ)/ᾱ_τ)), asks the
denoiser for x̂₀ = D(y; σ_τ) and returns ``ε̂ = (y - x̂₀)/σ_τ`` = E[ε | x_τ]: the optimal VP ε-prediction. So
diffusers' VP schedulers (DDPM, DDIM, DPM-Solver, UniPC, PNDM, Euler, …) sample the denoiser's data law with this
model and the matching scheduler config (:func:`default_vp_config`).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (names the pipeline loader looks up here)
from diffusers.models.unets.unet_2d import UNet2DOutput

from .base import Denoiser, jsonable, log_interp
from .vp import discrete_alphas_cumprod

__all__ = ["VPEpsilonModel", "default_vp_config"]


def default_vp_config(**overrides) -> dict:
    r"""The DDPM schedule :meth:`~diffusers_psld.PSLDPipeline.to_vp` uses unless told otherwise: diffusers' default
    ``DDPMScheduler`` schedule (T = 1000, linear β from 1e-4 to 0.02: σ_τ from 0.0100 to 157.4) with
    ``clip_sample=False`` (the denoiser's x̂₀ is used as is; clipping would bias data outside [-1, 1]) and
    ``prediction_type="epsilon"``. It is the schedule every diffusers VP scheduler's default config shares, and its σ
    range lies inside PSLD's trained range (σ ∈ [8.9e-4, 257.7] for t ∈ [1e-5, 1]) and CLD's ([8.2e-7, 247.6]); the
    VP-SDE (β 0.1 → 20) reaches σ = 152.2 at t = 1, so its top 1 % of τ clamps the network's time at t = 1
    (the input scale stays exact). ``overrides`` replace entries (e.g. ``num_train_timesteps``, ``beta_end``).
    """
    cfg = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear", clip_sample=False,
               prediction_type="epsilon")
    cfg.update(overrides)
    return cfg


class VPEpsilonModel(ModelMixin, ConfigMixin):
    r"""A :class:`~diffusers_psld.denoisers.Denoiser` as a diffusers VP ε-model (module docstring).

    ``forward(sample, timestep, class_labels=None, return_dict=True)`` → ``UNet2DOutput(sample=ε̂)``, with ``sample``
    ``[B, C, H, W]`` (the VP state x_τ) and ``timestep`` the DDPM timestep(s) τ ∈ [0, T-1] (a number, a 0-d tensor or
    ``[B]``; fractional τ interpolates log σ linearly between table entries, as the discrete wrapper and diffusers'
    Karras-σ / Heun / KDPM2 conversions do; exact at integer τ, which DDPM, DDIM, PNDM, DPM-Solver and UniPC use.
    ``EulerDiscreteScheduler`` with ``timestep_spacing="linspace"`` passes fractional τ at which it interpolates σ
    itself linearly: the two differ by at most 2.0 % in σ for τ ∈ [0, 1], 5.8e-4 for τ ≥ 10 and 1.3e-5 for τ ≥ 100 on
    the default schedule; :func:`default_vp_config` keeps DDPM's ``"leading"`` spacing, integer τ throughout). ε̂ is
    computed in float64 for a float64 ``sample`` (else float32) and returned in ``sample``'s dtype. ``config`` carries
    ``in_channels`` = ``out_channels`` = C and ``sample_size`` (what ``DDPMPipeline`` reads), the schedule
    (``scheduler_config``) and the denoiser's class and config (``save_pretrained`` / ``from_pretrained`` rebuild it).

    Args:
        denoiser: the denoiser.
        scheduler_config: the DDPM-family schedule the model answers on (default :func:`default_vp_config`); use the
            same config for the scheduler that drives it. A zero-terminal-SNR schedule is refused (σ = ∞).
    """

    def __init__(self, denoiser: Optional[Denoiser] = None, scheduler_config: Optional[dict] = None,
                 denoiser_class: Optional[str] = None, denoiser_config: Optional[dict] = None,
                 in_channels: Optional[int] = None, out_channels: Optional[int] = None, sample_size=None,
                 num_class_embeds: Optional[int] = None):
        super().__init__()
        from . import DENOISER_CLASSES  # late: the package imports this module

        if denoiser is None:
            cls = DENOISER_CLASSES.get(denoiser_class)
            if cls is None:
                raise ValueError(f"`denoiser_class` must be one of {sorted(DENOISER_CLASSES)}, got {denoiser_class!r}")
            denoiser = cls.from_config(dict(denoiser_config or {}))
        elif not isinstance(denoiser, Denoiser):
            raise TypeError(f"`denoiser` must be a diffusers_psld Denoiser, got {type(denoiser).__name__}")
        cfg = default_vp_config() if scheduler_config is None else jsonable(dict(scheduler_config))
        if cfg.get("rescale_betas_zero_snr"):
            raise ValueError("`scheduler_config` has rescale_betas_zero_snr=True (σ = ∞ at the last timestep): a VP "
                             "ε-model cannot answer there; use a finite schedule")
        C = denoiser.data_channels
        self.register_to_config(
            scheduler_config=cfg, denoiser_class=type(denoiser).__name__,
            denoiser_config=jsonable({k: v for k, v in denoiser.config.items() if k != "_use_default_values"}),
            in_channels=C, out_channels=C, sample_size=jsonable(denoiser.sample_size),
            num_class_embeds=denoiser.num_class_embeds)
        self.denoiser = denoiser
        ac = discrete_alphas_cumprod(cfg)
        self._log_sigmas = (0.5 * (torch.log1p(-ac) - torch.log(ac))).contiguous()
        self._taus = torch.arange(len(ac), dtype=torch.float64)

    def timestep_to_sigma(self, timestep, batch_size: int) -> torch.Tensor:
        """σ_τ (float64 CPU ``[batch_size]``) of DDPM timesteps; ``ValueError`` outside [0, T-1] or not finite."""
        if isinstance(timestep, torch.Tensor):
            tau = timestep.detach().to("cpu", torch.float64).reshape(-1)
        else:
            tau = torch.as_tensor(np.asarray(timestep, dtype=np.float64)).reshape(-1)
        if tau.numel() == 1:
            tau = tau.expand(batch_size)
        if tau.numel() != batch_size:
            raise ValueError(f"`timestep` must have 1 or {batch_size} (the batch size) entries, got {tau.numel()}")
        T = len(self._taus)
        if not bool(torch.isfinite(tau).all()) or bool((tau < 0).any()) or bool((tau > T - 1).any()):
            raise ValueError(f"`timestep` must be DDPM timesteps in [0, {T - 1}], got {timestep!r}")
        return torch.exp(log_interp(tau, self._taus, self._log_sigmas))

    def forward(self, sample: torch.Tensor, timestep, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        sigma = self.timestep_to_sigma(timestep, sample.shape[0])
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        shape = (-1,) + (1,) * (sample.ndim - 1)
        s = sigma.to(device=sample.device, dtype=work).reshape(shape)
        y = sample.to(work) * torch.sqrt(1.0 + s * s)
        x0 = self.denoiser(y, sigma, class_labels)
        eps = ((y - x0) / s).to(sample.dtype)
        return UNet2DOutput(sample=eps) if return_dict else (eps,)
