"""The schedule API of every scheduler: ``set_timesteps(num_inference_steps | timesteps | sigmas)``, named time grids,
the noise level σ_t and its inverse, the stored schedule, the final step, the first state's law, ``order``, and the
two Diffusers conformance flows (``compatibles`` round trip, img2img's ``timesteps[t_start * order:]``).

Independent routes: the grids are checked against their defining formulas, σ ↔ t against scipy's brentq and the VP
closed form, the Tweedie step against Gaussian conditioning of the joint (x₀, m₀, z_t), the first state's law against
the HSM kernel and the SSCS linear part's transition built from ``kernels.transition``.
"""
import inspect
import math

import numpy as np
import pytest
import scipy.optimize
import torch
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps
from _gaussian_moments import propagate

from diffusers_psld import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDImg2ImgPipeline, PSLDPipeline,
                            PSLDScheduler, SplittingScheduler, SSCSScheduler)
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sampling import tweedie_step
from diffusers_psld.schedulers import schedulers_by_name, time_grids
from diffusers_psld.schedulers.scheduling_gddim import multistep_orders
from diffusers_psld.sde import RecipeSDE, kernels

CASES = [
    (PSLDScheduler, dict(sampler="em")), (PSLDScheduler, dict(sampler="pf_euler")),
    (PSLDScheduler, dict(sampler="pf_heun")), (PSLDScheduler, dict(sampler="sscs", sscs_score_time="midpoint")),
    (PSLDScheduler, dict(diffusion="vp", sampler="pf_heun")), (SSCSScheduler, dict()), (ConjugateScheduler, dict()),
    (GDDIMMultistepScheduler, dict()), (GDDIMMultistepScheduler, dict(diffusion="vp")), (SplittingScheduler, dict()),
    (SplittingScheduler, dict(sampler="nvv")), (SplittingScheduler, dict(sampler="coba")),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in CASES]
GRIDS = ["edm", "logsnr", "power", "uniform"]
DATA = GaussianMixture.gaussian([0.4], [[0.3]])


def run(s, seed=0, exact=False):
    """A deterministic loop through ``s.timesteps`` (ε = exact Gaussian ε or 0.3 z), float64 state [4, k, 3]."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(4, s.num_components, 1 if exact else 3, generator=g, dtype=torch.float64)
    times = s.exact_timesteps
    for i, t in enumerate(s.timesteps):
        eps = DATA.eps(s.sde, z[..., 0], float(times[i]))[..., None] if exact else 0.3 * z
        z = s.step(eps, t, z, generator=g).prev_sample
    assert s.step_index == len(s.timesteps)
    return z


def tables_equal(a, b):
    ta, tb = a._tables, b._tables
    return (ta.eval_times == tb.eval_times and ta.state_times == tb.state_times and ta.kinds == tb.kinds
            and all(torch.equal(getattr(ta, n), getattr(tb, n)) for n in ("P", "R", "S")))


# ---------------------------------------------------------------------------------------------- every class × 3 forms
@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_a_grid_given_as_timesteps_or_sigmas_equals_the_same_grid_by_name(cls, kw):
    """``set_timesteps(timesteps=grid)`` is bit-identical to the named grid with the matching NFE; ``sigmas=σ(grid)``
    gives the same times to 1e-12 and the same run to 1e-9 (σ → t is a float64 root)."""
    name = GRIDS[CASES.index((cls, kw)) % len(GRIDS)]
    named = cls(time_grid=name, **kw)
    m = 6
    nfe = (m - 1) * named.order + 1
    named.set_timesteps(nfe)
    grid = time_grids.named_grid(named.sde, name, m - 1, named.config.sampling_eps)
    custom = cls(**kw)
    custom.set_timesteps(timesteps=grid.tolist())
    assert len(custom.timesteps) == nfe and tables_equal(named, custom)
    ref = run(named)
    assert torch.equal(ref, run(custom))
    sig = time_grids.noise_level(named.sde, named.exact_timesteps.numpy())
    torch.testing.assert_close(named.sigmas, torch.tensor(list(sig) + [0.0], dtype=torch.float32))  # diffusers' `sigmas`
    by_sigma = cls(**kw)
    by_sigma.set_timesteps(sigmas=time_grids.noise_level(by_sigma.sde, grid.numpy()))
    torch.testing.assert_close(by_sigma.exact_timesteps, named.exact_timesteps, rtol=1e-12, atol=0)
    torch.testing.assert_close(run(by_sigma), ref, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_nfe_accounting_and_diffusers_retrieve_timesteps(cls, kw):
    """len(timesteps) = model calls = (M - 1)·order + 1 for a list of M times (a trailing 0 in `sigmas` adds no
    call); diffusers' retrieve_timesteps drives all three forms and returns that count."""
    s = cls(**kw)
    assert {"timesteps", "sigmas", "num_inference_steps", "device"} <= set(inspect.signature(s.set_timesteps).parameters)
    times = [1.0, 0.6, 0.3, 0.1, 0.02, 0.004]
    ts, n = retrieve_timesteps(s, timesteps=times)
    assert n == len(ts) == (len(times) - 1) * s.order + 1 == s.num_inference_steps
    calls = 0
    for t in s.timesteps:
        s.step(torch.zeros(1, s.num_components, 2, dtype=torch.float64), t, torch.ones(1, s.num_components, 2, dtype=torch.float64))
        calls += 1
    assert calls == n and s.step_index == n
    sig = list(time_grids.noise_level(s.sde, times)) + [0.0]
    ts, n2 = retrieve_timesteps(s, sigmas=sig)
    assert n2 == n and len(ts) == n
    ts, n3 = retrieve_timesteps(s, 7)
    assert n3 == 7 and len(ts) == 7


