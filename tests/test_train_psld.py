"""training/train_psld.py: tiny end-to-end runs (in-process), resume determinism, atomic checkpoints,
NaN stop, flag validation, Hub push with a stub (2-process runs: test_train_multiprocess.py)."""
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_psld.py"
_spec = importlib.util.spec_from_file_location("train_psld", SCRIPT)
train_psld = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(train_psld)

TINY = ["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
        "--eval_batch_size", "4", "--report_to", "none", "--lr_warmup_steps", "2"]



def run(out, *extra):
    return train_psld.main([*TINY, "--output_dir", str(out), *map(str, extra)])


def losses(out):
    return [json.loads(line) for line in open(Path(out) / "train_log.jsonl")]


def test_tiny_run_produces_loadable_pipeline_card_and_grid(tmp_path):
    from huggingface_hub import ModelCard

    from diffusers_psld import PSLDScheduler
    from diffusers_psld.pipelines import PSLDPipeline

    out = tmp_path / "run"
    res = run(out, "--max_train_steps", 3, "--checkpointing_steps", 2, "--save_images_steps", 2)
    assert res["global_step"] == 3
    for f in ("model_index.json", "unet/diffusion_pytorch_model.safetensors", "scheduler/scheduler_config.json",
              "README.md", "samples.png", "samples/step-0000002.png", "loss_curve.png", "checkpoint-2/unet_ema/config.json"):
        assert (out / f).exists(), f
    assert not list(out.glob(".tmp-*"))
    pipe = PSLDPipeline.from_pretrained(str(out))
    assert isinstance(pipe.scheduler, PSLDScheduler) and pipe.scheduler.config.sampler == "sscs"
    assert pipe.scheduler.config.striding == "quadratic"  # the README's advice for k = 2 models is the saved default
    assert json.load(open(out / "training_args.json"))["striding"] == "quadratic"
    assert pipe.unet.config.in_channels == 2 and pipe.unet.config.sample_size == 8
    imgs = pipe(batch_size=2, num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="np").images
    assert imgs.shape[:3] == (2, 8, 8)
    card = ModelCard.load(out / "README.md")
    assert card.data.library_name == "diffusers" and card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.datasets == ["sklearn-digits"]
    log = losses(out)
    assert [r["step"] for r in log] == [1, 2, 3] and log[0]["lr"] == 0.0  # warm-up from 0, like the paper


@pytest.mark.parametrize("diffusion", ["cld", "vp"])
def test_cld_and_vp_runs(tmp_path, diffusion):
    from diffusers_psld.pipelines import PSLDPipeline

    out = tmp_path / diffusion
    run(out, "--diffusion", diffusion, "--max_train_steps", 2, "--checkpointing_steps", 100, "--save_images_steps", 100)
    pipe = PSLDPipeline.from_pretrained(str(out))
    k = 1 if diffusion == "vp" else 2
    assert pipe.unet.config.in_channels == k and pipe.scheduler.num_components == k
    if diffusion == "cld":
        assert pipe.scheduler.config.gamma == 0.0 and pipe.scheduler.config.nu == 4.0
        assert losses(out)[0]["loss_eps_m"] > 0
        assert pipe.scheduler.config.striding == "quadratic"
    else:
        assert pipe.scheduler.config.diffusion == "vp" and pipe.scheduler.sde.beta_max == 20.0
        assert pipe.scheduler.config.striding == "uniform"


def test_class_conditional_run(tmp_path):
    from diffusers_psld.pipelines import PSLDPipeline

    out = tmp_path / "cc"
    run(out, "--class_conditional", "--max_train_steps", 2, "--checkpointing_steps", 100, "--save_images_steps", 100)
    pipe = PSLDPipeline.from_pretrained(str(out))
    assert pipe.unet.config.num_class_embeds == 11  # 10 digits + null class


