"""training/convert_official_checkpoint.py end to end: fake official Lightning checkpoints built from the equivalence
fixture (official weights + outputs) convert with one command, load with PSLDPipeline.from_pretrained, reproduce
the official outputs and sample with every scheduler class of the package; unsafe pickles are refused."""
import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from diffusers_psld.models import NCSNppClassifier, NCSNppModel
from diffusers_psld.pipelines import PSLDPipeline
from diffusers_psld.schedulers import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                                       SSCSScheduler)

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "tests" / "fixtures" / "ncsnpp"
META = json.loads((FIXTURES / "variants.json").read_text())["variants"]
_spec = importlib.util.spec_from_file_location("convert_official_checkpoint",
                                               REPO / "training" / "convert_official_checkpoint.py")
conv = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(conv)


class NotData:  # a custom class inside a checkpoint: must never be unpickled
    pass


def fixture(name):
    t = load_file(FIXTURES / f"{name}.safetensors")
    return {k: v for k, v in t.items() if k.startswith("all_modules.")}, t


def fake_lightning_ckpt(path, name, prefix=("score_fn.", "ema_score_fn."), extra=None):
    """A checkpoint laid out like PyTorch Lightning 1.9 + the official SDEWrapper: EMA = fixture weights, online =
    perturbed copies, plus optimizer / loop / callback state (tensors and plain containers, no hyper-parameters)."""
    official, _ = fixture(name)
    sd = {}
    for k, v in official.items():
        if len(prefix) == 2:
            sd[prefix[0] + k] = v + 0.01
            sd[prefix[1] + k] = v
        else:
            sd[prefix[0] + k] = v
    ckpt = {"epoch": 7, "global_step": 1234, "pytorch-lightning_version": "1.9.0", "state_dict": sd,
            "optimizer_states": [{"state": {0: {"step": torch.tensor(5.0), "exp_avg": torch.zeros(3)}},
                                  "param_groups": [{"lr": 2e-4, "betas": (0.9, 0.999), "eps": 1e-8, "params": [0]}]}],
            "lr_schedulers": [{"base_lrs": [2e-4], "last_epoch": 1234, "lr_lambdas": [None]}],
            "loops": {"fit_loop": {"state_dict": {}, "epoch_loop.state_dict": {"_batches_that_stepped": 1234}}},
            "callbacks": {"ModelCheckpoint{'monitor': None}": {"best_model_score": None, "kth_value": torch.tensor(1.0),
                                                              "dirpath": "/home/x/checkpoints", "best_k_models": {}}}}
    ckpt.update(extra or {})
    torch.save(ckpt, path)
    return path


def _fmt(v):
    if isinstance(v, bool):
        return "True" if v else "False"
    if isinstance(v, list):
        return "[" + ",".join(str(x) for x in v) + "]"
    if isinstance(v, str):
        return f"\\'{v}\\'"
    return str(v)


def official_script(path, name, sde, section="diffusion", fn_key="score_fn", extra_lines=()):
    """A shell script in the official scripts_psld/ style (Hydra overrides with escaped quotes, continuations)."""
    v = META[name]
    lines = ["python main/eval/sample.py +dataset=cifar10/cifar10_psld \\",
             f"    dataset.{section}.data.image_size={v['image_size']} \\",
             "    dataset.diffusion.evaluation.chkpt_path=\\'/home/someone/results/x.ckpt\\' \\"]
    for k, val in v["official_config"].items():
        if k != "name":
            lines.append(f"    dataset.{section}.model.{fn_key}.{k}={_fmt(val)} \\")
    for k, val in sde.items():
        lines.append(f"    dataset.diffusion.model.sde.{k}={_fmt(val)} \\")
    lines += [f"    {x} \\" for x in extra_lines]
    lines.append("    dataset.diffusion.evaluation.n_samples=16")
    Path(path).write_text("\n".join(lines) + "\n")
    return str(path)


PSLD_SDE = dict(name="psld", gamma=0.01, nu=4.01, beta_min=8.0, beta_max=8.0, kappa=0.04, decomp_mode="lower")


def run(tmp_path, *argv):
    return conv.main([str(a) for a in argv])


@pytest.fixture(scope="module")
def converted_psld(tmp_path_factory):
    """cifar10-layout PSLD network + the fixture classifier, converted with one command."""
    tmp = tmp_path_factory.mktemp("conv")
    ckpt = fake_lightning_ckpt(tmp / "psld-hsm_gamma=0.01_nu=4.01_cifar10-epoch=07-loss=0.0201.ckpt", "cifar10")
    clf = fake_lightning_ckpt(tmp / "ncsnpp_clf-tclf_gamma=0.01_nu=4.01-epoch=299.ckpt", "classifier", prefix=("clf_fn.",))
    script = official_script(tmp / "sample.sh", "cifar10", PSLD_SDE)
    clf_script = official_script(tmp / "clf.sh", "classifier", {}, section="clf", fn_key="clf_fn")
    out = tmp / "pipe"
    info = conv.main(["--checkpoint", str(ckpt), "--official_script", script, "--output_dir", str(out),
                      "--dataset", "cifar10", "--classifier_checkpoint", str(clf), "--official_script", clf_script])
    return out, info, ckpt


