"""Scheduler contract details of issues #13 §4-5 and #15 §1: swapping classes (`compatibles`, `from_config`
round trips), devices without float64, bad inputs with clear errors, NumPy scalars, and no silent NaN."""
import json

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from diffusers_psld import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, RecipeSDE, SplittingScheduler,
                            SSCSScheduler)
from diffusers_psld.schedulers.validation import MAX_INFERENCE_STEPS

ALL = [PSLDScheduler, SSCSScheduler, ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler]
LOOPS = [(PSLDScheduler, dict(sampler=s)) for s in ("em", "pf_euler", "pf_heun", "sscs")] + [
    (PSLDScheduler, dict(diffusion="vp")), (SSCSScheduler, dict()), (ConjugateScheduler, dict()),
    (GDDIMMultistepScheduler, dict()), (SplittingScheduler, dict(sampler="nbaoab")), (SplittingScheduler, dict(sampler="cvv"))]
LOOP_IDS = [f"{c.__name__}-{kw}" for c, kw in LOOPS]


# ------------------------------------------------------------------ swapping
def test_compatibles_lists_the_package_schedulers_that_accept_the_config():
    names = lambda s: {c.__name__ for c in s.compatibles}  # noqa: E731
    every = {c.__name__ for c in ALL}
    for cls in ALL:
        assert names(cls()) == every, cls  # the class itself included
    assert names(PSLDScheduler(diffusion="vp")) == {"PSLDScheduler", "ConjugateScheduler", "GDDIMMultistepScheduler"}
    assert names(PSLDScheduler(gamma=0.0, nu=4.0)) == every - {"GDDIMMultistepScheduler"}  # gDDIM needs Γ > 0
    for c in PSLDScheduler().compatibles:  # each listed class really drives the same configuration
        c.from_config(PSLDScheduler(gamma=0.02, nu=4.02).config).set_timesteps(3)


def test_from_config_round_trip_through_another_class_keeps_the_sampler(tmp_path):
    p = PSLDScheduler(sampler="pf_heun", gamma=0.02, nu=4.02)
    s = SSCSScheduler.from_config(p.config)
    assert s.config.sampler == "sscs" and s.config.gamma == 0.02
    back = PSLDScheduler.from_config(s.config)
    assert back.config.sampler == "pf_heun" and back.config.gamma == 0.02
    # the memory survives save/load of the intermediate scheduler and longer chains
    s.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "scheduler_config.json").read_text())["_sampler_by_class"]["PSLDScheduler"] == "pf_heun"
    assert PSLDScheduler.from_pretrained(tmp_path).config.sampler == "pf_heun"
    chain = PSLDScheduler.from_config(GDDIMMultistepScheduler.from_config(ConjugateScheduler.from_config(s.config).config).config)
    assert chain.config.sampler == "pf_heun"
    sp = SplittingScheduler(sampler="cvv")
    assert SplittingScheduler.from_config(PSLDScheduler.from_config(sp.config).config).config.sampler == "cvv"
    # an explicit sampler= wins over the memory
    assert PSLDScheduler.from_config(s.config, sampler="em").config.sampler == "em"


# ------------------------------------------------------------------ devices without float64
class Float64Recorder(TorchDispatchMode):
    """Records every op that produces a float64 tensor (on ``device``: a CUDA run checks the device only; on the
    CPU every float64 tensor counts, the strictest form of the check)."""

    def __init__(self, device="cpu"):
        super().__init__()
        self.hits, self.device = [], torch.device(device).type

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == self.device:
                self.hits.append((str(func), tuple(t.shape)))
        return out


DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                                                   reason="no CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("begin", [0, 3])
@pytest.mark.parametrize("cls,kw", LOOPS, ids=LOOP_IDS)
def test_sampling_loop_creates_no_float64_tensor_for_a_float32_state(cls, kw, begin, device):
    """What an MPS device needs: after set_timesteps (and set_begin_index), the loop (prior, model_time, step)
    creates float32 tensors only; the float64 tables stay where they were built (CPU). A float64 state works in
    float64."""
    s = cls(**kw)
    s.set_timesteps(8, device=device)
    assert s.timesteps.dtype == torch.float32 and s.timesteps.device.type == device
    if begin:
        s.set_begin_index(begin)
    kk = s.num_components
    g = torch.Generator().manual_seed(0)
    with Float64Recorder(device) as rec:
        z = s.sample_prior((2, 2 * kk, 4, 4), generator=g, device=device)
        for t in s.timesteps[begin:]:
            tm = s.model_time(t, 2)
            eps = 0.1 * s.scale_model_input(z, t) + 1e-4 * tm[:, None, None, None]
            z = s.step(eps, t, z, generator=g).prev_sample
    assert rec.hits == [] and z.dtype == torch.float32 and z.device.type == device
    s.set_timesteps(8)
    z = s.sample_prior((2, 2 * kk, 4, 4), generator=g, dtype=torch.float64)
    for t in s.timesteps:
        z = s.step(0.1 * z, t, z, generator=g).prev_sample
    assert z.dtype == torch.float64


