"""PSLDPipeline: save/load, Hub-id loading, determinism, outputs, callbacks, scheduler swap, dtypes, errors."""
import doctest
import json
import os
import re

import numpy as np
import PIL.Image
import pytest
import torch

import diffusers_psld.pipelines.pipeline_psld as pipeline_module
from diffusers_psld.models.classifier import TimeDependentClassifier
from diffusers_psld.pipelines import PSLDPipeline
from diffusers_psld.schedulers import PSLDScheduler, SSCSScheduler

from _pipeline_stubs import tiny_unet
from _versions import LOCAL_CODE_NEEDS_TRUST

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def pipe():
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    p = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler(), classifier=clf)
    p.set_progress_bar_config(disable=True)
    return p


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_psld", "PSLDPipeline"]  # the generic loader's entry
    assert (tmp_path / "pipeline_psld.py").exists()
    assert index["unet"] == ["diffusers", "UNet2DModel"]
    assert index["scheduler"] == ["diffusers_psld.schedulers.scheduling_psld", "PSLDScheduler"]
    assert index["classifier"] == ["diffusers_psld.models.classifier", "TimeDependentClassifier"]
    assert (tmp_path / "classifier" / "diffusion_pytorch_model.safetensors").exists()
    assert not list(tmp_path.rglob("*.bin"))
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.classifier, TimeDependentClassifier)
    for kw in ({}, {"class_labels": 1, "guidance_scale": 2.0}):
        a = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen(), **kw).images
        b = loaded(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen(), **kw).images
        torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_save_without_classifier(tmp_path):
    p = PSLDPipeline(unet=tiny_unet(), scheduler=SSCSScheduler())
    p.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["classifier"] == [None, None]
    assert index["scheduler"] == ["diffusers_psld.schedulers.scheduling_sscs", "SSCSScheduler"]
    loaded = PSLDPipeline.from_pretrained(tmp_path)
    assert loaded.classifier is None and isinstance(loaded.scheduler, SSCSScheduler)
    loaded2 = PSLDPipeline.from_pretrained(tmp_path, classifier=None)
    assert loaded2.classifier is None


def test_hub_id_loading_from_preseeded_cache(pipe, tmp_path, monkeypatch):
    """A Hub repo id goes through snapshot_download (HF_HUB_OFFLINE=1 + a hand-built cache, ecosystem §9)."""
    import huggingface_hub.constants as hc

    cache = tmp_path / "hub"
    sha = "0123456789abcdef0123456789abcdef01234567"
    snap = cache / "models--someuser--psld-tiny" / "snapshots" / sha
    pipe.save_pretrained(snap)
    (cache / "models--someuser--psld-tiny" / "refs").mkdir(parents=True)
    (cache / "models--someuser--psld-tiny" / "refs" / "main").write_text(sha)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)
    loaded = PSLDPipeline.from_pretrained("someuser/psld-tiny", cache_dir=str(cache))
    assert isinstance(loaded.classifier, TimeDependentClassifier)
    assert isinstance(loaded.scheduler, PSLDScheduler)
    with pytest.raises(Exception):
        PSLDPipeline.from_pretrained("someuser/not-there", cache_dir=str(cache))


