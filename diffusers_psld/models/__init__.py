"""Models of diffusers-psld: UNet presets (:mod:`.unet_presets`), NCSN++ (:mod:`.ncsnpp`) and the time-dependent
classifiers.

The preset names are resolved lazily (PEP 562), so that ``python -m diffusers_psld.models.unet_presets``
runs the module as ``__main__`` without it having been imported by its package first (runpy warns
about exactly that).
"""
from importlib import import_module

from .ncsnpp import NCSNppModel
from .ncsnpp_classifier import NCSNppClassifier
from .ncsnpp_presets import NCSNPP_PRESETS, NCSNPP_TIME_SCALE

_LAZY = {name: ".unet_presets" for name in
         ("PRESETS", "build_unet", "check_resolution", "downsample_factor", "list_presets", "presets_markdown")}
__all__ = list(_LAZY) + ["NCSNppModel", "NCSNppClassifier", "NCSNPP_PRESETS", "NCSNPP_TIME_SCALE"]

try:  # the classifier module belongs to the guidance work; export it when present
    from .classifier import TimeDependentClassifier  # noqa: F401

    __all__.append("TimeDependentClassifier")
except ImportError:  # pragma: no cover
    pass


def __getattr__(name):
    if name in _LAZY:
        value = getattr(import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
