"""Models of diffusers-psld: UNet presets (:mod:`.unet_presets`) and the time-dependent classifier."""
from .unet_presets import PRESETS, build_unet, check_resolution, downsample_factor, list_presets, presets_markdown

from .ncsnpp import NCSNppModel
from .ncsnpp_classifier import NCSNppClassifier
from .ncsnpp_presets import NCSNPP_PRESETS, NCSNPP_TIME_SCALE

__all__ = ["PRESETS", "build_unet", "check_resolution", "downsample_factor", "list_presets", "presets_markdown",
           "NCSNppModel", "NCSNppClassifier", "NCSNPP_PRESETS", "NCSNPP_TIME_SCALE"]

try:  # the classifier module belongs to the guidance work; export it when present
    from .classifier import TimeDependentClassifier  # noqa: F401

    __all__.append("TimeDependentClassifier")
except ImportError:  # pragma: no cover
    pass
