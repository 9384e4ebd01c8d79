"""The bridge end to end: every recipe sampler on a wrapped VP network, diffusers' samplers on ``to_vp()``, and
``PSLDPipeline.from_vp`` / ``from_vp_pretrained`` / ``to_vp`` with their pipeline features and saved directories.

Exactness runs in float64 with exact Gaussian-mixture networks (:mod:`_exact_nets`): a run driven through the bridge
must reproduce the run driven by the exact ε of the sampler's own recipe, draw for draw (same generator)."""
import json
import os

import numpy as np
import pytest
import torch
from _exact_nets import ExactContinuousVPNet, ExactRecipeNet, vp_eps

from diffusers import (DDIMScheduler, DDPMPipeline, DDPMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler,
                       UNet2DModel, UniPCMultistepScheduler)
from diffusers_psld import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDImg2ImgPipeline, PSLDPipeline, PSLDScheduler,
                            SplittingScheduler, SSCSScheduler)
from diffusers_psld.denoisers import ContinuousVPDenoiser, DiscreteVPDenoiser, RecipeDenoiser, VPEpsilonModel
from diffusers_psld.denoisers.vp import discrete_alphas_cumprod
from diffusers_psld.exact import GaussianMixture

D, B = 4, 3
DATA = GaussianMixture([0.4, 0.6], [[-0.5, 0.4, 0.0, -0.3], [0.6, -0.2, 0.3, 0.2]],
                       [(0.05 * torch.eye(D)).tolist(), (0.02 * torch.eye(D) + 0.01).tolist()])


def exact_vp_denoiser():
    """The exact VP-SDE ε-network behind the continuous VP wrapper (time range wide enough for every recipe's σ)."""
    return ContinuousVPDenoiser(ExactContinuousVPNet(DATA), t_min=1e-12, t_max=3.0)


def run(sched, output_fn, steps=8, seed=0):
    """The standard loop in float64; ``output_fn(z, t, i)`` gives the model output of call i."""
    sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((B, sched.num_components, 2, 2), generator=g, dtype=torch.float64)
    for i, t in enumerate(sched.timesteps):
        z = sched.step(output_fn(z, t, i), t, z, generator=g).prev_sample
    return z


SAMPLERS = {
    "psld-em": lambda: PSLDScheduler(sampler="em"),
    "psld-pf_euler": lambda: PSLDScheduler(sampler="pf_euler"),
    "psld-pf_heun": lambda: PSLDScheduler(sampler="pf_heun", prediction_type="sufficient_epsilon"),
    "psld-sscs": lambda: PSLDScheduler(sampler="sscs", striding="quadratic"),
    "SSCSScheduler": lambda: SSCSScheduler(),
    "gDDIM": lambda: GDDIMMultistepScheduler(),
    "gDDIM-3M-sample": lambda: GDDIMMultistepScheduler(solver_order=3, prediction_type="sample"),
    "conjugate": lambda: ConjugateScheduler(),
    "splitting-roba": lambda: SplittingScheduler(),
    "splitting-cvv": lambda: SplittingScheduler(sampler="cvv"),
    "cld-sscs": lambda: PSLDScheduler(gamma=0.0, nu=4.0, sampler="sscs"),
    "cld-em": lambda: PSLDScheduler(gamma=0.0, nu=4.0, sampler="em"),
    "vp-em": lambda: PSLDScheduler(diffusion="vp", sampler="em"),
    "vp-gDDIM": lambda: GDDIMMultistepScheduler(diffusion="vp"),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_every_sampler_through_the_bridge_reproduces_the_exact_run(name):
    """A VP network, through the sufficient statistic, drives each sampler exactly as the recipe's own exact ε does."""
    sched = SAMPLERS[name]()
    times = lambda: sched.exact_timesteps  # noqa: E731

    def exact(z, t, i):
        eps = DATA.eps(sched.sde, z.reshape(B, -1), float(times()[i])).reshape(z.shape)
        return sched.eps_to_model_output(eps, z, t)

    den = exact_vp_denoiser()
    ref = run(sched, exact)
    got = run(sched, lambda z, t, i: sched.denoiser_to_model_output(den, z, t))
    assert float(ref.abs().max()) > 0.1  # a real run
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)


def exact_recipe_pipeline(**sched_kwargs):
    sched = PSLDScheduler(**sched_kwargs)
    return PSLDPipeline(unet=ExactRecipeNet(DATA, sched), scheduler=sched)


