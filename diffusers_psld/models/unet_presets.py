r"""Named :class:`~diffusers.UNet2DModel` configurations for PSLD / CLD / VP training.

A PSLD or CLD state has ``k = 2`` components (data x and momentum m) stacked on the channel axis, a
VP state ``k = 1``; the UNet maps ``k*C`` channels to ``k*C`` channels of ε (for CLD the ε_x half is
ignored by the loss, see :func:`diffusers_psld.losses.hsm_loss`).

=================  ======  ====================================================================
preset             px      purpose
=================  ======  ====================================================================
``tiny``           16      unit tests (< 1M parameters, no attention)
``digits``         16      offline default (scikit-learn digits); trains on 2 CPU cores in minutes
``cifar10``        32      DDPM CIFAR-10 network (Ho et al. 2020), ~35.7M parameters
``cifar10-large``  32      wider / deeper DDPM-style network, ~60M parameters
``celeba64``       64      DDPM-style network for CelebA 64×64
``afhqv2-128``     128     DDPM-style network for AFHQv2 128×128
=================  ======  ====================================================================

:func:`list_presets` returns each preset with its parameter count (for C = 3 data channels and
k = 2 components unless asked otherwise).
"""
from __future__ import annotations

import copy
from typing import Dict, List, Optional

from diffusers import UNet2DModel

__all__ = ["PRESETS", "build_unet", "downsample_factor", "list_presets", "preset_config", "check_resolution"]

_D, _AD, _U, _AU = "DownBlock2D", "AttnDownBlock2D", "UpBlock2D", "AttnUpBlock2D"

# DDPM CIFAR-10 settings from ecosystem_facts §4 (35,746,307 params with 3 channels).
_DDPM = dict(attention_head_dim=None, downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6)

#: The named UNet configurations (see the table above), and the NCSN++ presets of :mod:`.ncsnpp_presets`.
PRESETS: Dict[str, dict] = {
    "tiny": dict(
        sample_size=16, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=(_D, _D), up_block_types=(_U, _U), norm_num_groups=8,
        description="unit tests: 2 levels, no attention",
    ),
    "digits": dict(
        sample_size=16, block_out_channels=(32, 64, 64), layers_per_block=1,
        down_block_types=(_D, _AD, _D), up_block_types=(_U, _AU, _U), norm_num_groups=16,
        description="offline default (scikit-learn digits, 16 px); attention at 8 px",
    ),
    "cifar10": dict(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=(_D, _AD, _D, _D), up_block_types=(_U, _U, _AU, _U), dropout=0.1, **_DDPM,
        description="DDPM CIFAR-10 network (Ho et al. 2020); attention at 16 px",
    ),
    "cifar10-large": dict(
        sample_size=32, block_out_channels=(128, 256, 256, 256), layers_per_block=4,
        down_block_types=(_D, _AD, _D, _D), up_block_types=(_U, _U, _AU, _U), dropout=0.1, **_DDPM,
        description="DDPM CIFAR-10 network with 4 res-blocks per level (deeper, like NCSN++ deep)",
    ),
    "celeba64": dict(
        sample_size=64, block_out_channels=(128, 256, 256, 256), layers_per_block=2,
        down_block_types=(_D, _D, _AD, _D), up_block_types=(_U, _AU, _U, _U), dropout=0.1, **_DDPM,
        description="DDPM-style network for 64 px (CelebA); attention at 16 px",
    ),
    "afhqv2-128": dict(
        sample_size=128, block_out_channels=(128, 128, 256, 256, 512), layers_per_block=2,
        down_block_types=(_D, _D, _D, _AD, _D), up_block_types=(_U, _AU, _U, _U, _U), dropout=0.1, **_DDPM,
        description="DDPM-style network for 128 px (AFHQv2); attention at 16 px",
    ),
}

# The paper's NCSN++ networks (`ncsnpp-*`, diffusers_psld/models/ncsnpp_presets.py): build_unet dispatches to them.
from .ncsnpp_presets import NCSNPP_PRESETS, build_ncsnpp, ncsnpp_preset_config  # noqa: E402

PRESETS.update(NCSNPP_PRESETS)


