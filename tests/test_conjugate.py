"""ConjugateScheduler (λ-DDIM): coefficients vs independent routes, convergence order via exact
moment propagation, reproducibility, validation."""
import numpy as np
import pytest
import scipy.integrate
import scipy.linalg
import torch

from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler, conjugate_coefficients, expm_batch
from diffusers_psld.schedulers.scheduling_psld import PSLDScheduler
from diffusers_psld.sde import RecipeSDE

TS = torch.tensor([1.0, 0.6, 0.2, 0.01, 1e-3, 0.0], dtype=torch.float64)


def _marginal(sde, mu0, s0sq, t):
    kern = sde.hsm_kernel(float(t))
    a = kern.mean_coef
    return a * mu0, torch.outer(a, a) * s0sq + kern.cov


def moment_errors(sched, n, mu0=0.7, s0sq=0.25):
    """Exact mean/cov of the state at t = sampling_eps through the affine tables (exact ε of N(mu0, s0sq))."""
    sched.set_timesteps(n)
    sde, tab = sched.sde, sched._tables
    mean, cov = _marginal(sde, mu0, s0sq, tab.state_times[0])
    for i in range(len(tab.kinds) - 1):
        m_t, c_t = _marginal(sde, mu0, s0sq, tab.eval_times[i])
        E = sde.hsm_kernel(tab.eval_times[i]).chol.T @ torch.linalg.inv(c_t)  # ε = E (z - m_t)
        A = tab.P[i] + tab.R[i] @ E
        mean = A @ mean - tab.R[i] @ E @ m_t
        cov = A @ cov @ A.T + tab.S[i] @ tab.S[i].T
    m_ref, c_ref = _marginal(sde, mu0, s0sq, sched.config.sampling_eps)
    return abs(mean[0] - m_ref[0]).item(), abs(cov[0, 0] - c_ref[0, 0]).item()


