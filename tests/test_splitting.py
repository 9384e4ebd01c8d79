"""SplittingScheduler: convergence via exact moment propagation, NFE accounting, reproducibility, validation."""
import pytest
import torch

from diffusers_psld.schedulers.scheduling_splitting import SPLITTING_SAMPLERS, SplittingScheduler
from test_conjugate import moment_errors


@pytest.mark.parametrize("sampler", ["rse", "rvv", "roba", "cse", "coba"])
def test_first_order_convergence(sampler):
    s = SplittingScheduler(sampler=sampler)
    (m1, v1), (m2, v2) = moment_errors(s, 100), moment_errors(s, 400)
    assert m2 < m1 / 2.5 and m2 < 1e-2, (m1, m2)
    assert v2 < 1e-2, (v1, v2)


@pytest.mark.parametrize("sampler", SPLITTING_SAMPLERS)
@pytest.mark.parametrize("n", [7, 8])
def test_exact_nfe(sampler, n):
    s = SplittingScheduler(sampler=sampler)
    s.set_timesteps(n)
    assert len(s.timesteps) == n == s.num_inference_steps
    z = torch.randn(2, 2, 3, 3)
    g = torch.Generator().manual_seed(0)
    for t in s.timesteps:
        z = s.step(torch.randn(2, 2, 3, 3, generator=g), t, z, generator=g).prev_sample
    assert torch.all(torch.isfinite(z))


def _run(sampler, seed, **kw):
    s = SplittingScheduler(sampler=sampler, **kw)
    s.set_timesteps(8)
    g = torch.Generator().manual_seed(seed)
    z = s.sample_prior((2, 4, 4, 4), generator=g)
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    for t in s.timesteps:
        z = s.step(eps, t, z, generator=g).prev_sample
    return z


def test_reproducibility():
    assert torch.equal(_run("roba", 3), _run("roba", 3))
    assert not torch.equal(_run("roba", 3), _run("roba", 4))
    assert torch.equal(_run("cvv", 3), _run("cvv", 3))


def test_lambda_s_modes_agree_at_one():
    assert torch.equal(_run("roba", 3, lambda_s=1.0), _run("roba", 3, lambda_s=1.0, lambda_s_mode="scale"))


@pytest.mark.parametrize("kw,name", [(dict(lambda_s=-1.0), "lambda_s"), (dict(lambda_s=float("inf")), "lambda_s"),
                                     (dict(lambda_s_mode="x"), "lambda_s_mode"), (dict(sampler="bogus"), "sampler"),
                                     (dict(diffusion="vp"), "diffusion"), (dict(conjugate_lambda=None), "conjugate_lambda")])
def test_validation(kw, name):
    with pytest.raises(ValueError, match=name):
        SplittingScheduler(**kw)
