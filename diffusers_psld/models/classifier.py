r"""Time-dependent classifier p(y | z_t) on the full ``k*C``-channel PSLD state, for class guidance.

The module path ``diffusers_psld.models.classifier`` is recorded in saved ``model_index.json`` files;
keep it stable. It exposes ``ModelMixin`` as a module attribute because diffusers' loader looks the
base-class names up on the component's module.

Time conditioning matches :class:`~diffusers.UNet2DModel`'s default (sinusoidal ``Timesteps`` with
``flip_sin_to_cos=True, freq_shift=0`` followed by a ``TimestepEmbedding`` MLP) and receives
``scheduler.model_time(t)`` for the **forward** time t, like the UNet.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from diffusers import ModelMixin  # noqa: F401  (name needed by diffusers' loader)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import TimestepEmbedding, Timesteps
from diffusers.models.resnet import ResnetBlock2D

__all__ = ["TimeDependentClassifier"]


class TimeDependentClassifier(ModelMixin, ConfigMixin):
    r"""A small ResNet encoder with time embedding → global average pool → linear logits.

    Args:
        in_channels (`int`): channels of the state z_t (``k * C``; the classifier sees x **and** m).
        num_classes (`int`): number of classes.
        block_out_channels (`Sequence[int]`, defaults to `(32, 64)`): channels per resolution level;
            every level but the last halves the resolution.
        layers_per_block (`int`, defaults to 1): ResNet blocks per level.
        norm_num_groups (`int`, defaults to 8): GroupNorm groups (must divide every block's channels).
        time_embed_dim (`int`, *optional*): defaults to ``4 * block_out_channels[0]``.
        dropout (`float`, defaults to 0.0).
        sample_size (`int`, *optional*): the spatial size H = W of the states it was trained on
            (``training/train_classifier.py`` records it). When set, ``forward`` refuses states of another
            size instead of classifying inputs it never saw; ``None`` (older checkpoints) skips the check.

    ``forward(sample [B, k*C, H, W], timestep [B] float) -> logits [B, num_classes]``.

    Raises:
        ValueError: bad configuration (channels, classes, groups, sample_size), or in ``forward`` a state
            of the wrong channel count or spatial size, or an integer timestep.
    """

    @register_to_config
    def __init__(
        self,
        in_channels: int = 2,
        num_classes: int = 10,
        block_out_channels: Sequence[int] = (32, 64),
        layers_per_block: int = 1,
        norm_num_groups: int = 8,
        time_embed_dim: int | None = None,
        dropout: float = 0.0,
        sample_size: int | None = None,
    ):
        super().__init__()
        if in_channels < 1:
            raise ValueError(f"`in_channels` must be >= 1, got {in_channels}")
        if num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2, got {num_classes}")
        if sample_size is not None and (isinstance(sample_size, bool) or not isinstance(sample_size, int) or sample_size < 1):
            raise ValueError(f"`sample_size` must be None or an int >= 1, got {sample_size!r}")
        if not block_out_channels or any(c % norm_num_groups for c in block_out_channels):
            raise ValueError(f"`norm_num_groups`={norm_num_groups} must divide every entry of `block_out_channels`={list(block_out_channels)}")
        ch0 = block_out_channels[0]
        temb = time_embed_dim or 4 * ch0
        self.time_proj = Timesteps(ch0, flip_sin_to_cos=True, downscale_freq_shift=0)
        self.time_embedding = TimestepEmbedding(ch0, temb)
        self.conv_in = nn.Conv2d(in_channels, ch0, 3, padding=1)
        self.resnets = nn.ModuleList()
        self.downsamplers = nn.ModuleList()
        ch = ch0
        for level, out_ch in enumerate(block_out_channels):
            for _ in range(layers_per_block):
                self.resnets.append(ResnetBlock2D(in_channels=ch, out_channels=out_ch, temb_channels=temb,
                                                  groups=norm_num_groups, dropout=dropout))
                ch = out_ch
            last = level == len(block_out_channels) - 1
            self.downsamplers.append(nn.Identity() if last else nn.Conv2d(ch, ch, 3, stride=2, padding=1))
        self.norm_out = nn.GroupNorm(norm_num_groups, ch)
        self.act = nn.SiLU()
        self.head = nn.Linear(ch, num_classes)

    def forward(self, sample: torch.Tensor, timestep: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, num_classes]`` of p(y | z_t) for states ``sample`` at model times ``timestep``.

        ``timestep`` must be a float tensor (``scheduler.model_time(t, B)``), a scalar or ``[B]``.
        """
        if sample.ndim != 4 or sample.shape[1] != self.config.in_channels:
            raise ValueError(f"`sample` must be [B, {self.config.in_channels}, H, W], got {tuple(sample.shape)}")
        size = self.config.get("sample_size") if hasattr(self.config, "get") else None
        if size is not None and tuple(sample.shape[-2:]) != (size, size):
            raise ValueError(
                f"`sample` is {tuple(sample.shape[-2:])} but this classifier was trained on {size}×{size} states; "
                f"train one at the pipeline's sample_size (training/train_classifier.py --pipeline <dir>)"
            )
        t = torch.as_tensor(timestep, device=sample.device)
        if not t.is_floating_point():
            raise ValueError("`timestep` must be a float tensor (use scheduler.model_time); integers lose the time")
        t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)
        if t.shape[0] != sample.shape[0]:
            raise ValueError(f"`timestep` must be a scalar or have {sample.shape[0]} entries, got {t.shape[0]}")
        emb = self.time_embedding(self.time_proj(t).to(dtype=self.dtype))
        h = self.conv_in(sample.to(self.dtype))
        per_level = self.config.layers_per_block
        for level, down in enumerate(self.downsamplers):
            for j in range(per_level):
                h = self.resnets[level * per_level + j](h, emb)
            h = down(h)
        h = self.act(self.norm_out(h)).mean(dim=(-2, -1))
        return self.head(h)
