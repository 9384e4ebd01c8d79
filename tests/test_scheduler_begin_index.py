"""Mid-schedule starts (issue #15 §1): `set_begin_index(k)` and Diffusers' index-by-timestep rule, for every
scheduler class and sampler, checked in law against independent references with exact Gaussian ε.

A run that begins at call k from the exact forward law at ``timesteps[k]`` (what img2img / SDEdit pipelines feed)
must have the law of the sampler's own recursion started there: for affine samplers the exact moments of the step
tables from call k (Monte Carlo through the real ``step`` vs exact moment propagation), for SSCS the unmerged
paper recursion (leading half-step from ``timesteps[k]``), for a call inside a multi-call step the Euler step to the
step's end, and for the multistep gDDIM the exact answer on point-mass data (every warm-up order is exact there).
"""
import math

import pytest
import torch

from diffusers_psld import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                            SSCSScheduler)
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.schedulers.scheduling_conjugate import gddim_transition
from diffusers_psld.schedulers.scheduling_psld import _AFFINE, _HEUN_PRED
from diffusers_psld.sde import kernels
from diffusers_psld.sampling import em_step, pf_euler_step

MU, VAR = 0.4, 0.3
DATA = GaussianMixture.gaussian([MU], [[VAR]])

EVERY = [
    (PSLDScheduler, dict(sampler="em")), (PSLDScheduler, dict(sampler="pf_euler")), (PSLDScheduler, dict(sampler="pf_heun")),
    (PSLDScheduler, dict(diffusion="vp")), (PSLDScheduler, dict(sampler="sscs", sscs_score_time="midpoint")),
    (SSCSScheduler, dict()), (ConjugateScheduler, dict()), (ConjugateScheduler, dict(eps_basis="gddim", conjugate_b="zero")),
    (GDDIMMultistepScheduler, dict()), (GDDIMMultistepScheduler, dict(diffusion="vp", solver_order=2)),
] + [(SplittingScheduler, dict(sampler=s)) for s in ("nse", "rse", "nvv", "rvv", "noba", "roba", "nbaoab", "rbaoab",
                                                       "cse", "cvv", "coba")]
EVERY_IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in EVERY]


def forward_law(sde, t):
    """Mean and covariance of z_t (d = 1) under the HSM kernel for data N(MU, VAR)."""
    kern = sde.hsm_kernel(float(t))
    a = kern.mean_coef
    return a * MU, torch.outer(a, a) * VAR + kern.cov


def eps_affine(sde, t):
    """ε(z) = K z + c, the exact ε for Gaussian data at forward time t (d = 1)."""
    _, C = forward_law(sde, t)
    m, _ = forward_law(sde, t)
    K = torch.linalg.solve(C, sde.hsm_kernel(float(t)).chol).T
    return K, -K @ m


def push(mean, cov, P, R, S, sde, t):
    """Law of P z + R ε(z) + S ξ for z ~ N(mean, cov) (ε exact at t)."""
    K, c = eps_affine(sde, t)
    A = P + R @ K
    mean, cov = A @ mean + R @ c, A @ cov @ A.T
    if S is not None:
        cov = cov + S @ S.T
    return mean, 0.5 * (cov + cov.T)


def reference_law(s, k):
    """Exact moments of the recursion started at call k from the forward law at timesteps[k] (tables + the
    documented entry rule)."""
    tab, sde = s._tables, s.sde
    t = tab.eval_times
    mean, cov = forward_law(sde, t[k])
    i = k
    if not tab.starts[k]:  # Euler(-Maruyama) step to the end of the enclosing step, then its next start
        j = next((j for j in range(k + 1, len(t)) if tab.starts[j]), len(t))
        t_end = tab.state_times[j] if j < len(t) else 0.0
        P, R, S = (em_step if tab.noisy[k] else (lambda *a: pf_euler_step(*a[:3])))(sde, t[k], t_end)
        mean, cov = push(mean, cov, P, R, S, sde, t[k])
        i = j
    pending = None
    for i in range(i, len(t)):
        K, c = eps_affine(sde, t[i])
        P, R = tab.P[i], tab.R[i]
        A, b = P + R @ K, R @ c
        if tab.kinds[i] == _AFFINE:
            mean, cov = A @ mean + b, A @ cov @ A.T + (tab.S[i] @ tab.S[i].T if tab.noisy[i] else 0)
        elif tab.kinds[i] == _HEUN_PRED:
            h = tab.h[i]
            pending = (A, b, h, torch.eye(2, dtype=torch.float64) - h * A, -h * b)
        else:
            A1, b1, h, M1, c1 = pending
            lin = torch.eye(2, dtype=torch.float64) - 0.5 * h * (A1 + A @ M1)
            mean, cov = lin @ mean - 0.5 * h * (b1 + A @ c1 + b), lin @ cov @ lin.T
    return mean, cov


