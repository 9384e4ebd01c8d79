"""Test stand-ins for PSLDPipeline: tiny UNets, an exact-ε "UNet" and an exact classifier."""
from __future__ import annotations

import math
from types import SimpleNamespace

import torch
import torch.nn as nn
from diffusers import ModelMixin, UNet2DModel
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffusers_psld.exact import GaussianMixture


def tiny_unet(data_channels=1, k=2, sample_size=8, num_class_embeds=None, seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=sample_size, in_channels=k * data_channels, out_channels=k * data_channels,
        block_out_channels=(8, 16), down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1,
        num_class_embeds=num_class_embeds,
    )


class ExactEpsUNet(ModelMixin, ConfigMixin):
    """Returns the exact ε of a GaussianMixture for states ``[B, k*C, H, W]`` (data dim d = C*H*W per
    component, flattened channel-major like ``exact.py``'s ``[B, k*d]``). Timestep = t * time_scale."""

    @register_to_config
    def __init__(self, in_channels=4, out_channels=4, sample_size=1, num_class_embeds=None, time_scale=1000.0):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.mixture = None
        self.sde = None
        self.calls = 0

    def forward(self, sample, timestep, class_labels=None):
        self.calls += 1
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) / self.config.time_scale
        B = sample.shape[0]
        k = self.sde.k
        # [B, k*C, H, W] -> [B, k, C*H*W] -> [B, k*d]
        z = sample.reshape(B, k, -1).reshape(B, -1).to(torch.float64)
        eps = self.mixture.eps(self.sde, z, t)
        return SimpleNamespace(sample=eps.reshape(sample.shape).to(sample.dtype))


class ExactClassifier(ModelMixin, ConfigMixin):
    """log p(y | z_t) of a GaussianMixture's components (y = component index), exact."""

    @register_to_config
    def __init__(self, in_channels=4, num_classes=2, time_scale=1000.0):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.mixture = None
        self.sde = None

    def forward(self, sample, timestep):
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) / self.config.time_scale
        B = sample.shape[0]
        z = sample.reshape(B, -1).to(torch.float64)
        means, covs, _ = self.mixture.marginal(self.sde, t)
        chol = torch.linalg.cholesky(covs)
        diff = z[None] - means[:, None]
        sol = torch.cholesky_solve(diff.transpose(1, 2), chol).transpose(1, 2)
        half_logdet = torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)
        logp = -0.5 * (diff * sol).sum(-1) - half_logdet[:, None] - 0.5 * z.shape[1] * math.log(2 * math.pi)
        return (logp + torch.log(self.mixture.weights)[:, None]).T.to(sample.dtype)  # [B, J]


def attach(module, mixture: GaussianMixture, scheduler):
    module.mixture = mixture
    module.sde = scheduler.sde
    return module


class LinearEpsUNet(ModelMixin, ConfigMixin):
    """ε = alpha · z (a deliberately wrong "network"; large alpha makes the implied Cov(x₀ | z_t) negative)."""

    @register_to_config
    def __init__(self, in_channels=2, out_channels=2, sample_size=1, num_class_embeds=None, alpha=1.0):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))

    def forward(self, sample, timestep, class_labels=None):
        return SimpleNamespace(sample=self.config.alpha * sample)
