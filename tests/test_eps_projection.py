"""``project_eps``: replacing a network's ε by the consistent ε' = L⁻¹(z - a x̂₀), x̂₀ = aᵀ(z - Lε)/aᵀa.

Checked against the definition (solves, not the folded matrices), on exact Gaussian-mixture ε (which is
consistent, so the projection must be the identity there), and on an ε with an injected inconsistent
component (which the projection must remove exactly, so the samplers follow the exact-ε trajectory and
the probability-flow ODE meets gDDIM's data-prediction integrator)."""
import pytest
import torch

from diffusers_psld import GDDIMMultistepScheduler, PSLDScheduler, SSCSScheduler
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.ode import probability_flow_sample
from diffusers_psld.sampling import eps_projection
from diffusers_psld.sde import RecipeSDE

SDE = RecipeSDE.psld(0.01, 4.01, 8.0, 8.0, 0.04, None)
DATA = GaussianMixture([0.5, 0.5], [[-1.0, 0.5], [1.0, -0.5]],
                       [[[0.05, 0.02], [0.02, 0.08]], [[0.1, 0.0], [0.0, 0.03]]])
D = 2


def _by_definition(z, eps, t, sde=SDE):
    """ε' straight from the definition, with solves (independent of the folded k×k matrices)."""
    kern = sde.hsm_kernel(float(t))
    a, L = kern.mean_coef, kern.chol
    k = sde.k
    zz, ee = z.reshape(z.shape[0], k, -1), eps.reshape(z.shape[0], k, -1)
    r = zz - torch.einsum("ij,bjn->bin", L, ee)  # z - Lε
    x0 = torch.einsum("j,bjn->bn", a, r) / (a @ a)
    resid = zz - a[None, :, None] * x0[:, None, :]
    out = torch.linalg.solve(L, resid.transpose(0, 1).reshape(k, -1)).reshape(k, z.shape[0], -1).transpose(0, 1)
    return out.reshape(z.shape), x0


def _apply(mats, z, eps):
    Mz, Me = mats
    k = Mz.shape[-1]
    zz, ee = z.reshape(z.shape[0], k, -1), eps.reshape(z.shape[0], k, -1)
    return (torch.einsum("ij,bjn->bin", Mz, zz) + torch.einsum("ij,bjn->bin", Me, ee)).reshape(z.shape)


def _inconsistent(z, t, scale=0.5, sde=SDE):
    """An ε perturbation whose L-image is orthogonal to a: it changes the score, not x̂₀."""
    kern = sde.hsm_kernel(float(t))
    a = kern.mean_coef
    b = torch.stack([-a[1], a[0]])  # aᵀb = 0
    u = torch.linalg.solve(kern.chol, b) * scale
    pattern = torch.tanh(z.reshape(z.shape[0], 2, -1)[:, :1])  # a state-dependent amplitude
    return (u[None, :, None] * pattern).reshape(z.shape)


@pytest.mark.parametrize("t", [1.0, 0.3, 0.02, 1e-3])
def test_matrices_match_the_definition_and_are_a_projection(t):
    g = torch.Generator().manual_seed(0)
    z, eps = torch.randn(5, 2 * D, dtype=torch.float64, generator=g), torch.randn(5, 2 * D, dtype=torch.float64, generator=g)
    kern = SDE.hsm_kernel(t)
    mats = eps_projection(kern.mean_coef, kern.chol)
    got = _apply(mats, z, eps)
    ref, x0 = _by_definition(z, eps, t)
    torch.testing.assert_close(got, ref, rtol=1e-10, atol=1e-10)
    # idempotent, keeps x̂₀, and z - Lε' lies along a
    torch.testing.assert_close(_apply(mats, z, got), got, rtol=1e-10, atol=1e-10)
    ref2, x0_after = _by_definition(z, got, t)
    torch.testing.assert_close(x0_after, x0, rtol=1e-10, atol=1e-10)
    r = z.reshape(5, 2, -1) - torch.einsum("ij,bjn->bin", kern.chol, got.reshape(5, 2, -1))
    torch.testing.assert_close(r[:, 0] * kern.mean_coef[1], r[:, 1] * kern.mean_coef[0], rtol=0, atol=1e-10)
    # a generic ε is not consistent, so the test above is not vacuous
    assert (got - eps).abs().max() > 0.1