def test_missing_relative_dir_that_looks_like_a_repo_id(tmp_path, monkeypatch):
    """'outputs/run' is a relative path and a valid repo id: offline, the error names both readings."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(FileNotFoundError, match=r"no local directory .*outputs/psld-run.* Hub repo id"):
        PSLDPipeline.from_pretrained("outputs/psld-run", cache_dir=str(tmp_path / "cache"))


def test_hub_id_passes_download_kwargs(pipe, tmp_path, monkeypatch):
    pipe.save_pretrained(tmp_path / "snap")
    calls = []

    def fake(repo_id, **kw):
        calls.append((repo_id, kw))
        return str(tmp_path / "snap")

    monkeypatch.setattr(pipeline_module, "_snapshot_download", fake)
    PSLDPipeline.from_pretrained("ns/name", revision="v1", token="hf_x", cache_dir=None)
    assert calls == [("ns/name", {"revision": "v1", "token": "hf_x"})]


def test_determinism_and_generator(pipe):
    a = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=gen(5)).images
    b = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=gen(5)).images
    c = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=gen(6)).images
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    gl = pipe(batch_size=2, num_inference_steps=4, output_type="np", generator=[gen(1), gen(2)]).images
    g1 = pipe(batch_size=1, num_inference_steps=4, output_type="np", generator=[gen(1)]).images
    np.testing.assert_allclose(gl[:1], g1, atol=1e-5)  # per-sample generators: sample 0 does not depend on the batch


def test_output_types_and_ranges(pipe):
    pil = pipe(batch_size=2, num_inference_steps=2, generator=gen()).images
    assert isinstance(pil, list) and len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    arr = pipe(batch_size=2, num_inference_steps=2, output_type="np", generator=gen()).images
    assert arr.shape == (2, 8, 8, 1) and arr.dtype == np.float32 and arr.min() >= 0 and arr.max() <= 1
    pt = pipe(batch_size=2, num_inference_steps=2, output_type="pt", generator=gen()).images
    assert pt.shape == (2, 1, 8, 8) and pt.min() >= 0 and pt.max() <= 1
    np.testing.assert_allclose(pt.permute(0, 2, 3, 1).numpy(), arr)
    tup = pipe(batch_size=1, num_inference_steps=2, output_type="pt", return_dict=False)
    assert isinstance(tup, tuple) and len(tup) == 1
    out = pipe(batch_size=2, num_inference_steps=2, output_type="pt", return_momentum=True, generator=gen())
    assert out.momentum.shape == (2, 1, 8, 8) and torch.equal(out.images, pt)
    out = pipe(batch_size=2, num_inference_steps=2, output_type="np", return_momentum=True, return_dict=False)
    assert len(out) == 2 and out[1].shape == (2, 8, 8, 1)


def test_callbacks(pipe):
    seen = []

    def cb(p, i, t, tensors):
        seen.append((i, float(t), set(tensors)))
        if i == p.num_timesteps - 1:
            return {"sample": torch.zeros_like(tensors["sample"])}
        return {}

    out = pipe(batch_size=1, num_inference_steps=4, output_type="pt", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
    assert [s[0] for s in seen] == [0, 1, 2, 3]
    assert seen[0][2] == {"sample", "pred_original_sample"}
    assert seen[-1][1] == pytest.approx(pipe.scheduler.config.sampling_eps)
    assert torch.all(out.images == 0.5)  # the replaced final state (x = 0) maps to 0.5
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(num_inference_steps=2, callback_on_step_end=cb, callback_on_step_end_tensor_inputs=["noise_pred"])


@pytest.mark.parametrize(
    "ret, err, match",
    [
        (lambda tensors: 5, TypeError, "returned|return None or a dict"),
        (lambda tensors: [tensors["sample"]], TypeError, "return None or a dict"),
        (lambda tensors: {"sampel": tensors["sample"]}, ValueError, "sampel.*allowed"),
        (lambda tensors: {"sample": tensors["sample"][:, :1]}, ValueError, r"shape \(1, 1, 8, 8\).*\(1, 2, 8, 8\)"),
        (lambda tensors: {"sample": tensors["sample"].long()}, TypeError, "'sample'.*int64"),
        (lambda tensors: {"latents": "x"}, TypeError, "'latents'.*str"),
        (lambda tensors: {"sample": tensors["sample"] * float("nan")}, ValueError, "NaN"),
        (lambda tensors: {"pred_original_sample": tensors["pred_original_sample"] + 1}, ValueError, "pred_original_sample"),
        (lambda tensors: {"sample": tensors["sample"] + 1, "latents": tensors["sample"] - 1}, ValueError, "both"),
    ],
)
def test_callback_return_values_are_checked(pipe, ret, err, match):
    """A callback's garbage (wrong type, typo'd key, wrong shape / dtype) raises instead of being ignored."""
    def cb(p, i, t, tensors):
        return ret(tensors)

    with pytest.raises(err, match="`callback_on_step_end`") as info:
        pipe(num_inference_steps=2, output_type="pt", callback_on_step_end=cb,
             callback_on_step_end_tensor_inputs=["sample", "pred_original_sample"])
    assert re.search(match, str(info.value)), str(info.value)


def test_callback_may_return_none_or_its_inputs(pipe):
    for ret in (lambda tensors: None, lambda tensors: tensors, lambda tensors: {}):
        out = pipe(num_inference_steps=2, output_type="pt", callback_on_step_end=lambda p, i, t, ts: ret(ts),
                   callback_on_step_end_tensor_inputs=["sample", "latents", "pred_original_sample"])
        assert out.images.shape == (1, 1, 8, 8)


def test_pipeline_callback_object(pipe):
    from diffusers.callbacks import PipelineCallback

    class Count(PipelineCallback):
        tensor_inputs = ["sample"]

        def callback_fn(self, pipeline, step_index, timestep, callback_kwargs):
            self.n = getattr(self, "n", 0) + 1
            return callback_kwargs

    cb = Count(cutoff_step_ratio=1.0)
    pipe(num_inference_steps=3, output_type="pt", callback_on_step_end=cb)
    assert cb.n == 3


@pytest.mark.parametrize("sampler", ["em", "pf_euler", "pf_heun", "sscs"])
def test_scheduler_swap(pipe, sampler):
    sched = SSCSScheduler.from_config(pipe.scheduler.config) if sampler == "sscs" else \
        PSLDScheduler.from_config(pipe.scheduler.config, sampler=sampler)
    p = PSLDPipeline(unet=pipe.unet, scheduler=sched)
    p.set_progress_bar_config(disable=True)
    out = p(batch_size=2, num_inference_steps=4, output_type="pt", generator=gen()).images
    assert out.shape == (2, 1, 8, 8) and torch.isfinite(out).all()
    assert isinstance(p.scheduler, SSCSScheduler if sampler == "sscs" else PSLDScheduler)


def test_vp_pipeline():
    p = PSLDPipeline(unet=tiny_unet(k=1), scheduler=PSLDScheduler(diffusion="vp"))
    p.set_progress_bar_config(disable=True)
    assert p(batch_size=2, num_inference_steps=3, output_type="pt").images.shape == (2, 1, 8, 8)
    with pytest.raises(ValueError, match="return_momentum"):
        p(num_inference_steps=2, return_momentum=True)


def test_nfe_equals_num_inference_steps(pipe):
    n = []
    h = pipe.unet.register_forward_hook(lambda *a: n.append(1))
    try:
        pipe(num_inference_steps=5, output_type="pt")
    finally:
        h.remove()
    assert len(n) == 5


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_unet(pipe, dtype):
    p = PSLDPipeline(unet=tiny_unet().to(dtype), scheduler=PSLDScheduler())
    p.set_progress_bar_config(disable=True)
    ref = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler())
    ref.set_progress_bar_config(disable=True)
    a = p(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen()).images
    b = ref(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen()).images
    assert a.dtype == torch.float32 and torch.isfinite(a).all()
    assert (a - b).abs().mean() < 0.05  # same weights, only the network runs in half precision
    assert p.unet.dtype == dtype


def test_unet_dtype_is_resolved_once_per_call_not_per_step(pipe, monkeypatch):
    """diffusers' ``ModelMixin.dtype`` walks every submodule; querying it per step cost ~2.5 % of a CPU step.

    UNet2DModel.forward queries it itself once per call (as in DDPMPipeline); the pipeline may add only O(1)."""
    from diffusers import ModelMixin

    calls = []
    prop = ModelMixin.dtype
    monkeypatch.setattr(ModelMixin, "dtype", property(lambda self: calls.append(type(self).__name__) or prop.fget(self)))
    nfe = 6
    pipe(batch_size=1, num_inference_steps=nfe, output_type="pt", generator=gen())
    assert calls.count("UNet2DModel") <= nfe + 2, calls


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(num_inference_steps=0), "num_inference_steps"),
        (dict(num_inference_steps=1), "num_inference_steps"),
        (dict(num_inference_steps=2.5), "num_inference_steps"),
        (dict(batch_size=0), "batch_size"),
        (dict(output_type="latent"), "output_type"),
        (dict(class_labels=7), "class_labels"),
        (dict(class_labels=[0, 1, 2]), "class_labels"),
        (dict(class_labels=0.5), "class_labels"),
        (dict(class_labels=0, guidance_scale=-1.0), "guidance_scale"),
        (dict(guidance_scale=3.0), "guidance_scale"),
        (dict(class_labels=0, guidance_type="bogus"), "guidance_type"),
        (dict(generator=[torch.Generator()]), "generator"),
        (dict(class_labels=0, guidance_scale=1e20), "guidance_scale"),
        (dict(class_labels=0, guidance_scale=float("inf")), "guidance_scale"),
        (dict(class_labels=0, guidance_scale=float("nan")), "guidance_scale"),
        (dict(class_labels=0, guidance_scale="2"), "guidance_scale"),
        (dict(batch_size=-1), "batch_size"),
        (dict(batch_size=True), "batch_size"),
        (dict(num_inference_steps=np.float64(3.0)), "num_inference_steps"),
        (dict(return_dict="no"), "return_dict"),
        (dict(return_dict=0), "return_dict"),
        (dict(return_momentum="yes"), "return_momentum"),
        (dict(callback_on_step_end=5), "callback_on_step_end"),
        (dict(callback_on_step_end="cb"), "callback_on_step_end"),
        (dict(batch_size=10**9), "batch_size"),  # 512 GB of state: refused before allocating
        (dict(batch_size=10**9, class_labels=0), "batch_size"),
    ],
)
def test_bad_arguments(pipe, kwargs, name):
    args = dict(batch_size=2, num_inference_steps=2)
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=f"`{name}`"):
        pipe(**args)


def test_bad_components():
    with pytest.raises(ValueError, match="unet"):
        PSLDPipeline(unet=tiny_unet(k=1), scheduler=PSLDScheduler())  # 1 channel, k = 2
    clf = TimeDependentClassifier(in_channels=4, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="classifier"):
        PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler(), classifier=clf)


def test_docstring_example_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    finder = doctest.DocTestFinder()
    tests = [t for t in finder.find(pipeline_module) if t.examples and "PSLDPipeline.__call__" in t.name]
    assert tests
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    for t in tests:
        runner.run(t)
    assert runner.failures == 0


def test_custom_pipeline_file(pipe, tmp_path):
    """pipelines/pipeline_psld.py (top level) works as a custom_pipeline for DiffusionPipeline."""
    from diffusers import DiffusionPipeline

    pipe.save_pretrained(tmp_path / "repo")
    path = os.path.join(REPO_ROOT, "pipelines", "pipeline_psld.py")
    loaded = DiffusionPipeline.from_pretrained(tmp_path / "repo", custom_pipeline=path, trust_remote_code=True)
    assert type(loaded).__name__ == "PSLDPipeline"
    loaded.set_progress_bar_config(disable=True)
    out = loaded(batch_size=1, num_inference_steps=2, output_type="pt", generator=gen()).images
    ref = pipe(batch_size=1, num_inference_steps=2, output_type="pt", generator=gen()).images
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=0)  # same weights; float summation order may differ
    if LOCAL_CODE_NEEDS_TRUST:  # diffusers >= 0.38 (earlier releases run local custom code unasked)
        with pytest.raises(ValueError, match="trust_remote_code"):
            DiffusionPipeline.from_pretrained(tmp_path / "repo", custom_pipeline=path)


@pytest.mark.parametrize("generator", [42, "abc", [1, 2], [torch.Generator(), 3], object()])
def test_generator_of_wrong_type_is_a_type_error(pipe, generator):
    with pytest.raises(TypeError, match="`generator`"):
        pipe(batch_size=2, num_inference_steps=2, generator=generator)


def test_numpy_scalars_are_accepted(pipe):
    a = pipe(batch_size=np.int64(2), num_inference_steps=np.int32(3), output_type="pt", generator=gen(),
             class_labels=np.int64(1), guidance_scale=np.float32(2.0)).images
    b = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen(), class_labels=1, guidance_scale=2.0).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)


def test_missing_directory_says_so(tmp_path):
    for path in ("/missing/dir", str(tmp_path / "nope"), "./not/here/either", "~/no-such-psld-dir"):
        with pytest.raises(FileNotFoundError, match="does not exist"):
            PSLDPipeline.from_pretrained(path)
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(FileNotFoundError, match="is a file"):
        PSLDPipeline.from_pretrained(str(tmp_path / "file.txt"))


def test_pickle_only_weights_are_refused(pipe, tmp_path):
    """§7: a UNet saved as ``diffusion_pytorch_model.bin`` (a pickle) is refused unless ``use_safetensors=False``."""
    pipe.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "unet" / "diffusion_pytorch_model.bin").exists()
    with pytest.raises(ValueError, match="`(unet|classifier)` .*only as pickle files.*use_safetensors=False"):
        PSLDPipeline.from_pretrained(tmp_path)
    loaded = PSLDPipeline.from_pretrained(tmp_path, use_safetensors=False)  # explicit opt-in (weights_only=True)
    torch.testing.assert_close(loaded.unet.conv_in.weight, pipe.unet.conv_in.weight, atol=0, rtol=0)
    loaded = PSLDPipeline.from_pretrained(tmp_path, use_safetensors=False, classifier=None)
    pipe.save_pretrained(tmp_path / "safe")
    (tmp_path / "safe" / "checkpoint-1").mkdir()  # training checkpoints (optimizer.bin ...) are not components
    (tmp_path / "safe" / "checkpoint-1" / "optimizer.bin").write_bytes(b"x")
    PSLDPipeline.from_pretrained(tmp_path / "safe")
    for f in (tmp_path / "unet").glob("*.bin"):  # only the classifier is a pickle now; passing it skips the check
        f.unlink()
    pipe.unet.save_pretrained(tmp_path / "unet")
    PSLDPipeline.from_pretrained(tmp_path, classifier=pipe.classifier)


def test_latents_argument(pipe):
    """``latents=`` is the initial [x ; m] state: the same latents give the same output; bad ones are refused."""
    g = gen(3)
    pipe.scheduler.set_timesteps(3)
    z0 = pipe.scheduler.sample_prior((2, 2, 8, 8), generator=g)
    a = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=gen(3)).images
    # the pipeline draws the prior first, so passing that draw and a generator in the same state after it
    g2 = gen(3)
    pipe.scheduler.sample_prior((2, 2, 8, 8), generator=g2)
    b = pipe(batch_size=2, num_inference_steps=3, output_type="pt", generator=g2, latents=z0).images
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    c = pipe(batch_size=2, num_inference_steps=3, output_type="pt", latents=torch.zeros(2, 2, 16, 16)).images
    assert c.shape == (2, 1, 16, 16)  # latents set the size
    for bad, exc in [(torch.zeros(2, 2, 8), ValueError), (torch.zeros(3, 2, 8, 8), ValueError),
                     (torch.zeros(2, 4, 8, 8), ValueError), (torch.zeros(2, 2, 8, 8, dtype=torch.float64), TypeError),
                     (torch.zeros(2, 2, 8, 8, dtype=torch.long), TypeError), (np.zeros((2, 2, 8, 8)), TypeError),
                     (torch.full((2, 2, 8, 8), float("nan")), ValueError), (torch.zeros(2, 2, 7, 7), ValueError),
                     (torch.zeros(2, 2, 8, 8, device="meta"), ValueError)]:
        with pytest.raises(exc, match="`latents`"):
            pipe(batch_size=2, num_inference_steps=2, latents=bad)


def test_latents_callback_name(pipe):
    """diffusers' ``"latents"`` names the state in callbacks (``"sample"`` still works); returning it replaces the state."""
    seen = []

    def cb(p, i, t, tensors):
        seen.append(sorted(tensors))
        if i == p.num_timesteps - 1:
            return {"latents": torch.zeros_like(tensors["latents"])}
        return {}

    out = pipe(num_inference_steps=3, output_type="pt", callback_on_step_end=cb,
               callback_on_step_end_tensor_inputs=["latents", "sample"])
    assert seen[0] == ["latents", "sample"] and torch.all(out.images == 0.5)