def test_resume_gives_identical_loss_trajectory(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--checkpointing_steps", 4, "--save_images_steps", 100, "--gradient_accumulation_steps", 2]
    run(a, "--max_train_steps", 10, *common)
    run(b, "--max_train_steps", 5, *common)  # "interrupted" after step 5; last checkpoint is step 4
    with open(b / "train_log.jsonl", "a") as f:  # a line past the checkpoint must be rewritten on resume
        f.write(json.dumps({"step": 5, "loss": 123.0}) + "\n")
    run(b, "--max_train_steps", 10, "--resume_from_checkpoint", "latest", *common)
    la, lb = losses(a), losses(b)
    assert [r["step"] for r in lb] == list(range(1, 11))
    assert [r["loss"] for r in la] == [r["loss"] for r in lb]  # exact float equality
    assert [r["lr"] for r in la] == [r["lr"] for r in lb]
    from safetensors.torch import load_file

    wa = load_file(a / "unet" / "diffusion_pytorch_model.safetensors")
    wb = load_file(b / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_crash_between_temp_write_and_rename_keeps_previous_checkpoint(tmp_path):
    out = tmp_path / "crash"
    with pytest.raises(RuntimeError, match="injected crash"):
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--save_images_steps", 100,
            "--_crash_before_rename_at_step", 4)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert (out / ".tmp-checkpoint-4").is_dir() and not (out / "checkpoint-4").exists()
    assert [s for s, _ in train_psld.list_checkpoints(str(out))] == [2]
    res = run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--save_images_steps", 100,
              "--resume_from_checkpoint", "latest")
    assert res["global_step"] == 6 and (out / "checkpoint-6").is_dir()
    assert [r["step"] for r in losses(out)] == [1, 2, 3, 4, 5, 6]


def test_nan_loss_stops_with_step_named(tmp_path):
    out = tmp_path / "nan"
    with pytest.raises(FloatingPointError, match="at step 3") as info:
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--save_images_steps", 100, "--_inject_nan_at_step", 3)
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    assert "checkpoint-2" in str(info.value) and (out / "checkpoint-2").is_dir()
    assert not (out / "model_index.json").exists()
    from tqdm.auto import tqdm

    # the progress bar was closed on the way out; unclosed, it is printed again after the pytest summary
    assert not [b for b in list(tqdm._instances) if not b.disable], "an unclosed progress bar survived the stop"


def _folder(tmp_path, n=2):
    import numpy as np
    import PIL.Image

    d = tmp_path / "imgs" / "a"
    d.mkdir(parents=True)
    for i in range(n):
        PIL.Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(d / f"{i}.png")
    return str(tmp_path / "imgs")


@pytest.mark.parametrize("extra,flag", [
    (["--resolution", "7"], "--resolution"),
    (["--model_preset", "digits", "--resolution", "10"], "--resolution"),
    (["--model_preset", "huge"], "--model_preset"),
    (["--gamma", "-0.1"], "--gamma"),
    (["--nu", "0.005"], "--nu"),
    (["--diffusion", "cld", "--gamma", "0.5"], "--gamma"),
    (["--diffusion", "vp", "--gamma", "0.5"], "--gamma"),
    (["--beta", "-1"], "--beta"),
    (["--kappa", "0"], "--kappa"),
    (["--learning_rate", "0"], "--learning_rate"),
    (["--cond_drop_prob", "1.5"], "--cond_drop_prob"),
    (["--resume_from_checkpoint", "/nonexistent/checkpoint-3"], "--resume_from_checkpoint"),
    (["--image_column", "img"], "--image_column"),
    (["--resolution", "100000"], "--resolution"),  # was OOM-killed at 24 GiB in the data pre-resize
    (["--time_scale", "inf"], "--time_scale"),  # was NaN at step 1
    (["--time_scale", "0"], "--time_scale"),
    (["--num_threads", "0"], "--num_threads"),
    (["--seed", "-1"], "--seed"),
    (["--allow_changed_settings", "nu"], "--allow_changed_settings"),
    (["--allow_changed_settings", "no_such_flag"], "--allow_changed_settings"),
])
def test_bad_flags_named(tmp_path, extra, flag):
    with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
        run(tmp_path / "bad", "--max_train_steps", 1, *extra)