def test_one_command_gives_exact_pipeline(converted_psld):
    out, info, ckpt = converted_psld
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "classifier/diffusion_pytorch_model.safetensors", "README.md", "conversion.json"):
        assert (out / f).exists(), f
    idx = json.loads((out / "model_index.json").read_text())
    assert idx["unet"] == ["diffusers_psld.models.ncsnpp", "NCSNppModel"]
    sched = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert sched["time_scale"] == 1.0 and sched["gamma"] == 0.01 and sched["nu"] == 4.01
    assert sched["beta_min"] == sched["beta_max"] == 8.0 and sched["kappa"] == 0.04
    assert info["checkpoint"]["epoch"] == 7 and info["checkpoint"]["weights"].startswith("ema")
    from huggingface_hub import ModelCard

    meta = ModelCard.load(out / "README.md").data
    assert meta.library_name == "diffusers" and meta.datasets == ["cifar10"] and "psld-official" in meta.tags
    card = (out / "README.md").read_text()
    assert "mandt-lab/PSLD" in card and info["checkpoint"]["sha256"] in card and "not trained with diffusers-psld" in card

    pipe = PSLDPipeline.from_pretrained(str(out))
    assert isinstance(pipe.unet, NCSNppModel) and isinstance(pipe.classifier, NCSNppClassifier)
    _, t = fixture("cifar10")
    with torch.no_grad():  # EMA weights = the official network: same output as the official run
        y = pipe.unet(t["input.sample"], pipe.scheduler.model_time(t["input.timestep"].double(), 2)).sample
    assert (y - t["output"]).abs().max() <= 1e-5
    _, tc = fixture("classifier")
    with torch.no_grad():
        logits = pipe.classifier(tc["input.sample"], tc["input.timestep"])
    assert (logits - tc["output"]).abs().max() <= 1e-5


def test_online_weights_flag(converted_psld, tmp_path):
    _, _, ckpt = converted_psld
    script = official_script(tmp_path / "s.sh", "cifar10", PSLD_SDE)
    run(tmp_path, "--checkpoint", ckpt, "--official_script", script, "--output_dir", tmp_path / "o", "--weights", "online")
    pipe = PSLDPipeline.from_pretrained(str(tmp_path / "o"))
    official, _ = fixture("cifar10")
    w = pipe.unet.state_dict()["encoder.conv_in.weight"]
    assert torch.allclose(w, official["all_modules.3.weight"] + 0.01)  # online = fixture + 0.01 in the fake ckpt


SCHEDULERS = [(PSLDScheduler, dict(sampler="em")), (PSLDScheduler, dict(sampler="pf_euler")),
              (PSLDScheduler, dict(sampler="pf_heun")), (PSLDScheduler, dict(sampler="sscs", striding="quadratic")),
              (SSCSScheduler, {}), (GDDIMMultistepScheduler, {}), (ConjugateScheduler, {}), (SplittingScheduler, {})]


@pytest.mark.parametrize("cls,kw", SCHEDULERS, ids=lambda x: getattr(x, "__name__", str(x)))
def test_samples_with_every_scheduler_and_raw_time(converted_psld, cls, kw):
    out, _, _ = converted_psld
    pipe = PSLDPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **kw)
    assert pipe.scheduler.config.time_scale == 1.0  # survives cross-class from_config (non-default value)
    seen = []
    fwd = pipe.unet.forward
    pipe.unet.forward = lambda sample, timestep, *a, **k: (seen.append(torch.as_tensor(timestep)), fwd(sample, timestep, *a, **k))[1]
    img = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert img.shape == (2, 3, 16, 16) and torch.isfinite(img).all()
    ts = torch.cat([s.reshape(-1) for s in seen])
    assert len(seen) == 4 and ts.max() <= 1.0 and ts.min() >= 1e-3 - 1e-9  # the raw forward t, like the official net


def test_classifier_guidance_runs(converted_psld):
    out, _, _ = converted_psld
    pipe = PSLDPipeline.from_pretrained(str(out))
    pipe.set_progress_bar_config(disable=True)
    img = pipe(batch_size=2, num_inference_steps=3, class_labels=2, guidance_scale=1.0, output_type="pt",
               generator=torch.Generator().manual_seed(0)).images
    assert torch.isfinite(img).all()