# ---------------------------------------------------------------------------------------------- stored schedule
@pytest.mark.parametrize("cls,kw", [CASES[2], CASES[7], CASES[10]], ids=[IDS[2], IDS[7], IDS[10]])
def test_the_config_stores_the_schedule_and_a_saved_scheduler_samples_with_it_again(cls, kw, tmp_path, caplog):
    s = cls(**kw)
    sigmas = [80.0, 20.0, 4.0, 0.7, 0.1, 0.01, 0.0]
    s.set_timesteps(sigmas=sigmas)
    assert s.config.custom_sigmas == sigmas and s.config.custom_timesteps is None
    ref = run(s)
    s.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path)
    assert loaded.config.custom_sigmas == sigmas
    loaded.set_timesteps()  # no argument: the stored schedule
    assert tables_equal(s, loaded) and torch.equal(run(loaded), ref)
    loaded.set_timesteps(len(s.timesteps))  # an explicit count names the named grid: the stored one is dropped, loudly
    assert loaded.config.custom_sigmas is None and "replaces the custom schedule" in caplog.text
    with pytest.raises(ValueError, match="needs one of `num_inference_steps`, `timesteps` or `sigmas`"):
        loaded.set_timesteps()
    s.set_timesteps(timesteps=[1.0, 0.5, 0.1])  # the other form replaces it
    assert s.config.custom_timesteps == [1.0, 0.5, 0.1] and s.config.custom_sigmas is None
    for other in (PSLDScheduler, GDDIMMultistepScheduler):  # and swapping classes in memory keeps it, as a reload does
        swapped = other.from_config(s.config)
        assert swapped.config.custom_timesteps == [1.0, 0.5, 0.1]
        swapped.set_timesteps()
        grid = torch.unique_consecutive(swapped.exact_timesteps)  # PF-Heun evaluates twice at inner times
        assert torch.equal(grid, torch.tensor([1.0, 0.5, 0.1], dtype=torch.float64))


def test_named_grid_options_are_config_and_round_trip(tmp_path):
    s = PSLDScheduler(time_grid="edm", rho=5.0, sigma_min=0.002, sigma_max=80.0, final_step="tweedie")
    s.set_timesteps(8)
    s.save_pretrained(tmp_path)
    loaded = PSLDScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(8)
    assert tables_equal(s, loaded)
    sig = time_grids.noise_level(s.sde, s.exact_timesteps.numpy())
    np.testing.assert_allclose(sig[[0, -1]], [80.0, 0.002], rtol=1e-12)
    ramp = np.arange(8) / 7  # EDM, Karras et al. 2022 Eq. 5
    edm = (80.0 ** (1 / 5) + ramp * (0.002 ** (1 / 5) - 80.0 ** (1 / 5))) ** 5
    np.testing.assert_allclose(sig, edm, rtol=1e-12)


