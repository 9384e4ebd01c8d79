"""Issue #15 §3: ``DiffusionPipeline.from_pretrained(dir_or_repo, trust_remote_code=True)`` without ``custom_pipeline=``.

Saved pipelines carry ``pipeline_psld.py`` and ``"_class_name": ["pipeline_psld", "<Class>"]`` (diffusers'
rule for repository code); ``PSLDPipeline.from_pretrained`` keeps working without remote code, also for
directories written before this change (plain ``"_class_name": "PSLDPipeline"``, no file).
"""
import importlib.util
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import DiffusionPipeline

from diffusers_psld import PSLDImg2ImgPipeline, PSLDPipeline, PSLDScheduler, SSCSScheduler, training_record
from diffusers_psld.models.classifier import TimeDependentClassifier
from diffusers_psld.pipelines import remote_code

from _pipeline_stubs import tiny_unet
from _versions import LOCAL_CODE_NEEDS_TRUST

REPO = Path(__file__).resolve().parent.parent


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    p = PSLDPipeline(unet=tiny_unet(), scheduler=SSCSScheduler(), classifier=clf)
    p.set_progress_bar_config(disable=True)
    return p


def sample(p, **kw):
    p.set_progress_bar_config(disable=True)
    return p(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen(), **kw).images


def test_saved_dir_carries_file_and_entry(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_psld", "PSLDPipeline"]
    assert (tmp_path / "pipeline_psld.py").read_text() == remote_code.SOURCE
    # the repository's top-level copy (for manual uploads) is the same file
    assert (REPO / "pipelines" / "pipeline_psld.py").read_text() == remote_code.SOURCE
    assert not list(tmp_path.glob("*.tmp"))


def test_generic_loader_on_a_fresh_dir(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    assert type(loaded) is PSLDPipeline  # the package's own class, re-exported by the file
    assert isinstance(loaded.scheduler, SSCSScheduler) and isinstance(loaded.classifier, TimeDependentClassifier)
    torch.testing.assert_close(sample(loaded, class_labels=1, guidance_scale=2.0), sample(pipe, class_labels=1, guidance_scale=2.0),
                               atol=1e-6, rtol=0)
    if LOCAL_CODE_NEEDS_TRUST:  # diffusers >= 0.38 (earlier releases run a local directory's code unasked)
        with pytest.raises(ValueError, match="trust_remote_code"):
            DiffusionPipeline.from_pretrained(tmp_path)


def test_img2img_class_round_trips(pipe, tmp_path):
    PSLDImg2ImgPipeline(**pipe.components).save_pretrained(tmp_path)
    assert json.loads((tmp_path / "model_index.json").read_text())["_class_name"] == ["pipeline_psld", "PSLDImg2ImgPipeline"]
    assert type(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)) is PSLDImg2ImgPipeline
    assert type(PSLDPipeline.from_pretrained(tmp_path)) is PSLDPipeline  # the class asked for wins
    assert type(PSLDImg2ImgPipeline.from_pretrained(tmp_path)) is PSLDImg2ImgPipeline


def test_psld_pipeline_never_executes_the_file(pipe, tmp_path):
    """``PSLDPipeline.from_pretrained`` needs no ``trust_remote_code``: it does not run ``pipeline_psld.py``."""
    pipe.save_pretrained(tmp_path)
    (tmp_path / "pipeline_psld.py").write_text("raise RuntimeError('executed')\n")
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)


def test_directory_saved_before_the_change_still_loads(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = "PSLDPipeline"  # the old format
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "pipeline_psld.py").unlink()
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=0, rtol=0)
    # re-saving upgrades it
    loaded.save_pretrained(tmp_path / "again")
    assert type(DiffusionPipeline.from_pretrained(tmp_path / "again", trust_remote_code=True)) is PSLDPipeline


def _seed_cache(pipe, cache: Path, repo: str) -> None:
    """Hand-built HF cache ``models--ns--name/{refs/main, snapshots/<sha>/...}`` (ecosystem_facts.md §9)."""
    sha = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo.replace("/", "--"))
    pipe.save_pretrained(root / "snapshots" / sha)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(sha)


def test_generic_loader_from_preseeded_offline_hub_cache(pipe, tmp_path, monkeypatch):
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    _seed_cache(pipe, cache, "someuser/psld-tiny")
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = DiffusionPipeline.from_pretrained("someuser/psld-tiny", cache_dir=str(cache), trust_remote_code=True)
    assert type(loaded) is PSLDPipeline and isinstance(loaded.classifier, TimeDependentClassifier)
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=1e-6, rtol=0)
    assert type(PSLDPipeline.from_pretrained("someuser/psld-tiny", cache_dir=str(cache))) is PSLDPipeline


