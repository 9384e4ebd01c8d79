"""``prediction_type``: the output maps against their definitions, and every sampler driven by the exact x̂₀ /
exact sufficient-statistic noise of a Gaussian mixture against the same sampler driven by the exact 2C ε.

Independent routes: x̂₀ = E[x₀ | z_t] by Gaussian conditioning per mixture component (not Tweedie, not the
score); u = L⁻¹a/‖L⁻¹a‖ by a dense inverse; ε from :class:`GaussianMixture.eps` (the score route)."""
import json

import pytest
import torch

from diffusers_psld import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                            SSCSScheduler)
from diffusers_psld import parameterization as P
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.sampling import eps_projection
from diffusers_psld.sde import RecipeSDE

DATA = GaussianMixture([0.3, 0.7], [[-1.0, 0.5], [0.8, -0.4]],
                       [[[0.05, 0.02], [0.02, 0.08]], [[0.1, -0.03], [-0.03, 0.04]]])
D = 2
SDES = {"psld": RecipeSDE.psld(0.01, 4.01), "cld": RecipeSDE.cld(), "vp": RecipeSDE.vp(),
        "psld_g0.25": RecipeSDE.psld(0.25, 4.25)}


def posterior_mean(sde, z, t):
    """E[x₀ | z_t] for the mixture by Gaussian conditioning: Σ_j r_j (μ_j + S_j A (A S_j Aᵀ + Σ⊗I)⁻¹ (z - A μ_j))."""
    kern = sde.hsm_kernel(float(t))
    A = torch.kron(kern.mean_coef[:, None], torch.eye(D, dtype=torch.float64))  # [kD, D]
    noise = torch.kron(kern.cov, torch.eye(D, dtype=torch.float64))
    logps, means = [], []
    for w, mu, S in zip(DATA.weights, DATA.means, DATA.covs):
        cz = A @ S @ A.T + noise
        m = A @ mu
        dist = torch.distributions.MultivariateNormal(m, covariance_matrix=cz)
        logps.append(dist.log_prob(z) + torch.log(w))
        gain = S @ A.T @ torch.linalg.inv(cz)  # [D, kD]
        means.append(mu + (z - m) @ gain.T)
    r = torch.softmax(torch.stack(logps), dim=0)
    return (r[..., None] * torch.stack(means)).sum(0)


def u_dense(sde, t):
    kern = sde.hsm_kernel(float(t))
    w = torch.linalg.inv(kern.chol) @ kern.mean_coef
    return w / w.norm(), w.norm()


def exact_output(kind, sde, z, t):
    if kind == "epsilon":
        return DATA.eps(sde, z, t)
    if kind == "sample":
        return posterior_mean(sde, z, t)
    u, _ = u_dense(sde, t)  # sufficient_epsilon: uᵀ ε*, through the score route
    return torch.einsum("j,bjn->bn", u, DATA.eps(sde, z, t).reshape(z.shape[0], sde.k, -1))


