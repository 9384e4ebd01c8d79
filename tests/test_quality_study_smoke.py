"""Smoke test of benchmarks/quality_study.py: tiny random-weight pipeline, 2 samplers × 1 NFE, no training."""
import json
import os

import torch
from _scripts import load_script



def _load():
    return load_script(os.path.join("benchmarks", "quality_study.py"), "psld_quality_study")


def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


def test_quality_study_driver_resume_and_report(tmp_path):
    from diffusers_psld.evaluation.features import DigitsFeatureNet
    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import PSLDScheduler

    qs = _load()
    models = tmp_path / "models"
    PSLDPipeline(unet=_tiny_unet(), scheduler=PSLDScheduler(gamma=0.01, nu=4.01)).save_pretrained(str(models / "psld_g0.01"))
    torch.manual_seed(0)
    DigitsFeatureNet(image_size=8, feature_dim=16, width=8).save_pretrained(str(tmp_path / "fx"))
    common = ["--models_dir", str(models), "--models", "psld_g0.01", "vp", "--feature_extractor", str(tmp_path / "fx"),
              "--work_dir", str(tmp_path / "eval"), "--num_samples", "8", "--shard_size", "4", "--resolution", "8",
              "--plan", "em-us,sscs-us:3", "--noise_floor_repeats", "2"]
    assert qs.main(common) == 2  # the missing "vp" model is skipped, not an error
    res = sorted(os.listdir(tmp_path / "eval" / "results"))
    assert res == ["psld_g0.01__em-us__nfe3__seed0.json", "psld_g0.01__sscs-us__nfe3__seed0.json"]
    r = json.load(open(tmp_path / "eval" / "results" / res[1]))
    assert r["scheduler"] == "SSCSScheduler" and r["nfe"] == 3 and r["num_samples"] == 8
    assert torch.isfinite(torch.tensor(r["fid"]))
    assert qs.main(common) == 0  # resumable: nothing left to do

    out = tmp_path / "out"
    out.mkdir()
    payload = qs.main(common + ["--report", "--out_json", str(out / "q.json"), "--out_md", str(out / "q.md"),
                                "--out_png", str(out / "q.png")])
    assert len(payload["results"]) == 2 and payload["noise_floor"]["repeats"] == 2
    md = (out / "q.md").read_text()
    assert "## em-us" in md and "## sscs-us" in md and "noise floor" in md
    assert "## Best sampler per model at equal NFE" in md
    assert (out / "q.png").stat().st_size > 1000
    assert json.load(open(out / "q.json"))["num_samples"] == 8


def test_plan_parsing_and_vp_applicability():
    qs = _load()
    plan = qs.parse_plan("em-us:20,50;sscs-qs:20")
    assert plan == [(["em-us"], [20, 50]), (["sscs-qs"], [20])]
    assert qs.parse_plan("em-us:50@7") == [(["em-us"], [50], 7)]
    assert qs.job_list(qs.parse_plan("em-us:50@7"), ["cld"], "unused", 0)[0]["seed"] == 7
    jobs = qs.job_list(plan, ["vp", "cld"], "unused", 0)
    assert [j["tier"] for j in jobs] == [0, 0, 0, 0, 1, 1]
    assert qs.SAMPLERS["sscs-us"][2] is False and qs.SAMPLERS["em-us"][2] is True


def test_applicability_by_model_config(tmp_path):
    """SSCS never runs on VP; the gDDIM sampler (needs a learned ε_x) never runs on CLD (Γ = 0)."""
    qs = _load()
    for name, cfg in {"vp": {"diffusion": "vp"}, "cld": {"diffusion": "psld", "gamma": 0.0},
                      "psld": {"diffusion": "psld", "gamma": 0.01}}.items():
        (tmp_path / name / "scheduler").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
        (tmp_path / name / "scheduler" / "scheduler_config.json").write_text(json.dumps(cfg))
    ok = {(m, s): qs.applicable({"model": m, "sampler": s}, str(tmp_path))
          for m in ("vp", "cld", "psld", "missing") for s in ("em-us", "sscs-qs", "gddim3")}
    assert ok[("vp", "em-us")] and ok[("vp", "gddim3")] and not ok[("vp", "sscs-qs")]
    assert ok[("cld", "em-us")] and ok[("cld", "sscs-qs")] and not ok[("cld", "gddim3")]
    assert all(ok[("psld", s)] for s in ("em-us", "sscs-qs", "gddim3"))
    assert not any(ok[("missing", s)] for s in ("em-us", "sscs-qs", "gddim3"))


def test_best_table_picks_lowest_fid_per_model_and_nfe():
    qs = _load()
    rs = [{"model": "vp", "sampler": "em-us", "nfe": 20, "seed": 0, "fid": 9.0},
          {"model": "vp", "sampler": "em-qs", "nfe": 20, "seed": 0, "fid": 5.0},
          {"model": "cld", "sampler": "sscs-qs", "nfe": 20, "seed": 0, "fid": 4.0},
          {"model": "cld", "sampler": "em-us", "nfe": 20, "seed": 1, "fid": 1.0}]  # other seed: ignored
    lines = qs._best_table(rs, ["vp", "cld"], 0)
    assert "5.00 (em-qs)" in lines[2] and "9.00" not in lines[2]
    assert "**4.00** (sscs-qs)" in lines[3] and "1.00" not in "".join(lines)


def test_compile_flag_wraps_the_unet_and_is_recorded(tmp_path, monkeypatch):
    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import PSLDScheduler

    qs = _load()
    d = tmp_path / "psld"
    PSLDPipeline(unet=_tiny_unet(), scheduler=PSLDScheduler(gamma=0.01, nu=4.01)).save_pretrained(str(d))
    wrapped = []
    monkeypatch.setattr(torch, "compile", lambda m, **kw: wrapped.append(type(m).__name__) or m)
    fn, sched = qs.make_sample_fn(str(d), "sscs-qs", 3, compile_unet=False)
    assert wrapped == []
    fn, sched = qs.make_sample_fn(str(d), "sscs-qs", 3, compile_unet=True)
    assert wrapped == ["UNet2DModel"] and sched == "SSCSScheduler"
    imgs = fn(2, torch.Generator().manual_seed(0))
    assert imgs.shape == (2, 8, 8, 1)
    assert qs.parse_args(["--compile"]).compile and not qs.parse_args([]).compile


def test_projected_samplers_set_project_eps_and_need_eps_x():
    from diffusers_psld.schedulers import PSLDScheduler

    qs = _load()
    cfg = PSLDScheduler().config
    pe = [name for name in qs.SAMPLERS if name.endswith("-pe")]
    assert len(pe) >= 5
    for name, (_, build, for_vp) in qs.SAMPLERS.items():
        sched = build(cfg)
        assert sched.config.project_eps is name.endswith("-pe"), name
        if name.endswith("-pe"):
            assert name in qs.NEEDS_EPS_X and not for_vp  # refused for CLD, the identity for VP: not run there
            base = name[:-3]
            assert base in qs.SAMPLERS and type(qs.SAMPLERS[base][1](cfg)) is type(sched)