# ---------------------------------------------------------------------------------------------- validation
BAD = [
    (dict(timesteps=[1.0, 0.5, 0.7, 0.1]), r"`timesteps` must be strictly decreasing.*`timesteps`\[1\] = 0\.5"),
    (dict(timesteps=[1.2, 0.5]), r"`timesteps`\[0\] = 1\.2 is outside the recipe's forward time range \[1e-05, 1\]"),
    (dict(timesteps=[1.0, 1e-7]), r"`timesteps`\[1\] = 1e-07 is outside .*\[1e-05, 1\]"),
    (dict(timesteps=[1.0, 0.5, 0.0]), r"`timesteps`\[2\] = 0\.0 is outside"),
    (dict(timesteps=[1.0, float("nan"), 0.1]), r"`timesteps`\[1\] = nan is not finite"),
    (dict(timesteps=[0.5]), r"`timesteps` must list at least 2 times"),
    (dict(timesteps=[1.0, 0.5, 0.5 - 1e-9, 0.1]), r"`timesteps`\[2\] and `timesteps`\[3\]|`timesteps`\[1\] and `timesteps`\[2\].*float32"),
    (dict(sigmas=[500.0, 1.0]), r"`sigmas`\[0\] = 500\.0 is outside the recipe's noise level σ_t range \[σ\(t=1e-05\), σ\(t=1\)\] = \[0\.000894428, 257\.655\]"),
    (dict(sigmas=[80.0, 0.0, 1.0, 0.0]), r"`sigmas`\[1\] = 0\.0 is outside .*only a trailing 0"),
    (dict(sigmas=[1.0, 80.0]), r"`sigmas` must be strictly decreasing"),
    (dict(sigmas=[1.0, 0.0]), r"`sigmas` must list at least 2 noise levels .* besides the trailing 0"),
    (dict(sigmas=[float("inf"), 1.0]), r"`sigmas`\[0\] = inf is not finite"),
    (dict(num_inference_steps=5, timesteps=[1.0, 0.5]), r"exactly one of .* got `num_inference_steps` and `timesteps`"),
    (dict(timesteps=[1.0, 0.5], sigmas=[80.0, 1.0]), r"exactly one of .* got `timesteps` and `sigmas`"),
    (dict(), r"needs one of `num_inference_steps`, `timesteps` or `sigmas`"),
    (dict(num_inference_steps=1), r"num_inference_steps"),
]


@pytest.mark.parametrize("kwargs,match", BAD, ids=[str(i) for i in range(len(BAD))])
def test_bad_schedules_are_refused_naming_the_argument_index_and_range(kwargs, match):
    s = PSLDScheduler()
    with pytest.raises(ValueError, match=match):
        s.set_timesteps(**kwargs)
    assert s.config.custom_timesteps is None and s.config.custom_sigmas is None  # nothing half-stored


def test_a_schedule_that_cannot_be_built_is_not_stored():
    s = ConjugateScheduler(conjugate_b="identity", conjugate_lambda=30.0)
    with pytest.raises(ValueError, match="conjugate_lambda"):  # unstable on these steps: refused while building
        s.set_timesteps(timesteps=[1.0, 0.5, 0.1, 0.01])
    assert s.config.custom_timesteps is None and s._schedule.custom is None


def test_wrong_types_and_counts():
    s = PSLDScheduler(sampler="pf_heun")
    with pytest.raises(TypeError, match="`timesteps` must be a list"):
        s.set_timesteps(timesteps="1.0, 0.5")
    with pytest.raises(TypeError, match="`sigmas` must be a list of real numbers"):
        s.set_timesteps(sigmas=[80.0, "1"])
    with pytest.raises(ValueError, match=r"`timesteps` must be 1-D \(one schedule\), got an array of shape \(2, 2\)"):
        s.set_timesteps(timesteps=np.array([[1.0, 0.5], [0.2, 0.1]]))
    with pytest.raises(ValueError, match=r"`sigmas` must be 1-D"):
        s.set_timesteps(sigmas=torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"`timesteps` lists 50002 times, i\.e\. 100003 model calls for sampler 'pf_heun'"):
        s.set_timesteps(timesteps=np.linspace(1.0, 1e-3, 50002))


