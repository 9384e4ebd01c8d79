"""Exact "networks" of Gaussian-mixture data behind the call signatures of trained ones (tests only).

Each is a ``torch.nn.Module`` with a ``config`` (``in_channels``, ``out_channels``, ``sample_size``), a float64
``dtype`` and ``forward(sample, timestep, class_labels=None)`` returning ``.sample``; its output is the exact optimum of
its training loss, computed by the score route of :class:`diffusers_psld.exact.GaussianMixture` (Tweedie through
``∇ log p``), never through a denoiser. Images ``[B, C, H, W]`` are read as vectors of d = C·H·W dimensions.
"""
from types import SimpleNamespace

import torch

from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sde import RecipeSDE
from diffusers_psld.sde.recipe import HSMKernel


class Out(SimpleNamespace):
    pass


class KernelSDE:
    """A k = 1 "SDE" whose kernel is given directly (x = a x₀ + √var ε); ``GaussianMixture.eps`` reads only this."""

    k = 1

    def __init__(self, a: float, var: float):
        a_t = torch.tensor([a], dtype=torch.float64)
        v = torch.tensor([[var]], dtype=torch.float64)
        self.kern = HSMKernel(mean_coef=a_t, cov=v, chol=v.sqrt())

    def hsm_kernel(self, t):
        return self.kern


def vp_eps(data: GaussianMixture, x: torch.Tensor, abar: float) -> torch.Tensor:
    """Exact VP ε at x (``[B, d]``) for ᾱ = ``abar``: ``-√(1-ᾱ) ∇ log p(x)`` (score route)."""
    return data.eps(KernelSDE(abar ** 0.5, 1.0 - abar), x, 0.0)


class _Exact(torch.nn.Module):
    dtype = torch.float64

    def __init__(self, data: GaussianMixture, channels: int, out_channels: int, size: int, num_class_embeds=None):
        super().__init__()
        self.data = data
        self.config = SimpleNamespace(in_channels=channels, out_channels=out_channels, sample_size=size,
                                      num_class_embeds=num_class_embeds)
        self.calls = []

    def _per_time(self, x, times, fn):
        """Apply ``fn(x_rows [n, ...], time)`` per distinct time of ``times`` ``[B]``."""
        out = torch.empty_like(x)
        for tv in torch.unique(times):
            rows = times == tv
            out[rows] = fn(x[rows], float(tv))
        return out


class ExactDiscreteVPNet(_Exact):
    """The exact network of a DDPM schedule ``alphas_cumprod``: ε, v or x̂₀ at x_τ = √ᾱ_τ x₀ + √(1-ᾱ_τ) ε.

    ``continuation`` says what a fractional τ means: ``"log_sigma"`` (log σ linear between table entries: the
    discrete wrapper's own assumption, so it is exact there) or a callable τ ↦ ᾱ(τ)."""

    def __init__(self, data, alphas_cumprod, prediction_type="epsilon", channels=1, size=None, continuation="log_sigma"):
        size = size or int(round((data.d // channels) ** 0.5))
        super().__init__(data, channels, channels, size)
        self.ac = alphas_cumprod.to(torch.float64)
        self.log_sigma = 0.5 * (torch.log1p(-self.ac) - torch.log(self.ac))
        self.prediction_type = prediction_type
        self.continuation = continuation

    def abar(self, tau: float) -> float:
        if callable(self.continuation):
            return float(self.continuation(tau))
        lo = min(int(tau), len(self.ac) - 2)
        w = tau - lo
        ls = (1 - w) * self.log_sigma[lo] + w * self.log_sigma[lo + 1]
        return float(1.0 / (1.0 + torch.exp(2 * ls)))

    def forward(self, sample, timestep, class_labels=None):
        B = sample.shape[0]
        tau = timestep.detach().to(torch.float64).reshape(-1).expand(B)
        self.calls.append(tau.clone())

        def fn(xs, tv):
            ab = self.abar(tv)
            x = xs.reshape(xs.shape[0], -1).to(torch.float64)
            eps = vp_eps(self.data, x, ab)
            if self.prediction_type == "epsilon":
                out = eps
            else:
                x0 = (x - (1 - ab) ** 0.5 * eps) / ab ** 0.5
                out = x0 if self.prediction_type == "sample" else ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0
            return out.reshape(xs.shape)

        return Out(sample=self._per_time(sample.to(torch.float64), tau, fn))


class ExactContinuousVPNet(_Exact):
    """The exact ε-network of the VP-SDE (β_min, β_max) with time input t · ``time_scale``."""

    def __init__(self, data, beta_min=0.1, beta_max=20.0, time_scale=1000.0, channels=1, size=None):
        size = size or int(round((data.d // channels) ** 0.5))
        super().__init__(data, channels, channels, size)
        self.sde = RecipeSDE.vp(beta_min, beta_max)
        self.time_scale = time_scale

    def forward(self, sample, timestep, class_labels=None):
        B = sample.shape[0]
        t = (timestep.detach().to(torch.float64) / self.time_scale).reshape(-1).expand(B)
        self.calls.append(t.clone())
        fn = lambda xs, tv: self.data.eps(self.sde, xs.reshape(xs.shape[0], -1).to(torch.float64), tv).reshape(xs.shape)  # noqa: E731
        return Out(sample=self._per_time(sample.to(torch.float64), t, fn))


class ExactRecipeNet(_Exact):
    """The exact network of a package scheduler (any recipe, ``prediction_type`` and input preconditioning): the
    state ``[B, k*C, H, W]`` (or its preconditioned c_in z) at model time t · time_scale → the scheduler's output.

    ``garbage_eps_x``: replace ε_x by noise before the output map (what an untrained ε_x of CLD looks like)."""

    def __init__(self, data, scheduler, channels=1, size=None, garbage_eps_x=False):
        size = size or int(round((data.d // channels) ** 0.5))
        k = scheduler.num_components
        super().__init__(data, k * channels, scheduler.output_channels(channels), size)
        self.sched = scheduler
        self.garbage_eps_x = garbage_eps_x

    def forward(self, sample, timestep, class_labels=None):
        sched, B = self.sched, sample.shape[0]
        t = (timestep.detach().to(torch.float64) / sched.config.time_scale).reshape(-1).expand(B)
        self.calls.append(t.clone())
        k = sched.num_components
        outs = []
        for i in range(B):
            ti = float(t[i])
            zi = sample[i: i + 1].to(torch.float64)
            if sched.config.input_preconditioning:  # undo c_in(t): the network sees c_in z
                kern = sched.sde.hsm_kernel(ti)
                from diffusers_psld import parameterization as P

                c_in = P.input_scaling(kern.mean_coef, kern.cov, sched.config.sigma_data)
                from diffusers_psld.sde import blocks

                zi = blocks.apply(torch.linalg.inv(c_in), zi)
            eps = self.data.eps(sched.sde, zi.reshape(1, -1), ti).reshape(zi.shape)
            if self.garbage_eps_x:
                C = zi.shape[1] // k
                eps = eps.clone()
                eps[:, :C] = torch.randn_like(eps[:, :C]) * 3.0
            outs.append(sched.eps_to_model_output(eps, zi, torch.tensor([ti], dtype=torch.float64)))
        return Out(sample=torch.cat(outs))
