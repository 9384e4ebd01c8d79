"""PSLDImg2ImgPipeline (SDEdit, issue #15 §2) against the exact law of the reverse process.

With the exact score of Gaussian data x₀ ~ N(μ, C), the reverse process started at time τ from a state z_τ
has the law of the forward joint's conditional p(x₀ | z_τ) (time reversal). Started from the noised input
z_τ ~ p(z_τ | x₀ = y) = N(a ⊗ y, Σ_τ ⊗ I) it ends in N(m, S) with, for K = Cov(x₀, z_τ) Cov(z_τ)⁻¹,

    m = μ + K (a ⊗ (y - μ)),    S = C - K Cov(z_τ, x₀) + K (Σ_τ ⊗ I) Kᵀ,

computed here from the HSM kernel in float64 (an independent route: no sampler, no network). The pipeline's
sample mean and covariance must match within 4 standard errors.
"""
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_psld import PSLDImg2ImgPipeline, PSLDPipeline
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.models.classifier import TimeDependentClassifier
from diffusers_psld.pipelines.pipeline_psld_img2img import begin_index_for_strength
from diffusers_psld.schedulers import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                                      SSCSScheduler)

from _pipeline_stubs import ExactEpsUNet, attach, tiny_unet

MU = torch.tensor([0.1, -0.1, 0.2, 0.0], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.6, 0.3, 0.1], [0.6, 1.0, 0.5, 0.2], [0.3, 0.5, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]], dtype=torch.float64)
SD = torch.tensor([0.2, 0.15, 0.2, 0.25], dtype=torch.float64)
COV = CORR * SD[:, None] * SD[None]
Y = torch.tensor([0.6, 0.3, -0.4, 0.1], dtype=torch.float64)  # the input image's x (in [-1, 1])


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def exact_pipe(sched, cls=PSLDImg2ImgPipeline):
    k = sched.sde.k
    unet = attach(ExactEpsUNet(in_channels=k, out_channels=k, sample_size=(1, 4)), GaussianMixture.gaussian(MU, COV), sched)
    pipe = cls(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def final_x(pipe, **kw):
    box = {}

    def grab(p, i, t, tensors):
        box["z"] = tensors["latents"]
        return {}

    pipe(callback_on_step_end=grab, callback_on_step_end_tensor_inputs=["latents"], output_type="pt", **kw)
    return box["z"][:, :1].reshape(box["z"].shape[0], -1).double()


def reverse_law(sde, tau):
    """Mean and covariance of x₀ from the exact reverse process started at z_τ ~ p(z_τ | x₀ = Y)."""
    kern = sde.hsm_kernel(torch.tensor([float(tau)], dtype=torch.float64))
    a, sig = kern.mean_coef[0], kern.cov[0]
    eye = torch.eye(4, dtype=torch.float64)
    czz = torch.kron(torch.outer(a, a), COV) + torch.kron(sig, eye)
    cxz = torch.kron(a[None], COV)
    K = torch.linalg.solve(czz, cxz.T).T
    mean = MU + K @ torch.kron(a, Y - MU)
    cov = COV - K @ cxz.T + K @ torch.kron(sig, eye) @ K.T
    return mean, cov


def assert_moments_within(x, mean, cov, n_se=4.0):
    n = x.shape[0]
    se_mean = (cov.diagonal() / n).sqrt()
    se_cov = ((cov.diagonal()[:, None] * cov.diagonal()[None] + cov ** 2) / n).sqrt()
    zm = (x.mean(0) - mean) / se_mean
    zc = (torch.cov(x.T) - cov) / se_cov
    assert zm.abs().max() < n_se, f"mean off by {zm.tolist()} s.e. (got {x.mean(0).tolist()}, want {mean.tolist()})"
    assert zc.abs().max() < n_se, f"covariance off by {zc.tolist()} s.e."


IMAGE = ((Y.float() + 1) / 2).reshape(1, 1, 1, 4)


@pytest.mark.parametrize("make", [lambda: PSLDScheduler(striding="quadratic"), lambda: SSCSScheduler(striding="quadratic")],
                         ids=["em", "sscs"])
def test_output_law_equals_exact_reverse_law(make):
    sched = make()
    steps, strength, n = 200, 0.1, 4000  # PSLD (β = 8) has forgotten the input by t ≈ 0.4
    pipe = exact_pipe(sched)
    x = final_x(pipe, image=IMAGE, strength=strength, num_inference_steps=steps, batch_size=n, generator=gen(1))
    tau = sched.state_time(begin_index_for_strength(sched, strength))  # the tables of this call are still installed
    assert strength - 0.01 < tau <= strength
    mean, cov = reverse_law(sched.sde, tau)
    # the law really depends on the input (so the test can fail): the marginal mean is μ
    assert (mean - MU).abs().max() > 0.05
    assert_moments_within(x, mean, cov)


def test_strength_one_is_unconditional_sampling_path_by_path():
    sched = PSLDScheduler()
    img2img = exact_pipe(sched)
    plain = exact_pipe(PSLDScheduler(), cls=PSLDPipeline)
    a = img2img(image=IMAGE, strength=1.0, num_inference_steps=20, batch_size=64, generator=gen(5), output_type="pt").images
    b = plain(num_inference_steps=20, batch_size=64, generator=gen(5), output_type="pt").images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_small_strength_returns_the_input_up_to_kernel_noise():
    sched = PSLDScheduler()
    pipe = exact_pipe(sched)
    steps, strength = 100, 0.02
    x = final_x(pipe, image=IMAGE, strength=strength, num_inference_steps=steps, batch_size=500, generator=gen(2))
    tau = sched.state_time(begin_index_for_strength(sched, strength))
    kern = sched.sde.hsm_kernel(torch.tensor([tau], dtype=torch.float64))
    sd_x = (kern.cov[0, 0, 0] / kern.mean_coef[0, 0] ** 2).sqrt().item()  # kernel noise in x units
    err = x - Y
    assert err.abs().mean() < 2 * sd_x, (err.abs().mean().item(), sd_x)
    far = exact_pipe(PSLDScheduler())
    x_far = final_x(far, image=IMAGE, strength=0.9, num_inference_steps=steps, batch_size=500, generator=gen(2))
    assert (x_far - Y).abs().mean() > 5 * err.abs().mean()  # large strength forgets the input


def test_nfe_and_begin_index():
    sched = PSLDScheduler()
    sched.set_timesteps(10)  # state times 1, 8/9, ..., 1/9 (+ε), ε
    assert begin_index_for_strength(sched, 1.0) == 0
    assert begin_index_for_strength(sched, 0.6) == 4 and sched.state_time(4) <= 0.6 < sched.state_time(3)
    sched = PSLDScheduler(striding="quadratic")
    sched.set_timesteps(200)
    assert abs(sched.state_time(begin_index_for_strength(sched, 0.5)) - 0.5) < 0.01  # a time rule, not an index rule
    calls = []
    pipe = PSLDImg2ImgPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    pipe.set_progress_bar_config(disable=True)
    h = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    idx = []
    pipe(image=torch.rand(2, 1, 8, 8), strength=0.6, num_inference_steps=10, output_type="pt",
         callback_on_step_end=lambda p, i, t, d: idx.append(i) or {})
    h.remove()
    assert len(calls) == 6 and idx == list(range(6)) and pipe.num_timesteps == 6


@pytest.mark.parametrize("kwargs", [
    dict(class_labels=1, guidance_scale=3.0),  # classifier guidance
    dict(return_momentum=True),
    dict(generator=[gen(1), gen(2)]),
])
def test_guidance_generators_and_outputs(kwargs):
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    pipe = PSLDImg2ImgPipeline(unet=tiny_unet(), scheduler=SSCSScheduler(), classifier=clf)
    pipe.set_progress_bar_config(disable=True)
    kwargs.setdefault("generator", gen())
    out = pipe(image=torch.rand(1, 1, 8, 8), batch_size=2, strength=0.5, num_inference_steps=6, output_type="pt", **kwargs)
    assert out.images.shape == (2, 1, 8, 8) and torch.isfinite(out.images).all()
    again = pipe(image=torch.rand(1, 1, 8, 8) * 0 + out.images[:1] * 0 + 0.5, strength=0.5, num_inference_steps=6, output_type="np",
                 generator=gen())
    assert again.images.shape == (1, 8, 8, 1)


def test_cfg_with_class_conditional_unet():
    pipe = PSLDImg2ImgPipeline(unet=tiny_unet(num_class_embeds=4), scheduler=PSLDScheduler())
    pipe.set_progress_bar_config(disable=True)
    out = pipe(image=PIL.Image.fromarray(np.full((8, 8), 128, np.uint8)), strength=0.5, num_inference_steps=4,
               class_labels=2, guidance_scale=2.0, output_type="np", generator=gen())
    assert out.images.shape == (1, 8, 8, 1)


@pytest.mark.parametrize("kwargs, name", [
    (dict(strength=0.0), "strength"), (dict(strength=1.5), "strength"), (dict(strength=float("nan")), "strength"),
    (dict(strength="0.5"), "strength"), (dict(strength=0.0005), "strength"),  # below the last state time
    (dict(image=None), "image"), (dict(image=torch.rand(1, 1, 7, 7)), "image"), (dict(image=torch.rand(1, 1, 0, 8)), "image"),
    (dict(generator=42), "generator"), (dict(batch_size=0), "batch_size"), (dict(num_inference_steps=1), "num_inference_steps"),
    (dict(class_labels=0, guidance_scale=float("inf")), "guidance_scale"),
    (dict(image=PIL.Image.fromarray(np.full((8, 8), 200.0, np.float32))), "image"),  # "F" beyond [0, 1]: not clipped
    (dict(image=PIL.Image.fromarray(np.full((8, 8), 70000, np.int32))), "image"),  # "I" beyond 16 bit
    (dict(image=PIL.Image.fromarray(np.full((8, 8, 4), 9, np.uint8))), "image"),  # RGBA: alpha not dropped silently
    (dict(return_dict="no"), "return_dict"), (dict(return_momentum="yes"), "return_momentum"),
    (dict(callback_on_step_end=3), "callback_on_step_end"), (dict(batch_size=10**9), "batch_size"),
])
def test_bad_arguments(kwargs, name):
    pipe = PSLDImg2ImgPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    args = dict(image=torch.rand(1, 1, 8, 8), strength=0.5, num_inference_steps=10)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        pipe(**args)


def test_numpy_strength_and_steps():
    pipe = PSLDImg2ImgPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    pipe.set_progress_bar_config(disable=True)
    a = pipe(image=torch.rand(1, 1, 8, 8), strength=np.float32(0.5), num_inference_steps=np.int64(4), output_type="pt", generator=gen())
    assert a.images.shape == (1, 1, 8, 8)


@pytest.mark.parametrize("make", [
    lambda: PSLDScheduler(sampler="em", striding="quadratic"), lambda: SSCSScheduler(striding="quadratic"),
    lambda: PSLDScheduler(sampler="pf_euler", striding="quadratic"),
    lambda: PSLDScheduler(sampler="pf_heun", striding="quadratic"),
    lambda: GDDIMMultistepScheduler(),
    lambda: ConjugateScheduler(), lambda: SplittingScheduler(),
], ids=["em", "sscs", "pf_euler", "pf_heun", "gddim", "conjugate", "splitting"])
@pytest.mark.parametrize("strength", [0.3, 0.55, 0.8])
def test_every_scheduler_starts_mid_schedule(make, strength):
    """Each scheduler runs exactly floor(N · strength) calls from the begin index with the exact ε, finite, and the
    output keeps the input's trace (closer to Y than the data mean is). The precise law is tested above for the
    stochastic samplers; a deterministic (probability-flow) sampler started off the marginal has another law."""
    sched = make()
    pipe = exact_pipe(sched)
    steps = 41
    x = final_x(pipe, image=IMAGE, strength=strength, num_inference_steps=steps, batch_size=256, generator=gen())
    assert pipe.unet.calls == steps - begin_index_for_strength(sched, strength)
    assert torch.isfinite(x).all()
    if sched.config.sampler in ("em", "sscs"):  # stochastic: close to the exact reverse law (coarse grid)
        mean, _ = reverse_law(sched.sde, sched.state_time(begin_index_for_strength(sched, strength)))
        assert (x.mean(0) - mean).abs().max() < 0.05, (x.mean(0), mean)


def test_docstring_example_runs(tmp_path, monkeypatch):
    import doctest

    import diffusers_psld.pipelines.pipeline_psld_img2img as mod

    monkeypatch.chdir(tmp_path)
    tests = [t for t in doctest.DocTestFinder().find(mod) if t.examples and "__call__" in t.name]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_from_pipe_shares_the_components():
    pipe = PSLDPipeline(unet=tiny_unet(), scheduler=SSCSScheduler())
    img2img = PSLDImg2ImgPipeline.from_pipe(pipe)
    assert type(img2img) is PSLDImg2ImgPipeline and img2img.unet is pipe.unet and img2img.scheduler is pipe.scheduler
