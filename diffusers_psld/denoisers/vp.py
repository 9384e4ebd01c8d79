r"""VP (DDPM-family) networks as denoisers: a discrete diffusers schedule, or the continuous VP-SDE.

A VP network sees ``x_t = √ᾱ x₀ + √(1-ᾱ) ε = √ᾱ (x₀ + σ n)`` with ``σ = √((1-ᾱ)/ᾱ)``; so for ``y = x₀ + σ n`` it
receives ``c_in·y`` with ``c_in = √ᾱ(σ) = 1/√(1+σ²)`` and its output is read (k-diffusion's ``c_skip``/``c_out``):

* ``prediction_type="epsilon"``: the output is ε, and ``x̂₀ = y - σ ε``;
* ``prediction_type="v_prediction"``: the output is ``v = √ᾱ ε - √(1-ᾱ) x₀``, and ``x̂₀ = c_in² y - σ c_in v``;
* ``prediction_type="sample"``: the output is x̂₀.

A network with a learned variance (``variance_type`` ``"learned"`` / ``"learned_range"``, 2C output channels) is
read from its first C channels.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Optional

import torch
from diffusers import ConfigMixin, DDPMScheduler, ModelMixin  # noqa: F401  (names the pipeline loader looks up here)

from .base import Denoiser, coef, jsonable, log_interp

__all__ = ["DiscreteVPDenoiser", "ContinuousVPDenoiser", "VP_PREDICTION_TYPES", "scheduler_config_dict",
           "discrete_alphas_cumprod"]

VP_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
_LEARNED_VARIANCE = ("learned", "learned_range")
#: the keys of a DDPM-family config that define the training noise law (``alphas_cumprod``)
_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                  "rescale_betas_zero_snr")


def scheduler_config_dict(scheduler_or_config, what: str = "vp_scheduler") -> dict:
    """A plain, JSON-serialisable dict of a diffusers scheduler's config (``_class_name`` set to its class), from the
    scheduler or from its config (a mapping). ``TypeError`` for anything else."""
    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
    elif hasattr(scheduler_or_config, "config") and isinstance(scheduler_or_config.config, Mapping):
        cfg = dict(scheduler_or_config.config)
        cfg["_class_name"] = type(scheduler_or_config).__name__
    else:
        raise TypeError(f"`{what}` must be a diffusers scheduler or its config (a dict), got {type(scheduler_or_config).__name__}")
    cfg.pop("_use_default_values", None)
    return jsonable(cfg)


def discrete_alphas_cumprod(config: dict) -> torch.Tensor:
    """``ᾱ_τ`` (float64 ``[T]``) of a DDPM-family config, computed by diffusers' own ``DDPMScheduler`` (float32, as
    in training, then widened).

    Raises:
        ValueError: no ``num_train_timesteps``, or a ``beta_schedule`` diffusers does not implement.
    """
    if "num_train_timesteps" not in config:
        raise ValueError("the scheduler config has no `num_train_timesteps`: not a DDPM-family (discrete VP) schedule")
    kwargs = {k: config[k] for k in _SCHEDULE_KEYS if k in config}
    try:
        sched = DDPMScheduler(**kwargs)
    except NotImplementedError as err:
        raise ValueError(f"the scheduler config's beta_schedule={config.get('beta_schedule')!r} is not implemented by "
                         f"diffusers' DDPMScheduler ({err}); use 'linear', 'scaled_linear', 'squaredcos_cap_v2' or "
                         "`trained_betas`") from err
    return sched.alphas_cumprod.to(torch.float64)


def check_vp_prediction_type(prediction_type, what: str = "prediction_type") -> str:
    if prediction_type not in VP_PREDICTION_TYPES:
        raise ValueError(f"`{what}` must be one of {VP_PREDICTION_TYPES} for a VP network, got {prediction_type!r}")
    return prediction_type


def check_vp_channels(denoiser: Denoiser, learned_variance: bool) -> None:
    """A VP / EDM network maps C channels to C (2C with a learned variance); ``ValueError`` naming the fix otherwise."""
    cin, cout = denoiser._network_value("in_channels"), denoiser._network_value("out_channels", None)
    if not isinstance(cin, int) or cin < 1:
        raise ValueError(f"`unet` must record `config.in_channels` (the data channels C), got {cin!r}")
    cout = cin if cout is None else cout
    allowed = (cin, 2 * cin) if learned_variance else (cin,)
    if cout not in allowed:
        hint = (" A network of this package (k*C input channels for a PSLD/CLD state) is sampled by PSLDPipeline "
                "itself (or wrapped by RecipeDenoiser), not through a VP scheduler." if cout * 2 == cin or cout < cin else "")
        raise ValueError(f"`unet` has in_channels={cin}, out_channels={cout}: a VP network maps the C data channels to "
                         f"{' or '.join(map(str, allowed))} output channels"
                         f"{' (2C: learned variance)' if learned_variance else ''}.{hint}")


def vp_denoised(out: torch.Tensor, y: torch.Tensor, sigma: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """x̂₀ from a VP network's output (first C channels of ``out``) at ``y`` and float64 ``sigma`` ``[B]`` (module table)."""
    f = out[:, : y.shape[1]].to(y.dtype)
    if prediction_type == "sample":
        return f
    if prediction_type == "epsilon":
        return y - coef(sigma, y) * f
    c_in = (1.0 + sigma ** 2).rsqrt()
    return coef(c_in ** 2, y) * y - coef(sigma * c_in, y) * f  # v_prediction


