"""The complete recipe (PSLD paper Sec. 3) against independent routes, in float64."""
import math

import mpmath
import numpy as np
import pytest
import torch
from scipy.integrate import solve_ivp

from diffusers_psld import RecipeSDE

GAMMAS = [0.0, 0.005, 0.01, 0.02, 0.25]
TIMES = np.concatenate([np.logspace(-5, 0, 26), [0.33, 0.77]])


def presets():
    yield "vp", RecipeSDE.vp()
    yield "cld", RecipeSDE.cld()
    for g in GAMMAS:
        yield f"psld{g}", RecipeSDE.psld(gamma=g, nu=g + 4.0)
    yield "psld-nu1-g2", RecipeSDE.psld(gamma=2.0, nu=1.0)
    yield "psld-linear-beta", RecipeSDE.psld(beta_min=0.5, beta_max=12.0)
    rng = np.random.default_rng(0)
    for i in range(3):  # random k = 3 recipes
        a = rng.normal(size=(3, 3))
        q = rng.normal(size=(3, 3))
        yield f"random{i}", RecipeSDE(D=a @ a.T, Q=q - q.T, masses=rng.uniform(0.2, 2.0, 3), beta_min=1.0,
                                     beta_max=3.0, kappa=0.1)


# ---------------------------------------------------------------------- presets = the paper's SDEs
def test_psld_preset_is_paper_eq7():
    g, nu = 0.01, 4.01
    sde = RecipeSDE.psld(gamma=g, nu=nu)
    m_inv = (nu - g) ** 2 / 4
    expected_f = 0.5 * torch.tensor([[-g, m_inv], [-1.0, -nu]], dtype=torch.float64)
    assert torch.allclose(sde.F, expected_f, atol=1e-15)
    # G Gᵀ = β diag(Γ, Mν)
    G = sde.diffusion(0.3)
    assert torch.allclose(G @ G.T, 8.0 * torch.diag(torch.tensor([g, nu / m_inv], dtype=torch.float64)), atol=1e-14)
    assert torch.allclose(sde.prior_cov, torch.diag(torch.tensor([1.0, 1 / m_inv], dtype=torch.float64)))


def test_vp_preset_and_cld_is_psld_gamma0():
    vp = RecipeSDE.vp()
    assert vp.k == 1 and vp.F.item() == -0.5 and vp.beta(0.0).item() == 0.1 and vp.beta(1.0).item() == 20.0
    assert torch.allclose(vp.diffusion(1.0) ** 2, torch.tensor([[20.0]], dtype=torch.float64))
    cld, psld0 = RecipeSDE.cld(), RecipeSDE.psld(gamma=0.0, nu=4.0)
    for name in ("F", "D", "Q", "masses", "init_cov"):
        assert torch.equal(getattr(cld, name), getattr(psld0, name)), name
    # CLD-SGM's own parametrisation (β_CLD = 4, friction Γ_CLD = 2/sqrt(M⁻¹) = 1, M⁻¹ = 4): dx = M⁻¹ v β dt,
    # dv = (-x β - Γ_CLD M⁻¹ v β) dt + sqrt(2 Γ_CLD β) dW  equals PSLD Γ = 0, ν = 4, β = 8.
    b_cld, m_inv, fric = 4.0, 4.0, 1.0
    f_cld = b_cld * torch.tensor([[0.0, m_inv], [-1.0, -fric * m_inv]], dtype=torch.float64)
    assert torch.allclose(cld.drift_matrix(0.5), f_cld, atol=1e-14)
    assert torch.allclose(2 * cld.beta(0.5) * cld.D, torch.diag(torch.tensor([0.0, 2 * fric * b_cld], dtype=torch.float64)))


@pytest.mark.parametrize("name,sde", list(presets()))
def test_stationarity_lyapunov_residual(name, sde):
    assert sde.lyapunov_residual() < 1e-10
    # and the kernel converges to the prior
    phi, sigma = sde.transition(0.0, 1.0) if sde.beta_integral(1.0) > 30 else sde.transition(0.0, 1.0)
    phi_far, sigma_far = __import__("diffusers_psld").sde.kernels.transition(sde.F, sde.D, sde.prior_cov, torch.tensor(400.0))
    assert torch.allclose(sigma_far, sde.prior_cov, atol=1e-10)
    assert phi_far.abs().max() < 1e-10


