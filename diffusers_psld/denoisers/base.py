r"""The denoiser contract ``D(y; σ) → x̂₀`` (EDM's ``D(x; σ)``, k-diffusion's model wrappers) and its base class.

A *denoiser* maps a noisy observation ``y = x₀ + σ n`` (n ~ N(0, I); ``y`` ``[B, C, ...]`` over the C data channels,
σ a float64 tensor ``[B]`` or a scalar) to ``E[x₀ | y]``. Every diffusion of the package's family learns this one
function in its own coordinates (VP/DDPM, VE/EDM, CLD, PSLD): the sufficient statistic of a state z_t is such a
``y`` (:func:`diffusers_psld.parameterization.sufficient_statistic`), so any denoiser drives any recipe sampler and
the other way round.

:class:`Denoiser` is a diffusers ``ModelMixin`` + ``ConfigMixin`` that owns a network (``self.unet``) and its noise
level map; ``save_pretrained`` / ``from_pretrained`` work on it like on a UNet: its config records the network's
class and config, so that the network is rebuilt on load (weights in safetensors). The network classes that can be
rebuilt are diffusers' models (``diffusers.<Name>``) and this package's (``diffusers_psld.models.<Name>``); any other
``torch.nn.Module`` with the same call signature can be wrapped and sampled, but not reloaded.
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Optional

import numpy as np
import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (names the pipeline loader looks up in this module)

__all__ = ["Denoiser", "check_sigma", "network_class_path", "network_config_of", "build_network", "jsonable"]


def jsonable(value):
    """A JSON-serialisable copy of a (nested) config value: mappings → dicts, tuples / arrays → lists, NumPy
    scalars → Python numbers; other objects unchanged."""
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    return value


def network_class_path(net) -> str:
    """``"diffusers.<Name>"`` or ``"diffusers_psld.models.<Name>"`` for a class that :func:`build_network` can
    rebuild, else ``"<module>.<qualname>"`` (recorded for information; such a network cannot be reloaded)."""
    import diffusers

    from .. import models

    cls = type(net)
    if getattr(diffusers, cls.__name__, None) is cls:
        return f"diffusers.{cls.__name__}"
    if getattr(models, cls.__name__, None) is cls:
        return f"diffusers_psld.models.{cls.__name__}"
    return f"{cls.__module__}.{cls.__qualname__}"


def network_config_of(net) -> dict:
    """The network's config as a plain dict (keys starting with ``_`` dropped), or ``{}`` when it has none."""
    cfg = getattr(getattr(net, "module", net), "config", None)
    if cfg is None:
        return {}
    items = cfg.items() if isinstance(cfg, Mapping) else vars(cfg).items()
    return {k: jsonable(v) for k, v in items if not str(k).startswith("_")}


def build_network(class_path: str, config: dict):
    """Rebuild a network from :func:`network_class_path` and :func:`network_config_of` (weights are loaded by the caller).

    Raises:
        ValueError: the class is not one of diffusers' models or this package's (only those are rebuilt from a
            saved config: a config never names arbitrary code to import).
    """
    import diffusers

    from .. import models

    module, _, name = str(class_path).rpartition(".")
    root = {"diffusers": diffusers, "diffusers_psld.models": models}.get(module)
    cls = getattr(root, name, None) if root is not None else None
    if cls is None or not (isinstance(cls, type) and issubclass(cls, ModelMixin)):
        raise ValueError(
            f"cannot rebuild the network class {class_path!r} from a saved config: only diffusers' models "
            "('diffusers.<Name>') and this package's ('diffusers_psld.models.<Name>') are rebuilt; pass the network "
            "itself (`unet=`) instead")
    return cls.from_config(dict(config))


