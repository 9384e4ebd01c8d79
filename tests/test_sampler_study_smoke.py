"""Smoke test of benchmarks/sampler_study.py at tiny size: random tiny networks (a package VP, a package PSLD and a
diffusers DDPM pipeline), diffusers' and the package's samplers through the bridge, shared prior draws, FID + KID,
resume, report; and the goal-check logic on synthetic results."""
import json
import os

import pytest
import torch
from _scripts import load_script


def _load():
    return load_script(os.path.join("benchmarks", "sampler_study.py"), "psld_sampler_study")


def _tiny_networks(root):
    from diffusers import DDPMPipeline, DDPMScheduler

    from diffusers_psld import PSLDPipeline, PSLDScheduler, build_unet

    torch.manual_seed(0)
    for name, sched in (("vp", PSLDScheduler(diffusion="vp")), ("psld_sample", PSLDScheduler(prediction_type="sample"))):
        unet = build_unet("tiny", 1, sched.num_components, sample_size=8, out_channels=sched.output_channels(1))
        PSLDPipeline(unet=unet, scheduler=sched).save_pretrained(str(root / name))
    DDPMPipeline(unet=build_unet("tiny", 1, 1, sample_size=8), scheduler=DDPMScheduler()).save_pretrained(
        str(root / "ddpm"))


def test_study_samples_every_family_resumes_and_reports(tmp_path):
    from diffusers_psld.evaluation.features import DigitsFeatureNet

    st = _load()
    _tiny_networks(tmp_path / "models")
    DigitsFeatureNet(image_size=8, feature_dim=16, width=8).save_pretrained(str(tmp_path / "fx"))
    extra = {"g2-uniform-s0.3": {"class": "GDDIMMultistepScheduler", "recipe": "psld", "networks": ["ddpm"],
                                 "kwargs": {"solver_order": 2, "time_grid": "uniform", "sigma_min": 0.3}}}
    (tmp_path / "extra.json").write_text(json.dumps(extra))
    common = ["--extra_samplers", str(tmp_path / "extra.json"), "--models_dir", str(tmp_path / "models"), "--work_dir", str(tmp_path / "w"), "--feature_extractor",
              str(tmp_path / "fx"), "--networks", "vp", "ddpm", "psld_sample", "--resolution", "8",
              "--num_samples", "8", "--shard_size", "4", "--kid_subsets", "3", "--kid_subset_size", "4",
              "--floor_repeats", "2", "--plan", "dpmpp2m,gddim2,psld-gddim2:3;unipc:3@1000|ddpm;g2-uniform-s0.3:3"]
    # dpmpp2m on 3 networks, gddim2 on 3 (VP gDDIM on ddpm through the bridge), psld-gddim2 on vp and ddpm only,
    # unipc with a second seed on ddpm, the extra sampler (PSLD recipe, uniform grid to σ_min 0.3) on ddpm only
    assert st.main(common) == 0
    res = st.collect(str(tmp_path / "w"))
    assert len(res) == 3 + 3 + 2 + 1 + 1
    by = {(r["model"], r["sampler"]): r for r in res}
    assert by[("psld_sample", "dpmpp2m")]["family"] == "diffusers"
    assert by[("psld_sample", "gddim2")]["psld_sampler"] and by[("vp", "psld-gddim2")]["psld_sampler"]
    assert not by[("vp", "gddim2")]["psld_sampler"] and by[("ddpm", "gddim2")]["recipe"] == "vp-discrete"
    assert all(torch.isfinite(torch.tensor(r["fid"])) for r in res)
    assert by[("ddpm", "g2-uniform-s0.3")]["psld_sampler"]
    assert st.main(common) == 0 and len(st.collect(str(tmp_path / "w"))) == len(res)  # resumable: nothing left

    out = tmp_path / "out"
    st.main(common + ["--report", "--out_json", str(out / "s.json"), "--out_md", str(out / "s.md")])
    md = (out / "s.md").read_text()
    for text in ("## Goal checks", "## Best sampler per network and NFE", "## Best network per NFE", "### NFE 3",
                 "Real-data floor", "diffusers DPM-Solver++ 2M"):
        assert text in md, text
    assert json.load(open(out / "s.json"))["num_samples"] == 8
    # a filtered report: only the listed networks, samplers and NFEs
    sub = [a for a in common]
    sub[sub.index("--networks") + 1: sub.index("--networks") + 4] = ["ddpm"]
    st.main(sub + ["--report", "--report_samplers", "dpmpp2m", "unipc", "--report_nfes", "3",
                   "--out_json", str(out / "f.json"), "--out_md", str(out / "f.md")])
    got = {(r["model"], r["sampler"]) for r in json.load(open(out / "f.json"))["results"]}
    assert got == {("ddpm", "dpmpp2m"), ("ddpm", "unipc")}
    with pytest.raises(SystemExit):
        st.parse_args(common + ["--report", "--report_samplers", "nope"])
    with pytest.raises(SystemExit, match="no finished cell"):  # a filter that matches nothing writes nothing
        st.main(sub + ["--report", "--report_nfes", "13", "--out_json", str(out / "g.json"),
                       "--out_md", str(out / "g.md")])
    assert not (out / "g.md").exists()


