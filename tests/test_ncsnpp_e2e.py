"""NCSN++ works wherever UNet2DModel works in this package: training (--model_preset ncsnpp-tiny, EMA, resume),
the saved pipeline (time_scale 1 recorded in the scheduler config), sampling, Tweedie inpainting, bits/dim,
classifier training input and the demo loader."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("train_psld_ncsnpp", REPO / "training" / "train_psld.py")
train_psld = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_psld)

TINY = ["--model_preset", "ncsnpp-tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
        "--eval_batch_size", "2", "--report_to", "none", "--lr_warmup_steps", "2", "--save_images_steps", "100"]


def losses(out):
    return [json.loads(line)["loss"] for line in open(Path(out) / "train_log.jsonl")]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ncsnpp_train")
    a, b = tmp / "a", tmp / "b"
    common = [*TINY, "--checkpointing_steps", "2", "--use_ema"]
    train_psld.main([*common, "--output_dir", str(a), "--max_train_steps", "4"])
    train_psld.main([*common, "--output_dir", str(b), "--max_train_steps", "2"])
    train_psld.main([*common, "--output_dir", str(b), "--max_train_steps", "4", "--resume_from_checkpoint", "latest"])
    return a, b


def test_training_resume_and_saved_pipeline(trained):
    from diffusers_psld.models import NCSNppModel
    from diffusers_psld.pipelines import PSLDPipeline

    a, b = trained
    assert losses(a) == losses(b) and len(losses(a)) == 4  # resume through the NCSN++ save/load hooks is exact
    assert json.loads((a / "checkpoint-2" / "unet_ema" / "config.json").read_text())["_class_name"] == "NCSNppModel"
    sched = json.loads((a / "scheduler" / "scheduler_config.json").read_text())
    assert sched["time_scale"] == 1.0  # the preset's raw-t convention, written where every sampler reads it
    pipe = PSLDPipeline.from_pretrained(str(a))
    assert isinstance(pipe.unet, NCSNppModel) and pipe.unet.config.sample_size == 8
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=3, output_type="np", generator=torch.Generator().manual_seed(0)).images
    assert img.shape == (2, 8, 8, 1)


def test_time_scale_flag_overrides_preset(tmp_path):
    args = train_psld.build_parser().parse_args([*TINY, "--output_dir", str(tmp_path / "x"), "--time_scale", "5"])
    train_psld.resolve_and_validate(args)
    assert args.time_scale == 5.0
    args = train_psld.build_parser().parse_args(["--model_preset", "digits", "--output_dir", str(tmp_path / "y")])
    train_psld.resolve_and_validate(args)
    assert args.time_scale == 1000.0  # UNet2DModel presets keep their default


def test_inpainting_likelihood_and_demo_with_ncsnpp(trained, monkeypatch):
    from diffusers_psld.evaluation.likelihood import bits_per_dim, eps_model_score_fn
    from diffusers_psld.pipelines import PSLDPipeline

    a, _ = trained
    pipe = PSLDPipeline.from_pretrained(str(a))
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 1, 8, 8)  # [0, 1], as the pipeline takes images
    mask = torch.zeros(1, 1, 8, 8)
    mask[..., :4] = 1.0
    out = pipe(batch_size=1, num_inference_steps=3, image=image, mask_image=mask, inpaint_correction="tweedie",
               output_type="pt", generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(out).all()
    assert torch.allclose(out[..., :4], image[..., :4], atol=1e-5)  # known pixels kept
    x = torch.randint(0, 256, (1, 1, 8, 8), dtype=torch.uint8)
    res = bits_per_dim(pipe.scheduler.sde, eps_model_score_fn(pipe.unet, pipe.scheduler), x,
                       generator=torch.Generator().manual_seed(0), rtol=1e-2, atol=1e-2)
    assert torch.isfinite(torch.as_tensor(res.bpd)).all()
    demo_spec = importlib.util.spec_from_file_location("demo_app_ncsnpp", REPO / "demo" / "app.py")
    demo = importlib.util.module_from_spec(demo_spec)
    demo_spec.loader.exec_module(demo)
    dpipe, msg = demo.load_pipeline(str(a))
    assert type(dpipe.unet).__name__ == "NCSNppModel" and "UNTRAINED" not in msg


@pytest.mark.parametrize("script", ["cifar10_ncsnpp.sh", "celeba64_ncsnpp.sh", "afhqv2_128_ncsnpp.sh"])
def test_paper_command_lines_parse(script):
    """training/configs/*_ncsnpp.sh: the flags are valid and select the NCSN++ preset with the raw-t time input."""
    import shlex

    tokens = shlex.split((REPO / "training" / "configs" / script).read_text().replace("\\\n", " "), comments=True)
    argv = [t for t in tokens[tokens.index("training/train_psld.py") + 1:] if t != "$@"]
    args = train_psld.build_parser().parse_args(argv)
    train_psld.resolve_and_validate(args)
    assert args.model_preset.startswith("ncsnpp-") and args.time_scale == 1.0
    assert args.resolution == {"cifar10_ncsnpp.sh": 32, "celeba64_ncsnpp.sh": 64, "afhqv2_128_ncsnpp.sh": 128}[script]


@pytest.mark.parametrize("mode,dtype", [("forward", "fp32"), ("train", "bf16"), ("sample", "fp32")])
def test_benchmark_worker_smoke(mode, dtype, tmp_path):
    """benchmarks/ncsnpp_forward.py: every mode (the GPU path's code, run on CPU with the tiny preset) and the writer."""
    spec_ = importlib.util.spec_from_file_location("ncsnpp_bench", REPO / "benchmarks" / "ncsnpp_forward.py")
    bench = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(bench)
    r = bench.worker(dict(preset="ncsnpp-tiny", batch=2, paper_batch=2, mode=mode, device="cpu", dtype=dtype,
                          channels_last=mode == "train", compile=False, nfe=3, threads=1, warmup=0, repeats=1))
    assert r["seconds"] > 0 and r["img_per_s"] > 0 and r["parameters"] == 192_134
    bench.write(str(tmp_path / "b"), [r], dict(command="x", machine="m", load_before=(0, 0, 0), threads=1, utc="now"))
    assert "`ncsnpp-tiny`" in (tmp_path / "b.md").read_text()
