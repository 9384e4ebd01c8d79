"""GDDIMMultistepScheduler: coefficients vs independent routes (closed form, DOP853 with a polynomial x̂₀),
point-mass exactness, observed order 1/2/3/4 (and p + 1 with the UniC corrector) via exact Gaussian laws driven
through ``step()``, agreement with Diffusers' UniPC on the same grid (VP), NFE, reproducibility, validation,
pipeline swap."""
import numpy as np
import pytest
import scipy.integrate
import torch

from diffusers_psld import GDDIMMultistepScheduler
from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler, gddim_transition
from diffusers_psld.schedulers.scheduling_gddim import (corrector_coefficients, log_snr, multistep_coefficients,
                                                        spacing_grid, step_weights)
from diffusers_psld.sde import RecipeSDE

TS = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.01, 1e-3], dtype=torch.float64)
SDES = {"psld": RecipeSDE.psld(), "lin_beta": RecipeSDE.psld(beta_min=1.0, beta_max=12.0), "vp": RecipeSDE.vp()}


def _classic(**kw):
    """The integrator under test on the fixed classic grid (t = 1 to sampling_eps, power 2.5, no corrector) unless
    the test sets schedule keys: these tests are about the update rule, not the NFE-band defaults."""
    kw.setdefault("schedule_preset", "classic")
    return GDDIMMultistepScheduler(**kw)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("interp", ["time", "logsnr"])
def test_weights_sum_to_closed_form(name, interp):
    """Σ_j W_{i,j} = a_{i+1} - Ψ_i a_i (x̂₀ ≡ 1 solves the ODE in closed form)."""
    sde = SDES[name]
    psi, W = multistep_coefficients(sde, TS, [1, 2, 3, 3, 3], interp)
    a = sde.hsm_kernel(TS).mean_coef
    ref = a[1:] - torch.einsum("nij,nj->ni", psi, a[:-1])
    torch.testing.assert_close(W.sum(1), ref, rtol=0, atol=1e-12)
    assert torch.all(W[0, 1:] == 0) and torch.all(W[1, 2:] == 0)  # warm-up orders
    Wc = corrector_coefficients(sde, TS, [1, 2, 3, 3, 3], interp)  # nodes {t_{i+1}, t_i, ...}: the same sum
    assert Wc.shape == (5, 4, sde.k)
    torch.testing.assert_close(Wc.sum(1), ref, rtol=0, atol=1e-12)
    assert torch.all(Wc[0, 2:] == 0) and torch.all(Wc[1, 3:] == 0)


@pytest.mark.parametrize("name,interp,corr", [("psld", "time", False), ("lin_beta", "time", False),
                                               ("psld", "logsnr", False), ("psld", "time", True),
                                               ("lin_beta", "time", True)])
