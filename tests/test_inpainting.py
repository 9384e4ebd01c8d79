"""Inpainting against closed-form Gaussian conditionals, with the exact score.

Plain replacement (``inpaint_correction=None`` / ``"replace"``, the paper's scheme: known pixels of x and
m replaced by fresh forward-kernel draws) is *not* an exact conditional sampler for correlated data: the
unknown part sees ∇ log p(z_t) rather than ∇ log p(z_t) + ∇ log p(x₀ᵏ | z_t). Measured with the exact
score (quadratic striding, 100 steps, 3000 samples, correlated 4-d Gaussian below, known pixels ~3 sd from
their mean): the conditional mean of the unknown pixels is (0.60, 0.195) but the filled-in mean is
(0.397, 0.048) -- only ~50 % / 25 % of the shift from the marginal mean (0.2, 0.0) -- and the variances are
10-15 % too large. VP, CLD and PSLD give the same numbers (±0.002), so this is the replacement scheme, not
PSLD. ``test_correlated_conditional_mean_and_variance`` pins that measured bias.

``inpaint_correction="tweedie"`` adds ∇ log p(x₀ᵏ | z_t) by second-order Tweedie
(:mod:`diffusers_psld.inpainting`), exact for Gaussian data. Tested here (i) against the closed-form
gradient of log N(y; E[x₀ᴷ | z_t], Cov(x₀ᴷ | z_t)) computed from the joint Gaussian of (x₀, z_t) -- an
independent route that uses neither the network nor Tweedie -- and (ii) by sampling: with the correction,
the filled-in pixels' sample mean and covariance match the closed-form conditional within 4 standard
errors (s.e. of a mean: sqrt(Σ_ii / n); of a covariance entry: sqrt((Σ_ii Σ_jj + Σ_ij²) / n)) for EM,
PF-Heun (deterministic) and SSCS, where plain replacement is ~50 s.e. off.
"""
import re

import numpy as np
import PIL.Image
import pytest
import torch

from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from diffusers_psld.exact import GaussianMixture
from diffusers_psld.inpainting import tweedie_correction
from diffusers_psld.pipelines import PSLDPipeline
from diffusers_psld.schedulers import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                                      SSCSScheduler)

from _pipeline_stubs import ExactEpsUNet, LinearEpsUNet, attach, tiny_unet

MU = torch.tensor([0.1, -0.1, 0.2, 0.0], dtype=torch.float64)
CORR = torch.tensor([[1.0, 0.6, 0.3, 0.1], [0.6, 1.0, 0.5, 0.2], [0.3, 0.5, 1.0, 0.4], [0.1, 0.2, 0.4, 1.0]], dtype=torch.float64)
SD = torch.tensor([0.2, 0.15, 0.2, 0.25], dtype=torch.float64)
COV = CORR * SD[:, None] * SD[None]
KNOWN, UNKNOWN = [0, 1], [2, 3]
MASK = torch.tensor([1.0, 1.0, 0.0, 0.0]).reshape(1, 1, 1, 4)  # 1 = keep


def conditional(mu, cov, x_known):
    skk, suk = cov[KNOWN][:, KNOWN], cov[UNKNOWN][:, KNOWN]
    mean = mu[UNKNOWN] + suk @ torch.linalg.solve(skk, x_known - mu[KNOWN])
    return mean, cov[UNKNOWN][:, UNKNOWN] - suk @ torch.linalg.solve(skk, suk.T)


def inpaint(mu, cov, image, sched, n, steps, seed=0, mask=MASK, return_pipe=False, **kwargs):
    g = GaussianMixture.gaussian(mu, cov)
    k = sched.sde.k
    unet = attach(ExactEpsUNet(in_channels=k, out_channels=k, sample_size=tuple(image.shape[-2:])), g, sched)
    pipe = PSLDPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    box = {}

    def grab(p, i, t, tensors):
        box["z"] = tensors["sample"]
        return {}

    out = pipe(batch_size=n, num_inference_steps=steps, image=image, mask_image=mask, output_type="pt",
               callback_on_step_end=grab, generator=torch.Generator().manual_seed(seed), **kwargs)
    if return_pipe:
        return out.images, box["z"], pipe
    return out.images, box["z"]