def test_add_noise_keeps_float64_to_the_small_kernel_tables():
    s = PSLDScheduler()
    x0, noise = torch.randn(4, 3, 8, 8), torch.randn(4, 6, 8, 8)
    with Float64Recorder() as rec:
        z = s.add_noise(x0, noise, torch.full((4,), 0.3))
    assert z.dtype == torch.float32 and max(np.prod(shape) for _, shape in rec.hits) <= 4 * 2 * 2
    ref = s.add_noise(x0.double(), noise.double(), 0.3)
    assert ref.dtype == torch.float64 and torch.allclose(z.double(), ref, atol=1e-5)


# ------------------------------------------------------------------ bad input -> clear error
def test_step_and_add_noise_refuse_integer_bool_none_and_numpy_inputs():
    s = PSLDScheduler()
    s.set_timesteps(4)
    z = torch.zeros(1, 2, 2, 2)
    t = s.timesteps[0]
    for bad, name in [(z.long(), "model_output"), (z.bool(), "model_output"), (None, "model_output"),
                      (z.numpy(), "model_output")]:
        with pytest.raises(TypeError, match=name):
            s.step(bad, t, z)
    with pytest.raises(TypeError, match="sample"):
        s.step(z, t, z.int())
    for bad in ("abc", None, True):
        with pytest.raises(TypeError, match="timestep"):
            s.step(z, bad, z)
    x0 = torch.zeros(2, 1, 2, 2)
    with pytest.raises(TypeError, match="noise"):
        s.add_noise(x0, torch.zeros(2, 2, 2, 2, dtype=torch.int64), 0.5)
    with pytest.raises(TypeError, match="noise"):
        s.add_noise(x0, torch.zeros(2, 2, 2, 2, dtype=torch.bool), 0.5)
    with pytest.raises(TypeError, match="original_samples.*torch.from_numpy"):
        s.add_noise(np.zeros((2, 1, 2, 2), dtype=np.float32), torch.zeros(2, 2, 2, 2), 0.5)
    with pytest.raises(TypeError, match="timesteps"):
        s.add_noise(x0, torch.zeros(2, 2, 2, 2), "abc")


def test_generator_must_be_a_generator_or_a_list_of_batch_length():
    s = PSLDScheduler()
    s.set_timesteps(4)
    z = torch.zeros(2, 2, 2, 2)
    for bad in (42, "abc", [1, 2], [torch.Generator(), 3]):
        with pytest.raises(TypeError, match="generator"):
            s.step(z, s.timesteps[0], z, generator=bad)
        with pytest.raises(TypeError, match="generator"):
            s.sample_prior((2, 2, 2, 2), generator=bad)
    with pytest.raises(ValueError, match="generator"):
        s.sample_prior((2, 2, 2, 2), generator=[torch.Generator()] * 3)
    gens = [torch.Generator().manual_seed(i) for i in range(2)]
    z = s.sample_prior((2, 2, 2, 2), generator=gens)  # a list of batch length stays valid
    s.step(z, s.timesteps[0], z, generator=gens)


def test_add_noise_broadcasts_a_one_element_timestep():
    s = PSLDScheduler()
    s.set_timesteps(10)
    x0, noise = torch.randn(4, 1, 2, 2), torch.randn(4, 2, 2, 2)
    one = s.add_noise(x0, noise, s.timesteps[5][None])
    assert torch.equal(one, s.add_noise(x0, noise, s.timesteps[5].expand(4)))
    assert torch.equal(one, s.add_noise(x0, noise, float(s.timesteps[5])))
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        s.add_noise(x0, noise, s.timesteps[:2])