def test_step_exact_for_polynomial_x0_vs_ode_solve(name, interp, corr):
    """Independent route: DOP853 on dz/dτ = β(F + DΣ⁻¹) z - βDΣ⁻¹a x̂₀(τ) with x̂₀ a polynomial of degree
    p - 1 in the interpolation variable; the order-p step must reproduce it. The corrector of an order-p step
    interpolates through p + 1 nodes (t_{i+1} included) and must reproduce degree p."""
    sde = SDES[name]
    F, D = sde.F.numpy(), sde.D.numpy()
    ts = torch.tensor([1.0, 0.7, 0.35, 0.12, 0.02], dtype=torch.float64)
    orders = [1, 2, 3, 3]
    psi, Wp = multistep_coefficients(sde, ts, orders, interp)
    W = corrector_coefficients(sde, ts, orders, interp) if corr else Wp
    rho = (lambda t: log_snr(sde, [t])[0]) if interp == "logsnr" else (lambda t: t)
    coef = [0.4, -0.3, 0.2, 0.15]
    z0 = np.array([0.5, -0.2])
    for i, p in [(2, 3), (3, 3), (1, 2), (0, 1)]:
        deg = p + 1 if corr else p
        x0 = lambda t: sum(c * rho(t) ** m for m, c in enumerate(coef[:deg]))  # noqa: E731

        def rhs(t, z):
            kern = sde.hsm_kernel(t)
            sinv = np.linalg.inv(kern.cov.numpy())
            b = float(sde.beta(t))
            return b * (F + D @ sinv) @ z - b * D @ sinv @ kern.mean_coef.numpy() * x0(t)

        hi, lo = float(ts[i]), float(ts[i + 1])
        sol = scipy.integrate.solve_ivp(rhs, (hi, lo), z0, method="DOP853", rtol=1e-12, atol=1e-13)
        nodes = [i + 1 - j for j in range(p + 1)] if corr else [i - j for j in range(p)]
        got = psi[i].numpy() @ z0 + sum(W[i, j].numpy() * x0(float(ts[m])) for j, m in enumerate(nodes))
        np.testing.assert_allclose(got, sol.y[:, -1], rtol=0, atol=1e-9)
        if corr:  # the order-p predictor is not exact for this degree-p x̂₀ (the test can tell them apart)
            pred = psi[i].numpy() @ z0 + sum(Wp[i, j].numpy() * x0(float(ts[i - j])) for j in range(p))
            assert np.abs(pred - sol.y[:, -1]).max() > 1e-6


def _point_mass_error(n, t0=1.0, **kw):
    sched = _classic(**kw)
    sde = sched.sde
    if t0 < 1:  # the default power grid on [sampling_eps, t0], given as forward times
        eps = sched.config.sampling_eps
        sched.set_timesteps(timesteps=eps + (t0 - eps) * (spacing_grid(sde, n - 1, eps, "power", 2.5) - eps) / (1 - eps))
    else:
        sched.set_timesteps(n)
        t0 = float(sched.exact_timesteps[0])  # below 1 where the NFE band starts at its sigma_max
    c = 0.7
    z = torch.tensor([[0.3], [-0.4]], dtype=torch.float64)[None, : sde.k]
    z_start = z[0, :, 0].clone()  # the state at t = 1
    if t0 < 1:  # a start below t = 1: the data-free flow Ψ(t0, 1) of the state at t = 1 (law N(0, Σ_t0) for N(0, Σ_1))
        z = (gddim_transition(sde, [t0], [1.0])[0] @ z_start)[None, :, None]
    for t in sched.exact_timesteps:  # float64 times: the kernel below must be the scheduler's
        k = sde.hsm_kernel(float(t))
        eps = torch.linalg.solve(k.chol, z[0, :, 0] - k.mean_coef * c)
        z = sched.step(eps[None, :, None], t, z).prev_sample
    exact = sde.hsm_kernel(0.0).mean_coef * c + gddim_transition(sde, [0.0], [1.0])[0] @ (
        z_start - sde.hsm_kernel(1.0).mean_coef * c)
    return (z[0, :, 0] - exact).abs().max().item()


@pytest.mark.parametrize("order", [1, 2, 3, 4])
@pytest.mark.parametrize("corrector", ["none", "unic"])
def test_exact_on_point_mass_data(order, corrector):
    for n in (2, 3, 6, 25):
        assert _point_mass_error(n, solver_order=order, corrector=corrector) < 1e-10, n
    assert _point_mass_error(6, solver_order=order, interpolation="logsnr", time_spacing="logsnr",
                             corrector=corrector) < 1e-10
    for n in (2, 5):  # analytic first step from t = 1 to t_0 = 0.3 (no evaluation at t = 1)
        assert _point_mass_error(n, t0=0.3, solver_order=order, corrector=corrector, analytic_first_step=True) < 1e-10
    assert _point_mass_error(5, t0=0.3, solver_order=order, corrector=corrector, analytic_first_step=False) > 1e-3  # without it: off
    for n in (2, 5):  # VP (k = 1)
        assert _point_mass_error(n, diffusion="vp", solver_order=order, corrector=corrector) < 1e-10
        assert _point_mass_error(n, t0=0.4, diffusion="vp", solver_order=order, corrector=corrector,
                                 analytic_first_step=True) < 1e-10


