r"""Argument checks and input preparation shared by :class:`PSLDPipeline` and :class:`PSLDImg2ImgPipeline`.

Every function raises a ``ValueError`` (wrong value) or ``TypeError`` (wrong type) whose message names the
argument, what was received and what is expected. NumPy scalars (``np.int64`` steps or batch sizes,
``np.float32`` scales) are accepted wherever a Python number is; ``bool`` is never taken for a number.
Images are validated *before* any network work, so a bad size fails in milliseconds, not deep in the UNet.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import PIL.Image
import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

__all__ = [
    "OUTPUT_TYPES", "as_int", "as_real", "check_generator", "check_output_type", "check_guidance_scale",
    "downsample_factor", "check_spatial_size", "prepare_image", "prepare_mask", "prepare_labels", "check_latents",
    "check_bool", "check_batch_memory", "pil_to_array", "SIZE_WARN_FACTOR", "MAX_SIZE_FACTOR",
]

OUTPUT_TYPES = ("pil", "np", "pt")
#: sizes beyond this factor of the UNet's ``sample_size`` (either way) get a warning: the network never saw
#: them, and the cost grows with the pixel count (a 2048² image on an 8 px model ran for 14 min)
SIZE_WARN_FACTOR = 4
#: default bound (per side) on an image / ``latents`` size relative to the UNet's ``sample_size``; larger is refused
#: unless the pipeline's ``max_size_factor`` is raised or set to None. A step costs more than the pixel ratio
#: (attention is quadratic in pixels): measured on CPU, one forward pass of the ``digits`` preset (16 px) took
#: 0.05 s at 16², 4.8 s at 8x (128²) and 61 s at 16x (256²); at 2048² it would run for hours per image.
MAX_SIZE_FACTOR = 8


def as_int(value, name: str, minimum: int) -> int:
    """``value`` as an ``int >= minimum`` (Python or NumPy integer; not bool, not float)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int >= {minimum}, got {type(value).__name__} {value!r}")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}, got {value}")
    return value


def as_real(value, name: str) -> float:
    """``value`` as a finite float (Python or NumPy real; not bool)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {type(value).__name__} {value!r}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {value}")
    return value


def check_bool(value, name: str) -> bool:
    """``value`` must be a bool (Python or NumPy); ``"no"``, ``0`` or ``None`` are refused, not read as truthy/falsy."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be True or False, got {type(value).__name__} {value!r}")
    return bool(value)


def available_memory(device="cpu") -> Optional[int]:
    """Bytes that can still be allocated on ``device``: CUDA ``mem_get_info``; CPU: Linux ``MemAvailable``
    (``/proc/meminfo``: free pages plus reclaimable page cache; plain free pages, ``SC_AVPHYS_PAGES``, can be
    near 0 on a healthy machine whose memory holds cache), else ``SC_AVPHYS_PAGES * SC_PAGE_SIZE``; None where
    unknown (callers then skip their memory check)."""
    dev = torch.device(device)
    try:
        if dev.type == "cuda":
            return int(torch.cuda.mem_get_info(dev)[0])
        if dev.type == "cpu":
            try:
                with open("/proc/meminfo") as f:
                    for line in f:
                        if line.startswith("MemAvailable:"):
                            return int(line.split()[1]) * 1024
            except OSError:
                pass
            return int(os.sysconf("SC_PAGE_SIZE")) * int(os.sysconf("SC_AVPHYS_PAGES"))
    except (AttributeError, ValueError, OSError, RuntimeError):
        return None
    return None


def check_batch_memory(batch_size: int, channels: int, hw: Tuple[int, int], device) -> None:
    """Refuse a ``batch_size`` whose float32 state ``[batch_size, channels, H, W]`` alone exceeds the free memory
    of ``device`` (``available_memory``; skipped where unknown), before anything of that size is allocated.
    Sampling needs several such copies plus the network's activations, so passing this check is necessary, not
    sufficient."""
    need = int(batch_size) * int(channels) * int(hw[0]) * int(hw[1]) * 4
    free = available_memory(device)
    if free is not None and need > free:
        raise ValueError(
            f"`batch_size`={batch_size} needs {need / 2**30:.3g} GiB for the sampling state alone "
            f"([{batch_size}, {channels}, {hw[0]}, {hw[1]}] float32) but {torch.device(device)} has "
            f"{free / 2**30:.3g} GiB free; sample in smaller batches"
        )


_ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
_16BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N")


