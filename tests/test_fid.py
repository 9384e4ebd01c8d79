"""FID / IS tooling: uint8 conversion, resumable seed shards, offline features, stubbed Inception path."""
import os

import numpy as np
import pytest
import torch

from diffusers_psld.evaluation import features as fx
from diffusers_psld.evaluation import fid as fm



@pytest.fixture(scope="module")
def digits8():
    return fx.load_digits_images(8)


@pytest.fixture(scope="module")
def net8():
    torch.manual_seed(0)
    return fx.DigitsFeatureNet(image_size=8, feature_dim=16, width=8).eval()


def test_to_uint8_formats():
    x = torch.tensor([0.0, 0.5, 0.9999, 1.2, -0.1]).reshape(1, 1, 1, 5)
    assert fm.to_uint8(x).flatten().tolist() == [0, 128, 255, 255, 0]  # rounded (half to even), clamped
    a = np.random.default_rng(0).random((2, 4, 4, 3)).astype(np.float32)
    out = fm.to_uint8(a)
    assert out.shape == (2, 3, 4, 4) and out.dtype == torch.uint8
    assert torch.equal(out, fm.to_uint8(torch.from_numpy(a).permute(0, 3, 1, 2)))
    import PIL.Image

    pil = [PIL.Image.fromarray(np.full((4, 4), 7, np.uint8))]
    assert fm.to_uint8(pil).shape == (1, 1, 4, 4)
    with pytest.raises(ValueError, match="images"):
        fm.to_uint8(np.zeros((4, 4)))


def test_to_uint8_is_numpy_to_pil():
    """One float → uint8 rule: to_uint8 gives the bytes of diffusers' numpy_to_pil (the pipeline's "pil")."""
    from diffusers.utils.pil_utils import numpy_to_pil

    a = np.random.default_rng(1).random((6, 5, 5, 1)).astype(np.float32)
    a[0, 0, 0, 0], a[0, 0, 1, 0] = 0.5 / 255, 2.5 / 255  # exact half levels
    pil = np.stack([np.asarray(im) for im in numpy_to_pil(a)])[..., None]
    assert np.array_equal(fm.to_uint8(a).permute(0, 2, 3, 1).numpy(), pil)


def test_training_digits_through_output_transform_give_fid_zero(net8):
    """A perfect model (the training digits pushed through PSLDPipeline's output transform) scores FID 0.

    With truncation instead of rounding ~23 % of the pixels came back one level low (FID 0.0059).
    """
    from diffusers_psld.data import load_digits_dataset

    real, _ = fx.load_digits_images(8)
    x = load_digits_dataset(resolution=8).images  # what the UNet is trained on, in [-1, 1]
    fake_float = (x / 2 + 0.5).clamp(0, 1)  # PSLDPipeline's output transform (output_type="pt"/"np")
    fake = fm.to_uint8(fake_float.permute(0, 2, 3, 1).numpy())
    assert torch.equal(fake, real)
    r = fm.compute_fid_is(fake, real, net8, splits=2)
    assert abs(r["fid"]) < 1e-3, r["fid"]
    # the truncating rule this replaced is not exact on the same data (the test can fail)
    trunc = (fake_float * 255).to(torch.uint8)
    assert (trunc != real).float().mean() > 0.05