def test_bad_data_and_output_dir_named(tmp_path):
    from accelerate.state import AcceleratorState

    blocker = tmp_path / "file"
    blocker.write_text("x")
    cases = [
        (["--output_dir", str(blocker / "out")], "--output_dir"),
        (["--train_data_dir", _folder(tmp_path), "--image_column", "photo", "--cache_dir", str(tmp_path / "c")], "--image_column"),
        (["--train_data_dir", _folder(tmp_path / "x"), "--cache_dir", str(tmp_path / "c2")], "--train_batch_size"),
    ]
    for extra, flag in cases:
        args = [*TINY, "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1", *extra]
        with pytest.raises(ValueError, match=flag.replace("-", r"\-")):
            train_psld.main(args)
        AcceleratorState._reset_state(reset_partial_state=True)


def test_data_errors_take_the_clean_flag_path(tmp_path, monkeypatch):
    """Empty folder, a non-image .png, an offline Hub data set: `ValueError` naming the flag (→ `error: ...`)."""
    import numpy as np
    import PIL.Image
    from accelerate.state import AcceleratorState

    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "notes.txt").write_text("no images here")
    bad = tmp_path / "bad" / "a"
    bad.mkdir(parents=True)
    for i in range(3):
        PIL.Image.fromarray(np.full((8, 8, 3), 30 * i, np.uint8)).save(bad / f"{i}.png")
    (bad / "fake.png").write_text("not an image")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cases = [
        (["--train_data_dir", str(empty)], r"--train_data_dir.*contains no image files"),
        (["--train_data_dir", str(tmp_path / "bad"), "--train_batch_size", "1"], r"--train_data_dir.*1 of 4 image files.*fake\.png"),
        (["--dataset_name", "cifar10"], r"--dataset_name` 'cifar10' could not be loaded.*offline mode is on"),
    ]
    for extra, pattern in cases:
        args = [*TINY, "--output_dir", str(tmp_path / "o"), "--max_train_steps", "1", "--cache_dir", str(tmp_path / "c"), *extra]
        with pytest.raises(ValueError, match=pattern):
            train_psld.main(args)
        AcceleratorState._reset_state(reset_partial_state=True)


def test_script_prints_one_error_line_for_bad_data(tmp_path):
    """The command line path: exit code 2 and `error: --flag ...`, no traceback."""
    empty = tmp_path / "empty"
    empty.mkdir()
    p = subprocess.run([sys.executable, str(SCRIPT), "--train_data_dir", str(empty), "--output_dir", str(tmp_path / "o")],
                       env=_env(), capture_output=True, text=True, timeout=600, cwd=str(tmp_path))
    assert p.returncode == 2, p.stderr[-2000:]
    assert p.stderr.strip().startswith("error: `--train_data_dir`") and "Traceback" not in p.stderr, p.stderr[-2000:]


def test_missing_tensorboard_is_recorded_as_what_really_happened(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    out = tmp_path / "tb"
    train_psld.main([*TINY, "--output_dir", str(out), "--max_train_steps", "1", "--checkpointing_steps", "100",
                     "--save_images_steps", "100", "--report_to", "tensorboard"])
    err = capsys.readouterr().err
    assert "TensorBoard is not installed" in err
    args = json.loads((out / "training_args.json").read_text())
    assert args["report_to"] == "none" and args["report_to_requested"] == "tensorboard"
    assert "tensorboard was requested but is not installed" in (out / "README.md").read_text()
    assert not (out / "logs").exists()


def test_default_num_threads_leaves_a_core_free(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    assert train_psld.default_num_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0})
    assert train_psld.default_num_threads() == 1
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    assert train_psld.default_num_threads() == 15
    monkeypatch.setenv("OMP_NUM_THREADS", "3")  # an explicit user choice wins
    assert train_psld.default_num_threads() == 3


