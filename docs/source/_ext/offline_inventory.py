"""Intersphinx inventories written offline from the installed packages.

The documentation build must not touch the network, so instead of downloading ``objects.inv`` from the Python,
PyTorch, NumPy, Pillow and Diffusers sites, this module writes one inventory per project from what is installed
here: every public name of the namespaces below, under its documented name *and* under the path where the object
is defined (autodoc writes base classes and annotations by their defining module, e.g.
``diffusers.configuration_utils.ConfigMixin``), each pointing at the page of the installed version where that
project documents it. The URL rules are the projects' own page layouts; a name that is not installed is not
listed, so a reference to it fails the strict build instead of producing a dead link.

``write_inventories(directory)`` returns ``{project: (base_url, inventory_path)}`` for ``intersphinx_mapping``.
"""
from __future__ import annotations

import builtins
import importlib
import inspect
import zlib
from pathlib import Path
from typing import Callable, Dict, Iterable, Tuple

Entry = Tuple[str, str, str]  # (name, "py:class" / "py:function" / ..., relative URI)


def _role(obj) -> str:
    if inspect.isclass(obj):
        return "py:exception" if issubclass(obj, BaseException) else "py:class"
    if inspect.ismodule(obj):
        return "py:module"
    if callable(obj):
        return "py:function"
    return "py:data"


def _public(module) -> Iterable[Tuple[str, object]]:
    names = getattr(module, "__all__", None) or [n for n in dir(module) if not n.startswith("_")]
    for name in names:
        try:
            yield name, getattr(module, name)
        except Exception:  # lazy modules whose optional backends are missing
            continue


def _entries(namespace: str, uri: Callable[[str, object], str], kinds=("py:class", "py:function", "py:exception"),
             names: Iterable[str] | None = None) -> Dict[str, Entry]:
    module = importlib.import_module(namespace)
    out: Dict[str, Entry] = {}
    pairs = ((n, getattr(module, n)) for n in names if hasattr(module, n)) if names is not None else _public(module)
    for name, obj in pairs:
        role = _role(obj)
        if role not in kinds:
            continue
        target = uri(f"{namespace}.{name}", obj)
        out[f"{namespace}.{name}"] = (f"{namespace}.{name}", role, target)
        defined = f"{getattr(obj, '__module__', '') or ''}.{getattr(obj, '__qualname__', name)}"
        if defined.startswith(namespace.split(".")[0]) and defined not in out:
            out[defined] = (defined, role, target)
    return out


def _python() -> Dict[str, Entry]:
    special = {"str": "library/stdtypes.html#str", "list": "library/stdtypes.html#list",
               "dict": "library/stdtypes.html#dict", "tuple": "library/stdtypes.html#tuple",
               "set": "library/stdtypes.html#set", "bytes": "library/stdtypes.html#bytes",
               "range": "library/stdtypes.html#range"}
    out: Dict[str, Entry] = {}
    for name, obj in vars(builtins).items():
        if name.startswith("_") or not inspect.isclass(obj):
            continue
        role = _role(obj)
        uri = special.get(name) or ("library/exceptions.html#" + name if role == "py:exception"
                                    else "library/functions.html#" + name)
        out[name] = (name, role, uri)
    out["None"] = ("None", "py:data", "library/constants.html#None")
    for mod, members in {"typing": None, "os": ("PathLike",), "pathlib": ("Path", "PurePath"),
                         "collections.abc": None, "dataclasses": ("dataclass", "field"),
                         "enum": ("Enum",), "logging": ("Logger",)}.items():
        for name, entry in _entries(mod, lambda n, o, mod=mod: f"library/{mod}.html#{n}",
                                    kinds=("py:class", "py:function", "py:data"), names=members).items():
            out[name] = entry
    return out


def _torch() -> Dict[str, Entry]:
    import torch  # noqa: F401

    special = {"torch.Tensor": "tensors.html#torch.Tensor", "torch.dtype": "tensor_attributes.html#torch.dtype",
               "torch.device": "tensor_attributes.html#torch.device"}

    def uri(name, obj):
        return special.get(name, f"generated/{name}.html#{name}")

    out = {}
    for ns in ("torch", "torch.nn", "torch.nn.functional", "torch.optim", "torch.autograd"):
        out.update(_entries(ns, uri))
    out.update(_entries("torch.utils.data", lambda n, o: f"data.html#{n}"))
    for name in ("torch.dtype", "torch.device", "torch.Tensor", "torch.Generator", "torch.Size"):
        out[name] = (name, "py:class", uri(name, None))
    return out


def _numpy() -> Dict[str, Entry]:
    out = _entries("numpy", lambda n, o: f"reference/generated/{n}.html#{n}")
    out.update(_entries("numpy.random", lambda n, o: f"reference/random/generator.html#{n}", names=("Generator",)))
    return out


