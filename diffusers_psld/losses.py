r"""Hybrid score matching (HSM) ε-prediction loss, PSLD paper Eq. 10.

For data x₀ and forward time t ~ U(t_min, 1) the HSM kernel gives ``z_t = a(t) x₀ + L_t ε`` with
ε ~ N(0, I) of ``k*C`` channels (:meth:`PSLDScheduler.add_noise`). The network predicts ε from
``(z_t, model_time(t))`` and the loss is the mean squared error over the ε components that reach
the reverse dynamics, :meth:`RecipeSDE.eps_mask`:

* VP (k = 1) and PSLD (Γ > 0, k = 2): all ``k*C`` channels;
* CLD (Γ = 0): only the momentum half ε_m (the ε_x output of the network is ignored).

so one code path covers all three. No λ(t) weighting (the paper's ``reduce_mean`` ε-loss).
"""
from __future__ import annotations

from typing import Optional

import torch

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
             noise: Optional[torch.Tensor] = None, return_stats: bool = False, t_min: float = T_MIN):
    """HSM ε-prediction loss of ``unet`` on a batch ``x0`` ``[B, C, H, W]`` in [-1, 1].

    Args:
        unet: a ``UNet2DModel`` (or anything called as ``unet(z, t, class_labels=...)`` returning
            ``.sample`` or a tensor) with ``k*C`` input and output channels.
        scheduler: a :class:`~diffusers_psld.PSLDScheduler` (gives k, the HSM kernel and ``model_time``).
        x0: data batch.
        generator: draws t (if not given) and ε (if not given); one generator keeps runs reproducible.
        t: forward times ``[B]`` (float64 preferred); default t ~ U(t_min, 1).
        class_labels: ``[B]`` long labels for a class-conditional UNet.
        noise: ε ``[B, k*C, H, W]``; default standard normal.
        return_stats: also return a dict with per-component losses and the times.

    Returns:
        the scalar float32 loss, or ``(loss, stats)`` if ``return_stats``.
    """
    if x0.ndim != 4:
        raise ValueError(f"`x0` must be a batch [B, C, H, W], got shape {tuple(x0.shape)}")
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
    z_t = scheduler.add_noise(x0.float(), noise, t)
    dtype = _model_dtype(unet)
    t_model = scheduler.model_time(t, b).to(device)
    kwargs = {} if class_labels is None else {"class_labels": class_labels}
    out = unet(z_t.to(dtype), t_model, **kwargs)
    pred = out.sample if hasattr(out, "sample") else out
    if pred.shape != noise.shape:
        raise ValueError(f"the UNet must output {k}*C = {k * c} channels like its input; got {tuple(pred.shape)}")
    mask = scheduler.sde.eps_mask().to(device)  # [k] bool
    sq = (pred.float() - noise).pow(2).reshape(b, k, c, -1)
    per_comp = sq.mean(dim=(0, 2, 3))  # [k]
    loss = sq[:, mask].mean()
    if not return_stats:
        return loss
    names = ["x", "m"] + [f"c{i}" for i in range(2, k)]
    stats = {f"loss_eps_{names[i]}": per_comp[i].detach() for i in range(k)}
    stats["t"] = t
    return loss, stats
