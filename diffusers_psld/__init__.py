"""diffusers-psld: Phase Space Langevin Diffusion (PSLD), CLD and VP-SDE for HuggingFace Diffusers.

Public API::

    from diffusers_psld import RecipeSDE, PSLDScheduler, SSCSScheduler
"""
from diffusers import ModelMixin, SchedulerMixin  # noqa: F401  (diffusers' loader looks these names up here)

from .sde import HSMKernel, RecipeSDE
from .schedulers import PSLDScheduler, PSLDSchedulerOutput, SSCSScheduler

__version__ = "0.1.0"

__all__ = ["RecipeSDE", "HSMKernel", "PSLDScheduler", "PSLDSchedulerOutput", "SSCSScheduler", "__version__"]
