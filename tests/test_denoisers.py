"""Denoisers D(y; σ) and the sufficient-statistic reduction, against independent exact routes.

References: x̂₀ = E[x₀ | y] for y = x₀ + σ n by Gaussian conditioning per mixture component (:func:`posterior_mean`),
and E[x₀ | z_t] of a recipe state by Gaussian conditioning in the k-component coordinates
(:func:`recipe_posterior_mean`); the wrapped networks compute their outputs by the score route
(:mod:`_exact_nets`). So a wrong sign or scale anywhere in a reduction, a wrapper's c_in / c_skip / c_out or a
time map shows up as a mismatch.
"""
import math

import numpy as np
import pytest
import torch
from _exact_nets import ExactContinuousVPNet, ExactDiscreteVPNet, ExactRecipeNet, Out, _Exact

from diffusers import DDPMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler, ScoreSdeVeScheduler
from diffusers_psld import PSLDScheduler
from diffusers_psld import parameterization as P
from diffusers_psld.denoisers import (ContinuousVPDenoiser, DiscreteVPDenoiser, EDMDenoiser, RecipeDenoiser,
                                      VPEpsilonModel, denoiser_for_scheduler, sufficient_statistic)
from diffusers_psld.sde.noise_level import NoiseLevel
from diffusers_psld.denoisers.vp import discrete_alphas_cumprod
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sde import RecipeSDE

D = 4  # data dimensions = 1 channel x 2 x 2 pixels
DATA = GaussianMixture([0.35, 0.65], [[-0.6, 0.3, 0.1, -0.2], [0.5, -0.4, 0.2, 0.3]],
                       [torch.diag(torch.tensor([0.04, 0.09, 0.02, 0.05])).tolist(),
                        (0.03 * torch.eye(D) + 0.01).tolist()])
SCHEDS = {"psld": dict(), "cld": dict(gamma=0.0, nu=4.0), "vp": dict(diffusion="vp"), "psld_g0.25": dict(gamma=0.25, nu=4.25)}