def test_analytic_first_step_local_error():
    """Gaussian data, exact ε: the state after the first call of a run that starts at t_0 = 1 - h (the analytic
    step 1 → t_0 with x̂₀ at t_0, then a first-order step to t_0 - h/2) has local error O(h²) or better; the
    data-free start without it misses the mean a_{t_0} E[x₀]. With t_0 = 1 the option changes nothing."""
    mu, s0sq = 0.7, 0.25

    def first_call_error(h, afs):
        s = _classic(solver_order=1, analytic_first_step=afs)
        sde = s.sde
        t0 = 1.0 - h
        s.set_timesteps(timesteps=[t0, t0 - 0.5 * h, 0.2, 0.05, 0.01, 1e-3])
        ts = s.exact_timesteps

        def marginal(t):
            kern = sde.hsm_kernel(float(t))
            return kern.mean_coef * mu, torch.outer(kern.mean_coef, kern.mean_coef) * s0sq + kern.cov, kern

        m1, c1, _ = marginal(1.0)
        z = torch.cat([m1[None], torch.linalg.cholesky(c1).T], 0)[..., None]
        z = torch.einsum("ij,bjn->bin", gddim_transition(sde, [ts[0].item()], [1.0])[0], z)  # data-free flow
        m, c, kern = marginal(ts[0])
        shift = torch.zeros(3, 2, dtype=torch.float64)
        shift[0] = m
        eps = (z[..., 0] - shift) @ torch.linalg.solve(c, kern.chol)
        z = s.step(eps[..., None], ts[0], z).prev_sample
        me, ce, _ = marginal(ts[1])
        return max((z[0, :, 0] - me).abs().max().item(), (z[1:, :, 0].T @ z[1:, :, 0] - ce).abs().max().item())

    e = [first_call_error(h, True) for h in (0.2, 0.1, 0.05)]
    assert all(np.log2(e[i] / e[i + 1]) > 1.8 for i in range(2)), e
    assert all(x < 0.05 * first_call_error(h, False) for x, h in zip(e, (0.2, 0.1, 0.05)))
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    outs = []
    for afs in (False, True):
        s = _classic(analytic_first_step=afs)
        s.set_timesteps(6)
        z = z0
        for t in s.timesteps:
            z = s.step(0.1 * z + 0.05 * torch.sin(3 * z), t, z).prev_sample
        outs.append(z)
    assert s._afs is None and torch.equal(outs[0], outs[1])


def _law_error(sched, n, mu=0.7, s0sq=0.25):
    """Max error of mean/cov of the state handed to the last call (t = sampling_eps) for data N(mu, s0sq)
    with the exact ε, from the exact law at t = 1. The update is linear in (z, ε) jointly and the exact ε is
    affine in z, so batch row 0 carries the mean and rows 1.. a square root of the covariance through the
    scheduler's own ``step()``."""
    sde, k = sched.sde, sched.sde.k
    sched.set_timesteps(n)

    def marginal(t):
        kern = sde.hsm_kernel(float(t))
        a = kern.mean_coef
        return a * mu, torch.outer(a, a) * s0sq + kern.cov, kern

    m1, c1, _ = marginal(1.0)
    z = torch.cat([m1[None], torch.linalg.cholesky(c1).T], 0)[..., None]
    shift = torch.zeros(k + 1, k, dtype=torch.float64)
    for t in sched.exact_timesteps[:-1]:
        m, c, kern = marginal(t)
        shift[0] = m
        eps = (z[..., 0] - shift) @ torch.linalg.solve(c, kern.chol)  # ε = Lᵀ C⁻¹ (z - m)
        z = sched.step(eps[..., None], t, z).prev_sample
    mean, lin = z[0, :, 0], z[1:, :, 0]
    me, ce, _ = marginal(sched.config.sampling_eps)
    return max((mean - me).abs().max().item(), (lin.T @ lin - ce).abs().max().item())


