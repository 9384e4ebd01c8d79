r"""The PSLD paper's NCSN++ networks as named presets (``--model_preset ncsnpp-cifar10`` …).

Settings are the official training scripts' (mandt-lab/PSLD ``scripts_psld/``; see
``shared/notes/psld_reference.md`` §2.5), all with BigGAN blocks, ``skip_rescale``, ``init_scale = 0``,
``progressive = "none"`` and k·C = 6 channels for RGB PSLD:

=====================  ====  =========================  ======  ========  =======  ==========================
preset                 px    ch_mult (nf = 128)         blocks  attn at   dropout  time input / resampling
=====================  ====  =========================  ======  ========  =======  ==========================
``ncsnpp-cifar10``     32    (2, 2, 2)                  8       16        0.15     Fourier(log t), FIR, residual input pyramid
``ncsnpp-celeba64``    64    (1, 2, 2, 2)               4       16        0.1      Fourier(log t), FIR, residual input pyramid
``ncsnpp-afhqv2-128``  128   (1, 2, 2, 2, 3)            2       16        0.2      positional(t), no FIR, no pyramid
``ncsnpp-tiny``        16    (1, 2) with nf = 16        1       8         0.0      as CIFAR-10 (unit tests only)
=====================  ====  =========================  ======  ========  =======  ==========================

**Time input.** The official networks receive the raw forward time t. Every preset here therefore carries
``time_scale = NCSNPP_TIME_SCALE = 1.0``, which ``training/train_psld.py`` and the checkpoint converter write into
the saved scheduler config (``scheduler.model_time(t) = t · time_scale``); nothing else special-cases NCSN++.
"""
from __future__ import annotations

from typing import Dict, Optional

__all__ = ["NCSNPP_PRESETS", "NCSNPP_TIME_SCALE", "build_ncsnpp", "ncsnpp_preset_config"]

#: ``time_scale`` of every NCSN++ preset: the official networks receive the raw forward time t.
NCSNPP_TIME_SCALE = 1.0

_COMMON = dict(nf=128, fir_kernel=(1, 3, 3, 1), skip_rescale=True, resblock_type="biggan", progressive="none",
               progressive_combine="sum", fourier_scale=16.0, init_scale=0.0, resamp_with_conv=True)


def _spec(sample_size, ch_mult, num_res_blocks, attn, dropout, fir, progressive_input, embedding_type, description,
          nf=128):
    net = dict(_COMMON, nf=nf, ch_mult=tuple(ch_mult), num_res_blocks=num_res_blocks, attn_resolutions=tuple(attn),
               dropout=dropout, fir=fir, progressive_input=progressive_input, embedding_type=embedding_type)
    # block_out_channels / layers_per_block / sample_size / description: the keys unet_presets' helpers read
    return dict(sample_size=sample_size, block_out_channels=tuple(nf * m for m in ch_mult),
                layers_per_block=num_res_blocks, description=description, time_scale=NCSNPP_TIME_SCALE, ncsnpp=net)


NCSNPP_PRESETS: Dict[str, dict] = {
    "ncsnpp-cifar10": _spec(32, (2, 2, 2), 8, (16,), 0.15, True, "residual", "fourier",
                            "PSLD paper CIFAR-10 NCSN++ (official SOTA script); raw t (time_scale 1)"),
    "ncsnpp-celeba64": _spec(64, (1, 2, 2, 2), 4, (16,), 0.1, True, "residual", "fourier",
                             "PSLD paper CelebA-64 NCSN++ (official SOTA script); raw t (time_scale 1)"),
    "ncsnpp-afhqv2-128": _spec(128, (1, 2, 2, 2, 3), 2, (16,), 0.2, False, "none", "positional",
                               "PSLD paper AFHQv2-128 NCSN++ (official script); raw t (time_scale 1)"),
    "ncsnpp-tiny": _spec(16, (1, 2), 1, (8,), 0.0, True, "residual", "fourier",
                         "unit tests: CIFAR-10 NCSN++ layout at nf 16, 2 levels", nf=16),
}


def ncsnpp_preset_config(preset: str, data_channels: int, num_components: int, sample_size: Optional[int] = None,
                         num_class_embeds: Optional[int] = None, out_channels: Optional[int] = None) -> dict:
    """``NCSNppModel`` keyword arguments of an NCSN++ preset with ``in_channels = k·C`` and ``out_channels`` (default
    ``k·C``; ``C`` for the C-channel ``prediction_type``s, ``scheduler.output_channels(C)``).

    ``sample_size`` must already be validated by the caller (``unet_presets.check_resolution``).
    """
    if preset not in NCSNPP_PRESETS:
        raise ValueError(f"unknown NCSN++ preset {preset!r}; choose one of {sorted(NCSNPP_PRESETS)}")
    spec = NCSNPP_PRESETS[preset]
    cfg = dict(spec["ncsnpp"])
    cfg["sample_size"] = spec["sample_size"] if sample_size is None else sample_size
    cfg["in_channels"] = cfg["out_channels"] = data_channels * num_components
    if out_channels is not None:
        cfg["out_channels"] = out_channels
    cfg["num_class_embeds"] = num_class_embeds
    return cfg


def build_ncsnpp(preset: str, data_channels: int, num_components: int, sample_size: Optional[int] = None,
                 num_class_embeds: Optional[int] = None, out_channels: Optional[int] = None):
    """A freshly initialised :class:`~diffusers_psld.models.ncsnpp.NCSNppModel` from an NCSN++ preset.

    Raises ``ValueError`` naming ``--resolution`` for a ``sample_size`` the preset cannot take."""
    from .ncsnpp import NCSNppModel
    from .unet_presets import check_resolution

    if sample_size is not None:
        check_resolution(preset, sample_size)

    return NCSNppModel(**ncsnpp_preset_config(preset, data_channels, num_components, sample_size, num_class_embeds,
                                              out_channels))
