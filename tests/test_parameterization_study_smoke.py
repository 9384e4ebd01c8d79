"""Smoke test of benchmarks/parameterization_study.py at tiny size: train 2 models (2 steps), sample 2 samplers,
FID + KID, resume, report; and the goal-check logic on synthetic results."""
import json
import os

import pytest
import torch
from _scripts import load_script


def _load():
    return load_script(os.path.join("benchmarks", "parameterization_study.py"), "psld_parameterization_study")


def test_study_trains_evaluates_resumes_and_reports(tmp_path):
    from diffusers_psld.evaluation.features import DigitsFeatureNet
    from diffusers_psld.schedulers import PSLDScheduler

    ps = _load()
    torch.manual_seed(0)
    DigitsFeatureNet(image_size=8, feature_dim=16, width=8).save_pretrained(str(tmp_path / "fx"))
    common = ["--work_dir", str(tmp_path / "w"), "--models", "psld_eps", "psld_suff_pc", "--feature_extractor",
              str(tmp_path / "fx"), "--model_preset", "tiny", "--resolution", "8", "--train_steps", "2",
              "--train_batch_size", "8", "--checkpointing_steps", "1", "--grid_size", "2", "--grid_nfe", "2",
              "--num_samples", "8", "--shard_size", "4",
              "--plan", "em-qs,gddim3:3;gddim3:3@1000|psld_suff_pc;pf-heun-qs:2|psld_eps",
              "--kid_subsets", "3", "--kid_subset_size", "4", "--floor_repeats", "2"]
    assert ps.main(common) == 2 + 6  # 2 trainings, 2 models × 2 samplers, 1 second-seed cell, 1 pf-heun-qs cell
    sched = PSLDScheduler.from_pretrained(tmp_path / "w" / "models" / "psld_suff_pc" / "scheduler")
    assert sched.config.prediction_type == "sufficient_epsilon" and sched.config.input_preconditioning
    assert abs(sched.config.sigma_data - ps.data_std(8)) < 1e-4
    r = json.load(open(tmp_path / "w" / "results" / "psld_suff_pc__gddim3__nfe3__seed1000.json"))
    assert r["scheduler"] == "GDDIMMultistepScheduler" and r["prediction_type"] == "sufficient_epsilon"
    assert all(torch.isfinite(torch.tensor(r[k])) for k in ("fid", "kid_mean", "kid_std"))
    assert ps.main(common) == 0  # resumable: nothing left

    out = tmp_path / "out"
    payload = ps.main(common + ["--report", "--pilot", "smoke", "--out_json", str(out / "p.json"),
                                "--out_md", str(out / "p.md"), "--out_png", str(out / "p.png")])
    assert len(payload["results"]) == 6 and payload["floor"]["repeats"] == 2
    md = (out / "p.md").read_text()
    for text in ("PILOT", "## Best sampler per model", "## gddim3", "## pf-heun-qs", "## em-qs", "Other sampling seeds",
                 "Real-data floor", "Goal checks",
                 "--prediction_type sufficient_epsilon --input_preconditioning",
                 "gddim3 at NFE 3 (sampling seed 1000) on psld_suff_pc"):
        assert text in md, text
    assert (out / "p.png").stat().st_size > 1000


def test_goal_checks_use_the_seed_spread():
    ps = _load()

    def r(model, sampler, nfe, seed, fid):
        return {"model": model, "sampler": sampler, "nfe": nfe, "seed": seed, "fid": fid}

    base = [r("psld_suff", "gddim3", 20, 0, 5.0), r("vp", "em-qs", 20, 0, 7.0), r("psld_suff", "pf-heun-us", 100, 0, 6.3),
            r("psld_suff", "gddim3", 250, 0, 5.6), r("psld_suff", "gddim3", 50, 0, 9.0)]
    quiet = base + [r("psld_suff", "gddim3", 20, 1000, 5.3), r("vp", "em-qs", 20, 1000, 6.8),
                    r("psld_suff", "gddim3", 20, 2000, 5.1), r("vp", "em-qs", 20, 2000, 7.1)]
    noisy = base + [r("psld_suff", "gddim3", 20, 1000, 6.6), r("vp", "em-qs", 20, 1000, 6.8)]
    text = "\n".join(ps.goals(quiet, ["vp", "psld_suff"], 0))
    assert "NFE 20: PSLD 5.13 ± 0.15 (3 seeds)" in text and "PSLD better beyond seed noise" in text
    assert "(paired over 3 seeds)" in text
    disjoint = base + [r("psld_suff", "gddim3", 20, 1000, 5.3), r("psld_suff", "gddim3", 20, 2000, 5.1),
                       r("vp", "em-qs", 20, 3000, 6.8), r("vp", "em-qs", 20, 4000, 7.1)]
    assert "(Welch)" in "\n".join(ps.goals(disjoint, ["vp", "psld_suff"], 0))
    assert "Every repeated cell vs the best one" in text
    assert "  - VP-SDE, ε, em-qs: 6.97 ± 0.15 (3 seeds); Δ = +1.83" in text and "the best cell better beyond seed noise" in text
    assert "pf-heun-us: 6.30 vs 5.60 at NFE 250 (Δ +0.70: met)" in text  # vs gDDIM at its highest NFE (250, not 50)
    assert "within seed noise" in "\n".join(ps.goals(noisy, ["vp", "psld_suff"], 0))
    one_seed = "\n".join(ps.goals(base, ["vp", "psld_suff"], 0))
    assert "not decidable" in one_seed
    # the better mean wins the "best" slot, not the luckiest main seed
    lucky = quiet + [r("psld_eps", "gddim3", 20, 0, 4.9), r("psld_eps", "gddim3", 20, 1000, 9.0)]
    assert "NFE 20: PSLD 5.13" in "\n".join(ps.goals(lucky, ["vp", "psld_suff", "psld_eps"], 0))


def test_model_flags_and_validation():
    ps = _load()
    assert ps.model_flags("psld_sample_pc", 0.7)[-3:] == ["--input_preconditioning", "--sigma_data", "0.7000"]
    assert "--prediction_type" in ps.model_flags("psld_suff", 0.7)
    with pytest.raises(ValueError, match="unknown model"):
        ps.model_flags("psld_v", 0.7)
    tiers = ps.parse_study_plan("gddim3,pf-heun-us:20;pf-heun-us:100,250|psld_suff,psld_eps;gddim3:10@1000|vp")
    assert tiers[0] == {"samplers": ["gddim3", "pf-heun-us"], "nfes": [20], "seed": None, "models": None}
    assert tiers[1]["nfes"] == [100, 250] and tiers[1]["models"] == ["psld_suff", "psld_eps"]
    assert tiers[2]["seed"] == 1000 and tiers[2]["models"] == ["vp"]
    for bad, msg in (("gddim3", "expected 'samplers:nfes"), ("foo:20", "unknown sampler"),
                     ("gddim3:20|psld_v", "unknown model"), ("gddim3:x", "tier 'gddim3:x'")):
        with pytest.raises(ValueError, match=msg):
            ps.parse_study_plan(bad)
    with pytest.raises(SystemExit):
        ps.parse_args(["--plan", "gddim3:20|psld_v", "--sigma_data", "0.7"])
    args = ps.parse_args(["--precond_base", "psld_sample", "--sigma_data", "0.7"])
    assert args.models[-1] == "psld_sample_pc" and "psld_suff_pc" not in args.models