@pytest.mark.parametrize("order,diffusion,lo,hi,kw", [
    (1, "psld", 0.85, 1.15, {}), (2, "psld", 1.8, 2.3, {}), (3, "psld", 2.7, 3.4, {}), (3, "vp", 2.7, 3.4, {}),
    (4, "psld", 3.7, 4.6, {}),
    # UniC corrector: one order more at the same NFE
    (1, "psld", 1.8, 2.3, dict(corrector="unic")), (2, "psld", 2.7, 3.4, dict(corrector="unic")),
    (3, "psld", 3.7, 4.6, dict(corrector="unic")), (3, "vp", 3.7, 4.6, dict(corrector="unic")),
    (2, "vp", 2.7, 3.4, dict(corrector="unic", interpolation="logsnr")),
    # order 5 shows cleanly on the log-SNR grid (on the power grid the error changes sign near n = 80)
    (4, "psld", 4.7, 5.8, dict(corrector="unic", time_spacing="logsnr", ns=(20, 40, 80))),
])
def test_observed_order_gaussian_exact_eps(order, diffusion, lo, hi, kw):
    kw = dict(kw)
    ns = kw.pop("ns", (40, 80, 160))
    s = _classic(solver_order=order, diffusion=diffusion, lower_order_final=False, **kw)
    e = [_law_error(s, n) for n in ns]
    rates = [np.log2(e[i] / e[i + 1]) for i in range(2)]
    assert lo < rates[-1] < hi, (e, rates)
    assert e[-1] < e[0]


def _vp_law_run(step, times, sde, mu=0.7, s0sq=0.25):
    """Mean row and covariance-factor rows of the state after calls ``times`` with the exact ε of N(mu, s0sq)
    (the update is linear in the state and ε jointly, see ``_law_error``); ``step(i, eps, z) -> z``."""
    def marginal(t):
        kern = sde.hsm_kernel(float(t))
        return kern.mean_coef * mu, torch.outer(kern.mean_coef, kern.mean_coef) * s0sq + kern.cov, kern

    m1, c1, _ = marginal(times[0])
    z = torch.cat([m1[None], torch.linalg.cholesky(c1).T], 0)[..., None]
    shift = torch.zeros(2, 1, dtype=torch.float64)
    for i, t in enumerate(times):
        m, c, kern = marginal(t)
        shift[0] = m
        z = step(i, ((z[..., 0] - shift) @ torch.linalg.solve(c, kern.chol))[..., None], z)
    return z


@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
def test_vp_corrector_matches_diffusers_unipc_on_the_same_grid(solver_type):
    """VP (k = 1) with ``interpolation="logsnr"`` (λ = log α/σ, UniPC's variable) and the corrector is UniPC's
    data-prediction multistep: on the same σ grid and the exact ε, order 3 agrees with Diffusers'
    ``UniPCMultistepScheduler(solver_order=3)`` to ~1e-3 of either's own error. The only differences are
    UniPC's simplified constants (ρ = 0.5 for its order-2 predictor and order-1 corrector, which depend on the
    B(h) choice, bh1 or bh2), used only in the first two warm-up steps at order 3, where x̂₀ barely moves."""
    from diffusers import UniPCMultistepScheduler

    for n in (20, 40):
        ours = _classic(diffusion="vp", solver_order=3, interpolation="logsnr", time_spacing="logsnr",
                                       lower_order_final=False, corrector="unic")
        ours.set_timesteps(n + 1)
        times = ours.exact_timesteps  # n multistep calls, then the final call at sampling_eps
        sde = ours.sde
        kern = sde.hsm_kernel(times)
        sigma = kern.chol[:, 0, 0] / kern.mean_coef[:, 0]  # Diffusers' σ = √(1 - ᾱ)/√ᾱ at the same times
        up = UniPCMultistepScheduler(solver_order=3, solver_type=solver_type, lower_order_final=False)
        up.set_timesteps(n)
        up.sigmas, up.timesteps = sigma.clone(), torch.arange(n, 0, -1)
        z_ours = _vp_law_run(lambda i, e, z: ours.step(e, ours.timesteps[i], z).prev_sample, times[:-1], sde)
        z_up = _vp_law_run(lambda i, e, z: up.step(e, up.timesteps[i], z).prev_sample, times[:-1], sde)
        a = kern.mean_coef[-1]
        mean, cov = a * 0.7, torch.outer(a, a) * 0.25 + kern.cov[-1]

        def err(z):
            return max((z[0, :, 0] - mean).abs().max().item(), (z[1:, :, 0].T @ z[1:, :, 0] - cov).abs().max().item())

        e_ours, e_up, diff = err(z_ours), err(z_up), (z_ours - z_up).abs().max().item()
        assert 1e-7 < e_ours < 1e-3 and diff < 1e-2 * e_ours and diff < 1e-6, (n, e_ours, e_up, diff)


