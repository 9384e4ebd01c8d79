r"""The PSLD paper's time-dependent classifier p(y | z_t) (official ``ncsnpp_clf``): the NCSN++ encoder (time
embedding, down path, middle block) on the full ``k·C``-channel state, flattened **without pooling** into a
bias-free linear layer (paper Sec. 4, class-conditional generation, Eq. 13–14).

Drop-in for :class:`~diffusers_psld.models.classifier.TimeDependentClassifier` in :class:`PSLDPipeline`
(``config.in_channels``, ``config.num_classes``, ``forward(sample, timestep) -> logits``). It receives
``scheduler.model_time(t)`` of the **forward** time t, i.e. the raw t when ``time_scale = 1`` (what the official
classifier was trained on). The module path ``diffusers_psld.models.ncsnpp_classifier`` is recorded in saved
``model_index.json`` files; keep it.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
from diffusers import ModelMixin  # noqa: F401  (name needed by diffusers' loader)
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .ncsnpp import FIR_KERNEL, NCSNppEncoder, _check_int, _init_layer_, validate_ncsnpp_config

__all__ = ["NCSNppClassifier"]


class NCSNppClassifier(ModelMixin, ConfigMixin):
    r"""NCSN++ encoder + linear head: ``forward(sample [B, in_channels, S, S], timestep) -> logits [B, num_classes]``.

    Args: ``sample_size`` (the input must be exactly S×S: the head sees ``C_mid·(S/2^(L-1))²`` features),
    ``in_channels`` (``k·C``), ``num_classes`` (≥ 2) and the NCSN++ settings of :class:`NCSNppModel` (same names,
    same meaning; the official scripts use nf 128, ch_mult (1, 2, 3, 4), 4 blocks, attention at 16 and 8,
    positional embedding, no FIR).

    Raises:
        ValueError: for invalid settings, a wrong input shape or timestep (see :class:`NCSNppModel`).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        in_channels: int = 6,
        num_classes: int = 10,
        nf: int = 128,
        ch_mult: Sequence[int] = (1, 2, 3, 4),
        num_res_blocks: int = 4,
        attn_resolutions: Sequence[int] = (16, 8),
        dropout: float = 0.1,
        fir: bool = False,
        fir_kernel: Sequence[int] = FIR_KERNEL,
        skip_rescale: bool = True,
        resblock_type: str = "biggan",
        progressive_input: str = "none",
        progressive_combine: str = "sum",
        embedding_type: str = "positional",
        fourier_scale: float = 16.0,
        init_scale: float = 0.0,
        resamp_with_conv: bool = True,
    ):
        super().__init__()
        validate_ncsnpp_config(sample_size, in_channels, nf, ch_mult, num_res_blocks, attn_resolutions, dropout,
                               fir, fir_kernel, resblock_type, "none", progressive_input, progressive_combine,
                               embedding_type, fourier_scale, resamp_with_conv)
        _check_int("num_classes", num_classes, 2)
        self.encoder = NCSNppEncoder(dict(self.config))
        last_res = sample_size // 2 ** (len(ch_mult) - 1)
        self.head = nn.Linear(self.encoder.out_channels_mid * last_res ** 2, num_classes, bias=False)
        self.official_layout = [(f"encoder.{p}", k) for p, k in self.encoder.official_layout] + [("head", "linear")]
        self.encoder.reset_parameters_ncsnpp(init_scale)
        _init_layer_(self.head, 1.0)

    def forward(self, sample: torch.Tensor, timestep) -> torch.Tensor:
        """Logits of p(y | z_t); ``timestep`` is ``scheduler.model_time(t)`` (scalar or ``[B]``)."""
        s = self.config.sample_size
        if sample.ndim != 4 or tuple(sample.shape[1:]) != (self.config.in_channels, s, s):
            raise ValueError(f"`sample` must be [B, {self.config.in_channels}, {s}, {s}], got {tuple(sample.shape)}")
        dtype = self.encoder.conv_in.weight.dtype
        x = sample.to(dtype)
        temb = self.encoder.embed_time(timestep, x.shape[0], x.device, dtype)
        h = self.encoder.encode(x, temb)[-1]
        return self.head(torch.flatten(h, start_dim=1))
