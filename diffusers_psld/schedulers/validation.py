r"""Argument checks shared by every scheduler of the package (issue #13 §4-5: a bad input gets a clear
error naming the argument; NumPy scalars are numbers).

* :func:`check_real` — a finite real number (Python or NumPy scalar), optionally bounded.
* :func:`check_steps` — ``num_inference_steps``: an integer (``np.int64`` too) in [2, ``MAX_INFERENCE_STEPS``].
* :func:`check_float_tensor` — a floating-point ``torch.Tensor`` (not an integer/bool tensor, NumPy array or None).
* :func:`check_generator` — ``None``, a ``torch.Generator`` or a list of them (one per batch element).
* :func:`timestep_value` — a scheduler timestep (number, NumPy scalar, or tensor of identical values) as a float.
* :func:`plain_config_values` — NumPy scalars in a config replaced by Python numbers (JSON-serialisable).
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import numpy as np
import torch

__all__ = ["MAX_INFERENCE_STEPS", "MAX_QUADRATURE_NODES", "TIME_SCALE_RANGE", "SIGMA_DATA_RANGE", "check_real",
           "check_steps", "check_float_tensor", "check_finite", "check_batch", "check_quadrature_nodes",
           "check_generator", "check_state_shape", "check_float_dtype", "timestep_value", "plain_config_values"]

#: Upper bound of ``num_inference_steps``. ``scheduler.timesteps`` is float32 (devices without float64), whose
#: resolution near t = 1 is 6e-8: at 1e5 uniform steps (spacing 1e-5) the entries stay distinct and the
#: index-by-timestep lookup unambiguous, and the float64 step tables stay small (~10 MB); beyond that the run
#: would be hours of model calls without any accuracy gain measured here (every sampler has converged to its
#: limit by NFE 1000, see the README).
MAX_INFERENCE_STEPS = 100_000

#: Upper bound of ``quadrature_nodes`` (Gauss–Legendre per piece, pieces with u_hi/u_lo <= 2): the float64
#: coefficients have converged to rounding by the defaults (16-24 nodes, see the samplers' accuracy tests); more
#: nodes only cost set-up time (the node count is a factor of every ``set_timesteps``).
MAX_QUADRATURE_NODES = 64

#: Range of ``time_scale``: the UNet receives t · time_scale in float32 for t in [sampling_eps, 1]; below 1e-6 the
#: whole schedule maps to < 1e-6 (the sinusoidal embedding cannot tell the times apart), above 1e9 the largest
#: model time nears float32's exact-integer limit many times over and the embedding aliases (1000 is standard).
TIME_SCALE_RANGE = (1e-6, 1e9)

#: Range of ``sigma_data`` (the data's per-pixel std for ``input_preconditioning``): c_in = (Σ_t + σ_d² a aᵀ)^{-1/2}
#: is computed in float64 and applied in float32; σ_d² must stay well inside float32 (1e±12) for c_in z to be
#: finite and non-zero (σ_d = 1e30 gives NaN), and data scaled by more than 1e6 (or less than 1e-6) is a units error.
SIGMA_DATA_RANGE = (1e-6, 1e6)


def check_real(value, name: str, low: Optional[float] = None, strict: bool = False,
               high: Optional[float] = None) -> float:
    """A finite real number (``bool`` refused), optionally ``>= low`` (``> low`` if ``strict``) and ``<= high``;
    ``ValueError`` naming ``name`` otherwise."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (numbers.Real, np.floating, np.integer)):
        raise ValueError(f"`{name}` must be a real number, got {value!r}")
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"`{name}` must be finite, got {value!r}")
    if low is not None and (v <= low if strict else v < low):
        raise ValueError(f"`{name}` must be {'>' if strict else '>='} {low}, got {value!r}")
    if high is not None and v > high:
        raise ValueError(f"`{name}` must be <= {high}, got {value!r}")
    return v