def test_num_threads_is_applied_and_recorded(tmp_path):
    before = torch.get_num_threads()
    try:
        run(tmp_path / "th", "--max_train_steps", 1, "--checkpointing_steps", 100, "--save_images_steps", 100,
            "--num_threads", 1)
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    assert json.loads((tmp_path / "th" / "training_args.json").read_text())["num_threads"] == 1


class _HubStub:
    """Records every Hub call (no network); ``fail`` names the call that raises as the network would."""

    def __init__(self, out, fail=None):
        self.calls, self.out, self.fail = [], Path(out), fail
        stub = self

        class Api:
            def __init__(self, token=None):
                stub.calls.append(("init", token))

            def create_repo(self, **kw):
                stub.calls.append(("create_repo", kw, (stub.out / "train_log.jsonl").exists()))
                if stub.fail == "create_repo":
                    raise ConnectionError("[Errno -2] Name or service not known")
                return type("U", (), {"repo_id": "me/" + kw["repo_id"]})()

            def upload_folder(self, **kw):
                stub.calls.append(("upload_folder", kw, sorted(p.relative_to(kw["folder_path"]).as_posix()
                                                               for p in Path(kw["folder_path"]).rglob("*") if p.is_file())))
                if stub.fail == "upload_folder":
                    raise ConnectionError("[Errno -2] Name or service not known")

        self.Api = Api


def test_push_to_hub_with_stub_never_leaks_token(tmp_path, monkeypatch, capsys):
    from diffusers_psld import hub

    out = tmp_path / "push"
    stub = _HubStub(out)
    monkeypatch.setattr(hub, "HfApi", stub.Api)
    secret = "hf_SECRET_do_not_print_42"
    run(out, "--max_train_steps", 2, "--checkpointing_steps", 1, "--save_images_steps", 100, "--push_to_hub",
        "--hub_model_id", "psld-tiny", "--hub_token", secret, "--report_to", "tensorboard")
    assert [c[0] for c in stub.calls] == ["init", "create_repo", "init", "upload_folder"]
    assert stub.calls[0][1] == stub.calls[2][1] == secret
    assert stub.calls[1][2] is False  # the repo was created before the first training step
    up = stub.calls[3][1]
    assert up["repo_id"] == "me/psld-tiny" and "checkpoint-*" in up["ignore_patterns"]
    files = stub.calls[3][2]
    assert {"README.md", "model_index.json", "unet/diffusion_pytorch_model.safetensors"} <= set(files)
    assert "me/psld-tiny" in (out / "README.md").read_text()  # the card names the repo as the Hub does
    text = capsys.readouterr()
    assert secret not in text.out + text.err
    for p in out.rglob("*"):
        if p.is_file():
            assert secret.encode() not in p.read_bytes(), p


def _error_line(capsys):
    err = capsys.readouterr().err.strip().splitlines()
    return err[-1] if err else ""


