r"""NCSN++ (Song et al. 2021, *Score-Based Generative Modeling through SDEs*) as a diffusers model — the score
network of the PSLD paper (Pandey & Mandt 2023, Sec. 5 / App.), composed from diffusers' building blocks.

``UNet2DModel`` cannot express the configurations the PSLD paper trains (``progressive_input="residual"`` for
CIFAR-10 / CelebA-64, Fourier features of log t **without** dividing the output by t, BigGAN blocks with FIR
resampling on both paths), so :class:`NCSNppModel` composes the pieces diffusers ships for its own score-SDE
models:

================================  =====================================================================
NCSN++ piece                      diffusers building block
================================  =====================================================================
Fourier features of log t         ``embeddings.GaussianFourierProjection(log=True)``
sinusoidal embedding of t         ``embeddings.Timesteps(flip_sin_to_cos=False, downscale_freq_shift=1)``
time MLP (2 dense + SiLU)         ``embeddings.TimestepEmbedding``
BigGAN residual block             ``resnet.ResnetBlock2D`` (``kernel="fir"`` or ``"sde_vp"``, ``up``/``down``,
                                  ``output_scale_factor=√2`` = ``skip_rescale``)
FIR down-sampling with 3×3 conv   ``downsampling.FirDownsample2D`` (residual input pyramid)
FIR resampling without conv       ``downsampling.downsample_2d`` / ``upsampling.upsample_2d`` (``upfirdn2d_native``)
non-FIR down-sampling + conv      ``downsampling.Downsample2D(padding=0)``
self-attention (NIN q/k/v/out)    ``attention_processor.Attention`` (1 head, GroupNorm, residual, ÷√2)
================================  =====================================================================

Time input: the network receives what :meth:`PSLDScheduler.model_time` returns, ``t · time_scale``. The
official PSLD networks receive the raw forward time t ∈ [1e-5, 1] (Fourier embedding: log t), so the
NCSN++ presets and converted checkpoints are paired with a scheduler whose config records
``time_scale = 1.0`` (see :data:`diffusers_psld.models.ncsnpp_presets.NCSNPP_TIME_SCALE`).

Shapes: ``forward(sample [B, in_channels, H, W], timestep scalar or [B]) → .sample [B, out_channels, H, W]``;
H and W must be multiples of ``2**(len(ch_mult) - 1)``. Attention sits at the levels whose resolution
(computed from ``sample_size``) is in ``attn_resolutions`` — fixed at construction.

CLD networks (Γ = 0) of the official code predict only ε_m (``out_ch = C``); ``output_momentum_only=True``
builds that head and returns ``[0 ; ε_m]`` so the output keeps this package's ``k·C`` contract (the samplers
and the loss never use ε_x of a CLD model, :meth:`RecipeSDE.eps_mask`).

The module path ``diffusers_psld.models.ncsnpp`` is recorded in saved ``model_index.json`` files; keep it.
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (name needed by diffusers' loader)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.attention_processor import Attention
from diffusers.models.downsampling import Downsample2D, FirDownsample2D, downsample_2d
from diffusers.models.embeddings import GaussianFourierProjection, TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.models.upsampling import upsample_2d

__all__ = ["NCSNppModel", "NCSNppEncoder", "validate_ncsnpp_config"]

FIR_KERNEL = (1, 3, 3, 1)
_PROGRESSIVE = ("none", "output_skip")  # "residual" cannot run in the official code (see validate_ncsnpp_config)
_PROGRESSIVE_INPUT = ("none", "input_skip", "residual")
_EMBEDDINGS = ("fourier", "positional")
_COMBINE = ("sum", "cat")


def _groups(channels: int) -> int:
    """NCSN++'s GroupNorm rule: min(C // 4, 32) groups."""
    return min(channels // 4, 32)


def _check_int(name: str, v, low: int = 1) -> None:
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ValueError(f"`{name}` must be an integer >= {low}, got {v!r}")


def _check_choice(name: str, v, allowed) -> None:
    if v not in allowed:
        raise ValueError(f"`{name}` must be one of {list(allowed)}, got {v!r}")


def validate_ncsnpp_config(sample_size, in_channels, nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
                           fir, fir_kernel, resblock_type, progressive, progressive_input, progressive_combine,
                           embedding_type, fourier_scale, resamp_with_conv) -> None:
    """Raise ``ValueError`` naming the argument for any configuration NCSN++ (as PSLD uses it) cannot build."""
    _check_int("sample_size", sample_size)
    _check_int("in_channels", in_channels)
    _check_int("nf", nf, 4)
    if not isinstance(ch_mult, (list, tuple)) or not ch_mult:
        raise ValueError(f"`ch_mult` must be a non-empty list of positive integers, got {ch_mult!r}")
    for m in ch_mult:
        _check_int("ch_mult entries", m)
    _check_int("num_res_blocks", num_res_blocks)
    if not isinstance(attn_resolutions, (list, tuple)):
        raise ValueError(f"`attn_resolutions` must be a list of resolutions, got {attn_resolutions!r}")
    if sample_size % 2 ** (len(ch_mult) - 1):
        raise ValueError(f"`sample_size` {sample_size} must be a multiple of 2**(len(ch_mult) - 1) = "
                         f"{2 ** (len(ch_mult) - 1)}")
    if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
        raise ValueError(f"`dropout` must be in [0, 1), got {dropout!r}")
    if tuple(fir_kernel) != FIR_KERNEL:
        raise ValueError(f"`fir_kernel` must be {list(FIR_KERNEL)} (the only kernel diffusers' FIR ResNet block "
                         f"supports, and the one every PSLD config uses), got {list(fir_kernel)}")
    if not isinstance(fir, bool):
        raise ValueError(f"`fir` must be a bool, got {fir!r}")
    _check_choice("resblock_type", resblock_type, ("biggan",))
    if progressive == "residual":
        raise ValueError("`progressive='residual'` is not supported: the official PSLD port cannot run it (its "
                         "up-sampling calls F.interpolate with a size as scale_factor, and its FIR variant slices "
                         "with a negative step), so no official checkpoint uses it; use 'none' or 'output_skip'")
    _check_choice("progressive", progressive, _PROGRESSIVE)
    _check_choice("progressive_input", progressive_input, _PROGRESSIVE_INPUT)
    _check_choice("progressive_combine", progressive_combine, _COMBINE)
    _check_choice("embedding_type", embedding_type, _EMBEDDINGS)
    if not (isinstance(fourier_scale, (int, float)) and fourier_scale > 0):
        raise ValueError(f"`fourier_scale` must be > 0, got {fourier_scale!r}")
    if resamp_with_conv is not True:
        raise ValueError("`resamp_with_conv` must be True (BigGAN blocks resample inside the block; the "
                         f"official configs all set it), got {resamp_with_conv!r}")
    if progressive_input == "input_skip" and progressive_combine == "cat":
        raise ValueError("`progressive_combine='cat'` is not supported (no PSLD or score_sde config uses it); "
                         "use 'sum'")


# ----------------------------------------------------------------------------- initialisation (DDPM / NCSN++)
def _variance_scaling_(weight: torch.Tensor, scale: float, fan_in: int, fan_out: int) -> None:
    """DDPM's initialiser: uniform with variance ``scale / fan_avg`` (``scale = 0`` means 1e-10)."""
    scale = 1e-10 if scale == 0 else scale
    bound = math.sqrt(3.0 * scale / ((fan_in + fan_out) / 2.0))
    with torch.no_grad():
        weight.uniform_(-bound, bound)


def _init_layer_(layer: nn.Module, scale: float = 1.0) -> None:
    w = layer.weight
    if w.ndim == 4:  # conv [out, in, kh, kw]
        rf = w.shape[2] * w.shape[3]
        _variance_scaling_(w, scale, w.shape[1] * rf, w.shape[0] * rf)
    else:  # linear [out, in]
        _variance_scaling_(w, scale, w.shape[1], w.shape[0])
    if getattr(layer, "bias", None) is not None:
        nn.init.zeros_(layer.bias)


def ncsnpp_init_(module: nn.Module, init_scale: float) -> None:
    """DDPM/NCSN++ initialisation: variance-scaling (fan_avg, uniform) weights, zero biases; the last conv of
    every residual block and the attention output start at ``init_scale`` (0 → 1e-10), q/k/v at 0.1."""
    for m in module.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            _init_layer_(m, 1.0)
    for m in module.modules():
        if isinstance(m, ResnetBlock2D):
            _init_layer_(m.conv2, init_scale)
        elif isinstance(m, Attention):
            for lin in (m.to_q, m.to_k, m.to_v):
                _init_layer_(lin, 0.1)
            _init_layer_(m.to_out[0], init_scale)


# ----------------------------------------------------------------------------- blocks
def _resnet(in_ch: int, out_ch: int, temb: Optional[int], dropout: float, fir: bool, skip_rescale: bool,
            up: bool = False, down: bool = False) -> ResnetBlock2D:
    """BigGAN residual block of NCSN++ (``ResnetBlockBigGANpp``) as a diffusers ``ResnetBlock2D``."""
    return ResnetBlock2D(in_channels=in_ch, out_channels=out_ch, temb_channels=temb, dropout=dropout,
                         groups=_groups(in_ch), groups_out=_groups(out_ch), eps=1e-6, non_linearity="swish",
                         kernel="fir" if fir else "sde_vp", up=up, down=down,
                         output_scale_factor=math.sqrt(2.0) if skip_rescale else 1.0,
                         use_in_shortcut=(in_ch != out_ch) or up or down)


def _attention(ch: int, skip_rescale: bool) -> Attention:
    """NCSN++'s ``AttnBlockpp``: GroupNorm, one head of width C (scale C^-1/2), residual, ÷√2."""
    return Attention(query_dim=ch, heads=1, dim_head=ch, norm_num_groups=_groups(ch), eps=1e-6, bias=True,
                     residual_connection=True, rescale_output_factor=math.sqrt(2.0) if skip_rescale else 1.0,
                     upcast_softmax=True)


def _downsample_conv(in_ch: int, out_ch: int, fir: bool) -> nn.Module:
    """Down-sampling with a 3×3 conv (NCSN++ ``Downsample(with_conv=True)``, the residual input pyramid)."""
    if fir:
        return FirDownsample2D(in_ch, out_ch, use_conv=True, fir_kernel=FIR_KERNEL)
    return Downsample2D(in_ch, use_conv=True, out_channels=out_ch, padding=0, name="op")  # pad (0,1,0,1), stride 2


def _resample_plain(x: torch.Tensor, fir: bool, down: bool) -> torch.Tensor:
    """Resampling without parameters (the ``input_skip`` / ``output_skip`` pyramids)."""
    if down:
        return downsample_2d(x, kernel=FIR_KERNEL) if fir else F.avg_pool2d(x, 2, 2)
    return upsample_2d(x, kernel=FIR_KERNEL) if fir else F.interpolate(x, scale_factor=2.0, mode="nearest")


def _conv3x3(in_ch: int, out_ch: int) -> nn.Conv2d:
    return nn.Conv2d(in_ch, out_ch, 3, padding=1)


class _Level(nn.Module):
    """One resolution level of the down or up path (a plain container)."""


class NCSNppEncoder(nn.Module):
    r"""Time embedding + down path + middle block of NCSN++ (shared by :class:`NCSNppModel` and the classifier).

    Every module is also listed in ``self.official_layout``: ``(our prefix, kind)`` in the order the official
    code appends it to its ``all_modules`` list, which is what the checkpoint converter walks.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        nf, ch_mult = cfg["nf"], list(cfg["ch_mult"])
        fir, skip = cfg["fir"], cfg["skip_rescale"]
        dropout = cfg["dropout"]
        n_levels = len(ch_mult)
        self.resolutions = [cfg["sample_size"] // 2 ** i for i in range(n_levels)]
        self.attn_levels = [r in set(cfg["attn_resolutions"]) for r in self.resolutions]
        self.embedding_type, self.progressive_input = cfg["embedding_type"], cfg["progressive_input"]
        self.fir, self.skip_rescale, self.num_res_blocks = fir, skip, cfg["num_res_blocks"]
        self.combine = cfg["progressive_combine"]
        layout: List[Tuple[str, str]] = []
        temb_dim = 4 * nf
        if cfg["embedding_type"] == "fourier":
            self.time_proj = GaussianFourierProjection(nf, scale=cfg["fourier_scale"], log=True, flip_sin_to_cos=False)
            layout.append(("time_proj", "fourier"))
            embed_dim = 2 * nf
        else:
            self.time_proj = Timesteps(nf, flip_sin_to_cos=False, downscale_freq_shift=1)
            embed_dim = nf
        self.time_embedding = TimestepEmbedding(embed_dim, temb_dim, act_fn="silu")
        layout += [("time_embedding.linear_1", "linear"), ("time_embedding.linear_2", "linear")]
        self.class_embedding = None
        if cfg.get("num_class_embeds") is not None:
            self.class_embedding = nn.Embedding(cfg["num_class_embeds"], temb_dim)

        in_channels = cfg["in_channels"]
        self.conv_in = _conv3x3(in_channels, nf)
        layout.append(("conv_in", "conv"))
        hs_c = [nf]
        ch = nf
        pyramid_ch = in_channels
        self.down_blocks = nn.ModuleList()
        for i, mult in enumerate(ch_mult):
            lvl = _Level()
            lvl.resnets, lvl.attentions = nn.ModuleList(), nn.ModuleList()
            for j in range(self.num_res_blocks):
                lvl.resnets.append(_resnet(ch, nf * mult, temb_dim, dropout, fir, skip))
                layout.append((f"down_blocks.{i}.resnets.{j}", "resnet"))
                ch = nf * mult
                if self.attn_levels[i]:
                    lvl.attentions.append(_attention(ch, skip))
                    layout.append((f"down_blocks.{i}.attentions.{j}", "attention"))
                hs_c.append(ch)
            if i != n_levels - 1:
                lvl.downsampler = _resnet(ch, ch, temb_dim, dropout, fir, skip, down=True)
                layout.append((f"down_blocks.{i}.downsampler", "resnet"))
                if self.progressive_input == "input_skip":
                    lvl.pyramid = nn.Conv2d(pyramid_ch, ch, 1)
                    layout.append((f"down_blocks.{i}.pyramid", "combine"))  # Combine.Conv_0 (1×1)
                elif self.progressive_input == "residual":
                    lvl.pyramid = _downsample_conv(pyramid_ch, ch, fir)
                    layout.append((f"down_blocks.{i}.pyramid", "resample_conv"))
                    pyramid_ch = ch
                hs_c.append(ch)
            self.down_blocks.append(lvl)
        self.mid_resnet_1 = _resnet(ch, ch, temb_dim, dropout, fir, skip)
        self.mid_attention = _attention(ch, skip)
        self.mid_resnet_2 = _resnet(ch, ch, temb_dim, dropout, fir, skip)
        layout += [("mid_resnet_1", "resnet"), ("mid_attention", "attention"), ("mid_resnet_2", "resnet")]
        self.out_channels_mid = ch
        self.skip_channels = hs_c
        self.official_layout = layout

    def embed_time(self, timestep, batch: int, device, dtype, class_labels=None) -> torch.Tensor:
        """Time (and optional class) embedding ``[B, 4·nf]`` from a scalar or ``[B]`` float timestep."""
        t = torch.as_tensor(timestep, device=device)
        if t.ndim > 1 or (t.ndim == 1 and t.shape[0] not in (1, batch)):
            raise ValueError(f"`timestep` must be a scalar or have {batch} entries, got shape {tuple(t.shape)}")
        t = t.reshape(-1).to(torch.float32).expand(batch)
        if self.embedding_type == "fourier" and not torch.compiler.is_compiling() and bool((t <= 0).any()):
            raise ValueError("`timestep` must be > 0: NCSN++ with Fourier features embeds log(t) "
                             f"(got min {float(t.min())}); pass scheduler.model_time(t) with t >= sampling_eps")
        emb = self.time_embedding(self.time_proj(t).to(dtype))
        if self.class_embedding is not None:
            if class_labels is None:
                raise ValueError("`class_labels` are required: this NCSN++ was built with `num_class_embeds`")
            emb = emb + self.class_embedding(class_labels.to(device)).to(dtype)
        elif class_labels is not None:
            raise ValueError("`class_labels` given, but this NCSN++ is unconditional (`num_class_embeds=None`)")
        return emb

    def encode(self, x: torch.Tensor, temb: torch.Tensor) -> List[torch.Tensor]:
        """Down path and middle block; returns the skip activations, the last entry being the middle output."""
        inv_sqrt2 = 1.0 / math.sqrt(2.0)
        pyramid = x if self.progressive_input != "none" else None
        hs = [self.conv_in(x)]
        last = len(self.down_blocks) - 1
        for i, lvl in enumerate(self.down_blocks):
            for j, res in enumerate(lvl.resnets):
                h = res(hs[-1], temb)
                if self.attn_levels[i]:
                    h = lvl.attentions[j](h)
                hs.append(h)
            if i != last:
                h = lvl.downsampler(hs[-1], temb)
                if self.progressive_input == "input_skip":
                    pyramid = _resample_plain(pyramid, self.fir, down=True)
                    h = lvl.pyramid(pyramid) + h
                elif self.progressive_input == "residual":
                    pyramid = lvl.pyramid(pyramid)
                    pyramid = (pyramid + h) * inv_sqrt2 if self.skip_rescale else pyramid + h
                    h = pyramid
                hs.append(h)
        h = self.mid_resnet_1(hs[-1], temb)
        h = self.mid_attention(h)
        h = self.mid_resnet_2(h, temb)
        hs.append(h)
        return hs

    def reset_parameters_ncsnpp(self, init_scale: float) -> None:
        """NCSN++ initialisation of the encoder (see ``ncsnpp_init_``)."""
        ncsnpp_init_(self, init_scale)


class NCSNppModel(ModelMixin, ConfigMixin):
    r"""NCSN++ score network (ε-prediction) as the PSLD paper's official code configures it.

    The argument names are score_sde's / the official config's ``model.score_fn`` keys.

    Args:
        sample_size (`int`): image resolution the attention levels are computed from.
        in_channels (`int`): ``k·C`` (6 for RGB PSLD/CLD, 3 for VP).
        out_channels (`int`): ``k·C``; equal to ``in_channels`` for use in :class:`PSLDPipeline`.
        nf (`int`): base width (128 in every paper model).
        ch_mult (`Sequence[int]`): width multipliers per level; the resolution halves between levels.
        num_res_blocks (`int`): BigGAN blocks per level on the down path (one more on the up path).
        attn_resolutions (`Sequence[int]`): resolutions with self-attention.
        dropout (`float`): dropout inside the residual blocks.
        fir (`bool`): FIR (1,3,3,1) resampling (``upfirdn2d``) instead of nearest / average pooling.
        fir_kernel (`Sequence[int]`): must be ``(1, 3, 3, 1)``.
        skip_rescale (`bool`): divide every residual sum by √2.
        resblock_type (`str`): ``"biggan"`` (the only type PSLD uses).
        progressive (`str`): output path, ``"none"`` (PSLD) or ``"output_skip"`` (score_sde's; ``"residual"``
            raises: the official port cannot run it).
        progressive_input (`str`): input pyramid, ``"none"``, ``"input_skip"`` or ``"residual"`` (PSLD CIFAR-10,
            CelebA-64).
        progressive_combine (`str`): ``"sum"``.
        embedding_type (`str`): ``"fourier"`` (Gaussian Fourier features of log t) or ``"positional"``
            (sinusoidal embedding of t, max period 10⁴).
        fourier_scale (`float`): std of the Fourier frequencies (16).
        init_scale (`float`): initial scale of the last layers (0 → 1e-10).
        resamp_with_conv (`bool`): must be True.
        output_momentum_only (`bool`): the head predicts only ε_m (official CLD networks, ``out_ch = C``); the
            output is ``[0 ; ε_m]`` with ``out_channels`` channels.
        num_class_embeds (`int`, *optional*): class-conditional variant (label embedding added to the time
            embedding, as in ``UNet2DModel``; not part of the official networks).

    Raises:
        ValueError: for any setting outside the ranges above, naming it.
    """

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 6,
        out_channels: int = 6,
        nf: int = 128,
        ch_mult: Sequence[int] = (2, 2, 2),
        num_res_blocks: int = 8,
        attn_resolutions: Sequence[int] = (16,),
        dropout: float = 0.15,
        fir: bool = True,
        fir_kernel: Sequence[int] = FIR_KERNEL,
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive: str = "none",
        progressive_input: str = "residual",
        progressive_combine: str = "sum",
        embedding_type: str = "fourier",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        resamp_with_conv: bool = True,
        output_momentum_only: bool = False,
        num_class_embeds: Optional[int] = None,
    ):
        super().__init__()
        validate_ncsnpp_config(sample_size, in_channels, nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
                               fir, fir_kernel, resblock_type, progressive, progressive_input, progressive_combine,
                               embedding_type, fourier_scale, resamp_with_conv)
        _check_int("out_channels", out_channels)
        if output_momentum_only and out_channels % 2:
            raise ValueError(f"`output_momentum_only=True` needs an even `out_channels` (k·C with k = 2), got {out_channels}")
        head_ch = out_channels // 2 if output_momentum_only else out_channels
        if progressive == "output_skip" and head_ch != in_channels:
            raise ValueError("`progressive='output_skip'` outputs `in_channels` channels (as in NCSN++); it needs "
                             f"the head width {head_ch} to equal `in_channels` {in_channels}")
        if num_class_embeds is not None:
            _check_int("num_class_embeds", num_class_embeds, 2)
        cfg = dict(self.config)
        self.encoder = NCSNppEncoder(cfg)
        layout = list(self.encoder.official_layout)
        layout = [(f"encoder.{p}", k) for p, k in layout]
        fir, skip, n_levels = fir, skip_rescale, len(ch_mult)
        temb_dim, hs_c = 4 * nf, list(self.encoder.skip_channels)
        ch = self.encoder.out_channels_mid
        self.up_blocks = nn.ModuleList()
        for n, i in enumerate(reversed(range(n_levels))):
            lvl = _Level()
            lvl.resnets = nn.ModuleList()
            for j in range(num_res_blocks + 1):
                lvl.resnets.append(_resnet(ch + hs_c.pop(), nf * ch_mult[i], temb_dim, dropout, fir, skip))
                layout.append((f"up_blocks.{n}.resnets.{j}", "resnet"))
                ch = nf * ch_mult[i]
            if self.encoder.attn_levels[i]:
                lvl.attention = _attention(ch, skip)
                layout.append((f"up_blocks.{n}.attention", "attention"))
            if progressive == "output_skip":  # per level: GroupNorm → SiLU → 3×3 conv to in_channels, summed
                lvl.pyramid_norm = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
                lvl.pyramid_conv = _conv3x3(ch, in_channels)
                layout += [(f"up_blocks.{n}.pyramid_norm", "norm"), (f"up_blocks.{n}.pyramid_conv", "conv")]
            if i != 0:
                lvl.upsampler = _resnet(ch, ch, temb_dim, dropout, fir, skip, up=True)
                layout.append((f"up_blocks.{n}.upsampler", "resnet"))
            self.up_blocks.append(lvl)
        assert not hs_c
        if progressive != "output_skip":
            self.conv_norm_out = nn.GroupNorm(_groups(ch), ch, eps=1e-6)
            self.conv_out = _conv3x3(ch, head_ch)
            layout += [("conv_norm_out", "norm"), ("conv_out", "conv")]
        self.act = nn.SiLU()
        self.official_layout = layout
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        init_scale = self.config.init_scale
        ncsnpp_init_(self, init_scale)  # encoder, up path, head; then the NCSN++ output layers at init_scale
        if self.config.progressive == "output_skip":
            for lvl in self.up_blocks:
                _init_layer_(lvl.pyramid_conv, init_scale)
        else:
            _init_layer_(self.conv_out, init_scale)

    def forward(self, sample: torch.Tensor, timestep, class_labels: Optional[torch.Tensor] = None,
                return_dict: bool = True):
        r"""ε-prediction for states ``sample`` at network times ``timestep``.

        Args:
            sample (`torch.Tensor` of shape `[B, in_channels, H, W]`): the state z_t = [x ; m].
            timestep (`torch.Tensor` or `float`): scalar or ``[B]``; what the official network receives is the
                raw forward time t (``scheduler.model_time`` with ``time_scale = 1``); Fourier embedding needs > 0.
            class_labels (`torch.LongTensor` of shape `[B]`, *optional*): only with ``num_class_embeds``.
            return_dict (`bool`): return a ``UNet2DOutput`` (else a tuple).

        Returns:
            ``UNet2DOutput(sample=[B, out_channels, H, W])``.

        Raises:
            ValueError: wrong channel count, H/W not divisible by the down-sampling factor, a timestep of the wrong
                size or (Fourier) not > 0, class labels missing / unexpected.
        """
        cfg = self.config
        if sample.ndim != 4 or sample.shape[1] != cfg.in_channels:
            raise ValueError(f"`sample` must be [B, {cfg.in_channels}, H, W], got {tuple(sample.shape)}")
        f = 2 ** (len(cfg.ch_mult) - 1)
        if sample.shape[-1] % f or sample.shape[-2] % f:
            raise ValueError(f"`sample` height and width must be multiples of {f}, got {tuple(sample.shape[-2:])}")
        dtype = self.encoder.conv_in.weight.dtype
        x = sample.to(dtype)
        temb = self.encoder.embed_time(timestep, x.shape[0], x.device, dtype, class_labels)
        hs = self.encoder.encode(x, temb)
        h = hs.pop()
        n_levels, prog = len(cfg.ch_mult), cfg.progressive
        pyramid = None
        for n, lvl in enumerate(self.up_blocks):
            i = n_levels - 1 - n
            for res in lvl.resnets:
                h = res(torch.cat([h, hs.pop()], dim=1), temb)
            if self.encoder.attn_levels[i]:
                h = lvl.attention(h)
            if prog == "output_skip":
                p_h = lvl.pyramid_conv(self.act(lvl.pyramid_norm(h)))
                pyramid = p_h if pyramid is None else _resample_plain(pyramid, cfg.fir, down=False) + p_h
            if i != 0:
                h = lvl.upsampler(h, temb)
        assert not hs
        if prog == "output_skip":
            out = pyramid
        else:
            out = self.conv_out(self.act(self.conv_norm_out(h)))
        if cfg.output_momentum_only:
            out = torch.cat([torch.zeros_like(out), out], dim=1)
        if not return_dict:
            return (out,)
        return UNet2DOutput(sample=out)