def vp_loop(vp_sched, model_fn, steps, seed=0, euler=False):
    vp_sched.set_timesteps(steps)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 1, 2, 2, dtype=torch.float64, generator=g)
    if euler:
        x = x * vp_sched.init_noise_sigma
    for t in vp_sched.timesteps:
        inp = vp_sched.scale_model_input(x, t) if euler else x
        x = vp_sched.step(model_fn(inp, t), t, x).prev_sample
    return x


# the VP-SDE reaches σ = 152.2 at t = 1, below the default DDPM table's 157.4: a schedule ending at β = 0.0195 (σ_max
# = 134) keeps the exact VP network inside its time range (beyond it the network's time is clamped by design)
@pytest.mark.parametrize("sched_kwargs,vp_cls,vp_config", [
    (dict(), DPMSolverMultistepScheduler, None), (dict(prediction_type="sample"), DPMSolverMultistepScheduler, None),
    (dict(gamma=0.0, nu=4.0), DPMSolverMultistepScheduler, None),
    (dict(diffusion="vp"), DPMSolverMultistepScheduler, {"beta_end": 0.0195}),
    (dict(prediction_type="sufficient_epsilon", input_preconditioning=True), UniPCMultistepScheduler, None),
    (dict(), DDIMScheduler, None)])
def test_diffusers_samplers_on_to_vp_reproduce_the_exact_vp_run(sched_kwargs, vp_cls, vp_config):
    """DPM-Solver++ (UniPC, DDIM) on ``to_vp()`` of an exact PSLD / CLD / VP package model = on the exact VP ε."""
    pipe = exact_recipe_pipeline(**sched_kwargs)
    unet, ddpm = pipe.to_vp(scheduler_config=vp_config, residual_seed=0)
    assert isinstance(unet, VPEpsilonModel) and isinstance(ddpm, DDPMScheduler) and not ddpm.config.clip_sample
    vp_sched = vp_cls.from_config(ddpm.config)
    ac = discrete_alphas_cumprod(ddpm.config)
    ref = vp_loop(vp_sched, lambda x, t: vp_eps(DATA, x.reshape(B, D), float(ac[int(t)])).reshape(x.shape), 10)
    got = vp_loop(vp_sched, lambda x, t: unet(x, t).sample, 10)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-8)


def test_euler_loop_on_to_vp():
    """Euler needs ``scale_model_input`` and ``init_noise_sigma`` (the loop of the documentation)."""
    pipe = exact_recipe_pipeline()
    unet, ddpm = pipe.to_vp()
    euler = EulerDiscreteScheduler.from_config(ddpm.config)
    ac = discrete_alphas_cumprod(ddpm.config)
    # the exact VP ε at Euler's (fractional after interpolation: here integer) timesteps
    ref = vp_loop(euler, lambda x, t: vp_eps(DATA, x.reshape(B, D), float(ac[int(round(float(t)))])).reshape(x.shape), 10, euler=True)
    got = vp_loop(euler, lambda x, t: unet(x, t).sample, 10, euler=True)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-7)


