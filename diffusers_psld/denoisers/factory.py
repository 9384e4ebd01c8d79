r"""Pick the denoiser wrapper for a network from the diffusers scheduler (config) it was trained with."""
from __future__ import annotations

from .base import Denoiser
from .edm import EDMDenoiser
from .vp import DiscreteVPDenoiser, discrete_alphas_cumprod, scheduler_config_dict

__all__ = ["denoiser_for_scheduler", "SUPPORTED_FAMILIES"]

SUPPORTED_FAMILIES = (
    "DDPM-family discrete VP schedules (any diffusers scheduler config with `num_train_timesteps` and a beta "
    "schedule: DDPM, DDIM, PNDM, DPM-Solver, UniPC, Euler, Heun, LMS, DEIS, ...; prediction_type epsilon / "
    "v_prediction / sample)",
    "EDM schedules (EDMEulerScheduler, EDMDPMSolverMultistepScheduler: sigma_data, c_noise = ¼ log σ)",
    "EulerDiscreteScheduler with timestep_type='continuous' (σ-conditioned VP networks)",
)


def denoiser_for_scheduler(unet, vp_scheduler, **kwargs) -> Denoiser:
    r"""The :class:`~diffusers_psld.denoisers.Denoiser` for ``unet`` trained with the diffusers scheduler (or config)
    ``vp_scheduler``: :class:`~diffusers_psld.denoisers.EDMDenoiser` for EDM schedulers (``sigma_data``) and for
    ``EulerDiscreteScheduler(timestep_type="continuous")``, else :class:`~diffusers_psld.denoisers.DiscreteVPDenoiser`
    for DDPM-family configs. ``kwargs`` go to the wrapper (e.g. ``null_class=True``).

    Raises:
        TypeError: ``vp_scheduler`` is neither a scheduler nor a config.
        ValueError: a scheduler of this package (its networks take the whole k*C state: use ``PSLDPipeline`` or
            ``RecipeDenoiser``), or a scheduler family without a VP / EDM noise law here (flow matching, score-SDE VE,
            consistency models, …), naming the supported families; or a config the wrapper cannot read
            (``prediction_type``, ``beta_schedule``, channels).
    """
    cfg = scheduler_config_dict(vp_scheduler)
    name = str(cfg.get("_class_name", type(vp_scheduler).__name__))
    if "diffusion" in cfg and ("gamma" in cfg or "beta_min" in cfg):
        raise ValueError(f"`vp_scheduler` is a diffusers_psld scheduler ({name}): its networks take the whole k*C state. "
                         "Load such a model with PSLDPipeline (PSLDPipeline.from_pretrained / PSLDPipeline(unet, scheduler)); "
                         "to sample it with diffusers' schedulers use `pipe.to_vp()`")
    if "sigma_data" in cfg or name.startswith("EDM"):
        return EDMDenoiser(unet, sigma_data=float(cfg.get("sigma_data", 0.5)),
                           prediction_type=cfg.get("prediction_type", "epsilon"), preconditioning="edm",
                           sigma_min=float(cfg.get("sigma_min", 0.002)), sigma_max=float(cfg.get("sigma_max", 80.0)),
                           **kwargs)
    if cfg.get("timestep_type") == "continuous" and cfg.get("prediction_type") == "v_prediction":
        ac = discrete_alphas_cumprod(cfg)
        sig = ((1 - ac) / ac).sqrt()
        finite = sig[sig.isfinite()]
        return EDMDenoiser(unet, prediction_type="v_prediction", preconditioning="vp",
                           sigma_min=float(cfg.get("sigma_min") or finite[0]), sigma_max=float(cfg.get("sigma_max") or finite[-1]),
                           **kwargs)
    if "num_train_timesteps" in cfg and ("beta_schedule" in cfg or "trained_betas" in cfg or "beta_start" in cfg):
        return DiscreteVPDenoiser(unet, cfg, **kwargs)
    raise ValueError(f"`vp_scheduler` ({name}) is not a scheduler family the bridge can read; supported: "
                     + "; ".join(SUPPORTED_FAMILIES) + ". Wrap the network yourself with a Denoiser subclass "
                     "(ContinuousVPDenoiser for a continuous VP-SDE network)")