def test_shards_record_provenance_and_refuse_other_settings(tmp_path):
    d = str(tmp_path / "s")
    fp = {"weights_sha256": {"unet/w.safetensors": "aa"}, "num_inference_steps": 100,
          "scheduler_config": {"sampler": "em", "gamma": 0.01}}
    f = _Counter()
    fm.generate_shards(f, d, 10, 4, base_seed=3, fingerprint=fp)
    with np.load(fm.shard_path(d, 0)) as z:
        import json

        prov = json.loads(str(z["provenance"]))
    assert prov["fingerprint"]["num_inference_steps"] == 100 and prov["seed"] == 3 and "round" in prov["uint8_rule"]
    before = fm.load_shards(d, 10, 4, fingerprint=fp, base_seed=3)["images"]
    # an interrupted identical run resumes: only the missing shard is generated
    os.remove(fm.shard_path(d, 1))
    st = fm.generate_shards(f, d, 10, 4, base_seed=3, fingerprint=fp)
    assert st["generated"] == [1] and st["skipped"] == [0, 2] and st["regenerated"] == []
    assert torch.equal(fm.load_shards(d, 10, 4, fingerprint=fp, base_seed=3)["images"], before)
    # other NFE / sampler / weights / seed: refused before anything is written, naming the fields
    for other, field in [({**fp, "num_inference_steps": 5}, "num_inference_steps"),
                         ({**fp, "scheduler_config": {"sampler": "sscs", "gamma": 0.01}}, "scheduler_config.sampler"),
                         ({**fp, "weights_sha256": {"unet/w.safetensors": "bb"}}, "weights_sha256")]:
        n_calls = len(f.calls)
        with pytest.raises(fm.ShardMismatchError, match=field):
            fm.generate_shards(f, d, 10, 4, base_seed=3, fingerprint=other)
        assert len(f.calls) == n_calls
        with pytest.raises(fm.ShardMismatchError, match=field):
            fm.load_shards(d, 10, 4, fingerprint=other, base_seed=3)
    with pytest.raises(fm.ShardMismatchError, match="seed"):
        fm.generate_shards(f, d, 10, 4, base_seed=4, fingerprint=fp)
    # explicit regeneration overwrites them all with the new settings
    new = {**fp, "num_inference_steps": 5}
    st = fm.generate_shards(f, d, 10, 4, base_seed=3, fingerprint=new, on_mismatch="regenerate")
    assert st["generated"] == [0, 1, 2] and st["regenerated"] == [0, 1, 2]
    fm.load_shards(d, 10, 4, fingerprint=new, base_seed=3)
    # shards without provenance (older versions) are not trusted
    legacy = str(tmp_path / "legacy")
    os.makedirs(legacy)
    np.savez(fm.shard_path(legacy, 0), images=np.zeros((4, 4, 4, 1), np.uint8), seed=np.int64(3), seconds=np.float64(0))
    with pytest.raises(fm.ShardMismatchError, match="older version"):
        fm.generate_shards(f, legacy, 4, 4, base_seed=3, fingerprint=fp)
    with pytest.raises(ValueError, match="on_mismatch"):
        fm.generate_shards(f, legacy, 4, 4, on_mismatch="ignore")


