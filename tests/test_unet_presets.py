"""UNet presets: channel contract k*C, resolution validation, parameter counts."""
import pytest
import torch

from diffusers_psld.models import PRESETS, build_unet, check_resolution, downsample_factor, list_presets
from diffusers_psld.models.unet_presets import preset_config


@pytest.mark.parametrize("k,c", [(1, 3), (2, 1), (2, 3)])
def test_tiny_channels_and_size(k, c):
    unet = build_unet("tiny", c, k)
    assert unet.config.in_channels == unet.config.out_channels == k * c
    assert sum(p.numel() for p in unet.parameters()) < 1_000_000
    x = torch.randn(2, k * c, 16, 16)
    assert unet(x, torch.tensor([1.0, 500.0])).sample.shape == x.shape


def test_class_conditional_null_class():
    unet = build_unet("tiny", 1, 2, sample_size=8, num_class_embeds=11)
    assert unet.config.num_class_embeds == 11
    out = unet(torch.randn(2, 2, 8, 8), torch.tensor([3.0, 4.0]), class_labels=torch.tensor([0, 10])).sample
    assert out.shape == (2, 2, 8, 8)
    with pytest.raises(ValueError, match="num_class_embeds"):
        build_unet("tiny", 1, 2, num_class_embeds=1)


def test_resolution_validation_names_flag():
    assert downsample_factor("cifar10") == 8 and downsample_factor("afhqv2-128") == 16
    assert check_resolution("cifar10", 64) == 64
    for bad in (36, 8, 0, -8):
        with pytest.raises(ValueError, match="--resolution"):
            check_resolution("cifar10", bad)
    with pytest.raises(ValueError, match="--resolution"):
        build_unet("digits", 1, 2, sample_size=18)
    with pytest.raises(ValueError, match="--model_preset"):
        build_unet("nope", 1, 2)


def test_paper_size_counts_on_meta_device():
    with torch.device("meta"):
        unet = build_unet("cifar10", 3, 2)
    # DDPM CIFAR-10 network with 6 channels (ecosystem_facts §4)
    assert sum(p.numel() for p in unet.parameters()) == 35_753_222
    cfg = preset_config("cifar10", 3, 1)
    assert cfg["in_channels"] == 3 and cfg["block_out_channels"] == (128, 256, 256, 256) and cfg["layers_per_block"] == 2


def test_list_presets_has_all_with_counts():
    rows = {r["preset"]: r for r in list_presets(3, 2)}
    assert set(rows) == set(PRESETS) >= {"tiny", "digits", "cifar10", "cifar10-large", "celeba64", "afhqv2-128"}
    assert rows["tiny"]["parameters"] < 1_000_000
    assert 45_000_000 < rows["cifar10-large"]["parameters"] < 70_000_000
    assert all(r["parameters"] > 0 for r in rows.values())
