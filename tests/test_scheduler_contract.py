"""Diffusers scheduler contract for PSLDScheduler / SSCSScheduler (modelled on diffusers' SchedulerCommonTest)."""
import inspect
import json

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_psld import GDDIMMultistepScheduler, PSLDScheduler, SSCSScheduler
from diffusers_psld.schedulers.scheduling_psld import time_grid

CONFIGS = [
    (PSLDScheduler, dict(sampler="em")),
    (PSLDScheduler, dict(sampler="pf_euler", striding="quadratic")),
    (PSLDScheduler, dict(sampler="pf_heun")),
    (PSLDScheduler, dict(diffusion="vp")),
    (SSCSScheduler, dict()),
    (SSCSScheduler, dict(gamma=0.0, nu=4.0, striding="quadratic")),
    (GDDIMMultistepScheduler, dict()),
    (GDDIMMultistepScheduler, dict(diffusion="vp", solver_order=2, time_spacing="logsnr")),
]
IDS = [f"{c.__name__}-{'-'.join(f'{k}={v}' for k, v in kw.items())}" for c, kw in CONFIGS]


def dummy_eps(sample, t):
    return 0.1 * sample + 0.05 * torch.sin(sample * 3 + float(t))


def public(config):
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def run(s, shape=(2, 4, 4, 4), nfe=6, generator=None, dtype=torch.float32):
    s.set_timesteps(nfe)
    z = s.sample_prior(shape, generator=generator, dtype=dtype)
    for t in s.timesteps:
        z = s.step(dummy_eps(s.scale_model_input(z, t), t), t, z, generator=generator).prev_sample
    return z


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_save_load_round_trip_and_from_config(cls, kw, tmp_path):
    s = cls(**kw, kappa=0.05, sampling_eps=2e-3)
    s.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["_class_name"] == cls.__name__ and cfg["kappa"] == 0.05
    loaded = cls.from_pretrained(tmp_path)
    assert public(loaded.config) == public(s.config)
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(run(s, generator=g1), run(loaded, generator=g2))
    assert public(cls.from_config(s.config).config) == public(s.config)


def test_shared_defaults_and_cross_class_from_config():
    """Every scheduler class of the package shares the base parameters with identical defaults."""
    from diffusers_psld import ConjugateScheduler, SplittingScheduler

    sig_p = inspect.signature(PSLDScheduler.__init__).parameters
    for cls in (SSCSScheduler, ConjugateScheduler, SplittingScheduler, GDDIMMultistepScheduler):
        sig = inspect.signature(cls.__init__).parameters
        assert list(sig)[: len(sig_p)] == list(sig_p), cls
        for name in sig_p:
            if name not in ("self", "sampler"):
                assert sig_p[name].default == sig[name].default, (cls.__name__, name)
    p = PSLDScheduler(gamma=0.02, nu=4.02, striding="quadratic")
    s = SSCSScheduler.from_config(p.config)
    assert s.config.sampler == "sscs" and s.config.gamma == 0.02 and s.config.striding == "quadratic"
    back = PSLDScheduler.from_config(s.config)
    assert back.config.sampler == "em" and back.config.gamma == 0.02
    with pytest.raises(ValueError, match="sscs"):
        SSCSScheduler(sampler="em")


def test_paper_defaults():
    s = PSLDScheduler()
    c = s.config
    assert (c.gamma, c.nu, c.kappa, c.sampling_eps) == (0.01, 4.01, 0.04, 1e-3)
    assert s.sde.beta_min == s.sde.beta_max == 8.0
    assert abs(1 / s.sde.masses[1].item() - 4.0) < 1e-12  # critical damping M⁻¹ = (ν-Γ)²/4 = 4
    vp = PSLDScheduler(diffusion="vp")
    assert (vp.sde.beta_min, vp.sde.beta_max, vp.num_components) == (0.1, 20.0, 1)


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_timesteps_and_exact_nfe(cls, kw):
    s = cls(**kw)
    for n in (2, 3, 10, 51):
        s.set_timesteps(n)
        ts = s.timesteps
        assert len(ts) == n and ts.dtype == torch.float32  # float32 on the device; exact float64 times in the tables
        assert torch.all(ts[:-1] >= ts[1:]) and ts[0] <= 1.0
        from diffusers_psld.schedulers.nfe_bands import band_for

        band = getattr(s, "resolved_options", {}).get("band", "classic")
        if (band == "classic" or s.config.time_spacing is not None
                or band_for(s.num_components, n)[1].time_grid is None):  # the grid ends at sampling_eps
            assert ts[-1] == torch.tensor(s.config.sampling_eps, dtype=torch.float32)
            assert s._tables.eval_times[-1] == s.config.sampling_eps
        else:  # gDDIM's NFE band: the grid ends at the band's σ_min (nfe_bands.NFE_BANDS)
            from diffusers_psld.schedulers.time_grids import noise_level

            sigma_end = float(noise_level(s.sde, torch.tensor([s._tables.eval_times[-1]], dtype=torch.float64))[0])
            assert abs(sigma_end - band_for(s.num_components, n)[1].sigma_min) < 1e-9
        calls = 0
        z = s.sample_prior((1, 2 * s.num_components, 2, 2))
        for t in ts:
            z = s.step(torch.zeros_like(z), t, z).prev_sample
            calls += 1
        assert calls == n
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(torch.zeros_like(z), ts[-1], z)