def test_vp_lambda0_is_ddim():
    sde = RecipeSDE.vp()
    P, Q = conjugate_coefficients(sde, TS, "zero", 0.0)
    k = sde.hsm_kernel(TS)
    a, s = k.mean_coef[:, 0], k.chol[:, 0, 0]
    torch.testing.assert_close(P[:, 0, 0], a[1:] / a[:-1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Q[:, 0, 0], s[1:] - a[1:] * s[:-1] / a[:-1], rtol=1e-11, atol=1e-12)


def test_vp_lambda_closed_form():
    sde, lam = RecipeSDE.vp(), 1.3
    P, _ = conjugate_coefficients(sde, TS, "identity", lam)
    a, h = sde.hsm_kernel(TS).mean_coef[:, 0], TS[:-1] - TS[1:]
    torch.testing.assert_close(P[:, 0, 0], torch.exp(lam * h) * (1 - lam * h) * a[1:] / a[:-1], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("b", ["identity", "ones"])
def test_lambda0_is_exponential_integrator(b):
    sde = RecipeSDE.psld()
    P0, Q0 = conjugate_coefficients(sde, TS, "zero", 0.0)
    P, Q = conjugate_coefficients(sde, TS, b, 0.0)
    torch.testing.assert_close(P, P0, rtol=0, atol=0)
    torch.testing.assert_close(Q, Q0, rtol=0, atol=0)
    # P of the exponential integrator is the inverse forward transition matrix
    phi, _ = sde.transition(TS[1:], TS[:-1])
    torch.testing.assert_close(P0, torch.linalg.inv(phi), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("name,b,lam", [("psld", "zero", 0.0), ("psld", "ones", 1.5), ("lin", "identity", -0.7)])
def test_coefficients_vs_ode_solve(name, b, lam):
    """Independent route: DOP853 on dV/ds = V(B - βF), dq/ds = -V β D L^{-T} c (constant ε = c)."""
    sde = RecipeSDE.psld() if name == "psld" else RecipeSDE.psld(beta_min=1.0, beta_max=12.0)
    ts = torch.tensor([1.0, 0.55, 0.05], dtype=torch.float64)
    P, Q = conjugate_coefficients(sde, ts, b, lam)
    Bm = {"zero": np.zeros((2, 2)), "ones": lam * np.ones((2, 2)), "identity": lam * np.eye(2)}[b]
    F, D = sde.F.numpy(), sde.D.numpy()
    c, z0 = np.array([0.3, -1.1]), np.array([0.5, 0.2])
    for i in range(2):
        hi, lo = float(ts[i]), float(ts[i + 1])

        def rhs(u, y):
            V = y[:4].reshape(2, 2)
            bt = float(sde.beta(u))
            return np.concatenate([(V @ (Bm - bt * F)).ravel(), -(V @ (bt * D @ sde.hsm_kernel(u).inv_chol_t().numpy()) @ c)])

        sol = scipy.integrate.solve_ivp(rhs, (lo, hi), np.r_[np.eye(2).ravel(), 0, 0], method="DOP853", rtol=1e-12, atol=1e-13)
        V, q = sol.y[:4, -1].reshape(2, 2), sol.y[4:, -1]
        ref = V @ (np.eye(2) - (hi - lo) * Bm) @ z0 + q
        got = P[i].numpy() @ z0 + Q[i].numpy() @ c
        np.testing.assert_allclose(got, ref, rtol=1e-9, atol=1e-10)


def test_expm_batch_matches_scipy():
    F = RecipeSDE.psld().F.numpy()
    M = np.concatenate([F[None] * np.linspace(-8, 8, 41)[:, None, None],
                        np.random.default_rng(0).normal(size=(50, 2, 2))])
    ref = np.stack([scipy.linalg.expm(m) for m in M])
    np.testing.assert_allclose(expm_batch(M), ref, rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("kw", [dict(), dict(conjugate_b="identity", conjugate_lambda=1.0), dict(diffusion="vp")])
def test_first_order_convergence(kw):
    s = ConjugateScheduler(**kw)
    e1, e2 = moment_errors(s, 200), moment_errors(s, 400)
    for a, b in zip(e1, e2):
        if a > 1e-12:  # λ = 0 reproduces the mean exactly
            assert 1.6 < a / b < 2.4, (e1, e2)


def test_bit_reproducible_and_float64_tables():
    s = ConjugateScheduler(conjugate_lambda=1.0)
    s.set_timesteps(6)
    assert s._tables.P.dtype == torch.float64 and len(s.timesteps) == 6
    z0, eps = torch.randn(3, 4, 5, 5), torch.randn(3, 4, 5, 5)
    outs = []
    for _ in range(2):
        s.set_timesteps(6)
        z = z0
        for t in s.timesteps:
            z = s.step(eps, t, z).prev_sample
        outs.append(z)
    assert torch.equal(outs[0], outs[1]) and torch.all(torch.isfinite(outs[0]))


@pytest.mark.parametrize("kw,name", [(dict(conjugate_lambda=float("nan")), "conjugate_lambda"),
                                     (dict(conjugate_lambda="x"), "conjugate_lambda"),
                                     (dict(conjugate_b="two"), "conjugate_b"),
                                     (dict(quadrature_nodes=2), "quadrature_nodes"),
                                     (dict(sampler="em"), "sampler"),
                                     (dict(striding="cosine"), "striding")])
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        ConjugateScheduler(**kw)
    with pytest.raises(ValueError, match="num_inference_steps"):
        ConjugateScheduler().set_timesteps(1)


def test_from_config_roundtrip():
    s = ConjugateScheduler.from_config(PSLDScheduler(gamma=0.02).config)
    assert s.config.sampler == "conjugate" and s.config.gamma == 0.02
    back = PSLDScheduler.from_config(s.config)
    assert back.config.sampler == "em"


# ---------------------------------------------------------------------------------------------- gDDIM ε basis
from diffusers_psld.schedulers.scheduling_conjugate import gddim_angle, gddim_transition  # noqa: E402

_SDES = {"psld": RecipeSDE.psld(), "psld_g025": RecipeSDE.psld(gamma=0.25, nu=4.25),
         "lin_beta": RecipeSDE.psld(beta_min=1.0, beta_max=12.0)}


@pytest.mark.parametrize("name", list(_SDES))
def test_gddim_transition_vs_matrix_ode_and_cov(name):
    """Ψ(s, t) = L_s Rot(θ_s - θ_t) L_t⁻¹ against DOP853 on dK/dτ = β(F + DΣ⁻¹)K; Ψ Σ_t Ψᵀ = Σ_s (R Rᵀ = Σ)."""
    sde = _SDES[name]
    F, D = sde.F.numpy(), sde.D.numpy()

    def rhs(u, y):
        A = float(sde.beta(u)) * (F + D @ np.linalg.inv(sde.hsm_kernel(u).cov.numpy()))
        return (A @ y.reshape(2, 2)).ravel()

    pairs = [(0.5, 1.0), (0.01, 0.3), (1e-3, 0.05), (2e-4, 1e-3)]
    psi = gddim_transition(sde, [p[0] for p in pairs], [p[1] for p in pairs]).numpy()
    for (s, t), got in zip(pairs, psi):
        sol = scipy.integrate.solve_ivp(rhs, (t, s), np.eye(2).ravel(), method="DOP853", rtol=1e-12, atol=1e-13)
        np.testing.assert_allclose(got, sol.y[:, -1].reshape(2, 2), rtol=0, atol=1e-10)
    s = np.array([0.0, 1e-4, 0.02, 0.7])
    t = np.array([0.1, 0.3, 1.0, 0.9])
    psi = gddim_transition(sde, s, t)
    cs, ct = sde.hsm_kernel(torch.from_numpy(s)).cov, sde.hsm_kernel(torch.from_numpy(t)).cov
    torch.testing.assert_close(psi @ ct @ psi.transpose(1, 2), cs, rtol=0, atol=1e-13)
    assert torch.all(psi[0, 0] == 0)  # Ψ(0, t): x-row zero (Σ_0 has zero x-variance)
    # the angle is additive, starts at 0 and does not depend on which other times are requested
    th = gddim_angle(sde, [0.0, 0.3, 1.0])
    assert th[0] == 0 and abs(gddim_angle(sde, [0.3])[0] - th[1]) < 1e-12


def _dirac_final_error(basis, n, b="zero", lam=0.0, c=0.7):
    sched = ConjugateScheduler(eps_basis=basis, conjugate_b=b, conjugate_lambda=lam)
    sde = sched.sde
    sched.set_timesteps(n)
    z = torch.tensor([[0.3], [-0.4]], dtype=torch.float64)[None]
    z_start = z[0, :, 0].clone()
    for t in sched.exact_timesteps:
        k = sde.hsm_kernel(float(t))
        eps = torch.linalg.solve(k.chol, z[0, :, 0] - k.mean_coef * c)  # exact ε of point-mass data at c
        z = sched.step(eps[None, :, None], t, z).prev_sample
    a1 = sde.hsm_kernel(1.0).mean_coef
    exact = torch.tensor([c, 0.0], dtype=torch.float64) + gddim_transition(sde, [0.0], [1.0])[0] @ (z_start - a1 * c)
    return (z[0, :, 0] - exact).abs().max().item()


def test_gddim_basis_exact_on_point_mass_data():
    for n in (2, 3, 10, 40):
        assert _dirac_final_error("gddim", n) < 1e-9, n
    assert _dirac_final_error("cholesky", 2) > 100 and _dirac_final_error("cholesky", 10) > 1
    assert _dirac_final_error("gddim", 10, "ones", 1.0) > 1e-3  # B ≠ 0 is not exact


def test_gddim_zero_b_equals_data_prediction_form():
    """B = 0 with ε_R frozen: z_s = a_s x̂₀ + Ψ(s, t)(z_t - a_t x̂₀) for an ε consistent with x̂₀."""
    sde = RecipeSDE.psld()
    P, Q = conjugate_coefficients(sde, TS, "zero", 0.0, eps_basis="gddim")
    kern = sde.hsm_kernel(TS)
    psi = gddim_transition(sde, TS[1:], TS[:-1])
    g = torch.Generator().manual_seed(0)
    for i in range(len(TS) - 1):
        z, x0 = torch.randn(2, generator=g, dtype=torch.float64), 0.8
        a, an = kern.mean_coef[i], kern.mean_coef[i + 1]
        eps = torch.linalg.solve(kern.chol[i], z - a * x0)
        ref = an * x0 + psi[i] @ (z - a * x0)
        torch.testing.assert_close(P[i] @ z + Q[i] @ eps, ref, rtol=1e-10, atol=1e-10)


def test_gddim_vp_is_ddim():
    sde = RecipeSDE.vp()
    P, Q = conjugate_coefficients(sde, TS, "zero", 0.0, eps_basis="gddim")
    k = sde.hsm_kernel(TS)
    a, s = k.mean_coef[:, 0], k.chol[:, 0, 0]
    torch.testing.assert_close(P[:, 0, 0], a[1:] / a[:-1], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(Q[:, 0, 0], s[1:] - a[1:] * s[:-1] / a[:-1], rtol=1e-11, atol=1e-12)
    torch.testing.assert_close(gddim_transition(sde, TS[1:], TS[:-1])[:, 0, 0], s[1:] / s[:-1], rtol=1e-13, atol=0)


@pytest.mark.parametrize("kw", [dict(), dict(conjugate_b="identity", conjugate_lambda=1.0),
                                dict(conjugate_b="ones", conjugate_lambda=1.0)])
def test_gddim_first_order_convergence(kw):
    s = ConjugateScheduler(eps_basis="gddim", **kw)
    e1, e2 = moment_errors(s, 200), moment_errors(s, 400)
    for a, b in zip(e1, e2):
        if a > 1e-12:
            assert 1.7 < a / b < 2.3, (e1, e2)


@pytest.mark.parametrize("kw", [dict(eps_basis="qr"), dict(eps_basis="gddim", gamma=0.0, nu=4.0)])
def test_gddim_validation(kw):
    with pytest.raises(ValueError, match="eps_basis"):
        ConjugateScheduler(**kw)