class DiscreteVPDenoiser(Denoiser):
    r"""A network trained on a diffusers DDPM-family schedule, as a denoiser ``D(y; σ)``.

    Args:
        unet: the network (``UNet2DModel``-like: ``unet(x, timestep, class_labels=None).sample``), C channels in and
            out (2C out for ``variance_type`` ``"learned"`` / ``"learned_range"``).
        scheduler_config: the diffusers scheduler it was trained with, or its config: anything with
            ``num_train_timesteps`` and ``beta_schedule`` (``linear``, ``scaled_linear``, ``squaredcos_cap_v2``, …) or
            ``trained_betas``, and ``prediction_type`` ``epsilon`` / ``v_prediction`` / ``sample`` (``DDPMScheduler``,
            ``DDIMScheduler``, ``PNDMScheduler``, ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``,
            ``EulerDiscreteScheduler``, …). ``ᾱ_τ`` comes from diffusers' ``DDPMScheduler`` on that config.
        null_class: the network's last class index is an unconditional class (classifier-free guidance needs it).

    Noise level → timestep: ``σ_τ = √((1-ᾱ_τ)/ᾱ_τ)`` for τ = 0 … T-1; a σ between two table entries gives the
    fractional τ that interpolates linearly in log σ (k-diffusion's ``sigma_to_t``), passed to the network as a float
    timestep; at a table σ, τ is that integer exactly (the network sees exactly its training input). σ outside
    ``[σ_0, σ_{T-1}]`` clamps τ to 0 or T-1 (the *timestep* only): the network input ``c_in·y`` with
    ``c_in = 1/√(1+σ²)`` keeps the exact noise scale of σ. A zero-terminal-SNR schedule (``rescale_betas_zero_snr``,
    ᾱ_{T-1} = 0, σ = ∞) leaves out the infinite entry.

    Interpolation error: between two table entries the network is evaluated at a timestep it was not trained on,
    and the wrapper takes its noise level to be log-linear in τ there. A network that instead continues its table
    geometrically (ᾱ log-linear in τ: a fractional DDPM step) has, on diffusers' default linear schedule (T = 1000),
    a noise level that differs from the wrapper's by ``|Δ log σ|`` ≤ 0.038 for τ ∈ [0, 1], ≤ 1.2e-3 for τ ≥ 10 and
    ≤ 2.3e-5 for τ ≥ 100 (cosine schedule: 0.035, 9.5e-4, 2.1e-5); x̂₀ then moves by about
    ``σ |Δ log σ| |∂D/∂σ|`` (tested with exact models of both continuations). At the table's σ_τ the wrapper is exact.
    """

    def __init__(self, unet=None, scheduler_config: Optional[dict] = None, null_class: bool = False,
                 network_class: Optional[str] = None, network_config: Optional[dict] = None):
        super().__init__()
        if scheduler_config is None:
            raise ValueError("DiscreteVPDenoiser needs `scheduler_config`: the diffusers scheduler (or its config) the network was trained with")
        cfg = scheduler_config_dict(scheduler_config, "scheduler_config")
        self.register_to_config(scheduler_config=cfg, null_class=bool(null_class))
        self._init_network(unet, network_class, network_config)
        self.prediction_type = check_vp_prediction_type(cfg.get("prediction_type", "epsilon"),
                                                        "scheduler_config['prediction_type']")
        check_vp_channels(self, cfg.get("variance_type") in _LEARNED_VARIANCE)
        ac = discrete_alphas_cumprod(cfg)
        log_sigmas = 0.5 * (torch.log1p(-ac) - torch.log(ac))
        keep = torch.isfinite(log_sigmas)
        if int(keep.sum()) < 2 or not bool((log_sigmas[keep].diff() > 0).all()):
            raise ValueError("the scheduler config's noise levels σ_τ = √((1-ᾱ_τ)/ᾱ_τ) must increase with τ (at least "
                             "two finite entries); check `trained_betas` / `beta_schedule`")
        self._log_sigmas = log_sigmas[keep].contiguous()
        self._taus = torch.arange(len(ac), dtype=torch.float64)[keep].contiguous()

    @property
    def sigma_range(self):
        return (math.exp(self._log_sigmas[0].item()), math.exp(self._log_sigmas[-1].item()))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.config.scheduler_config["num_train_timesteps"])

    def sigma_to_timestep(self, sigma: torch.Tensor) -> torch.Tensor:
        """The (fractional, clamped) float64 timestep τ of float64 noise levels ``sigma`` (class docstring)."""
        return log_interp(torch.log(sigma), self._log_sigmas, self._taus)

    def timestep_to_sigma(self, timestep: torch.Tensor) -> torch.Tensor:
        """σ at (fractional) float64 timesteps in [0, T-1], interpolating log σ linearly (exact at integers)."""
        return torch.exp(log_interp(timestep, self._taus, self._log_sigmas))

    def denoise(self, y, sigma, class_labels):
        net_dtype = self._network_dtype()
        c_in = (1.0 + sigma ** 2).rsqrt()
        out = self._call_network(coef(c_in, y) * y, self.sigma_to_timestep(sigma), class_labels, net_dtype)
        return vp_denoised(out, y, sigma, self.prediction_type)


