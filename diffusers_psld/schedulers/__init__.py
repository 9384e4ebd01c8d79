from .scheduling_conjugate import ConjugateScheduler
from .scheduling_gddim import GDDIMMultistepScheduler
from .scheduling_psld import PSLDScheduler, PSLDSchedulerOutput
from .scheduling_splitting import SPLITTING_SAMPLERS, SplittingScheduler
from .scheduling_sscs import SSCSScheduler

__all__ = ["PSLDScheduler", "PSLDSchedulerOutput", "SSCSScheduler", "ConjugateScheduler", "GDDIMMultistepScheduler",
           "SplittingScheduler", "SPLITTING_SAMPLERS", "schedulers_by_name"]


def schedulers_by_name() -> dict:
    """Every scheduler class of this package by class name (the ones ``compatibles`` can list)."""
    return {c.__name__: c for c in (PSLDScheduler, SSCSScheduler, ConjugateScheduler, GDDIMMultistepScheduler,
                                    SplittingScheduler)}
