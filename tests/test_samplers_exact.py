"""Every sampler, driven by the exact ε of Gaussian / Gaussian-mixture data, reproduces the data law."""
import math

import pytest
import torch
from _gaussian_moments import exact_eps_affine, propagate

from diffusers_psld import PSLDScheduler, SSCSScheduler
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sde import kernels

MU = torch.tensor([0.5, -0.3], dtype=torch.float64)
COV = torch.tensor([[0.3, 0.1], [0.1, 0.2]], dtype=torch.float64)

# name: (class, config, expected weak order, NFE pair used for the order, NFE at which the error is < 1e-2)
SAMPLERS = {
    "em": (PSLDScheduler, dict(sampler="em"), 1.0, (100, 400), 1000),
    "em_quadratic": (PSLDScheduler, dict(sampler="em", striding="quadratic"), 1.0, (100, 400), 1000),
    "pf_heun": (PSLDScheduler, dict(sampler="pf_heun"), 2.0, (50, 200), 1000),
    "sscs": (SSCSScheduler, dict(), 1.0, (100, 400), 1000),
    "sscs_quadratic": (SSCSScheduler, dict(striding="quadratic"), 1.0, (100, 400), 1000),
    "sscs_midpoint": (SSCSScheduler, dict(sscs_score_time="midpoint"), 1.0, (100, 400), 1000),
    "cld_em": (PSLDScheduler, dict(gamma=0.0, nu=4.0), 1.0, (100, 400), 1000),
    "cld_sscs": (SSCSScheduler, dict(gamma=0.0, nu=4.0), 1.0, (100, 400), 1000),
    "vp_em": (PSLDScheduler, dict(diffusion="vp"), 1.0, (100, 400), 1000),
    # odd NFE: pure Heun steps (an even NFE adds one probability-flow Euler step before the final call)
    "vp_heun": (PSLDScheduler, dict(diffusion="vp", sampler="pf_heun"), 2.0, (11, 21), 1000),
    # explicit Euler on the PF-ODE inflates the variance of the Hamiltonian rotation: first order, but
    # with a large constant (error 2.3e-2 at 1000 NFE, 1.1e-2 at 2000); it needs ~2500 NFE for 1e-2.
    "pf_euler": (PSLDScheduler, dict(sampler="pf_euler"), 1.0, (200, 800), 2500),
}


def law_error(cls, config, nfe):
    s = cls(**config)
    s.set_timesteps(nfe)
    mean, cov, _, _ = propagate(s, MU, COV)
    return max((mean - MU).abs().max().item(), (cov - COV).abs().max().item())


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_error_shrinks_at_the_sampler_order_and_is_small_at_high_nfe(name):
    cls, config, order, (n1, n2), n_final = SAMPLERS[name]
    e1, e2 = law_error(cls, config, n1), law_error(cls, config, n2)
    observed = math.log(e1 / e2) / math.log(n2 / n1)
    print(f"{name}: error {e1:.3e} @ {n1} NFE, {e2:.3e} @ {n2} NFE, observed order {observed:.2f}")
    assert observed > order - 0.25, f"{name}: observed order {observed:.2f} < expected {order}"
    assert law_error(cls, config, n_final) < 1e-2


def test_error_decreases_monotonically_for_em_and_sscs():
    for name in ("em", "sscs"):
        cls, config = SAMPLERS[name][:2]
        errs = [law_error(cls, config, n) for n in (10, 20, 50, 100, 200)]
        assert all(a > b for a, b in zip(errs, errs[1:])), (name, errs)


def _unmerged_sscs_law(sde, n, eps, mu, cov_x, score_time="start"):
    """Reference SSCS (paper Eq. 12) without merging, from the prior at t = 1, by exact moment propagation.

    Each step: exact half-step of the linear part A, Euler step of the score part S, exact half-step of A;
    then the final EM-mean denoising step. Built from the recipe's kernels directly.
    """
    ts = 1.0 - torch.arange(n + 1, dtype=torch.float64) * (1.0 - eps) / n
    f_lin = (sde.Q - sde.D) @ sde.A  # linear part of the reverse drift (reverse time)
    mean = torch.zeros(sde.k, dtype=torch.float64)
    cov = sde.prior_cov.clone()

    def half(mean, cov, t_from, t_to):
        phi, sig = kernels.transition(f_lin, sde.D, sde.prior_cov, sde.beta_integral(t_from, t_to))
        return phi @ mean, phi @ cov @ phi.T + sig

    for i in range(n):
        t, tn = ts[i].item(), ts[i + 1].item()
        h = t - tn
        mean, cov = half(mean, cov, t, t - h / 2)
        te = t if score_time == "start" else t - h / 2
        (K, c), = exact_eps_affine(sde, mu, cov_x, [te])
        score_mat = -sde.hsm_kernel(te).inv_chol_t()  # score = score_mat ε
        w = 2 * h * sde.beta(te) * sde.D
        lin = torch.eye(sde.k, dtype=torch.float64) + w @ sde.A + w @ score_mat @ K
        mean, cov = lin @ mean + w @ score_mat @ c, lin @ cov @ lin.T
        mean, cov = half(mean, cov, t - h / 2, tn)
    # denoising: EM mean step eps -> 0
    (K, c), = exact_eps_affine(sde, mu, cov_x, [eps])
    drift, score_w = sde.reverse_drift_matrices(eps)
    lin = torch.eye(sde.k, dtype=torch.float64) - eps * drift - eps * score_w @ (-sde.hsm_kernel(eps).inv_chol_t()) @ K
    off = -eps * score_w @ (-sde.hsm_kernel(eps).inv_chol_t()) @ c
    return lin @ mean + off, lin @ cov @ lin.T