def test_push_uploads_the_file(pipe, tmp_path, monkeypatch):
    """``save_pretrained(push_to_hub=True)`` uploads a folder that already holds the file and the entry."""
    import diffusers.pipelines.pipeline_utils as pu

    seen = {}

    class Repo:
        repo_id = "someuser/psld-tiny"

    def fake_upload(self, working_dir, repo_id, token=None, commit_message=None, create_pr=False, **kw):
        seen["files"] = sorted(os.listdir(working_dir))
        seen["index"] = json.loads(Path(working_dir, "model_index.json").read_text())

    monkeypatch.setattr(pu, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(pu, "load_or_create_model_card", lambda *a, **k: __import__("huggingface_hub").ModelCard("---\n---\n"))
    monkeypatch.setattr(PSLDPipeline, "_upload_folder", fake_upload)
    pipe.save_pretrained(str(tmp_path), push_to_hub=True, repo_id="someuser/psld-tiny", token="hf_fake")
    assert "pipeline_psld.py" in seen["files"] and seen["index"]["_class_name"] == ["pipeline_psld", "PSLDPipeline"]


def test_generic_loader_on_a_freshly_trained_dir(tmp_path):
    """What ``training/train_psld.py`` writes loads through the generic loader."""
    spec = importlib.util.spec_from_file_location("train_psld_gl", REPO / "training" / "train_psld.py")
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    out = tmp_path / "run"
    train.main(["--model_preset", "tiny", "--resolution", "8", "--train_batch_size", "8", "--num_inference_steps", "2",
                "--eval_batch_size", "2", "--report_to", "none", "--lr_warmup_steps", "1", "--output_dir", str(out),
                "--max_train_steps", "1", "--checkpointing_steps", "100", "--save_images_steps", "100"])
    assert (out / "pipeline_psld.py").exists()
    loaded = DiffusionPipeline.from_pretrained(out, trust_remote_code=True)
    assert type(loaded) is PSLDPipeline and isinstance(loaded.scheduler, PSLDScheduler)
    # the training script's pipeline save records what the network was trained for (no training-side code)
    assert training_record.record_in(loaded.unet) == training_record.record_of(loaded.scheduler)
    loaded.set_progress_bar_config(disable=True)
    assert loaded(batch_size=1, num_inference_steps=2, output_type="np").images.shape[:3] == (1, 8, 8)


@pytest.mark.parametrize("cls", [PSLDPipeline, PSLDImg2ImgPipeline])
def test_custom_pipeline_by_name_finds_exactly_one_class(pipe, tmp_path, cls):
    """``custom_pipeline="pipeline_psld"`` loads the saved file, where diffusers' search for the pipeline class
    accepts exactly one ``DiffusionPipeline`` subclass among the module's members."""
    cls(**pipe.components).save_pretrained(tmp_path)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline="pipeline_psld", trust_remote_code=True)
    assert type(loaded) is PSLDPipeline  # the file's pipeline class (custom_pipeline= means "the class in this file")
    assert type(DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)) is cls  # model_index.json's class
    torch.testing.assert_close(sample(loaded), sample(pipe), atol=1e-6, rtol=0)
    # a directory saved before the file existed, with the repository's top-level file named by path
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = cls.__name__
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    (tmp_path / "pipeline_psld.py").unlink()
    loaded = DiffusionPipeline.from_pretrained(tmp_path, custom_pipeline=str(REPO / "pipelines" / "pipeline_psld.py"),
                                               trust_remote_code=True)
    assert type(loaded) is PSLDPipeline


def test_saved_file_exposes_one_pipeline_member_and_the_others_by_name(tmp_path):
    from diffusers.utils.dynamic_modules_utils import find_pipeline_class

    path = tmp_path / "saved_pipeline_psld.py"
    path.write_text(remote_code.SOURCE)
    spec = importlib.util.spec_from_file_location("saved_pipeline_psld", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert find_pipeline_class(module) is PSLDPipeline
    assert [getattr(module, name) for name in remote_code.PIPELINE_CLASSES] == [PSLDPipeline, PSLDImg2ImgPipeline]
    with pytest.raises(AttributeError):
        module.NoSuchPipeline  # noqa: B018


@pytest.mark.parametrize("bad", [["pipeline_psld"], [], ["pipeline_psld", 3], "", None, 7])
def test_malformed_class_name_is_a_clear_error(pipe, tmp_path, bad):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    index["_class_name"] = bad
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=r"model_index\.json.*`_class_name` must be"):
        PSLDPipeline.from_pretrained(tmp_path)


@pytest.mark.parametrize("bad", ["", "   "])
def test_empty_path_is_refused_as_what_it_is(bad):
    with pytest.raises(ValueError, match="pretrained_model_name_or_path` must be a pipeline directory or a Hub repo id"):
        PSLDPipeline.from_pretrained(bad)
