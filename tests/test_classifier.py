"""TimeDependentClassifier and training/train_classifier.py."""
import os
import sys

import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_psld.models.classifier import TimeDependentClassifier

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "training"))


def test_forward_save_load(tmp_path):
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    z = torch.randn(4, 2, 8, 8)
    t = torch.tensor([1.0, 100.0, 500.0, 999.0])
    out = clf(z, t)
    assert out.shape == (4, 3)
    assert not torch.allclose(clf(z, t), clf(z, t.flip(0)))  # the time matters
    clf.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").exists()
    torch.testing.assert_close(TimeDependentClassifier.from_pretrained(tmp_path)(z, t), out)


def test_bad_inputs():
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    with pytest.raises(ValueError, match="sample"):
        clf(torch.randn(2, 3, 8, 8), torch.ones(2))
    with pytest.raises(ValueError, match="timestep"):
        clf(torch.randn(2, 2, 8, 8), torch.ones(2, dtype=torch.long))
    with pytest.raises(ValueError, match="norm_num_groups"):
        TimeDependentClassifier(block_out_channels=(6, 16), norm_num_groups=4)


def test_train_classifier_script(tmp_path):
    import train_classifier

    model = train_classifier.main(["--output_dir", str(tmp_path), "--max_train_steps", "30", "--train_batch_size", "16",
                                   "--block_out_channels", "8", "16", "--learning_rate", "1e-3", "--resolution", "8"])
    assert model.config.sample_size == 8
    assert isinstance(model, TimeDependentClassifier)
    card = ModelCard.load(tmp_path / "classifier" / "README.md")
    assert card.data.library_name == "diffusers" and "psld" in card.data.tags and card.data.license == "mit"
    assert "Time-dependent classifier" in card.text
    loaded = TimeDependentClassifier.from_pretrained(tmp_path / "classifier")
    assert loaded.config.num_classes == 10 and loaded.config.in_channels == 2
    with pytest.raises(SystemExit):
        train_classifier.parse_args(["--max_train_steps", "0"])


def test_sample_size_is_enforced():
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4, sample_size=8)
    assert clf(torch.randn(2, 2, 8, 8), torch.ones(2)).shape == (2, 3)
    with pytest.raises(ValueError, match="trained on 8×8"):
        clf(torch.randn(2, 2, 16, 16), torch.ones(2))
    with pytest.raises(ValueError, match="sample_size"):
        TimeDependentClassifier(sample_size=0)


def test_digits_data_is_the_unets_training_data():
    """Same images (PIL bicubic, same [-1, 1] map) as diffusers_psld.data, which the UNet is trained on."""
    import train_classifier
    from diffusers_psld.data import load_digits_dataset

    x, y = train_classifier.load_digits_data(16)
    ds = load_digits_dataset(resolution=16)
    assert x.shape == (1797, 1, 16, 16)
    assert torch.equal(x, ds.images.float()) and torch.equal(y, ds.labels)


def test_pipeline_resolution_is_used_and_a_mismatch_refused(tmp_path, capsys):
    """Issue #13 §3: --pipeline trains at the pipeline's sample_size; another --resolution is an error."""
    import train_classifier
    from diffusers import UNet2DModel

    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import PSLDScheduler

    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=12, in_channels=2, out_channels=2, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    PSLDPipeline(unet=unet, scheduler=PSLDScheduler()).save_pretrained(str(tmp_path / "pipe"))
    with pytest.raises(SystemExit):
        train_classifier.parse_args(["--pipeline", str(tmp_path / "pipe"), "--resolution", "8"])
    assert "--resolution 8 differs from the pipeline's sample_size 12" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        train_classifier.parse_args(["--pipeline", str(tmp_path / "missing")])
    assert "not a saved PSLD pipeline" in capsys.readouterr().err
    args = train_classifier.parse_args(["--pipeline", str(tmp_path / "pipe")])
    assert args.resolution == 12
    assert train_classifier.parse_args([]).resolution == 16
    model = train_classifier.main(["--pipeline", str(tmp_path / "pipe"), "--output_dir", str(tmp_path / "out"),
                                   "--max_train_steps", "2", "--train_batch_size", "4", "--block_out_channels", "8", "16"])
    assert model.config.sample_size == 12
    pipe = PSLDPipeline.from_pretrained(str(tmp_path / "out" / "pipeline"))
    pipe.set_progress_bar_config(disable=True)
    out = pipe(batch_size=2, num_inference_steps=2, class_labels=[1, 2], guidance_scale=1.0, output_type="np").images
    assert out.shape == (2, 12, 12, 1)