def test_cld_and_vp_checkpoints(tmp_path):
    """Γ = 0 (official out_ch = C: ε_m only) and VP (k = 1) networks."""
    ckpt = fake_lightning_ckpt(tmp_path / "cld.ckpt", "cld")
    sde = dict(PSLD_SDE, gamma=0, nu=4.0)
    run(tmp_path, "--checkpoint", ckpt, "--official_script", official_script(tmp_path / "c.sh", "cld", sde),
        "--output_dir", tmp_path / "cld", "--model_preset", "ncsnpp-afhqv2-128")
    pipe = PSLDPipeline.from_pretrained(str(tmp_path / "cld"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.unet.config.output_momentum_only and pipe.scheduler.config.gamma == 0.0
    _, t = fixture("cld")
    with torch.no_grad():
        y = pipe.unet(t["input.sample"], t["input.timestep"]).sample
    assert torch.equal(y[:, :3], torch.zeros_like(y[:, :3])) and (y[:, 3:] - t["output"]).abs().max() <= 1e-5
    for cls in (PSLDScheduler, SSCSScheduler):
        pipe.scheduler = cls.from_config(pipe.scheduler.config)
        assert torch.isfinite(pipe(batch_size=1, num_inference_steps=3, output_type="pt").images).all()

    ckpt = fake_lightning_ckpt(tmp_path / "vp.ckpt", "vp")
    vp = dict(name="vpsde", beta_min=0.1, beta_max=20.0)
    run(tmp_path, "--checkpoint", ckpt, "--official_script", official_script(tmp_path / "v.sh", "vp", vp),
        "--output_dir", tmp_path / "vp", "--model_preset", "ncsnpp-cifar10")
    pipe = PSLDPipeline.from_pretrained(str(tmp_path / "vp"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.diffusion == "vp" and pipe.scheduler.config.time_scale == 1.0
    assert pipe(batch_size=1, num_inference_steps=3, output_type="pt").images.shape == (1, 3, 16, 16)


def test_errors_are_named(tmp_path, converted_psld):
    _, _, ckpt = converted_psld
    script = official_script(tmp_path / "s.sh", "cifar10", PSLD_SDE)
    with pytest.raises(SystemExit, match="--gamma.*says 0.01"):  # file name says gamma=0.01
        run(tmp_path, "--checkpoint", ckpt, "--official_script", script, "--output_dir", tmp_path / "a", "--gamma", 0.02)
    with pytest.raises(SystemExit, match="does not match this architecture"):  # preset nf 128 vs fixture nf 8
        run(tmp_path, "--checkpoint", ckpt, "--dataset", "cifar10", "--output_dir", tmp_path / "b")
    with pytest.raises(SystemExit, match="out_ch"):  # Γ > 0 with an ε_m-only network
        run(tmp_path, "--checkpoint", ckpt, "--official_script", script, "--output_dir", tmp_path / "c",
            "--override", "dataset.diffusion.model.score_fn.out_ch=3", "--ignore_filename")
    with pytest.raises(SystemExit, match="KEY=VALUE"):
        run(tmp_path, "--checkpoint", ckpt, "--dataset", "cifar10", "--output_dir", tmp_path / "d", "--override", "nf")
    with pytest.raises(SystemExit, match="not a file"):
        run(tmp_path, "--checkpoint", tmp_path / "missing.ckpt", "--dataset", "cifar10", "--output_dir", tmp_path / "e")


def test_yaml_config_source(tmp_path, converted_psld):
    """Settings from a run's .hydra/config.yaml (dataset: {diffusion: …}) instead of a script."""
    import yaml

    _, _, ckpt = converted_psld
    v = META["cifar10"]
    cfg = {"dataset": {"diffusion": {"data": {"image_size": v["image_size"], "name": "cifar10"},
                                     "model": {"score_fn": v["official_config"], "sde": PSLD_SDE}}}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    run(tmp_path, "--checkpoint", ckpt, "--config", tmp_path / "config.yaml", "--output_dir", tmp_path / "y",
        "--model_preset", "ncsnpp-cifar10")
    assert PSLDPipeline.from_pretrained(str(tmp_path / "y")).unet.config.nf == 8


def test_only_weights_only_loading(tmp_path):
    """NumPy scalars (data) load through the allow-list; a custom class is refused, never unpickled."""
    ok = fake_lightning_ckpt(tmp_path / "np.ckpt", "vp", extra={"callbacks": {"x": {"score": np.float64(0.5)}}})
    assert conv.load_checkpoint(str(ok))["callbacks"]["x"]["score"] == 0.5
    bad = fake_lightning_ckpt(tmp_path / "bad.ckpt", "vp", extra={"hyper_parameters": {"obj": NotData()}})
    with pytest.raises(SystemExit, match="not unpickled"):
        conv.load_checkpoint(str(bad))


def _deep(n):
    x = []
    for _ in range(n):
        x = [x]
    return x


def _save_deep(path, obj):
    import sys

    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(100_000)  # torch.save pickles recursively
    try:
        torch.save(obj, path)
    finally:
        sys.setrecursionlimit(limit)


BAD_FILES = {
    "empty": (lambda p: p.write_bytes(b""), r"is empty \(0 bytes\): not a checkpoint"),
    "text": (lambda p: p.write_text("epoch: 7\nthis is a README\n"),
             r"is not a PyTorch checkpoint: a text file \(it starts with 'epoch: 7\\nthis is a README\\n'\)"),
    "4_bytes": (lambda p: p.write_bytes(b"\x01\x02\x03\x04"),
                r"is not a PyTorch checkpoint: 4 bytes of another format \(they start with 01 02 03 04\)"),
    "truncated_pickle": (lambda p: p.write_bytes(b"\x80\x02\x8a\x0a"), r"is truncated or corrupt: .*\(EOFError\)"),
    "random_bytes": (lambda p: p.write_bytes(np.random.default_rng(0).bytes(4096)), r"is not a PyTorch checkpoint: 4,096 bytes"),
    "random_pickle_bytes": (lambda p: p.write_bytes(b"\x80\x02" + np.random.default_rng(1).bytes(4094)),
                            r"is truncated or corrupt: .*UnpicklingError"),
    "truncated_zip": (lambda p: p.write_bytes(_zip_head(p)), r"is truncated or corrupt"),
    "deep_list": (lambda p: _save_deep(p, _deep(20000)), r"nests containers more than 100 levels deep"),
    "deep_hyper_parameters": (lambda p: _save_deep(p, {"state_dict": {}, "hyper_parameters": {"config": _deep(20000)}}),
                              r"nests containers more than 100 levels deep"),
}


def _zip_head(p):
    torch.save({"state_dict": {"a": torch.zeros(1000)}}, p)
    data = p.read_bytes()
    return data[: len(data) // 2]


@pytest.mark.parametrize("kind", list(BAD_FILES))
def test_bad_files_give_one_line_naming_what_the_file_is(tmp_path, kind):
    """Empty, text, junk, truncated, random bytes, hostile nesting: one `error: --checkpoint: ...` line each; random
    bytes are never described as a pickle that "could run code"."""
    make, pattern = BAD_FILES[kind]
    path = tmp_path / "x.ckpt"
    make(path)
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--checkpoint", path, "--dataset", "cifar10", "--output_dir", tmp_path / "out")
    msg = str(info.value)
    assert msg.startswith(f"error: --checkpoint: {str(path)!r} ") and "\n" not in msg, msg
    assert __import__("re").search(pattern, msg), msg
    assert "could run code" not in msg, msg
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kind", ["nan", "inf", "int64", "not_a_tensor"])
def test_unusable_weights_are_refused_naming_the_tensor(tmp_path, kind):
    """A NaN / inf weight (it failed only later, at sampling) or an int64 one (it was cast to float silently) is
    refused at conversion time, naming the tensor; nothing is written."""
    official, _ = fixture("cifar10")
    name = sorted(k for k, v in official.items() if v.ndim == 4)[0]
    bad = {"nan": lambda v: v.clone().reshape(-1).index_fill_(0, torch.tensor([0]), float("nan")).reshape(v.shape),
           "inf": lambda v: v.clone().fill_(float("-inf")),
           "int64": lambda v: v.round().long(),
           "not_a_tensor": lambda v: v.tolist()}[kind]
    ckpt = fake_lightning_ckpt(tmp_path / "psld-gamma=0.01_nu=4.01.ckpt", "cifar10")
    data = torch.load(ckpt, weights_only=True)
    data["state_dict"]["ema_score_fn." + name] = bad(data["state_dict"]["ema_score_fn." + name])
    torch.save(data, ckpt)
    script = official_script(tmp_path / "s.sh", "cifar10", PSLD_SDE)
    with pytest.raises(SystemExit) as info:
        run(tmp_path, "--checkpoint", ckpt, "--official_script", script, "--output_dir", tmp_path / "out")
    msg = str(info.value)
    want = {"nan": "holds 1 NaN and 0 ±inf values", "inf": "holds 0 NaN and", "int64": "has dtype torch.int64",
            "not_a_tensor": "is a list, not a tensor"}[kind]
    assert msg.startswith("error: --checkpoint: the official state dict holds values that cannot be network weights")
    assert f"'{name}' {want}" in msg and "\n" not in msg, msg
    assert not (tmp_path / "out").exists()