def unmerged_sscs_law(s, k, first_call_only=False):
    """Paper Eq. 12 without merging, from the forward law at ts[k] (uniform grid): A(h/2) S(h) A(h/2) per step.
    ``first_call_only``: the law after call k, i.e. one step and the next step's leading half-step."""
    sde, n, eps = s.sde, s.num_inference_steps - 1, s.config.sampling_eps
    ts = 1.0 - torch.arange(n + 1, dtype=torch.float64) * (1.0 - eps) / n
    f_lin = (sde.Q - sde.D) @ sde.A
    mean, cov = forward_law(sde, s.exact_timesteps[k])  # timesteps[k] is ts[k] ("start") or the midpoint

    def half(mean, cov, t_from, t_to):
        phi, sig = kernels.transition(f_lin, sde.D, sde.prior_cov, sde.beta_integral(t_from, t_to))
        return phi @ mean, phi @ cov @ phi.T + sig

    for i in range(k, n):
        t, tn = ts[i].item(), ts[i + 1].item()
        h = t - tn
        mid = t - h / 2
        start_mode = s.config.sscs_score_time == "start"
        if i > k:  # at i == k the state is at timesteps[k]: ts[k] ("start": no leading half-step) or the midpoint
            mean, cov = half(mean, cov, t, mid)
        te = t if start_mode else mid
        K, c = eps_affine(sde, te)
        score_mat = -sde.hsm_kernel(te).inv_chol_t()
        w = 2 * h * sde.beta(te) * sde.D
        lin = torch.eye(2, dtype=torch.float64) + w @ sde.A + w @ score_mat @ K
        mean, cov = lin @ mean + w @ score_mat @ c, lin @ cov @ lin.T
        mean, cov = half(mean, cov, t if i == k and start_mode else mid, tn)  # the first step: A(h)∘S(h)
        if first_call_only:
            return half(mean, cov, tn, tn - 0.5 * (tn - ts[i + 2].item()))
    P, R, _ = em_step(sde, eps, 0.0, noise=False)
    return push(mean, cov, P, R, None, sde, eps)


def run_from(s, k, n_samples, seed, calls=None):
    """The img2img loop: noise data to timesteps[k], set_begin_index(k), step through timesteps[k:] (exact ε)."""
    g = torch.Generator().manual_seed(seed)
    x0 = DATA.sample(n_samples, generator=g)
    z = s.add_noise(x0, torch.randn(n_samples, s.num_components, generator=g, dtype=torch.float64), s.timesteps[k])
    s.set_begin_index(k)
    exact = s.exact_timesteps  # the float64 times of the calls (ε must be exact at the scheduler's own time)
    for i in range(k, s.num_inference_steps if calls is None else k + calls):
        z = s.step(DATA.eps(s.sde, z, float(exact[i])), s.timesteps[i], z, generator=g).prev_sample
    return z


def _mc_matches(z, mean, cov):
    n = z.shape[0]
    se = (cov.diagonal() / n).sqrt()
    mc_mean, mc_cov = z.mean(0), torch.cov(z.T).reshape(cov.shape)
    ok_mean = bool(torch.all((mc_mean - mean).abs() < 5 * se))
    ok_cov = bool(torch.allclose(mc_cov, cov, rtol=0.03, atol=5 * math.sqrt(2 / n) * cov.diagonal().max().item()))
    return ok_mean and ok_cov, (mc_mean, mean, mc_cov, cov)


