"""The NFE-band defaults of GDDIMMultistepScheduler (schedule_preset="auto"): what each band resolves to, that every
explicit key wins, that the band schedules stay exact where the integrator is exact, and that the NFE-5 band beats
the classic defaults on an exact mixture score (the reason it exists)."""
import math

import numpy as np
import pytest
import torch

from diffusers_psld import GDDIMMultistepScheduler
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.schedulers.nfe_bands import CLASSIC, NFE_BANDS, band_for
from diffusers_psld.schedulers.scheduling_gddim import gddim_transition
from diffusers_psld.schedulers.time_grids import noise_level


@pytest.mark.parametrize("diffusion,kind", [("psld", "phase"), ("vp", "vp")])
@pytest.mark.parametrize("nfe", [2, 5, 7, 8, 10, 20, 29, 30, 100])
def test_auto_resolves_to_the_band(diffusion, kind, nfe):
    s = GDDIMMultistepScheduler(diffusion=diffusion)
    s.set_timesteps(nfe)
    got = s.resolved_options
    k, band = band_for(s.sde.k, nfe)
    assert k == kind and got["band"] == kind
    assert band.max_nfe is None or nfe <= band.max_nfe
    for name in ("corrector", "analytic_first_step", "lower_order_final"):
        assert got[name] == getattr(band, name), name
    assert len(s.timesteps) == nfe  # the NFE accounting is unchanged
    if band.time_grid is None:  # a band on the classic grid: power 2.5 from t = 1 to sampling_eps
        assert (got["time_grid"], got["rho"]) == ("power", 2.5)
        assert float(s.exact_timesteps[0]) == 1.0
        assert math.isclose(float(s.exact_timesteps[-1]), s.config.sampling_eps, rel_tol=1e-12)
        ends = noise_level(s.sde, torch.tensor([1.0, s.config.sampling_eps], dtype=torch.float64))
        assert math.isclose(got["sigma_max"], float(ends[0]), rel_tol=1e-9)
        assert math.isclose(got["sigma_min"], float(ends[1]), rel_tol=1e-9)
        return
    for name in ("time_grid", "rho"):
        assert got[name] == getattr(band, name), name
    assert math.isclose(got["sigma_max"], band.sigma_max, rel_tol=1e-9)
    assert math.isclose(got["sigma_min"], band.sigma_min, rel_tol=1e-9)
    # the first state's law is the data-free kernel marginal at the band's start (sigma_max below σ(1))
    t0 = float(s.exact_timesteps[0])
    assert t0 < 1.0
    cov = s.sde.hsm_kernel(t0).cov
    scale = s._init_scale
    np.testing.assert_allclose((scale @ scale.T).numpy(), cov.numpy(), rtol=1e-10, atol=1e-12)


def test_bands_are_ordered_and_end_unbounded():
    for kind, bands in NFE_BANDS.items():
        edges = [b.max_nfe for b in bands[:-1]]
        assert edges == sorted(edges) and bands[-1].max_nfe is None, kind
        for b in bands:
            if b.time_grid is None:  # the classic grid: no σ bounds of its own
                assert b.sigma_min is None and b.sigma_max is None and b.rho is None, kind
            else:
                assert 0 < b.sigma_min < b.sigma_max, kind


def test_classic_preset_is_the_earlier_default():
    s = GDDIMMultistepScheduler(schedule_preset="classic")
    s.set_timesteps(10)
    got = s.resolved_options
    assert got["band"] == "classic" and got["time_grid"] == "power" and got["rho"] == 2.5
    assert (got["corrector"], got["analytic_first_step"], got["lower_order_final"]) == (
        CLASSIC.corrector, CLASSIC.analytic_first_step, CLASSIC.lower_order_final)
    assert float(s.exact_timesteps[0]) == 1.0
    assert math.isclose(float(s.exact_timesteps[-1]), s.config.sampling_eps, rel_tol=1e-12)
    # the classic preset is what explicit old-default keys give
    old = GDDIMMultistepScheduler(schedule_preset="auto", corrector="none", analytic_first_step=False,
                                  lower_order_final=True, time_grid="power", rho=2.5)
    old.set_timesteps(10)
    np.testing.assert_allclose(old.exact_timesteps.numpy(), s.exact_timesteps.numpy(), rtol=0, atol=1e-12)


