"""PF-ODE likelihood: exact Gaussian references for VP and PSLD, Hutchinson unbiasedness, bpd offset."""
import math

import pytest
import torch

from diffusers_psld.evaluation import likelihood as lk
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sde import RecipeSDE



MEAN = torch.tensor([0.3, -0.2], dtype=torch.float64)
COV = torch.tensor([[0.20, 0.05], [0.05, 0.10]], dtype=torch.float64)
GM = GaussianMixture.gaussian(MEAN, COV)


def _data(n, seed=1):
    return GM.sample(n, torch.Generator().manual_seed(seed))


def _exact_logp(sde, z, t):
    """log p_t(z) of the joint Gaussian marginal at forward time t (states [B, k*d])."""
    means, covs, _ = GM.marginal(sde, t)
    return torch.distributions.MultivariateNormal(means[0], covs[0]).log_prob(z)


def _prior_mismatch(sde, z1):
    """log p_1(z1) - log prior(z1): the ODE NLL minus this is the exact -log p_eps(z0) up to the solver."""
    return _exact_logp(sde, z1, 1.0) - lk.prior_logp(sde, z1)


def test_bpd_offset_and_dequantize():
    assert lk.bpd_offset(256) == 7.0
    assert lk.bpd_offset(2) == 0.0
    assert lk.bpd_offset(32) == 4.0
    x = torch.tensor([[0, 255, 17]], dtype=torch.uint8)
    y = lk.dequantize(x, 256, torch.Generator().manual_seed(0))
    assert torch.all(y >= -1) and torch.all(y < 1)
    # each value stays in its own bin: 2 (k + u)/256 - 1 with u in [0, 1)
    k = torch.floor((y + 1) / 2 * 256)
    assert torch.equal(k, x.double())
    with pytest.raises(ValueError, match="n_bins"):
        lk.bpd_offset(1)
    with pytest.raises(ValueError, match="images"):
        lk.dequantize(torch.tensor([[300.0]]), 256)


def test_bpd_offset_matches_discrete_likelihood():
    """For a continuous density that is uniform inside each bin, the bound is tight: -log2 P(k)/d exactly."""
    # x in [-1, 1]^1 with density p(x) = 1/2 (uniform): every 8-bit level has P = 1/256 -> 8 bits
    nll_nats = -math.log(0.5)  # -log p(x), d = 1
    assert nll_nats / math.log(2) + lk.bpd_offset(256) == pytest.approx(8.0)


def test_vp_ode_equals_data_log_density_exact_trace():
    sde = RecipeSDE.vp()
    x = _data(3)
    r = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), x, eps=1e-5, rtol=1e-5, atol=1e-5, estimator="exact")
    true_nll = -torch.distributions.MultivariateNormal(MEAN, COV).log_prob(x)
    # transport is exact up to the solver; the prior N(0, I) differs from p_1 by a few 1e-3 nats
    assert torch.allclose(r.joint_nll - _prior_mismatch(sde, r.z1), true_nll, atol=5e-4)
    assert torch.allclose(r.nll, true_nll, atol=1e-2)
    assert torch.equal(r.nll, r.joint_nll)  # k = 1: no entropy correction
    assert torch.allclose(r.bpd, r.nll / (2 * math.log(2)))
    assert r.nfe > 10


def test_psld_ode_transports_joint_density_exact_trace():
    sde = RecipeSDE.psld()
    x = _data(2)
    z0 = lk.sample_aux(sde, x, torch.Generator().manual_seed(2))
    assert z0.shape == (2, 4)
    eps = 1e-2
    r = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), z0, eps=eps, rtol=1e-5, atol=1e-5, estimator="exact")
    ref = -_exact_logp(sde, z0, eps)
    assert torch.allclose(r.joint_nll - _prior_mismatch(sde, r.z1), ref, atol=5e-4)
    h = lk.aux_entropy(sde, 2)
    assert h == pytest.approx(0.5 * 2 * (1 + math.log(2 * math.pi * sde.kappa * float(sde.masses[1]))))
    assert torch.allclose(r.nll, r.joint_nll - h)


def _expected_bound(sde, x, eps):
    """Closed form of E_{m0 ~ N(0, κM)}[-log p_eps(x, m0)] - H(m0) for Gaussian data (d = 2, k = 2)."""
    means, covs, _ = GM.marginal(sde, eps)
    mu, C = means[0], covs[0]
    Cinv = torch.linalg.inv(C)
    d = x.shape[1]
    q = torch.zeros(2 * d, 2 * d, dtype=torch.float64)
    q[d:, d:] = torch.eye(d, dtype=torch.float64) * sde.kappa * sde.masses[1]
    vbar = torch.cat([x, torch.zeros_like(x)], 1) - mu
    quad = torch.einsum("bi,ij,bj->b", vbar, Cinv, vbar) + torch.trace(Cinv @ q)
    e_joint = 0.5 * torch.logdet(2 * math.pi * C) + 0.5 * quad
    return e_joint - lk.aux_entropy(sde, d)


@pytest.mark.parametrize("eps", [1e-5, 1e-3, 1e-2])
def test_psld_entropy_corrected_bound_closed_form(eps):
    """E[-log p_eps(x, m0)] - H(m0) = -log p_eps(x) + KL(q || p_eps(m0|x)) >= -log p_eps(x), -> -log p(x) as eps -> 0."""
    sde = RecipeSDE.psld()
    x = _data(5)
    bound = _expected_bound(sde, x, eps)
    means, covs, _ = GM.marginal(sde, eps)
    px_eps = torch.distributions.MultivariateNormal(means[0, :2], covs[0, :2, :2]).log_prob(x)
    assert torch.all(bound >= -px_eps - 1e-10)
    true_nll = -torch.distributions.MultivariateNormal(MEAN, COV).log_prob(x)
    if eps <= 1e-5:
        assert torch.allclose(bound, true_nll, atol=1e-3)