def assert_moments_within(x, cmean, ccov, n_se=4.0):
    """Sample mean and covariance of ``x`` [n, d] within ``n_se`` standard errors of the Gaussian law."""
    n = x.shape[0]
    se_mean = (ccov.diagonal() / n).sqrt()
    se_cov = ((ccov.diagonal()[:, None] * ccov.diagonal()[None] + ccov ** 2) / n).sqrt()
    zm = (x.mean(0) - cmean) / se_mean
    zc = (torch.cov(x.T) - ccov) / se_cov
    assert zm.abs().max() < n_se, f"mean off by {zm.tolist()} s.e. (got {x.mean(0).tolist()}, want {cmean.tolist()})"
    assert zc.abs().max() < n_se, f"covariance off by {zc.tolist()} s.e. (got {torch.cov(x.T).tolist()}, want {ccov.tolist()})"
    return zm, zc


def test_known_pixels_are_exact_and_momentum_is_kernel_mean():
    image = torch.tensor([0.9, 0.8, 0.5, 0.5]).reshape(1, 1, 1, 4)
    images, z = inpaint(MU, COV, image, PSLDScheduler(), n=64, steps=10)
    torch.testing.assert_close(images[:, :, :, :2], image[:, :, :, :2].expand(64, -1, -1, -1), atol=1e-6, rtol=0)
    torch.testing.assert_close(z[:, 0, 0, :2], (image[0, 0, 0, :2] * 2 - 1).expand(64, -1), atol=1e-6, rtol=0)
    assert torch.all(z[:, 1, 0, :2] == 0)  # m of known pixels: kernel mean at t = 0
    assert z[:, 0, 0, 2:].std(0).min() > 0.05  # the unknown part is sampled, not copied


def test_independent_unknowns_follow_their_marginal():
    cov = COV.clone()
    cov[:2, 2:] = 0
    cov[2:, :2] = 0
    image = torch.tensor([0.95, 0.9, 0.5, 0.5]).reshape(1, 1, 1, 4)  # far from the mean: must not leak
    n = 2000
    _, z = inpaint(MU, cov, image, PSLDScheduler(striding="quadratic"), n=n, steps=100)
    x = z[:, 0, 0, 2:].double()
    se = (cov.diagonal()[2:] / n).sqrt()
    assert torch.all((x.mean(0) - MU[2:]).abs() < 4 * se), (x.mean(0), MU[2:])
    torch.testing.assert_close(torch.cov(x.T), cov[2:, 2:], atol=0.004, rtol=0.1)


@pytest.mark.parametrize(
    "sched", [PSLDScheduler(striding="quadratic"), pytest.param(SSCSScheduler(striding="quadratic"), marks=pytest.mark.slow)],
    ids=["em", "sscs"],
)
def test_correlated_conditional_mean_and_variance(sched):
    image = torch.tensor([0.85, 0.75, 0.5, 0.5]).reshape(1, 1, 1, 4)  # x_known = (0.7, 0.5): ~3 sd away
    x_known = image.reshape(4)[:2].double() * 2 - 1
    cmean, ccov = conditional(MU, COV, x_known)
    n = 2000
    _, z = inpaint(MU, COV, image, sched, n=n, steps=100)
    x = z[:, 0, 0, 2:].double()
    shift = cmean - MU[UNKNOWN]  # the conditioning moves the mean by (0.40, 0.20)
    got = x.mean(0) - MU[UNKNOWN]
    frac = got / shift
    # measured ≈ (0.49, 0.25..0.28): right direction, partial shift (see the module docstring)
    assert torch.all(frac > 0.2) and torch.all(frac < 1.05), frac
    assert frac[0] > 0.4, frac
    var = torch.cov(x.T).diagonal()
    assert torch.all(var > 0.9 * ccov.diagonal()) and torch.all(var < 1.25 * ccov.diagonal()), (var, ccov.diagonal())


