"""Models of diffusers-psld: UNet presets (:mod:`.unet_presets`) and the time-dependent classifier."""
from .unet_presets import PRESETS, build_unet, check_resolution, downsample_factor, list_presets, presets_markdown

__all__ = ["PRESETS", "build_unet", "check_resolution", "downsample_factor", "list_presets", "presets_markdown"]

try:  # the classifier module belongs to the guidance work; export it when present
    from .classifier import TimeDependentClassifier  # noqa: F401

    __all__.append("TimeDependentClassifier")
except ImportError:  # pragma: no cover
    pass