def test_striding_grids():
    eps = 1e-3
    u, q = time_grid(4, eps, "uniform"), time_grid(4, eps, "quadratic")
    assert torch.allclose(u, torch.tensor([1, 0.75025, 0.5005, 0.25075, 1e-3], dtype=torch.float64))
    assert torch.allclose(q, eps + (1 - eps) * (torch.arange(4, -1, -1, dtype=torch.float64) / 4) ** 2)
    s = PSLDScheduler(sampler="em")
    s.set_timesteps(5)
    assert torch.equal(s.exact_timesteps, u) and torch.equal(s.timesteps, u.float())


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_identical_generator_identical_output_and_batch_independence(cls, kw):
    s = cls(**kw)
    a = run(s, generator=torch.Generator().manual_seed(7))
    b = run(s, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b) and a.shape == (2, 4, 4, 4) if s.num_components == 2 else torch.equal(a, b)
    # a list of generators: sample i depends only on generator i
    gens = [torch.Generator().manual_seed(i) for i in (11, 12, 13)]
    batch = run(s, shape=(3, 4, 4, 4), generator=gens)
    single = run(s, shape=(1, 4, 4, 4), generator=[torch.Generator().manual_seed(12)])
    assert torch.allclose(batch[1:2], single, atol=1e-6)


@pytest.mark.parametrize("cls,kw", CONFIGS[1:3], ids=IDS[1:3])
def test_float32_float64_and_half_inputs(cls, kw):
    """Deterministic samplers: a float64 state gives the float32 result to float32 precision."""
    s = cls(**kw)
    s.set_timesteps(6)
    z0 = s.sample_prior((2, 4, 4, 4), generator=torch.Generator().manual_seed(1))
    outs = []
    for z in (z0, z0.double()):
        s.set_timesteps(6)
        for t in s.timesteps:
            z = s.step(dummy_eps(z, t), t, z).prev_sample
        outs.append(z)
    z32, z64 = outs
    assert z64.dtype == torch.float64 and z32.dtype == torch.float32
    assert torch.allclose(z64.float(), z32, rtol=1e-4, atol=1e-4)
    for dtype in (torch.float16, torch.bfloat16):
        s.set_timesteps(3)
        z = s.sample_prior((1, 4, 2, 2), dtype=dtype)
        out = s.step(torch.zeros_like(z), s.timesteps[0], z)
        assert out.prev_sample.dtype == dtype and torch.all(torch.isfinite(out.prev_sample.float()))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_cuda_matches_cpu(cls, kw):
    s = cls(**kw)
    s.set_timesteps(5, device="cuda")
    z_cpu = s.sample_prior((2, 4, 4, 4), generator=torch.Generator().manual_seed(0))
    z = z_cpu.cuda()
    for t in s.timesteps:
        z = s.step(dummy_eps(z, t), t, z).prev_sample if s.config.sampler in ("pf_euler", "pf_heun") else z
    if s.config.sampler in ("pf_euler", "pf_heun"):
        s2 = cls(**kw)
        s2.set_timesteps(5)
        zc = z_cpu
        for t in s2.timesteps:
            zc = s2.step(dummy_eps(zc, t), t, zc).prev_sample
        assert torch.allclose(z.cpu(), zc, atol=1e-5)
    z = s.add_noise(torch.zeros(2, 2, 4, 4, device="cuda"), torch.randn(2, 4, 4, 4, device="cuda"),
                    torch.full((2,), 0.5, device="cuda"))
    assert z.device.type == "cuda"