@pytest.mark.parametrize("score_time", ["start", "midpoint"])
@pytest.mark.parametrize("gamma", [0.0, 0.01])
def test_merged_sscs_scheduler_equals_unmerged_reference_in_law(gamma, score_time):
    mu, cov_x = MU[:1], COV[:1, :1]
    s = SSCSScheduler(gamma=gamma, nu=gamma + 4.0, sscs_score_time=score_time)
    for n_calls in (2, 7, 30):
        s.set_timesteps(n_calls)
        _, _, mean, cov = propagate(s, mu, cov_x)  # the scheduler starts from the prior at the first midpoint
        ref_mean, ref_cov = _unmerged_sscs_law(s.sde, n_calls - 1, s.config.sampling_eps, mu, cov_x, score_time)
        assert torch.allclose(mean, ref_mean, atol=1e-12), (mean, ref_mean)
        assert torch.allclose(cov, ref_cov, atol=1e-12), (cov, ref_cov)


def _run_loop(scheduler, data, n, nfe, generator):
    scheduler.set_timesteps(nfe)
    k = scheduler.num_components
    z = scheduler.sample_prior((n, k * data.d), generator=generator, dtype=torch.float64)
    for t in scheduler.timesteps:
        eps = data.eps(scheduler.sde, scheduler.scale_model_input(z, t), float(t))
        z = scheduler.step(eps, t, z, generator=generator).prev_sample
    return z


@pytest.mark.parametrize("name", ["em", "pf_heun", "pf_euler", "sscs", "vp_em", "cld_sscs"])
def test_standard_loop_matches_exact_law_of_its_tables(name):
    """Monte Carlo through the real `step` (prior, noise, tables) vs the exact moments of the tables."""
    cls, config = SAMPLERS[name][:2]
    data = GaussianMixture.gaussian(MU[:1], COV[:1, :1])
    s = cls(**config)
    n = 100_000
    z = _run_loop(s, data, n, 12, torch.Generator().manual_seed(3))
    _, _, mean, cov = propagate(s, MU[:1], COV[:1, :1])
    mc_mean, mc_cov = z.mean(0), torch.cov(z.T).reshape(len(mean), len(mean))
    se = (cov.diagonal() / n).sqrt()
    assert torch.all((mc_mean - mean).abs() < 5 * se), (mc_mean, mean)
    assert torch.allclose(mc_cov, cov, rtol=0.03, atol=5 * math.sqrt(2 / n) * cov.diagonal().max().item())


MIXTURE = GaussianMixture([0.3, 0.7], [[-1.0], [1.5]], [[[0.1]], [[0.3]]])


@pytest.mark.parametrize("name", ["em", "sscs", "pf_heun"])
def test_gaussian_mixture_recovered(name):
    cls, config = SAMPLERS[name][:2]
    n = 60_000
    x = _run_loop(cls(**config), MIXTURE, n, 200, torch.Generator().manual_seed(5))[:, 0]
    true_mean, true_var = MIXTURE.mean().item(), MIXTURE.cov().item()
    se_mean, se_var = math.sqrt(true_var / n), true_var * math.sqrt(3.0 / n)
    assert abs(x.mean().item() - true_mean) < 0.02 + 4 * se_mean
    assert abs(x.var().item() - true_var) < 0.05 + 4 * se_var
    # bimodality: the mass of the left mode
    assert abs((x < 0.25).double().mean().item() - 0.3) < 0.02


@pytest.mark.slow
@pytest.mark.parametrize("name", ["em", "sscs", "pf_heun", "em_quadratic", "sscs_quadratic"])
def test_gaussian_mixture_recovered_at_1000_nfe(name):
    cls, config = SAMPLERS[name][:2]
    n = 400_000
    x = _run_loop(cls(**config), MIXTURE, n, 1000, torch.Generator().manual_seed(6))[:, 0]
    assert abs(x.mean().item() - MIXTURE.mean().item()) < 1e-2
    assert abs(x.var().item() - MIXTURE.cov().item()) < 1e-2


def test_pred_original_sample_is_the_posterior_mean_for_exact_eps():
    """x̂₀ = aᵀ(z - L ε*)/aᵀa equals E[x₀ | z_t] (Tweedie) for Gaussian data."""
    mu, var = 0.4, 0.25
    data = GaussianMixture.gaussian([mu], [[var]])
    s = PSLDScheduler()
    s.set_timesteps(10)
    t = s.timesteps[3]
    z = s.sample_prior((1000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    s._step_index = 3
    res = s.step(data.eps(s.sde, z, float(t)), t, z)
    kern = s.sde.hsm_kernel(float(t))
    a = kern.mean_coef
    C = var * torch.outer(a, a) + kern.cov
    post = mu + (var * a) @ torch.linalg.solve(C, (z - a * mu).T)
    assert torch.allclose(res.pred_original_sample[:, 0], post, atol=1e-10)


if __name__ == "__main__":  # `python tests/test_samplers_exact.py`: the README's table of law errors vs NFE
    nfes = (10, 50, 100, 200, 1000)
    print("| sampler | " + " | ".join(map(str, nfes)) + " NFE | order 200→1000 | order at the test's NFE pair |")
    print("|---" * (len(nfes) + 3) + "|")
    for name, (cls, config, _, (n1, n2), _) in SAMPLERS.items():
        errs = [law_error(cls, config, n) for n in nfes]
        pair = math.log(law_error(cls, config, n1) / law_error(cls, config, n2)) / math.log(n2 / n1)
        last = math.log(errs[-2] / errs[-1]) / math.log(nfes[-1] / nfes[-2])
        print(f"| {name} | " + " | ".join(f"{e:.2g}" for e in errs) + f" | {last:.2f} | {pair:.2f} ({n1}→{n2}) |")
