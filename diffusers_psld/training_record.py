r"""What a network was trained for, carried by the network itself.

A denoising network is only correct with the diffusion and output convention it was trained on: the recipe
(``diffusion``, Γ, ν, M⁻¹, β_min/β_max, κ), the time convention (``time_scale``) and the parameterisation
(``prediction_type``, ``input_preconditioning``, ``sigma_data``). A scheduler config that says otherwise samples
without any error but wrongly. So the network records them, and a pipeline refuses a scheduler that contradicts
the record (:func:`check`); the sampler, the time grid, ``sampling_eps``, ``project_eps`` and the number of steps
stay free.

Where the record lives: a hidden key ``_psld_training`` of the network's own config (``unet/config.json``).
diffusers keeps config keys that start with ``_`` through ``from_pretrained``, ``from_config`` and
``save_pretrained`` without the "config attributes ... are not expected and will be ignored" warning that a plain
unknown key logs on every load (measured with diffusers 0.35.2 and 0.42.1), so the record travels with the model
object: a UNet loaded alone (a checkpoint, an EMA copy) and put into a new pipeline is still checked, and no
second file can drift out of step with the weights. :meth:`PSLDPipeline.save_pretrained` writes the record from
the pipeline's scheduler when the network has none (:func:`stamp`), so a training script that saves through the
pipeline records it without further code. Networks saved before the record existed have none and load as before.
"""
from __future__ import annotations

import math
from typing import Any, Dict, Optional

__all__ = ["RECORD_KEY", "record_of", "record_in", "check", "stamp"]

#: the network config key holding the record
RECORD_KEY = "_psld_training"


def record_of(scheduler) -> Dict[str, Any]:
    """The training-defining settings of a diffusers_psld scheduler, with defaults resolved (``beta_min=None`` is
    the preset's value, ``m_inv=None`` critical damping), so equal diffusions give equal records.

    VP records no Γ, ν, M⁻¹, κ (they do not enter it); ``sigma_data`` is recorded only with
    ``input_preconditioning`` (it enters nothing else)."""
    cfg, sde = scheduler.config, scheduler.sde
    rec: Dict[str, Any] = {
        "diffusion": cfg.diffusion,
        "beta_min": float(sde.beta_min),
        "beta_max": float(sde.beta_max),
        "time_scale": float(cfg.time_scale),
        "prediction_type": cfg.prediction_type,
        "input_preconditioning": bool(cfg.input_preconditioning),
    }
    if cfg.input_preconditioning:
        rec["sigma_data"] = float(cfg.sigma_data)
    if sde.k > 1:
        gamma, nu = float(cfg.gamma), float(cfg.nu)
        rec.update(gamma=gamma, nu=nu, kappa=float(sde.kappa),
                   m_inv=float(cfg.m_inv) if cfg.m_inv is not None else (nu - gamma) / 2.0 * ((nu - gamma) / 2.0))
    return rec


def record_in(model) -> Optional[Dict[str, Any]]:
    """The record stored in ``model.config`` (a UNet2DModel, NCSNppModel, ...), or None. A bridge denoiser
    (:class:`diffusers_psld.denoisers.Denoiser`, D(y; σ) that every recipe samples) carries none: the network it
    wraps is read through its own source config."""
    from .denoisers import Denoiser  # late import: the denoisers import the schedulers

    if isinstance(model, Denoiser):
        return None
    config = getattr(model, "config", None)
    rec = config.get(RECORD_KEY) if config is not None and hasattr(config, "get") else None
    return dict(rec) if isinstance(rec, dict) else None


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool) or isinstance(a, str) or isinstance(b, str):
        return a == b
    try:
        return math.isclose(float(a), float(b), rel_tol=1e-9, abs_tol=0.0)
    except (TypeError, ValueError):
        return a == b


def check(model, scheduler, what: str = "the UNet") -> None:
    """Refuse a scheduler that contradicts the network's record (no record: nothing to check).

    Raises:
        ValueError: naming every contradicting setting with the network's and the scheduler's value.
    """
    rec = record_in(model)
    if rec is None or not hasattr(scheduler, "sde"):
        return
    mine = record_of(scheduler)
    if rec.get("diffusion", mine["diffusion"]) != mine["diffusion"]:
        keys = ["diffusion"]
    else:
        keys = [key for key in mine if key in rec and not _same(rec[key], mine[key])]
    if not keys:
        return
    trained = ", ".join(f"{key}={rec.get(key)!r}" for key in keys)
    given = ", ".join(f"{key}={mine.get(key)!r}" for key in keys)
    raise ValueError(
        f"{what} was trained with {trained} (its config's `{RECORD_KEY}`), but the scheduler "
        f"({type(scheduler).__name__}) says {given}: it would sample without error but wrongly. Use the scheduler "
        "saved with the network or one with these settings; the sampler, striding, sampling_eps, project_eps and "
        "the number of steps are free to change")


def stamp(model, scheduler) -> None:
    """Check, then write the scheduler's record into ``model``'s config when it has none (before saving)."""
    from .denoisers import Denoiser

    if isinstance(model, Denoiser):  # recipe-free: any recipe's scheduler samples it
        return
    check(model, scheduler)
    if record_in(model) is None and hasattr(scheduler, "sde") and hasattr(model, "register_to_config"):
        model.register_to_config(**{RECORD_KEY: record_of(scheduler)})