CONFIG_BAD = [
    (dict(time_grid="cosine"), r"`time_grid` must be one of"),
    (dict(rho=3.0), r"`rho` = 3\.0 is the exponent of `time_grid='power'` or `'edm'`"),
    (dict(time_grid="uniform", rho=3.0), r"`rho`"),
    (dict(time_grid="power", rho=0.0), r"`rho` must be > 0"),
    (dict(time_grid="power", rho=9.0), r"`rho` must be <= 8"),
    (dict(sigma_min=1e-6), r"`sigma_min` = 1e-06 is outside the recipe's noise-level range"),
    (dict(sigma_max=1e4), r"`sigma_max` = 10000\.0 is outside"),
    (dict(sigma_min=5.0, sigma_max=2.0), r"`sigma_min` \(t = .*\) must be below `sigma_max`"),
    (dict(sigma_max=0.005), r"σ\(sampling_eps=0\.001\) \(t = 0\.001\) must be below `sigma_max`"),
    (dict(final_step="zero"), r"`final_step` must be one of \('euler', 'tweedie'\)"),
    (dict(gamma=0.0, nu=4.0, final_step="tweedie"), r"`final_step='tweedie'` needs gamma > 0"),
    (dict(custom_timesteps=[1.0, 0.5], custom_sigmas=[80.0, 1.0]), r"at most one of `custom_timesteps` and `custom_sigmas`"),
    (dict(custom_sigmas=[1.0, 80.0]), r"`custom_sigmas` must be strictly decreasing"),
]


@pytest.mark.parametrize("kwargs,match", CONFIG_BAD, ids=[str(i) for i in range(len(CONFIG_BAD))])
def test_bad_schedule_config_is_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        PSLDScheduler(**kwargs)


# ---------------------------------------------------------------------------------------------- one grid mechanism
def test_legacy_grid_keys_mean_what_they_meant():
    """`striding="quadratic"` = power ρ 2; gDDIM's defaults (power 2.5) and `time_spacing="logsnr"` = the shared
    `time_grid`; an old config without the new keys loads to the same tables."""
    pairs = [(PSLDScheduler(striding="quadratic"), PSLDScheduler(time_grid="power", rho=2.0)),
             (PSLDScheduler(), PSLDScheduler(time_grid="uniform")),
             (GDDIMMultistepScheduler(), GDDIMMultistepScheduler(time_grid="power", rho=2.5)),
             (GDDIMMultistepScheduler(time_spacing="logsnr"), GDDIMMultistepScheduler(time_grid="logsnr")),
             (GDDIMMultistepScheduler(time_spacing="striding", striding="quadratic"), PSLDScheduler(time_grid="power"))]
    for old, new in pairs:
        old.set_timesteps(9)
        new.set_timesteps(9)
        assert torch.equal(old.exact_timesteps, new.exact_timesteps), (old.config, new.config)
    for cls, kw in [(PSLDScheduler, dict(striding="quadratic")), (GDDIMMultistepScheduler, dict(time_spacing="logsnr"))]:
        s = cls(**kw)
        old_cfg = {k: v for k, v in s.config.items() if k not in ("time_grid", "rho", "sigma_min", "sigma_max",
                                                                     "final_step", "custom_timesteps", "custom_sigmas")}
        loaded = cls.from_config(old_cfg)
        s.set_timesteps(11)
        loaded.set_timesteps(11)
        assert tables_equal(s, loaded)
    s = PSLDScheduler(striding="quadratic", time_grid="uniform")  # `time_grid` decides when set
    s.set_timesteps(5)
    torch.testing.assert_close(s.exact_timesteps, torch.linspace(1.0, 1e-3, 5, dtype=torch.float64), rtol=0, atol=1e-15)


