"""End to end: training/evaluate.py on a tiny random-weight pipeline (report fields, resume, schedulers)."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from _scripts import load_script

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def _load_script():
    # training/evaluate.py under a unique name (a bare `import evaluate` could pick up HF's `evaluate` package)
    return load_script(os.path.join("training", "evaluate.py"), "psld_training_evaluate")


evaluate = _load_script()



def _tiny_unet():
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    from diffusers_psld.evaluation.features import DigitsFeatureNet
    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import PSLDScheduler

    root = tmp_path_factory.mktemp("eval")
    PSLDPipeline(unet=_tiny_unet(), scheduler=PSLDScheduler()).save_pretrained(str(root / "pipe"))
    torch.manual_seed(0)
    DigitsFeatureNet(image_size=8, feature_dim=16, width=8).save_pretrained(str(root / "fx"))
    return root


def _args(root, out, *extra):
    return ["--model_dir", str(root / "pipe"), "--output_dir", str(out), "--num_samples", "10", "--shard_size", "4",
            "--num_inference_steps", "3", "--feature_extractor", str(root / "fx"), "--is_splits", "2",
            "--num_reference", "300", *extra]


def test_report_fields_and_resume(workdir):
    out = workdir / "run1"
    rep = evaluate.main(_args(workdir, out, "--save_png", "--seed", "5"))
    with open(out / "report.json") as f:
        disk = json.load(f)
    for key in ("model", "num_samples", "fid", "is", "wall_time_s", "img_per_s_per_process", "metrics",
                "shards_generated", "shards_reused", "num_processes", "machine", "command"):
        assert key in disk, key
    assert disk["model"]["scheduler"] == "PSLDScheduler" and disk["model"]["sampler"] == "em"
    assert disk["model"]["num_inference_steps"] == 3 and disk["num_samples"] == 10
    assert disk["num_shards"] == 3 and disk["shards_generated"] == 3 and disk["shards_reused"] == 0
    assert disk["metrics"]["comparable_to_published"] is False
    assert disk["fid"] == pytest.approx(rep["fid"]) and disk["fid"] > 0 and disk["is"] >= 1.0
    assert disk["img_per_s_per_process"] > 0
    md = (out / "report.md").read_text()
    for word in ("FID", "IS", "NFE", "sampler", "NOT comparable", "img/s", "wall time"):
        assert word in md
    assert len(os.listdir(out / "png")) == 10
    assert sorted(os.listdir(out / "samples")) == [f"shard_{i:05d}.npz" for i in range(3)]

    # second run: nothing regenerated, identical metrics
    mtimes = {p: os.path.getmtime(out / "samples" / p) for p in os.listdir(out / "samples")}
    rep2 = evaluate.main(_args(workdir, out, "--seed", "5"))
    assert rep2["shards_generated"] == 0 and rep2["shards_reused"] == 3
    assert mtimes == {p: os.path.getmtime(out / "samples" / p) for p in os.listdir(out / "samples")}
    assert rep2["fid"] == pytest.approx(rep["fid"]) and rep2["is"] == pytest.approx(rep["is"])

    # a lost shard is the only one regenerated, with the same seed -> same images and FID
    os.remove(out / "samples" / "shard_00001.npz")
    rep3 = evaluate.main(_args(workdir, out, "--seed", "5"))
    assert rep3["shards_generated"] == 1 and rep3["shards_reused"] == 2
    assert rep3["fid"] == pytest.approx(rep["fid"], rel=1e-6)


def test_other_settings_in_the_same_output_dir_are_refused_or_regenerated(workdir):
    """Issue #13 §2: a rerun with another scheduler / NFE must not reuse the old shards and label them anew."""
    out = workdir / "mismatch"
    first = evaluate.main(_args(workdir, out, "--skip_metrics"))
    fp = first["model"]["fingerprint"]
    assert fp["num_inference_steps"] == 3 and fp["scheduler"] == "PSLDScheduler"
    assert list(fp["weights_sha256"]) == ["unet/diffusion_pytorch_model.safetensors"]
    before = {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()}
    for extra, field in [(("--num_inference_steps", "5"), "num_inference_steps"),
                         (("--scheduler", "sscs"), "scheduler"), (("--seed", "1"), "seed")]:
        args = _args(workdir, out, "--skip_metrics")
        i = args.index("--num_inference_steps")
        args = args[:i] + args[i + 2:] + (["--num_inference_steps", "3"] if extra[0] != "--num_inference_steps" else [])
        with pytest.raises(evaluate.fidmod.ShardMismatchError, match=field):
            evaluate.main(args + list(extra))
        assert {p.name: p.stat().st_mtime_ns for p in (out / "samples").iterdir()} == before  # nothing touched
    # the CLI says so without a traceback
    proc = subprocess.run([sys.executable, os.path.join(ROOT, "training", "evaluate.py"),
                           *_args(workdir, out, "--skip_metrics", "--scheduler", "sscs")],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode != 0 and "error:" in proc.stderr and "Traceback" not in proc.stderr
    assert "--regenerate_mismatched_shards" in proc.stderr
    # explicit opt-in: regenerated, and the report is the one of a fresh folder
    rep = evaluate.main(_args(workdir, out, "--scheduler", "sscs", "--regenerate_mismatched_shards"))
    assert rep["shards_generated"] == 3 and rep["shards_regenerated_other_settings"] == 3 and rep["shards_reused"] == 0
    fresh = evaluate.main(_args(workdir, workdir / "mismatch_fresh", "--scheduler", "sscs"))
    assert rep["fid"] == pytest.approx(fresh["fid"], rel=1e-9)
    assert "overwritten: other settings" in (out / "report.md").read_text()


def test_scheduler_swap_and_bare_layout(workdir):
    rep = evaluate.main(_args(workdir, workdir / "sscs", "--scheduler", "sscs", "--striding", "quadratic",
                              "--skip_metrics"))
    assert rep["model"]["scheduler"] == "SSCSScheduler" and rep["model"]["sampler"] == "sscs"
    assert rep["model"]["striding"] == "quadratic" and rep["fid"] is None
    rep = evaluate.main(_args(workdir, workdir / "heun", "--sampler", "pf_heun", "--skip_metrics"))
    assert rep["model"]["scheduler"] == "PSLDScheduler" and rep["model"]["sampler"] == "pf_heun"
    assert rep["model"]["project_eps"] is False
    rep = evaluate.main(_args(workdir, workdir / "heun_pe", "--sampler", "pf_heun", "--project_eps", "--skip_metrics"))
    assert rep["model"]["project_eps"] is True and rep["model"]["scheduler_config"]["project_eps"] is True
    for name, cls, sampler in (("gddim", "GDDIMMultistepScheduler", "gddim_multistep"),
                               ("splitting", "SplittingScheduler", "roba")):
        extra = ("--sampler", sampler) if name == "splitting" else ()
        rep = evaluate.main(_args(workdir, workdir / name, "--scheduler", name, *extra, "--skip_metrics"))
        assert rep["model"]["scheduler"] == cls and rep["model"]["sampler"] == sampler
    # unet/ + scheduler/ without model_index.json: the same PSLDPipeline loop, built from the two components
    bare = workdir / "bare"
    shutil.copytree(workdir / "pipe", bare)
    os.remove(bare / "model_index.json")
    rep_b = evaluate.main(["--model_dir", str(bare), "--output_dir", str(workdir / "bare_out"), "--num_samples", "4",
                           "--shard_size", "4", "--num_inference_steps", "3", "--skip_metrics"])
    evaluate.main(["--model_dir", str(workdir / "pipe"), "--output_dir", str(workdir / "pipe_out"),
                           "--num_samples", "4", "--shard_size", "4", "--num_inference_steps", "3", "--skip_metrics"])
    assert rep_b["model"]["model_layout"].startswith("unet/")
    from diffusers_psld.evaluation.fid import load_shards

    a = load_shards(str(workdir / "bare_out" / "samples"), 4, 4)["images"].int()
    b = load_shards(str(workdir / "pipe_out" / "samples"), 4, 4)["images"].int()
    assert torch.equal(a, b)  # same seed, same sampler, one sampling path: identical


def test_train_feature_extractor_on_the_fly(workdir):
    out = workdir / "fx_fly"
    rep = evaluate.main(["--model_dir", str(workdir / "pipe"), "--output_dir", str(out), "--num_samples", "8",
                         "--shard_size", "8", "--num_inference_steps", "2", "--is_splits", "2",
                         "--feature_extractor_epochs", "1", "--num_reference", "200"])
    assert os.path.isfile(out / "feature_extractor" / "diffusion_pytorch_model.safetensors")
    assert rep["fid"] is not None


def test_likelihood_option(workdir):
    out = workdir / "lik"
    rep = evaluate.main(_args(workdir, out, "--skip_metrics", "--likelihood_samples", "2", "--likelihood_method",
                              "euler", "--likelihood_eps", "1e-3"))
    lk = rep["likelihood"]
    assert lk["num_images"] == 2 and lk["entropy_correction"] is True and lk["nfe_per_batch"] == [100]
    assert lk["bpd_mean"] == lk["bpd_mean"]  # finite, not NaN
    assert "bits/dim" in (out / "report.md").read_text()


def test_cli_errors(workdir):
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model_dir", "x", "--output_dir", "y", "--scheduler", "sscs", "--sampler", "em"])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model_dir", "x", "--output_dir", "y", "--sampler", "roba"])  # a splitting sampler
    # used only after sampling: checked before any shard is generated
    for extra in (["--reference", "nope"], ["--feature_extractor", str(workdir / "missing_fx")],
                  ["--feature_extractor", __file__]):
        with pytest.raises(SystemExit):
            evaluate.parse_args(["--model_dir", "x", "--output_dir", "y", *extra])
    with pytest.raises(SystemExit):
        evaluate.parse_args(["--model_dir", "x", "--output_dir", "y", "--num_samples", "0"])
    with pytest.raises(ValueError, match="model_dir"):
        evaluate.main(["--model_dir", str(workdir / "missing"), "--output_dir", str(workdir / "e")])
    with pytest.raises(ValueError, match="reference"):
        evaluate.load_reference("bogus", [8, 8], 1)


@pytest.mark.slow
def test_two_process_accelerate_run(workdir):
    """Two real CPU ranks (ACCELERATE_USE_CPU=1 + --multi_gpu): shards split by rank, report on rank 0 only."""
    out = workdir / "ddp"
    env = dict(os.environ, ACCELERATE_USE_CPU="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
           os.path.join(ROOT, "training", "evaluate.py"), *_args(workdir, out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rep = json.loads((out / "report.json").read_text())
    assert rep["num_processes"] == 2
    per = rep["per_process"]
    assert sorted(i for s in per for i in s["generated"]) == [0, 1, 2]
    assert per[0]["generated"] == [0, 2] and per[1]["generated"] == [1]
    # identical to a single-process run with the same seeds
    single = evaluate.main(_args(workdir, workdir / "single"))
    assert single["fid"] == pytest.approx(rep["fid"], rel=1e-5)
