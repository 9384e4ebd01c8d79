"""Smoke test of benchmarks/sampler_accuracy.py pieces (tiny sizes) and the new schedulers in PSLDPipeline."""
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import sampler_accuracy as sa  # noqa: E402

from diffusers_psld.exact import GaussianMixture  # noqa: E402
from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler  # noqa: E402
from diffusers_psld.schedulers.scheduling_psld import PSLDScheduler  # noqa: E402
from diffusers_psld.schedulers.scheduling_splitting import SplittingScheduler  # noqa: E402


def _tiny(d=5, J=3):
    g = torch.Generator().manual_seed(0)
    mu = torch.randn(J, d, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(J, d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.rand(J, d, generator=g, dtype=torch.float64) * 0.3 + 0.01
    return sa.RotatedMixture([0.5, 0.3, 0.2], mu, U, lam), mu, U, lam


def test_rotated_eps_matches_full_covariance_route():
    rm, mu, U, lam = _tiny()
    covs = U @ torch.diag_embed(lam) @ U.transpose(1, 2)
    gm = GaussianMixture([0.5, 0.3, 0.2], mu, covs)
    sde = PSLDScheduler().sde
    z = torch.randn(7, 10, dtype=torch.float64)
    for t in (0.01, 0.3, 0.9):
        kern = sde.hsm_kernel(t)
        torch.testing.assert_close(rm.eps(z, kern.mean_coef, kern.cov, kern.chol), gm.eps(sde, z, t), rtol=1e-9, atol=1e-10)
    kde = sa.RotatedMixture(torch.ones(3), mu, None, torch.tensor(0.04), shared=True)
    gk = GaussianMixture(torch.ones(3), mu, 0.04 * torch.eye(5, dtype=torch.float64).expand(3, 5, 5))
    kern = sde.hsm_kernel(0.2)
    # the KDE path expands the quadratic form (cheap for 500 centres): a few digits of cancellation
    torch.testing.assert_close(kde.eps(z, kern.mean_coef, kern.cov, kern.chol), gk.eps(sde, z, 0.2), rtol=1e-6, atol=1e-7)


def test_drivers_and_metrics_run():
    rm, *_ = _tiny()
    ref = rm.sample(200, seed=1)
    assert sa.frechet(ref, ref) < 1e-8 and sa.sliced_w2(ref, ref) == 0.0
    for sched in (ConjugateScheduler(conjugate_b="zero"), SplittingScheduler(sampler="roba")):
        x = sa.run_psld_scheduler(sched, rm, 50, 200, seed=2)
        assert torch.all(torch.isfinite(x)) and sa.frechet(x, ref) < 5.0
    x = sa.run_vp(sa.VP_SCHEDULERS["DDIM"]("trailing"), rm, 10, 200, seed=2)
    assert sa.frechet(x, ref) < 5.0
    x, nfe = sa.run_rk45(rm, 1e-2, 100, seed=2)
    assert nfe > 2 and torch.all(torch.isfinite(x))


def test_new_schedulers_in_pipeline():
    from diffusers import UNet2DModel

    from diffusers_psld.pipelines import PSLDPipeline

    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    pipe = PSLDPipeline(unet=unet, scheduler=PSLDScheduler())
    for sched in (ConjugateScheduler(conjugate_lambda=1.0), SplittingScheduler(sampler="roba"),
                  SplittingScheduler(sampler="cvv")):
        pipe.scheduler = sched
        out = pipe(batch_size=1, num_inference_steps=4, output_type="np", generator=torch.Generator().manual_seed(0))
        img = out.images if hasattr(out, "images") else out[0]
        assert torch.all(torch.isfinite(torch.as_tensor(img)))


def test_cli_subset_run_writes_table_goal_check_and_plot(tmp_path):
    rows, goals = sa.main(["--nfes", "4,6", "--num_samples", "64", "--samplers", "gDDIM multistep 3M (defaults),VP DDIM",
                           "--goal_seeds", "2", "--datasets", "mixture", "--out", str(tmp_path), "--tag", "_t"])
    (label, table_rows), = rows.items()
    assert set(table_rows) == {"noise floor (true vs true)", "gDDIM multistep 3M (defaults)", "VP DDIM"}
    assert set(goals[label]) == {4, 6}
    md = (tmp_path / "sampler_accuracy_t.md").read_text()
    assert "fresh sampling seeds" in md and "| Gaussian mixture | 6 | gDDIM multistep 3M (defaults) |" in md
    assert (tmp_path / "sampler_accuracy_t.png").stat().st_size > 1000


def test_low_nfe_sweep_cells(tmp_path):
    """A sweep cell's scheduler (grid, t_min, σ_max with the analytic first step in its config) through the driver,
    UniPC on a σ list with and without the analytic first step, and the band lookup of the selected configuration."""
    import json

    import low_nfe_sweep as lns
    from diffusers_psld.schedulers.time_grids import noise_level

    rm, *_ = _tiny(d=4)
    ref = rm.sample(200, seed=1)
    cfg = dict(solver_order=3, corrector="unic", grid="edm7", t_min=0.05, start="sigma10")
    sched = lns.make_scheduler(cfg)
    assert sched.config.analytic_first_step and sched.config.sampling_eps == 0.05 and sched.config.time_grid == "edm"
    x = sa.run_psld_scheduler(sched, rm, 5, 200, seed=2)
    sig = noise_level(sched.sde, sched.exact_timesteps.numpy())
    assert abs(sig[0] - 10.0) < 1e-8 and abs(sched.exact_timesteps[-1].item() - 0.05) < 1e-15
    assert torch.all(torch.isfinite(x)) and sa.frechet(x, ref) < 1.0
    assert lns.key(cfg) == "o3-unic-edm7-tmin0.05-sigma10"
    for afs in (False, True):
        x = lns.run_vp_sigmas(lambda: sa.UniPCMultistepScheduler(), rm, sig, 200, 2, analytic_first_step=afs)
        assert torch.all(torch.isfinite(x)) and sa.frechet(x, ref) < 1.0
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"selected": {"5": {**cfg, "key": "a"}, "10": {**cfg, "t_min": 0.02, "key": "b"}}}))
    assert sa.low_nfe_config(4, str(path))["t_min"] == 0.05 and sa.low_nfe_config(8, str(path))["t_min"] == 0.05
    assert sa.low_nfe_config(50, str(path)) == {**cfg, "t_min": 0.02}
    assert sa.low_nfe_config(5, str(tmp_path / "missing.json")) is None