@pytest.mark.slow
def test_near_mean_conditional_is_accurate():
    image = torch.tensor([0.6, 0.45, 0.5, 0.5]).reshape(1, 1, 1, 4)  # x_known = (0.2, -0.1), 0.5 sd away
    cmean, ccov = conditional(MU, COV, image.reshape(4)[:2].double() * 2 - 1)
    n = 2000
    _, z = inpaint(MU, COV, image, PSLDScheduler(striding="quadratic"), n=n, steps=100)
    x = z[:, 0, 0, 2:].double()
    assert torch.all((x.mean(0) - cmean).abs() < 0.012), (x.mean(0), cmean)  # se ≈ 0.004
    var = torch.cov(x.T).diagonal()
    assert torch.all(var > 0.95 * ccov.diagonal()) and torch.all(var < 1.25 * ccov.diagonal()), (var, ccov.diagonal())


# --------------------------------------------------------------------------- second-order Tweedie correction
@pytest.mark.parametrize("diffusion", ["psld", "cld", "vp"])
@pytest.mark.parametrize("t", [0.9, 0.3, 0.05, 1e-3])
def test_tweedie_correction_equals_closed_form_gradient(diffusion, t):
    """g = J_Kᵀ C_KK⁻¹ (y - x̂₀_K) vs ∇_z log N(y; E[x₀ᴷ|z], Cov(x₀ᴷ|z)) from the joint Gaussian (float64)."""
    sched = {"psld": PSLDScheduler(), "cld": PSLDScheduler(gamma=0.0, nu=4.0), "vp": PSLDScheduler(diffusion="vp")}[diffusion]
    sde, k, d = sched.sde, sched.sde.k, 4
    unet = attach(ExactEpsUNet(in_channels=k, out_channels=k, sample_size=(1, 4)), GaussianMixture.gaussian(MU, COV), sched)
    kern = sde.hsm_kernel(t)
    a = kern.mean_coef
    B = 6
    z = torch.randn(B, k, 1, 4, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    y = torch.tensor([0.7, 0.5, 9.0, 9.0], dtype=torch.float64).reshape(1, 1, 1, 4).expand(B, -1, -1, -1)  # 9: ignored
    eps, g, info = tweedie_correction(lambda zz: unet(zz, torch.tensor(t * 1000.0)).sample, z, y, MASK.expand(B, -1, -1, -1),
                                      a, kern.cov, kern.chol, t=t, cg_iters=4, cg_tol=1e-10, ridge=0.0)
    # closed form from the joint Gaussian of (x₀, z_t): z = a⊗x₀ + (L⊗I)ε
    eye = torch.eye(d, dtype=torch.float64)
    cov_z = torch.kron(torch.outer(a, a), COV) + torch.kron(kern.cov, eye)
    cov_xz = torch.kron(a[None], COV)
    gain = cov_xz @ torch.linalg.inv(cov_z)  # ∂E[x₀|z]/∂z
    post_mean = MU + (gain @ (z.reshape(B, -1) - torch.kron(a, MU)).T).T
    post_cov = COV - gain @ cov_xz.T
    resid = y.reshape(B, 4)[:, KNOWN] - post_mean[:, KNOWN]
    ref = (gain[KNOWN].T @ torch.linalg.solve(post_cov[KNOWN][:, KNOWN], resid.T)).T.reshape(B, k, d)
    ref[:, :, KNOWN] = 0.0  # applied on the unknown entries of every component only
    torch.testing.assert_close(g.reshape(B, k, d), ref, rtol=1e-8, atol=1e-10 * ref.abs().max().item())
    assert ref[:, :, UNKNOWN].abs().max() > 1e-3  # not a vacuous comparison
    torch.testing.assert_close(eps, unet(z, torch.tensor(t * 1000.0)).sample)  # the ε the sampler needs, same forward
    assert info.cg_iters <= len(KNOWN) + 1 and info.max_rel_residual < 1e-8 and info.dropped == 0


@pytest.mark.parametrize(
    "sched, steps",
    # PF-Heun at an odd NFE: Heun steps only (an even NFE adds one probability-flow Euler step before the final call)
    [(PSLDScheduler(striding="quadratic"), 200), (PSLDScheduler(sampler="pf_heun"), 101)],
    ids=["em", "pf_heun"],
)
def test_tweedie_inpainting_matches_conditional(sched, steps):
    """Correlated 4-d Gaussian, known pixels ~3 sd out: mean and covariance of the filled-in pixels within 4 s.e.
    (n = 4000); plain replacement with the same seed is > 20 s.e. off in the mean."""
    image = torch.tensor([0.85, 0.75, 0.5, 0.5]).reshape(1, 1, 1, 4)
    cmean, ccov = conditional(MU, COV, image.reshape(4)[:2].double() * 2 - 1)
    n = 4000
    images, z, pipe = inpaint(MU, COV, image, sched, n=n, steps=steps, inpaint_correction="tweedie", return_pipe=True)
    assert_moments_within(z[:, 0, 0, 2:].double(), cmean, ccov, n_se=4.0)
    torch.testing.assert_close(images[:, 0, 0, :2], image[0, 0, 0, :2].expand(n, -1), atol=1e-6, rtol=0)  # known kept
    assert len(pipe.inpaint_info) == steps and all(info.dropped == 0 for info in pipe.inpaint_info)
    _, z_rep = inpaint(MU, COV, image, sched, n=n, steps=steps, inpaint_correction="replace")
    se = (ccov.diagonal() / n).sqrt()
    assert ((z_rep[:, 0, 0, 2:].double().mean(0) - cmean) / se).abs().min() > 20  # the bias the correction removes


def _smooth_cov_3x3():
    """Image-like correlated 3×3 Gaussian: squared-exponential covariance over pixel positions (non-diagonal)."""
    ij = torch.stack(torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij"), -1).reshape(9, 2).double()
    dist2 = ((ij[:, None] - ij[None]) ** 2).sum(-1)
    sd = torch.linspace(0.15, 0.3, 9, dtype=torch.float64)
    cov = torch.exp(-dist2 / 2.0) * sd[:, None] * sd[None] + 1e-3 * torch.eye(9, dtype=torch.float64)
    mu = torch.linspace(-0.2, 0.2, 9, dtype=torch.float64)
    return mu, cov


def test_tweedie_inpainting_3x3_sscs():
    """SSCS on a 1×3×3 image: the left column known (far from its mean), the 6 other pixels filled in."""
    mu, cov = _smooth_cov_3x3()
    mask = torch.zeros(1, 1, 3, 3)
    mask[..., 0] = 1.0
    known = mask.reshape(9).bool()
    x_known = torch.tensor([0.5, 0.55, 0.6], dtype=torch.float64)  # ≥ 2.5 sd from the mean
    img = torch.full((9,), 0.5, dtype=torch.float64)
    img[known] = x_known / 2 + 0.5
    image = img.float().reshape(1, 1, 3, 3)
    skk, suk = cov[known][:, known], cov[~known][:, known]
    cmean = mu[~known] + suk @ torch.linalg.solve(skk, x_known - mu[known])
    ccov = cov[~known][:, ~known] - suk @ torch.linalg.solve(skk, suk.T)
    n = 3000
    _, z = inpaint(mu, cov, image, SSCSScheduler(striding="quadratic"), n=n, steps=150, mask=mask, inpaint_correction="tweedie")
    assert_moments_within(z[:, 0].reshape(n, 9)[:, ~known].double(), cmean, ccov, n_se=4.0)


@pytest.mark.parametrize(
    "sched",
    [PSLDScheduler(), PSLDScheduler(sampler="pf_euler"), SSCSScheduler(), ConjugateScheduler(),
     ConjugateScheduler(conjugate_b="identity", conjugate_lambda=0.5), SplittingScheduler(), SplittingScheduler(sampler="nvv"),
     SplittingScheduler(sampler="cvv"), GDDIMMultistepScheduler(), PSLDScheduler(diffusion="vp")],
    ids=["em", "pf_euler", "sscs", "conjugate", "conjugate_identity", "roba", "nvv", "cvv", "gddim_multistep", "vp"],
)
def test_tweedie_works_with_every_scheduler(sched):
    """Every scheduler class: finite output, known data exact, one diagnostics entry per model call, and the
    filled-in mean moves towards the conditional mean (further than plain replacement, same seed)."""
    image = torch.tensor([0.85, 0.75, 0.5, 0.5]).reshape(1, 1, 1, 4)
    cmean, _ = conditional(MU, COV, image.reshape(4)[:2].double() * 2 - 1)
    n, steps = 400, 60
    images, z, pipe = inpaint(MU, COV, image, sched, n=n, steps=steps, inpaint_correction="tweedie", return_pipe=True)
    assert torch.isfinite(z).all()
    torch.testing.assert_close(images[:, 0, 0, :2], image[0, 0, 0, :2].expand(n, -1), atol=1e-6, rtol=0)
    assert len(pipe.inpaint_info) == steps
    _, z_rep = inpaint(MU, COV, image, sched, n=n, steps=steps)
    err_t = (z[:, 0, 0, 2:].double().mean(0) - cmean).abs()
    err_r = (z_rep[:, 0, 0, 2:].double().mean(0) - cmean).abs()
    assert torch.all(err_t < 0.5 * err_r), (err_t, err_r)


def test_tweedie_guard_indefinite_posterior_covariance(caplog):
    """A "network" whose implied Cov(x₀|z_t) is negative: the correction is dropped (plain replacement, bit-identical
    with the same generator), no NaN, and a warning names the problem."""
    image = torch.tensor([0.85, 0.75, 0.5, 0.5]).reshape(1, 1, 1, 4)
    sched = PSLDScheduler()
    unet = LinearEpsUNet(in_channels=2, out_channels=2, sample_size=(1, 4), alpha=500.0)  # x̂₀ = w(I - αL) z: C < 0 at every call
    pipe = PSLDPipeline(unet=unet, scheduler=sched)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(batch_size=8, num_inference_steps=10, image=image, mask_image=MASK, output_type="pt")
    with caplog.at_level("WARNING"):
        out_t = pipe(generator=torch.Generator().manual_seed(0), inpaint_correction="tweedie", **kw).images
    assert "not positive definite" in caplog.text
    assert all(info.dropped == 8 for info in pipe.inpaint_info)
    out_r = pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert torch.isfinite(out_t).all()
    torch.testing.assert_close(out_t, out_r, atol=0, rtol=0)


def test_tweedie_cg_guard_non_spd_operator():
    """A linear "network" with a random non-symmetric Jacobian (C_KK neither symmetric nor definite, as for a trained
    UNet): CG returns its best iterate (residual never above the start), the guards fire, g is finite."""
    torch.manual_seed(0)
    k, d, B = 2, 16, 6
    M = torch.randn(k * d, k * d, dtype=torch.float64) * 0.3
    model_fn = lambda zz: (zz.reshape(B, -1) @ M.T).reshape(zz.shape)  # noqa: E731
    kern = PSLDScheduler().sde.hsm_kernel(0.3)
    z = torch.randn(B, k, 4, 4, dtype=torch.float64)
    y = torch.rand(B, 1, 4, 4, dtype=torch.float64) * 2 - 1
    mask = torch.zeros(B, 1, 4, 4)
    mask[..., :2] = 1
    _, g, info = tweedie_correction(model_fn, z, y, mask, kern.mean_coef, kern.cov, kern.chol, cg_iters=16, cg_tol=1e-8)
    assert torch.isfinite(g).all() and g.abs().max() > 0
    assert info.max_rel_residual <= 1.0 and info.median_rel_residual < 0.9, info  # best iterate: improves, never worse
    assert info.stalled > 0, info  # plain CG's residual grows on this operator; CG stopped there


def test_tweedie_runs_on_a_real_unet_in_bf16():
    """A real UNet2DModel (float32 and bf16 weights): the VJP route works; finite output, known pixels kept."""
    image = torch.rand(1, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(8, 8)
    mask[:, :4] = 1
    for dtype in (torch.float32, torch.bfloat16):
        pipe = PSLDPipeline(unet=tiny_unet().to(dtype), scheduler=PSLDScheduler())
        pipe.set_progress_bar_config(disable=True)
        out = pipe(batch_size=2, num_inference_steps=4, image=image, mask_image=mask, output_type="pt",
                   inpaint_correction="tweedie", inpaint_cg_iters=3, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.images).all()
        torch.testing.assert_close(out.images[..., :4], image[..., :4].expand(2, -1, -1, -1), atol=1e-6, rtol=0)
        assert all(1 <= info.cg_iters <= 3 for info in pipe.inpaint_info)


# --------------------------------------------------------------------------- input handling
@pytest.fixture(scope="module")
def pipe():
    p = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    p.set_progress_bar_config(disable=True)
    return p


def test_pil_and_numpy_inputs(pipe):
    rng = np.random.default_rng(0)
    arr = (rng.random((8, 8)) * 255).astype(np.uint8)
    img = PIL.Image.fromarray(arr, mode="L")
    mask = np.zeros((8, 8), dtype=np.uint8)
    mask[:, :4] = 255
    out = pipe(batch_size=2, num_inference_steps=3, image=img, mask_image=PIL.Image.fromarray(mask), output_type="np")
    assert out.images.shape == (2, 8, 8, 1)
    np.testing.assert_allclose(out.images[:, :, :4, 0], np.broadcast_to(arr[:, :4] / 255.0, (2, 8, 4)), atol=1e-6)
    out2 = pipe(batch_size=1, num_inference_steps=3, image=arr.astype(np.float32)[..., None] / 255.0,
                mask_image=mask.astype(np.float32) / 255.0, output_type="pt")
    torch.testing.assert_close(out2.images[0, 0, :, :4], torch.from_numpy(arr[:, :4] / 255.0).float(), atol=1e-6, rtol=0)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(4, 4)), "mask_image"),
        (dict(image=torch.rand(1, 1, 8, 8) + 1.0, mask_image=torch.ones(8, 8)), "image"),
        (dict(image=-torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8)), "image"),
        (dict(image=torch.rand(1, 3, 8, 8), mask_image=torch.ones(8, 8)), "image"),
        (dict(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8) * 2), "mask_image"),
        (dict(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(1, 2, 8, 8)), "mask_image"),
        (dict(image=torch.rand(3, 1, 8, 8), mask_image=torch.ones(8, 8)), "image"),
        (dict(image=torch.rand(1, 1, 8, 8)), "mask_image"),
        (dict(image="foo", mask_image=torch.ones(8, 8)), "image"),
        (dict(image=torch.rand(1, 1, 7, 7), mask_image=torch.ones(7, 7)), "image"),  # not divisible by the UNet's 2
        (dict(image=torch.rand(1, 1, 0, 0), mask_image=torch.ones(0, 0)), "image"),  # empty
        (dict(image=torch.rand(0, 1, 8, 8), mask_image=torch.ones(8, 8)), "image"),  # no image
        (dict(image=np.zeros((0, 8, 8, 1), np.float32), mask_image=torch.ones(8, 8)), "image"),
        (dict(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(0, 8, 8)), "mask_image"),
        (dict(image=torch.randint(0, 2, (1, 1, 8, 8)), mask_image=torch.ones(8, 8)), "image"),  # integer tensor
        (dict(image=torch.rand(1, 1, 8, 8), mask_image="foo"), "mask_image"),
    ],
)
def test_bad_inpainting_inputs(pipe, kwargs, name):
    """Every bad image / mask fails before any network work, with an error naming the argument."""
    calls = []
    h = pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
            pipe(batch_size=2, num_inference_steps=2, **kwargs)
    finally:
        h.remove()
    assert not calls


