"""NCSN++ (diffusers_psld.models.ncsnpp): equivalence with the OFFICIAL PSLD networks (fixture produced by
tests/fixtures/ncsnpp/make_fixture.py from mandt-lab/PSLD), converter strictness, presets, validation, save/load."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_psld.models import PRESETS, NCSNppClassifier, NCSNppModel, build_unet, list_presets
from diffusers_psld.models.ncsnpp_convert import (classifier_config_from_official, config_from_official,
                                                  convert_state_dict, strip_prefix)
from diffusers_psld.models.unet_presets import preset_config

from _versions import FIR_IN_HALF_PRECISION

FIXTURES = Path(__file__).resolve().parent / "fixtures" / "ncsnpp"
META = json.loads((FIXTURES / "variants.json").read_text())["variants"]


def load_variant(name):
    v = META[name]
    tensors = load_file(FIXTURES / f"{name}.safetensors")
    official = {k: t for k, t in tensors.items() if k.startswith("all_modules.")}
    if v["kind"] == "score":
        model = NCSNppModel(**config_from_official(v["official_config"], v["image_size"]))
    else:
        model = NCSNppClassifier(**classifier_config_from_official(v["official_config"], v["image_size"]))
    return model, official, tensors


@pytest.mark.parametrize("name", sorted(META))
def test_matches_official_network_fp32(name):
    """Converted weights reproduce the official network's float32 output to <= 1e-5 (measured ~1.6e-6)."""
    model, official, t = load_variant(name)
    model.load_state_dict(convert_state_dict(official, model), strict=True)
    model.eval()
    with torch.no_grad():
        out = model(t["input.sample"], t["input.timestep"])
    out = out.sample if hasattr(out, "sample") else out
    ref = t["output"]
    assert ref.abs().max() > 0.5  # the fixture is not degenerate (random weights, not the ~0 official init)
    if META[name]["kind"] == "score" and ref.shape[1] * 2 == out.shape[1]:  # CLD: official predicts ε_m only
        assert model.config.output_momentum_only and torch.equal(out[:, : ref.shape[1]], torch.zeros_like(ref))
        out = out[:, ref.shape[1]:]
    assert out.shape == ref.shape
    assert (out - ref).abs().max().item() <= 1e-5


def test_equivalence_detects_a_wrong_mapping():
    """The fixture is sensitive: swapping q and k of one attention layer breaks the match."""
    model, official, t = load_variant("cifar10")
    sd = convert_state_dict(official, model)
    key = next(k for k in sd if k.endswith("to_q.weight"))
    sd[key], sd[key.replace("to_q", "to_k")] = sd[key.replace("to_q", "to_k")], sd[key]
    model.load_state_dict(sd)
    with torch.no_grad():
        out = model.eval()(t["input.sample"], t["input.timestep"]).sample
    assert (out - t["output"]).abs().max() > 1e-3


