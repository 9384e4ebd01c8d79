"""Adaptive PF-ODE sampler: NFE accounting, accuracy with the exact score, validation."""
import pytest
import torch

from diffusers_psld import PSLDScheduler
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.ode import probability_flow_sample


def test_accuracy_and_nfe():
    sched = PSLDScheduler()
    sde = sched.sde
    gm = GaussianMixture.gaussian([0.7], [[0.25]])
    z = sched.sample_prior((3000, 2), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    calls = [0]

    def model(zz, t):
        calls[0] += 1
        return gm.eps(sde, zz, t)

    out = probability_flow_sample(model, sde, z, rtol=1e-3, atol=1e-3)
    assert out.nfe == calls[0] == out.nfe_ode + 1
    x = out.samples[:, 0]
    assert abs(x.mean().item() - 0.7) < 0.04 and abs(x.var().item() - 0.25) < 0.03
    again = probability_flow_sample(gm.eps.__get__(gm) and (lambda zz, t: gm.eps(sde, zz, t)), sde, z, rtol=1e-3, atol=1e-3)
    assert torch.equal(again.samples, out.samples)


@pytest.mark.parametrize("kw,name", [(dict(rtol=0.0), "rtol"), (dict(atol=float("nan")), "atol"),
                                     (dict(method="euler"), "method"), (dict(sampling_eps=2.0), "sampling_eps")])
def test_validation(kw, name):
    sde = PSLDScheduler().sde
    with pytest.raises(ValueError, match=name):
        probability_flow_sample(lambda z, t: z, sde, torch.zeros(2, 2), **kw)