def test_posterior_mean_route_matches_tweedie():
    """The two independent exact routes agree (so the comparisons below test the maps, not the references)."""
    sde = SDES["psld"]
    z = torch.randn(6, 2 * D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for t in (0.9, 0.2, 0.01):
        kern = sde.hsm_kernel(t)
        eps = DATA.eps(sde, z, t).reshape(6, 2, D)
        r = z.reshape(6, 2, D) - torch.einsum("ij,bjn->bin", kern.chol, eps)  # a x̂₀
        x0 = torch.einsum("j,bjn->bn", kern.mean_coef, r) / (kern.mean_coef @ kern.mean_coef)
        torch.testing.assert_close(posterior_mean(sde, z, t), x0, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name", list(SDES))
@pytest.mark.parametrize("kind", ["sample", "sufficient_epsilon"])
@pytest.mark.parametrize("t", [1.0, 0.3, 0.02, 1e-3])
def test_maps_match_definition_round_trip_and_projection(name, kind, t):
    sde = SDES[name]
    k = sde.k
    kern = sde.hsm_kernel(t)
    maps = P.output_maps(kind, kern.mean_coef, kern.chol)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, D, dtype=torch.float64, generator=g)
    eps = torch.randn(5, k * D, dtype=torch.float64, generator=g)
    a, L = kern.mean_coef, kern.chol
    z = (a[None, :, None] * x0[:, None, :] + torch.einsum("ij,bjn->bin", L, eps.reshape(5, k, D))).reshape(5, k * D)
    f = maps.from_eps(eps, z)  # eps is consistent with x0 given z
    u, n = u_dense(sde, t)
    want = x0 if kind == "sample" else torch.einsum("j,bjn->bn", u, eps.reshape(5, k, D))
    torch.testing.assert_close(f, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(maps.to_eps(f, z), eps, rtol=1e-9, atol=1e-9)  # exact round trip
    # an arbitrary ε: ε -> f -> ε is project_eps's projection
    junk = torch.randn(5, k * D, dtype=torch.float64, generator=g)
    Mz, Me = eps_projection(a, L)
    proj = (torch.einsum("ij,bjn->bin", Mz, z.reshape(5, k, D)) + torch.einsum("ij,bjn->bin", Me, junk.reshape(5, k, D)))
    torch.testing.assert_close(maps.to_eps(maps.from_eps(junk, z), z), proj.reshape(5, k * D), rtol=1e-9, atol=1e-9)
    # the output has C channels
    assert f.shape == (5, D)


def test_vp_reduces_to_diffusers_types():
    sde = SDES["vp"]
    t = torch.tensor([0.9, 0.1, 1e-3], dtype=torch.float64)
    kern = sde.hsm_kernel(t)
    alpha, sigma = kern.mean_coef[:, 0], kern.chol[:, 0, 0]
    suff = P.output_maps("sufficient_epsilon", kern.mean_coef, kern.chol)
    torch.testing.assert_close(suff.eps_z, torch.zeros(3, 1, 1, dtype=torch.float64), rtol=0, atol=1e-12)
    torch.testing.assert_close(suff.eps_f, torch.ones(3, 1, 1, dtype=torch.float64), rtol=0, atol=1e-12)
    smp = P.output_maps("sample", kern.mean_coef, kern.chol)  # diffusers: ε = (z - α x̂₀)/σ
    torch.testing.assert_close(smp.eps_z[:, 0, 0], 1 / sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(smp.eps_f[:, 0, 0], -alpha / sigma, rtol=1e-12, atol=0)
    torch.testing.assert_close(P.snr(kern.mean_coef, kern.chol), alpha ** 2 / sigma ** 2, rtol=1e-12, atol=0)


def test_cld_mask_becomes_u_m_squared():
    """CLD's ε_m-only loss is the uᵀε loss weighted by u_m(t)² (in (0, 1]; it varies with t)."""
    sde = SDES["cld"]
    ts = torch.tensor([1.0, 0.1, 1e-2, 1e-4], dtype=torch.float64)
    kern = sde.hsm_kernel(ts)
    maps = P.output_maps("sufficient_epsilon", kern.mean_coef, kern.chol)
    lam = P.loss_weight(maps, sde.eps_mask())
    u_m = torch.stack([u_dense(sde, float(t))[0][1] for t in ts])
    torch.testing.assert_close(lam, u_m ** 2, rtol=1e-10, atol=0)
    assert torch.all((lam > 0) & (lam <= 1)) and lam.max() - lam.min() > 0.2
    lam_psld = P.loss_weight(P.maps_for_times(SDES["psld"], "sufficient_epsilon", ts), SDES["psld"].eps_mask())
    torch.testing.assert_close(lam_psld, torch.full_like(lam_psld, 0.5), rtol=1e-12, atol=0)


SAMPLERS = [
    ("psld", PSLDScheduler, dict(sampler="em", striding="quadratic")),
    ("psld", PSLDScheduler, dict(sampler="pf_euler")),
    ("psld", PSLDScheduler, dict(sampler="pf_heun")),
    ("psld", SSCSScheduler, dict(striding="quadratic")),
    ("psld", SSCSScheduler, dict(sscs_score_time="midpoint")),
    ("psld", GDDIMMultistepScheduler, dict()),
    ("psld", ConjugateScheduler, dict(conjugate_lambda=0.5)),
    ("psld", ConjugateScheduler, dict(eps_basis="gddim")),
    ("psld", SplittingScheduler, dict(sampler="roba")),
    ("psld", SplittingScheduler, dict(sampler="nbaoab")),
    ("psld", SplittingScheduler, dict(sampler="cvv")),
    ("cld", PSLDScheduler, dict(sampler="em")),
    ("cld", SSCSScheduler, dict()),
    ("cld", PSLDScheduler, dict(sampler="pf_heun")),
    ("cld", GDDIMMultistepScheduler, dict()),  # allowed for the consistent types only
    ("vp", PSLDScheduler, dict(diffusion="vp", sampler="em")),
    ("vp", PSLDScheduler, dict(diffusion="vp", sampler="pf_heun")),
    ("vp", GDDIMMultistepScheduler, dict(diffusion="vp")),
    ("vp", ConjugateScheduler, dict(diffusion="vp")),
]


def _run(sched, kind, n=12, seed=0, batch=16, use_helpers=False):
    sched.set_timesteps(n)
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((batch, sched.num_components * D), generator=g, dtype=torch.float64)
    for t, t_exact in zip(sched.timesteps, sched.exact_timesteps):
        t_eval = float(t_exact)  # the exact float64 time (``timesteps`` is its float32 copy)
        out = exact_output(kind, sched.sde, z, t_eval)
        if use_helpers:  # the pipeline's route: output -> ε (guidance acts here) -> output
            out = sched.eps_to_model_output(sched.model_output_to_eps(out, z, t), z, t)
        z = sched.step(out, t, z, generator=g).prev_sample
    return z


@pytest.mark.parametrize("name,cls,kw", SAMPLERS, ids=[f"{n}-{c.__name__}-{'-'.join(map(str, k.values()))}" for n, c, k in SAMPLERS])
def test_every_sampler_reproduces_the_exact_eps_run(name, cls, kw):
    gamma = {"psld": 0.01, "cld": 0.0}.get(name, 0.01)
    nu = {"psld": 4.01, "cld": 4.0}.get(name, 4.01)
    ref = None
    for kind in ("epsilon", "sample", "sufficient_epsilon"):
        if kind == "epsilon" and name == "cld" and cls is GDDIMMultistepScheduler:
            ref_s = GDDIMMultistepScheduler(gamma=0.0, nu=4.0, prediction_type="sample")  # ε-type refused for CLD
            with pytest.raises(ValueError, match="gamma"):
                GDDIMMultistepScheduler(gamma=0.0, nu=4.0)
            # drive the consistent scheduler with the exact ε converted to x̂₀ (exact ε is consistent)
            ref = _run(ref_s, "sample")
            continue
        s = cls(gamma=gamma, nu=nu, **kw, prediction_type=kind)
        out = _run(s, kind)
        if ref is None:
            ref = out
            continue
        assert (out - ref).abs().max().item() <= 1e-10, (kind, (out - ref).abs().max().item())
    assert torch.isfinite(ref).all()


@pytest.mark.parametrize("kind", ["sample", "sufficient_epsilon"])
def test_project_eps_is_the_identity_and_helpers_round_trip(kind):
    base = _run(PSLDScheduler(sampler="pf_heun", prediction_type=kind), kind)
    torch.testing.assert_close(_run(PSLDScheduler(sampler="pf_heun", prediction_type=kind, project_eps=True), kind),
                               base, rtol=0, atol=1e-10)
    torch.testing.assert_close(_run(PSLDScheduler(sampler="pf_heun", prediction_type=kind), kind, use_helpers=True),
                               base, rtol=0, atol=1e-10)
    # CLD: project_eps has nothing to check for consistent types
    PSLDScheduler(gamma=0.0, nu=4.0, prediction_type=kind, project_eps=True)


def test_helpers_off_table_times_and_batched_times():
    s = PSLDScheduler(prediction_type="sufficient_epsilon")
    s.set_timesteps(5)
    g = torch.Generator().manual_seed(3)
    z = torch.randn(4, 2 * D, dtype=torch.float64, generator=g)
    f = torch.randn(4, D, dtype=torch.float64, generator=g)
    ts = torch.tensor([0.9, 0.5, 0.3, 0.05], dtype=torch.float64)
    batched = s.model_output_to_eps(f, z, ts)
    for i, t in enumerate(ts.tolist()):
        single = s.model_output_to_eps(f[i:i + 1], z[i:i + 1], t)
        torch.testing.assert_close(batched[i:i + 1], single, rtol=1e-12, atol=1e-12)
        kern = s.sde.hsm_kernel(t)
        u, _ = u_dense(s.sde, t)
        y = torch.linalg.solve(kern.chol, z[i].reshape(2, D))  # L⁻¹ z
        want = y - torch.outer(u, u @ y) + torch.outer(u, f[i])
        torch.testing.assert_close(single[0], want.reshape(-1), rtol=1e-10, atol=1e-10)
    for bad in (-0.1, float("nan"), float("inf")):
        with pytest.raises(ValueError, match="timestep"):
            s.model_output_to_eps(f, z, bad)
    # past t = 1 is a valid forward time (adaptive ODE solvers evaluate stages there): the kernel there
    kern = s.sde.hsm_kernel(1.5)
    u, _ = u_dense(s.sde, 1.5)
    y = torch.linalg.solve(kern.chol, z[0].reshape(2, D))
    want = y - torch.outer(u, u @ y) + torch.outer(u, f[0])
    torch.testing.assert_close(s.model_output_to_eps(f[:1], z[:1], 1.5)[0], want.reshape(-1), rtol=1e-10, atol=1e-10)


def test_config_round_trip_and_old_configs(tmp_path):
    s = GDDIMMultistepScheduler(prediction_type="sample", input_preconditioning=True, sigma_data=0.7)
    s.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "scheduler_config.json").read_text())
    assert cfg["prediction_type"] == "sample" and cfg["input_preconditioning"] is True and cfg["sigma_data"] == 0.7
    back = GDDIMMultistepScheduler.from_pretrained(tmp_path)
    assert back.config.prediction_type == "sample" and back.config.sigma_data == 0.7
    assert SSCSScheduler.from_config(back.config).config.prediction_type == "sample"  # swaps keep it
    # a config saved before these keys existed loads as the paper's ε-prediction
    for key in ("prediction_type", "input_preconditioning", "sigma_data"):
        cfg.pop(key)
    (tmp_path / "scheduler_config.json").write_text(json.dumps(cfg))
    old = GDDIMMultistepScheduler.from_pretrained(tmp_path)
    assert old.config.prediction_type == "epsilon" and old.config.input_preconditioning is False


def test_bad_values_and_unet_channel_checks():
    with pytest.raises(ValueError, match="prediction_type.*epsilon"):
        PSLDScheduler(prediction_type="v_prediction")
    with pytest.raises(ValueError, match="sigma_data"):
        PSLDScheduler(input_preconditioning=True, sigma_data=0.0)
    with pytest.raises(ValueError, match="input_preconditioning"):
        PSLDScheduler(input_preconditioning="yes")
    from diffusers import UNet2DModel

    def unet(cin, cout):
        return UNet2DModel(sample_size=8, in_channels=cin, out_channels=cout, block_out_channels=(8, 16),
                           down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                           layers_per_block=1, norm_num_groups=4)

    eps_s, smp_s = PSLDScheduler(), PSLDScheduler(prediction_type="sample")
    assert eps_s.output_channels(3) == 6 and smp_s.output_channels(3) == 3
    assert PSLDScheduler(diffusion="vp", prediction_type="epsilon").output_channels(3) == 3
    assert eps_s.check_unet(unet(6, 6)) == 3 and smp_s.check_unet(unet(6, 3)) == 3
    with pytest.raises(ValueError, match="out_channels=3.*needs 6.*prediction_type='sample' or 'sufficient_epsilon'"):
        eps_s.check_unet(unet(6, 3))
    with pytest.raises(ValueError, match="out_channels=6.*needs 3.*prediction_type='epsilon'"):
        smp_s.check_unet(unet(6, 6))
    with pytest.raises(ValueError, match="in_channels"):
        smp_s.check_unet(unet(3, 3))
    s = PSLDScheduler(prediction_type="sample")
    s.set_timesteps(3)
    z = torch.zeros(1, 4, 2, 2)
    with pytest.raises(ValueError, match=r"C = 2 channels.*\(1, 2, 2, 2\)"):
        s.step(torch.zeros(1, 4, 2, 2), s.timesteps[0], z)


@pytest.mark.parametrize("name", ["psld", "cld", "vp"])
def test_preconditioned_input_has_identity_covariance(name):
    """Gaussian data with per-pixel variance σ_data²: exactly (matrix identity) and by Monte Carlo through
    ``add_noise`` + ``scale_model_input`` (the functions training and sampling call)."""
    sigma_data = 0.7
    kw = dict(diffusion="vp") if name == "vp" else dict(gamma=0.0 if name == "cld" else 0.01, nu=4.0 if name == "cld" else 4.01)
    s = PSLDScheduler(**kw, input_preconditioning=True, sigma_data=sigma_data)
    k = s.num_components
    for t in (1.0, 0.3, 0.01, 1e-4):
        kern = s.sde.hsm_kernel(t)
        c = P.input_scaling(kern.mean_coef, kern.cov, sigma_data)
        cov = kern.cov + sigma_data ** 2 * torch.outer(kern.mean_coef, kern.mean_coef)
        torch.testing.assert_close(c @ cov @ c.T, torch.eye(k, dtype=torch.float64), rtol=0, atol=1e-9)
        torch.testing.assert_close(c, c.T, rtol=0, atol=1e-12)
    g = torch.Generator().manual_seed(0)
    n, d = 4000, 16
    x0 = sigma_data * torch.randn(n, 1, d, dtype=torch.float64, generator=g) + 0.0
    for t in (0.5, 0.05):
        noise = torch.randn(n, k, d, dtype=torch.float64, generator=g)
        z = s.add_noise(x0, noise, t)
        inp = s.scale_model_input(z, torch.full((n,), t, dtype=torch.float64))
        comps = inp.reshape(n, k, d).permute(1, 0, 2).reshape(k, -1)
        emp = comps @ comps.T / comps.shape[1]
        # s.e. of a covariance entry ≈ 1/sqrt(n d) = 0.004
        torch.testing.assert_close(emp, torch.eye(k, dtype=torch.float64), rtol=0, atol=0.025)
        # unpreconditioned z is far from white (so the test is not vacuous) except for VP at large t
        raw = z.reshape(n, k, d).permute(1, 0, 2).reshape(k, -1)
        if name != "vp":
            assert ((raw @ raw.T / raw.shape[1]) - torch.eye(k, dtype=torch.float64)).abs().max() > 0.1
    # a scalar timestep at the current call uses the tables, an off-grid one is computed: same result
    s.set_timesteps(4)
    zz = torch.randn(3, k * d, dtype=torch.float64, generator=g)
    t0 = s.timesteps[0]
    torch.testing.assert_close(s.scale_model_input(zz, t0), s.scale_model_input(zz, torch.full((3,), float(t0), dtype=torch.float64)),
                               rtol=1e-12, atol=1e-12)
    assert PSLDScheduler(**kw).scale_model_input(zz, t0) is zz


@pytest.mark.parametrize("kind", ["sample", "sufficient_epsilon"])
def test_likelihood_score_fn_converts_outputs_and_preconditions(kind):
    from diffusers_psld.evaluation.likelihood import eps_model_score_fn

    s_e = PSLDScheduler()
    s_c = PSLDScheduler(prediction_type=kind, input_preconditioning=True, sigma_data=0.6)
    sde = s_e.sde
    seen = []

    def net(inp, tm):  # undoes the preconditioning to get z back, then returns the exact output of its type
        t = float(tm[0]) / 1000.0
        seen.append(inp)
        c_in = P.scaling_for_times(sde, torch.tensor(t, dtype=torch.float64), 0.6)
        z = P.apply(torch.linalg.inv(c_in), inp.double())
        return exact_output(kind, sde, z, t)

    z = torch.randn(5, 2 * D, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    t = 0.25  # exactly representable after * 1000 in float32
    got = eps_model_score_fn(net, s_c)(z, t)
    want = eps_model_score_fn(lambda zz, tm: DATA.eps(sde, zz.double(), t), s_e)(z, t)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    assert (seen[0].double() - z).abs().max() > 0.05


@pytest.mark.parametrize("ptype", ["sufficient_epsilon", "sample"])
def test_training_script_builds_a_c_channel_unet_and_records_the_type(tmp_path, ptype):
    from diffusers import UNet2DModel

    from tests._scripts import load_script

    train = load_script("training/train_psld.py", "train_psld_param")
    out = tmp_path / "run"
    train.main(["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "3",
                "--eval_batch_size", "2", "--report_to", "none", "--lr_warmup_steps", "1", "--max_train_steps", "2",
                "--prediction_type", ptype, "--input_preconditioning", "--sigma_data", "0.7", "--snr_gamma", "5",
                "--output_dir", str(out)])
    unet = UNet2DModel.from_pretrained(out / "unet")
    assert (unet.config.in_channels, unet.config.out_channels) == (2, 1)
    sched = PSLDScheduler.from_pretrained(out / "scheduler")
    assert sched.config.prediction_type == ptype and sched.config.input_preconditioning and sched.config.sigma_data == 0.7
    sched.check_unet(unet)
    card = (out / "README.md").read_text()
    assert f"`{ptype}`" in card and "σ_data = 0.7" in card and "γ = 5.0" in card
    with pytest.raises(ValueError, match="sigma_data"):
        train.resolve_and_validate(train.build_parser().parse_args(["--sigma_data", "-1"]))