def test_explicit_keys_win_over_the_band():
    s = GDDIMMultistepScheduler(sigma_min=0.5)  # a grid key: the grid comes from the config alone
    s.set_timesteps(5)
    got = s.resolved_options
    assert got["time_grid"] == "power" and math.isclose(got["sigma_min"], 0.5, rel_tol=1e-9)
    assert float(s.exact_timesteps[0]) == 1.0
    assert got["corrector"] == "unic"  # the solver options still come from the band
    s = GDDIMMultistepScheduler(corrector="none", lower_order_final=True, analytic_first_step=False)
    s.set_timesteps(5)
    got = s.resolved_options
    assert (got["corrector"], got["lower_order_final"], got["analytic_first_step"]) == ("none", True, False)
    assert got["time_grid"] == "edm"
    s = GDDIMMultistepScheduler()  # a sigmas= list: the grid from the list, the options from the band
    s.set_timesteps(sigmas=[80.0, 10.0, 1.0, 0.1])
    got = s.resolved_options
    assert got["time_grid"] == "custom" and math.isclose(got["sigma_max"], 80.0, rel_tol=1e-9)
    assert got["corrector"] == "unic"


def test_preset_survives_save_and_from_config(tmp_path):
    s = GDDIMMultistepScheduler(schedule_preset="classic")
    s.save_pretrained(tmp_path)
    again = GDDIMMultistepScheduler.from_pretrained(tmp_path)
    assert again.config.schedule_preset == "classic"
    again.set_timesteps(5)
    assert again.resolved_options["band"] == "classic"


@pytest.mark.parametrize("bad", [dict(schedule_preset="fast"), dict(schedule_preset=None), dict(corrector="unipc"),
                                 dict(analytic_first_step="yes"), dict(lower_order_final=1)])
def test_bad_preset_and_options_are_refused(bad):
    key = next(iter(bad))
    with pytest.raises(ValueError, match=key):
        GDDIMMultistepScheduler(**bad)


def test_resolved_options_before_set_timesteps():
    with pytest.raises(ValueError, match="set_timesteps"):
        GDDIMMultistepScheduler().resolved_options


@pytest.mark.parametrize("diffusion", ["psld", "vp"])
@pytest.mark.parametrize("nfe", [2, 5, 10, 40])
def test_band_schedules_are_exact_on_point_mass_data(diffusion, nfe):
    """For a point mass, x̂₀ is constant: every band's schedule (start below t = 1 with the analytic first step,
    corrector, σ_min end) must land on the exact probability-flow solution from the state at t = 1."""
    s = GDDIMMultistepScheduler(diffusion=diffusion)
    sde = s.sde
    s.set_timesteps(nfe)
    c = 0.7
    z1 = torch.tensor([0.3, -0.4], dtype=torch.float64)[: sde.k]
    t0 = float(s.exact_timesteps[0])
    z = (gddim_transition(sde, [t0], [1.0])[0] @ z1)[None, :, None]
    for t in s.exact_timesteps:
        kern = sde.hsm_kernel(float(t))
        eps = torch.linalg.solve(kern.chol, z[0, :, 0] - kern.mean_coef * c)
        z = s.step(eps[None, :, None], t, z).prev_sample
    exact = sde.hsm_kernel(0.0).mean_coef * c + gddim_transition(sde, [0.0], [1.0])[0] @ (
        z1 - sde.hsm_kernel(1.0).mean_coef * c)
    assert (z[0, :, 0] - exact).abs().max().item() < 1e-10


def _mixture_error(sched, mix, nfe, n=3000, seed=0):
    """Mean + covariance error of N samples of the data half against the mixture's (exact ε; float64)."""
    sched.set_timesteps(nfe)
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((n, sched.sde.k * mix.d), generator=g, dtype=torch.float64)
    for t in sched.exact_timesteps:
        z = sched.step(mix.eps(sched.sde, z, float(t)), t, z).prev_sample
    x = z[:, : mix.d]
    return ((x.mean(0) - mix.mean()).norm() + (torch.cov(x.T) - mix.cov()).norm()).item()


