"""PSLDPipeline / PSLDImg2ImgPipeline with the consistent C-channel output types (issue #14 §1).

An exact "UNet" for each `prediction_type` is built here independently of the package's maps: the exact ε of a
Gaussian mixture (diffusers_psld.exact), then x̂₀ = aᵀ(z − Lε)/aᵀa or the sufficient-statistic noise uᵀε with
u = L⁻¹a/‖L⁻¹a‖, from the float64 HSM kernel; with `input_preconditioning` it first undoes c_in(t) =
(Σ + σ² a aᵀ)^{-1/2}, computed here by an eigendecomposition. The exact ε is consistent, and so are the exact
guided / conditional scores (they depend on z only through the per-pixel sufficient statistic), so every pipeline
mode must give the same images as the pipeline driven by the exact k*C ε — up to float32 arithmetic.
"""
from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffusers_psld import GDDIMMultistepScheduler, PSLDImg2ImgPipeline, PSLDPipeline, PSLDScheduler, SSCSScheduler
from diffusers_psld.exact import GaussianMixture

from _pipeline_stubs import ExactClassifier, ExactEpsUNet, attach

MEANS = torch.tensor([[-0.5, -0.2, 0.1, 0.3], [0.5, 0.2, -0.2, 0.0]], dtype=torch.float64)
COVS = torch.stack([0.02 * torch.eye(4, dtype=torch.float64) + 0.005, 0.015 * torch.eye(4, dtype=torch.float64)])
MIX = GaussianMixture([0.6, 0.4], MEANS, COVS)
SIGMA_DATA = 0.45


def _sqrtm_inv(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return v @ torch.diag(w.rsqrt()) @ v.T


class ExactOutputUNet(ModelMixin, ConfigMixin):
    """The exact network output of ``prediction_type`` for states ``[B, k*C, 1, 4]`` (C = 1)."""

    @register_to_config
    def __init__(self, in_channels=2, out_channels=1, sample_size=(1, 4), num_class_embeds=None, time_scale=1000.0,
                 prediction_type="sample", sigma_data=None):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(1))
        self.sde = None

    def forward(self, sample, timestep, class_labels=None):
        t = float(torch.as_tensor(timestep).reshape(-1)[0]) / self.config.time_scale
        B, k = sample.shape[0], self.sde.k
        kern = self.sde.hsm_kernel(torch.tensor([t], dtype=torch.float64))
        a, cov, L = kern.mean_coef[0], kern.cov[0], kern.chol[0]
        y = sample.reshape(B, k, -1).to(torch.float64)  # [B, k, d]
        if self.config.sigma_data is not None:  # the network saw c_in z: undo it
            c_in = _sqrtm_inv(cov + self.config.sigma_data ** 2 * torch.outer(a, a))
            y = torch.einsum("ij,bjn->bin", torch.linalg.inv(c_in), y)
        eps = MIX.eps(self.sde, y.reshape(B, -1), t).reshape(B, k, -1)
        if self.config.prediction_type == "sample":
            out = torch.einsum("j,bjn->bn", a, y - torch.einsum("ij,bjn->bin", L, eps)) / (a @ a)
        else:  # sufficient_epsilon
            w = torch.linalg.solve_triangular(L, a[:, None], upper=False)[:, 0]
            out = torch.einsum("j,bjn->bn", w / w.norm(), eps)
        return SimpleNamespace(sample=out.reshape(B, 1, *sample.shape[2:]).to(sample.dtype))


def _pipes(make_sched, prediction_type, cls=PSLDPipeline, precondition=False, classifier=False, cfg=False):
    ref_sched = make_sched()
    kw = dict(prediction_type=prediction_type)
    if precondition:
        kw.update(input_preconditioning=True, sigma_data=SIGMA_DATA)
    sched = type(ref_sched).from_config(ref_sched.config, **kw)
    n_cls = 3 if cfg else None
    ref_unet = attach(ExactEpsUNet(in_channels=2, out_channels=2, sample_size=(1, 4), num_class_embeds=n_cls), MIX, ref_sched)
    unet = ExactOutputUNet(num_class_embeds=n_cls, prediction_type=prediction_type,
                           sigma_data=SIGMA_DATA if precondition else None)
    unet.sde = sched.sde
    out = []
    for u, s in ((ref_unet, ref_sched), (unet, sched)):
        clf = attach(ExactClassifier(in_channels=2, num_classes=2), MIX, s) if classifier else None
        p = cls(unet=u, scheduler=s, classifier=clf)
        p.set_progress_bar_config(disable=True)
        out.append(p)
    return out