@pytest.mark.parametrize("case", ["no_token", "offline", "refused"])
def test_push_to_hub_fails_before_training_with_one_line(tmp_path, monkeypatch, capsys, case):
    """No token, offline mode (the real client: it refuses before any request) or a Hub that cannot be reached:
    one `error: --push_to_hub` line, exit code 2, nothing trained."""
    from diffusers_psld import hub

    out = tmp_path / "push"
    extra = ["--hub_token", "hf_fake"]
    if case == "no_token":
        monkeypatch.delenv("HF_TOKEN", raising=False)
        monkeypatch.setattr(hub, "get_token", lambda: None)
        extra = []
    elif case == "refused":
        monkeypatch.setattr(hub, "HfApi", _HubStub(out, fail="create_repo").Api)
    else:
        assert os.environ.get("HF_HUB_OFFLINE") == "1"  # conftest: the real HfApi refuses to go online
    try:
        rc = train_psld.cli([*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--push_to_hub", *extra])
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    line = _error_line(capsys)
    assert rc == 2 and line.startswith("error: `--push_to_hub`: ") and line.endswith("nothing was trained"), line
    want = {"no_token": "no Hub token: pass one (--hub_token), set HF_TOKEN, or log in with `hf auth login`",
            "offline": "could not create the Hub repo 'push' (OfflineModeIsEnabled: ",
            "refused": "could not create the Hub repo 'push' (ConnectionError: [Errno -2] Name or service not known)"}
    assert want[case] in line, line
    assert not (out / "train_log.jsonl").exists() and not list(out.glob("checkpoint-*"))


def test_failed_upload_says_the_local_files_are_complete_and_how_to_push(tmp_path, monkeypatch, capsys):
    import shlex

    from huggingface_hub.utils import filter_repo_objects

    from diffusers_psld import hub
    from diffusers_psld.pipelines import PSLDPipeline

    out = tmp_path / "push"
    monkeypatch.setattr(hub, "HfApi", _HubStub(out, fail="upload_folder").Api)
    try:
        rc = train_psld.cli([*TINY, "--output_dir", str(out), "--max_train_steps", "2", "--checkpointing_steps", "1",
                             "--push_to_hub", "--hub_token", "hf_fake"])
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    line = _error_line(capsys)
    assert rc == 1 and line.startswith("error: `--push_to_hub`: uploading "), line
    assert "(ConnectionError: [Errno -2] Name or service not known)" in line, line
    assert f"The local files in {out} are complete; push them later with: hf upload me/push {out} . " in line, line
    PSLDPipeline.from_pretrained(str(out))  # complete indeed
    # the command uploads exactly what the training run would have uploaded
    cmd = shlex.split(line.split("push them later with: ")[1])
    assert cmd[:5] == ["hf", "upload", "me/push", str(out), "."]
    excludes = [cmd[i + 1] for i, a in enumerate(cmd) if a == "--exclude"]
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    assert any(f.startswith("checkpoint-") for f in files)
    assert list(filter_repo_objects(files, ignore_patterns=excludes)) == \
        list(filter_repo_objects(files, ignore_patterns=hub.UPLOAD_IGNORE))


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))
    return env