def check_sigma(sigma, batch_size: int) -> torch.Tensor:
    """σ as a float64 CPU tensor ``[batch_size]``: a number, a 0-d / 1-element tensor (broadcast) or ``batch_size`` values.

    Raises:
        TypeError: not a real number / real tensor.
        ValueError: wrong number of entries, or an entry that is not finite and > 0.
    """
    if isinstance(sigma, torch.Tensor):
        if sigma.dtype == torch.bool or sigma.is_complex():
            raise TypeError(f"`sigma` must hold real noise levels, got a {sigma.dtype} tensor")
        s = sigma.detach().to("cpu", torch.float64).reshape(-1)
    else:
        if isinstance(sigma, (bool, np.bool_, str)) or sigma is None:
            raise TypeError(f"`sigma` must be a number or a tensor of noise levels, got {sigma!r}")
        try:
            s = torch.as_tensor(np.asarray(sigma, dtype=np.float64)).reshape(-1)
        except (TypeError, ValueError) as err:
            raise TypeError(f"`sigma` must be a number or a tensor of noise levels, got {sigma!r}") from err
    if s.numel() == 1:
        s = s.expand(batch_size)
    if s.numel() != batch_size:
        raise ValueError(f"`sigma` must have 1 or {batch_size} (the batch size) entries, got {s.numel()}")
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        bad = s[~(torch.isfinite(s) & (s > 0))][0].item()
        raise ValueError(f"`sigma` must be finite noise levels > 0 (the std of y - x₀), got {bad!r}")
    return s.contiguous()


def _check_sample(sample, channels: int) -> torch.Tensor:
    if not isinstance(sample, torch.Tensor) or not torch.is_floating_point(sample):
        desc = f"a {sample.dtype} tensor" if isinstance(sample, torch.Tensor) else type(sample).__name__
        raise TypeError(f"`sample` (the noisy data y) must be a floating-point tensor [B, C, ...], got {desc}")
    if sample.ndim < 2 or sample.shape[0] < 1 or sample.shape[1] != channels:
        raise ValueError(f"`sample` must have shape [B, {channels}, ...] (the data channels of this denoiser's network), "
                         f"got {tuple(sample.shape)}")
    return sample