def _same(ref_pipe, pipe, **kw):
    a = ref_pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(output_type="pt", generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.isfinite(a).all()
    torch.testing.assert_close(b, a, rtol=0, atol=2e-5)
    return a


SCHEDS = {
    "em": lambda: PSLDScheduler(striding="quadratic"),
    "sscs": lambda: SSCSScheduler(striding="quadratic"),
    "pf_heun": lambda: PSLDScheduler(sampler="pf_heun", striding="quadratic"),
    "gddim": lambda: GDDIMMultistepScheduler(),
}


@pytest.mark.parametrize("prediction_type", ["sample", "sufficient_epsilon"])
@pytest.mark.parametrize("name", list(SCHEDS))
def test_unconditional_matches_the_exact_eps_pipeline(name, prediction_type):
    ref, pipe = _pipes(SCHEDS[name], prediction_type)
    assert pipe.unet.config.out_channels == 1 and pipe.scheduler.output_channels(1) == 1
    _same(ref, pipe, batch_size=6, num_inference_steps=12)


@pytest.mark.parametrize("prediction_type", ["sample", "sufficient_epsilon"])
def test_preconditioned_network_input(prediction_type):
    """With input_preconditioning the UNet receives c_in(t) z (the stub undoes it independently)."""
    ref, pipe = _pipes(SCHEDS["em"], prediction_type, precondition=True)
    _same(ref, pipe, batch_size=6, num_inference_steps=12)


@pytest.mark.parametrize("prediction_type", ["sample", "sufficient_epsilon"])
def test_classifier_guidance(prediction_type):
    ref, pipe = _pipes(SCHEDS["sscs"], prediction_type, classifier=True)
    _same(ref, pipe, batch_size=6, num_inference_steps=10, class_labels=1, guidance_scale=2.0)


def test_classifier_free_guidance():
    ref, pipe = _pipes(SCHEDS["em"], "sample", cfg=True)
    _same(ref, pipe, batch_size=4, num_inference_steps=8, class_labels=1, guidance_scale=3.0)


@pytest.mark.parametrize("correction", [None, "tweedie"])
def test_inpainting(correction):
    ref, pipe = _pipes(SCHEDS["em"], "sufficient_epsilon")
    image = torch.tensor([[[[0.7, 0.2, 0.5, 0.9]]]])
    mask = torch.tensor([[1.0, 0.0, 0.0, 1.0]])
    out = _same(ref, pipe, batch_size=4, num_inference_steps=10, image=image, mask_image=mask,
                inpaint_correction=correction, inpaint_cg_iters=8)
    torch.testing.assert_close(out[..., 0], image[..., 0].expand(4, 1, 1), rtol=0, atol=1e-6)  # kept pixels


def test_img2img():
    ref, pipe = _pipes(SCHEDS["gddim"], "sample", cls=PSLDImg2ImgPipeline)
    _same(ref, pipe, image=torch.rand(3, 1, 1, 4), strength=0.4, num_inference_steps=12)


def test_channel_mismatch_is_refused():
    sched = PSLDScheduler(prediction_type="sample")
    eps_unet = ExactEpsUNet(in_channels=2, out_channels=2, sample_size=(1, 4))
    with pytest.raises(ValueError, match="out_channels"):
        PSLDPipeline(unet=eps_unet, scheduler=sched)
    c_unet = ExactOutputUNet()
    with pytest.raises(ValueError, match="out_channels"):
        PSLDPipeline(unet=c_unet, scheduler=PSLDScheduler())


def test_save_load_round_trip(tmp_path):
    from diffusers import UNet2DModel

    sched = PSLDScheduler(prediction_type="sufficient_epsilon", input_preconditioning=True, sigma_data=0.6)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=1, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    pipe = PSLDPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    a = pipe(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    pipe.save_pretrained(tmp_path)
    back = PSLDPipeline.from_pretrained(tmp_path)
    back.set_progress_bar_config(disable=True)
    assert back.scheduler.config.prediction_type == "sufficient_epsilon"
    assert back.scheduler.config.input_preconditioning is True and math.isclose(back.scheduler.config.sigma_data, 0.6)
    b = back(batch_size=2, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(a, b)
