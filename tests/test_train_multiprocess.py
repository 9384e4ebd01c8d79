"""training/train_psld.py on 2 CPU processes (gloo, ``accelerate launch``): rank sync, data split, and a resume
that continues the uninterrupted run bit for bit (losses, weights, EMA weights), with and without EMA.

The launch is the one that really gives 2 distributed CPU ranks (``ACCELERATE_USE_CPU=1 accelerate launch
--multi_gpu ...``); ``--cpu --num_processes 2`` silently runs one process.
"""
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
SCRIPT = REPO / "training" / "train_psld.py"
TINY = ["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
        "--eval_batch_size", "4", "--report_to", "none", "--lr_warmup_steps", "2", "--save_images_steps", "100"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1", PYTHONPATH=str(REPO))


def launch(cwd, out, *extra, expect_rc=0):
    """``accelerate launch`` 2 CPU ranks; returns stdout + stderr."""
    accel = Path(sys.executable).parent / "accelerate"
    cmd = [str(accel), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(SCRIPT), *TINY, "--output_dir", str(out), *map(str, extra)]
    p = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600, cwd=str(cwd))
    text = p.stdout + p.stderr
    assert p.returncode == expect_rc, text[-4000:]
    return text


def losses(out):
    return [json.loads(line) for line in open(Path(out) / "train_log.jsonl")]


def checksums(text):
    # regexes, not lines: two ranks printing at once may interleave their writes on one line
    return {int(r): v for r, v in re.findall(r"\[rank (\d)/2\] param_checksum=([-+\d.e]+)", text)}


def weights(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def assert_same_weights(a, b):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    diff = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not diff, f"{len(diff)} tensors differ, e.g. {diff[:3]}"


def _resume_matches_uninterrupted(tmp_path, *extra):
    """An uninterrupted 6-step run (checkpoints at 2, 4, 6) against the same run killed after step 4: its
    output directory as a kill leaves it (checkpoint-4, training_args.json, the loss log with lines past the
    checkpoint), resumed with ``--resume_from_checkpoint latest`` to step 6."""
    ref, cut = tmp_path / "ref", tmp_path / "cut"
    common = ["--checkpointing_steps", 2, "--checkpoints_total_limit", 3, "--_debug_ranks", *extra]
    text_ref = launch(tmp_path, ref, "--max_train_steps", 6, *common)
    cut.mkdir()
    shutil.copytree(ref / "checkpoint-4", cut / "checkpoint-4")
    shutil.copy(ref / "training_args.json", cut / "training_args.json")
    with open(cut / "train_log.jsonl", "w") as f:  # step 5 was logged before the kill: the resume rewrites it
        f.writelines(open(ref / "train_log.jsonl").readlines()[:4] + [json.dumps({"step": 5, "loss": 123.0}) + "\n"])
    text = launch(tmp_path, cut, "--max_train_steps", 6, "--resume_from_checkpoint", "latest", *common)
    assert re.search(r"resumed from \S*checkpoint-4 at step 4", text), text[-3000:]
    sums = checksums(text)
    assert sums.keys() == {0, 1} and sums[0] == sums[1], sums  # the ranks are in sync after the resume
    assert checksums(text_ref)[0] == sums[0]
    la, lb = losses(ref), losses(cut)
    assert [r["step"] for r in lb] == [1, 2, 3, 4, 5, 6]
    assert [(r["loss"], r["lr"]) for r in la] == [(r["loss"], r["lr"]) for r in lb]  # exact float equality
    # the trained weights, the saved pipeline's weights (EMA when on) and the optimizer state: bit-identical
    assert_same_weights(ref / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors",
                        cut / "checkpoint-6" / "unet" / "diffusion_pytorch_model.safetensors")
    assert_same_weights(ref / "unet" / "diffusion_pytorch_model.safetensors",
                        cut / "unet" / "diffusion_pytorch_model.safetensors")
    oa = torch.load(ref / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    ob = torch.load(cut / "checkpoint-6" / "optimizer.bin", weights_only=True)["state"]
    assert all(torch.equal(oa[i][k], ob[i][k]) for i in oa for k in oa[i])
    return ref, cut


def test_two_process_resume_continues_the_run_exactly_with_ema(tmp_path):
    ref, cut = _resume_matches_uninterrupted(tmp_path)
    assert_same_weights(ref / "checkpoint-6" / "unet_ema" / "diffusion_pytorch_model.safetensors",
                        cut / "checkpoint-6" / "unet_ema" / "diffusion_pytorch_model.safetensors")
    ema = json.loads((cut / "checkpoint-6" / "unet_ema" / "ema_state.json").read_text())
    assert ema["optimization_step"] == 6


@pytest.mark.slow
def test_two_process_resume_continues_the_run_exactly_without_ema(tmp_path):
    ref, cut = _resume_matches_uninterrupted(tmp_path, "--no-use_ema")
    assert not (cut / "checkpoint-6" / "unet_ema").exists()


@pytest.mark.slow
def test_ddp_two_processes(tmp_path):
    """2 CPU ranks (gloo): identical weights, the global batch is split, only rank 0 writes outputs."""
    out = tmp_path / "ddp"
    text = launch(tmp_path, out, "--max_train_steps", "3", "--checkpointing_steps", "2", "--_debug_ranks")
    sums = checksums(text)
    assert sums.keys() == {0, 1} and sums[0] == sums[1]
    firsts = {int(r): json.loads(v) for r, v in re.findall(r"\[rank (\d)/2\] first batch indices (\[[\d, ]*\])", text)}
    from diffusers_psld.data import epoch_batches

    assert firsts[0] == epoch_batches(1797, 8, 2, 0, 0, 0)[0] and firsts[1] == epoch_batches(1797, 8, 2, 1, 0, 0)[0]
    assert not set(firsts[0]) & set(firsts[1]) and len(firsts[0]) == 8
    assert text.count("done: 3 steps") == 1 and "2 process(es)" in text
    assert (out / "model_index.json").exists() and (out / "README.md").exists()
    ck = sorted(p.name for p in (out / "checkpoint-2").iterdir())
    assert "random_states_0.pkl" in ck and "random_states_1.pkl" in ck  # accelerate's per-rank RNG files
    assert len(losses(out)) == 3


@pytest.mark.slow
def test_push_to_hub_check_stops_every_rank_before_training(tmp_path):
    """Offline (the real client refuses before any request): the main rank's check reaches the other rank;
    both stop with the one-line error, nothing is trained, nothing hangs."""
    out = tmp_path / "push"
    text = launch(tmp_path, out, "--max_train_steps", 2, "--push_to_hub", "--hub_token", "hf_fake", expect_rc=1)
    assert text.count("error: `--push_to_hub`: could not create the Hub repo 'push' (OfflineModeIsEnabled") == 2, text[-3000:]
    assert not (out / "train_log.jsonl").exists()