def test_corrector_disable_and_mid_schedule_start():
    """``disable_corrector`` listing every call = no corrector (bit-exact); a corrected run differs; a loop
    begun at call k warms up (orders and corrector weights recomputed for the lowered orders) and stays exact
    for point-mass data."""
    z0 = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def run(sched, begin=0):
        sched.set_timesteps(8)
        if begin:
            sched.set_begin_index(begin)
        z = z0
        for t in sched.timesteps[begin:]:
            z = sched.step(0.1 * z + 0.05 * torch.sin(3 * z), t, z).prev_sample
        return z

    plain = run(_classic())
    assert torch.equal(run(_classic(corrector="unic", disable_corrector=list(range(8)))), plain)
    assert (run(_classic(corrector="unic")) - plain).abs().max() > 1e-4
    part = run(_classic(corrector="unic", disable_corrector=[0, 1, 2]))
    assert not torch.equal(part, plain)
    s = _classic(corrector="unic", lower_order_final=False)
    run(s, begin=3)
    assert s._orders_used[3:6] == [1, 2, 3]
    sde, ts = s.sde, s._grid_times
    ref = corrector_coefficients(sde, ts[3:6], [1, 2], interpolation="time")
    torch.testing.assert_close(s._Wc[3:5, :3], ref, rtol=0, atol=1e-13)
    a = sde.hsm_kernel(ts).mean_coef
    psi = gddim_transition(sde, ts[1:].tolist(), ts[:-1].tolist())
    torch.testing.assert_close(s._Wc.sum(1), a[1:] - torch.einsum("nij,nj->ni", psi, a[:-1]), rtol=0, atol=1e-12)