def test_batched_matrices_match_per_time():
    ts = torch.tensor([1.0, 0.5, 0.01], dtype=torch.float64)
    kern = SDE.hsm_kernel(ts)
    Mz, Me = eps_projection(kern.mean_coef, kern.chol)
    for i, t in enumerate(ts.tolist()):
        k1 = SDE.hsm_kernel(t)
        mz, me = eps_projection(k1.mean_coef, k1.chol)
        torch.testing.assert_close(Mz[i], mz, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(Me[i], me, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("t", [0.9, 0.1, 1e-3])
def test_exact_eps_is_consistent(t):
    """E[ε | z] satisfies z - L E[ε|z] = a E[x₀|z]: the projection leaves the exact ε unchanged."""
    kern = SDE.hsm_kernel(t)
    x0 = DATA.sample(64, torch.Generator().manual_seed(1))
    z = (kern.mean_coef[None, :, None] * x0[:, None, :]).reshape(64, -1)
    z = z + torch.einsum("ij,bjn->bin", kern.chol, torch.randn(64, 2, D, dtype=torch.float64)).reshape(64, -1)
    eps = DATA.eps(SDE, z, t)
    torch.testing.assert_close(_apply(eps_projection(kern.mean_coef, kern.chol), z, eps), eps, rtol=1e-9, atol=1e-9)


def _run(sched, model, n, batch=256, seed=3):
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((batch, 2 * D), generator=g, dtype=torch.float64)
    for t, t_exact in zip(sched.timesteps, sched.exact_timesteps):  # timesteps is float32; ε exact at the table time
        z = sched.step(model(z, float(t_exact)), t, z, generator=g).prev_sample
    return z


def _exact(z, t):
    return DATA.eps(SDE, z, t)


def _perturbed(z, t):
    return DATA.eps(SDE, z, t) + _inconsistent(z, t)


SCHEDS = {
    "em": lambda **kw: PSLDScheduler(sampler="em", **kw),
    "pf_heun": lambda **kw: PSLDScheduler(sampler="pf_heun", striding="quadratic", **kw),
    "sscs": lambda **kw: SSCSScheduler(**kw),
}


@pytest.mark.parametrize("name", list(SCHEDS))
def test_projection_removes_an_inconsistent_component_exactly(name):
    """With ε = exact + inconsistent perturbation, ``project_eps=True`` reproduces the exact-ε run step for
    step (same noise); without it the run differs."""
    ref = _run(SCHEDS[name](), _exact, 40)
    same = _run(SCHEDS[name](project_eps=True), _exact, 40)
    torch.testing.assert_close(same, ref, rtol=1e-8, atol=1e-8)  # exact ε: projection is a no-op
    fixed = _run(SCHEDS[name](project_eps=True), _perturbed, 40)
    torch.testing.assert_close(fixed, ref, rtol=1e-8, atol=1e-8)
    raw = _run(SCHEDS[name](), _perturbed, 40)
    assert (raw - ref).abs().max() > 1e-2


def test_projected_pf_ode_meets_gddim_and_the_raw_one_does_not():
    """The finding behind ``project_eps``: gDDIM (data prediction) only sees x̂₀, so on an inconsistent ε it
    integrates the projected probability-flow ODE. Converged PF-Heun with projection agrees with it; the
    raw-ε PF-ODE converges elsewhere."""
    gd = _run(GDDIMMultistepScheduler(schedule_preset="classic"), _perturbed, 200)  # the PF-ODE limit at sampling_eps
    gd_exact = _run(GDDIMMultistepScheduler(schedule_preset="classic"), _exact, 200)
    torch.testing.assert_close(gd, gd_exact, rtol=1e-8, atol=1e-8)  # gDDIM ignores the inconsistent part
    proj = _run(SCHEDS["pf_heun"](project_eps=True), _perturbed, 1600)
    raw = _run(SCHEDS["pf_heun"](), _perturbed, 1600)
    x = slice(0, D)
    # converged PF-Heun and gDDIM still differ by their last step (PF Euler vs Tweedie from sampling_eps):
    # measured ~4e-4 median / 4e-3 max with the exact ε
    err_proj = (proj[:, x] - gd[:, x]).abs()
    err_raw = (raw[:, x] - gd[:, x]).abs()
    assert err_proj.max() < 1e-2 and err_proj.median() < 1e-3, (err_proj.max(), err_proj.median())
    assert err_raw.median() > 20 * err_proj.median(), (err_raw.median(), err_proj.median())


def test_adaptive_ode_with_projection():
    g = torch.Generator().manual_seed(5)
    z0 = PSLDScheduler().sample_prior((64, 2 * D), generator=g, dtype=torch.float64)
    ref = probability_flow_sample(_exact, SDE, z0, rtol=1e-7, atol=1e-7).samples
    got = probability_flow_sample(_perturbed, SDE, z0, rtol=1e-7, atol=1e-7, project_eps=True).samples
    raw = probability_flow_sample(_perturbed, SDE, z0, rtol=1e-7, atol=1e-7).samples
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
    assert (raw - ref).abs().max() > 1e-2


def test_vp_projection_is_the_identity():
    sched = PSLDScheduler(diffusion="vp", project_eps=True)
    ref = PSLDScheduler(diffusion="vp")
    model = lambda z, t: torch.sin(3 * z) + 0.1 * t  # noqa: E731  (any ε: k = 1 has nothing to project)
    sched.set_timesteps(10)
    ref.set_timesteps(10)
    z1 = sched.sample_prior((8, 3), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    z2 = z1.clone()
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    for t in sched.timesteps:
        z1 = sched.step(model(z1, float(t)), t, z1, generator=g1).prev_sample
        z2 = ref.step(model(z2, float(t)), t, z2, generator=g2).prev_sample
    torch.testing.assert_close(z1, z2, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls", [PSLDScheduler, SSCSScheduler])
def test_cld_refuses_projection(cls):
    with pytest.raises(ValueError, match="project_eps.*gamma"):
        cls(gamma=0.0, nu=4.0, project_eps=True)


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_project_eps_must_be_bool(bad):
    with pytest.raises(ValueError, match="project_eps"):
        PSLDScheduler(project_eps=bad)


def test_ode_cld_refuses_projection():
    sde = RecipeSDE.psld(0.0, 4.0, 8.0, 8.0, 0.04, None)
    with pytest.raises(ValueError, match="project_eps"):
        probability_flow_sample(_exact, sde, torch.zeros(2, 4, dtype=torch.float64), project_eps=True)


def test_config_round_trip_and_swap(tmp_path):
    s = PSLDScheduler(sampler="pf_heun", project_eps=True)
    s.save_config(tmp_path)
    assert PSLDScheduler.from_pretrained(tmp_path).config.project_eps is True
    assert SSCSScheduler.from_config(s.config).config.project_eps is True


class _PerturbedNet:
    """A UNet-like callable (model time in, ε out) returning the exact ε plus an inconsistent component."""

    def __init__(self, sched):
        self.sched = sched

    def __call__(self, z, model_t):
        t = float(model_t.reshape(-1)[0]) / self.sched.config.time_scale
        return _perturbed(z, t)


def test_likelihood_score_fn_follows_the_scheduler_flag():
    from diffusers_psld.evaluation.likelihood import eps_model_score_fn

    t = float(torch.tensor(0.2, dtype=torch.float32))  # model time is float32
    z = PSLDScheduler().sample_prior((16, 2 * D), generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    exact = DATA.score(SDE, z, t)
    on = PSLDScheduler(project_eps=True)
    off = PSLDScheduler()
    torch.testing.assert_close(eps_model_score_fn(_PerturbedNet(on), on)(z, t), exact, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(eps_model_score_fn(_PerturbedNet(off), off, project_eps=True)(z, t), exact,
                               rtol=1e-6, atol=1e-6)
    assert (eps_model_score_fn(_PerturbedNet(off), off)(z, t) - exact).abs().max() > 1e-2
    with pytest.raises(ValueError, match="project_eps"):
        cld = PSLDScheduler(gamma=0.0, nu=4.0)
        eps_model_score_fn(_PerturbedNet(cld), cld, project_eps=True)