def test_prior_draws_are_shared_across_state_spaces():
    """A seed gives VP-state samplers ξ[:, :C] and phase-space samplers the prior drawn from the same ξ."""
    from diffusers_psld import PSLDScheduler

    st = _load()
    g = torch.Generator().manual_seed(3)
    state = g.get_state()
    xi = st.draw_prior_noise(2, 1, 8, g)
    z = PSLDScheduler().sample_prior(xi.shape, generator=torch.Generator().set_state(state))
    assert torch.equal(z[:, :1], xi[:, :1])  # x ~ N(0, I): the same draws as the VP samplers' start
    assert not torch.equal(z[:, 1:], xi[:, 1:])  # m ~ N(0, M I): the same draws, scaled


def test_goal_checks_and_plan_validation():
    st = _load()

    def r(model, sampler, nfe, seed, fid, recipe, psld):
        fam = "diffusers" if sampler in st.DIFFUSERS_SAMPLERS else "package"
        return {"model": model, "sampler": sampler, "nfe": nfe, "seed": seed, "fid": fid, "recipe": recipe,
                "psld_sampler": psld, "family": fam}

    res = []
    for seed, (a, b, c) in zip((0, 1000, 2000), ((1.0, 1.5, 2.0), (1.1, 1.7, 2.1), (0.9, 1.3, 1.95))):
        res += [r("vp", "unipc", 10, seed, a, "vp", False), r("vp", "psld-gddim3", 10, seed, b, "vp", True),
                r("psld_eps", "gddim3", 10, seed, c, "psld", True), r("psld_eps", "dpmpp2m", 10, seed, 1.5 * c + 0.3, "psld", False)]
    text = "\n".join(st.goal_lines(res, [10]))
    assert "PSLD psld-gddim3 1.50 ± 0.20 (3 seeds) vs diffusers unipc 1.00 ± 0.10 (3 seeds); ratio 1.50" in text
    assert "diffusers better beyond seed noise" in text and "PSLD better beyond seed noise" in text
    assert "(the best PSLD network)" in text
    with pytest.raises(ValueError, match="unknown sampler 'nope'"):
        st.parse_plan("nope:10")
    with pytest.raises(ValueError, match="unknown network 'x'"):
        st.parse_plan("unipc:10|x")
    with pytest.raises(ValueError, match="expected 'samplers:nfes"):
        st.parse_plan("unipc")
    with pytest.raises(ValueError, match="the name is taken"):
        st.register_extra_samplers({"unipc": {"class": "GDDIMMultistepScheduler"}})
    with pytest.raises(ValueError, match="unknown scheduler class"):
        st.register_extra_samplers({"x1": {"class": "Nope"}})
    with pytest.raises(ValueError, match="file-name safe|letters, digits"):
        st.register_extra_samplers({"a/b": {"class": "GDDIMMultistepScheduler"}})
