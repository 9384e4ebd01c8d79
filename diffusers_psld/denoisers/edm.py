r"""σ-conditioned (VE / EDM-style) networks as denoisers.

EDM (Karras et al. 2022, Table 1) writes ``D(y; σ) = c_skip(σ) y + c_out(σ) F(c_in(σ) y, c_noise(σ))``. Two
conventions of diffusers' schedulers are supported (``preconditioning``):

* ``"edm"`` — ``EDMEulerScheduler`` / ``EDMDPMSolverMultistepScheduler``: ``c_in = 1/√(σ² + σ_d²)``,
  ``c_noise = ¼ log σ``, ``c_skip = σ_d²/(σ² + σ_d²)``, ``c_out = ±σ σ_d/√(σ² + σ_d²)`` (``+`` for diffusers'
  ``prediction_type="epsilon"``, which is EDM's F-prediction; ``-`` for ``"v_prediction"``).
* ``"vp"`` — ``EulerDiscreteScheduler(timestep_type="continuous")``: a VP network conditioned on
  ``c_noise = ¼ log σ``, ``c_in = 1/√(σ² + 1)``, read as a VP output (``epsilon``: ``y - σ f``;
  ``v_prediction``: ``c_in² y - σ c_in f``; ``sample``: ``f``).
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (names the pipeline loader looks up here)

from .base import Denoiser, coef
from .vp import check_vp_channels, check_vp_prediction_type, vp_denoised

__all__ = ["EDMDenoiser", "PRECONDITIONINGS"]

PRECONDITIONINGS = ("edm", "vp")


class EDMDenoiser(Denoiser):
    r"""A σ-conditioned network (EDM / VE style) as a denoiser ``D(y; σ)`` (conventions in the module docstring).

    Args:
        unet: the network, C channels in and out; it receives ``c_in·y`` and ``c_noise = ¼ log σ``.
        sigma_data: σ_d of the ``"edm"`` preconditioning (EDM: 0.5).
        prediction_type: ``"epsilon"`` or ``"v_prediction"`` (``"edm"``, diffusers' names); ``"epsilon"``,
            ``"v_prediction"`` or ``"sample"`` (``"vp"``).
        preconditioning: ``"edm"`` or ``"vp"``.
        sigma_min, sigma_max: the training range of σ; outside it the noise *conditioning* c_noise is clamped to the
            nearest end while c_in, c_skip and c_out use the exact σ.
        null_class: the last class index is an unconditional class.
    """

    def __init__(self, unet=None, sigma_data: float = 0.5, prediction_type: str = "epsilon",
                 preconditioning: str = "edm", sigma_min: float = 0.002, sigma_max: float = 80.0,
                 null_class: bool = False, network_class: Optional[str] = None, network_config: Optional[dict] = None):
        super().__init__()
        self.register_to_config(sigma_data=sigma_data, prediction_type=prediction_type, preconditioning=preconditioning,
                                sigma_min=sigma_min, sigma_max=sigma_max, null_class=bool(null_class))
        self._init_network(unet, network_class, network_config)
        if preconditioning not in PRECONDITIONINGS:
            raise ValueError(f"`preconditioning` must be one of {PRECONDITIONINGS}, got {preconditioning!r}")
        if preconditioning == "edm" and prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"`prediction_type` must be 'epsilon' or 'v_prediction' for the 'edm' preconditioning "
                             f"(diffusers' EDM schedulers), got {prediction_type!r}")
        check_vp_prediction_type(prediction_type)
        for name, val in (("sigma_data", sigma_data), ("sigma_min", sigma_min), ("sigma_max", sigma_max)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < float(val) < math.inf:
                raise ValueError(f"`{name}` must be a finite number > 0, got {val!r}")
        if sigma_max <= sigma_min:
            raise ValueError(f"`sigma_max` ({sigma_max}) must be > `sigma_min` ({sigma_min})")
        check_vp_channels(self, False)

    @property
    def sigma_range(self):
        return (float(self.config.sigma_min), float(self.config.sigma_max))

    def denoise(self, y, sigma, class_labels):
        cfg = self.config
        net_dtype = self._network_dtype()
        c_noise = 0.25 * torch.log(sigma.clamp(float(cfg.sigma_min), float(cfg.sigma_max)))
        if cfg.preconditioning == "vp":
            c_in = (1.0 + sigma ** 2).rsqrt()
            out = self._call_network(coef(c_in, y) * y, c_noise, class_labels, net_dtype)
            return vp_denoised(out, y, sigma, cfg.prediction_type)
        sd2 = float(cfg.sigma_data) ** 2
        c_in = (sigma ** 2 + sd2).rsqrt()
        c_skip = sd2 / (sigma ** 2 + sd2)
        c_out = sigma * math.sqrt(sd2) * c_in * (1.0 if cfg.prediction_type == "epsilon" else -1.0)
        out = self._call_network(coef(c_in, y) * y, c_noise, class_labels, net_dtype)
        return coef(c_skip, y) * y + coef(c_out, y) * out[:, : y.shape[1]].to(y.dtype)