def _get(preset: str) -> dict:
    if preset not in PRESETS:
        raise ValueError(f"unknown `--model_preset` {preset!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[preset]


def downsample_factor(preset: str) -> int:
    """Total spatial downsampling of the preset's UNet: 2^(levels - 1)."""
    return 2 ** (len(_get(preset)["block_out_channels"]) - 1)


def check_resolution(preset: str, resolution: int) -> int:
    """Raise a ``ValueError`` naming ``--resolution`` unless it is a positive multiple of the preset's
    downsampling factor (and at least 4 px at the coarsest level, so the GroupNorm/attention blocks
    see a proper feature map). Returns the resolution."""
    f = downsample_factor(preset)
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution <= 0:
        raise ValueError(f"`--resolution` must be a positive integer, got {resolution!r}")
    if resolution % f != 0 or resolution // f < 2:
        raise ValueError(
            f"`--resolution` {resolution} is incompatible with `--model_preset` {preset!r}: it must be a multiple "
            f"of the preset's downsampling factor {f} and at least {2 * f} (the preset's native size is "
            f"{PRESETS[preset]['sample_size']})"
        )
    return resolution


def preset_config(preset: str, data_channels: int, num_components: int, sample_size: Optional[int] = None,
                  num_class_embeds: Optional[int] = None, out_channels: Optional[int] = None) -> dict:
    """The model keyword arguments of a preset with ``in_channels = k * C`` and ``out_channels`` (default ``k * C``;
    pass ``scheduler.output_channels(C)``, i.e. ``C`` for the C-channel ``prediction_type`` values)."""
    if out_channels is not None and (isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1):
        raise ValueError(f"`out_channels` must be a positive integer, got {out_channels!r}")
    cfg = copy.deepcopy(_get(preset))
    cfg.pop("description")
    for name, v in (("data_channels", data_channels), ("num_components", num_components)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {v!r}")
    if sample_size is not None:
        cfg["sample_size"] = check_resolution(preset, sample_size)
    if num_class_embeds is not None:
        if isinstance(num_class_embeds, bool) or not isinstance(num_class_embeds, int) or num_class_embeds < 2:
            raise ValueError("`num_class_embeds` must be an int >= 2 (n_classes + 1: the last index is the "
                             f"null class for classifier-free guidance), got {num_class_embeds!r}")
        cfg["num_class_embeds"] = num_class_embeds
    if "ncsnpp" in cfg:  # NCSNppModel kwargs instead of UNet2DModel's
        return ncsnpp_preset_config(preset, data_channels, num_components, cfg["sample_size"], num_class_embeds,
                                    out_channels)
    cfg["in_channels"] = cfg["out_channels"] = data_channels * num_components
    if out_channels is not None:
        cfg["out_channels"] = out_channels
    return cfg


def build_unet(preset: str, data_channels: int, num_components: int, sample_size: Optional[int] = None,
               num_class_embeds: Optional[int] = None, out_channels: Optional[int] = None) -> UNet2DModel:
    """Build a freshly initialised ``UNet2DModel`` from a named preset.

    Args:
        preset: one of :data:`PRESETS` (``tiny``, ``digits``, ``cifar10``, ``cifar10-large``, ``celeba64``,
            ``afhqv2-128``).
        data_channels: C, channels of the data (1 for digits, 3 for RGB).
        num_components: k, components of the state (``scheduler.num_components``: 2 for PSLD/CLD, 1 for VP).
        sample_size: resolution; defaults to the preset's; must be a multiple of :func:`downsample_factor`.
        num_class_embeds: ``n_classes + 1`` for a class-conditional UNet (last index = null class), else None.
        out_channels: the output channels, default ``k * C`` (``prediction_type="epsilon"``); pass
            ``scheduler.output_channels(C)`` (``C`` for ``"sample"`` / ``"sufficient_epsilon"``).
    """
    if "ncsnpp" in _get(preset):  # an NCSNppModel (same forward contract as UNet2DModel)
        return build_ncsnpp(preset, data_channels, num_components, sample_size, num_class_embeds, out_channels)
    return UNet2DModel(**preset_config(preset, data_channels, num_components, sample_size, num_class_embeds, out_channels))


def count_parameters(model) -> int:
    return sum(p.numel() for p in model.parameters())


def list_presets(data_channels: int = 3, num_components: int = 2) -> List[dict]:
    """Every preset with its resolution, downsampling factor, parameter count and description.

    Builds each model once on the meta device-free CPU path (the large ones take a few seconds).
    """
    import torch

    rows = []
    for name, spec in PRESETS.items():
        with torch.device("meta"):
            model = build_unet(name, data_channels, num_components)
        rows.append(dict(preset=name, resolution=spec["sample_size"], downsample_factor=downsample_factor(name),
                         block_out_channels=tuple(spec["block_out_channels"]),
                         layers_per_block=spec["layers_per_block"], parameters=count_parameters(model),
                         description=spec["description"]))
    return rows


def presets_markdown(data_channels: int = 3, num_components: int = 2) -> str:
    """:func:`list_presets` as a Markdown table."""
    lines = [f"| preset | px | ↓ factor | block_out_channels | layers/block | params (C={data_channels}, k={num_components}) | notes |",
             "|---|---|---|---|---|---|---|"]
    for r in list_presets(data_channels, num_components):
        lines.append(f"| `{r['preset']}` | {r['resolution']} | {r['downsample_factor']} | {r['block_out_channels']} | "
                     f"{r['layers_per_block']} | {r['parameters']:,} | {r['description']} |")
    return "\n".join(lines)


if __name__ == "__main__":  # python -m diffusers_psld.models.unet_presets
    print(presets_markdown(3, 2))