def _pil(arr, mode=None):
    return PIL.Image.fromarray(arr) if mode is None else PIL.Image.fromarray(arr).convert(mode)


@pytest.mark.parametrize(
    "kwargs, name, match",
    [
        (dict(image=_pil(np.full((8, 8), 70000, np.int32))), "image", r"\[0, 65535\]"),  # mode "I" beyond 16 bit
        (dict(image=_pil(np.full((8, 8), -1, np.int32))), "image", r"\[0, 65535\]"),
        (dict(image=_pil(np.full((8, 8), 200.0, np.float32))), "image", r"\[0, 1\]"),  # mode "F"
        (dict(image=_pil(np.full((8, 8), -3.0, np.float32))), "image", r"\[0, 1\]"),
        (dict(image=_pil(np.full((8, 8, 4), 128, np.uint8))), "image", "alpha"),  # RGBA on a 1-channel model
        (dict(image=_pil(np.full((8, 8), 128, np.uint8), "LA")), "image", "alpha"),
        (dict(mask_image=_pil(np.full((8, 8), 2.0, np.float32))), "mask_image", r"\[0, 1\]"),
        (dict(mask_image=_pil(np.full((8, 8), 70000, np.int32))), "mask_image", r"\[0, 65535\]"),
        (dict(mask_image=_pil(np.full((8, 8, 4), 255, np.uint8))), "mask_image", "alpha"),
    ],
)
def test_pil_images_beyond_8_bit_or_with_alpha_are_refused_not_clipped(pipe, kwargs, name, match):
    args = dict(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8))
    args.update(kwargs)
    with pytest.raises(ValueError, match=f"`{name}`") as info:
        pipe(batch_size=1, num_inference_steps=2, **args)
    assert re.search(match, str(info.value)), str(info.value)