def test_converter_is_strict_and_lists_problems():
    model, official, _ = load_variant("celeba64")
    bad = dict(official)
    dropped = next(k for k in bad if "Dense_0.weight" in k)
    del bad[dropped]
    bad["all_modules.999.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="not found in the official state dict") as e:
        convert_state_dict(bad, model)
    assert "all_modules.999.weight" in str(e.value)
    wrong = NCSNppModel(**dict(config_from_official(META["celeba64"]["official_config"], 16), nf=8))
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict(official, wrong)
    with pytest.raises(ValueError, match="no tensors under 'ema_score_fn.'"):
        strip_prefix({"score_fn.all_modules.0.W": torch.zeros(1)}, "ema_score_fn.")


def test_official_config_errors_name_the_key():
    cfg = dict(META["cifar10"]["official_config"])
    with pytest.raises(ValueError, match="out_ch"):
        config_from_official(dict(cfg, out_ch=4), 16)
    with pytest.raises(ValueError, match="nonlinearity"):
        config_from_official(dict(cfg, nonlinearity="elu"), 16)
    with pytest.raises(ValueError, match="lacks"):
        config_from_official({k: v for k, v in cfg.items() if k != "ch_mult"}, 16)


@pytest.mark.parametrize("kwargs,match", [
    (dict(progressive="residual"), "cannot run it"),
    (dict(fir_kernel=(1, 2, 1)), "fir_kernel"),
    (dict(resblock_type="ddpm"), "resblock_type"),
    (dict(embedding_type="learned"), "embedding_type"),
    (dict(sample_size=18), "sample_size"),
    (dict(dropout=1.0), "dropout"),
    (dict(output_momentum_only=True, out_channels=3, in_channels=3), "even"),
])
def test_invalid_settings_raise(kwargs, match):
    base = dict(sample_size=16, nf=8, ch_mult=(1, 2, 2), num_res_blocks=1, attn_resolutions=(8,))
    with pytest.raises(ValueError, match=match):
        NCSNppModel(**dict(base, **kwargs))


def randomize_(model, seed=0):
    """O(1) random weights (the fresh NCSN++ init outputs ~0, which would hide time dependence)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.copy_(torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5)
    return model


def test_forward_contract_and_input_errors():
    m = randomize_(build_unet("ncsnpp-tiny", 1, 2, sample_size=8)).eval()
    x = torch.randn(3, 2, 8, 8)
    out = m(x, torch.tensor(0.5))  # 0-d time broadcasts; a Python float is NOT cast to int (unlike UNet2DModel)
    assert out.sample.shape == x.shape and out.sample.dtype == torch.float32
    assert torch.allclose(m(x, 0.5).sample, out.sample) and not torch.allclose(m(x, 0.7).sample, out.sample)
    assert m(x, 0.5, return_dict=False)[0].shape == x.shape
    with pytest.raises(ValueError, match="> 0"):  # Fourier features of log t
        m(x, torch.tensor([0.5, 0.0, 0.1]))
    with pytest.raises(ValueError, match="sample"):
        m(torch.randn(1, 3, 8, 8), 0.5)
    with pytest.raises(ValueError, match="multiples of 2"):
        m(torch.randn(1, 2, 7, 8), 0.5)
    with pytest.raises(ValueError, match="timestep"):
        m(x, torch.tensor([0.1, 0.2]))
    with pytest.raises(ValueError, match="unconditional"):
        m(x, 0.5, class_labels=torch.tensor([0, 1, 2]))
    cc = build_unet("ncsnpp-tiny", 1, 2, sample_size=8, num_class_embeds=3)
    assert cc(x, 0.5, class_labels=torch.tensor([0, 1, 2])).sample.shape == x.shape
    with pytest.raises(ValueError, match="class_labels"):
        cc(x, 0.5)


@pytest.mark.skipif(not FIR_IN_HALF_PRECISION, reason="diffusers < 0.39 runs the FIR resampling kernel in float32 "
                    "whatever the input dtype (conv2d dtype error in bfloat16)")
def test_save_load_roundtrip_safetensors_and_bf16(tmp_path):
    m = NCSNppModel(sample_size=8, in_channels=6, out_channels=6, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                    attn_resolutions=(4,), output_momentum_only=True).eval()
    m.save_pretrained(tmp_path / "m", safe_serialization=True)
    assert (tmp_path / "m" / "diffusion_pytorch_model.safetensors").exists()
    m2 = NCSNppModel.from_pretrained(tmp_path / "m").eval()
    x = torch.randn(2, 6, 8, 8)
    a, b = m(x, torch.tensor([0.3, 0.9])).sample, m2(x, torch.tensor([0.3, 0.9])).sample
    assert torch.equal(a, b) and torch.equal(a[:, :3], torch.zeros_like(a[:, :3]))
    assert m2.config.output_momentum_only and list(m2.config.ch_mult) == [1, 2]
    h = m2.to(torch.bfloat16)
    out = h(x, torch.tensor([0.3, 0.9])).sample
    assert out.dtype == torch.bfloat16 and h.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()


def test_presets_paper_sizes_and_time_scale():
    """Parameter counts of the paper's networks (C = 3, k = 2); all NCSN++ presets record time_scale 1."""
    expected = {"ncsnpp-cifar10": 97_627_910, "ncsnpp-celeba64": 62_769_286, "ncsnpp-afhqv2-128": 65_816_582}
    for name, n in expected.items():
        with torch.device("meta"):
            model = build_unet(name, 3, 2)
        assert isinstance(model, NCSNppModel) and sum(p.numel() for p in model.parameters()) == n
        assert PRESETS[name]["time_scale"] == 1.0
    cfg = preset_config("ncsnpp-cifar10", 3, 2)
    assert cfg["ch_mult"] == (2, 2, 2) and cfg["num_res_blocks"] == 8 and cfg["progressive_input"] == "residual"
    assert cfg["embedding_type"] == "fourier" and cfg["fir"] and cfg["dropout"] == 0.15
    rows = {r["preset"]: r for r in list_presets(3, 2)}
    assert rows["ncsnpp-cifar10"]["parameters"] == 97_627_910
    with pytest.raises(ValueError, match="--resolution"):
        build_unet("ncsnpp-cifar10", 3, 2, sample_size=30)


def test_fresh_init_follows_ncsnpp():
    """DDPM init: residual branches and the output start at ~0 (init_scale 0), so the fresh net outputs ~0."""
    m = build_unet("ncsnpp-tiny", 3, 2).eval()
    assert m.up_blocks[0].resnets[0].conv2.weight.abs().max() < 1e-4
    assert m.conv_out.weight.abs().max() < 1e-4 and m.encoder.conv_in.weight.abs().max() > 1e-2
    with torch.no_grad():
        assert m(torch.randn(2, 6, 16, 16), 0.5).sample.abs().max() < 1e-3
    clf = NCSNppClassifier(sample_size=8, in_channels=2, num_classes=3, nf=8, ch_mult=(1, 2), num_res_blocks=1,
                           attn_resolutions=(4,))
    assert clf(torch.randn(2, 2, 8, 8), torch.tensor([0.1, 0.9])).shape == (2, 3)
    with pytest.raises(ValueError, match="sample"):
        clf(torch.randn(2, 2, 16, 16), 0.5)