# ---------------------------------------------------------------------- kernels vs 50-digit Van Loan
def _mp_transition(F, D, b):
    mpmath.mp.dps = 50
    k = F.shape[0]
    M = mpmath.zeros(2 * k, 2 * k)
    for i in range(k):
        for j in range(k):
            M[i, j] = mpmath.mpf(F[i, j].item()) * b
            M[i, k + j] = 2 * mpmath.mpf(D[i, j].item()) * b
            M[k + i, k + j] = -mpmath.mpf(F[j, i].item()) * b
    E = mpmath.expm(M)
    phi = E[:k, :k]
    sigma = E[:k, k:] * phi.T
    to_t = lambda m: torch.tensor([[float(m[i, j]) for j in range(k)] for i in range(k)], dtype=torch.float64)  # noqa: E731
    return to_t(phi), to_t(sigma)


@pytest.mark.parametrize("name,sde", [p for p in presets() if p[0] in ("vp", "psld0.0", "psld0.01", "psld0.25", "random0")])
def test_transition_matches_high_precision_van_loan(name, sde):
    for t in TIMES[::3]:
        b = mpmath.mpf(sde.beta_integral(float(t)).item())
        phi_ref, sigma_ref = _mp_transition(sde.F, sde.D, b)
        phi, sigma = sde.transition(0.0, float(t))
        assert torch.allclose(phi, phi_ref, rtol=1e-12, atol=5e-14)
        # relative accuracy on every entry, including those that vanish like b³ at small t
        rel = ((sigma - sigma_ref).abs() / sigma_ref.abs().clamp_min(1e-300))[sigma_ref.abs() > 1e-200]
        assert rel.max() < 1e-11, (t, rel.max())


def _paper_closed_form_hsm(g, nu, kappa, B):
    """The PSLD kernel in closed form (official code's ``_mean``/``_cov``, HSM case, without its +1e-9)."""
    delta, lam = nu - g, (nu + g) / 4
    m_inv = delta ** 2 / 4
    M = 1 / m_inv
    E = math.exp(-2 * lam * B)
    em1 = math.expm1(2 * lam * B)
    xx0, mm0 = 0.0, kappa * M
    mean_x = math.exp(-lam * B) * (1 + delta * B / 4)
    mean_m = math.exp(-lam * B) * (-B / 2)
    sxx = E * ((1 + delta * B / 4) ** 2 * xx0 + (m_inv * B / 2) ** 2 * mm0 + em1 - m_inv / 2 * B ** 2 - delta / 2 * B)
    sxm = E * (-(B / 2) * (1 + delta * B / 4) * xx0 + (m_inv * B / 2) * (1 - delta * B / 4) * mm0 + delta / 4 * B ** 2)
    smm = E * (B ** 2 / 4 * xx0 + (1 - delta * B / 4) ** 2 * mm0 + M * em1 + M * delta / 2 * B - B ** 2 / 2)
    return [mean_x, mean_m], [[sxx, sxm], [sxm, smm]]


@pytest.mark.parametrize("gamma", GAMMAS)
def test_psld_closed_form_equals_generic_route(gamma):
    nu, kappa = gamma + 4.0, 0.04
    sde = RecipeSDE.psld(gamma=gamma, nu=nu, kappa=kappa)
    t = torch.tensor(np.logspace(-5, 0, 200), dtype=torch.float64)
    kern = sde.hsm_kernel(t)
    for i, ti in enumerate(t.tolist()):
        mean, cov = _paper_closed_form_hsm(gamma, nu, kappa, sde.beta_integral(ti).item())
        assert torch.allclose(kern.mean_coef[i], torch.tensor(mean, dtype=torch.float64), atol=1e-10, rtol=0)
        assert torch.allclose(kern.cov[i], torch.tensor(cov, dtype=torch.float64), atol=1e-10, rtol=0)
    # no negative variance or NaN anywhere on the grid; the Cholesky factor is finite and non-singular
    assert torch.all(torch.isfinite(kern.chol))
    assert torch.all(kern.cov.diagonal(dim1=-2, dim2=-1) > 0)
    assert torch.all(kern.chol.diagonal(dim1=-2, dim2=-1) > 0)
    assert torch.all(torch.isfinite(kern.inv_chol_t()))
    assert torch.allclose(kern.chol @ kern.chol.transpose(-1, -2), kern.cov, rtol=1e-12, atol=1e-300)