def pil_to_array(im: PIL.Image.Image, mode: str, name: str) -> np.ndarray:
    """One PIL image → float32 ``[H, W]`` (``mode`` "L") or ``[H, W, C]`` ("RGB" / "RGBA") in [0, 1], by bit depth:

    * 8-bit modes ("L", "RGB", "P", "1", ...): converted with PIL, divided by 255;
    * 16-bit ("I;16", "I;16B", "I;16L", "I;16N"): divided by 65535;
    * "I" (32-bit int; how PIL opens many 16-bit PNGs): read as 16-bit data -- values must lie in [0, 65535]
      and are divided by 65535; other values are refused (ValueError), never clipped;
    * "F" (float): values must lie in [0, 1], used as they are;
    * an alpha channel (RGBA, LA, PA, or a palette / image with transparency) for a target without one is
      refused (ValueError: drop or composite the alpha channel first) instead of being silently dropped.
    """
    has_alpha = im.mode in _ALPHA_MODES or "transparency" in im.info
    if has_alpha and mode != "RGBA":
        raise ValueError(
            f"`{name}` is a PIL image with an alpha channel (mode {im.mode!r}); this input takes mode {mode!r} without "
            f"alpha, which would silently drop it: drop the alpha channel first, e.g. image.convert({mode!r}), or "
            f"composite it onto a background"
        )
    if im.mode in _16BIT_MODES or im.mode in ("I", "F"):
        arr = np.asarray(im).astype(np.float64)
        lo, hi = (0.0, 65535.0) if im.mode != "F" else (0.0, 1.0)
        if not np.isfinite(arr).all() or arr.min() < lo or arr.max() > hi:
            what = "float ('F') values" if im.mode == "F" else f"mode {im.mode!r} (read as 16-bit) values"
            raise ValueError(
                f"`{name}`: PIL {what} must lie in [{lo:g}, {hi:g}], got range [{arr.min():.6g}, {arr.max():.6g}]"
            )
        if im.mode != "F":
            arr = arr / 65535.0
        arr = arr.astype(np.float32)
        if mode == "RGB":
            arr = np.repeat(arr[..., None], 3, axis=-1)
        elif mode == "RGBA":
            arr = np.concatenate([np.repeat(arr[..., None], 3, axis=-1), np.ones_like(arr)[..., None]], axis=-1)
        return arr
    return np.asarray(im.convert(mode), dtype=np.float32) / 255.0


def check_generator(generator, batch_size: int):
    """``None``, one ``torch.Generator`` or a list/tuple of ``batch_size`` generators (one per sample)."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        bad = [type(g).__name__ for g in generator if not isinstance(g, torch.Generator)]
        if bad:
            raise TypeError(f"`generator` list entries must be torch.Generator objects, got {bad}")
        if len(generator) != batch_size:
            raise ValueError(f"`generator` list must have batch_size={batch_size} entries, got {len(generator)}")
        return list(generator)
    raise TypeError(
        f"`generator` must be a torch.Generator or a list of batch_size of them, got {type(generator).__name__} "
        f"{generator!r}; e.g. generator=torch.Generator().manual_seed(42)"
    )


def check_output_type(output_type) -> str:
    if output_type not in OUTPUT_TYPES:
        raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
    return output_type


def check_guidance_scale(guidance_scale) -> Optional[float]:
    """``None`` or a finite number in [0, 1e6]. Larger scales only overflow (1e20 gave all-black images)."""
    if guidance_scale is None:
        return None
    scale = as_real(guidance_scale, "guidance_scale")
    if not 0.0 <= scale <= 1e6:
        raise ValueError(f"`guidance_scale` must be a finite number in [0, 1e6], got {guidance_scale!r}")
    return scale


def downsample_factor(unet) -> int:
    """Spatial factor the UNet's input size must be divisible by (2 per down block that downsamples)."""
    down = getattr(unet.config, "down_block_types", None)
    return 2 ** (len(down) - 1) if down else 1


def check_spatial_size(hw: Tuple[int, int], unet, name: str, max_factor: Optional[float] = MAX_SIZE_FACTOR) -> None:
    """``hw`` must be positive, divisible by the UNet's downsampling factor and at most ``max_factor`` times its
    ``sample_size`` per side (``None``: no bound); warn beyond :data:`SIZE_WARN_FACTOR` either way.

    Raises:
        ValueError: naming the size, the bound and the override (the pipeline's ``max_size_factor``).
    """
    H, W = hw
    if H < 1 or W < 1:
        raise ValueError(f"`{name}` is empty: spatial size {H}x{W}")
    f = downsample_factor(unet)
    if H % f or W % f:
        raise ValueError(
            f"`{name}` size {H}x{W} must be divisible by {f} (the UNet downsamples {int(math.log2(f))} times); "
            f"resize or pad it, e.g. to {max(f, H // f * f)}x{max(f, W // f * f)}"
        )
    size = unet.config.sample_size
    sh, sw = (size, size) if isinstance(size, int) else tuple(size)
    if max_factor is not None and max(H / sh, W / sw) > max_factor:
        raise ValueError(
            f"`{name}` size {H}x{W} is {max(H / sh, W / sw):.3g}x the UNet's sample_size {sh}x{sw} per side, beyond the "
            f"bound of {max_factor:g}x: every step would cost over {max(H / sh, W / sw) ** 2:.0f}x a {sh}x{sw} step "
            f"(attention grows faster), minutes to hours per image on a CPU. Resize the image, or lift the bound with "
            f"`pipe.max_size_factor = None` (or a larger number)")
    if max(H / sh, W / sw) > SIZE_WARN_FACTOR or min(H / sh, W / sw) < 1 / SIZE_WARN_FACTOR:
        logger.warning(
            f"`{name}` size {H}x{W} is far from the UNet's sample_size {sh}x{sw}: the network was not trained at this "
            f"size (quality unknown) and the cost grows with the pixel count"
        )