@pytest.mark.parametrize("diffusion,ratio", [("psld", 0.5), ("vp", 0.85)])  # measured: 0.31-0.28 and 0.72-0.75
def test_nfe5_band_beats_classic_on_an_exact_mixture(diffusion, ratio):
    """Same prior draws (seed) for both: a paired comparison."""
    mix = GaussianMixture([0.3, 0.7], [[1.0, -0.5, 0.2], [-0.8, 0.6, -0.3]],
                          torch.stack([0.05 * torch.eye(3), 0.1 * torch.eye(3)]))
    auto = _mixture_error(GDDIMMultistepScheduler(diffusion=diffusion), mix, 5)
    classic = _mixture_error(GDDIMMultistepScheduler(diffusion=diffusion, schedule_preset="classic"), mix, 5)
    assert auto < ratio * classic, (auto, classic)


def test_sampling_eps_stays_the_smallest_time():
    s = GDDIMMultistepScheduler(sampling_eps=0.03)  # σ(0.03) < 0.16: the band's σ_min
    s.set_timesteps(5)
    assert math.isclose(s.resolved_options["sigma_min"], 0.16, rel_tol=1e-9)
    s = GDDIMMultistepScheduler(sampling_eps=0.5)  # σ(0.5) > half the band's σ_max: the classic grid to sampling_eps
    s.set_timesteps(5)
    assert float(s.exact_timesteps[-1]) == 0.5 and float(s.exact_timesteps[0]) == 1.0
    # a weak recipe whose σ(1) is under twice the band's σ_min 0.16: no squeezed EDM grid, the classic one
    s = GDDIMMultistepScheduler(beta_min=0.1, beta_max=1.0)
    s.set_timesteps(12)
    assert s.resolved_options["time_grid"] == "power" and float(s.exact_timesteps[0]) == 1.0
    assert math.isclose(float(s.exact_timesteps[-1]), s.config.sampling_eps, rel_tol=1e-12)


def test_resolved_rho_is_the_exponent_used_and_numpy_indices_save(tmp_path):
    s = GDDIMMultistepScheduler(time_grid="edm")
    s.set_timesteps(5)
    assert s.resolved_options["rho"] == 7.0
    s = GDDIMMultistepScheduler(disable_corrector=[np.int64(0), np.int64(2)])
    s.save_pretrained(tmp_path)  # was: TypeError, int64 is not JSON serializable
    assert GDDIMMultistepScheduler.from_pretrained(tmp_path).config.disable_corrector == [0, 2]


def test_phase_band_above_12_nfe_converges_to_the_probability_flow():
    """From 13 NFE the phase-space default is the classic grid down to sampling_eps with the UniC corrector: its
    samples converge to the exact probability-flow solution from the same prior draws (a 400-step classic run), with
    a smaller error than the classic defaults without the corrector. (The EDM band, which stops at σ = 0.16, keeps
    an error near 0.16 on this mixture at every NFE: the reason it ends at 12 NFE.)"""
    mix = GaussianMixture([0.3, 0.7], [[1.0, -0.5, 0.2], [-0.8, 0.6, -0.3]],
                          torch.stack([0.05 * torch.eye(3), 0.1 * torch.eye(3)]))

    def run(sched, nfe, z1):
        sched.set_timesteps(nfe)
        assert float(sched.exact_timesteps[0]) == 1.0  # same start: a pathwise comparison
        z = z1.clone()
        for t in sched.exact_timesteps:
            z = sched.step(mix.eps(sched.sde, z, float(t)), t, z).prev_sample
        return z[:, : mix.d]

    classic = GDDIMMultistepScheduler(schedule_preset="classic")
    z1 = classic.sample_prior((500, 2 * mix.d), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ref = run(classic, 400, z1)
    errors = {}
    for nfe in (13, 20, 30):
        auto = GDDIMMultistepScheduler()
        got = (run(auto, nfe, z1) - ref).norm(dim=1).mean().item()
        old = (run(GDDIMMultistepScheduler(schedule_preset="classic"), nfe, z1) - ref).norm(dim=1).mean().item()
        assert auto.resolved_options["corrector"] == "unic"
        assert got < 0.6 * old, (nfe, got, old)  # measured ratios 0.49 / 0.58 / 0.47
        errors[nfe] = got
    assert errors[30] < errors[20] < errors[13] < 0.06, errors  # measured 0.0033 < 0.012 < 0.045