def test_hutchinson_divergence_is_unbiased():
    sde = RecipeSDE.psld()
    z = lk.sample_aux(sde, _data(1), torch.Generator().manual_seed(3)).repeat(4000, 1)
    t = 0.3
    _, S = sde.reverse_drift_matrices(t, probability_flow=True)
    zz = z.clone().requires_grad_(True)
    from diffusers_psld.sde import blocks

    g = blocks.apply(S, GM.score(sde, zz, t))
    exact = lk._exact_divergence(g, zz)
    gen = torch.Generator().manual_seed(0)
    for noise in ("rademacher", "gaussian"):
        if noise == "rademacher":
            v = (torch.randint(0, 2, z.shape, generator=gen) * 2 - 1).double()
        else:
            v = torch.randn(z.shape, generator=gen, dtype=torch.float64)
        zz = z.clone().requires_grad_(True)
        g = blocks.apply(S, GM.score(sde, zz, t))
        est = lk._hutchinson_divergence(g, zz, v)
        se = est.std() / math.sqrt(len(est))
        assert abs(est.mean() - exact[0]) < 4 * se + 1e-9


def test_vp_hutchinson_ode_mean_matches_exact():
    sde = RecipeSDE.vp()
    x = _data(1).repeat(48, 1)
    r = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), x, eps=1e-5, rtol=1e-4, atol=1e-4,
                          estimator="hutchinson", generator=torch.Generator().manual_seed(4))
    exact = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), x[:1], eps=1e-5, rtol=1e-4, atol=1e-4,
                              estimator="exact")
    se = r.nll.std() / math.sqrt(len(r.nll))
    assert r.nll.std() > 0  # probes differ per trajectory
    assert abs(r.nll.mean() - exact.nll[0]) < 4 * se + 1e-3


def test_scipy_rk45_matches_dopri5():
    sde = RecipeSDE.vp()
    x = _data(2)
    a = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), x, rtol=1e-5, atol=1e-5, estimator="exact")
    b = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), x, rtol=1e-5, atol=1e-5, estimator="exact",
                          method="scipy_rk45")
    assert torch.allclose(a.nll, b.nll, atol=1e-3)


class _ExactEpsModel:
    """An 'ε-network' that returns the exact ε (through the scheduler's time convention)."""

    def __init__(self, sched, sde):
        self.sched, self.sde = sched, sde

    def __call__(self, z, model_t):
        t = float(model_t.reshape(-1)[0]) / self.sched.config.time_scale
        return GM.eps(self.sde, z, t)


def test_eps_model_score_fn_matches_exact_score():
    from diffusers_psld.schedulers import PSLDScheduler

    sched = PSLDScheduler(diffusion="vp")
    sde = sched.sde
    x = _data(2)
    fn = lk.eps_model_score_fn(_ExactEpsModel(sched, sde), sched)
    z = x.clone()
    # model time is float32, so compare at a float32-representable time
    t = float(torch.tensor(0.25, dtype=torch.float32))
    assert torch.allclose(fn(z, t), GM.score(sde, z, t), atol=1e-5)


def test_bits_per_dim_unet_smoke():
    """A tiny random UNet end to end on 8-bit images (fixed-step Euler to bound the cost)."""
    from diffusers import UNet2DModel

    from diffusers_psld.schedulers import PSLDScheduler

    sched = PSLDScheduler()
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).double().eval()
    imgs = torch.randint(0, 256, (2, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    r = lk.bits_per_dim(sched.sde, lk.eps_model_score_fn(unet, sched), imgs, n_bins=256,
                        generator=torch.Generator().manual_seed(1), method="euler", eps=1e-3)
    assert r.bpd.shape == (2,) and torch.all(torch.isfinite(r.bpd))
    assert r.nfe == 100
    d = 64
    assert torch.allclose(r.bpd, r.nll / (d * math.log(2)) + 7)


def test_argument_errors_name_the_argument():
    sde = RecipeSDE.vp()
    fn = lk.exact_score_fn(GM, sde)
    x = _data(1)
    with pytest.raises(ValueError, match="`eps`"):
        lk.ode_likelihood(sde, fn, x, eps=0.0)
    with pytest.raises(ValueError, match="`rtol`"):
        lk.ode_likelihood(sde, fn, x, rtol=-1)
    with pytest.raises(ValueError, match="`method`"):
        lk.ode_likelihood(sde, fn, x, method="bogus")
    with pytest.raises(ValueError, match="`estimator`"):
        lk.ode_likelihood(sde, fn, x, estimator="bogus")
    with pytest.raises(ValueError, match="`noise`"):
        lk.ode_likelihood(sde, fn, x, noise="bogus")
    with pytest.raises(ValueError, match="`z0`"):
        lk.ode_likelihood(RecipeSDE.psld(), fn, torch.zeros(2, 3, dtype=torch.float64))


def test_psld_ode_monte_carlo_over_m0_matches_closed_form():
    """Mean over m0 draws of the ODE's entropy-corrected NLL = the closed-form expected bound."""
    sde = RecipeSDE.psld()
    eps = 1e-2
    x = _data(1).repeat(64, 1)
    z0 = lk.sample_aux(sde, x, torch.Generator().manual_seed(5))
    r = lk.ode_likelihood(sde, lk.exact_score_fn(GM, sde), z0, eps=eps, rtol=1e-5, atol=1e-5, estimator="exact")
    corrected = r.nll - _prior_mismatch(sde, r.z1)
    se = corrected.std() / math.sqrt(len(corrected))
    assert abs(corrected.mean() - _expected_bound(sde, x[:1], eps)[0]) < 4 * se