def test_model_time_checks_the_batch_and_accepts_numpy_and_float64():
    s = PSLDScheduler()
    with pytest.raises(ValueError, match="batch_size"):
        s.model_time(torch.tensor([0.1, 0.2, 0.3]), batch_size=2)
    assert torch.equal(s.model_time(np.float32(0.5), 2), torch.full((2,), 500.0))
    t32 = torch.rand(1000, generator=torch.Generator().manual_seed(0))
    assert torch.equal(s.model_time(t32), s.model_time(t32.double()))  # float32 route = float64 route (time_scale 1000)
    with pytest.raises(TypeError, match="`t`"):
        s.model_time("abc")


def test_numpy_scalars_are_numbers_everywhere(tmp_path):
    s = PSLDScheduler(gamma=np.float32(0.02), nu=np.float64(4.02), time_scale=np.int64(1000), sampling_eps=np.float32(1e-3))
    assert all(isinstance(s.config[k], float) or isinstance(s.config[k], int) for k in ("gamma", "nu", "time_scale"))
    s.save_pretrained(tmp_path)  # JSON-serialisable
    s.set_timesteps(np.int64(5))
    s.set_begin_index(np.int64(2))
    z = torch.zeros(1, 2, 2, 2)
    s.step(z, np.float32(s.timesteps[2].item()), z)
    s.add_noise(torch.zeros(1, 1, 2, 2), z, np.float64(0.5))
    GDDIMMultistepScheduler(solver_order=2, spacing_power=np.float64(2.0)).set_timesteps(np.int32(4))


def test_num_inference_steps_bound():
    s = PSLDScheduler()
    with pytest.raises(ValueError, match=str(MAX_INFERENCE_STEPS)):
        s.set_timesteps(MAX_INFERENCE_STEPS + 1)
    for bad in (1, 0, 2.5, True, "10"):
        with pytest.raises(ValueError, match="num_inference_steps"):
            s.set_timesteps(bad)


# ------------------------------------------------------------------ non-finite configuration
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("name", ["time_scale", "gamma", "nu", "kappa", "beta_min", "beta_max", "m_inv", "sampling_eps"])
@pytest.mark.parametrize("value", [float("inf"), float("nan")])
def test_every_scheduler_refuses_non_finite_configuration(cls, name, value):
    with pytest.raises(ValueError, match=name):
        cls(**{name: value})


@pytest.mark.parametrize("cls,name", [(ConjugateScheduler, "conjugate_lambda"), (SplittingScheduler, "conjugate_lambda"),
                                      (SplittingScheduler, "lambda_s"), (GDDIMMultistepScheduler, "spacing_power")])
def test_class_specific_non_finite_configuration(cls, name):
    for value in (float("inf"), float("nan")):
        with pytest.raises(ValueError, match=name):
            cls(**{name: value})


def test_spacing_power_is_bounded_in_the_constructor():
    with pytest.raises(ValueError, match="spacing_power"):
        GDDIMMultistepScheduler(spacing_power=1e6)
    s = GDDIMMultistepScheduler(spacing_power=8.0)
    s.set_timesteps(200)
    assert torch.all(s.exact_timesteps[:-1] > s.exact_timesteps[1:])
    with pytest.raises(ValueError, match="spacing_power.*num_inference_steps"):  # too fine for float64 at ρ = 8
        s.set_timesteps(20_000)


def test_recipe_refuses_k_zero():
    with pytest.raises(ValueError, match="k >= 1"):
        RecipeSDE(D=torch.zeros(0, 0), Q=torch.zeros(0, 0), masses=[], beta_min=1.0, beta_max=1.0)


# ------------------------------------------------------------------ no silent NaN
def test_unstable_conjugate_lambda_is_refused_at_set_timesteps_with_a_safe_range():
    s = ConjugateScheduler(conjugate_lambda=30)
    with pytest.raises(ValueError, match=r"conjugate_lambda.*<= 5\.7"):
        s.set_timesteps(10)
    # what it protects against: the state overflows (the λ-parts amplify by ~1e32)
    from diffusers_psld.schedulers import scheduling_conjugate as sc
    P, _ = sc.conjugate_coefficients(s.sde, torch.cat([s._grid(9), torch.zeros(1, dtype=torch.float64)]), "ones", 30.0)
    growth = torch.linalg.matrix_norm(torch.linalg.multi_dot(list(P.flip(0))), ord=2).item()
    assert growth > 1e20
    # inside the documented range it runs; more steps make λ = 30 stable again
    ConjugateScheduler(conjugate_lambda=5.0).set_timesteps(10)
    ConjugateScheduler(conjugate_lambda=30).set_timesteps(80)
    ConjugateScheduler(conjugate_lambda=-30).set_timesteps(10)  # λ < 0 damps
    with pytest.raises(ValueError, match="conjugate_lambda"):
        SplittingScheduler(sampler="cvv", conjugate_lambda=30).set_timesteps(10)