def test_order1_is_gddim_conjugate_and_vp_ddim():
    """Order 1 = ConjugateScheduler(eps_basis='gddim', B=0) for an ε consistent with x̂₀; VP order 1 = DDIM."""
    ms = _classic(solver_order=1, time_spacing="striding", striding="quadratic")
    cj = ConjugateScheduler(eps_basis="gddim", conjugate_b="zero", striding="quadratic")
    for s in (ms, cj):
        s.set_timesteps(7)
    torch.testing.assert_close(ms.timesteps, cj.timesteps, rtol=0, atol=0)
    sde = ms.sde
    g = torch.Generator().manual_seed(0)
    for i, t in enumerate(ms.exact_timesteps):
        kern = sde.hsm_kernel(float(t))
        z = torch.randn(2, generator=g, dtype=torch.float64)
        eps = torch.linalg.solve(kern.chol, z - kern.mean_coef * 0.3)
        a, b = ms._tables.P[i] @ z + ms._tables.R[i] @ eps, cj._tables.P[i] @ z + cj._tables.R[i] @ eps
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    vp = _classic(solver_order=1, diffusion="vp")
    vp.set_timesteps(8)
    k = vp.sde.hsm_kernel(torch.cat([vp.exact_timesteps, torch.zeros(1, dtype=torch.float64)]))
    al, sg = k.mean_coef[:, 0], k.chol[:, 0, 0]
    torch.testing.assert_close(vp._tables.P[:, 0, 0], al[1:] / al[:-1], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(vp._tables.R[:, 0, 0], sg[1:] - al[1:] * sg[:-1] / al[:-1], rtol=1e-10, atol=1e-12)


def test_grids():
    sde = RecipeSDE.psld()
    g = spacing_grid(sde, 10, 1e-3, "power", 2.0)
    ref = 1e-3 + (1 - 1e-3) * ((10 - torch.arange(11, dtype=torch.float64)) / 10) ** 2
    torch.testing.assert_close(g, ref, rtol=0, atol=1e-15)
    g = spacing_grid(sde, 8, 1e-3, "logsnr")
    r = log_snr(sde, g.numpy())
    np.testing.assert_allclose(np.diff(r), np.full(8, (r[-1] - r[0]) / 8), rtol=1e-9)
    s = _classic(time_spacing="striding", striding="quadratic")
    s.set_timesteps(6)
    torch.testing.assert_close(s.exact_timesteps, torch.cat([spacing_grid(sde, 5, 1e-3, "power", 2.0)]), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.timesteps, s.exact_timesteps.float(), rtol=0, atol=0)


def test_nfe_reproducible_and_begin_index():
    s = _classic()
    for n in (2, 3, 10):
        s.set_timesteps(n)
        assert len(s.timesteps) == n and s.num_inference_steps == n
    z0 = torch.randn(3, 4, 5, 5, generator=torch.Generator().manual_seed(0))
    outs = []
    for _ in range(2):
        s.set_timesteps(8)
        z = z0
        for t in s.timesteps:
            z = s.step(0.1 * z + 0.05 * torch.sin(3 * z), t, z).prev_sample
        outs.append(z)
    assert torch.equal(outs[0], outs[1]) and torch.all(torch.isfinite(outs[0]))
    s.set_timesteps(8)
    s.set_begin_index(3)  # warms up at lower order from there (tests/test_scheduler_begin_index.py)
    z = z0
    for t in s.timesteps[3:]:
        z = s.step(0.1 * z + 0.05 * torch.sin(3 * z), t, z).prev_sample
    assert s._orders_used[3] == 1 and s._orders_used[4] == 2 and torch.all(torch.isfinite(z))


@pytest.mark.parametrize("kw,name", [(dict(solver_order=5), "solver_order"), (dict(solver_order=True), "solver_order"),
                                     (dict(interpolation="cubic"), "interpolation"),
                                     (dict(lower_order_final="yes"), "lower_order_final"),
                                     (dict(time_spacing="edm"), "time_spacing"),
                                     (dict(spacing_power=0.0), "spacing_power"),
                                     (dict(spacing_power=float("inf")), "spacing_power"),
                                     (dict(quadrature_nodes=3), "quadrature_nodes"),
                                     (dict(gamma=0.0, nu=4.0), "gamma"), (dict(sampler="em"), "sampler"),
                                     (dict(corrector="unipc"), "corrector"), (dict(corrector=True), "corrector"),
                                     (dict(disable_corrector=3), "disable_corrector"),
                                     (dict(disable_corrector=[-1]), "disable_corrector"),
                                     (dict(disable_corrector=[True]), "disable_corrector"),
                                     (dict(analytic_first_step="yes"), "analytic_first_step")])
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        _classic(**kw)


@pytest.mark.parametrize("extra", [{}, dict(corrector="unic", solver_order=2)])
def test_in_pipeline_by_swapping_scheduler(extra):
    from diffusers import UNet2DModel

    from diffusers_psld import PSLDPipeline, PSLDScheduler

    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = PSLDPipeline(unet=unet, scheduler=PSLDScheduler())
    pipe.scheduler = GDDIMMultistepScheduler.from_config(pipe.scheduler.config, **extra)
    outs = [pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
            for _ in range(2)]
    assert np.all(np.isfinite(outs[0])) and np.array_equal(outs[0], outs[1])