def _pillow() -> Dict[str, Entry]:
    return _entries("PIL.Image", lambda n, o: f"reference/Image.html#{n}", names=("Image", "open", "fromarray"))


# Diffusers documents its API with its own doc builder (no objects.inv): page of each class, from its site layout.
_DIFFUSERS_PAGES = {
    "ConfigMixin": "api/configuration", "register_to_config": "api/configuration",
    "FrozenDict": "api/configuration",
    "ModelMixin": "api/models/overview", "UNet2DModel": "api/models/unet2d",
    "UNet2DConditionModel": "api/models/unet2d-cond",
    "DiffusionPipeline": "api/pipelines/overview", "ImagePipelineOutput": "api/pipelines/overview",
    "DDPMPipeline": "api/pipelines/ddpm", "DDIMPipeline": "api/pipelines/ddim",
    "SchedulerMixin": "api/schedulers/overview", "KarrasDiffusionSchedulers": "api/schedulers/overview",
    "PipelineCallback": "using-diffusers/callback", "MultiPipelineCallbacks": "using-diffusers/callback",
    "BaseOutput": "api/outputs",
    "DDPMScheduler": "api/schedulers/ddpm", "DDIMScheduler": "api/schedulers/ddim",
    "DPMSolverMultistepScheduler": "api/schedulers/multistep_dpm_solver",
    "UniPCMultistepScheduler": "api/schedulers/unipc", "EulerDiscreteScheduler": "api/schedulers/euler",
    "HeunDiscreteScheduler": "api/schedulers/heun", "PNDMScheduler": "api/schedulers/pndm",
    "EDMEulerScheduler": "api/schedulers/edm_euler", "EDMDPMSolverMultistepScheduler": "api/schedulers/edm_multistep_dpm_solver",
    "EulerAncestralDiscreteScheduler": "api/schedulers/euler_ancestral",
    "DPMSolverSinglestepScheduler": "api/schedulers/singlestep_dpm_solver",
}


def _diffusers() -> Dict[str, Entry]:
    import diffusers
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
    from diffusers.schedulers.scheduling_utils import SchedulerOutput
    from diffusers.utils import BaseOutput

    extra = {"PipelineCallback": PipelineCallback, "MultiPipelineCallbacks": MultiPipelineCallbacks,
             "BaseOutput": BaseOutput}
    out: Dict[str, Entry] = {}
    for name, page in _DIFFUSERS_PAGES.items():
        obj = extra.get(name) or getattr(diffusers, name, None)
        if obj is None:
            continue
        role = _role(obj)
        for full in {f"diffusers.{name}", f"{obj.__module__}.{obj.__qualname__}"}:
            out[full] = (full, role, f"{page}#diffusers.{name}")
            if inspect.isclass(obj):  # public methods, documented on the class's page
                for meth, value in vars(obj).items():
                    if not meth.startswith("_") and callable(getattr(obj, meth, None)):
                        out[f"{full}.{meth}"] = (f"{full}.{meth}", "py:method", f"{page}#diffusers.{name}.{meth}")
    full = f"{SchedulerOutput.__module__}.SchedulerOutput"
    out[full] = (full, "py:class", "api/schedulers/overview#diffusers.schedulers.scheduling_utils.SchedulerOutput")
    return out


def _write(path: Path, project: str, version: str, entries: Dict[str, Entry]) -> None:
    lines = [f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(entries.values())]
    header = (f"# Sphinx inventory version 2\n# Project: {project}\n# Version: {version}\n"
              "# The remainder of this file is compressed using zlib.\n")
    path.write_bytes(header.encode() + zlib.compress("".join(lines).encode()))


def write_inventories(directory) -> Dict[str, Tuple[str, str]]:
    """Write ``<directory>/<project>.inv`` for python, torch, numpy, PIL, diffusers; return intersphinx_mapping."""
    import sys

    import diffusers
    import numpy
    import PIL
    import torch

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    py = f"{sys.version_info.major}.{sys.version_info.minor}"
    torch_version = torch.__version__.split("+")[0]
    torch_docs = ".".join(torch_version.split(".")[:2])
    projects = {
        "python": (f"https://docs.python.org/{py}/", "Python", py, _python),
        "torch": (f"https://docs.pytorch.org/docs/{torch_docs}/", "PyTorch", torch_version, _torch),
        "numpy": (f"https://numpy.org/doc/{'.'.join(numpy.__version__.split('.')[:2])}/", "NumPy",
                  numpy.__version__, _numpy),
        "PIL": ("https://pillow.readthedocs.io/en/stable/", "Pillow", PIL.__version__, _pillow),
        "diffusers": (f"https://huggingface.co/docs/diffusers/v{diffusers.__version__}/en/", "Diffusers",
                      diffusers.__version__, _diffusers),
    }
    mapping = {}
    for key, (base, project, version, build) in projects.items():
        path = directory / f"{key}.inv"
        _write(path, project, version, build())
        mapping[key] = (base, str(path))
    return mapping