class ContinuousVPDenoiser(Denoiser):
    r"""A network of the continuous VP-SDE with linear β (score_sde's VP models; this package's ``diffusion="vp"``
    networks trained without input preconditioning) as a denoiser ``D(y; σ)``.

    Args:
        unet: the network, C channels in and out; it receives ``model_time = t · time_scale``.
        beta_min, beta_max: β(t) = β_min + t(β_max - β_min) on t ∈ [0, 1] (score_sde / this package: 0.1, 20).
        time_scale: the network's time input per unit t (this package: 1000; score_sde's DDPM models: 999).
        prediction_type: ``"epsilon"``, ``"v_prediction"`` or ``"sample"`` (module table).
        t_min, t_max: the training time range; σ(t) outside it clamps the *time* (the input scaling stays exact).
        null_class: the last class index is an unconditional class.

    Noise level → time in closed form: ``σ² = e^{B(t)} - 1`` with ``B(t) = β_min t + ½(β_max - β_min) t²``, so
    ``B = log1p(σ²)`` and ``t = 2B / (β_min + √(β_min² + 2(β_max - β_min)B))`` (no cancellation).
    """

    def __init__(self, unet=None, beta_min: float = 0.1, beta_max: float = 20.0, time_scale: float = 1000.0,
                 prediction_type: str = "epsilon", t_min: float = 1e-5, t_max: float = 1.0, null_class: bool = False,
                 network_class: Optional[str] = None, network_config: Optional[dict] = None):
        super().__init__()
        self.register_to_config(beta_min=beta_min, beta_max=beta_max, time_scale=time_scale, prediction_type=prediction_type,
                                t_min=t_min, t_max=t_max, null_class=bool(null_class))
        self._init_network(unet, network_class, network_config)
        self.prediction_type = check_vp_prediction_type(prediction_type)
        for name, val in (("beta_min", beta_min), ("beta_max", beta_max), ("time_scale", time_scale)):
            if isinstance(val, bool) or not isinstance(val, (int, float)) or not 0 < float(val) < math.inf:
                raise ValueError(f"`{name}` must be a finite number > 0, got {val!r}")
        if beta_max < beta_min:
            raise ValueError(f"`beta_max` ({beta_max}) must be >= `beta_min` ({beta_min})")
        if not 0 < float(t_min) < float(t_max):
            raise ValueError(f"need 0 < t_min < t_max, got t_min={t_min!r}, t_max={t_max!r}")
        check_vp_channels(self, False)

    def _sigma(self, t: float) -> float:
        b = self.config.beta_min * t + 0.5 * (self.config.beta_max - self.config.beta_min) * t * t
        return math.sqrt(math.expm1(b))

    @property
    def sigma_range(self):
        return (self._sigma(self.config.t_min), self._sigma(self.config.t_max))

    def sigma_to_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """Forward time t (float64, clamped to [t_min, t_max]) of float64 noise levels (closed form, class docstring)."""
        b0, d = float(self.config.beta_min), float(self.config.beta_max - self.config.beta_min)
        big_b = torch.log1p(sigma ** 2)
        t = 2.0 * big_b / (b0 + torch.sqrt(b0 * b0 + 2.0 * d * big_b))
        return t.clamp(float(self.config.t_min), float(self.config.t_max))

    def denoise(self, y, sigma, class_labels):
        net_dtype = self._network_dtype()
        c_in = (1.0 + sigma ** 2).rsqrt()
        time = self.sigma_to_time(sigma) * float(self.config.time_scale)
        out = self._call_network(coef(c_in, y) * y, time, class_labels, net_dtype)
        return vp_denoised(out, y, sigma, self.prediction_type)