def test_step_raises_on_a_non_finite_result_naming_call_time_and_cause():
    s = PSLDScheduler(sampler="pf_euler")
    s.set_timesteps(5)
    z = torch.zeros(1, 2, 2, 2)
    bad = torch.full_like(z, float("nan"))
    with pytest.raises(FloatingPointError, match=r"call 0 of 5 \(forward time t = 1,.*`model_output` passed to this call is already non-finite"):
        s.step(bad, s.timesteps[0], z)
    s.set_timesteps(5)
    with pytest.raises(FloatingPointError, match="`sample` passed"):
        s.step(z, s.timesteps[0], bad)
    s.set_timesteps(5)
    s.step(z, s.timesteps[0], z)
    huge = torch.full_like(z, 3e38)
    with pytest.raises(FloatingPointError, match=r"call 1 .*update of a finite sample"):
        s.step(huge, s.timesteps[1], huge)
    s.set_timesteps(5)
    big = torch.full((1, 2, 2, 2), 6e4, dtype=torch.float16)  # finite in float16, the update is not
    with pytest.raises(FloatingPointError, match="overflowed torch.float16"):
        s.step(big, s.timesteps[0], big)


def test_pipeline_scheduler_compatibles_and_swap_round_trip():
    """The Diffusers way to swap samplers on a pipeline: `pipe.scheduler.compatibles`, then
    `Other.from_config(pipe.scheduler.config)`; swapping back restores the original sampler."""
    from _pipeline_stubs import tiny_unet

    from diffusers_psld import PSLDPipeline

    pipe = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler(sampler="pf_heun", striding="quadratic"))
    assert {c.__name__ for c in pipe.scheduler.compatibles} == {c.__name__ for c in ALL}
    for cls in pipe.scheduler.compatibles:
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        out = pipe(batch_size=1, num_inference_steps=3, output_type="pt", generator=torch.Generator().manual_seed(0))
        assert torch.all(torch.isfinite(out.images))
    pipe.scheduler = PSLDScheduler.from_config(pipe.scheduler.config)
    assert pipe.scheduler.config.sampler == "pf_heun" and pipe.scheduler.config.striding == "quadratic"


# ------------------------------------------------------------------ review fixes: bounds and refusals
@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("kw,name", [(dict(time_scale=1e300), r"time_scale.*<= 1000000000"),
                                     (dict(time_scale=1e-300), r"time_scale.*>= 1e-06"),
                                     (dict(input_preconditioning=True, sigma_data=1e30), r"sigma_data.*<= 1000000"),
                                     (dict(sigma_data=1e-30), r"sigma_data.*>= 1e-06")])
def test_time_scale_and_sigma_data_are_bounded_in_the_constructor(cls, kw, name):
    with pytest.raises(ValueError, match=name):
        cls(**kw)


def test_in_range_sigma_data_gives_a_finite_preconditioned_input():
    for sd in (1e-6, 1e6):
        s = PSLDScheduler(input_preconditioning=True, sigma_data=sd, time_scale=1e9)
        s.set_timesteps(3)
        assert torch.all(torch.isfinite(s.scale_model_input(torch.randn(1, 2, 2, 2), s.timesteps[0])))
        assert torch.isfinite(s.model_time(1.0, 1)).all()


