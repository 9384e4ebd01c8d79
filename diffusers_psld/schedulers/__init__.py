from .scheduling_psld import PSLDScheduler, PSLDSchedulerOutput
from .scheduling_sscs import SSCSScheduler

__all__ = ["PSLDScheduler", "PSLDSchedulerOutput", "SSCSScheduler"]
