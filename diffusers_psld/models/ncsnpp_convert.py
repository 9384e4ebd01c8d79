r"""Official PSLD (mandt-lab/PSLD) NCSN++ settings and state dicts → :class:`NCSNppModel` / :class:`NCSNppClassifier`.

The official networks keep every layer in one ``all_modules`` ``ModuleList``; our models list the same layers,
in the same order, in ``model.official_layout`` as ``(our prefix, kind)``. :func:`convert_state_dict` walks both
and renames (and, for the attention's ``NIN`` layers, transposes) each parameter. It is strict: every official
tensor must be used, every parameter of ours filled, every shape equal — otherwise a ``ValueError`` lists what
is wrong. Facts (not code) taken from the official ``song_sde/layerspp.py``: ``NIN.W`` is ``[in, out]``
(``y = x W + b``), the BigGAN block holds ``GroupNorm_0, Conv_0, Dense_0, GroupNorm_1, Conv_1, Conv_2``, the
attention block ``GroupNorm_0, NIN_0..3`` (q, k, v, out), FIR resampling convs ``Conv2d_0`` and plain ones
``Conv_0``; Gaussian Fourier features are ``W``.
"""
from __future__ import annotations

from typing import Dict, Mapping, Optional

import torch

from .ncsnpp import NCSNppModel
from .ncsnpp_classifier import NCSNppClassifier

__all__ = ["config_from_official", "classifier_config_from_official", "convert_state_dict", "strip_prefix"]

_RESNET = {"GroupNorm_0": "norm1", "Conv_0": "conv1", "Dense_0": "time_emb_proj", "GroupNorm_1": "norm2",
           "Conv_1": "conv2", "Conv_2": "conv_shortcut"}
_ATTN = {"GroupNorm_0": "group_norm", "NIN_0": "to_q", "NIN_1": "to_k", "NIN_2": "to_v", "NIN_3": "to_out.0"}
_ARCH_KEYS = ("nf", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout", "fir", "fir_kernel", "skip_rescale",
              "resblock_type", "progressive_input", "progressive_combine", "embedding_type", "fourier_scale",
              "init_scale", "resamp_with_conv")


def _common(score_fn: Mapping, image_size: int, what: str) -> dict:
    missing = [k for k in _ARCH_KEYS + ("in_ch",) if k not in score_fn]
    if missing:
        raise ValueError(f"the official {what} config lacks {missing}")
    if str(score_fn.get("nonlinearity", "swish")).lower() != "swish":
        raise ValueError(f"only `nonlinearity: swish` is supported, got {score_fn.get('nonlinearity')!r}")
    if score_fn.get("noise_cond", True) is not True:
        raise ValueError("only time-conditional networks (`noise_cond: true`) are supported")
    cfg = {k: score_fn[k] for k in _ARCH_KEYS}
    for k in ("resblock_type", "progressive_input", "progressive_combine", "embedding_type"):
        cfg[k] = str(cfg[k]).lower()
    cfg["ch_mult"], cfg["attn_resolutions"] = list(cfg["ch_mult"]), list(cfg["attn_resolutions"])
    cfg["fir_kernel"] = list(cfg["fir_kernel"])
    cfg["dropout"], cfg["fourier_scale"], cfg["init_scale"] = (float(cfg["dropout"]), float(cfg["fourier_scale"]),
                                                               float(cfg["init_scale"]))
    cfg["sample_size"], cfg["in_channels"] = int(image_size), int(score_fn["in_ch"])
    return cfg


def config_from_official(score_fn: Mapping, image_size: int) -> dict:
    """``NCSNppModel`` kwargs from an official ``model.score_fn`` config (dict) and ``data.image_size``.

    ``out_ch == in_ch / 2`` (the official CLD networks, which predict ε_m only) becomes
    ``output_momentum_only=True`` with ``out_channels = in_ch``.
    """
    cfg = _common(score_fn, image_size, "score_fn")
    cfg["progressive"] = str(score_fn.get("progressive", "none")).lower()
    in_ch, out_ch = int(score_fn["in_ch"]), int(score_fn.get("out_ch", score_fn["in_ch"]))
    if out_ch == in_ch:
        cfg["out_channels"], cfg["output_momentum_only"] = out_ch, False
    elif 2 * out_ch == in_ch:
        cfg["out_channels"], cfg["output_momentum_only"] = in_ch, True
    else:
        raise ValueError(f"`out_ch` must equal `in_ch` ({in_ch}) or, for CLD networks, in_ch / 2; got {out_ch}")
    return cfg


def classifier_config_from_official(clf_fn: Mapping, image_size: int) -> dict:
    """``NCSNppClassifier`` kwargs from an official ``model.clf_fn`` (``ncsnpp_clf``) config."""
    cfg = _common(clf_fn, image_size, "clf_fn")
    if "n_cls" not in clf_fn or not isinstance(clf_fn["n_cls"], int):
        raise ValueError(f"the official clf_fn config needs an integer `n_cls`, got {clf_fn.get('n_cls')!r}")
    cfg["num_classes"] = clf_fn["n_cls"]
    return cfg


