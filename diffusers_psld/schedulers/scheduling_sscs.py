r"""``SSCSScheduler``: the modified SSCS sampler of the PSLD paper (Eq. 12) behind the Diffusers API.

Each reverse step of size h is ``A(h/2) ∘ S(h) ∘ A(h/2)``: the linear part ``A`` (the recipe SDE with
``Q → -Q``) solved exactly (mean and Cholesky-factored noise), the score part ``S`` by one Euler step
with one model evaluation. How it fits the Diffusers contract:

* the trailing half-step of step i and the leading half-step of step i + 1 are merged into one exact
  transition (composition of exact Gaussian transitions), drawn inside :meth:`PSLDScheduler.step`, which has the
  user's ``generator``; ``prev_sample`` is therefore the half-stepped state that the next model call
  needs, and ``timesteps[i]`` is the time at which that call evaluates the score;
* the leading half-step of the first step is exact without simulation: the linear part keeps the
  prior N(0, A⁻¹) invariant, so :meth:`sample_prior` already has the law of the half-stepped state.

Hence the standard loop (``scale_model_input`` → UNet → ``step``) yields exactly the SSCS sampler in
law; the tests compare its moments with an unmerged reference implementation. NFE accounting and the
final denoising step are those of :class:`PSLDScheduler`, whose code this class shares (it only fixes
``sampler="sscs"``; all shared defaults are identical, so ``from_config`` between the two is safe).
"""
from __future__ import annotations

from typing import List, Literal, Optional

from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin  # noqa: F401  (name needed by diffusers' loader)

from .scheduling_psld import PSLDScheduler

__all__ = ["SSCSScheduler"]


class SSCSScheduler(PSLDScheduler):
    r"""Modified SSCS sampler (PSLD paper Eq. 12). Arguments as :class:`PSLDScheduler`; `sampler` must be `"sscs"`."""

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
        sampler: Literal["sscs"] = "sscs",
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
        if sampler != "sscs":
            raise ValueError(f"SSCSScheduler only runs `sampler='sscs'`, got {sampler!r}; use PSLDScheduler for {sampler!r}")
        self._setup()

    _samplers = ("sscs",)
