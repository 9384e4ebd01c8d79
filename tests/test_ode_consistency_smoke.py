"""Smoke test of benchmarks/ode_consistency.py on a tiny random-weight PSLD pipeline."""
import json
import os

import pytest
import torch
from _scripts import load_script


def _load():
    return load_script(os.path.join("benchmarks", "ode_consistency.py"), "psld_ode_consistency")


def _pipe(tmp_path, gamma):
    from diffusers import UNet2DModel

    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import PSLDScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    d = tmp_path / f"g{gamma}"
    PSLDPipeline(unet=unet, scheduler=PSLDScheduler(gamma=gamma, nu=4.01)).save_pretrained(str(d))
    return d


def test_report_and_the_projected_ode_meets_gddim(tmp_path):
    mod = _load()
    out = tmp_path / "r.md"
    r = mod.main(["--model_dir", str(_pipe(tmp_path, 0.01)), "--batch_size", "3", "--gddim_nfe", "200",
                  "--heun_nfe", "6", "--rtol", "1e-5", "--out", str(out)])
    names = r["names"]
    assert names == ["gDDIM-3M NFE 200", "PF-Heun NFE 6", "PF-Heun proj. NFE 6", "adaptive RK45 (rtol 1e-05)",
                     "adaptive RK45 proj. (rtol 1e-05)"]
    rms = r["rms"]
    for a in names:
        assert rms[a][a] == 0
        for b in names:
            assert rms[a][b] == pytest.approx(rms[b][a])
    # the projected PF-ODE is the ODE gDDIM integrates; the raw one is not (a random net is far from consistent)
    assert rms["adaptive RK45 proj. (rtol 1e-05)"]["gDDIM-3M NFE 200"] < 0.2 * rms["adaptive RK45 (rtol 1e-05)"]["gDDIM-3M NFE 200"]
    assert all(o > 0 for _, o, _ in r["profile"])
    text = out.read_text()
    assert "RMS distance" in text and "(5)" in text
    assert json.loads((tmp_path / "r.json").read_text())["names"] == names


def test_refuses_cld(tmp_path):
    mod = _load()
    with pytest.raises(ValueError, match="gamma > 0"):
        mod.main(["--model_dir", str(_pipe(tmp_path, 0.0)), "--gddim_nfe", "3", "--heun_nfe", "3"])