def posterior_mean(y: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """E[x₀ | x₀ + σ n = y] (``y`` ``[B, D]``, σ ``[B]``) by Gaussian conditioning per component."""
    out = []
    for yi, si in zip(y, sigma):
        logps, means = [], []
        for w, mu, S in zip(DATA.weights, DATA.means, DATA.covs):
            cy = S + float(si) ** 2 * torch.eye(D, dtype=torch.float64)
            logps.append(torch.distributions.MultivariateNormal(mu, covariance_matrix=cy).log_prob(yi) + torch.log(w))
            means.append(mu + S @ torch.linalg.solve(cy, yi - mu))
        r = torch.softmax(torch.stack(logps), 0)
        out.append((r[:, None] * torch.stack(means)).sum(0))
    return torch.stack(out)


def recipe_posterior_mean(sde: RecipeSDE, z: torch.Tensor, t: float) -> torch.Tensor:
    """E[x₀ | z_t] for states ``z`` ``[B, k*D]`` by Gaussian conditioning on the whole state (no reduction)."""
    kern = sde.hsm_kernel(float(t))
    A = torch.kron(kern.mean_coef[:, None], torch.eye(D, dtype=torch.float64))
    noise = torch.kron(kern.cov, torch.eye(D, dtype=torch.float64))
    logps, means = [], []
    for w, mu, S in zip(DATA.weights, DATA.means, DATA.covs):
        cz = A @ S @ A.T + noise
        logps.append(torch.distributions.MultivariateNormal(A @ mu, covariance_matrix=cz).log_prob(z) + torch.log(w))
        means.append(mu + (z - A @ mu) @ (S @ A.T @ torch.linalg.inv(cz)).T)
    r = torch.softmax(torch.stack(logps), 0)
    return (r[..., None] * torch.stack(means)).sum(0)


def draw_state(sde, t, n, seed):
    g = torch.Generator().manual_seed(seed)
    x0 = DATA.sample(n, generator=g)
    kern = sde.hsm_kernel(float(t))
    eps = torch.randn(n, sde.k, D, dtype=torch.float64, generator=g)
    z = kern.mean_coef[None, :, None] * x0[:, None, :] + torch.einsum("ij,bjn->bin", kern.chol, eps)
    return z.reshape(n, sde.k, 2, 2)


def noisy(sigma, n=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = DATA.sample(n, generator=g)
    sig = torch.as_tensor(sigma, dtype=torch.float64).expand(n)
    return (x0 + sig[:, None] * torch.randn(n, D, dtype=torch.float64, generator=g)).reshape(n, 1, 2, 2), sig


# ---------------------------------------------------------------------------------------------- the reduction
@pytest.mark.parametrize("name", ["psld", "cld", "vp", "psld_g0.25"])
def test_sufficient_statistic_tables_against_dense_formulas(name):
    sde = PSLDScheduler(**SCHEDS[name]).sde
    t = torch.tensor([1e-5, 1e-3, 0.05, 0.4, 1.0], dtype=torch.float64)
    kern = sde.hsm_kernel(t)
    c, sigma = P.sufficient_statistic(kern.mean_coef, kern.chol)
    for i in range(len(t)):
        a, S = kern.mean_coef[i], kern.cov[i]
        prec_a = torch.linalg.solve(S, a)
        s2 = 1.0 / (a @ prec_a)
        torch.testing.assert_close(sigma[i] ** 2, s2, rtol=1e-12, atol=0)
        torch.testing.assert_close(c[i], s2 * prec_a, rtol=1e-12, atol=1e-300)
        # y = cᵀz = x₀ + σ n: unbiased (cᵀa = 1) with variance cᵀΣc = σ²
        assert abs(float(c[i] @ a) - 1.0) < 1e-14
        torch.testing.assert_close(c[i] @ S @ c[i], s2, rtol=1e-12, atol=0)
        # residual r = (I - a cᵀ) z: covariance Σ - σ²aaᵀ = M Mᵀ, uncorrelated with y
        M = P.residual_factor(a, kern.chol[i])
        R = torch.eye(sde.k, dtype=torch.float64) - torch.outer(a, c[i])
        torch.testing.assert_close(M @ M.T, R @ S @ R.T, rtol=0, atol=1e-12 * float(S.abs().max()))
        assert float((R @ S @ c[i]).abs().max()) <= 1e-12 * float(S.abs().max())


def test_sufficient_statistic_monte_carlo_law():
    """y of forward-kernel draws is x₀ + σ n: (y - x₀)/σ has mean 0, variance 1 and is uncorrelated with the residual."""
    sched = PSLDScheduler()
    g = torch.Generator().manual_seed(3)
    n, t = 100_000, 0.3
    x0 = torch.randn(n, 1, 1, 1, dtype=torch.float64, generator=g)
    z = sched.add_noise(x0, torch.randn(n, 2, 1, 1, dtype=torch.float64, generator=g), t)
    y, sigma = sufficient_statistic(sched, z, t)
    e = ((y - x0) / sigma[0]).reshape(-1)
    assert abs(float(e.mean())) < 0.015 and abs(float(e.var()) - 1) < 0.015  # 3.3 and 3.4 standard errors
    r = z.reshape(n, 2) - sched.sde.hsm_kernel(t).mean_coef[None] * y.reshape(n, 1)
    assert float((r * e[:, None]).mean(0).abs().max()) < 0.015 * float(r.std(0).max())


# ---------------------------------------------------------------------------------------------- VP sources
@pytest.mark.parametrize("name", ["psld", "cld", "psld_g0.25"])
def test_continuous_vp_wrapper_gives_recipe_exact_x0(name):
    """An exact VP-SDE ε-network, wrapped, gives PSLD's / CLD's exact E[x₀ | z_t] at 24 times to 1e-10."""
    sched = PSLDScheduler(**SCHEDS[name])
    den = ContinuousVPDenoiser(ExactContinuousVPNet(DATA), t_min=1e-12, t_max=3.0)
    worst = 0.0
    for i, t in enumerate(np.geomspace(1e-4, 1.0, 24)):
        z = draw_state(sched.sde, t, 3, seed=i)
        y, sigma = sufficient_statistic(sched, z, float(t))
        got = den(y, sigma).reshape(3, D)
        ref = recipe_posterior_mean(sched.sde, z.reshape(3, -1), float(t))
        worst = max(worst, float((got - ref).abs().max()))
    assert worst <= 1e-10


def test_continuous_vp_time_map_and_clamp():
    net = ExactContinuousVPNet(DATA)
    den = ContinuousVPDenoiser(net)  # trained range t ∈ [1e-5, 1]
    sde = RecipeSDE.vp()
    t = torch.tensor([1e-5, 3e-3, 0.2, 0.77, 1.0], dtype=torch.float64)
    kern = sde.hsm_kernel(t)
    sigma = P.sufficient_statistic(kern.mean_coef, kern.chol)[1]
    torch.testing.assert_close(den.sigma_to_time(sigma), t, rtol=1e-13, atol=0)
    lo, hi = den.sigma_range
    assert lo == pytest.approx(1.0005e-3, rel=1e-4) and hi == pytest.approx(152.17, rel=1e-4)
    # above σ_max: the time clamps to t_max, the input keeps the exact scale 1/√(1+σ²)
    y, sig = noisy(400.0)
    net.calls.clear()
    x0 = den(y, sig)
    assert float(net.calls[0].max()) == 1.0 and torch.isfinite(x0).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_wrapper_exact_at_table_sigmas(prediction_type):
    cfg = DDPMScheduler(prediction_type=prediction_type).config
    ac = discrete_alphas_cumprod(cfg)
    net = ExactDiscreteVPNet(DATA, ac, prediction_type)
    den = DiscreteVPDenoiser(net, cfg)
    taus = torch.tensor([0, 1, 17, 250, 999, 500], dtype=torch.float64)
    sig = den.timestep_to_sigma(taus)  # the table: σ_τ = √((1 - ᾱ_τ)/ᾱ_τ)
    torch.testing.assert_close(sig, ((1 - ac[taus.long()]) / ac[taus.long()]).sqrt(), rtol=1e-14, atol=0)
    y = torch.randn(6, 1, 2, 2, dtype=torch.float64) * (1 + sig.reshape(-1, 1, 1, 1))
    net.calls.clear()
    got = den(y, sig)
    assert torch.equal(net.calls[0], taus)  # the network sees exactly its integer training timesteps
    torch.testing.assert_close(got.reshape(6, D), posterior_mean(y.reshape(6, D), sig), rtol=0, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_discrete_wrapper_between_table_sigmas(prediction_type):
    """Log-σ interpolation is exact for a network that continues its table log-linearly in σ; for one that
    continues it geometrically (a fractional DDPM step) the error is the documented noise-level gap."""
    cfg = DDPMScheduler(prediction_type=prediction_type).config
    ac = discrete_alphas_cumprod(cfg)
    sig = torch.tensor([0.0123, 0.05, 0.4, 3.3, 40.0, 150.0], dtype=torch.float64)
    y, _ = noisy(1.0, n=6)
    y = y + torch.randn_like(y) * sig.reshape(-1, 1, 1, 1)
    ref = posterior_mean(y.reshape(6, D), sig)
    den = DiscreteVPDenoiser(ExactDiscreteVPNet(DATA, ac, prediction_type), cfg)
    torch.testing.assert_close(den(y, sig).reshape(6, D), ref, rtol=0, atol=1e-10)
    la = torch.log(ac)

    def geometric(tau):
        lo = min(int(tau), len(ac) - 2)
        return math.exp(float(la[lo] + (tau - lo) * (la[lo + 1] - la[lo])))

    net = ExactDiscreteVPNet(DATA, ac, prediction_type, continuation=geometric)
    den = DiscreteVPDenoiser(net, cfg)
    err = (den(y, sig).reshape(6, D) - ref).abs().max(1).values
    tau = den.sigma_to_timestep(sig)
    sig_net = torch.tensor([math.sqrt((1 - geometric(float(u))) / geometric(float(u))) for u in tau], dtype=torch.float64)
    dlog = (torch.log(sig_net) - torch.log(sig)).abs()
    assert float(dlog.max()) <= 0.0385 and float(dlog[tau >= 10].max()) <= 1.2e-3
    # first-order bound: |x̂₀ error| <= ~|Δσ| · |∂D/∂σ|, ∂D/∂σ by central differences of the exact posterior mean
    h = 1e-6 * sig
    dD = ((posterior_mean(y.reshape(6, D), sig + h) - posterior_mean(y.reshape(6, D), sig - h)) / (2 * h[:, None])).abs().max(1).values
    bound = sig * (torch.exp(dlog) - 1) * (dD + 1 / sig)  # the ε/v read-out adds ~|Δσ|·|ε| (|ε| ~ 1)
    assert bool((err <= 2 * bound + 1e-12).all()), (err, bound)
    assert float(err.max()) > 1e-9  # the geometric network really differs (the test can fail)


def test_discrete_learned_variance_reads_first_channels():
    cfg = dict(DDPMScheduler(variance_type="learned_range").config)
    ac = discrete_alphas_cumprod(cfg)
    net = ExactDiscreteVPNet(DATA, ac)
    base = net.forward
    net.forward = lambda x, t, class_labels=None: Out(sample=torch.cat([base(x, t).sample, 100 + x], 1))  # + variance channels
    net.config.out_channels = 2
    den = DiscreteVPDenoiser(net, cfg)
    y, sig = noisy(0.3)
    torch.testing.assert_close(den(y, sig).reshape(4, D), posterior_mean(y.reshape(4, D), sig), rtol=0, atol=1e-10)


# ---------------------------------------------------------------------------------------------- EDM / σ-conditioned
class ExactEDMNet(_Exact):
    """Exact F of EDM's preconditioning: recovers σ from c_noise and y from c_in·y, returns (x̂₀ - c_skip y)/c_out."""

    def __init__(self, sigma_data=0.5, prediction_type="epsilon"):
        super().__init__(DATA, 1, 1, 2)
        self.sd, self.sign = sigma_data, (1.0 if prediction_type == "epsilon" else -1.0)

    def forward(self, x, c_noise, class_labels=None):
        sig = torch.exp(4 * c_noise.to(torch.float64)).reshape(-1).expand(x.shape[0])
        c_in = (sig ** 2 + self.sd ** 2).rsqrt()
        y = x.to(torch.float64) / c_in.reshape(-1, 1, 1, 1)
        x0 = posterior_mean(y.reshape(-1, D), sig).reshape(y.shape)
        c_skip = self.sd ** 2 / (sig ** 2 + self.sd ** 2)
        c_out = self.sign * sig * self.sd * c_in
        return Out(sample=(x0 - c_skip.reshape(-1, 1, 1, 1) * y) / c_out.reshape(-1, 1, 1, 1))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_edm_wrapper_exact_and_matches_diffusers_conventions(prediction_type):
    sched = EDMEulerScheduler(sigma_data=0.5, prediction_type=prediction_type)
    den = denoiser_for_scheduler(ExactEDMNet(0.5, prediction_type), sched)
    assert isinstance(den, EDMDenoiser)
    sig = torch.tensor([0.003, 0.2, 1.0, 7.0, 60.0], dtype=torch.float64)
    y = torch.randn(5, 1, 2, 2, dtype=torch.float64) * (0.5 + sig.reshape(-1, 1, 1, 1))
    torch.testing.assert_close(den(y, sig).reshape(5, D), posterior_mean(y.reshape(5, D), sig), rtol=0, atol=1e-10)
    # diffusers' own preconditioning of an arbitrary network output gives the wrapper's x̂₀
    F = torch.randn(5, 1, 2, 2, dtype=torch.float64)
    net = _Exact(DATA, 1, 1, 2)
    seen = {}

    def fwd(x, c_noise, class_labels=None):
        seen["x"], seen["c"] = x, c_noise
        return Out(sample=F)

    net.forward = fwd
    den = EDMDenoiser(net, sigma_data=0.5, prediction_type=prediction_type)
    got = den(y, sig)
    s = sig.reshape(-1, 1, 1, 1)
    torch.testing.assert_close(seen["x"], sched.precondition_inputs(y, s), rtol=1e-14, atol=0)
    torch.testing.assert_close(seen["c"], sched.precondition_noise(sig), rtol=1e-14, atol=0)
    torch.testing.assert_close(got, sched.precondition_outputs(y, F, s), rtol=1e-13, atol=1e-15)


def test_euler_continuous_v_prediction_matches_diffusers():
    sched = EulerDiscreteScheduler(timestep_type="continuous", prediction_type="v_prediction")
    F = torch.randn(1, 1, 2, 2, dtype=torch.float64)
    net = _Exact(DATA, 1, 1, 2)
    seen = {}

    def fwd(x, c_noise, class_labels=None):
        seen["x"], seen["c"] = x, c_noise
        return Out(sample=F)

    net.forward = fwd
    den = denoiser_for_scheduler(net, sched)
    assert isinstance(den, EDMDenoiser) and den.config.preconditioning == "vp"
    sched.set_timesteps(10)
    for i in (0, 4, 9):
        sched._step_index = None
        sig = sched.sigmas[i].to(torch.float64)
        x = torch.randn(1, 1, 2, 2, dtype=torch.float64) * float((1 + sig ** 2).sqrt())
        got = den(x, sig)
        torch.testing.assert_close(seen["x"], sched.scale_model_input(x, sched.timesteps[i]).to(torch.float64), rtol=1e-6, atol=0)
        assert float(seen["c"]) == pytest.approx(float(sched.timesteps[i]), rel=1e-6)
        ref = sched.step(F, sched.timesteps[i], x).pred_original_sample
        torch.testing.assert_close(got, ref.to(torch.float64), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------------------------------------- this package's networks
CASES = [("psld", "epsilon", False), ("psld", "sample", False), ("psld", "sufficient_epsilon", False),
         ("psld", "epsilon", True), ("cld", "epsilon", False), ("cld", "sufficient_epsilon", True),
         ("vp", "epsilon", False), ("vp", "sample", True)]


@pytest.mark.parametrize("name,ptype,precond", CASES)
def test_recipe_denoiser_exact(name, ptype, precond):
    """Every recipe and prediction_type (preconditioned or not), both residual modes: D(y; σ) = E[x₀ | y] to 1e-10."""
    sched = PSLDScheduler(**SCHEDS[name], prediction_type=ptype, input_preconditioning=precond)
    net = ExactRecipeNet(DATA, sched, garbage_eps_x=(name == "cld" and ptype == "epsilon"))
    s_max = RecipeDenoiser(net, sched).sigma_range[1]  # σ at t = 1: 257.7 (PSLD), 247.6 (CLD), 152.2 (VP)
    sig = torch.tensor([2e-3, 0.05, 0.7, 9.0, 0.99 * s_max], dtype=torch.float64)
    y = torch.randn(5, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * (0.5 + sig.reshape(-1, 1, 1, 1))
    ref = posterior_mean(y.reshape(5, D), sig)
    for residual in ("sample", "zero"):
        den = RecipeDenoiser(net, sched, residual=residual, residual_seed=0)
        torch.testing.assert_close(den(y, sig).reshape(5, D), ref, rtol=0, atol=1e-10)
    # beyond the training range the state is built at the exact t(σ) > 1 and only the network's time is clamped to 1
    net.calls.clear()
    x0 = den(y[:1], 1.5 * s_max)
    assert float(net.calls[0].max()) == 1.0 and bool(torch.isfinite(x0).all())


@pytest.mark.parametrize("name", ["psld", "cld", "vp"])
def test_sigma_to_time_inversion(name):
    inv = NoiseLevel(PSLDScheduler(**SCHEDS[name]).sde)
    t = torch.tensor([1e-7, 1e-5, 4e-4, 0.013, 0.25, 0.5, 0.999, 1.0, 1.7], dtype=torch.float64)
    sig = inv.sigma(t)
    back = inv.time(sig)
    torch.testing.assert_close(inv.sigma(back), sig, rtol=1e-12, atol=0)
    torch.testing.assert_close(back, t, rtol=1e-9, atol=0)


def test_recipe_residual_law_and_seed():
    """The drawn residual has the law M ξ (Monte Carlo, through what the network sees), seeded reproducibly."""
    sched = PSLDScheduler()
    seen = []

    class Spy(ExactRecipeNet):
        def forward(self, x, t, class_labels=None):
            seen.append(x.clone())
            return Out(sample=torch.zeros_like(x))

    den = RecipeDenoiser(Spy(DATA, sched), sched, residual_seed=5)
    n, s = 20000, 0.8
    y = torch.zeros(n, 1, 2, 2, dtype=torch.float64)
    den(y, s)
    t = float(den.sigma_to_time(torch.tensor([s], dtype=torch.float64)))
    kern = sched.sde.hsm_kernel(t)
    target = kern.cov - s ** 2 * torch.outer(kern.mean_coef, kern.mean_coef)
    z = seen[-1].reshape(n, 2, D).permute(0, 2, 1).reshape(-1, 2)
    torch.testing.assert_close(z.T @ z / z.shape[0], target, rtol=0, atol=0.03 * float(target.abs().max()))
    den.manual_seed(5)
    den(y[:4], s)
    den.manual_seed(5)
    den(y[:4], s)
    assert torch.equal(seen[-1], seen[-2])
    den(y[:4], s, generator=torch.Generator().manual_seed(6))
    assert not torch.equal(seen[-1], seen[-2])


# ---------------------------------------------------------------------------------------------- VP ε-model (to_vp)
def test_vp_epsilon_model_answers_exact_vp_eps():
    from _exact_nets import vp_eps

    den = ContinuousVPDenoiser(ExactContinuousVPNet(DATA), t_min=1e-12, t_max=3.0)
    model = VPEpsilonModel(den)
    ac = discrete_alphas_cumprod(model.config.scheduler_config)
    assert model.config.in_channels == model.config.out_channels == 1 and model.config.sample_size == 2
    for tau in (0, 3, 100, 999):
        x = torch.randn(3, 1, 2, 2, dtype=torch.float64)
        got = model(x, torch.tensor(tau)).sample
        ref = vp_eps(DATA, x.reshape(3, D), float(ac[tau])).reshape(x.shape)
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-9)
    with pytest.raises(ValueError, match=r"timestep.*\[0, 999\]"):
        model(x, 1000)
    with pytest.raises(ValueError, match="timestep"):
        model(x, torch.tensor([1, 2]))


# ---------------------------------------------------------------------------------------------- bad inputs
def _tiny_unet(cin=1, cout=1, **kw):
    from diffusers import UNet2DModel

    return UNet2DModel(sample_size=8, in_channels=cin, out_channels=cout, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, **kw)


def test_bad_inputs_are_named():
    unet = _tiny_unet()
    den = denoiser_for_scheduler(unet, DDPMScheduler())
    y = torch.randn(2, 1, 8, 8)
    for bad in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="`sigma` must be finite noise levels > 0"):
            den(y, bad)
    with pytest.raises(ValueError, match="`sigma` must have 1 or 2"):
        den(y, torch.ones(3))
    with pytest.raises(TypeError, match="`sigma`"):
        den(y, "1.0")
    with pytest.raises(ValueError, match=r"`sample` must have shape \[B, 1"):
        den(torch.randn(2, 3, 8, 8), 1.0)
    # a network of this package (k*C in, C out) or any C -> C' network
    with pytest.raises(ValueError, match="in_channels=2, out_channels=1.*PSLDPipeline"):
        denoiser_for_scheduler(_tiny_unet(2, 1), DDPMScheduler())
    with pytest.raises(ValueError, match="in_channels=1, out_channels=3"):
        denoiser_for_scheduler(_tiny_unet(1, 3), DDPMScheduler())
    with pytest.raises(ValueError, match="diffusers_psld scheduler.*PSLDPipeline"):
        denoiser_for_scheduler(_tiny_unet(2, 2), PSLDScheduler())
    for sched in (ScoreSdeVeScheduler(), FlowMatchEulerDiscreteScheduler()):
        with pytest.raises(ValueError, match="not a scheduler family the bridge can read; supported: DDPM-family"):
            denoiser_for_scheduler(unet, sched)
    with pytest.raises(ValueError, match="beta_schedule='cubic'"):
        denoiser_for_scheduler(unet, dict(DDPMScheduler().config, beta_schedule="cubic"))
    with pytest.raises(ValueError, match=r"prediction_type.*one of \('epsilon', 'v_prediction', 'sample'\).*'flow'"):
        denoiser_for_scheduler(unet, dict(DDPMScheduler().config, prediction_type="flow"))
    with pytest.raises(ValueError, match="'epsilon' or 'v_prediction'"):
        denoiser_for_scheduler(unet, dict(EDMEulerScheduler().config, prediction_type="sample"))
    with pytest.raises(TypeError, match="vp_scheduler"):
        denoiser_for_scheduler(unet, 3)
    with pytest.raises(ValueError, match="residual"):
        RecipeDenoiser(_tiny_unet(2, 2), PSLDScheduler(), residual="mean")
    with pytest.raises(ValueError, match="out_channels=1"):  # the package's channel check for its own networks
        RecipeDenoiser(_tiny_unet(2, 1), PSLDScheduler())
    from diffusers import UNet2DConditionModel

    cond = UNet2DConditionModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), norm_num_groups=4, cross_attention_dim=8,
                                attention_head_dim=2)
    with pytest.raises(ValueError, match="text/image-conditioned network"):
        denoiser_for_scheduler(cond, DDPMScheduler())
    with pytest.raises(ValueError, match="class-conditional.*class_labels"):
        denoiser_for_scheduler(_tiny_unet(num_class_embeds=3), DDPMScheduler())(y, 1.0)
