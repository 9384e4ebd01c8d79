r"""``PSLDScheduler``: reverse-time samplers of the complete recipe behind the Diffusers scheduler API.

State layout: ``sample = [x ; m]`` stacked on the channel axis (``k*C`` channels, k = 2 for PSLD and
CLD, k = 1 for VP); the model predicts ε for all ``k*C`` channels. With Γ = 0 (CLD) the ε_x half
cannot influence the reverse dynamics (``D L⁻ᵀ`` has a zero column), so it is ignored here and
excluded from the loss (:func:`diffusers_psld.losses.hsm_loss`): one shape contract for every preset.

Time: ``timesteps`` are continuous forward times t in [sampling_eps, 1] (float, descending); the UNet
receives :meth:`PSLDScheduler.model_time` ``(t) = t * time_scale`` as a float tensor (a raw t in
[0, 1] barely moves UNet2DModel's sinusoidal embedding, and a Python float would be cast to int).
Training uses the same function.

``num_inference_steps`` is the exact number of model evaluations: N - 1 reverse steps on
[sampling_eps, 1] (for Heun, pairs of evaluations) and one final noiseless denoising step from
``sampling_eps`` to 0 (the mean of an Euler(-Maruyama) step, as in the paper's code).

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
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Literal, Optional, Tuple, Union

import math

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .. import parameterization, sampling
from ..sde import RecipeSDE, blocks, kernels
from ..sde.recipe import HSMKernel
from .validation import (SIGMA_DATA_RANGE, TIME_SCALE_RANGE, check_batch, check_finite, check_float_tensor,
                         check_generator, check_real, check_steps, plain_config_values, timestep_value)

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = ["PSLDScheduler", "PSLDSchedulerOutput", "SAMPLERS", "STRIDINGS"]

SAMPLERS = ("em", "pf_euler", "pf_heun", "sscs")
STRIDINGS = ("uniform", "quadratic")
DIFFUSIONS = ("psld", "vp")
_PRESET_BETA = {"psld": (8.0, 8.0), "vp": (0.1, 20.0)}

# kinds of model-evaluation calls in a step table
_AFFINE, _HEUN_PRED, _HEUN_CORR = 0, 1, 2


@dataclass
class PSLDSchedulerOutput(BaseOutput):
    """Output of :meth:`PSLDScheduler.step`.

    Args:
        prev_sample (`torch.Tensor` of shape `[B, k*C, ...]`): the state at the next timestep.
        pred_original_sample (`torch.Tensor` of shape `[B, C, ...]`): x̂₀ estimated from this step's ε.
    """

    prev_sample: torch.Tensor
    pred_original_sample: Optional[torch.Tensor] = None


def time_grid(n: int, eps: float, striding: str) -> torch.Tensor:
    """``n + 1`` descending float64 forward times from 1 to ``eps`` (uniform or quadratic)."""
    frac = (n - torch.arange(n + 1, dtype=torch.float64)) / n  # 1 → 0
    if striding == "uniform":
        grid = eps + (1.0 - eps) * frac
    elif striding == "quadratic":
        grid = eps + (1.0 - eps) * frac ** 2
    else:
        raise ValueError(f"`striding` must be one of {STRIDINGS}, got {striding!r}")
    grid[0], grid[-1] = 1.0, eps  # exact end points
    return grid


SAMPLER_MEMORY_KEY = "_sampler_by_class"


def choose_sampler(cls, config) -> dict:
    """The config ``cls.from_config`` should use (a copy) so that swapping classes never loses a sampler.

    Records the sampler the config's own class (``_class_name``) runs in the hidden key ``_sampler_by_class``
    (Diffusers keeps unknown ``_`` keys through ``from_config`` and ``save_pretrained``), then picks for ``cls``:
    the sampler remembered for ``cls`` if it runs it, else the config's sampler if ``cls`` runs it (an implicit
    default stays a default: Diffusers' ``_use_default_values`` rule), else ``cls``'s default (key dropped).
    """
    config = dict(config)
    src = config.get("_class_name", cls.__name__)
    memory = dict(config.get(SAMPLER_MEMORY_KEY) or {})
    if isinstance(src, str) and src != cls.__name__ and "sampler" in config:  # crossing classes: remember
        memory[src] = config["sampler"]
    remembered = memory.get(cls.__name__)
    defaults = list(config.get("_use_default_values", []))
    if src != cls.__name__ and remembered in cls._samplers:
        config["sampler"] = remembered
        if "sampler" in defaults:
            config["_use_default_values"] = [k for k in defaults if k != "sampler"]
    elif config.get("sampler", cls._samplers[0]) not in cls._samplers:
        logger.info(f"{cls.__name__}.from_config: sampler {config['sampler']!r} -> this class's default")
        config.pop("sampler")
    if memory:
        config[SAMPLER_MEMORY_KEY] = memory
    return config


class PSLDScheduler(SchedulerMixin, ConfigMixin):
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
        striding (`str`, defaults to `"uniform"`): `"uniform"` or `"quadratic"` time grid.
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
    order = 1
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
        self._prior_scale = torch.diag(self.sde.masses.sqrt())  # float64, CPU; cast once per draw
        self.init_noise_sigma = 1.0  # not used: the prior is anisotropic, see `sample_prior`
        self.num_inference_steps = None
        self.timesteps = None
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
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    @property
    def exact_timesteps(self) -> torch.Tensor:
        """The float64 forward times of the calls (CPU), of which ``timesteps`` is the float32 copy on the device."""
        if self._tables is None:
            raise ValueError("call `set_timesteps(num_inference_steps)` first")
        return torch.tensor(self._tables.eval_times, dtype=torch.float64)

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

    # ------------------------------------------------------------------ time
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

    def set_timesteps(self, num_inference_steps: int, device: Union[str, torch.device, None] = None):
        """Build the time grid and the float64 step tables (CPU) for exactly ``num_inference_steps`` model calls.

        ``num_inference_steps``: an int (NumPy integers accepted) in [2, ``MAX_INFERENCE_STEPS``] = [2, 100000].
        ``timesteps`` becomes a float32 tensor on ``device`` (see the module docstring). Classes whose tables come
        from quadratures (gDDIM, conjugate, splitting) cost about ``_setup_seconds_per_step`` per step to set up: above
        ``_SLOW_SETUP_STEPS`` steps a warning states the expected set-up time."""
        n = check_steps(num_inference_steps)
        if self._setup_seconds_per_step and n > self._SLOW_SETUP_STEPS:
            logger.warning(f"{type(self).__name__}.set_timesteps({n}): building the step tables takes about "
                           f"{n * self._setup_seconds_per_step:.0f} s (~{1e3 * self._setup_seconds_per_step:.0g} ms per "
                           f"step, quadrature coefficients); every sampler here has converged by ~1000 steps")
        self._install_calls(self._build_calls(n), n, device)

    def _build_calls(self, n_calls: int) -> list:
        """The step tables for ``n_calls`` model calls, the final denoising call included.

        Returns a list of :class:`_Calls` runs (or ``(kind, t_eval, P, R, S, h[, t_state])`` tuples, one
        call each). Subclasses that add samplers override this.
        """
        eps, sde = self.config.sampling_eps, self.sde
        builder = {"em": self._build_em, "pf_euler": self._build_pf, "pf_heun": self._build_heun,
                   "sscs": self._build_sscs}[self.config.sampler]
        calls = builder(n_calls - 1)
        # final noiseless denoising step from eps to 0 (EM mean, or PF Euler for the ODE samplers)
        if self.config.sampler in ("em", "sscs"):
            P, R, _ = sampling.em_step(sde, eps, 0.0, noise=False)
        else:
            P, R, _ = sampling.pf_euler_step(sde, eps, 0.0)
        calls.append(_Calls([_AFFINE], [eps], P[None], R[None], None, [0.0]))
        return calls

    def _install_calls(self, runs, n_calls: int, device=None):
        """Install step tables built by :meth:`_build_calls` and reset the step state."""
        runs = [r if isinstance(r, _Calls) else _Calls.single(*r) for r in runs]  # tuples: see _Calls.single
        tables = _StepTables(self.sde, _Calls.cat(runs))
        tables.add_model_maps(self.config.prediction_type,
                              self.config.sigma_data if self.config.input_preconditioning else None)
        if len(tables.kinds) != n_calls:
            raise RuntimeError(f"{type(self).__name__} built {len(tables.kinds)} calls for num_inference_steps={n_calls}")
        tables.add_entry_steps(self._entry_steps(tables))
        self._tables = tables
        self.num_inference_steps = n_calls
        self.timesteps = torch.tensor(tables.eval_times, dtype=torch.float32, device=device)
        self._step_index = None
        self._begin_index = None
        self._heun_cache = None
        self._run_start = None

    def _entry_steps(self, tables: "_StepTables"):
        """Float64 replacement maps ``(P, R, S)`` ``[n, k, k]`` and their noise flags for the first call i > 0 of a
        loop that begins with a state at forward time ``eval_times[i]`` (see the class docstring):

        * a call inside a multi-call step: one Euler step to the step's end (probability-flow Euler, or
          Euler–Maruyama for noisy calls) — the identity for a PF-Heun corrector, which evaluates at that end;
        * an SSCS call whose state lives at the interval midpoint (``sscs_score_time="start"``): the model output
          was evaluated at the state at ``eval_times[i]`` itself, so the step is the score part S(h) there followed
          by the exact linear part A from ``eval_times[i]`` to the next call's state time (Lie order A(h)∘S(h)
          for this one step instead of A(h/2)∘S(h)∘A(h/2): both first order, as the score part is);
        * any other call: the call's own map (unused).
        """
        n, sde = len(tables.kinds), self.sde
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

    def _grid(self, n: int) -> torch.Tensor:
        return time_grid(n, self.config.sampling_eps, self.config.striding)

    def _build_em(self, n):
        ts = self._grid(n)
        P, R, S = sampling.em_step(self.sde, ts[:-1], ts[1:])
        return [_Calls([_AFFINE] * n, ts[:-1].tolist(), P, R, S, [0.0] * n)]

    def _build_pf(self, n):
        ts = self._grid(n)
        P, R, _ = sampling.pf_euler_step(self.sde, ts[:-1], ts[1:])
        return [_Calls([_AFFINE] * n, ts[:-1].tolist(), P, R, None, [0.0] * n)]

    def _build_heun(self, n_evals):
        # n_evals model calls before the denoising step: pairs of Heun calls, one Euler call first if odd
        n_heun, n_euler = divmod(n_evals, 2)
        ts = self._grid(n_heun + n_euler)
        calls = []
        if n_euler:
            P, R, _ = sampling.pf_euler_step(self.sde, ts[:1], ts[1:2])
            calls.append(_Calls([_AFFINE], ts[:1].tolist(), P, R, None, [0.0]))
        t, tn = ts[n_euler:-1], ts[n_euler + 1:]
        if n_heun:
            Pa, Ra = sampling.pf_drift(self.sde, t)
            Pb, Rb = sampling.pf_drift(self.sde, tn)
            h = (t - tn).tolist()
            # interleave predictor (slope at t) and corrector (slope at t_next) calls
            P = torch.stack([Pa, Pb], 1).reshape(-1, self.sde.k, self.sde.k)
            R = torch.stack([Ra, Rb], 1).reshape(-1, self.sde.k, self.sde.k)
            times = torch.stack([t, tn], 1).reshape(-1).tolist()
            calls.append(_Calls([_HEUN_PRED, _HEUN_CORR] * n_heun, times, P, R, None, [x for x in h for _ in (0, 1)],
                                starts=[True, False] * n_heun))
        return calls

    def _build_sscs(self, n):
        ts = self._grid(n)
        hs = ts[:-1] - ts[1:]
        mids = ts[:-1] - 0.5 * hs
        t_eval = mids if self.config.sscs_score_time == "midpoint" else ts[:-1]
        Ps, Rs = sampling.sscs_score_step(self.sde, hs, t_eval)
        # trailing half-step of step i merged with the leading half-step of step i + 1 (exact), so the
        # state handed to call i lives at mids[i]; the last call ends at ts[-1] = sampling_eps
        t_to = torch.cat([mids[1:], ts[-1:]])
        phi, L = sampling.sscs_linear(self.sde, mids, t_to)
        return [_Calls([_AFFINE] * n, t_eval.tolist(), phi @ Ps, phi @ Rs, L, [0.0] * n, mids.tolist())]

    # ------------------------------------------------------------------ forward process
    def sample_prior(self, shape, generator=None, device=None, dtype=torch.float32) -> torch.Tensor:
        """Draw from the prior N(0, diag(masses)) per component (x ~ N(0, I), m ~ N(0, M I)).

        ``shape`` is ``[B, k*C, ...]``; ``generator`` is None, a ``torch.Generator`` or a list of B of them
        (``TypeError`` otherwise). With the SSCS sampler this is also exact for the state the first step
        expects (the SSCS linear part keeps the prior invariant, so its leading half-step needs no simulation).
        """
        shape = tuple(shape)
        blocks._check(torch.empty(shape[:2] + (0,)), self.num_components, "shape")
        generator = check_generator(generator, shape[0])
        noise = randn_tensor(shape, generator=generator, device=torch.device(device) if device else None, dtype=dtype)
        return blocks.apply(self._prior_scale, noise)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """z_t = a(t) x₀ + L_t ε from the HSM kernel p(z_t | x₀) (paper Eq. 10), for training and mid-schedule starts.

        Args:
            original_samples: data x₀ ``[B, C, ...]`` (floating-point tensor).
            noise: ε ``[B, k*C, ...]`` (floating-point tensor).
            timesteps: forward times in [0, 1]: a number, or a tensor of 1 or B entries (one entry is broadcast).

        Returns ``[B, k*C, ...]`` in ``noise``'s dtype, computed in float32 (float64 if an input is float64) on
        ``noise``'s device; the kernel is computed in float64 on the CPU and only cast copies reach the device.
        Raises ``TypeError`` for non-tensors or integer/bool tensors, ``ValueError`` for shapes or times.
        """
        check_float_tensor(original_samples, "original_samples")
        check_float_tensor(noise, "noise")
        check_batch(original_samples, "original_samples")
        check_finite(original_samples, "original_samples")
        check_finite(noise, "noise")
        k = self.num_components
        if noise.ndim < 2 or noise.shape[0] != original_samples.shape[0] or noise.shape[1] != k * original_samples.shape[1] \
                or noise.shape[2:] != original_samples.shape[2:]:
            raise ValueError(
                f"`noise` must have shape [B, {k}*C, ...] for `original_samples` of shape [B, C, ...]: got "
                f"noise {tuple(noise.shape)} and original_samples {tuple(original_samples.shape)}"
            )
        t = self._check_times(timesteps, original_samples.shape[0])
        kern = self.sde.hsm_kernel(t)
        work = torch.float64 if torch.float64 in (noise.dtype, original_samples.dtype) else torch.float32
        z = blocks.apply(kern.chol.to(device=noise.device, dtype=work), noise.to(work))
        x0 = original_samples.to(device=noise.device, dtype=work).reshape(noise.shape[0], 1, -1)
        z = z + (kern.mean_coef.to(device=noise.device, dtype=work)[:, :, None] * x0).reshape(noise.shape)
        return z.to(noise.dtype)

    @staticmethod
    def _check_times(timesteps, batch: int) -> torch.Tensor:
        """Forward times as a float64 CPU tensor ``[batch]`` (a single time is broadcast)."""
        if isinstance(timesteps, torch.Tensor):
            if timesteps.dtype == torch.bool or timesteps.is_complex():
                raise TypeError(f"`timesteps` must hold real forward times, got a {timesteps.dtype} tensor")
            t = timesteps.detach().to("cpu").to(torch.float64)
        else:
            if isinstance(timesteps, str) or timesteps is None:
                raise TypeError(f"`timesteps` must be forward times in [0, 1] (a number or a tensor), got {timesteps!r}")
            try:
                t = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
            except (TypeError, ValueError) as err:
                raise TypeError(f"`timesteps` must be forward times in [0, 1] (a number or a tensor), got {timesteps!r}") from err
        if t.numel() == 1:
            t = t.reshape(()).expand(batch)
        if t.shape != (batch,):
            raise ValueError(f"`timesteps` must be a scalar or have shape [{batch}] (or one entry), got {tuple(t.shape)}")
        if not torch.all(torch.isfinite(t)) or torch.any(t < 0) or torch.any(t > 1):
            raise ValueError(f"`timesteps` must be forward times in [0, 1], got range "
                             f"[{t.min().item():.4g}, {t.max().item():.4g}]")
        return t

    def hsm_kernel_at(self, t: float) -> HSMKernel:
        """The float64 HSM kernel (``mean_coef``, ``cov``, ``chol``) at forward time ``t``: taken from the
        step tables when ``t`` is the current call's time (the per-step case of guidance and inpainting),
        computed otherwise."""
        i = self._call_index_for(t)
        if i is not None:  # the call's own time: the exact float64 table entry
            k = self._tables.kernel
            return HSMKernel(k.mean_coef[i], k.cov[i], k.chol[i])
        return self.sde.hsm_kernel(float(t))

    def _call_index_for(self, t) -> Optional[int]:
        """The index of the current (or, before the loop, the first) call when ``t`` is its time, else None.

        ``t`` (a number or one-element tensor) matches within a relative 2e-6, so the float32 entries of
        ``timesteps`` find their exact float64 table entry: per-step helpers (kernels, network-boundary maps)
        should look their tables up through this, not by exact equality."""
        tab = self._tables
        if tab is None:
            return None
        i = self._step_index if self._step_index is not None else (self._begin_index or 0)
        if isinstance(t, torch.Tensor):
            if t.numel() != 1:
                return None
            t = t.reshape(())
        if i < len(tab.eval_times) and abs(tab.eval_times[i] - float(t)) <= 2e-6 * tab.eval_times[i]:
            return i
        return None

    def _chol(self, t: float) -> torch.Tensor:
        return self.hsm_kernel_at(t).chol

    def eps_to_score(self, eps: torch.Tensor, t: float) -> torch.Tensor:
        """score = -L_t^{-T} ε (HSM kernel factor at forward time ``t``)."""
        return blocks.apply(-kernels.lower_inverse_transpose(self._chol(t)), eps)

    def consistent_eps(self, sample: torch.Tensor, eps: torch.Tensor, t: float) -> torch.Tensor:
        """The ``project_eps`` map at forward time ``t``: ε' = L⁻¹(z - a x̂₀), x̂₀ = aᵀ(z - Lε)/aᵀa, in
        ``eps``'s dtype (see :func:`diffusers_psld.sampling.eps_projection`). Applied regardless of the
        config flag; for score functions outside :meth:`step` (likelihood)."""
        kern = self.hsm_kernel_at(t)
        Mz, Me = sampling.eps_projection(kern.mean_coef, kern.chol)
        return blocks.apply(Mz, sample.to(eps.dtype)) + blocks.apply(Me, eps)

    def score_to_eps_shift(self, grad: torch.Tensor, t: float) -> torch.Tensor:
        """``Lᵀ g``: adding ``g`` to the score equals subtracting ``Lᵀ g`` from ε (used for guidance)."""
        return blocks.apply(self._chol(t).transpose(-1, -2), grad)

    # ------------------------------------------------------------------ network boundary
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

    def denoiser_to_model_output(self, denoiser, sample: torch.Tensor, timestep, class_labels=None) -> torch.Tensor:
        """The model output :meth:`step` expects when the network is a denoiser ``D(y; σ) → x̂₀`` (e.g. a diffusers VP
        network wrapped by :mod:`diffusers_psld.denoisers`): the state's sufficient statistic (y, σ) goes to the
        denoiser and x̂₀ comes back as this scheduler's ``prediction_type`` (exact for the exact denoiser). See
        :func:`diffusers_psld.denoisers.bridge.denoiser_to_model_output`."""
        from ..denoisers.bridge import denoiser_to_model_output  # late: the denoisers package imports the schedulers lazily too

        return denoiser_to_model_output(self, denoiser, sample, timestep, class_labels)

    # ------------------------------------------------------------------ sampling
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

    def _call_mode(self, i: int) -> str:
        """How call ``i`` runs: ``"normal"``; ``"first"`` (first call of a mid-schedule start inside a multi-call
        step, or at an SSCS step whose state time differs from ``timesteps[i]``: the maps of :meth:`_entry_steps`);
        ``"skip"`` (the later calls of a step that such a first call completed). See the class docstring."""
        start, tab = self._run_start, self._tables
        if not start:  # None or 0: a loop from the first call
            return "normal"
        if i == start:
            return "first" if not tab.starts[i] or tab.state_times[i] != tab.eval_times[i] else "normal"
        if not tab.starts[start] and not any(tab.starts[start + 1: i + 1]):
            return "skip"
        return "normal"

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


def _all_finite(x: torch.Tensor) -> bool:
    """Whether every entry is finite: one sum (NaN/inf propagate; ~10x cheaper than ``isfinite(x).all()``), and the
    exact check only when the sum is not finite (it can overflow on huge finite entries)."""
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    return bool(torch.isfinite(torch.sum(x, dtype=acc))) or bool(torch.isfinite(x).all())


class _Calls:
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
        out = _Calls([], [], torch.cat([r.P for r in runs]), torch.cat([r.R for r in runs]), None, [])
        out.S = torch.cat([r.S for r in runs])
        for name in ("kinds", "eval_times", "h", "noisy", "state_times", "starts"):
            setattr(out, name, [x for r in runs for x in getattr(r, name)])
        return out


class _StepTables:
    """Per-call float64 coefficient tables, with cached copies per (device, dtype)."""

    def __init__(self, sde: RecipeSDE, calls: _Calls):
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
        """Install the mid-schedule first-call maps of :meth:`PSLDScheduler._entry_steps`."""
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
            self._cache[key] = _Cast(self, device, dtype)
        return self._cache[key]

    def project_x0(self, tab, i, z, eps):
        v = z - blocks.apply(tab.x0_L[i], eps)
        k = tab.x0_w.shape[-1]
        comps = v.reshape(v.shape[0], k, -1)
        x0 = torch.einsum("j,bjn->bn", tab.x0_w[i], comps)
        return x0.reshape(v.shape[0], v.shape[1] // k, *v.shape[2:])


class _Cast:
    def __init__(self, tables: _StepTables, device, dtype):
        for name in ("P", "R", "S", "x0_w", "x0_L", "proj_z", "proj_e", "part_P", "part_R", "part_S"):
            setattr(self, name, getattr(tables, name).to(device=device, dtype=dtype))
        self.out_maps = tables.out_maps.to(device, dtype)
        self.c_in = None if tables.c_in is None else tables.c_in.to(device=device, dtype=dtype)