def test_add_noise_moments_match_hsm_kernel():
    s = PSLDScheduler()
    n = 200_000
    x0 = torch.full((n, 1), 0.6)
    t = torch.full((n,), 0.05)
    z = s.add_noise(x0, torch.randn(n, 2), t).double()
    kern = s.sde.hsm_kernel(0.05)
    assert torch.allclose(z.mean(0), kern.mean_coef * 0.6, atol=4 * kern.cov.diagonal().max().sqrt().item() / n ** 0.5)
    assert torch.allclose(torch.cov(z.T), kern.cov, rtol=0.02, atol=1e-5)
    # per-sample timesteps, 4-D tensors, and the ε ↔ score conversion
    x0 = torch.randn(3, 2, 4, 4)
    eps = torch.randn(3, 4, 4, 4)
    tt = torch.tensor([1e-5, 0.3, 1.0])
    zt = s.add_noise(x0, eps, tt)
    assert zt.shape == (3, 4, 4, 4) and torch.all(torch.isfinite(zt))
    k1 = s.sde.hsm_kernel(0.3)
    score = s.eps_to_score(eps[1:2], 0.3)
    direct = -torch.linalg.solve(k1.cov.float(), (zt[1:2] - torch.cat([k1.mean_coef[0] * x0[1:2], k1.mean_coef[1] * x0[1:2]], 1)).reshape(2, -1)).reshape(1, 4, 4, 4)
    assert torch.allclose(score, direct, rtol=1e-3, atol=1e-3)
    assert torch.allclose(s.score_to_eps_shift(score, 0.3), -eps[1:2], atol=1e-4)


def test_model_time_is_a_float_tensor_scaled_for_the_unet():
    s = PSLDScheduler()
    mt = s.model_time(torch.tensor(0.7, dtype=torch.float64), batch_size=3)
    assert mt.dtype == torch.float32 and mt.shape == (3,) and torch.allclose(mt, torch.full((3,), 700.0))
    unet = UNet2DModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    x = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        a = unet(x, s.model_time(0.70, 1)).sample
        b = unet(x, s.model_time(0.71, 1)).sample
    assert (a - b).abs().max() > 1e-3  # the embedding resolves nearby times


@pytest.mark.parametrize("cls,kw", CONFIGS, ids=IDS)
def test_standard_diffusers_loop_with_a_unet(cls, kw):
    s = cls(**kw)
    k = s.num_components
    unet = UNet2DModel(sample_size=8, in_channels=k, out_channels=k, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()
    g = torch.Generator().manual_seed(0)
    s.set_timesteps(5)
    z = s.sample_prior((2, k, 8, 8), generator=g)
    with torch.no_grad():
        for t in s.timesteps:
            inp = s.scale_model_input(z, t)
            eps = unet(inp, s.model_time(t, 2)).sample
            out = s.step(eps, t, z, generator=g)
            z = out.prev_sample
            assert out.pred_original_sample.shape == (2, 1, 8, 8)
    assert z.shape == (2, k, 8, 8) and torch.all(torch.isfinite(z))


def test_return_dict_false_gives_tuple():
    s = PSLDScheduler()
    s.set_timesteps(3)
    z = torch.randn(1, 2, 2, 2)
    out = s.step(torch.zeros_like(z), s.timesteps[0], z, return_dict=False)
    assert isinstance(out, tuple) and out[0].shape == z.shape and out[1].shape == (1, 1, 2, 2)


# ---------------------------------------------------------------------- bad input
def test_bad_inputs_raise_clear_errors():
    s = PSLDScheduler()
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(0)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(1)
    with pytest.raises(ValueError, match="num_inference_steps"):
        s.set_timesteps(2.5)
    with pytest.raises(ValueError, match="set_timesteps"):
        s.step(torch.zeros(1, 2, 2, 2), 1.0, torch.zeros(1, 2, 2, 2))
    s.set_timesteps(4)
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match="model_output.*8|all 4 channels"):
        s.step(torch.zeros(1, 2, 2, 2), s.timesteps[0], z)
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.zeros_like(z), 1.5, z)
    with pytest.raises(ValueError, match="timestep"):
        s.step(torch.zeros_like(z), -0.1, z)
    s.step(torch.zeros_like(z), s.timesteps[0], z)  # a loop in progress checks each timestep against its call
    with pytest.raises(ValueError, match="does not match call 1"):
        s.step(torch.zeros_like(z), s.timesteps[2], z)
    with pytest.raises(ValueError, match="sample"):
        s.step(torch.zeros(1, 3, 2, 2), s.timesteps[0], torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="noise"):
        s.add_noise(torch.zeros(2, 3, 4, 4), torch.zeros(2, 3, 4, 4), torch.full((2,), 0.5))
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        s.add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4), torch.full((2,), 1.5))
    with pytest.raises(ValueError, match="timesteps"):
        s.add_noise(torch.zeros(2, 1, 4, 4), torch.zeros(2, 2, 4, 4), torch.full((3,), 0.5))
    for kw, name in [(dict(sampler="rk4"), "sampler"), (dict(striding="cubic"), "striding"), (dict(diffusion="cld"), "diffusion"),
                     (dict(sampling_eps=0.0), "sampling_eps"), (dict(gamma=-1.0), "gamma"), (dict(nu=float("nan")), "nu"),
                     (dict(kappa=-0.1), "kappa"), (dict(beta_min=4.0, beta_max=1.0), "beta_max"), (dict(time_scale=0), "time_scale"),
                     (dict(diffusion="vp", sampler="sscs"), "sscs")]:
        with pytest.raises(ValueError, match=name):
            PSLDScheduler(**kw)


