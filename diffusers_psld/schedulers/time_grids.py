r"""Time grids of the schedulers: small pure functions returning descending float64 forward times.

* :func:`time_grid` — the shared ``striding`` option: uniform or quadratic in t, from 1 to ``eps``.
"""
from __future__ import annotations

import torch

__all__ = ["STRIDINGS", "time_grid"]

STRIDINGS = ("uniform", "quadratic")


def time_grid(n: int, eps: float, striding: str) -> torch.Tensor:
    """``n + 1`` descending float64 forward times from 1 to ``eps`` (uniform or quadratic)."""
    frac = (n - torch.arange(n + 1, dtype=torch.float64)) / n  # 1 → 0
    if striding == "uniform":
        grid = eps + (1.0 - eps) * frac
    elif striding == "quadratic":
        grid = eps + (1.0 - eps) * frac ** 2
    else:
        raise ValueError(f"`striding` must be one of {STRIDINGS}, got {striding!r}")
    grid[0], grid[-1] = 1.0, eps  # exact end points
    return grid