@pytest.mark.parametrize(
    "img, value",
    [
        (_pil(np.full((8, 8), 30000, np.uint16)), 30000 / 65535),  # "I;16"
        (_pil(np.full((8, 8), 30000, np.int32)), 30000 / 65535),  # "I": read as 16-bit data
        (_pil(np.full((8, 8), 0.25, np.float32)), 0.25),  # "F" in [0, 1]: as is
        (_pil(np.full((8, 8), 64, np.uint8)), 64 / 255),  # 8-bit "L"
    ],
)
def test_pil_images_are_read_by_bit_depth(pipe, img, value):
    """Known pixels keep the image's value: 16-bit data is divided by 65535, not clipped to 1."""
    mask16 = _pil(np.full((8, 8), 65535, np.uint16))  # all known, also a 16-bit mask
    out = pipe(batch_size=1, num_inference_steps=2, image=img, mask_image=mask16, output_type="np")
    np.testing.assert_allclose(out.images, value, atol=1e-6)


def test_image_size_far_from_sample_size_warns(pipe, caplog):
    """A 40x40 image on the 8 px model runs (divisible) but warns: the network never saw that size."""
    with caplog.at_level("WARNING"):
        out = pipe(batch_size=1, num_inference_steps=2, image=torch.rand(1, 1, 40, 40), mask_image=torch.ones(40, 40),
                   output_type="pt")
    assert out.images.shape == (1, 1, 40, 40)
    assert "far from the UNet's sample_size" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING"):
        pipe(batch_size=1, num_inference_steps=2, image=torch.rand(1, 1, 16, 16), mask_image=torch.ones(16, 16), output_type="pt")
    assert "far from" not in caplog.text


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(inpaint_correction="dps"), "inpaint_correction"),
        (dict(inpaint_correction=1), "inpaint_correction"),
        (dict(inpaint_cg_iters=0), "inpaint_cg_iters"),
        (dict(inpaint_cg_iters=2.0), "inpaint_cg_iters"),
        (dict(inpaint_cg_iters=True), "inpaint_cg_iters"),
        (dict(inpaint_cg_tol=1.0), "inpaint_cg_tol"),
        (dict(inpaint_cg_tol=-1e-3), "inpaint_cg_tol"),
        (dict(inpaint_ridge=-1.0), "inpaint_ridge"),
        (dict(inpaint_ridge=float("nan")), "inpaint_ridge"),
        (dict(inpaint_ridge="1e-3"), "inpaint_ridge"),
    ],
)
def test_bad_inpaint_correction_arguments(pipe, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}`"):
        pipe(batch_size=2, num_inference_steps=2, image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8), **kwargs)


def test_tweedie_needs_an_image(pipe):
    with pytest.raises(ValueError, match="`inpaint_correction="):
        pipe(batch_size=2, num_inference_steps=2, inpaint_correction="tweedie")
    pipe(batch_size=1, num_inference_steps=2, inpaint_correction="replace", output_type="pt")  # the default: no image needed