AFFINE_CASES = [  # (class, config, N, k, call k starts a step): step starts, a PF-Heun corrector, naive inner calls
    (PSLDScheduler, dict(sampler="em"), 12, 5, True), (PSLDScheduler, dict(sampler="pf_euler"), 12, 6, True),
    (PSLDScheduler, dict(sampler="pf_heun"), 12, 5, False), (PSLDScheduler, dict(sampler="pf_heun"), 12, 4, True),
    (ConjugateScheduler, dict(), 12, 5, True),
    (SplittingScheduler, dict(sampler="roba"), 12, 4, True), (SplittingScheduler, dict(sampler="nvv"), 13, 5, False),
    (SplittingScheduler, dict(sampler="noba"), 13, 5, False), (SplittingScheduler, dict(sampler="nbaoab"), 13, 4, False),
]


@pytest.mark.parametrize("cls,kw,n,k,starts", AFFINE_CASES, ids=[f"{c.__name__}-{kw}-{k}" for c, kw, n, k, _ in AFFINE_CASES])
def test_begin_index_run_has_the_law_of_the_recursion_started_there(cls, kw, n, k, starts):
    s = cls(**kw)
    s.set_timesteps(n)
    assert s._tables.starts[k] == starts, "case misplaced"
    mean, cov = reference_law(s, k)
    z = run_from(s, k, 100_000, seed=k)
    ok, info = _mc_matches(z, mean, cov)
    assert ok, info
    if not any(s._tables.noisy):  # deterministic: the law is transported, so an off-by-one start is rejected
        k_prev = max(j for j in range(k) if s._tables.eval_times[j] != s._tables.eval_times[k])
        assert not _mc_matches(z, *reference_law(s, k_prev))[0]


@pytest.mark.parametrize("score_time,k", [("start", 4), ("midpoint", 4), ("start", 1)])
def test_sscs_begin_index_law(score_time, k):
    """SSCS's state lives at the interval midpoint ("start" mode): a start at timesteps[k] gets ε at timesteps[k]
    itself, so its first step is S(h) there then the exact linear part over h (drawn with the generator); the law
    is that of the unmerged paper recursion with this first step, after the first call and at the end."""
    s = SSCSScheduler(sscs_score_time=score_time)
    s.set_timesteps(11)
    mean, cov = unmerged_sscs_law(s, k)
    z = run_from(s, k, 100_000, seed=k)
    ok, info = _mc_matches(z, mean, cov)
    assert ok, info
    s.set_timesteps(11)
    s.set_begin_index(k)  # the state handed to call k is at timesteps[k]; after it, at the next state time
    assert s.state_time() == float(s.exact_timesteps[k]) and s.state_time(k + 1) == s._tables.state_times[k + 1]
    # after the first call (state at the next midpoint) the law is the reference's too, and without the
    # entry half-step it would not be (the final law forgets the start, the first call does not)
    s.set_timesteps(11)
    mean1, cov1 = unmerged_sscs_law(s, k, first_call_only=True)
    ok, info = _mc_matches(run_from(s, k, 100_000, seed=k, calls=1), mean1, cov1)
    assert ok, info


@pytest.mark.parametrize("k", [1, 2, 5, 8])
@pytest.mark.parametrize("kw", [dict(), dict(solver_order=2, interpolation="logsnr"), dict(diffusion="vp")])
def test_gddim_multistep_warms_up_from_the_begin_index_exactly_on_point_mass_data(kw, k):
    """Every order is exact for point-mass data, so a start at call k must land on the exact PF-ODE solution; the
    warm-up orders are 1, 2, then the configured ones (DPM-Solver's rule)."""
    s = GDDIMMultistepScheduler(**kw)
    s.set_timesteps(10)
    s.set_begin_index(k)
    sde, c = s.sde, 0.7
    z = (torch.tensor([[0.3], [-0.4]], dtype=torch.float64) if sde.k == 2 else torch.tensor([[0.3]], dtype=torch.float64))[None]
    z_start = z[0, :, 0].clone()
    exact_times = s.exact_timesteps
    for t in s.timesteps[k:]:
        kern = sde.hsm_kernel(float(exact_times[s.step_index if s.step_index is not None else k]))
        eps = torch.linalg.solve(kern.chol, z[0, :, 0] - kern.mean_coef * c)
        z = s.step(eps[None, :, None], t, z).prev_sample
    a_k = sde.hsm_kernel(float(exact_times[k])).mean_coef
    exact = sde.hsm_kernel(0.0).mean_coef * c + gddim_transition(sde, [0.0], [float(exact_times[k])])[0] @ (z_start - a_k * c)
    assert (z[0, :, 0] - exact).abs().max().item() < 1e-9
    used = s._orders_used
    assert used[k] == 1 and used[k + 1] <= 2 and used[:k] == s._full[1][:k]