@pytest.mark.parametrize("name", ["psld", "cld", "vp", "psld_linear_beta"])
def test_noise_level_and_its_inverse(name):
    """σ ↔ t to <= 1e-12 relative against brentq on the same σ(t) (and σ(t) against the VP closed form)."""
    sde = {"psld": RecipeSDE.psld(), "cld": RecipeSDE.cld(), "vp": RecipeSDE.vp(),
           "psld_linear_beta": RecipeSDE.psld(0.3, 3.0, 1.0, 12.0, 0.1)}[name]
    t = np.array([1e-5, 3e-4, 1e-3, 0.02, 0.3, 0.77, 1.0])
    sig = time_grids.noise_level(sde, t)
    assert np.all(np.diff(sig) > 0)
    if name == "vp":
        b = 0.1 * t + 0.5 * 19.9 * t ** 2
        np.testing.assert_allclose(sig, np.sqrt(np.expm1(b)), rtol=1e-13)
    back = time_grids.time_for_noise_level(sde, sig)
    np.testing.assert_allclose(back, t, rtol=1e-12, atol=0)
    rng = np.random.default_rng(0)
    targets = np.exp(rng.uniform(np.log(sig[0]), np.log(sig[-1]), 12))
    got = time_grids.time_for_noise_level(sde, targets)
    ref = [scipy.optimize.brentq(lambda u: time_grids.noise_level(sde, [u])[0] / s_ - 1.0, 1e-6, 1.0, xtol=1e-300,
                                 rtol=1e-15) for s_ in targets]
    np.testing.assert_allclose(got, ref, rtol=1e-12, atol=0)


def test_grid_formulas():
    sde, eps = RecipeSDE.psld(), 1e-3
    frac = (6 - np.arange(7)) / 6
    np.testing.assert_array_equal(time_grids.power_grid(6, eps, 1.0, 2.5).numpy(), np.r_[1.0, (eps + (1 - eps) * frac ** 2.5)[1:-1], eps])
    np.testing.assert_array_equal(time_grids.uniform_grid(6, eps).numpy(), np.r_[1.0, (eps + (1 - eps) * frac)[1:-1], eps])
    logsig = np.log(time_grids.noise_level(sde, time_grids.logsnr_grid(sde, 6, eps).numpy()))
    np.testing.assert_allclose(np.diff(logsig), np.full(6, (logsig[-1] - logsig[0]) / 6), rtol=1e-11)
    with pytest.raises(ValueError, match="repeats a time in float64.*num_inference_steps"):
        time_grids.power_grid(20000, eps, 1.0, 8.0)


# ---------------------------------------------------------------------------------------------- the final step
def test_tweedie_step_is_the_posterior_mean_of_the_whole_state():
    """For Gaussian data and the exact ε, P z + R ε(z) = E[(x₀, m₀) | z_t] by Gaussian conditioning on the joint of
    (x₀, m₀, z_t) (z_t = Φ_t z₀ + ξ, ξ ~ N(0, Σ(0, t)); m₀ ~ N(0, κM))."""
    sde, mu, var = RecipeSDE.psld(), 0.4, 0.3
    data = GaussianMixture.gaussian([mu], [[var]])
    for t in (1e-3, 0.05, 0.4):
        P, R = tweedie_step(sde, t)
        z = torch.randn(50, 2, dtype=torch.float64)
        got = z @ P.T + data.eps(sde, z, t) @ R.T
        phi, sig = kernels.transition(sde.F, sde.D, sde.prior_cov, sde.beta_integral(t))
        c0 = torch.diag(torch.tensor([var, float(sde.init_cov[1, 1])], dtype=torch.float64))
        m0 = torch.tensor([mu, 0.0], dtype=torch.float64)
        gain = c0 @ phi.T @ torch.linalg.inv(phi @ c0 @ phi.T + sig)
        ref = m0 + (z - phi @ m0) @ gain.T
        torch.testing.assert_close(got, ref, rtol=0, atol=1e-10)
    P, R = tweedie_step(RecipeSDE.vp(), 0.1)  # VP: DDIM's jump x̂₀ = (z - σ ε)/α
    kern = RecipeSDE.vp().hsm_kernel(0.1)
    torch.testing.assert_close(torch.cat([P, R], 1)[0], torch.stack([1 / kern.mean_coef[0], -kern.chol[0, 0] / kern.mean_coef[0]]))


