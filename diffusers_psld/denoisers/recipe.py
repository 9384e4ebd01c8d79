r"""This package's own networks (PSLD, CLD, VP; every ``prediction_type``) as denoisers ``D(y; σ)``.

Given ``y = x₀ + σ n``, :class:`RecipeDenoiser` finds the forward time t with ``σ_t = σ`` (the noise level of the
sufficient statistic, :func:`diffusers_psld.parameterization.sufficient_statistic`), builds a state with the exact
conditional law of z_t given y_t,

    z = a_t y + r,      r = L_t(I - u uᵀ) ξ,  ξ ~ N(0, I_k) per pixel      (``residual="sample"``),

(r is independent of x₀ and of y, :func:`~diffusers_psld.parameterization.residual_factor`), calls the network the
way the scheduler does (``scale_model_input``, the model time ``t · time_scale``, ``model_output_to_eps``) and returns
the package's x̂₀ of that ε (:func:`~diffusers_psld.parameterization.denoised_estimator`: ``aᵀ(z - Lε)/aᵀa``; for CLD,
whose training leaves ε_x unlearned, the ε_m-only estimate). Since ``E[x₀ | z_t] = E[x₀ | y_t]``, this is exact for the
exact network whatever r is.

**Which residual a trained network needs.** ``"sample"`` (default) feeds the network states from its training law
p(z_t): the right choice for any trained network. ``"zero"`` (r = 0, z = a_t y) gives the same x̂₀ only for a network
that ignores the part of z orthogonal to the signal direction, which an exact model does but a trained one is only
approximately (it never saw r = 0 in training, where ‖r‖ grows with the pixel count); it is deterministic and
useful to check a network's consistency. Measured on a small trained PSLD digits network (paper ε): with
``"sample"`` the x̂₀ error equals the network's own on true states at every σ; with ``"zero"`` it is 1.4x larger at
σ = 0.3 and 6.7x at σ = 10 (``benchmarks/bridge_residual.py``; figures on the bridge documentation page).

Time: σ(t) increases with t for every preset (checked on a table when the wrapper is built); VP inverts in closed form
(``σ² = e^{B(t)} - 1``), the others by a bracketed Illinois iteration on log t started from a 2049-point log-σ
table, to ``|Δ log σ| ≤ 1e-14``. The state is built at the exact t(σ), also outside the training range
[t_min, 1] (t ∈ [1e-8, 2] is covered; beyond, t clamps), and only the network's time input is clamped to
[t_min, 1], as the discrete VP wrapper clamps its timestep and keeps the input scale exact.
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Literal, Optional

import torch
from diffusers import ConfigMixin, ModelMixin  # noqa: F401  (names the pipeline loader looks up here)
from diffusers.utils.torch_utils import randn_tensor

from .. import parameterization
from ..sde import RecipeSDE, blocks
from ..sde.noise_level import NoiseLevel
from .base import Denoiser, jsonable

__all__ = ["RecipeDenoiser", "RESIDUALS", "recipe_scheduler"]

RESIDUALS = ("sample", "zero")
#: the time range on which σ → t is inverted (the state is built at the exact t inside it)


def recipe_scheduler(scheduler_or_config):
    """A :class:`~diffusers_psld.PSLDScheduler` with the recipe and network settings of any scheduler of this package
    (or its config): the network-boundary methods are the same in every class. ``ValueError`` for anything else."""
    from ..schedulers import PSLDScheduler

    if isinstance(scheduler_or_config, Mapping):
        cfg = dict(scheduler_or_config)
    elif hasattr(scheduler_or_config, "num_components") and hasattr(scheduler_or_config, "config"):
        cfg = dict(scheduler_or_config.config)
    else:
        raise ValueError(f"`scheduler` must be a diffusers_psld scheduler (or its config), got {type(scheduler_or_config).__name__}")
    if "diffusion" not in cfg:
        raise ValueError("`scheduler` config has no `diffusion` key: not a diffusers_psld scheduler config")
    params = inspect.signature(PSLDScheduler.__init__).parameters
    return PSLDScheduler(**{k: v for k, v in cfg.items() if k in params and k != "sampler"})


class RecipeDenoiser(Denoiser):
    r"""A network of this package (any recipe, any ``prediction_type``, with or without input preconditioning) as a
    denoiser ``D(y; σ)`` over its C data channels (module docstring for the construction and its exactness).

    Args:
        unet: the package's network (``k*C`` input channels; output per the scheduler's ``prediction_type``).
        scheduler: the package scheduler (or its config) the network was trained with: recipe, ``prediction_type``,
            ``input_preconditioning``, ``time_scale``.
        residual: ``"sample"`` (default; the state's residual drawn from its exact conditional law) or ``"zero"``.
        residual_seed: seed of the residual's generator (None: the global generator); :meth:`manual_seed` re-seeds,
            and ``forward(..., generator=g)`` uses another generator for one call.
        t_min: the training time range's lower end (``diffusers_psld.losses.T_MIN`` = 1e-5); the network's time
            input is clamped to [t_min, 1].
        null_class: whether the last class index is the unconditional class (default: True for a class-conditional
            network, the package's convention).

    Raises:
        ValueError: ``residual`` unknown; the network's channels do not fit the scheduler (the package's message).
    """

    _input_components = None  # k, set per instance

    def __init__(self, unet=None, scheduler=None, residual: Literal["sample", "zero"] = "sample",
                 residual_seed: Optional[int] = None, t_min: float = 1e-5, null_class: Optional[bool] = None,
                 network_class: Optional[str] = None, network_config: Optional[dict] = None):
        super().__init__()
        self.register_to_config(residual=residual, residual_seed=residual_seed, t_min=t_min, null_class=null_class)
        if scheduler is None:
            raise ValueError("RecipeDenoiser needs `scheduler`: the diffusers_psld scheduler (or config) of the network")
        self._sched = recipe_scheduler(scheduler)
        cfg = dict(scheduler) if isinstance(scheduler, Mapping) else dict(scheduler.config)
        self.register_to_config(scheduler=jsonable({k: v for k, v in cfg.items() if k != "_use_default_values"}))
        if residual not in RESIDUALS:
            raise ValueError(f"`residual` must be one of {RESIDUALS}, got {residual!r}")
        if not 0 < float(t_min) < 1:
            raise ValueError(f"`t_min` must be in (0, 1), got {t_min!r}")
        self._init_network(unet, network_class, network_config)
        self._input_components = self._sched.num_components
        self._sched.check_unet(self.unet, "unet")
        if null_class is None:
            self.register_to_config(null_class=self.num_class_embeds is not None)
        self._sde = self._sched.sde
        self._mask = self._sde.eps_mask()
        self._inverse = NoiseLevel(self._sde)
        self._generator = None
        self.manual_seed(residual_seed)

    @property
    def recipe_scheduler(self):
        """The (``PSLDScheduler``) scheduler whose network boundary this wrapper uses."""
        return self._sched

    @property
    def sigma_range(self):
        s = self._inverse.sigma(torch.tensor([float(self.config.t_min), 1.0], dtype=torch.float64))
        return (float(s[0]), float(s[1]))

    def manual_seed(self, seed: Optional[int]):
        """Re-seed the residual's generator (None: draw from the global generator). Returns ``self``."""
        if seed is None:
            self._generator = None
        else:
            self._generator = torch.Generator().manual_seed(int(seed))
        return self

    def sigma_to_time(self, sigma: torch.Tensor) -> torch.Tensor:
        """The forward time t with σ_t = σ (float64; not clamped to the training range, see the module docstring)."""
        return self._inverse.time(sigma)

    def forward(self, sample, sigma, class_labels=None, generator: Optional[torch.Generator] = None):
        """As :meth:`diffusers_psld.denoisers.base.Denoiser.forward`; ``generator`` draws the residual for this call (default: the wrapper's own)."""
        self._call_generator = generator
        try:
            return super().forward(sample, sigma, class_labels)
        finally:
            self._call_generator = None

    def denoise(self, y, sigma, class_labels):
        uniq, inv = torch.unique(sigma, return_inverse=True)
        t = self._inverse.time(uniq)[inv]
        kern = self._sde.hsm_kernel(t)
        a, L = kern.mean_coef, kern.chol  # [B, k], [B, k, k]
        B, k = y.shape[0], self._input_components
        z = (a.to(device=y.device, dtype=y.dtype)[:, :, None] * y.reshape(B, 1, -1)).reshape(B, k * y.shape[1], *y.shape[2:])
        if self.config.residual == "sample" and k > 1:
            gen = getattr(self, "_call_generator", None) or self._generator
            xi = randn_tensor(tuple(z.shape), generator=gen, device=z.device, dtype=z.dtype)
            z = z + blocks.apply(parameterization.residual_factor(a, L), xi)
        net_dtype = self._network_dtype()
        inp = self._sched.scale_model_input(z, t)  # exact (input preconditioning at the state's own time)
        # only the time input is clamped; the scheduler's model time t·time_scale is computed in float64 and passed in
        # float64 to a float64 network (``model_time`` returns float32: the same value for a float32 network)
        t_net = t.clamp(float(self.config.t_min), 1.0)
        out = self._call_network(inp, t_net * float(self._sched.config.time_scale), class_labels, net_dtype)
        eps = self._sched.model_output_to_eps(out.to(z.dtype), z, t)
        x0_z, x0_e = parameterization.denoised_estimator(a, L, self._mask)
        comps = (z.reshape(B, k, -1), eps.reshape(B, k, -1))
        x0 = (torch.einsum("bj,bjn->bn", x0_z.to(device=z.device, dtype=z.dtype), comps[0])
              + torch.einsum("bj,bjn->bn", x0_e.to(device=z.device, dtype=z.dtype), comps[1]))
        return x0.reshape(y.shape)