@pytest.mark.parametrize("name,sde", [p for p in presets() if p[0] in ("vp", "psld-linear-beta", "random1")])
def test_hsm_kernel_matches_moment_ode(name, sde):
    """dμ/dt = βFμ, dΣ/dt = β(FΣ + ΣFᵀ + 2D), integrated by scipy (time-varying β exercised)."""
    k = sde.k
    F, D = sde.F.numpy(), sde.D.numpy()

    def rhs(t, y):
        beta = float(sde.beta(t))
        mu, S = y[:k], y[k:].reshape(k, k)
        return np.concatenate([beta * F @ mu, (beta * (F @ S + S @ F.T + 2 * D)).ravel()])

    y0 = np.concatenate([np.eye(k)[0], sde.init_cov.numpy().ravel()])
    ts = [1e-3, 0.1, 0.5, 1.0]
    sol = solve_ivp(rhs, (0, 1), y0, t_eval=ts, rtol=1e-12, atol=1e-14, method="DOP853")
    kern = sde.hsm_kernel(torch.tensor(ts, dtype=torch.float64))
    for i in range(len(ts)):
        assert np.allclose(kern.mean_coef[i].numpy(), sol.y[:k, i], rtol=1e-8, atol=1e-11)
        assert np.allclose(kern.cov[i].numpy(), sol.y[k:, i].reshape(k, k), rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("name,sde", [p for p in presets() if p[0] in ("vp", "psld0.01", "cld")])
def test_hsm_kernel_matches_monte_carlo_forward_sde(name, sde):
    """Euler–Maruyama simulation of the forward SDE from (x₀, m₀ ~ N(0, κM)) vs the closed-form kernel."""
    g = torch.Generator().manual_seed(1)
    n, t_end, steps = 200_000, 0.25, 250
    x0 = 0.7
    k = sde.k
    z = torch.zeros(n, k, dtype=torch.float64)
    z[:, 0] = x0
    z = z + torch.randn(n, k, generator=g, dtype=torch.float64) @ sde.init_cov.sqrt().T
    h = t_end / steps
    for i in range(steps):
        t = (i + 0.5) * h  # midpoint β: weak order 1 in h for the linear SDE
        G = sde.diffusion(t)
        z = z + h * z @ sde.drift_matrix(t).T + math.sqrt(h) * torch.randn(n, k, generator=g, dtype=torch.float64) @ G.T
    kern = sde.hsm_kernel(t_end)
    mc_mean, mc_cov = z.mean(0), torch.cov(z.T).reshape(k, k)
    se = (kern.cov.diagonal() / n).sqrt()
    assert torch.all((mc_mean - kern.mean_coef * x0).abs() < 5 * se + 2e-3), (mc_mean, kern.mean_coef * x0)
    assert torch.allclose(mc_cov, kern.cov, atol=5 * math.sqrt(2 / n) * kern.cov.diagonal().max().item() + 3e-3)


def test_eps_mask_selects_components_that_reach_the_dynamics():
    assert RecipeSDE.vp().eps_mask().tolist() == [True]
    assert RecipeSDE.psld().eps_mask().tolist() == [True, True]
    assert RecipeSDE.cld().eps_mask().tolist() == [False, True]


# ---------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(D=[[1.0, 0], [0, -0.1]]), "positive semi-definite"),
        (dict(D=[[1.0, 0.5], [0.0, 1.0]]), "symmetric"),
        (dict(Q=[[0.0, 1.0], [1.0, 0.0]]), "skew-symmetric"),
        (dict(masses=[1.0, -1.0]), "masses"),
        (dict(masses=[1.0]), "dimension mismatch"),
        (dict(beta_min=-1.0), "beta_min"),
        (dict(beta_max=float("nan")), "beta_max"),
        (dict(beta_min=5.0, beta_max=1.0), "beta_max"),
        (dict(kappa=-0.1), "kappa"),
        (dict(kappa=0.0), "kappa"),
        (dict(D=[[float("nan"), 0], [0, 1]]), "`D` must be finite"),
    ],
)
def test_invalid_recipe_parameters(kwargs, match):
    base = dict(D=[[0.1, 0.0], [0.0, 0.2]], Q=[[0.0, -0.5], [0.5, 0.0]], masses=[1.0, 0.25], beta_min=1.0,
                beta_max=2.0, kappa=0.04)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        RecipeSDE(**base)


@pytest.mark.parametrize("kwargs,match", [(dict(gamma=-0.1), "gamma"), (dict(nu=float("nan")), "nu"),
                                           (dict(gamma=1.0, nu=1.0), "critical damping"), (dict(m_inv=0.0), "m_inv")])
def test_invalid_psld_parameters(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RecipeSDE.psld(**kwargs)


def test_invalid_times():
    sde = RecipeSDE.psld()
    with pytest.raises(ValueError, match="non-negative"):
        sde.transition(0.5, 0.1)
