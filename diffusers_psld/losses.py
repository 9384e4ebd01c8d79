r"""Hybrid score matching (HSM) loss, PSLD paper Eq. 10, for every output parameterization.

For data x₀ and forward time t ~ U(t_min, 1) the HSM kernel gives ``z_t = a(t) x₀ + L_t ε`` with
ε ~ N(0, I) of ``k*C`` channels (:meth:`PSLDScheduler.add_noise`). The network receives
``scheduler.scale_model_input(z_t, t)`` (the identity, or the input preconditioning c_in(t) z_t — the same
function the samplers call) and ``model_time(t)``, and predicts ``scheduler.config.prediction_type``:

* ``"epsilon"`` (the paper's): mean squared error over the ε components that reach the reverse dynamics,
  :meth:`RecipeSDE.eps_mask` (VP and PSLD: all ``k*C`` channels; CLD: only ε_m). No λ(t) weighting (the
  paper's ``reduce_mean`` ε-loss).
* ``"sufficient_epsilon"`` (C channels, target uᵀε) and ``"sample"`` (C channels, target x₀): the squared
  error weighted by ``λ(t) = Σ_{i∈mask} (eps_f)_i² / |mask|`` (:func:`diffusers_psld.parameterization.loss_weight`),
  which makes the loss **equal** to the paper's ε-loss of the lifted, consistent output
  ``ε = eps_z z + eps_f f`` (tested on exact inputs). So all three types minimise the same objective over
  functions with the same weighting over t; they differ only in what the network outputs. For
  ``"sufficient_epsilon"`` λ = 1/2 (PSLD), 1 (VP), u_m(t)² (CLD: the paper's ε_m mask). For ``"sample"``
  ``λ = ‖mask⊙L⁻¹a‖²/|mask|``, the SNR weight that makes x̂₀ regression ε-equivalent: the reason is that this
  keeps the comparison between parameterizations about the parameterization, not the weighting.
* ``snr_gamma`` (diffusers' name; min-SNR-γ of Hang et al. 2023) multiplies every type's weight by
  min(SNR_t, γ)/SNR_t with SNR_t = ‖L_t⁻¹a_t‖² (VP: α²/σ²): it caps the weight of the low-noise times, in
  ε-equivalent units (for ``"sample"`` this is the x₀-loss weight min(SNR, γ) up to the mask factor).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import parameterization

__all__ = ["hsm_loss", "sample_times", "T_MIN"]

T_MIN = 1e-5


def sample_times(batch_size: int, generator: Optional[torch.Generator] = None, t_min: float = T_MIN,
                 device=None) -> torch.Tensor:
    """t ~ U(t_min, 1) in float64 (the paper's training time distribution)."""
    u = torch.rand(batch_size, generator=generator, dtype=torch.float64, device=device)
    return t_min + (1.0 - t_min) * u


def _model_dtype(unet) -> torch.dtype:
    try:
        return next(unet.parameters()).dtype
    except (StopIteration, AttributeError):
        return torch.float32


def hsm_loss(unet, scheduler, x0: torch.Tensor, generator: Optional[torch.Generator] = None,
             t: Optional[torch.Tensor] = None, class_labels: Optional[torch.Tensor] = None,
             noise: Optional[torch.Tensor] = None, return_stats: bool = False, t_min: float = T_MIN,
             prediction_type: Optional[str] = None, snr_gamma: Optional[float] = None):
    """HSM loss of ``unet`` on a batch ``x0`` ``[B, C, H, W]`` in [-1, 1] (see the module docstring).

    Args:
        unet: a ``UNet2DModel`` (or anything called as ``unet(z, t, class_labels=...)`` returning
            ``.sample`` or a tensor) with ``k*C`` input channels and ``scheduler.output_channels(C)`` outputs.
        scheduler: a :class:`~diffusers_psld.PSLDScheduler` (gives k, the HSM kernel, ``model_time``,
            ``scale_model_input`` and ``prediction_type``).
        x0: data batch.
        generator: draws t (if not given) and ε (if not given); one generator keeps runs reproducible.
        t: forward times ``[B]`` (float64 preferred); default t ~ U(t_min, 1).
        class_labels: ``[B]`` long labels for a class-conditional UNet.
        noise: ε ``[B, k*C, H, W]``; default standard normal.
        return_stats: also return a dict with per-component losses and the times.
        t_min: lower end of the default time distribution.
        prediction_type: defaults to ``scheduler.config.prediction_type``; passing a different one raises
            (the scheduler converts the output at sampling time, so the two must agree).
        snr_gamma: min-SNR-γ weighting (> 0), or None (default: none).

    Returns:
        the scalar float32 loss, or ``(loss, stats)`` if ``return_stats``.

    Raises:
        ValueError: bad shapes, channel counts that do not match the scheduler config, a mismatching
            ``prediction_type``, or ``snr_gamma`` <= 0.
    """
    if x0.ndim != 4:
        raise ValueError(f"`x0` must be a batch [B, C, H, W], got shape {tuple(x0.shape)}")
    ptype = getattr(scheduler.config, "prediction_type", "epsilon")
    if prediction_type is not None and prediction_type != ptype:
        raise ValueError(f"`prediction_type`={prediction_type!r} differs from the scheduler's {ptype!r}; build the "
                         f"scheduler with prediction_type={prediction_type!r} (it converts the output when sampling)")
    if snr_gamma is not None and (isinstance(snr_gamma, bool) or not isinstance(snr_gamma, (int, float))
                                  or not 0 < snr_gamma < float("inf")):
        raise ValueError(f"`snr_gamma` must be a finite number > 0 or None, got {snr_gamma!r}")
    k = scheduler.num_components
    b, c = x0.shape[:2]
    device = x0.device
    if t is None:
        t = sample_times(b, generator=generator, t_min=t_min)
    t = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    if t.shape != (b,):
        raise ValueError(f"`t` must have shape [{b}], got {tuple(t.shape)}")
    if noise is None:
        noise = torch.randn((b, k * c, *x0.shape[2:]), generator=generator, dtype=torch.float32,
                            device=generator.device if generator is not None else device).to(device)
    if noise.shape != (b, k * c, *x0.shape[2:]):
        raise ValueError(f"`noise` must have shape {(b, k * c, *x0.shape[2:])}, got {tuple(noise.shape)}")
    noise = noise.float()
    cfg = getattr(getattr(unet, "module", unet), "config", None)
    in_ch = getattr(cfg, "in_channels", None) if cfg is not None else None
    if isinstance(in_ch, int) and in_ch != k * c:
        raise ValueError(f"the UNet has {in_ch} input channels but the state has k*C = {k}*{c} = {k * c} channels "
                         "(build it with diffusers_psld.models.build_unet(preset, C, scheduler.num_components))")
    if isinstance(in_ch, int) and isinstance(getattr(cfg, "out_channels", None), int):
        parameterization.check_unet_channels(in_ch, cfg.out_channels, k, ptype)
    # z_t in float64 (bitwise the float32 state after the cast); the network boundary casts once
    z64 = scheduler.add_noise(x0.double(), noise.double(), t)
    dtype = _model_dtype(unet)
    t_model = scheduler.model_time(t, b).to(device)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    out = unet(scheduler.scale_model_input(z64, t).to(dtype), t_model, **kwargs)
    pred = out.sample if hasattr(out, "sample") else out
    j = parameterization.output_components(ptype, k)
    if pred.shape != (b, j * c, *x0.shape[2:]):
        raise ValueError(f"the UNet must output {j}*C = {j * c} channels for prediction_type={ptype!r} "
                         f"(scheduler.output_channels(C)); got {tuple(pred.shape)}")
    mask = scheduler.sde.eps_mask().to(device)  # [k] bool
    kern = scheduler.sde.hsm_kernel(t.cpu())
    weight = None  # per-sample weight [B] (float64), None = 1
    if snr_gamma is not None:
        snr = parameterization.snr(kern.mean_coef, kern.chol)
        weight = snr.clamp(max=float(snr_gamma)) / snr
    if ptype == "epsilon":
        sq = (pred.float() - noise).pow(2).reshape(b, k, c, -1)
        per_comp = sq.mean(dim=(0, 2, 3))  # [k]
        if weight is None:
            loss = sq[:, mask].mean()
        else:
            loss = (sq[:, mask] * weight.to(device, torch.float32)[:, None, None, None]).mean()
    else:
        maps = parameterization.output_maps(ptype, kern.mean_coef, kern.chol)
        target = maps.to(device).from_eps(noise.double(), z64).float()  # x₀ or uᵀε
        lam = parameterization.loss_weight(maps, scheduler.sde.eps_mask())
        weight = lam if weight is None else lam * weight
        sq = (pred.float() - target).pow(2).reshape(b, c, -1)
        loss = (sq * weight.to(device, torch.float32)[:, None, None]).mean()
    if not return_stats:
        return loss
    if ptype == "epsilon":
        names = ["x", "m"] + [f"c{i}" for i in range(2, k)]
        stats = {f"loss_eps_{names[i]}": per_comp[i].detach() for i in range(k)}
    else:
        stats = {f"loss_{ptype}_mse": sq.mean().detach()}  # unweighted
    stats["t"] = t
    return loss, stats