@pytest.mark.parametrize("which", ["original_samples", "noise"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_add_noise_refuses_non_finite_inputs(which, value):
    x0, noise = torch.zeros(2, 1, 2, 2), torch.zeros(2, 2, 2, 2)
    bad = {"original_samples": x0, "noise": noise}
    bad[which] = bad[which].clone()
    bad[which][0, 0, 0, 0] = value
    with pytest.raises(ValueError, match=which):
        PSLDScheduler().add_noise(bad["original_samples"], bad["noise"], 0.5)


@pytest.mark.parametrize("t", [torch.tensor([float("nan")]), torch.tensor([float("inf")]), torch.tensor([-0.5]),
                               torch.tensor([0.5, float("nan")], dtype=torch.float64)])
def test_model_time_refuses_non_finite_or_negative_tensors(t):
    with pytest.raises(ValueError, match="`t`"):
        PSLDScheduler().model_time(t, t.numel())


@pytest.mark.parametrize("bad", [-1, 0, 1.5, True, "2"])
def test_model_time_refuses_a_bad_batch_size(bad):
    with pytest.raises(ValueError, match="batch_size"):
        PSLDScheduler().model_time(0.5, bad)


def test_model_time_accepts_numpy_batch_sizes():
    assert PSLDScheduler().model_time(0.5, np.int64(3)).shape == (3,)


@pytest.mark.parametrize("precondition", [False, True])
@pytest.mark.parametrize("bad", ["long", "none", "numpy"])
def test_scale_model_input_refuses_non_float_samples(precondition, bad):
    s = PSLDScheduler(input_preconditioning=precondition)
    s.set_timesteps(3)
    z = torch.zeros(1, 2, 2, 2)
    sample = {"long": z.long(), "none": None, "numpy": z.numpy()}[bad]
    with pytest.raises(TypeError, match="sample"):
        s.scale_model_input(sample, s.timesteps[0])


@pytest.mark.parametrize("ptype", ["epsilon", "sample"])
@pytest.mark.parametrize("method,name", [("model_output_to_eps", "model_output"), ("eps_to_model_output", "eps")])
def test_output_eps_conversions_refuse_none_integer_and_wrong_channels(ptype, method, name):
    s = PSLDScheduler(prediction_type=ptype)
    z = torch.zeros(2, 2, 2, 2)
    good = z if (ptype == "epsilon" or name == "eps") else z[:, :1]
    fn = getattr(s, method)
    fn(good, z, 0.5)
    with pytest.raises(TypeError, match=name):
        fn(None, z, 0.5)
    with pytest.raises(TypeError, match=name):
        fn(good.long(), z, 0.5)
    with pytest.raises(TypeError, match="sample"):
        fn(good, None, 0.5)
    wrong = torch.zeros(2, 3, 2, 2)
    with pytest.raises(ValueError, match=rf"`{name}` must .*shape \(2, {good.shape[1]}, 2, 2\)"):
        fn(wrong, z, 0.5)


@pytest.mark.parametrize("cls,kw", LOOPS, ids=LOOP_IDS)
def test_empty_batch_is_refused_by_step(cls, kw):
    s = cls(**kw)
    s.set_timesteps(4)
    z = torch.zeros(0, 2 if kw.get("diffusion") != "vp" else 1, 2, 2)
    with pytest.raises(ValueError, match="`sample` has a batch of 0"):
        s.step(z, s.timesteps[0], z)


def test_empty_batch_is_refused_by_add_noise():
    with pytest.raises(ValueError, match="`original_samples` has a batch of 0"):
        PSLDScheduler().add_noise(torch.zeros(0, 1, 2, 2), torch.zeros(0, 2, 2, 2), 0.5)


@pytest.mark.parametrize("cls", [ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler])
@pytest.mark.parametrize("bad", [10 ** 6, 65, 3, 8.0, True])
def test_quadrature_nodes_are_bounded_in_the_constructor(cls, bad):
    with pytest.raises(ValueError, match=r"quadrature_nodes.*\[4, 64\]"):
        cls(quadrature_nodes=bad)


@pytest.mark.parametrize("cls", [ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler])
def test_quadrature_nodes_accept_numpy_and_the_upper_bound(cls):
    cls(quadrature_nodes=np.int64(64)).set_timesteps(3)


@pytest.mark.parametrize("bad", [42, "abc", [1, 2]])
def test_gddim_step_validates_the_generator(bad):
    s = GDDIMMultistepScheduler()
    s.set_timesteps(4)
    z = torch.zeros(2, 2, 2, 2)
    with pytest.raises(TypeError, match="generator"):
        s.step(z, s.timesteps[0], z, generator=bad)


@pytest.mark.parametrize("cls", [ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler])
def test_slow_set_timesteps_warns_with_the_expected_cost(cls, monkeypatch):
    from diffusers_psld.schedulers import scheduling_psld

    s = cls()
    monkeypatch.setattr(cls, "_SLOW_SETUP_STEPS", 3)  # keep the test fast: the real threshold is 5000
    seen = []
    monkeypatch.setattr(scheduling_psld.logger, "warning", lambda msg, *a, **k: seen.append(msg))
    s.set_timesteps(4)
    assert len(seen) == 1 and "set_timesteps(4)" in seen[0] and "s (~1 ms per step" in seen[0]
    seen.clear()
    PSLDScheduler().set_timesteps(4)  # cheap tables: no warning
    assert PSLDScheduler._SLOW_SETUP_STEPS == 5000 and not seen
