r"""Denoisers ``D(y; σ) → x̂₀``: any diffusion network behind one contract, and the exact bridge to the recipe samplers.

* :class:`Denoiser` — the base class (a diffusers ``ModelMixin``; ``forward(sample, sigma, class_labels=None)``).
* :class:`DiscreteVPDenoiser` — a network of a diffusers DDPM-family schedule (ε / v / x̂₀ prediction).
* :class:`ContinuousVPDenoiser` — a network of the continuous VP-SDE (linear β).
* :class:`EDMDenoiser` — a σ-conditioned network (EDM's preconditioning, or Euler's continuous timesteps).
* :class:`RecipeDenoiser` — a network of this package (PSLD / CLD / VP, every ``prediction_type``).
* :class:`VPEpsilonModel` — any denoiser as a diffusers VP ε-model (``PSLDPipeline.to_vp``).
* :func:`denoiser_for_scheduler` — the wrapper for a network and the diffusers scheduler it was trained with.
* :mod:`.bridge` — :func:`sufficient_statistic`, :func:`denoised_to_eps`, :func:`denoiser_to_model_output`: the
  reduction of a recipe state to ``(y, σ)`` and the lift of x̂₀ back to the scheduler's model output.

The module paths of the classes are recorded in saved pipelines (``model_index.json``); keep them stable.
"""
from .base import Denoiser, check_sigma
from .bridge import denoised_to_eps, denoiser_to_model_output, sufficient_statistic
from .edm import EDMDenoiser
from .factory import denoiser_for_scheduler
from .recipe import RecipeDenoiser
from .vp import ContinuousVPDenoiser, DiscreteVPDenoiser
from .vp_model import VPEpsilonModel, default_vp_config

#: the denoiser classes by name (what a saved :class:`VPEpsilonModel` can rebuild)
DENOISER_CLASSES = {cls.__name__: cls for cls in (DiscreteVPDenoiser, ContinuousVPDenoiser, EDMDenoiser, RecipeDenoiser)}

__all__ = ["Denoiser", "DiscreteVPDenoiser", "ContinuousVPDenoiser", "EDMDenoiser", "RecipeDenoiser", "VPEpsilonModel",
           "DENOISER_CLASSES", "check_sigma", "default_vp_config", "denoiser_for_scheduler", "sufficient_statistic",
           "denoised_to_eps", "denoiser_to_model_output"]