# ---------------------------------------------------------------------------------------------- pipelines
def tiny_unet(channels=3, size=16, **kw):
    return UNet2DModel(sample_size=size, in_channels=channels, out_channels=channels, block_out_channels=(16, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=8, **kw)


@pytest.fixture(scope="module")
def vp_pipe():
    torch.manual_seed(0)
    return PSLDPipeline.from_vp(tiny_unet(), DDPMScheduler(prediction_type="v_prediction"))


def test_from_vp_pipeline_samples_with_every_feature(vp_pipe):
    pipe = vp_pipe
    assert isinstance(pipe.unet, DiscreteVPDenoiser) and isinstance(pipe.scheduler, GDDIMMultistepScheduler)
    assert pipe.data_channels == 3 and not pipe.is_class_conditional
    kw = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    b = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert a.shape == (2, 16, 16, 3) and np.array_equal(a, b) and np.isfinite(a).all()
    seen = []
    out = pipe(generator=torch.Generator().manual_seed(0), callback_on_step_end=lambda p, i, t, d: seen.append(i),
               latents=torch.randn(2, 6, 16, 16), return_momentum=True, **dict(kw, output_type="pt"))
    assert seen == [0, 1, 2, 3] and out.images.shape == (2, 3, 16, 16) and out.momentum.shape == (2, 3, 16, 16)
    mask = torch.zeros(2, 1, 16, 16)
    mask[..., :8] = 1
    image = torch.rand(2, 3, 16, 16)
    inp = pipe(image=image, mask_image=mask, generator=torch.Generator().manual_seed(0), **dict(kw, output_type="pt")).images
    assert inp.shape == (2, 3, 16, 16)
    torch.testing.assert_close(inp[..., :8], image[..., :8], rtol=0, atol=1e-6)  # known pixels kept (C = 3)
    tw = pipe(image=image, mask_image=mask, inpaint_correction="tweedie", inpaint_cg_iters=1,
              generator=torch.Generator().manual_seed(0), **dict(kw, output_type="pt")).images
    assert torch.isfinite(tw).all()
    i2i = PSLDImg2ImgPipeline(**pipe.components)(image=image, strength=0.5, num_inference_steps=6,
                                                 generator=torch.Generator().manual_seed(0), output_type="np").images
    assert i2i.shape == (2, 16, 16, 3)


def test_from_vp_with_other_recipe_samplers(vp_pipe):
    for sched in (PSLDScheduler(sampler="sscs"), SplittingScheduler(), PSLDScheduler(diffusion="vp"),
                  PSLDScheduler(gamma=0.0, nu=4.0, sampler="em")):
        pipe = PSLDPipeline.from_vp(vp_pipe.unet, None, scheduler=sched)
        x = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert x.shape == (1, 16, 16, 3) and np.isfinite(x).all()


def test_from_vp_edm_and_continuous_sources():
    from diffusers import EDMEulerScheduler

    torch.manual_seed(0)
    for source in (EDMEulerScheduler(prediction_type="v_prediction"),
                   EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")):
        pipe = PSLDPipeline.from_vp(tiny_unet(), source)
        assert type(pipe.unet).__name__ == "EDMDenoiser"
        x = pipe(batch_size=1, num_inference_steps=3, generator=torch.Generator().manual_seed(0), output_type="np").images
        assert x.shape == (1, 16, 16, 3) and np.isfinite(x).all()
    pipe = PSLDPipeline.from_vp(ContinuousVPDenoiser(tiny_unet()), None)  # a wrapped score_sde-style network
    assert pipe(batch_size=1, num_inference_steps=3, output_type="np").images.shape == (1, 16, 16, 3)


def test_class_conditional_network_and_cfg():
    torch.manual_seed(0)
    unet = tiny_unet(num_class_embeds=4)
    pipe = PSLDPipeline.from_vp(unet, DDPMScheduler())
    assert pipe.is_class_conditional
    kw = dict(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0))
    x = pipe(class_labels=[1, 3], **kw).images  # all 4 classes are real classes
    assert x.shape == (2, 16, 16, 3)
    with pytest.raises(ValueError, match="no null .*class_labels.*null_class=True"):
        pipe(**kw)
    with pytest.raises(ValueError, match="no null .*guidance_scale"):
        pipe(class_labels=1, guidance_scale=3.0, **kw)
    with pytest.raises(ValueError, match=r"class_labels.*\[0, 3\]"):
        pipe(class_labels=4, **kw)
    cfg_pipe = PSLDPipeline.from_vp(unet, DDPMScheduler(), null_class=True)  # the last index is the null class
    y = cfg_pipe(class_labels=[0, 2], guidance_scale=3.0, **dict(kw, generator=torch.Generator().manual_seed(0))).images
    u = cfg_pipe(**dict(kw, generator=torch.Generator().manual_seed(0))).images
    assert y.shape == u.shape == (2, 16, 16, 3) and not np.array_equal(y, u)
    with pytest.raises(ValueError, match=r"class_labels.*\[0, 2\]"):
        cfg_pipe(class_labels=3, **kw)


def test_save_load_round_trip_samples_identically(tmp_path, vp_pipe):
    vp_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_psld.denoisers.vp", "DiscreteVPDenoiser"]
    assert os.path.isfile(tmp_path / "unet" / "diffusion_pytorch_model.safetensors")
    cfg = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert cfg["scheduler_config"]["prediction_type"] == "v_prediction" and cfg["network_class"] == "diffusers.UNet2DModel"
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    kw = dict(batch_size=2, num_inference_steps=4, output_type="np")
    a = vp_pipe(generator=torch.Generator().manual_seed(1), **kw).images
    b = loaded(generator=torch.Generator().manual_seed(1), **kw).images
    assert np.array_equal(a, b)
    # the evaluation tooling (training/evaluate.py) samples the saved directory with a swapped scheduler
    from diffusers_psld.evaluation.fid import pipeline_sample_fn

    sample_fn, info = pipeline_sample_fn(str(tmp_path), scheduler="gddim", num_inference_steps=4)
    assert info["data_channels"] == 3 and info["resolution"] == [16, 16]
    assert sample_fn(2, torch.Generator().manual_seed(1)).shape == (2, 16, 16, 3)


def test_to_vp_of_saved_models_round_trips(tmp_path):
    torch.manual_seed(0)
    from diffusers_psld.models import build_unet

    pipe = PSLDPipeline(unet=build_unet("tiny", data_channels=3, num_components=2, sample_size=16),
                        scheduler=PSLDScheduler(prediction_type="epsilon"))
    unet, ddpm = pipe.to_vp(residual_seed=3)
    assert isinstance(unet.denoiser, RecipeDenoiser) and unet.denoiser.unet is pipe.unet  # shared, not copied
    assert unet.config.in_channels == unet.config.out_channels == 3 and unet.config.sample_size == 16
    unet.save_pretrained(tmp_path / "vp")
    again = VPEpsilonModel.from_pretrained(tmp_path / "vp")
    x = torch.randn(2, 3, 16, 16)
    unet.denoiser.manual_seed(3)
    again.denoiser.manual_seed(3)
    assert torch.equal(unet(x, 500).sample, again(x, torch.tensor([500, 500])).sample)
    # diffusers' own pipeline with DPM-Solver++, DDIM, DDPM (UniPC's and PNDM's `step` take no `generator`, which
    # DDPMPipeline passes: those run in the loop of the documentation, tested above)
    for cls in (DPMSolverMultistepScheduler, DDIMScheduler, DDPMScheduler):
        img = DDPMPipeline(unet, cls.from_config(ddpm.config))(batch_size=1, num_inference_steps=3, output_type="np",
                                                               generator=torch.Generator().manual_seed(0)).images
        assert img.shape == (1, 16, 16, 3) and np.isfinite(img).all()


def test_from_vp_pretrained_directory_and_hub_id(tmp_path, monkeypatch):
    torch.manual_seed(0)
    DDPMPipeline(tiny_unet(), DDPMScheduler()).save_pretrained(tmp_path / "ddpm")
    pipe = PSLDPipeline.from_vp_pretrained(str(tmp_path / "ddpm"), scheduler=PSLDScheduler(sampler="sscs"))
    assert isinstance(pipe.unet, DiscreteVPDenoiser) and isinstance(pipe.scheduler, PSLDScheduler)
    from diffusers_psld.pipelines import pipeline_psld

    calls = []
    monkeypatch.setattr(pipeline_psld, "_snapshot_download", lambda repo, **kw: calls.append((repo, kw)) or str(tmp_path / "ddpm"))
    hub = PSLDPipeline.from_vp_pretrained("google/ddpm-cifar10-32", revision="main")
    assert calls == [("google/ddpm-cifar10-32", {"revision": "main"})]
    kw = dict(batch_size=1, num_inference_steps=3, output_type="np")
    assert hub(generator=torch.Generator().manual_seed(0), **kw).images.shape == (1, 16, 16, 3)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PSLDPipeline.from_vp_pretrained(str(tmp_path / "missing"))
    (tmp_path / "bare").mkdir()
    with pytest.raises(ValueError, match="model_index.json"):
        PSLDPipeline.from_vp_pretrained(str(tmp_path / "bare"))


def test_from_vp_bad_inputs():
    with pytest.raises(ValueError, match="in_channels=6, out_channels=3"):  # a PSLD 'sample' network
        PSLDPipeline.from_vp(UNet2DModel(sample_size=8, in_channels=6, out_channels=3, block_out_channels=(8, 16),
                                         layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"),
                                         up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4), DDPMScheduler())
    with pytest.raises(ValueError, match="diffusers_psld scheduler"):  # a PSLD network with its own scheduler
        PSLDPipeline.from_vp(tiny_unet(6), PSLDScheduler())
    with pytest.raises(ValueError, match="`scheduler` must be a diffusers_psld scheduler"):
        PSLDPipeline.from_vp(tiny_unet(), DDPMScheduler(), scheduler=DPMSolverMultistepScheduler())
    with pytest.raises(ValueError, match="`vp_scheduler` is required"):
        PSLDPipeline.from_vp(tiny_unet(), None)


def test_to_vp_of_a_class_conditional_package_model():
    """The package's class-conditional networks have a null class (last index): unconditional without labels."""
    torch.manual_seed(0)
    from diffusers_psld.models import build_unet

    sched = PSLDScheduler(prediction_type="sufficient_epsilon")
    pipe = PSLDPipeline(unet=build_unet("tiny", data_channels=1, num_components=2, sample_size=8, num_class_embeds=4,
                                        out_channels=1), scheduler=sched)
    unet, _ = pipe.to_vp(residual="zero")
    x = torch.randn(2, 1, 8, 8)
    null = unet(x, 300).sample
    torch.testing.assert_close(null, unet(x, 300, class_labels=torch.tensor([3, 3])).sample)
    assert not torch.allclose(null, unet(x, 300, class_labels=torch.tensor([0, 1])).sample)