@pytest.mark.parametrize("cls,kw", CASES, ids=IDS)
def test_final_step_tweedie_outputs_the_last_calls_x0(cls, kw):
    s = cls(final_step="tweedie", **kw)
    s.set_timesteps(timesteps=[1.0, 0.5, 0.1, 0.01])
    g = torch.Generator().manual_seed(1)
    z = torch.randn(6, s.num_components, generator=g, dtype=torch.float64)
    times = s.exact_timesteps
    for i, t in enumerate(s.timesteps):
        out = s.step(DATA.eps(s.sde, z, float(times[i])), t, z, generator=g)
        if i < len(times) - 1:
            z = out.prev_sample
    torch.testing.assert_close(out.prev_sample[:, :1], out.pred_original_sample, rtol=1e-12, atol=1e-12)
    P, R = tweedie_step(s.sde, float(times[-1]))
    torch.testing.assert_close(out.prev_sample, z @ P.T + DATA.eps(s.sde, z, float(times[-1])) @ R.T, rtol=1e-12,
                               atol=1e-12)
    euler = cls(**kw)
    euler.set_timesteps(timesteps=[1.0, 0.5, 0.1, 0.01])
    assert torch.equal(euler._tables.P[:-1], s._tables.P[:-1]) and torch.equal(euler._tables.R[:-1], s._tables.R[:-1])
    if s.num_components == 2:  # for VP every first-order step to 0 is DDIM's, i.e. already x̂₀
        assert not torch.allclose(euler._tables.P[-1], s._tables.P[-1])


def test_tweedie_final_step_keeps_the_data_law_at_high_nfe():
    mu, cov = torch.tensor([0.5], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)
    for final in ("euler", "tweedie"):
        s = PSLDScheduler(sampler="pf_heun", final_step=final)
        s.set_timesteps(201)
        mean, c, _, _ = propagate(s, mu, cov)
        assert (mean - mu).abs().max() < 5e-3 and (c - cov).abs().max() < 5e-3, (final, mean, c)