def prepare_image(image, data_channels: int, batch_size: int, device, name: str = "image") -> torch.Tensor:
    """``image`` (PIL / list of PIL / NumPy ``[H,W]``, ``[H,W,C]``, ``[B,H,W,C]`` / tensor ``[C,H,W]``,
    ``[B,C,H,W]``, values in [0, 1]; uint8 NumPy in [0, 255]) → float32 ``[batch_size, C, H, W]`` in [-1, 1].
    PIL images are read by bit depth (:func:`pil_to_array`: 16-bit / "I" / "F" modes are scaled or range-checked,
    alpha is refused for a model without an alpha channel), never clipped."""
    C = data_channels
    if isinstance(image, PIL.Image.Image):
        image = [image]
    if isinstance(image, (list, tuple)) and len(image) and all(isinstance(im, PIL.Image.Image) for im in image):
        mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(C)
        if mode is None:
            raise ValueError(f"`{name}` as PIL needs a 1/3/4-channel model; this model has C={C}; pass a tensor")
        if len({im.size for im in image}) > 1:
            raise ValueError(f"`{name}` images must all have the same size, got {[im.size for im in image]}")
        image = np.stack([pil_to_array(im, mode, name) for im in image])
        if image.ndim == 3:
            image = image[..., None]
    if isinstance(image, np.ndarray):
        arr = image
        if arr.dtype == np.uint8:
            arr = arr.astype(np.float32) / 255.0
        elif not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"`{name}` as a NumPy array must be float in [0, 1] or uint8, got dtype {arr.dtype}")
        if arr.ndim == 2:
            arr = arr[None, :, :, None]
        elif arr.ndim == 3:
            arr = arr[None]
        if arr.ndim != 4:
            raise ValueError(f"`{name}` as a NumPy array must be [H, W], [H, W, C] or [B, H, W, C], got shape {image.shape}")
        tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
    elif isinstance(image, torch.Tensor):
        if not image.is_floating_point():
            raise TypeError(f"`{name}` as a tensor must be floating point in [0, 1], got dtype {image.dtype}")
        tensor = image.detach().to("cpu", torch.float32)
        if tensor.ndim == 3:
            tensor = tensor[None]
        if tensor.ndim != 4:
            raise ValueError(f"`{name}` as a tensor must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
    else:
        raise TypeError(f"`{name}` must be a PIL image, a list of them, a NumPy array or a tensor; got {type(image).__name__}")
    if tensor.numel() == 0:
        raise ValueError(f"`{name}` is empty (shape {tuple(tensor.shape)} as [B, C, H, W])")
    if tensor.shape[1] != C:
        raise ValueError(f"`{name}` must have {C} channel(s) (the model's data channels), got {tensor.shape[1]} (shape {tuple(tensor.shape)})")
    if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
        raise ValueError(f"`{name}` values must lie in [0, 1], got range [{tensor.min().item():.4g}, {tensor.max().item():.4g}]")
    if tensor.shape[0] not in (1, batch_size):
        raise ValueError(f"`{name}` must hold 1 or batch_size={batch_size} images, got {tensor.shape[0]}")
    check_batch_memory(batch_size, C, tuple(tensor.shape[-2:]), device)  # before the batch copy below
    return tensor.expand(batch_size, -1, -1, -1).to(device) * 2.0 - 1.0


def prepare_mask(mask_image, image: torch.Tensor, device) -> torch.Tensor:
    """``mask_image`` → float32 {0, 1} tensor ``[B, 1, H, W]`` (1 = keep), binarised at 0.5."""
    if isinstance(mask_image, PIL.Image.Image):
        mask_image = [mask_image]
    if isinstance(mask_image, (list, tuple)) and len(mask_image) and all(isinstance(m, PIL.Image.Image) for m in mask_image):
        mask_image = np.stack([pil_to_array(m, "L", "mask_image") for m in mask_image])
    if isinstance(mask_image, np.ndarray):
        arr = mask_image.astype(np.float32) / 255.0 if mask_image.dtype == np.uint8 else mask_image
        if not np.issubdtype(arr.dtype, np.floating):
            raise TypeError(f"`mask_image` as a NumPy array must be float in [0, 1] or uint8, got dtype {mask_image.dtype}")
        mask = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
        if mask.ndim == 4 and mask.shape[-1] == 1:  # [B, H, W, 1]
            mask = mask.permute(0, 3, 1, 2)
    elif isinstance(mask_image, torch.Tensor):
        mask = mask_image.detach().to("cpu", torch.float32)
    else:
        raise TypeError(f"`mask_image` must be a PIL image, a list of them, a NumPy array or a tensor; got {type(mask_image).__name__}")
    if mask.ndim == 2:
        mask = mask[None, None]
    elif mask.ndim == 3:
        mask = mask[:, None]
    if mask.ndim != 4 or mask.shape[1] != 1:
        raise ValueError(f"`mask_image` must be [H, W], [B, H, W] or [B, 1, H, W] (one channel), got shape {tuple(mask.shape)}")
    if mask.numel() == 0:
        raise ValueError(f"`mask_image` is empty (shape {tuple(mask.shape)})")
    B, _, H, W = image.shape
    if mask.shape[-2:] != (H, W):
        raise ValueError(f"`mask_image` size {tuple(mask.shape[-2:])} does not match `image` size {(H, W)}")
    if mask.shape[0] not in (1, B):
        raise ValueError(f"`mask_image` must hold 1 or {B} masks, got {mask.shape[0]}")
    if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
        raise ValueError(f"`mask_image` values must lie in [0, 1] (1 = keep), got range [{mask.min().item():.4g}, {mask.max().item():.4g}]")
    return (mask >= 0.5).float().expand(B, -1, -1, -1).to(device)


def prepare_labels(class_labels, batch_size: int, n_classes: int, device, what: str) -> torch.Tensor:
    """``class_labels`` (int, NumPy int, list or integer tensor; 1 or ``batch_size`` entries) → long ``[B]``."""
    if isinstance(class_labels, numbers.Integral) and not isinstance(class_labels, (bool, np.bool_)):
        labels = torch.full((batch_size,), int(class_labels), dtype=torch.long)
    else:
        try:
            labels = torch.as_tensor(class_labels)
        except Exception as err:  # noqa: BLE001
            raise ValueError(f"`class_labels` must be an int, a list of ints or a tensor, got {type(class_labels).__name__}") from err
        if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim > 1:
            raise ValueError(f"`class_labels` must be integer class indices, got dtype {labels.dtype} shape {tuple(labels.shape)}")
        labels = labels.reshape(-1).long()
        if labels.numel() == 1:
            labels = labels.expand(batch_size).clone()
        if labels.numel() != batch_size:
            raise ValueError(f"`class_labels` must have 1 or batch_size={batch_size} entries, got {labels.numel()}")
    if labels.min() < 0 or labels.max() >= n_classes:
        raise ValueError(
            f"`class_labels` must be in [0, {n_classes - 1}] ({n_classes} classes of the {what}), got "
            f"{labels.min().item()}..{labels.max().item()}"
        )
    return labels.to(device)


def check_latents(latents, batch_size: int, state_channels: int, device, hw: Optional[Tuple[int, int]] = None) -> torch.Tensor:
    """The initial state ``latents`` ``[batch_size, k*C, H, W]`` (diffusers' ``latents=``), returned as float32.

    Must be a floating tensor of float32 or lower precision (the pipeline keeps its state in float32; a
    float64 tensor would be rounded, so it is refused), finite, on ``device``; ``H, W`` must equal ``hw`` when
    given (the inpainting image's size).
    """
    if not isinstance(latents, torch.Tensor):
        raise TypeError(f"`latents` must be a torch.Tensor [B, k*C, H, W], got {type(latents).__name__}")
    if latents.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(
            f"`latents` must be float32 (the pipeline's state dtype) or float16/bfloat16, got {latents.dtype}"
            + ("; cast with latents.float()" if latents.is_floating_point() else "")
        )
    if latents.ndim != 4 or latents.shape[0] != batch_size or latents.shape[1] != state_channels:
        raise ValueError(
            f"`latents` must have shape [batch_size={batch_size}, k*C={state_channels}, H, W] (the full [x ; m] state), "
            f"got {tuple(latents.shape)}"
        )
    if hw is not None and tuple(latents.shape[-2:]) != tuple(hw):
        raise ValueError(f"`latents` spatial size {tuple(latents.shape[-2:])} must match the image size {tuple(hw)}")
    dev = torch.device(device)
    if latents.device.type != dev.type or (dev.index is not None and latents.device.index != dev.index):
        raise ValueError(f"`latents` must be on the pipeline's execution device {dev}, got {latents.device}; use latents.to({str(dev)!r})")
    if not bool(torch.isfinite(latents).all()):
        raise ValueError("`latents` contains NaN or inf values")
    return latents.to(torch.float32)