class Denoiser(ModelMixin, ConfigMixin):
    r"""Base class: a network behind the denoiser contract ``forward(sample, sigma, class_labels=None) → x̂₀``.

    ``sample`` is ``y = x₀ + σ n`` ``[B, C, ...]`` (floating point), ``sigma`` the noise level(s) σ > 0 (a float64
    tensor ``[B]`` or a scalar; kept in float64 on the CPU for the coefficients), ``class_labels`` an int tensor
    ``[B]`` for class-conditional networks. Returns x̂₀ = E[x₀ | y] ``[B, C, ...]`` in float64 for a float64
    ``sample``, else float32; the network runs in its own dtype (inputs cast at its boundary).

    Subclasses implement :meth:`denoise`; their ``__init__`` registers its settings with ``register_to_config`` (not
    the decorator: the network, the first positional argument, is not config) and calls ``_init_network``. Shared config
    entries: ``network_class`` / ``network_config`` (recorded from the network; used to rebuild it on load),
    ``null_class`` (the network's last class index is an unconditional "null" class, as in this package's
    class-conditional models; classifier-free guidance needs it).

    Properties: :attr:`data_channels` (C), :attr:`sample_size`, :attr:`num_class_embeds`, :attr:`sigma_range`
    (σ_min, σ_max): the noise levels the network was trained on; outside, the network's noise *conditioning*
    is clamped to the nearest end while the input and output scalings stay exact (see each subclass).
    """

    #: components of the network's input per data channel (1 for VP / EDM networks; k for this package's own)
    _input_components = 1

    # ------------------------------------------------------------------ construction
    def _init_network(self, unet, network_class: Optional[str], network_config: Optional[dict]):
        """Install ``unet`` (recording its class and config), or rebuild it from the saved config."""
        if unet is None:
            if not network_class:
                raise ValueError(f"{type(self).__name__} needs the network: pass `unet=`")
            unet = build_network(network_class, network_config or {})
            self.register_to_config(network_class=network_class, network_config=dict(network_config or {}))
        else:
            if not isinstance(unet, torch.nn.Module):
                raise TypeError(f"`unet` must be a torch.nn.Module (e.g. a diffusers UNet2DModel), got {type(unet).__name__}")
            if "cross_attention_dim" in network_config_of(unet):
                raise ValueError(f"`unet` is a text/image-conditioned network ({type(unet).__name__}, called with "
                                 "encoder_hidden_states); denoisers wrap networks called as unet(x, timestep, class_labels=None) "
                                 "(UNet2DModel-like)")
            self.register_to_config(network_class=network_class_path(unet), network_config=network_config_of(unet))
        self.unet = unet

    def _network_value(self, key: str, default=None):
        return self.config.network_config.get(key, default) if self.config.network_config else default

    # ------------------------------------------------------------------ properties
    @property
    def network(self) -> torch.nn.Module:
        """The wrapped network (also ``self.unet``)."""
        return self.unet

    @property
    def data_channels(self) -> int:
        """The data channels C of ``sample`` and of x̂₀."""
        return int(self._network_value("in_channels")) // self._input_components

    @property
    def sample_size(self):
        """The network's ``sample_size`` (an int or ``[H, W]``), or None when it does not record one."""
        return self._network_value("sample_size")

    @property
    def num_class_embeds(self) -> Optional[int]:
        """Number of class embeddings of the network, or None when it is unconditional."""
        return self._network_value("num_class_embeds")

    @property
    def sigma_range(self):
        """``(σ_min, σ_max)``: the noise levels of the network's training range (float)."""
        raise NotImplementedError

    def _network_dtype(self) -> torch.dtype:
        try:
            return next(self.unet.parameters()).dtype
        except StopIteration:
            return getattr(self.unet, "dtype", torch.float32)

    def _time_dtype(self, net_dtype) -> torch.dtype:
        """Noise conditioning (time) is passed in float64 to float64 networks, else in float32."""
        return torch.float64 if net_dtype == torch.float64 else torch.float32

    def _call_network(self, inp: torch.Tensor, cond: torch.Tensor, class_labels, net_dtype) -> torch.Tensor:
        """The network's raw output for input ``inp`` and noise conditioning ``cond`` (float64 ``[B]``)."""
        cond = cond.to(device=inp.device, dtype=self._time_dtype(net_dtype))
        kwargs = {} if class_labels is None else {"class_labels": class_labels}
        out = self.unet(inp.to(net_dtype), cond, **kwargs)
        return out.sample if hasattr(out, "sample") else (out[0] if isinstance(out, tuple) else out)

    # ------------------------------------------------------------------ the contract
    def forward(self, sample: torch.Tensor, sigma, class_labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x̂₀ = E[x₀ | y] for ``sample`` = y ``[B, C, ...]`` at noise level(s) ``sigma`` (see the class docstring).

        Raises:
            TypeError: ``sample`` is not a floating-point tensor, or ``sigma`` is not real.
            ValueError: ``sample`` does not have C channels; ``sigma`` has neither 1 nor B entries or is not finite
                and > 0; ``class_labels`` missing for a class-conditional network without a null class (with one,
                ``class_labels=None`` samples unconditionally: the null class).
        """
        y = _check_sample(sample, self.data_channels)
        sig = check_sigma(sigma, y.shape[0])
        if class_labels is None and self.num_class_embeds is not None:
            if not self.config.null_class:
                raise ValueError(f"this {type(self).__name__}'s network is class-conditional ({self.num_class_embeds} class "
                                 "embeddings, no unconditional class): pass `class_labels`")
            # unconditional: the null class (the last index)
            class_labels = torch.full((y.shape[0],), self.num_class_embeds - 1, dtype=torch.long, device=y.device)
        work = torch.float64 if y.dtype == torch.float64 else torch.float32
        return self.denoise(y.to(work), sig, class_labels)

    def denoise(self, y: torch.Tensor, sigma: torch.Tensor, class_labels) -> torch.Tensor:
        """Subclass hook: x̂₀ for checked ``y`` (float32/float64) and ``sigma`` (float64 CPU ``[B]``)."""
        raise NotImplementedError


def coef(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample float64 coefficients ``[B]`` as ``[B, 1, ...]`` in ``like``'s dtype and device."""
    return values.to(device=like.device, dtype=like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def log_interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """Piecewise-linear interpolation of ``fp`` over increasing ``xp`` at ``x`` (float64), clamped at the ends;
    exact (bit-identical to ``fp[j]``) at ``x = xp[j]``."""
    n = xp.numel()
    x = x.contiguous()
    idx = torch.searchsorted(xp, x).clamp(1, n - 1)  # first index with xp >= x
    lo = idx - 1
    w = ((x - xp[lo]) / (xp[idx] - xp[lo])).clamp(0.0, 1.0)
    return torch.where(w == 1.0, fp[idx], fp[lo] + w * (fp[idx] - fp[lo]))