def test_hsm_kernel_at_reuses_the_step_tables_and_matches_the_recipe():
    """Per-step kernels come from the float64 tables built in set_timesteps (no per-step expm); off-grid times
    (or before set_timesteps) are computed; both equal RecipeSDE.hsm_kernel."""
    s = PSLDScheduler(sampler="sscs")
    off = s.hsm_kernel_at(0.37)  # no tables yet
    ref = s.sde.hsm_kernel(0.37)
    assert torch.equal(off.cov, ref.cov) and torch.equal(off.mean_coef, ref.mean_coef)
    s.set_timesteps(6)
    z = torch.zeros(1, 2, 2, 2)
    for i, t in enumerate(s.exact_timesteps):
        k = s.hsm_kernel_at(float(t))
        assert s.hsm_kernel_at(float(s.timesteps[i])) is not None and torch.equal(s.hsm_kernel_at(float(s.timesteps[i])).chol, s._tables.kernel.chol[i])
        assert torch.allclose(k.cov, s.sde.hsm_kernel(float(t)).cov, rtol=1e-12, atol=1e-15)
        assert torch.allclose(k.chol @ k.chol.T, k.cov, rtol=1e-10, atol=1e-15)
        assert torch.equal(k.chol, s._tables.kernel.chol[i])  # the table entry itself, not a recomputation
        s.step(torch.zeros_like(z), t, z)
    assert torch.allclose(s.hsm_kernel_at(0.37).cov, ref.cov, rtol=1e-12)  # off-grid after the loop


def test_from_config_swaps_between_every_pair_of_schedulers():
    """`New.from_config(pipe.scheduler.config)` (the Diffusers way to swap samplers) works between all of this
    package's schedulers: an unrunnable `sampler` becomes the target's default, shared settings carry over,
    a runnable one is kept, an explicit `sampler=` is honoured and validated."""
    import inspect

    from diffusers_psld import ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler, SSCSScheduler

    classes = [PSLDScheduler, SSCSScheduler, ConjugateScheduler, GDDIMMultistepScheduler, SplittingScheduler]
    default = {c: inspect.signature(c.__init__).parameters["sampler"].default for c in classes}
    for src in classes:
        for explicit in (False, True):
            kw = {"sampler": default[src]} if explicit else {}
            cfg = src(gamma=0.02, nu=4.02, striding="quadratic", sampling_eps=2e-3, **kw).config
            for dst in classes:
                new = dst.from_config(cfg)
                assert type(new) is dst
                # an implicit default is re-defaulted (Diffusers' rule); an explicit runnable one is kept
                want = cfg["sampler"] if explicit and cfg["sampler"] in dst._samplers else default[dst]
                assert new.config.sampler == want, (src.__name__, dst.__name__, explicit)
                assert (new.config.gamma, new.config.nu, new.config.striding, new.config.sampling_eps) == (0.02, 4.02, "quadratic", 2e-3)
                new.set_timesteps(4)  # usable
    assert PSLDScheduler.from_config(PSLDScheduler(sampler="pf_heun").config).config.sampler == "pf_heun"
    assert SSCSScheduler.from_config(PSLDScheduler(sampler="pf_heun").config).config.sampler == "sscs"
    assert PSLDScheduler.from_config(GDDIMMultistepScheduler().config, sampler="sscs").config.sampler == "sscs"
    with pytest.raises(ValueError, match="sampler"):
        SSCSScheduler.from_config(PSLDScheduler().config, sampler="em")