def strip_prefix(state_dict: Mapping[str, torch.Tensor], prefix: str) -> Dict[str, torch.Tensor]:
    """The entries of ``state_dict`` under ``prefix`` (e.g. ``"ema_score_fn."``) with the prefix removed."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    if not out:
        heads = sorted({k.split(".")[0] for k in state_dict})
        raise ValueError(f"no tensors under {prefix!r} in the checkpoint's state_dict (top-level names: {heads})")
    return out


def _our_name(model, prefix: str, kind: str, rest: str) -> Optional[tuple]:
    """(our key, transpose?) for one official parameter ``rest`` of a layer of ``kind``; None if unknown."""
    head, _, leaf = rest.rpartition(".")
    if kind == "fourier":
        return (f"{prefix}.weight", False) if rest == "W" else None
    if kind in ("linear", "conv", "norm"):
        return (f"{prefix}.{rest}", False) if rest in ("weight", "bias") else None
    if kind == "combine":
        return (f"{prefix}.{leaf}", False) if head == "Conv_0" and leaf in ("weight", "bias") else None
    if kind == "resnet":
        return (f"{prefix}.{_RESNET[head]}.{leaf}", False) if head in _RESNET and leaf in ("weight", "bias") else None
    if kind == "attention":
        if head not in _ATTN:
            return None
        if head == "GroupNorm_0":
            return (f"{prefix}.group_norm.{leaf}", False) if leaf in ("weight", "bias") else None
        return {"W": (f"{prefix}.{_ATTN[head]}.weight", True), "b": (f"{prefix}.{_ATTN[head]}.bias", False)}.get(leaf)
    if kind == "resample_conv":
        module = model.get_submodule(prefix)
        ours = {"Conv2d_0": "Conv2d_0" if hasattr(module, "Conv2d_0") else None,  # FirDownsample2D
                "Conv_0": "op" if hasattr(module, "op") else None}.get(head)  # Downsample2D(name="op")
        return (f"{prefix}.{ours}.{leaf}", False) if ours and leaf in ("weight", "bias") else None
    raise ValueError(f"unknown layer kind {kind!r}")


def _unusable(value) -> Optional[str]:
    """Why ``value`` cannot be a network weight (None if it can)."""
    if not isinstance(value, torch.Tensor):
        return f"is a {type(value).__name__}, not a tensor"
    if not value.is_floating_point():
        return f"has dtype {value.dtype}; network weights are floating point"
    finite = torch.isfinite(value)
    if not bool(finite.all()):
        n_nan = int(torch.isnan(value).sum())
        return f"holds {n_nan} NaN and {int((~finite).sum()) - n_nan} ±inf values (of {value.numel()})"
    return None


def _listed(problems) -> str:
    if len(problems) == 1:
        return problems[0]
    return "\n  " + "\n  ".join(problems[:20]) + (f"\n  (+{len(problems) - 20} more)" if len(problems) > 20 else "")


def convert_state_dict(official: Mapping[str, torch.Tensor], model) -> Dict[str, torch.Tensor]:
    """Official network state dict (``all_modules.<i>.<param>``, prefix already stripped) → ``model``'s keys.

    Args:
        official: tensors of one official ``NCSNpp`` / ``NCSNppClassifier`` (e.g. ``strip_prefix(sd, "ema_score_fn.")``).
        model: the :class:`NCSNppModel` / :class:`NCSNppClassifier` built from the same settings.

    Returns:
        A state dict for ``model.load_state_dict(..., strict=True)`` (tensors keep their dtype).

    Raises:
        ValueError: a value that is not a floating-point tensor (e.g. int64: a cast would hide a wrong file) or
            that holds NaN / ±inf, naming each; unknown, unused or missing tensors, or shape mismatches (all
            listed in one message).
    """
    if not isinstance(model, (NCSNppModel, NCSNppClassifier)):
        raise ValueError(f"`model` must be an NCSNppModel or NCSNppClassifier, got {type(model).__name__}")
    unusable = [f"{key!r} {why}" for key, tensor in official.items() for why in [_unusable(tensor)] if why]
    if unusable:
        raise ValueError("the official state dict holds values that cannot be network weights (nothing was "
                         "converted): " + _listed(unusable))
    layout = model.official_layout
    ours = model.state_dict()
    out: Dict[str, torch.Tensor] = {}
    problems = []
    for key, tensor in official.items():
        parts = key.split(".", 2)
        if len(parts) < 3 or parts[0] != "all_modules" or not parts[1].isdigit() or int(parts[1]) >= len(layout):
            problems.append(f"unexpected official tensor {key!r}")
            continue
        prefix, kind = layout[int(parts[1])]
        target = _our_name(model, prefix, kind, parts[2])
        if target is None or target[0] not in ours:
            problems.append(f"official tensor {key!r} has no counterpart in layer {prefix!r} ({kind})")
            continue
        name, transpose = target
        value = tensor.t() if transpose else tensor
        if tuple(value.shape) != tuple(ours[name].shape):
            problems.append(f"{key!r} → {name!r}: shape {tuple(value.shape)} vs ours {tuple(ours[name].shape)}")
            continue
        out[name] = value.contiguous()
    missing = sorted(set(ours) - set(out))
    if missing:
        problems.append(f"parameters of ours not found in the official state dict: {missing[:8]}"
                        + (f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""))
    if problems:
        raise ValueError("the official state dict does not match this architecture (check the settings, e.g. "
                         "--model_preset / nf / ch_mult / num_res_blocks / attn_resolutions / progressive_input / "
                         "embedding_type / out_ch):\n  " + "\n  ".join(problems[:20]))
    return out
