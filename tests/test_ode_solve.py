"""Guarded ODE solves (likelihood and PF-ODE sampling): a bound on work, progress, non-finite model outputs
and step-size failures reported as what they are (instead of NaN results, minutes of work or raw solver
assertions)."""
import time

import pytest
import torch

from diffusers_psld import NonFiniteError, PSLDScheduler
from diffusers_psld.evaluation import likelihood as lk
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.ode import probability_flow_sample
from diffusers_psld.ode_solve import ODESolveError, solve_ode
from diffusers_psld.sde import RecipeSDE

from _pipeline_stubs import tiny_unet

GM = GaussianMixture.gaussian(torch.tensor([0.3, -0.2], dtype=torch.float64),
                              torch.tensor([[0.20, 0.05], [0.05, 0.10]], dtype=torch.float64))
SDE = RecipeSDE.vp()
EXACT = lk.exact_score_fn(GM, SDE)
X = GM.sample(2, torch.Generator().manual_seed(1))


def nan_after(t0):
    def score(z, t):
        s = EXACT(z, t)
        return s * float("nan") if t > t0 else s
    return score


def noisy(z, t):
    return EXACT(z, t) + 0.3 * torch.randn(z.shape, dtype=z.dtype)


@pytest.mark.parametrize("method", ["euler", "rk4", "dopri5", "scipy_rk45"])
def test_likelihood_nan_score_is_named_not_returned(method):
    with pytest.raises(NonFiniteError, match=r"the score at t = 0\.5\d* \(drift evaluation \d+\) is not finite"):
        lk.ode_likelihood(SDE, nan_after(0.5), X, method=method)


@pytest.mark.parametrize("method", ["dopri5", "scipy_rk45"])
def test_likelihood_noisy_score_stops_at_the_work_bound(method):
    start = time.perf_counter()
    with pytest.raises(ODESolveError, match=r"stopped at the bound of 150 right-hand-side evaluations .*evaluating at "
                                            r"t = .*raise `max_nfe`") as info:
        lk.bits_per_dim(SDE, lambda z, t: noisy(z, t), torch.randint(0, 256, (2, 2)), max_nfe=150, rtol=1e-6, atol=1e-6)
    assert info.value.cause == "max_nfe" and info.value.nfe == 150 and 1e-5 <= info.value.t <= 1.0
    assert time.perf_counter() - start < 60


def test_wall_time_bound():
    with pytest.raises(ODESolveError, match=r"stopped at the bound of 0\.2 s") as info:
        lk.ode_likelihood(SDE, noisy, X, rtol=1e-8, atol=1e-8, max_seconds=0.2)
    assert info.value.cause == "max_seconds"


def jump(t, y):  # a discontinuous right-hand side that overflows the error estimate: the step size underflows
    return torch.full_like(y, 1e300) if t > 0.5 else torch.zeros_like(y)


@pytest.mark.parametrize("method, raw", [("dopri5", "underflow in dt"), ("scipy_rk45", "step size is less than spacing")])
def test_step_size_underflow_is_explained(method, raw):
    with pytest.raises(ODESolveError, match=rf"step size underflowed \(.*{raw}.*\): after \d+ evaluations it was "
                                            r"evaluating at t = 0\.5.*too rough") as info:
        solve_ode(jump, torch.zeros(3, dtype=torch.float64), 0.0, 1.0, method=method)
    assert info.value.cause == "step_size"


def test_pf_ode_sampler_nan_model_and_noisy_model():
    z = torch.randn(2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    nan_model = lambda z, t: torch.full_like(z, float("nan")) if t < 0.5 else torch.zeros_like(z)  # noqa: E731
    with pytest.raises(NonFiniteError, match=r"probability_flow_sample: the right-hand side is not finite at t = 0\.4"):
        probability_flow_sample(nan_model, SDE, z)
    for method in ("dopri5", "scipy_rk45"):
        with pytest.raises(ODESolveError, match="stopped at the bound of 100"):
            probability_flow_sample(lambda z, t: 10 * torch.randn_like(z), SDE, z, method=method, max_nfe=100)


def test_pf_ode_scipy_result_is_the_solution_not_the_initial_state():
    """SciPy RK45 through solve_ivp (its status is checked): agrees with dopri5 on the exact ε."""
    sde = RecipeSDE.vp()
    z = torch.randn(3, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))

    def model(zz, t):  # the exact ε = -L_t score (VP: L_t is a scalar)
        return -float(sde.hsm_kernel(t).chol.reshape(())) * lk.exact_score_fn(GM, sde)(zz, t)

    a = probability_flow_sample(model, sde, z, method="dopri5", rtol=1e-7, atol=1e-7)
    b = probability_flow_sample(model, sde, z, method="scipy_rk45", rtol=1e-7, atol=1e-7)
    assert not torch.allclose(b.samples, z)
    torch.testing.assert_close(a.samples, b.samples, atol=1e-4, rtol=0)


def test_unet_nan_reaches_the_user_as_a_model_output_error():
    unet = tiny_unet()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    sched = PSLDScheduler()
    with pytest.raises(NonFiniteError, match="the score at t = 1e-05 .* is not finite"):
        lk.bits_per_dim(sched.sde, lk.eps_model_score_fn(unet, sched), torch.randint(0, 256, (1, 1, 8, 8)),
                        method="dopri5", max_nfe=50)


def test_progress_bar_when_asked(capsys):
    lk.ode_likelihood(SDE, EXACT, X, method="euler", progress=True)
    err = capsys.readouterr().err
    assert "likelihood ODE" in err and "nfe=100" in err


@pytest.mark.parametrize("kw, match", [({"max_nfe": 0}, "max_nfe"), ({"max_nfe": 2.5}, "max_nfe"),
                                       ({"max_seconds": -1}, "max_seconds"), ({"progress": "yes"}, "progress")])
def test_bound_arguments_are_checked(kw, match):
    with pytest.raises(ValueError, match=match):
        lk.ode_likelihood(SDE, EXACT, X, method="euler", **kw)
