r"""``PSLDScheduler``: reverse-time samplers of the complete recipe behind the Diffusers scheduler API.

State layout: ``sample = [x ; m]`` stacked on the channel axis (``k*C`` channels, k = 2 for PSLD and
CLD, k = 1 for VP); the model predicts ε for all ``k*C`` channels. With Γ = 0 (CLD) the ε_x half
cannot influence the reverse dynamics (``D L⁻ᵀ`` has a zero column), so it is ignored here and
excluded from the loss (:func:`diffusers_psld.losses.hsm_loss`): one shape contract for every preset.

Time: ``timesteps`` are continuous forward times t (float, descending; by default in [sampling_eps, 1]); the UNet
receives :meth:`PSLDScheduler.model_time` ``(t) = t * time_scale`` as a float tensor (a raw t in
[0, 1] barely moves UNet2DModel's sinusoidal embedding, and a Python float would be cast to int).
Training uses the same function.

``num_inference_steps`` is the exact number of model evaluations: N - 1 reverse steps on the time grid
(for Heun, pairs of evaluations) and one final noiseless step from the last grid time (``sampling_eps`` by default)
to 0 (``final_step``; by default the mean of an Euler(-Maruyama) step, as in the paper's code). The grid is a
named grid (``time_grid``, :mod:`.time_grids`) or a custom list given to ``set_timesteps(timesteps=...)`` /
``set_timesteps(sigmas=...)`` (noise levels σ_t, the σ of VP / EDM models), see :meth:`PSLDScheduler.set_timesteps`.

Every step except Heun's is the affine map ``z' = P z + R ε + S ξ`` with k×k float64 matrices built
in :meth:`set_timesteps` (see :mod:`diffusers_psld.sampling`), so a step costs three small einsums.

``timesteps`` is a float32 tensor on the ``set_timesteps`` device (devices such as Apple MPS have no
float64); the exact float64 times stay on the CPU in the step tables, and :meth:`PSLDScheduler.step`
maps the timestep it receives back to its table entry, so no float64 tensor is ever created on the
device for a float32 state (the state's dtype is the working dtype; float64 states work in float64).

The standard Diffusers loop drives every sampler::

    scheduler.set_timesteps(50)
    z = scheduler.sample_prior((batch, 2 * C, H, W), generator=g)
    for t in scheduler.timesteps:
        inp = scheduler.scale_model_input(z, t)
        eps = unet(inp, scheduler.model_time(t, batch)).sample
        z = scheduler.step(eps, t, z, generator=g).prev_sample

Where each concern of the scheduler base lives (this module keeps the configuration, ``set_timesteps`` and
``step``; the other classes of the package subclass it):

* the float64 step tables, the builders of the step samplers and the mid-schedule entry maps: :mod:`.step_tables`;
* the time grids and the noise level σ_t ↔ t: :mod:`.time_grids`; the schedule config keys, the grid / NFE / final
  call / first state of a schedule: :mod:`.schedule_options`;
* ``set_begin_index`` / the index-by-timestep rule / ``state_time``: :mod:`.mid_schedule`;
* the prior, ``add_noise`` and the kernel maps at a time (guidance, inpainting): :mod:`.forward_process`;
* ``model_time``, ``scale_model_input`` and the ``prediction_type`` maps: :mod:`.network_boundary`;
* swapping classes with ``from_config``: :mod:`.config_swap`; argument checks: :mod:`.validation`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple, Union

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .. import parameterization, sampling
from ..sde import RecipeSDE, blocks
from .config_swap import SAMPLER_MEMORY_KEY, check_config_sampler, choose_sampler  # noqa: F401  (re-exported)
from .forward_process import ForwardProcessMixin
from .mid_schedule import MidScheduleMixin
from .network_boundary import NetworkBoundaryMixin
from .step_tables import AFFINE as _AFFINE, HEUN_CORR as _HEUN_CORR, HEUN_PRED as _HEUN_PRED  # noqa: F401
from .step_tables import CastTables as _Cast, Calls as _Calls, StepTables as _StepTables  # noqa: F401
from .step_tables import all_finite as _all_finite, em_calls, entry_maps, pf_euler_calls, pf_heun_calls, sscs_calls
from .schedule_options import CUSTOM_KEYS, ScheduleMixin, schedule_options
from .time_grids import STRIDINGS, check_custom_grid, noise_level, time_grid  # noqa: F401  (time_grid re-exported)
from .validation import (SIGMA_DATA_RANGE, TIME_SCALE_RANGE, check_batch, check_float_tensor, check_generator,
                         check_real, check_steps, plain_config_values, timestep_value)

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["PSLDScheduler", "PSLDSchedulerOutput", "SAMPLERS", "STRIDINGS"]

SAMPLERS = ("em", "pf_euler", "pf_heun", "sscs")
DIFFUSIONS = ("psld", "vp")
_PRESET_BETA = {"psld": (8.0, 8.0), "vp": (0.1, 20.0)}


@dataclass
class PSLDSchedulerOutput(BaseOutput):
    """Output of :meth:`PSLDScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `[B, k*C, ...]`): the state at the next timestep.
        pred_original_sample (`torch.Tensor` of shape `[B, C, ...]`): x̂₀ estimated from this step's ε.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


class PSLDScheduler(ScheduleMixin, MidScheduleMixin, ForwardProcessMixin, NetworkBoundaryMixin, SchedulerMixin,
                    ConfigMixin):
    r"""Samplers for PSLD / CLD / VP diffusions (PSLD paper Eq. 11-12) with ε-prediction.

    Args:
        diffusion (`str`, defaults to `"psld"`): `"psld"` (k = 2; Γ = 0 gives CLD) or `"vp"` (k = 1).
        gamma (`float`, defaults to 0.01): Γ, x-space noise (>= 0).
        nu (`float`, defaults to 4.01): ν, momentum-space noise (>= 0).
        m_inv (`float`, *optional*): M⁻¹; `None` applies critical damping M⁻¹ = (ν - Γ)²/4.
        beta_min (`float`, *optional*), beta_max (`float`, *optional*): linear β(t) endpoints;
            `None` takes the preset's (8, 8 for PSLD; 0.1, 20 for VP).
        kappa (`float`, defaults to 0.04): κ, HSM initial momentum variance factor (m₀ ~ N(0, κM)).
        sampling_eps (`float`, defaults to 1e-3): last forward time before the denoising step.
        time_scale (`float`, defaults to 1000): the UNet receives t · time_scale; in [1e-6, 1e9] (so that
            the float32 model times stay finite and distinguishable).
        sampler (`str`, defaults to `"em"`): `"em"`, `"pf_euler"`, `"pf_heun"` or `"sscs"`.
        striding (`str`, defaults to `"uniform"`): `"uniform"` or `"quadratic"` time grid (used while `time_grid` is
            None; `"quadratic"` is `time_grid="power"` with ρ = 2).
        sscs_score_time (`str`, defaults to `"start"`): SSCS evaluates the score on the half-stepped
            state at the interval `"start"` time (as the official code) or at its `"midpoint"`. Both are
            first order (the score part is an Euler step); with exact scores `"start"` measured slightly
            more accurate at 10-20 NFE.
        project_eps (`bool`, defaults to False): replace the network's ε by the consistent
            ε' = L⁻¹(z - a x̂₀), x̂₀ = aᵀ(z - Lε)/aᵀa (:func:`diffusers_psld.sampling.eps_projection`) before
            every update. The identity for the exact ε and for VP; for a trained PSLD network it removes
            the part of ε that no data point explains, which the probability-flow ODE amplifies (measured on
            the digits study: PF-Heun FID 29 → ~6 at NFE 1000, see the README). Needs Γ > 0 (a CLD network
            does not learn ε_x).
        prediction_type (`str`, defaults to `"epsilon"`): what the network outputs
            (:mod:`diffusers_psld.parameterization`): `"epsilon"` (the paper's ε, k*C channels), `"sample"` (x̂₀,
            C channels) or `"sufficient_epsilon"` (the noise uᵀε of the sufficient statistic of x₀, C channels).
            The C-channel types are consistent by construction; for VP they are diffusers' `"sample"`/`"epsilon"`.
            :meth:`step` converts the output to ε once (every sampler of the package gets it).
        input_preconditioning (`bool`, defaults to False): :meth:`scale_model_input` whitens the state,
            c_in(t) z with c_in(t) = (Σ_t + σ_data² a_t a_tᵀ)^{-1/2} per pixel (training uses the same function).
        sigma_data (`float`, defaults to 0.5): σ_data of ``input_preconditioning``, the per-pixel std of the data, in [1e-6, 1e6]
            (c_in z stays finite in float32; a value outside is a units error).
        time_grid (`str`, *optional*): the time grid of ``set_timesteps(num_inference_steps)``
            (:mod:`~diffusers_psld.schedulers.time_grids`): `"uniform"` (in t), `"power"` (t = t_lo + (t_hi - t_lo) s^ρ,
            s uniform), `"logsnr"` (uniform in log σ_t) or `"edm"` (EDM's ρ-schedule in σ_t). `None` (default) keeps
            the legacy `striding` (and gDDIM's `time_spacing`), which then mean what they always meant.
        rho (`float`, *optional*): ρ of `time_grid="power"` (default 2, in (0, 8]) or `"edm"` (default 7, in (0, 1000]).
        sigma_min (`float`, *optional*), sigma_max (`float`, *optional*): the noise levels σ_t = (aᵀΣ_t⁻¹a)^{-1/2} of
            the last and the first grid time (default: σ(sampling_eps) and σ(1)); each within the recipe's range
            [σ(t_min), σ(1)], t_min = min(1e-5, sampling_eps) (e.g. [8.9e-4, 257.7] for the PSLD preset, [1.0e-3, 152.2]
            for VP).
        final_step (`str`, defaults to `"euler"`): the final call, from the last grid time to t = 0: `"euler"` (the
            sampler's own noiseless first-order step, as the paper's code) or `"tweedie"` (the posterior mean
            E[z₀ | z_t] from this call's x̂₀: x = x̂₀, diffusers' `final_sigmas_type="zero"`;
            :func:`~diffusers_psld.sampling.tweedie_step`). See :mod:`~diffusers_psld.schedulers.schedule_options`.
        custom_timesteps (`List[float]`, *optional*), custom_sigmas (`List[float]`, *optional*): a stored custom
            schedule (descending forward times, or noise levels σ_t with an optional trailing 0), written by
            ``set_timesteps(timesteps=...)`` / ``set_timesteps(sigmas=...)`` so that a saved pipeline samples with it
            again; ``set_timesteps()`` without arguments uses it.

    Schedules and NFE: ``set_timesteps(num_inference_steps=N)`` builds the named grid for exactly N model calls;
    ``set_timesteps(timesteps=[t_0, ..., t_M-1])`` / ``set_timesteps(sigmas=[σ_0, ..., σ_M-1])`` run the steps between
    consecutive listed times and the final call at the last one, N = (M - 1)·``calls_per_step`` + 1 model calls
    (M for single-call samplers, 2M - 1 for PF-Heun); ``len(timesteps)`` is always N (one entry per model call, as
    ``retrieve_timesteps`` of diffusers' pipelines expects). A schedule that starts below t = 1 draws its first state
    from the data-free kernel marginal (:meth:`sample_prior`).

    Swapping samplers: ``compatibles`` lists every scheduler class of this package that accepts this
    configuration (all share the ε-network and the shared arguments), and
    ``Other.from_config(scheduler.config)`` swaps between them. A ``sampler`` the target class cannot run is
    replaced by its default and remembered in the hidden config key ``_sampler_by_class`` (class name →
    sampler), so a round trip restores it: ``PSLDScheduler(sampler="pf_heun")`` → ``SSCSScheduler`` →
    ``PSLDScheduler`` runs ``"pf_heun"`` again. An explicit ``sampler=`` keyword always wins.

    Mid-schedule starts (img2img / SDEdit): after ``set_timesteps(N)``, either ``set_begin_index(k)`` or
    stepping a fresh scheduler with ``timesteps[k]`` (Diffusers' index-by-timestep rule; where two calls
    share a time, the one that starts a step is taken, as Diffusers' Heun takes the second match) starts
    at call k, for every k in [0, N) and every sampler. The state passed to that first call is taken to
    be at forward time ``timesteps[k]`` (e.g. ``add_noise(x0, noise, timesteps[k])``):

    * a call that starts a step runs as in the full loop, except SSCS with ``sscs_score_time="start"``,
      whose state normally lives at the interval midpoint (:meth:`state_time`): its model output was
      evaluated at ``timesteps[k]`` itself, so that one step is the score part there followed by the exact
      linear part over the whole step (A(h)∘S(h) instead of A(h/2)∘S(h)∘A(h/2); noise from ``generator``);
    * a call inside a multi-call step (a PF-Heun corrector, the 2nd/3rd call of a naive splitting step)
      has no earlier stage to complete: it moves the state from ``timesteps[k]`` to the end of that step
      with one Euler step of the same kind (probability-flow Euler for deterministic samplers,
      Euler–Maruyama for stochastic ones) using this call's model output, and the remaining calls of
      that step return the state unchanged (their ε only gives ``pred_original_sample``). A PF-Heun
      corrector evaluates at its step's end time, so there the move is the identity.

    Multistep ``GDDIMMultistepScheduler`` warms up at lower order from the begin index (as DPM-Solver).

    Diffusers' own pipelines: ``DDPMPipeline``/``DDIMPipeline`` and the other generic pipelines assume a
    state of ``unet.config.in_channels`` channels drawn as ``randn * init_noise_sigma`` and pass the raw
    ``timesteps`` to the UNet. ``DDPMPipeline(unet, PSLDScheduler())`` therefore runs but is wrong: it
    draws the momentum from N(0, I) instead of the prior N(0, M) (:meth:`sample_prior`), feeds the UNet
    t ∈ [0, 1] instead of :meth:`model_time` (t · ``time_scale``), and returns the momentum as an extra
    image channel. Drive these schedulers with :class:`~diffusers_psld.PSLDPipeline` (or the
    ``PSLDImg2ImgPipeline``) or the loop in the module docstring; they cannot drive Diffusers' discrete
    ε-schedulers' models either (a different state and noise law).
    """

    #: names resolved in ``diffusers_psld.schedulers`` by :meth:`_get_compatibles` (Diffusers only looks in ``diffusers``)
    _compatibles: List[str] = ["PSLDScheduler", "SSCSScheduler", "ConjugateScheduler", "GDDIMMultistepScheduler",
                               "SplittingScheduler"]
    #: sampler names this class runs; a subclass that adds samplers sets its own tuple and overrides
    #: :meth:`_build_calls` (see ``scheduling_conjugate.py``, ``scheduling_splitting.py``)
    _samplers: Tuple[str, ...] = SAMPLERS
    #: approximate ``set_timesteps`` cost per step (seconds) where it is large enough to warn about (0: cheap)
    _setup_seconds_per_step: float = 0.0
    _SLOW_SETUP_STEPS = 5000

    @register_to_config
    def __init__(
        self,
        diffusion: Literal["psld", "vp"] = "psld",
        gamma: float = 0.01,
        nu: float = 4.01,
        m_inv: Optional[float] = None,
        beta_min: Optional[float] = None,
        beta_max: Optional[float] = None,
        kappa: float = 0.04,
        sampling_eps: float = 1e-3,
        time_scale: float = 1000.0,
        sampler: Literal["em", "pf_euler", "pf_heun", "sscs"] = "em",
        striding: Literal["uniform", "quadratic"] = "uniform",
        sscs_score_time: Literal["midpoint", "start"] = "start",
        project_eps: bool = False,
        prediction_type: Literal["epsilon", "sample", "sufficient_epsilon"] = "epsilon",
        input_preconditioning: bool = False,
        sigma_data: float = 0.5,
        time_grid: Optional[Literal["uniform", "power", "logsnr", "edm"]] = None,
        rho: Optional[float] = None,
        sigma_min: Optional[float] = None,
        sigma_max: Optional[float] = None,
        final_step: Literal["euler", "tweedie"] = "euler",
        custom_timesteps: Optional[List[float]] = None,
        custom_sigmas: Optional[List[float]] = None,
    ):
        self._setup()

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_config(cls, config=None, return_unused_kwargs=False, **kwargs):
        """Diffusers' ``from_config``, so that ``NewScheduler.from_config(pipe.scheduler.config)`` swaps between
        this package's schedulers. The shared settings (diffusion, Γ, ν, β, ε, striding, ...) carry over; the
        ``sampler`` is chosen by ``choose_sampler``: an explicit ``sampler=`` keyword always wins (and is
        validated); otherwise the sampler this class ran when the config last passed through it (hidden key
        ``_sampler_by_class``), else the config's own one if this class runs it, else this class's default."""
        if isinstance(config, dict) and "sampler" not in kwargs:
            config = choose_sampler(cls, config)
        return super().from_config(config, return_unused_kwargs=return_unused_kwargs, **kwargs)

    @classmethod
    def load_config(cls, pretrained_model_name_or_path=None, *args, **kwargs):
        """Diffusers' ``load_config``; a ``sampler`` its class cannot run is refused here, naming the file
        (``check_config_sampler``)."""
        out = super().load_config(pretrained_model_name_or_path, *args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        where = str(pretrained_model_name_or_path)
        if not os.path.isfile(where):  # a directory or a Hub id
            where = os.path.join(where, kwargs.get("subfolder") or "", cls.config_name)
        check_config_sampler(config, source=where, default_class=cls.__name__)
        return out

    @classmethod
    def _get_compatibles(cls):
        """Every scheduler class of this package (Diffusers' version only resolves names in ``diffusers``);
        also used by Diffusers' ``extract_init_dict`` to keep other classes' keys out of the warnings."""
        from . import schedulers_by_name  # late import: the package imports this module

        found = schedulers_by_name()
        return [found[name] for name in dict.fromkeys([cls.__name__] + list(cls._compatibles)) if name in found]

    @property
    def compatibles(self):
        """The scheduler classes of this package that can drive the same model with this configuration
        (the class itself included; e.g. SSCS and the splitting integrators need ``diffusion="psld"``,
        gDDIM needs Γ > 0)."""
        out = []
        for c in self._get_compatibles():
            try:
                c.from_config(self.config)
            except ValueError:
                continue
            out.append(c)
        return out

    def _setup(self):
        plain = plain_config_values(self.config)
        if plain:  # NumPy scalars are valid numbers; keep the config JSON-serialisable
            self.register_to_config(**plain)
        # the class that ran this config, for `choose_sampler` (Diffusers adds it only when saving)
        self.register_to_config(_class_name=type(self).__name__)
        cfg = self.config
        if cfg.diffusion not in DIFFUSIONS:
            raise ValueError(f"`diffusion` must be one of {DIFFUSIONS} (CLD is 'psld' with gamma=0), got {cfg.diffusion!r}")
        if cfg.sampler not in self._samplers:
            raise ValueError(f"`sampler` must be one of {self._samplers} for {type(self).__name__}, got {cfg.sampler!r}")
        if cfg.striding not in STRIDINGS:
            raise ValueError(f"`striding` must be one of {STRIDINGS}, got {cfg.striding!r}")
        if cfg.sscs_score_time not in ("midpoint", "start"):
            raise ValueError(f"`sscs_score_time` must be 'midpoint' or 'start', got {cfg.sscs_score_time!r}")
        if not isinstance(cfg.project_eps, bool):
            raise ValueError(f"`project_eps` must be a bool, got {cfg.project_eps!r}")
        eps = check_real(cfg.sampling_eps, "sampling_eps", 0.0, strict=True)
        if eps >= 1.0:
            raise ValueError(f"`sampling_eps` must be in (0, 1), got {cfg.sampling_eps!r}")
        # t · time_scale and c_in must stay finite and meaningful in float32 (see TIME_SCALE_RANGE, SIGMA_DATA_RANGE)
        check_real(cfg.time_scale, "time_scale", TIME_SCALE_RANGE[0], high=TIME_SCALE_RANGE[1])
        for name in ("gamma", "nu", "kappa", "m_inv", "beta_min", "beta_max"):
            if getattr(cfg, name) is not None:
                check_real(getattr(cfg, name), name)
        bmin, bmax = _PRESET_BETA[cfg.diffusion]
        bmin = bmin if cfg.beta_min is None else cfg.beta_min
        bmax = bmax if cfg.beta_max is None else cfg.beta_max
        if cfg.diffusion == "vp":
            if cfg.sampler == "sscs":
                raise ValueError("`sampler='sscs'` needs an augmented diffusion (diffusion='psld'); VP has no momentum")
            self.sde = RecipeSDE.vp(bmin, bmax)
        else:
            self.sde = RecipeSDE.psld(cfg.gamma, cfg.nu, bmin, bmax, cfg.kappa, cfg.m_inv)
        parameterization.check_prediction_type(cfg.prediction_type)
        if not isinstance(cfg.input_preconditioning, bool):
            raise ValueError(f"`input_preconditioning` must be a bool, got {cfg.input_preconditioning!r}")
        parameterization.input_scaling(torch.ones(1, dtype=torch.float64), torch.ones(1, 1, dtype=torch.float64), cfg.sigma_data)
        check_real(cfg.sigma_data, "sigma_data", SIGMA_DATA_RANGE[0], high=SIGMA_DATA_RANGE[1])
        if cfg.project_eps and cfg.prediction_type == "epsilon":  # the consistent types need no check (identity)
            sampling.check_eps_projection(self.sde)
        self._schedule = schedule_options(cfg, self.sde, *self._legacy_grid())
        self._prior_scale = torch.diag(self.sde.masses.sqrt())  # float64, CPU; cast once per draw
        self._init_scale = None  # the first state's law when the schedule starts below t = 1 (see `sample_prior`)
        self._custom_grid = None  # the grid `_grid` returns while `set_timesteps` builds a custom schedule
        self.init_noise_sigma = 1.0  # not used: the prior is anisotropic, see `sample_prior`
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._tables = None
        self._step_index = None
        self._begin_index = None
        self._run_start = None
        self._heun_cache = None

    @property
    def num_components(self) -> int:
        """The number of components k, 1 for VP and 2 for PSLD/CLD. The state has ``k * C`` channels."""
        return self.sde.k

    @property
    def exact_timesteps(self) -> torch.Tensor:
        """The float64 forward times of the calls (CPU), of which ``timesteps`` is the float32 copy on the device."""
        if self._tables is None:
            raise ValueError("call `set_timesteps(num_inference_steps)` first")
        return torch.tensor(self._tables.eval_times, dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: Optional[int] = None, device: Union[str, torch.device, None] = None,
                      timesteps: Optional[List[float]] = None, sigmas: Optional[List[float]] = None):
        """Build the time grid and the float64 step tables (CPU) for a schedule; diffusers' signature, pass one of
        ``num_inference_steps``, ``timesteps`` or ``sigmas`` (``diffusers`` pipelines' ``retrieve_timesteps`` works).

        Args:
            num_inference_steps (`int`): exactly this many model calls on the configured named grid (``time_grid``,
                ``sigma_min`` / ``sigma_max``); an int (NumPy integers accepted) in [2, ``MAX_INFERENCE_STEPS``] =
                [2, 100000]. Replaces a stored custom schedule (with a warning).
            device: where ``timesteps`` (a float32 tensor) goes; the float64 tables stay on the CPU.
            timesteps (`list`, 1-D array or tensor of floats): a custom grid of forward times t_0 > ... > t_{M-1} in
                [t_min, 1], t_min = min(1e-5, sampling_eps): steps between consecutive times, the final call at
                t_{M-1} (``final_step``). N = (M - 1)·``calls_per_step`` + 1 model calls. Stored in the config
                (``custom_timesteps``).
            sigmas (`list`, 1-D array or tensor of floats): the same grid given by its noise levels σ_t
                (:func:`~diffusers_psld.schedulers.time_grids.noise_level`; VP / EDM / Karras σ), strictly
                decreasing within [σ(t_min), σ(1)], mapped to times in float64. A trailing 0 (diffusers' and
                k-diffusion's "final sigma" marker) is accepted and dropped: every schedule here ends at σ = 0 with its
                final call, which is not listed. Stored in the config (``custom_sigmas``, as given).

        With none of the three, the custom schedule stored in the config is used (``ValueError`` if there is none).
        ``len(self.timesteps)`` is the exact NFE; ``self.sigmas`` (float32, diffusers' convention) holds σ_t of every
        call's time and a trailing 0. Classes whose tables come from quadratures (gDDIM, conjugate,
        splitting) cost about ``_setup_seconds_per_step`` per step to set up: above ``_SLOW_SETUP_STEPS`` steps a
        warning states the expected set-up time.

        Raises:
            ValueError: more than one of the three given, or none without a stored schedule; a bad
                ``num_inference_steps``; a ``timesteps`` / ``sigmas`` list that is too short, not finite, not strictly
                decreasing, out of range or too fine for float32 (the message names the argument, the index and value,
                and the allowed range). ``TypeError``: a list of non-numbers.
        """
        given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                      ("sigmas", sigmas)) if v is not None]
        if len(given) > 1:
            raise ValueError(f"pass exactly one of `num_inference_steps`, `timesteps` or `sigmas`, got "
                             f"{' and '.join(f'`{g}`' for g in given)}")
        opts = self._schedule
        grid, store = None, None  # `store`: the config's new custom-schedule keys, written once the tables are built
        if given and given[0] != "num_inference_steps":
            kind = given[0]
            values = timesteps if kind == "timesteps" else sigmas
            grid, _ = check_custom_grid(values, kind, self.sde, opts.t_min)
            n = self._calls_for_grid(grid, kind)
            stored = values.detach().to("cpu", torch.float64).reshape(-1).tolist() if isinstance(values, torch.Tensor) \
                else [float(v) for v in np.asarray(values, dtype=np.float64).reshape(-1)]
            store = ({key: stored if name == kind else None for name, key in CUSTOM_KEYS.items()},
                     opts.with_custom(grid, kind))
        elif not given:
            if opts.custom is None:
                raise ValueError("`set_timesteps` needs one of `num_inference_steps`, `timesteps` or `sigmas` (the "
                                 "scheduler config stores no custom schedule)")
            grid = opts.custom
            n = self._calls_for_grid(grid, opts.custom_name)
        else:
            n = check_steps(num_inference_steps)
            if opts.custom is not None:
                key = CUSTOM_KEYS[opts.custom_name]
                logger.warning(f"{type(self).__name__}.set_timesteps(num_inference_steps={n}) replaces the custom schedule "
                               f"stored in the config (`{key}`, {self._calls_for_grid(opts.custom, opts.custom_name)} "
                               f"calls) by the named grid; pass `num_inference_steps=None` to sample with the stored one")
                store = ({k: None for k in CUSTOM_KEYS.values()}, opts.with_custom(None, None))
        if self._setup_seconds_per_step and n > self._SLOW_SETUP_STEPS:
            logger.warning(f"{type(self).__name__}.set_timesteps({n}): building the step tables takes about "
                           f"{n * self._setup_seconds_per_step:.0f} s (~{1e3 * self._setup_seconds_per_step:.0g} ms per "
                           f"step, quadrature coefficients); every sampler here has converged by ~1000 steps")
        self._custom_grid = grid
        try:
            runs = self._build_calls(n)
        finally:
            self._custom_grid = None
        self._install_calls(runs, n, device)
        if store is not None:  # only a schedule that was built goes into the config
            self._store_schedule(**store[0])
            self._schedule = store[1]

    def _build_calls(self, n_calls: int) -> list:
        """The step tables for ``n_calls`` model calls, the final call included.

        Returns a list of :class:`_Calls` runs (or ``(kind, t_eval, P, R, S, h[, t_state])`` tuples, one
        call each). Subclasses that add samplers override this.
        """
        builder = {"em": self._build_em, "pf_euler": self._build_pf, "pf_heun": self._build_heun,
                   "sscs": self._build_sscs}[self.config.sampler]
        calls = builder(n_calls - 1)
        t_last = self._grid_end
        P, R = self._final_map(t_last)
        calls.append(_Calls([_AFFINE], [t_last], P[None], R[None], None, [0.0]))
        return calls

    def _install_calls(self, runs, n_calls: int, device=None):
        """Install step tables built by :meth:`_build_calls` and reset the step state."""
        tables = _StepTables(self.sde, _Calls.of(runs))
        tables.add_model_maps(self.config.prediction_type,
                              self.config.sigma_data if self.config.input_preconditioning else None)
        if len(tables.kinds) != n_calls:
            raise RuntimeError(f"{type(self).__name__} built {len(tables.kinds)} calls for num_inference_steps={n_calls}")
        tables.add_entry_steps(entry_maps(self.sde, tables))
        self._init_scale = self._initial_scale(self._grid_start, tables.state_times[0])
        self._tables = tables
        self.num_inference_steps = n_calls
        self.timesteps = torch.tensor(tables.eval_times, dtype=torch.float32, device=device)
        # diffusers' `sigmas`: the noise level σ_t of each call's time, then the 0 the final call ends at (float32)
        sig = noise_level(self.sde, tables.eval_array).tolist() + [0.0]
        self.sigmas = torch.tensor(sig, dtype=torch.float32, device=device)
        self._step_index = None
        self._begin_index = None
        self._heun_cache = None
        self._run_start = None

    def _build_em(self, n):
        return [em_calls(self.sde, self._grid(n))]

    def _build_pf(self, n):
        return [pf_euler_calls(self.sde, self._grid(n))]

    def _build_heun(self, n_evals):
        # n_evals model calls before the final call: pairs of Heun calls, then one Euler step if n_evals is odd (last,
        # so that every `order`-th call starts a step)
        n_heun, n_euler = divmod(n_evals, 2)
        return pf_heun_calls(self.sde, self._grid(n_heun + n_euler), n_euler)

    def _build_sscs(self, n):
        return [sscs_calls(self.sde, self._grid(n), self.config.sscs_score_time)]

    def denoiser_to_model_output(self, denoiser, sample: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        """The model output :meth:`step` expects when the network is a denoiser ``D(y; σ) → x̂₀`` (e.g. a diffusers VP
        network wrapped by :mod:`diffusers_psld.denoisers`): the state's sufficient statistic (y, σ) goes to the
        denoiser and x̂₀ comes back as this scheduler's ``prediction_type`` (exact for the exact denoiser). See
        :func:`diffusers_psld.denoisers.bridge.denoiser_to_model_output`."""
        from ..denoisers.bridge import denoiser_to_model_output  # late: the denoisers package imports the schedulers lazily too

        return denoiser_to_model_output(self, denoiser, sample, timestep, class_labels)

    # ------------------------------------------------------------------ sampling
    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        return_dict: bool = True,
    ) -> Union[PSLDSchedulerOutput, Tuple]:
        """Advance the state by one model evaluation (see the module docstring for the samplers).

        Args:
            model_output (`torch.Tensor` ``[B, k*C, ...]``): the network's ε at ``sample`` (floating point).
            timestep: ``scheduler.timesteps[i]`` (tensor or number); on the first call of a loop it selects the
                start index unless ``set_begin_index`` was called.
            sample (`torch.Tensor` ``[B, k*C, ...]``): the current state (floating point).
            generator: None, a ``torch.Generator`` or a list of B generators (stochastic samplers).

        Raises ``TypeError`` for non-tensor / integer inputs or a bad ``generator``, ``ValueError`` for shapes,
        timesteps off the schedule, and ``FloatingPointError`` when the new state is not finite (naming the call,
        its forward time and whether the model output or the update is to blame).
        """
        i, z, eps, tab, x0, work = self._begin_step(model_output, timestep, sample)
        generator = check_generator(generator, z.shape[0])
        kind = self._tables.kinds[i]
        mode = self._call_mode(i)

        # 3. the update
        if mode == "skip":  # rest of a step whose first part a mid-schedule start already covered
            out = z
        elif mode == "first":  # first call of a mid-schedule start that needs its own map (see `_entry_steps`)
            out = self._affine(tab.part_P[i], tab.part_R[i], tab.part_S[i], self._tables.part_noisy[i], z, eps,
                               generator, work)
        elif kind == _AFFINE:
            out = self._affine(tab.P[i], tab.R[i], tab.S[i], self._tables.noisy[i], z, eps, generator, work)
        elif kind == _HEUN_PRED:  # Euler predictor; remember the state and slope
            slope = blocks.apply(tab.P[i], z) + blocks.apply(tab.R[i], eps)
            self._heun_cache = (z, slope)
            out = z - self._tables.h[i] * slope
        else:  # _HEUN_CORR: trapezoid with the slope at the predicted state
            z0, slope0 = self._heun_cache
            slope = blocks.apply(tab.P[i], z) + blocks.apply(tab.R[i], eps)
            out = z0 - 0.5 * self._tables.h[i] * (slope0 + slope)
            self._heun_cache = None
        return self._end_step(out, x0, sample, return_dict)

    @staticmethod
    def _affine(P, R, S, noisy, z, eps, generator, work):
        """``P z + R ε + S ξ`` (R skipped when None; ξ drawn with ``generator`` when ``noisy``)."""
        out = blocks.apply(P, z)
        if R is not None:
            out = out + blocks.apply(R, eps)
        if noisy:
            noise = randn_tensor(z.shape, generator=generator, device=z.device, dtype=work)
            out = out + blocks.apply(S, noise)
        return out

    def _begin_step(self, model_output, timestep, sample):
        """Shared start of ``step``: checks, the call index, the working dtype (float32, or float64 if the
        sample is), the cast tables and x̂₀ = aᵀ(z - L ε)/aᵀa from this call's ε (exact when ε is); with
        ``project_eps`` the returned ε is the consistent one (same x̂₀)."""
        if self._tables is None:
            raise ValueError("call `set_timesteps(num_inference_steps)` before `step`")
        check_float_tensor(model_output, "model_output")
        check_float_tensor(sample, "sample")
        if self._step_index is None:  # first call of a loop: `set_begin_index`, else look the timestep up
            self._step_index = self._begin_index if self._begin_index is not None else self.index_for_timestep(timestep)
            self._run_start = self._step_index
            self._on_first_step()
        i = self._step_index
        if i >= self.num_inference_steps:
            raise ValueError(f"all {self.num_inference_steps} steps are done; call `set_timesteps` again")
        self._check_step_inputs(model_output, timestep, sample, i)
        self._inputs = (model_output, sample)  # for the diagnosis of a non-finite result
        work = torch.float64 if sample.dtype == torch.float64 else torch.float32
        z = sample.to(work)
        tab = self._tables.on(sample.device, work)
        eps = tab.out_maps[i].to_eps(model_output.to(work), z)  # prediction_type -> ε (identity for "epsilon")
        x0 = self._tables.project_x0(tab, i, z, eps)
        if self.config.project_eps:
            eps = blocks.apply(tab.proj_z[i], z) + blocks.apply(tab.proj_e[i], eps)
        return i, z, eps, tab, x0, work

    def _on_first_step(self):
        """Hook: reset per-run state (multistep history) when a sampling loop starts (at ``self._step_index``)."""
        self._heun_cache = None

    def _end_step(self, out, x0, sample, return_dict):
        out, x0 = out.to(sample.dtype), x0.to(sample.dtype)
        if not _all_finite(out):  # after the cast: float16 overflows at 65504
            self._raise_non_finite(self._step_index)
        self._step_index += 1
        if not return_dict:
            return (out, x0)
        return PSLDSchedulerOutput(prev_sample=out, pred_original_sample=x0)

    def _raise_non_finite(self, i: int):
        """``FloatingPointError`` for a non-finite new state at call ``i``, naming the likely cause."""
        model_output, sample = self._inputs
        t = self._tables.eval_times[i]
        where = f"{type(self).__name__}.step: the new state is not finite at call {i} of {self.num_inference_steps} " \
                f"(forward time t = {t:.6g}, sampler {self.config.sampler!r})"
        if not bool(torch.isfinite(model_output).all()):
            cause = "the `model_output` passed to this call is already non-finite (check the network, its dtype, and the guidance scale)"
        elif not bool(torch.isfinite(sample).all()):
            cause = "the `sample` passed to this call is already non-finite"
        else:
            cause = (f"the update of a finite sample and model output overflowed {sample.dtype} (max |sample| = "
                     f"{sample.abs().max().item():.3g}, max |model_output| = {model_output.abs().max().item():.3g}); the "
                     "scheduler configuration amplifies the state (an unstable step size or parameter) or the inputs are huge")
        raise FloatingPointError(f"{where}: {cause}")

    def _check_step_inputs(self, model_output, timestep, sample, i):
        check_batch(sample, "sample")
        self._check_output_shape(model_output, sample)
        t = timestep_value(timestep)
        expected = self._tables.eval_times[i]
        if abs(t - expected) > 1e-6 * max(1.0, expected):
            raise ValueError(
                f"`timestep` {t:.6g} does not match call {i} of this schedule (expected {expected:.6g}); "
                "pass the entries of `scheduler.timesteps` in order"
            )
