"""GDDIMMultistepScheduler: coefficients vs independent routes (closed form, DOP853 with a polynomial x̂₀),
point-mass exactness, observed order 1/2/3 via exact Gaussian laws driven through ``step()``, NFE,
reproducibility, validation, pipeline swap."""
import numpy as np
import pytest
import scipy.integrate
import torch

from diffusers_psld import GDDIMMultistepScheduler
from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler, gddim_transition
from diffusers_psld.schedulers.scheduling_gddim import log_snr, multistep_coefficients, spacing_grid
from diffusers_psld.sde import RecipeSDE

TS = torch.tensor([1.0, 0.6, 0.3, 0.1, 0.01, 1e-3], dtype=torch.float64)
SDES = {"psld": RecipeSDE.psld(), "lin_beta": RecipeSDE.psld(beta_min=1.0, beta_max=12.0), "vp": RecipeSDE.vp()}


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


@pytest.mark.parametrize("name,interp", [("psld", "time"), ("lin_beta", "time"), ("psld", "logsnr")])
def test_step_exact_for_polynomial_x0_vs_ode_solve(name, interp):
    """Independent route: DOP853 on dz/dτ = β(F + DΣ⁻¹) z - βDΣ⁻¹a x̂₀(τ) with x̂₀ a polynomial of degree
    p - 1 in the interpolation variable; the order-p step must reproduce it."""
    sde = SDES[name]
    F, D = sde.F.numpy(), sde.D.numpy()
    ts = torch.tensor([1.0, 0.7, 0.35, 0.12, 0.02], dtype=torch.float64)
    psi, W = multistep_coefficients(sde, ts, [1, 2, 3, 3], interp)
    rho = (lambda t: log_snr(sde, [t])[0]) if interp == "logsnr" else (lambda t: t)
    coef = [0.4, -0.3, 0.2]
    z0 = np.array([0.5, -0.2])
    for i, p in [(2, 3), (3, 3), (1, 2)]:
        x0 = lambda t: sum(c * rho(t) ** m for m, c in enumerate(coef[:p]))  # noqa: E731

        def rhs(t, z):
            kern = sde.hsm_kernel(t)
            sinv = np.linalg.inv(kern.cov.numpy())
            b = float(sde.beta(t))
            return b * (F + D @ sinv) @ z - b * D @ sinv @ kern.mean_coef.numpy() * x0(t)

        hi, lo = float(ts[i]), float(ts[i + 1])
        sol = scipy.integrate.solve_ivp(rhs, (hi, lo), z0, method="DOP853", rtol=1e-12, atol=1e-13)
        got = psi[i].numpy() @ z0 + sum(W[i, j].numpy() * x0(float(ts[i - j])) for j in range(p))
        np.testing.assert_allclose(got, sol.y[:, -1], rtol=0, atol=1e-9)


def _point_mass_error(n, **kw):
    sched = GDDIMMultistepScheduler(**kw)
    sde = sched.sde
    sched.set_timesteps(n)
    c = 0.7
    z = torch.tensor([[0.3], [-0.4]], dtype=torch.float64)[None]
    z_start = z[0, :, 0].clone()
    for t in sched.exact_timesteps:  # float64 times: the kernel below must be the scheduler's
        k = sde.hsm_kernel(float(t))
        eps = torch.linalg.solve(k.chol, z[0, :, 0] - k.mean_coef * c)
        z = sched.step(eps[None, :, None], t, z).prev_sample
    exact = torch.tensor([c, 0.0], dtype=torch.float64) + gddim_transition(sde, [0.0], [1.0])[0] @ (
        z_start - sde.hsm_kernel(1.0).mean_coef * c)
    return (z[0, :, 0] - exact).abs().max().item()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_exact_on_point_mass_data(order):
    for n in (2, 3, 6, 25):
        assert _point_mass_error(n, solver_order=order) < 1e-10, n
    assert _point_mass_error(6, solver_order=order, interpolation="logsnr", time_spacing="logsnr") < 1e-10


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


@pytest.mark.parametrize("order,diffusion,lo,hi", [(1, "psld", 0.85, 1.15), (2, "psld", 1.8, 2.3),
                                                   (3, "psld", 2.7, 3.4), (3, "vp", 2.7, 3.4)])
def test_observed_order_gaussian_exact_eps(order, diffusion, lo, hi):
    s = GDDIMMultistepScheduler(solver_order=order, diffusion=diffusion, lower_order_final=False)
    e = [_law_error(s, n) for n in (40, 80, 160)]
    rates = [np.log2(e[i] / e[i + 1]) for i in range(2)]
    assert lo < rates[-1] < hi, (e, rates)
    assert e[-1] < e[0]


def test_order1_is_gddim_conjugate_and_vp_ddim():
    """Order 1 = ConjugateScheduler(eps_basis='gddim', B=0) for an ε consistent with x̂₀; VP order 1 = DDIM."""
    ms = GDDIMMultistepScheduler(solver_order=1, time_spacing="striding", striding="quadratic")
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
    vp = GDDIMMultistepScheduler(solver_order=1, diffusion="vp")
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
    s = GDDIMMultistepScheduler(time_spacing="striding", striding="quadratic")
    s.set_timesteps(6)
    torch.testing.assert_close(s.exact_timesteps, torch.cat([spacing_grid(sde, 5, 1e-3, "power", 2.0)]), rtol=0, atol=1e-15)
    torch.testing.assert_close(s.timesteps, s.exact_timesteps.float(), rtol=0, atol=0)


def test_nfe_reproducible_and_begin_index():
    s = GDDIMMultistepScheduler()
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


@pytest.mark.parametrize("kw,name", [(dict(solver_order=4), "solver_order"), (dict(solver_order=True), "solver_order"),
                                     (dict(interpolation="cubic"), "interpolation"),
                                     (dict(lower_order_final="yes"), "lower_order_final"),
                                     (dict(time_spacing="edm"), "time_spacing"),
                                     (dict(spacing_power=0.0), "spacing_power"),
                                     (dict(spacing_power=float("inf")), "spacing_power"),
                                     (dict(quadrature_nodes=3), "quadrature_nodes"),
                                     (dict(gamma=0.0, nu=4.0), "gamma"), (dict(sampler="em"), "sampler")])
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        GDDIMMultistepScheduler(**kw)


def test_in_pipeline_by_swapping_scheduler():
    from diffusers import UNet2DModel

    from diffusers_psld import PSLDPipeline, PSLDScheduler

    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = PSLDPipeline(unet=unet, scheduler=PSLDScheduler())
    pipe.scheduler = GDDIMMultistepScheduler.from_config(pipe.scheduler.config)
    outs = [pipe(batch_size=2, num_inference_steps=5, output_type="np", generator=torch.Generator().manual_seed(0)).images
            for _ in range(2)]
    assert np.all(np.isfinite(outs[0])) and np.array_equal(outs[0], outs[1])