@pytest.mark.parametrize("where", ["unet", "classifier"])
def test_non_finite_values_raise_naming_step_time_and_cause(where):
    from diffusers_psld import NonFiniteError

    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    p = PSLDPipeline(unet=tiny_unet(), scheduler=PSLDScheduler(), classifier=clf)
    p.set_progress_bar_config(disable=True)
    target = p.unet if where == "unet" else p.classifier
    calls = []

    def poison(module, args, output):
        calls.append(1)
        if len(calls) == 3:  # the third call goes bad
            if hasattr(output, "sample"):
                output.sample.fill_(float("nan"))
                return output
            return output * float("nan")
        return None

    h = target.register_forward_hook(poison)
    try:
        with pytest.raises(NonFiniteError, match=r"call 3/5 \(forward time t = [0-9.]+\).*" + ("UNet output" if where == "unet" else "classifier")):
            p(batch_size=1, num_inference_steps=5, class_labels=0, output_type="pt")
    finally:
        h.remove()


def test_non_finite_scheduler_update_is_reported(pipe, monkeypatch):
    from diffusers_psld import NonFiniteError

    p = PSLDPipeline(unet=pipe.unet, scheduler=PSLDScheduler())
    p.set_progress_bar_config(disable=True)
    orig = p.scheduler.step

    def bad_step(*a, **kw):
        out = orig(*a, **kw)
        out.prev_sample.fill_(float("inf"))
        return out

    monkeypatch.setattr(p.scheduler, "step", bad_step)
    with pytest.raises(NonFiniteError, match=r"call 1/4 .*scheduler update"):
        p(num_inference_steps=4, output_type="pt")


@pytest.mark.skipif(not os.path.exists("/proc/meminfo"), reason="Linux /proc/meminfo")
def test_available_memory_counts_reclaimable_cache():
    """The batch-size memory check uses MemAvailable, not free pages (near 0 on a machine full of page cache)."""
    from diffusers_psld.pipelines.inputs import available_memory

    with open("/proc/meminfo") as f:
        info = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f}
    got = available_memory("cpu")
    assert abs(got - info["MemAvailable"]) < 256 * 2**20  # read moments apart
    assert got >= info["MemFree"] - 256 * 2**20
