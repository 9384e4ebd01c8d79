r"""The pipeline side of the bridge: :meth:`PSLDPipeline.from_vp`, :meth:`PSLDPipeline.from_vp_pretrained` and
:meth:`PSLDPipeline.to_vp` (their implementations live here; the math is in :mod:`diffusers_psld.denoisers`).

* ``from_vp(unet, vp_scheduler, scheduler=None)`` wraps a diffusers network and the scheduler (config) it was trained
  with as a :class:`~diffusers_psld.denoisers.Denoiser` and puts it in a ``PSLDPipeline`` as its ``unet``: every
  sampler of the package then runs on it (the pipeline's ``_unet_eps`` reduces the state to ``(y, σ)``, asks the
  denoiser for x̂₀ and lifts it to the state's ε).
* ``to_vp()`` wraps the pipeline's network as a :class:`~diffusers_psld.denoisers.VPEpsilonModel` and returns it with
  the ``DDPMScheduler`` it answers on, for diffusers' own pipelines and schedulers.
"""
from __future__ import annotations

import json
import os
from typing import Optional

import diffusers

from ..denoisers import Denoiser, RecipeDenoiser, VPEpsilonModel, default_vp_config, denoiser_for_scheduler
from ..denoisers.vp import scheduler_config_dict

__all__ = ["from_vp", "from_vp_pretrained", "to_vp", "network_of", "class_layout"]


def network_of(unet):
    """The network whose config describes the spatial layout (``sample_size``, ``down_block_types``): the denoiser's
    inner network, or ``unet`` itself."""
    return unet.unet if isinstance(unet, Denoiser) else unet


def class_layout(unet):
    """``(n_embeds, n_classes, has_null)`` of a (class-conditional) network: this package's convention is a null class
    at the last index; a wrapped diffusers network has one only when its denoiser says so (``null_class``)."""
    if isinstance(unet, Denoiser):
        n = unet.num_class_embeds
        has_null = bool(unet.config.null_class)
    else:
        n = unet.config.num_class_embeds
        has_null = True
    if n is None:
        return None, None, False
    return n, (n - 1 if has_null else n), has_null


def _check_recipe_scheduler(scheduler, what="scheduler"):
    if not (hasattr(scheduler, "num_components") and hasattr(scheduler, "check_unet")):
        raise ValueError(f"`{what}` must be a diffusers_psld scheduler (PSLDScheduler, GDDIMMultistepScheduler, "
                         f"SSCSScheduler, ConjugateScheduler, SplittingScheduler), got {type(scheduler).__name__}; "
                         "the diffusers scheduler the network was trained with is `vp_scheduler`")
    return scheduler


def from_vp(cls, unet, vp_scheduler, scheduler=None, **denoiser_kwargs):
    """See :meth:`PSLDPipeline.from_vp`."""
    if isinstance(unet, Denoiser):
        if denoiser_kwargs:
            raise ValueError(f"`unet` is already a Denoiser; options {sorted(denoiser_kwargs)} apply when wrapping a network")
        denoiser = unet
    else:
        if vp_scheduler is None:
            raise ValueError("`vp_scheduler` is required: the diffusers scheduler (or its config) the network was trained with")
        denoiser = denoiser_for_scheduler(unet, vp_scheduler, **denoiser_kwargs)
    if scheduler is None:
        from ..schedulers import GDDIMMultistepScheduler

        scheduler = GDDIMMultistepScheduler()
    return cls(unet=denoiser, scheduler=_check_recipe_scheduler(scheduler))


_DOWNLOAD_KEYS = ("revision", "cache_dir", "token", "local_files_only", "force_download", "proxies")


def from_vp_pretrained(cls, path_or_id, scheduler=None, **kwargs):
    """See :meth:`PSLDPipeline.from_vp_pretrained`."""
    from . import pipeline_psld as _pp  # the module whose ``_snapshot_download`` tests patch

    path = str(path_or_id)
    dl = {k: kwargs.pop(k) for k in _DOWNLOAD_KEYS if k in kwargs}
    if not os.path.isdir(path):
        if _pp._looks_like_local_path(path):
            raise FileNotFoundError(f"`path_or_hub_id`: the directory {path!r} does not exist")
        try:
            path = _pp._snapshot_download(path, **{k: v for k, v in dl.items() if v is not None})
        except Exception as err:  # noqa: BLE001  (Hub / network / offline-cache errors)
            raise FileNotFoundError(
                f"`path_or_hub_id`={path_or_id!r}: there is no local directory {os.path.abspath(str(path_or_id))!r}, and as a "
                f"Hub repo id it could not be fetched ({type(err).__name__}: {str(err).splitlines()[0][:300]})") from err
    index_file = os.path.join(path, "model_index.json")
    if not os.path.isfile(index_file):
        raise ValueError(f"{path_or_id!r} is not a diffusers pipeline directory (no model_index.json); for a bare network "
                         "load it yourself and call PSLDPipeline.from_vp(unet, vp_scheduler)")
    with open(index_file, encoding="utf-8") as f:
        index = json.load(f)
    entry = index.get("unet")
    if not (isinstance(entry, list) and len(entry) == 2 and entry[0] == "diffusers"
            and isinstance(getattr(diffusers, str(entry[1]), None), type)):
        raise ValueError(f"{path_or_id!r}: model_index.json has unet={entry!r}; expected a diffusers network such as "
                         "['diffusers', 'UNet2DModel'] (a pixel-space DDPM-style pipeline)")
    if entry[1] != "UNet2DModel":
        raise ValueError(f"{path_or_id!r}: the bridge samples unconditional / class-conditional pixel-space networks "
                         f"(UNet2DModel); this pipeline's network is {entry[1]} (text- or latent-conditioned pipelines "
                         "are not supported)")
    if not os.path.isfile(os.path.join(path, "scheduler", "scheduler_config.json")):
        raise ValueError(f"{path_or_id!r} has no scheduler/scheduler_config.json (the schedule the network was trained with)")
    _pp._check_safetensors(path, kwargs.get("use_safetensors"), passed=("scheduler",))
    load = {k: kwargs.pop(k) for k in ("torch_dtype", "use_safetensors", "variant") if k in kwargs}
    if "use_safetensors" not in load:
        load["use_safetensors"] = True
    unet = diffusers.UNet2DModel.from_pretrained(path, subfolder="unet", **load)
    with open(os.path.join(path, "scheduler", "scheduler_config.json"), encoding="utf-8") as f:
        vp_config = json.load(f)
    return from_vp(cls, unet, vp_config, scheduler=scheduler, **kwargs)


def to_vp(pipe, scheduler_config: Optional[dict] = None, residual: str = "sample", residual_seed: Optional[int] = None):
    """See :meth:`PSLDPipeline.to_vp`."""
    if isinstance(pipe.unet, Denoiser):
        denoiser = pipe.unet
    else:
        denoiser = RecipeDenoiser(pipe.unet, pipe.scheduler, residual=residual, residual_seed=residual_seed)
    cfg = default_vp_config(**(scheduler_config_dict(scheduler_config, "scheduler_config") if scheduler_config else {}))
    cfg.pop("_class_name", None)
    cfg.pop("_diffusers_version", None)
    return VPEpsilonModel(denoiser, cfg), diffusers.DDPMScheduler.from_config(cfg)

