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


@pytest.mark.parametrize("ptype", ["sample", "sufficient_epsilon"])
def test_prediction_types_follow_the_exact_eps_solution(ptype):
    """The ODE driven by the exact x̂₀ / exact uᵀε (C outputs) is the ODE driven by the exact ε (same steps)."""
    from diffusers_psld import parameterization as P

    sched = PSLDScheduler()
    sde = sched.sde
    gm = GaussianMixture([0.5, 0.5], [[-0.6, 0.2], [0.5, -0.3]], [[[0.05, 0.0], [0.0, 0.04]], [[0.03, 0.01], [0.01, 0.06]]])
    z = sched.sample_prior((64, 4), generator=torch.Generator().manual_seed(1), dtype=torch.float64)

    def exact_out(zz, t):
        return P.maps_for_times(sde, ptype, t).from_eps(gm.eps(sde, zz, t), zz)

    ref = probability_flow_sample(lambda zz, t: gm.eps(sde, zz, t), sde, z, rtol=1e-4, atol=1e-4)
    out = probability_flow_sample(exact_out, sde, z, rtol=1e-4, atol=1e-4, prediction_type=ptype, project_eps=True)
    assert out.nfe == ref.nfe and (out.samples - ref.samples).abs().max() < 1e-9
    with pytest.raises(ValueError, match="prediction_type"):
        probability_flow_sample(exact_out, sde, z, prediction_type="v_prediction")