def check_steps(n) -> int:
    """``num_inference_steps`` as a Python int in [2, MAX_INFERENCE_STEPS] (NumPy integers accepted)."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (numbers.Integral, np.integer)):
        raise ValueError(f"`num_inference_steps` must be an int >= 2 (N - 1 reverse steps + 1 final denoising step), "
                         f"got {n!r}")
    n = int(n)
    if n < 2:
        raise ValueError(f"`num_inference_steps` must be an int >= 2 (N - 1 reverse steps + 1 final denoising step), "
                         f"got {n}")
    if n > MAX_INFERENCE_STEPS:
        raise ValueError(f"`num_inference_steps` must be <= {MAX_INFERENCE_STEPS} (float32 timesteps stay distinct, and "
                         f"every sampler here has converged by ~1000 model calls), got {n}")
    return n


def check_float_tensor(x, name: str) -> torch.Tensor:
    """``x`` must be a floating-point ``torch.Tensor``: ``TypeError`` naming ``name`` otherwise (an integer or bool
    tensor would silently truncate the state; a NumPy array has no device)."""
    if not isinstance(x, torch.Tensor):
        hint = " (convert it with torch.from_numpy(...).float())" if isinstance(x, np.ndarray) else ""
        raise TypeError(f"`{name}` must be a floating-point torch.Tensor, got {type(x).__name__}{hint}")
    if not torch.is_floating_point(x):
        raise TypeError(f"`{name}` must be a floating-point tensor (float16/bfloat16/float32/float64), got dtype {x.dtype}")
    return x


def check_finite(x: torch.Tensor, name: str) -> torch.Tensor:
    """``ValueError`` naming ``name`` if the tensor ``x`` has a NaN or infinite entry."""
    if not bool(torch.isfinite(x).all()):
        raise ValueError(f"`{name}` has non-finite entries (NaN or inf); pass finite values")
    return x


def check_batch(x: torch.Tensor, name: str) -> torch.Tensor:
    """``ValueError`` naming ``name`` if the tensor ``x`` has no batch axis or a batch of 0."""
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError(f"`{name}` has a batch of 0 (shape {tuple(x.shape)}); pass at least one sample")
    return x


def check_state_shape(shape, k: int, name: str = "shape") -> tuple:
    """A state shape ``[B, k*C, ...]`` of positive ints (NumPy integers and ``torch.Size`` accepted), as a tuple."""
    try:
        dims = tuple(shape)
    except TypeError as err:
        raise ValueError(f"`{name}` must be [B, {k}*C, ...] (a sequence of positive ints), got {shape!r}") from err
    if len(dims) < 2 or any(isinstance(d, (bool, np.bool_)) or not isinstance(d, (numbers.Integral, np.integer))
                            or d < 1 for d in dims) or dims[1] % k:
        raise ValueError(f"`{name}` must be [B, {k}*C, ...] with positive int sizes ({k} stacked components), got {shape!r}")
    return tuple(int(d) for d in dims)


def check_float_dtype(dtype, name: str = "dtype") -> torch.dtype:
    """A real floating-point ``torch.dtype`` (float16/bfloat16/float32/float64)."""
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"`{name}` must be a floating-point torch.dtype (e.g. torch.float32), got {dtype!r}")
    return dtype


def check_quadrature_nodes(q) -> int:
    """``quadrature_nodes``: an int (NumPy integers accepted) in [4, ``MAX_QUADRATURE_NODES``]."""
    if isinstance(q, (bool, np.bool_)) or not isinstance(q, (numbers.Integral, np.integer)) \
            or not 4 <= int(q) <= MAX_QUADRATURE_NODES:
        raise ValueError(f"`quadrature_nodes` must be an int in [4, {MAX_QUADRATURE_NODES}] (float64 Gauss–Legendre "
                         f"has converged well before; more nodes only cost set-up time), got {q!r}")
    return int(q)


def check_generator(generator, batch_size: int):
    """``None``, a ``torch.Generator``, or a list/tuple of ``batch_size`` (or 1) generators."""
    if generator is None or isinstance(generator, torch.Generator):
        return generator
    if isinstance(generator, (list, tuple)):
        if not all(isinstance(g, torch.Generator) for g in generator):
            bad = next(type(g).__name__ for g in generator if not isinstance(g, torch.Generator))
            raise TypeError(f"`generator` must be a torch.Generator or a list of torch.Generator, got a list containing {bad}")
        if len(generator) not in (1, batch_size):
            raise ValueError(f"`generator` is a list of {len(generator)} generators; it must have one per batch element "
                             f"({batch_size})")
        return list(generator)
    raise TypeError(f"`generator` must be None, a torch.Generator or a list of torch.Generator (one per batch element), "
                    f"got {type(generator).__name__} {generator!r}; use torch.Generator().manual_seed(seed)")


def timestep_value(timestep, name: str = "timestep", upper: float = 1.0) -> float:
    """A timestep (Python/NumPy number, or a tensor whose entries are all equal) as a finite float in [0, ``upper``]
    (``upper=math.inf`` where a time past the schedule is legitimate, e.g. an adaptive ODE solver's trial stage)."""
    if isinstance(timestep, torch.Tensor):
        if timestep.numel() == 0:
            raise ValueError(f"`{name}` is an empty tensor; pass an entry of `scheduler.timesteps`")
        if timestep.dtype == torch.bool or timestep.is_complex():
            raise TypeError(f"`{name}` must be a real forward time, got a {timestep.dtype} tensor")
        flat = timestep.detach().reshape(-1)
        if flat.numel() > 1 and bool((flat != flat[0]).any()):
            raise ValueError(f"`{name}` must be one time for the whole batch (its entries differ)")
        value = float(flat[0])
    elif isinstance(timestep, (bool, np.bool_)) or not isinstance(timestep, (numbers.Real, np.floating, np.integer)):
        raise TypeError(f"`{name}` must be a forward time in [0, 1] taken from `scheduler.timesteps` (a number or a "
                        f"tensor), got {type(timestep).__name__} {timestep!r}")
    else:
        value = float(timestep)
    if not math.isfinite(value) or not 0.0 <= value <= upper:
        rng = "[0, 1] taken from `scheduler.timesteps`" if upper == 1.0 else f"[0, {upper}]"
        raise ValueError(f"`{name}` must be a finite forward time in {rng}, got {value!r}")
    return value


def plain_config_values(config) -> dict:
    """The entries of ``config`` that are NumPy scalars, as Python numbers (so the config stays JSON-serialisable)."""
    return {k: v.item() for k, v in dict(config).items() if isinstance(v, np.generic)}