def test_rgb_inpainting_with_a_one_channel_mask_returns_the_known_pixels():
    """A PIL mask is one channel; on 3-channel data the replacement must cover x and m of every channel
    (it failed with a shape error: the mask was repeated k times instead of k·C)."""
    import numpy as np
    import PIL.Image

    from diffusers_psld import PSLDPipeline, PSLDScheduler, build_unet

    torch.manual_seed(0)
    pipe = PSLDPipeline(unet=build_unet("tiny", 3, 2, sample_size=16), scheduler=PSLDScheduler())
    rgb = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[:, :8] = 255
    out = pipe(image=PIL.Image.fromarray(rgb), mask_image=PIL.Image.fromarray(mask), num_inference_steps=4,
               output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert out.shape == (1, 16, 16, 3)
    np.testing.assert_allclose(out[0, :, :8], rgb[:, :8] / 255.0, atol=1 / 255)


def test_image_size_beyond_the_bound_is_refused_naming_the_override(caplog):
    """8 px model: 64x64 (8x per side) runs; 72x72 (9x) is refused before any work, naming `max_size_factor`;
    lifting the bound runs it. Also for `latents=` and img2img."""
    from diffusers_psld import PSLDImg2ImgPipeline

    p = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    p.set_progress_bar_config(disable=True)
    assert p(batch_size=1, num_inference_steps=2, image=torch.rand(1, 1, 64, 64), mask_image=torch.ones(64, 64),
             output_type="pt").images.shape == (1, 1, 64, 64)
    big = dict(image=torch.rand(1, 1, 72, 72), mask_image=torch.ones(72, 72))
    msg = r"`image` size 72x72 is 9x the UNet's sample_size 8x8 per side, beyond the bound of 8x.*`pipe.max_size_factor = None`"
    with pytest.raises(ValueError, match=msg):
        p(batch_size=1, num_inference_steps=2, output_type="pt", **big)
    with pytest.raises(ValueError, match=r"`latents` size 8x72 is 9x"):
        p(batch_size=1, num_inference_steps=2, latents=torch.zeros(1, 2, 8, 72))
    i2i = PSLDImg2ImgPipeline(**p.components)
    with pytest.raises(ValueError, match=r"`image` size 72x72 is 9x"):
        i2i(image=big["image"], strength=0.5, num_inference_steps=2)
    p.max_size_factor = None
    assert p(batch_size=1, num_inference_steps=2, output_type="pt", **big).images.shape == (1, 1, 72, 72)