@pytest.mark.parametrize("cls,kw", EVERY, ids=EVERY_IDS)
def test_every_sampler_supports_every_begin_index_and_the_timestep_lookup(cls, kw):
    """set_begin_index(k) for every k; a fresh scheduler stepped with timesteps[k] (no set_begin_index) starts at
    index_for_timestep, identical to set_begin_index there (same noise)."""
    n = 7
    for k in range(n):
        a = cls(**kw)
        a.set_timesteps(n)
        kk = a.num_components
        z0 = torch.randn(3, 2 * kk, 2, 2, generator=torch.Generator().manual_seed(k))
        a.set_begin_index(k)
        z, calls = z0, 0
        for t in a.timesteps[k:]:
            z = a.step(0.1 * z, t, z, generator=torch.Generator().manual_seed(1)).prev_sample
            calls += 1
        assert calls == n - k and torch.all(torch.isfinite(z)) and a.step_index == n
        b = cls(**kw)
        b.set_timesteps(n)
        j = b.index_for_timestep(b.timesteps[k])
        assert torch.isclose(b.timesteps[j], b.timesteps[k]) and (b._tables.starts[j] or j == k)
        zb = z0
        for t in b.timesteps[j:]:
            zb = b.step(0.1 * zb, t, zb, generator=torch.Generator().manual_seed(1)).prev_sample
        assert b._run_start == j
        if j == k:
            assert torch.equal(z, zb)


def test_heun_corrector_begin_index_is_the_identity_and_continues_like_the_next_predictor():
    s = PSLDScheduler(sampler="pf_heun")
    s.set_timesteps(10)  # calls: (predictor, corrector) pairs, then one Euler step and the final call
    k = 3
    assert s._tables.kinds[k] == 2 and s._tables.eval_times[k] == s._tables.eval_times[k + 1]
    z0 = torch.randn(2, 2, 3, 3, generator=torch.Generator().manual_seed(0))
    s.set_begin_index(k)
    out = s.step(0.1 * z0, s.timesteps[k], z0)
    assert torch.equal(out.prev_sample, z0)
    z = out.prev_sample
    for t in s.timesteps[k + 1:]:
        z = s.step(0.1 * z, t, z).prev_sample
    r = PSLDScheduler(sampler="pf_heun")
    r.set_timesteps(10)
    r.set_begin_index(k + 1)
    zr = z0
    for t in r.timesteps[k + 1:]:
        zr = r.step(0.1 * zr, t, zr).prev_sample
    assert torch.equal(z, zr)
    # Diffusers' rule on the shared time: the predictor (a step start), as Heun's "second match"
    f = PSLDScheduler(sampler="pf_heun")
    f.set_timesteps(10)
    assert f.index_for_timestep(f.timesteps[k]) == k + 1


def test_lookup_refuses_times_off_the_schedule_and_a_running_loop_checks_order():
    s = PSLDScheduler()
    s.set_timesteps(5)
    z = torch.zeros(1, 2, 2, 2)
    with pytest.raises(ValueError, match="not one of `scheduler.timesteps`"):
        s.step(z, 0.5, z)
    s.step(z, s.timesteps[1], z)
    with pytest.raises(ValueError, match="does not match call 2"):
        s.step(z, s.timesteps[1], z)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(5)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(-1)
    with pytest.raises(ValueError, match="begin_index"):
        s.set_begin_index(1.5)
