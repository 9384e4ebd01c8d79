"""Channel-stacked states ``z = [z_1; ...; z_k]`` and the k×k matrices that act on them.

A state with ``k`` components over data of ``C`` channels is a tensor ``[B, k*C, *spatial]`` whose
channel axis holds component 1 (the data x) first, then component 2 (the momentum m), and so on.
A ``k×k`` matrix M acts as ``M ⊗ I_d``. This module is the one place where that layout is known.
"""
from __future__ import annotations

import torch

__all__ = ["apply", "lift", "project"]


def _check(z: torch.Tensor, k: int, name: str):
    if z.ndim < 2 or z.shape[1] % k != 0:
        raise ValueError(
            f"`{name}` must have shape [batch, {k}*C, ...] ({k} stacked components); got {tuple(z.shape)}"
        )


def apply(mat: torch.Tensor, z: torch.Tensor, name: str = "sample") -> torch.Tensor:
    """Return ``(M ⊗ I) z`` for ``M`` of shape ``[k, k]`` (shared) or ``[B, k, k]`` (per sample).

    The matrix is cast to ``z.dtype``; the product is computed in that dtype.
    """
    k = mat.shape[-1]
    _check(z, k, name)
    b = z.shape[0]
    zz = z.reshape(b, k, -1)
    m = mat.to(device=z.device, dtype=z.dtype)
    out = torch.einsum("ij,bjn->bin", m, zz) if m.ndim == 2 else torch.einsum("bij,bjn->bin", m, zz)
    return out.reshape(z.shape)


def lift(x: torch.Tensor, k: int, aux: torch.Tensor | None = None) -> torch.Tensor:
    """Stack data ``x`` ``[B, C, ...]`` with auxiliary components (zeros by default) to ``[B, kC, ...]``."""
    if aux is None:
        aux = x.new_zeros((x.shape[0], (k - 1) * x.shape[1], *x.shape[2:]))
    return torch.cat([x, aux], dim=1)


def project(z: torch.Tensor, k: int) -> torch.Tensor:
    """The data half (component 1) of a stacked state."""
    _check(z, k, "sample")
    return z[:, : z.shape[1] // k]
