"""Checkpoints (issue #13 §6): nothing half-written is ever taken for whole.

Atomic pruning, a full disk, a damaged newest checkpoint, changed settings on resume, and a quiet
(warning-free) EMA resume. Tiny in-process runs of training/train_psld.py (8 px, `tiny` preset).
"""
import errno
import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from _scripts import load_script

from diffusers_psld import checkpoints as ckpt
from diffusers_psld import training_utils

train_psld = load_script("training/train_psld.py", "train_psld_ckpt_tests")

TINY = ["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
        "--eval_batch_size", "4", "--report_to", "none", "--lr_warmup_steps", "2", "--save_images_steps", "100"]


def _reset():
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


def run(out, *extra):
    try:
        return train_psld.main([*TINY, "--output_dir", str(out), *map(str, extra)])
    finally:
        _reset()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 4-step run with checkpoints at steps 2 and 4 (copied per test)."""
    out = tmp_path_factory.mktemp("ck") / "run"
    run(out, "--max_train_steps", 4, "--checkpointing_steps", 2)
    return out


def _copy(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


# ----------------------------------------------------------------------------- pruning
def test_checkpoint_without_manifest_is_not_counted(tmp_path):
    (tmp_path / "checkpoint-7" / "unet").mkdir(parents=True)  # e.g. half-deleted by the old in-place rmtree
    tmp = tmp_path / ".tmp-checkpoint-9"
    tmp.mkdir()
    (tmp / "a.bin").write_bytes(b"x" * 10)
    ckpt.finalize(str(tmp), str(tmp_path / "checkpoint-9"), {"step": 9})
    assert ckpt.list_checkpoints(str(tmp_path)) == [(9, str(tmp_path / "checkpoint-9"))]
    manifest = json.loads((tmp_path / "checkpoint-9" / ckpt.MANIFEST).read_text())
    assert manifest["files"]["a.bin"]["size"] == 10 and len(manifest["files"]["a.bin"]["sha256"]) == 64


def test_kill_while_pruning_never_leaves_a_half_deleted_checkpoint_under_its_name(tmp_path, monkeypatch):
    """The SIGKILL of the issue, 5 ms after a new checkpoint's rename: the deletion of the old one stops
    after one file. The old checkpoint must already have stopped being a checkpoint."""
    out = tmp_path / "run"
    real_rmtree = shutil.rmtree

    def killed_rmtree(path, *a, **k):
        path = Path(path)
        if path.name.startswith(("checkpoint-", ".trash-checkpoint-")):
            victim = next(p for p in sorted(path.rglob("*")) if p.is_file())
            victim.unlink()  # one file gone ...
            raise KeyboardInterrupt("simulated SIGKILL during pruning")  # ... then the process dies
        return real_rmtree(path, *a, **k)

    run(out, "--max_train_steps", 2, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1)
    monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
    with pytest.raises(KeyboardInterrupt):
        run(out, "--max_train_steps", 4, "--checkpointing_steps", 2, "--checkpoints_total_limit", 1,
            "--resume_from_checkpoint", "latest")
    monkeypatch.setattr(shutil, "rmtree", real_rmtree)
    listed = train_psld.list_checkpoints(str(out))
    assert [s for s, _ in listed] == [4]
    assert all(ckpt.verify(p) is None for _, p in listed)
    assert [p.name for p in out.glob(".trash-checkpoint-*")]  # the half-deleted one is hidden in the trash ...
    run(out, "--max_train_steps", 5, "--checkpointing_steps", 100, "--resume_from_checkpoint", "latest")
    assert not list(out.glob(".trash-*"))  # ... and removed at the next start


# ----------------------------------------------------------------------------- disk full
@pytest.mark.parametrize("kind", ["enospc", "torch_zip_writer"])
def test_disk_full_names_checkpoint_says_disk_full_and_cleans_up(trained, tmp_path, monkeypatch, kind):
    out = _copy(trained, tmp_path)
    real_save = torch.save

    def full_disk_save(obj, f, *a, **k):
        if kind == "enospc":
            raise OSError(errno.ENOSPC, "No space left on device")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    monkeypatch.setattr(torch, "save", full_disk_save)
    if kind == "torch_zip_writer":  # the errno is lost in torch's zip writer: the free space decides
        monkeypatch.setattr(shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(10**9, 10**9 - 4096, 4096))
    with pytest.raises(ckpt.CheckpointError) as info:
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    monkeypatch.setattr(torch, "save", real_save)
    msg = str(info.value)
    assert msg.startswith("disk full") and "checkpoint-6" in msg and "checkpoint-4 is intact" in msg, msg
    assert not list(out.glob(".tmp-*")) and not (out / "checkpoint-6").exists()
    assert [s for s, _ in train_psld.list_checkpoints(str(out))] == [2, 4]


def test_other_write_errors_are_not_called_disk_full():
    err = RuntimeError("permission trouble")
    msg = ckpt.describe_write_failure(err, "out/checkpoint-6", free_bytes=10**10, needed_bytes=10**6, previous=None)
    assert msg.startswith("could not write checkpoint out/checkpoint-6") and "disk full" not in msg


# ----------------------------------------------------------------------------- damaged newest checkpoint
def _truncate(p: Path):
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])


DAMAGE = {
    "optimizer.bin": lambda ck: _truncate(ck / "optimizer.bin"),
    "scheduler.bin": lambda ck: _truncate(ck / "scheduler.bin"),
    "unet/diffusion_pytorch_model.safetensors": lambda ck: _truncate(ck / "unet" / "diffusion_pytorch_model.safetensors"),
    "unet/config.json": lambda ck: (ck / "unet" / "config.json").write_text("{\"sample_size\": 8"),
    "unet_ema/diffusion_pytorch_model.safetensors": lambda ck: (ck / "unet_ema" / "diffusion_pytorch_model.safetensors").write_bytes(
        b"\0" * (ck / "unet_ema" / "diffusion_pytorch_model.safetensors").stat().st_size),  # same size, other bytes
    "unet/": lambda ck: shutil.rmtree(ck / "unet"),
    "training_state.json": lambda ck: _truncate(ck / "training_state.json"),
}


@pytest.mark.parametrize("bad", list(DAMAGE))
def test_damaged_newest_checkpoint_names_file_and_last_loadable(trained, tmp_path, bad):
    out = _copy(trained, tmp_path)
    DAMAGE[bad](out / "checkpoint-4")
    with pytest.raises(ValueError) as info:
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    msg = str(info.value)
    assert msg.startswith("`--resume_from_checkpoint`") and "checkpoint-4" in msg and bad.rstrip("/") in msg, msg
    assert "--resume_from_checkpoint checkpoint-2" in msg, msg
    if bad != "optimizer.bin":
        return
    # the explicit way out works: a bare checkpoint name inside --output_dir
    res = run(out, "--max_train_steps", 3, "--checkpointing_steps", 100, "--resume_from_checkpoint", "checkpoint-2")
    assert res["global_step"] == 3


def _refinalize(ck: Path):
    """Rewrite the manifest of ``ck`` over its present files: a checkpoint whose files all verify."""
    manifest = json.loads((ck / ckpt.MANIFEST).read_text())
    manifest["files"] = ckpt.file_manifest(str(ck))
    (ck / ckpt.MANIFEST).write_text(json.dumps(manifest))


def test_load_error_of_a_verified_checkpoint_is_not_called_damage(trained, tmp_path):
    """A checkpoint whose files match its manifest but that cannot be loaded (here: a UNet config from another
    network, as a hand edit or an incompatible version leaves it) is reported as a load error, not as damage,
    and no other checkpoint is advertised as "the last loadable"."""
    out = _copy(trained, tmp_path)
    ck = out / "checkpoint-4"
    cfg = json.loads((ck / "unet" / "config.json").read_text())
    cfg["block_out_channels"] = [c * 2 for c in cfg["block_out_channels"]]
    (ck / "unet" / "config.json").write_text(json.dumps(cfg))
    _refinalize(ck)
    manifest = json.loads((ck / ckpt.MANIFEST).read_text())
    assert manifest["versions"]["torch"] == torch.__version__  # the writer's versions are recorded
    manifest["versions"]["diffusers"] = "0.0.1"  # as if an older diffusers had written it
    (ck / ckpt.MANIFEST).write_text(json.dumps(manifest))
    assert ckpt.verify(str(ck)) is None
    with pytest.raises(ValueError) as info:
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    msg = str(info.value)
    assert msg.startswith("`--resume_from_checkpoint`") and "checkpoint-4" in msg, msg
    assert "damaged" not in msg and "last loadable" not in msg, msg
    assert "match its manifest" in msg and "expected shape" in msg, msg  # what happened, in the loader's words
    assert "other library versions (diffusers 0.0.1 → " in msg, msg


def test_load_error_of_an_unverifiable_checkpoint_says_it_could_not_be_verified(trained, tmp_path):
    out = _copy(trained, tmp_path)
    ck = out / "checkpoint-4"
    _truncate(ck / "optimizer.bin")
    manifest = json.loads((ck / ckpt.MANIFEST).read_text())
    del manifest["files"]  # written before manifests listed their files
    (ck / ckpt.MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(ValueError) as info:
        run(out, "--max_train_steps", 6, "--checkpointing_steps", 2, "--resume_from_checkpoint", "latest")
    msg = str(info.value)
    assert "checkpoint-4 could not be loaded" in msg and "lists no file hashes" in msg, msg
    assert "--resume_from_checkpoint checkpoint-2" in msg, msg  # an earlier one may load


# ----------------------------------------------------------------------------- changed settings on resume
def test_changed_diffusion_settings_are_refused_with_the_differences(trained, tmp_path):
    out = _copy(trained, tmp_path)
    with pytest.raises(ValueError) as info:
        run(out, "--max_train_steps", 6, "--resume_from_checkpoint", "latest", "--gamma", 0.25, "--kappa", 0.05)
    msg = str(info.value)
    assert "gamma: 0.01 in the checkpoint, 0.25 now" in msg and "kappa: 0.04 in the checkpoint, 0.05 now" in msg, msg
    assert "cannot change" in msg
    with pytest.raises(ValueError, match=r"--allow_changed_settings.*'gamma'.*cannot"):
        run(out, "--max_train_steps", 6, "--resume_from_checkpoint", "latest", "--gamma", 0.25,
            "--allow_changed_settings", "gamma")
    saved = json.loads((out / "scheduler" / "scheduler_config.json").read_text())
    assert saved["gamma"] == 0.01  # nothing was overwritten by the refused runs


def test_safe_settings_change_needs_explicit_override_and_is_recorded(trained, tmp_path):
    out = _copy(trained, tmp_path)
    with pytest.raises(ValueError, match=r"learning_rate: 0\.001 in the checkpoint, 0\.002 now \(pass --allow_changed_settings learning_rate"):
        run(out, "--max_train_steps", 5, "--resume_from_checkpoint", "latest", "--learning_rate", 0.002)
    run(out, "--max_train_steps", 5, "--checkpointing_steps", 5, "--resume_from_checkpoint", "latest",
        "--learning_rate", 0.002, "--allow_changed_settings", "learning_rate")
    hist = json.loads((out / "training_args.json").read_text())["resume_history"]
    assert hist == [{"checkpoint": "checkpoint-4", "step": 4, "changed": {"learning_rate": [0.001, 0.002]}}]
    # resuming from the new checkpoint with the new value needs no override; the history is kept
    run(out, "--max_train_steps", 6, "--checkpointing_steps", 100, "--resume_from_checkpoint", "latest",
        "--learning_rate", 0.002)
    assert json.loads((out / "training_args.json").read_text())["resume_history"] == hist


# ----------------------------------------------------------------------------- quiet resume
def test_resume_emits_no_warnings(trained, tmp_path, capfd):
    out = _copy(trained, tmp_path)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run(out, "--max_train_steps", 5, "--checkpointing_steps", 100, "--resume_from_checkpoint", "latest")
    text = capfd.readouterr().err
    relevant = [w for w in caught if issubclass(w.category, (FutureWarning, UserWarning, RuntimeWarning))]
    assert not relevant, [str(w.message)[:200] for w in relevant]
    assert "will be ignored" not in text and "deprecated" not in text.lower(), text[-2000:]


def test_ema_folder_of_diffusers_save_pretrained_still_loads(tmp_path, capfd):
    """Checkpoints written before ema_state.json (EMA keys inside config.json) resume without warnings."""
    from diffusers import UNet2DModel
    from diffusers.training_utils import EMAModel

    from diffusers_psld.models.unet_presets import build_unet

    unet = build_unet("tiny", 1, 2, 8)
    ema = EMAModel(unet.parameters(), decay=0.99, use_ema_warmup=True, model_cls=UNet2DModel, model_config=unet.config)
    for p in unet.parameters():
        p.data.add_(1.0)
    ema.step(unet.parameters())
    ema.save_pretrained(str(tmp_path / "legacy"))
    new = EMAModel(build_unet("tiny", 1, 2, 8).parameters(), decay=0.5, model_cls=UNet2DModel, model_config=unet.config)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        training_utils.load_ema(new, str(tmp_path / "legacy"))
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]
    assert "will be ignored" not in capfd.readouterr().err
    assert new.optimization_step == ema.optimization_step == 1 and new.decay == 0.99 and new.use_ema_warmup
    assert all(torch.equal(a, b) for a, b in zip(new.shadow_params, ema.shadow_params))
    # and the new layout round-trips
    training_utils.save_ema(ema, str(tmp_path / "new"))
    assert "decay" not in json.loads((tmp_path / "new" / "config.json").read_text())
    again = EMAModel(build_unet("tiny", 1, 2, 8).parameters(), model_cls=UNet2DModel, model_config=unet.config)
    training_utils.load_ema(again, str(tmp_path / "new"))
    assert again.state_dict().keys() == ema.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.shadow_params, ema.shadow_params))
    assert again.optimization_step == 1 and again.decay == 0.99


# ----------------------------------------------------------------------------- pipeline saves are staged
def _tiny_pipeline(tie=False):
    from diffusers_psld import PSLDPipeline, PSLDScheduler
    from diffusers_psld.models.unet_presets import build_unet

    unet = build_unet("tiny", 1, 2, 8)
    if tie:  # two same-shaped convolutions share one weight: safetensors refuses to save shared tensors
        unet.down_blocks[0].resnets[0].conv2.weight = unet.down_blocks[0].resnets[0].conv1.weight
    return PSLDPipeline(unet=unet, scheduler=PSLDScheduler())


def test_a_failed_pipeline_save_leaves_the_directory_as_it_was(tmp_path):
    """Tied weights: the save used to leave a directory holding only unet/config.json."""
    fresh = tmp_path / "fresh"
    with pytest.raises(RuntimeError, match="share memory"):
        _tiny_pipeline(tie=True).save_pretrained(str(fresh), safe_serialization=True)
    assert not fresh.exists()
    # over an earlier, complete save with other files beside it (a training output directory)
    out = tmp_path / "run"
    _tiny_pipeline().save_pretrained(str(out), safe_serialization=True)
    (out / "README.md").write_text("card")
    before = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    with pytest.raises(RuntimeError, match="share memory"):
        _tiny_pipeline(tie=True).save_pretrained(str(out), safe_serialization=True)
    after = {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before


def test_a_pipeline_save_replaces_its_components_and_keeps_other_files(tmp_path):
    from safetensors.torch import load_file

    from diffusers_psld import PSLDPipeline

    out = tmp_path / "run"
    (out / "checkpoint-2").mkdir(parents=True)
    (out / "checkpoint-2" / "x.bin").write_bytes(b"x")
    (out / "unet").mkdir()
    (out / "unet" / "stale.bin").write_bytes(b"old")  # a file of an older save: replaced with the whole folder
    first, second = _tiny_pipeline(), _tiny_pipeline()
    with torch.no_grad():
        for p in second.unet.parameters():
            p.add_(1.0)
    first.save_pretrained(str(out), safe_serialization=True)
    second.save_pretrained(str(out), safe_serialization=True)
    assert (out / "checkpoint-2" / "x.bin").read_bytes() == b"x" and not (out / "unet" / "stale.bin").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith((".tmp-", ".trash-"))]
    saved = load_file(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved[k], v) for k, v in second.unet.state_dict().items())
    PSLDPipeline.from_pretrained(str(out))


def test_a_staged_push_keeps_diffusers_default_repo_id(tmp_path, monkeypatch):
    import diffusers.pipelines.pipeline_utils as pu
    import huggingface_hub

    from diffusers_psld import PSLDPipeline

    seen = {}

    def fake_create_repo(repo_id, **kw):
        seen["repo_id"] = repo_id
        return type("Repo", (), {"repo_id": "someuser/" + repo_id})()

    monkeypatch.setattr(pu, "create_repo", fake_create_repo)
    monkeypatch.setattr(pu, "load_or_create_model_card", lambda *a, **k: huggingface_hub.ModelCard("---\n---\n"))
    monkeypatch.setattr(PSLDPipeline, "_upload_folder", lambda self, folder, repo_id, **kw: seen.update(up=repo_id))
    _tiny_pipeline().save_pretrained(str(tmp_path / "psld-tiny"), push_to_hub=True, token="hf_fake")
    assert seen == {"repo_id": "psld-tiny", "up": "someuser/psld-tiny"}
    assert (tmp_path / "psld-tiny" / "model_index.json").exists()