def test_weights_sha256(tmp_path):
    (tmp_path / "unet").mkdir()
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"abc")
    h = fm.weights_sha256(str(tmp_path))
    assert h == {"unet/diffusion_pytorch_model.safetensors":
                 "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"}
    (tmp_path / "checkpoint-5").mkdir()  # training checkpoints are not part of the pipeline
    (tmp_path / "checkpoint-5" / "optimizer.bin").write_bytes(b"x")
    assert fm.weights_sha256(str(tmp_path)) == h
    (tmp_path / "classifier").mkdir()
    (tmp_path / "classifier" / "diffusion_pytorch_model.safetensors").write_bytes(b"abc")
    (tmp_path / "model_index.json").write_text('{"_class_name": "PSLDPipeline", "unet": ["diffusers", "UNet2DModel"], '
                                               '"classifier": ["diffusers_psld.models.classifier", "T"]}')
    assert sorted(fm.weights_sha256(str(tmp_path))) == ["classifier/diffusion_pytorch_model.safetensors",
                                                        "unet/diffusion_pytorch_model.safetensors"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no weight file"):
        fm.weights_sha256(str(tmp_path / "empty"))


def test_shard_plan():
    assert fm.shard_plan(10, 4) == [4, 4, 2]
    assert fm.shard_plan(8, 4) == [4, 4]
    with pytest.raises(ValueError, match="shard_size"):
        fm.shard_plan(8, 0)


class _Counter:
    """A sample function recording calls; images depend only on the generator."""

    def __init__(self):
        self.calls = []

    def __call__(self, n, generator):
        self.calls.append(n)
        return torch.rand(n, 1, 4, 4, generator=generator)


def test_generate_shards_seeds_resume_and_world_size(tmp_path):
    f = _Counter()
    st = fm.generate_shards(f, str(tmp_path / "a"), 10, 4, base_seed=3)
    assert st["generated"] == [0, 1, 2] and st["skipped"] == [] and f.calls == [4, 4, 2]
    loaded = fm.load_shards(str(tmp_path / "a"), 10, 4)
    assert loaded["images"].shape == (10, 1, 4, 4) and loaded["images"].dtype == torch.uint8
    # shard i uses seed base + i
    expect = fm.to_uint8(torch.rand(4, 1, 4, 4, generator=torch.Generator().manual_seed(3 + 1)))
    assert torch.equal(loaded["images"][4:8], expect)
    with np.load(fm.shard_path(str(tmp_path / "a"), 2)) as z:
        assert int(z["seed"]) == 5
    # resume: nothing regenerated
    mtimes = [os.path.getmtime(fm.shard_path(str(tmp_path / "a"), i)) for i in range(3)]
    st2 = fm.generate_shards(f, str(tmp_path / "a"), 10, 4, base_seed=3)
    assert st2["generated"] == [] and st2["skipped"] == [0, 1, 2] and len(f.calls) == 3
    assert mtimes == [os.path.getmtime(fm.shard_path(str(tmp_path / "a"), i)) for i in range(3)]
    # a corrupt shard is regenerated
    with open(fm.shard_path(str(tmp_path / "a"), 1), "wb") as fh:
        fh.write(b"garbage")
    st3 = fm.generate_shards(f, str(tmp_path / "a"), 10, 4, base_seed=3)
    assert st3["generated"] == [1]
    assert torch.equal(fm.load_shards(str(tmp_path / "a"), 10, 4)["images"], loaded["images"])
    # two "processes" split the shards and give the same images as one
    g = _Counter()
    s0 = fm.generate_shards(g, str(tmp_path / "b"), 10, 4, base_seed=3, process_index=0, num_processes=2)
    s1 = fm.generate_shards(g, str(tmp_path / "b"), 10, 4, base_seed=3, process_index=1, num_processes=2)
    assert s0["generated"] == [0, 2] and s1["generated"] == [1]
    assert torch.equal(fm.load_shards(str(tmp_path / "b"), 10, 4)["images"], loaded["images"])
    with pytest.raises(ValueError, match="process_index"):
        fm.generate_shards(g, str(tmp_path / "b"), 10, 4, process_index=2, num_processes=2)
    with pytest.raises(FileNotFoundError):
        fm.load_shards(str(tmp_path / "c"), 10, 4)


def test_png_roundtrip(tmp_path):
    imgs = torch.randint(0, 256, (3, 1, 5, 5), dtype=torch.uint8)
    fm.save_pngs(imgs, str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["000000.png", "000001.png", "000002.png"]
    assert torch.equal(fm.load_image_folder(str(tmp_path), channels=1), imgs)


def test_custom_feature_fid_and_is(digits8, net8, tmp_path):
    imgs, _ = digits8
    a, b = imgs[:200], imgs[200:400]
    same = fm.compute_fid_is(a, a, net8, splits=4)
    assert abs(same["fid"]) < 1e-3
    assert same["comparable_to_published"] is False and "NOT comparable" in same["note"]
    close = fm.compute_fid_is(a, b, net8, splits=4)
    noise = fm.compute_fid_is(torch.randint(0, 256, (200, 1, 8, 8), dtype=torch.uint8), b, net8, splits=4)
    assert 0 < close["fid"] < noise["fid"]
    assert 1.0 <= close["is_mean"] <= 10.0 and close["is_splits"] == 4
    # same network through a saved directory (safetensors only)
    net8.save_pretrained(str(tmp_path / "fx"))
    assert os.path.isfile(tmp_path / "fx" / "diffusion_pytorch_model.safetensors")
    assert not any(p.endswith((".bin", ".pt", ".pth")) for p in os.listdir(tmp_path / "fx"))
    again = fm.compute_fid_is(a, b, str(tmp_path / "fx"), splits=4)
    assert again["fid"] == pytest.approx(close["fid"], rel=1e-5)
    assert again["is_mean"] == pytest.approx(close["is_mean"], rel=1e-5)
    # RGB input to a grey network and other sizes are handled by preprocessing
    rgb16 = torch.nn.functional.interpolate(a.float(), size=16).to(torch.uint8).repeat(1, 3, 1, 1)
    assert net8.features(rgb16).shape == (200, 16)


def test_inception_path_with_stubbed_torchmetrics(monkeypatch, tmp_path):
    """The Inception branch builds torchmetrics' NoTrainInceptionV3 (2048 pool / logits_unbiased) with the weights path."""
    from torchmetrics.image import fid as tm_fid

    made = []

    class StubInception(torch.nn.Module):
        def __init__(self, name, features_list, feature_extractor_weights_path=None):
            super().__init__()
            made.append((name, list(features_list), feature_extractor_weights_path))
            self.out = 64 if features_list == ["64"] else 1008
            torch.manual_seed(len(made))
            self.proj = torch.nn.Linear(3 * 8 * 8, self.out)
            self.seen = []

        def forward(self, x):
            self.seen.append((x.dtype, tuple(x.shape)))
            assert x.dtype == torch.uint8 and x.shape[1] == 3
            return (self.proj(x.float().flatten(1) / 255.0),)  # torch-fidelity returns a tuple

    monkeypatch.setattr(tm_fid, "NoTrainInceptionV3", StubInception)
    weights = tmp_path / "weights-inception-2015-12-05-6726825d.pth"
    weights.write_bytes(b"stub")
    g = torch.Generator().manual_seed(0)
    fake = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    real = torch.randint(0, 256, (40, 1, 8, 8), dtype=torch.uint8, generator=g)
    out = fm.compute_fid_is(fake, real, "inception", inception_weights=str(weights), splits=2,
                            inception_fid_features=64)  # 64 keeps the covariance maths cheap
    assert made == [("inception-v3-compat", ["64"], str(weights)),
                    ("inception-v3-compat", ["logits_unbiased"], str(weights))]
    assert out["comparable_to_published"] is True and out["inception_weights"] == str(weights)
    assert np.isfinite(out["fid"]) and out["fid"] > 0 and out["is_mean"] >= 1.0
    same = fm.compute_fid_is(real, real, "inception", inception_weights=str(weights), splits=2,
                             inception_fid_features=64)
    assert abs(same["fid"]) < 1e-2
    with pytest.raises(ValueError, match="inception_weights"):
        fm.build_metrics("inception", inception_weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="inception_fid_features"):
        fm.build_metrics("inception", inception_fid_features=100)
    # default: the standard 2048-d pool features
    made.clear()
    fm.build_metrics("inception", inception_weights=str(weights))
    assert made[0][1] == ["2048"]


def test_build_metrics_errors(tmp_path):
    with pytest.raises(ValueError, match="extractor"):
        fm.build_metrics(str(tmp_path / "nope"))
    with pytest.raises(ValueError, match="extractor"):
        fm.build_metrics(42)
    with pytest.raises(ValueError, match="splits"):
        fm.build_metrics("inception", splits=0)


def test_train_feature_extractor_quick(digits8, tmp_path):
    imgs, labels = digits8
    net, info = fx.train_feature_extractor(imgs[:600], labels[:600], image_size=8, epochs=10, lr=5e-3,
                                           output_dir=str(tmp_path))
    assert info["val_accuracy"] > 0.5  # well above chance (0.1) after 10 short epochs
    assert torch.get_num_threads() == 1  # restored (module fixture set 1)
    loaded = fx.load_feature_extractor(str(tmp_path))
    x = imgs[:5]
    assert torch.allclose(loaded(x), net(x), atol=1e-6)
    with pytest.raises(ValueError, match="labels"):
        fx.train_feature_extractor(imgs[:10], None)
    with pytest.raises(ValueError, match="image_size"):
        fx.load_digits_images(2)


@pytest.mark.parametrize("sched_kw", [{"input_preconditioning": True, "sigma_data": 0.3},
                                      {"prediction_type": "sample", "sampler": "pf_heun"}])
def test_bare_unet_scheduler_layout_samples_exactly_like_the_pipeline_directory(tmp_path, sched_kw):
    """One sampling path for every layout: without model_index.json the same PSLDPipeline loop runs
    (``scale_model_input`` for input preconditioning, ``prediction_type`` conversion)."""
    import shutil

    from diffusers import UNet2DModel

    from diffusers_psld import PSLDPipeline, PSLDScheduler

    sched = PSLDScheduler(**sched_kw)
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=sched.output_channels(1), block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)
    with torch.no_grad():  # a network whose output depends strongly on its input scale
        for p in unet.parameters():
            p.mul_(3.0)
    PSLDPipeline(unet=unet, scheduler=sched).save_pretrained(tmp_path / "full")
    shutil.copytree(tmp_path / "full", tmp_path / "bare", ignore=shutil.ignore_patterns("model_index.json", "*.py"))
    out = {}
    for layout in ("full", "bare"):
        fn, info = fm.pipeline_sample_fn(str(tmp_path / layout), num_inference_steps=4)
        out[layout] = fm.to_uint8(fn(3, torch.Generator().manual_seed(1)))
        fingerprint = info["fingerprint"]
        assert info["scheduler_config"]["prediction_type"] == sched.config.prediction_type
    assert info["model_layout"].startswith("unet/ + scheduler/")
    assert torch.equal(out["full"], out["bare"])
    assert fingerprint["sampling_loop"] == "PSLDPipeline"


def test_bare_layout_missing_or_unknown_component_is_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(ValueError, match=r"must hold unet/config.json"):
        fm.pipeline_sample_fn(str(tmp_path))
    (tmp_path / "unet" / "config.json").write_text('{"_class_name": "Transformer2DModel"}')
    with pytest.raises(ValueError, match=r"`_class_name` must be one of \['NCSNppModel', 'UNet2DModel'\]"):
        fm.pipeline_sample_fn(str(tmp_path))


@pytest.mark.parametrize("replacement, what", [(np.zeros((4, 2, 2, 1), np.uint8), r"\[4, 2, 2, 1\] uint8"),
                                               (np.zeros((4, 4, 4, 3), np.uint8), r"\[4, 4, 4, 3\] uint8"),
                                               (np.zeros((4, 4, 4, 1), np.float32), r"\[4, 4, 4, 1\] float32")])
def test_a_shard_of_another_image_format_is_named(tmp_path, replacement, what):
    """An 8×8 shard among 16×16 ones (here 2×2 among 4×4): a ShardMismatchError naming the shard, not NumPy's
    concatenate error."""
    d = str(tmp_path / "s")
    fp = {"weights_sha256": {"unet/w.safetensors": "aa"}}
    fm.generate_shards(_Counter(), d, 12, 4, base_seed=0, fingerprint=fp)
    path = fm.shard_path(d, 1)
    with np.load(path) as z:
        kept = {k: z[k] for k in z.files}
    np.savez(path, **{**kept, "images": replacement})  # same provenance, other images
    with pytest.raises(fm.ShardMismatchError, match=rf"shard 1 \(.*shard_00001.npz\) holds images of shape {what}, "
                                                     r"expected \[4, 4, 4, 1\] uint8 like shard 0"):
        fm.load_shards(d, 12, 4, fingerprint=fp, base_seed=0)
