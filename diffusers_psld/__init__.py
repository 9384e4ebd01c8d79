"""diffusers-psld: Phase Space Langevin Diffusion (PSLD), CLD and VP-SDE for HuggingFace Diffusers.

Public API::

    from diffusers_psld import RecipeSDE, PSLDScheduler, SSCSScheduler, PSLDPipeline, PSLDImg2ImgPipeline
    from diffusers_psld import build_unet, hsm_loss, TimeDependentClassifier

Every module whose classes can appear in a saved ``model_index.json`` is imported here, so that
``PSLDPipeline.from_pretrained`` finds them in ``sys.modules`` (diffusers does not import them itself).
Those module paths are frozen: ``diffusers_psld.schedulers.scheduling_psld``,
``diffusers_psld.schedulers.scheduling_sscs``, ``…scheduling_conjugate``, ``…scheduling_splitting``,
``diffusers_psld.models.classifier``, ``diffusers_psld.denoisers.{vp,edm,recipe,vp_model}``,
``diffusers_psld.pipelines.pipeline_psld`` (imported by the ``pipeline_psld.py`` file in saved pipelines).
"""
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers' loader looks these names up here)

from . import denoisers  # noqa: F401  (saved pipelines name ``diffusers_psld.denoisers.*`` modules)
from .denoisers import (ContinuousVPDenoiser, Denoiser, DiscreteVPDenoiser, EDMDenoiser, RecipeDenoiser,
                        VPEpsilonModel)
from .losses import hsm_loss
from .models import TimeDependentClassifier
from .pipelines import NonFiniteError, PSLDImg2ImgPipeline, PSLDPipeline, PSLDPipelineOutput
from .ode import ODESampleOutput, probability_flow_sample
from .schedulers import ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, PSLDSchedulerOutput, SplittingScheduler, SSCSScheduler
from .sde import HSMKernel, RecipeSDE

__version__ = "0.1.0"


def __getattr__(name):  # build_unet is imported on first use: see diffusers_psld.models (runpy warning)
    if name == "build_unet":
        from .models.unet_presets import build_unet

        return build_unet
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "RecipeSDE",
    "HSMKernel",
    "PSLDScheduler",
    "PSLDSchedulerOutput",
    "SSCSScheduler",
    "ConjugateScheduler",
    "GDDIMMultistepScheduler",
    "SplittingScheduler",
    "probability_flow_sample",
    "ODESampleOutput",
    "PSLDPipeline",
    "PSLDPipelineOutput",
    "PSLDImg2ImgPipeline",
    "NonFiniteError",
    "Denoiser",
    "DiscreteVPDenoiser",
    "ContinuousVPDenoiser",
    "EDMDenoiser",
    "RecipeDenoiser",
    "VPEpsilonModel",
    "TimeDependentClassifier",
    "build_unet",
    "hsm_loss",
    "__version__",
]