@pytest.mark.slow
def test_sigkill_during_training_leaves_loadable_checkpoint(tmp_path):
    """Kill a real run at random moments (checkpoint every step, pruning to 2) and resume from what is left:
    after every kill, each listed checkpoint verifies against its manifest; the resumed run's loss
    trajectory equals an uninterrupted run's (README *Reliability*: ``-m slow -k sigkill``)."""
    import random

    from diffusers_psld import checkpoints as ckpt

    kills = int(os.environ.get("PSLD_SIGKILLS", "6"))
    out, ref = tmp_path / "kill", tmp_path / "ref"
    base = [sys.executable, str(SCRIPT), *TINY, "--checkpointing_steps", "1", "--checkpoints_total_limit", "2",
            "--save_images_steps", "1000"]
    rng = random.Random(0)
    for attempt in range(kills):
        extra = ["--resume_from_checkpoint", "latest"] if attempt else []
        proc = subprocess.Popen(base + ["--output_dir", str(out), "--max_train_steps", "400"] + extra, env=_env(),
                                cwd=str(tmp_path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t0 = time.time()
        start = [s for s, _ in train_psld.list_checkpoints(str(out))]
        while [s for s, _ in train_psld.list_checkpoints(str(out))] == start or time.time() - t0 < 3:
            time.sleep(0.05)
            assert proc.poll() is None and time.time() - t0 < 300
        time.sleep(rng.uniform(0.0, 1.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        listed = train_psld.list_checkpoints(str(out))
        assert listed and len(listed) <= 3, listed  # at most one more than the limit, between rename and prune
        assert all(ckpt.verify(p) is None for _, p in listed), [ckpt.verify(p) for _, p in listed]
    last = train_psld.list_checkpoints(str(out))[-1][0]
    p = subprocess.run(base + ["--output_dir", str(out), "--max_train_steps", str(last + 2), "--resume_from_checkpoint",
                               "latest"], env=_env(), cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from" in p.stdout and (out / "model_index.json").exists()
    p = subprocess.run(base + ["--output_dir", str(ref), "--max_train_steps", str(last + 2)], env=_env(),
                       cwd=str(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    assert [r["loss"] for r in losses(out)] == [r["loss"] for r in losses(ref)]  # bit-exact


def test_classifier_recipe_points_at_what_the_quickstart_writes():
    """train_classifier.py's documented recipe: its --pipeline is the directory its train_psld.py line writes."""
    import shlex

    from _scripts import load_script

    clf = load_script("training/train_classifier.py", "train_classifier_recipe")
    lines = [ln.strip() for ln in clf.__doc__.splitlines() if ln.strip().startswith("python training/")]
    train_line = next(ln for ln in lines if "train_psld.py" in ln)
    clf_line = next(ln for ln in lines if "train_classifier.py" in ln)
    args = train_psld.parse_args(shlex.split(train_line)[2:])
    clf_args = shlex.split(clf_line)
    assert clf_args[clf_args.index("--pipeline") + 1] == args.output_dir


def test_short_folder_run_scales_the_grid_says_the_warmup_is_longer_and_keeps_a_fixed_ema(tmp_path, capsys):
    """A 2-step image-folder run with the folder defaults (the paper's 5000-step warm-up, fixed EMA 0.9999):
    the start banner says the learning rate never reaches its value, the final grid is scaled to the run
    (2 steps × 8 images × 3 = 48 network evaluations → 24 images at 2 steps each) with a line before it,
    and the logged EMA decay is the fixed 0.9999 that training/README.md states."""
    from diffusers_psld.pipelines import PSLDPipeline

    out = tmp_path / "folder"
    train_psld.main(["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
                     "--report_to", "none", "--train_data_dir", _folder(tmp_path, n=8), "--cache_dir", str(tmp_path / "c"),
                     "--max_train_steps", "2", "--output_dir", str(out)])
    text = capsys.readouterr().out
    assert ("note: the learning-rate warm-up (5000 steps) is longer than this run (2 steps): the learning rate rises "
            "from 0 to only 8e-08 (0.04 % of 0.0002)") in text, text
    assert "sample grid: 24 images × 2 steps, not 64" in text, text
    assert "drawing the final sample grid: 24 images × 2 steps" in text, text
    assert json.loads((out / "training_args.json").read_text())["eval_batch_size"] == 24
    import PIL.Image

    assert PIL.Image.open(out / "samples.png").size == PIL.Image.open(out / "samples" / "step-0000002.png").size
    log = losses(out)
    assert [r["ema_decay"] for r in log] == [0.0, 0.9999]  # diffusers starts the average at the step-1 weights
    assert [r["lr"] for r in log] == [0.0, 2e-4 / 5000]
    PSLDPipeline.from_pretrained(str(out))


def test_digits_ema_warmup_decay_is_logged_as_documented(tmp_path):
    """The digits default: diffusers' EMA warm-up 1 - (1 + step)^(-2/3) (the README's statement)."""
    out = tmp_path / "ema"
    run(out, "--max_train_steps", 3, "--checkpointing_steps", 100, "--save_images_steps", 100)
    got = [r["ema_decay"] for r in losses(out)]
    assert got[0] == 0.0 and got[1:] == pytest.approx([1 - 2 ** (-2 / 3), 1 - 3 ** (-2 / 3)], rel=1e-12)