# ---------------------------------------------------------------------------------------------- the first state
def test_first_state_law_below_t1_is_the_data_free_kernel_marginal():
    s = PSLDScheduler()
    prior = s.sample_prior((4, 2, 3), generator=torch.Generator().manual_seed(0))
    s.set_timesteps(timesteps=[1.0, 0.5, 0.1])  # starts at t = 1: the prior itself
    assert torch.equal(s.sample_prior((4, 2, 3), generator=torch.Generator().manual_seed(0)), prior)
    s.set_timesteps(sigmas=[0.5, 0.1, 0.01, 0.0])
    t0 = float(s.exact_timesteps[0])
    z = s.sample_prior((400_000, 2), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = s.sde.hsm_kernel(t0).cov
    torch.testing.assert_close(torch.cov(z.T), ref, rtol=0, atol=0.01 * float(ref.diagonal().max()))
    assert not torch.allclose(ref, s.sde.prior_cov, atol=0.05)


@pytest.mark.parametrize("score_time", ["start", "midpoint"])
def test_sscs_first_state_below_t1_is_pushed_by_the_leading_half_step(score_time):
    """The merged SSCS state of call 0 lives at the first interval's midpoint: N(0, Σ_t0) moved by the linear part
    A(h/2) (the recipe with Q → -Q), built here from kernels.transition."""
    s = SSCSScheduler(sscs_score_time=score_time)
    s.set_timesteps(timesteps=[0.6, 0.2, 0.01])
    sde = s.sde
    phi, sig = kernels.transition((sde.Q - sde.D) @ sde.A, sde.D, sde.prior_cov, sde.beta_integral(0.6, 0.4))
    ref = phi @ sde.hsm_kernel(0.6).cov @ phi.T + sig
    torch.testing.assert_close(s._init_scale @ s._init_scale.T, ref, rtol=1e-12, atol=1e-14)
    assert s.state_time(0) == pytest.approx(0.4)


def test_a_schedule_from_sigma_80_recovers_the_data_law():
    """EDM's σ_max = 80 (t ≈ 0.83 for PSLD): the data-free start costs ~v/σ² ≈ 5e-5, far below the sampler error."""
    mu, cov = torch.tensor([0.5], dtype=torch.float64), torch.tensor([[0.3]], dtype=torch.float64)
    s = PSLDScheduler(sampler="pf_heun", time_grid="edm", sigma_max=80.0)
    s.set_timesteps(101)
    chol = s._init_scale
    mean, c, _, _ = propagate(s, mu, cov, start_mean=torch.zeros(2, dtype=torch.float64), start_cov=chol @ chol.T)
    assert (mean - mu).abs().max() < 1e-2 and (c - cov).abs().max() < 1e-2, (mean, c)


# ---------------------------------------------------------------------------------------------- gDDIM orders
def test_multistep_orders_and_euler_at_final():
    assert multistep_orders(5, 3, True) == [1, 2, 3, 2, 1]
    assert multistep_orders(5, 3, False) == [1, 2, 3, 3, 3]
    assert multistep_orders(20, 3, True) == [1, 2] + [3] * 18  # N = 21 >= 15: no lowering (DPM-Solver's rule)
    assert multistep_orders(20, 3, True, euler_at_final=True) == [1, 2] + [3] * 17 + [1]
    s = GDDIMMultistepScheduler(euler_at_final=True)
    s.set_timesteps(21)
    assert s._orders_used[-2:] == [1, 1]


@pytest.mark.parametrize("kw", [dict(), dict(solver_order=2, euler_at_final=True), dict(final_step="tweedie")])
def test_gddim_custom_grid_is_exact_on_point_mass_data(kw):
    """Every gDDIM order is exact for point-mass data on any grid, so a custom `sigmas` grid must land on the exact
    PF-ODE solution x = c (the x half of the Tweedie end is c as well)."""
    s = GDDIMMultistepScheduler(**kw)
    s.set_timesteps(sigmas=[150.0, 30.0, 3.0, 0.5, 0.05, 0.0])
    sde, c = s.sde, 0.7
    z = torch.tensor([[0.3], [-0.4]], dtype=torch.float64)[None]
    for i, t in enumerate(s.timesteps):
        k = sde.hsm_kernel(float(s.exact_timesteps[i]))
        eps = torch.linalg.solve(k.chol, z[0, :, 0] - k.mean_coef * c)
        z = s.step(eps[None, :, None], t, z).prev_sample
    assert abs(float(z[0, 0, 0]) - c) < 1e-9


# ---------------------------------------------------------------------------------------------- conformance (§7)
ROUND_TRIP = [(PSLDScheduler, dict()), (PSLDScheduler, dict(sampler="pf_heun")), (PSLDScheduler, dict(sampler="sscs")),
              (SSCSScheduler, dict()), (ConjugateScheduler, dict()), (ConjugateScheduler, dict(conjugate_b="zero")),
              (GDDIMMultistepScheduler, dict()), (GDDIMMultistepScheduler, dict(solver_order=2)),
              (SplittingScheduler, dict()), (SplittingScheduler, dict(sampler="nvv")),
              (PSLDScheduler, dict(time_grid="edm", final_step="tweedie", custom_sigmas=[80.0, 1.0, 0.0]))]


@pytest.mark.parametrize("cls,kw", ROUND_TRIP, ids=[f"{c.__name__}-{kw}" for c, kw in ROUND_TRIP])
def test_compatibles_round_trip_gives_back_an_equal_config(cls, kw):
    """diffusers' SchedulerCommonTest round trip A.from_config(B.from_config(A(...).config).config) == A's config,
    hidden keys (`_use_default_values`, `_sampler_by_class`) included, for every class B that accepts the config."""
    a = cls(**kw)
    crossed = 0
    for other in schedulers_by_name().values():
        try:
            b = other.from_config(a.config)
        except ValueError:
            continue
        crossed += 1
        back = cls.from_config(b.config)
        assert dict(back.config) == dict(a.config), (other.__name__, dict(a.config), dict(back.config))
    assert crossed >= 3


VERBATIM = [(PSLDScheduler, dict(sampler="pf_heun"), 10), (PSLDScheduler, dict(sampler="pf_heun"), 11),
            (PSLDScheduler, dict(sampler="pf_heun", diffusion="vp"), 14)] + \
           [(SplittingScheduler, dict(sampler=s), n) for s, n in (("nse", 12), ("nvv", 12), ("noba", 14), ("nbaoab", 14),
                                                                    ("roba", 12))] + \
           [(PSLDScheduler, dict(sampler="em"), 10), (SSCSScheduler, dict(), 10), (ConjugateScheduler, dict(), 10),
            (GDDIMMultistepScheduler, dict(), 10)]


@pytest.mark.parametrize("cls,kw,n", VERBATIM, ids=[f"{c.__name__}-{kw}-{n}" for c, kw, n in VERBATIM])
def test_diffusers_img2img_flow_without_set_begin_index(cls, kw, n):
    """diffusers' img2img: `t_start = N - int(N·strength)`, `timesteps[t_start * scheduler.order:]`, noise to the
    slice's first time, then the loop, with no `set_begin_index`. Every strength starts on a step and runs every
    remaining call once; the result equals the `set_begin_index` run from the same call."""
    for strength in (0.6, 0.75, 0.9, 1.0):
        s = cls(**kw)
        s.set_timesteps(n)
        t_start = max(n - min(int(n * strength), n), 0)
        begin = t_start * s.order
        if begin >= n:
            continue
        timesteps = s.timesteps[begin:]
        assert s._tables.starts[begin], "the slice must begin on a step"
        g = torch.Generator().manual_seed(3)
        k = s.num_components
        z0 = s.add_noise(torch.randn(2, 1, 3, generator=g), torch.randn(2, k, 3, generator=g), timesteps[:1])
        z = z0
        for t in timesteps:
            z = s.step(0.3 * z, t, z, generator=torch.Generator().manual_seed(int(1e6 * float(t)))).prev_sample
        assert s.step_index == n
        r = cls(**kw)
        r.set_timesteps(n)
        r.set_begin_index(begin)
        zr = z0
        for t in r.timesteps[begin:]:
            zr = r.step(0.3 * zr, t, zr, generator=torch.Generator().manual_seed(int(1e6 * float(t)))).prev_sample
        assert torch.equal(z, zr)


def test_order_is_calls_per_step():
    assert PSLDScheduler().order == 1 and PSLDScheduler(sampler="pf_heun").order == 2
    assert [SplittingScheduler(sampler=s).order for s in ("nse", "nvv", "noba", "nbaoab", "roba", "coba")] == [2, 3, 2, 3, 1, 1]
    assert GDDIMMultistepScheduler().order == ConjugateScheduler().order == SSCSScheduler().order == 1


# ---------------------------------------------------------------------------------------------- pipelines
def _pipe(cls=PSLDPipeline, **sched_kw):
    from _pipeline_stubs import tiny_unet

    pipe = cls(unet=tiny_unet(), scheduler=PSLDScheduler(**sched_kw))
    pipe.set_progress_bar_config(disable=True)
    calls = []
    pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    return pipe, calls


def test_pipelines_take_timesteps_and_sigmas_and_a_saved_pipeline_samples_with_them_again(tmp_path):
    pipe, calls = _pipe(sampler="pf_heun")
    sig = [80.0, 10.0, 1.0, 0.1, 0.0]
    out = pipe(batch_size=2, sigmas=sig, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert len(calls) == 2 * 3 + 1 == pipe.num_timesteps
    pipe.save_pretrained(tmp_path)
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert loaded.scheduler.config.custom_sigmas == sig
    again = loaded(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    np.testing.assert_array_equal(out, again)
    calls.clear()
    pipe(batch_size=1, timesteps=[1.0, 0.3, 0.01], output_type="np")
    assert len(calls) == 5 and pipe.scheduler.config.custom_timesteps == [1.0, 0.3, 0.01]
    with pytest.raises(ValueError, match="at most one of .* got `num_inference_steps` and `sigmas`"):
        pipe(num_inference_steps=5, sigmas=sig)
    with pytest.raises(ValueError, match=r"`timesteps` must be strictly decreasing"):
        pipe(timesteps=[0.5, 0.9])
    with pytest.raises(ValueError, match=r"`sigmas`\[0\] = 1000\.0 is outside"):
        pipe(sigmas=[1000.0, 1.0])


def test_img2img_takes_sigmas():
    pipe, calls = _pipe(PSLDImg2ImgPipeline)
    out = pipe(image=torch.rand(1, 1, 8, 8), strength=0.5, sigmas=[80.0, 10.0, 2.0, 0.5, 0.1, 0.01], output_type="np")
    begin = int(torch.nonzero(pipe.scheduler.exact_timesteps <= 0.5)[0])
    assert out.images.shape == (1, 8, 8, 1) and len(calls) == 6 - begin and 0 < begin < 6
    assert math.isclose(time_grids.noise_level(pipe.scheduler.sde, [float(pipe.scheduler.exact_timesteps[0])])[0], 80.0,
                        rel_tol=1e-12)
