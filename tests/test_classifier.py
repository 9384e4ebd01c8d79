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
                                   "--block_out_channels", "8", "16", "--learning_rate", "1e-3"])
    assert isinstance(model, TimeDependentClassifier)
    card = ModelCard.load(tmp_path / "classifier" / "README.md")
    assert card.data.library_name == "diffusers" and "psld" in card.data.tags and card.data.license == "apache-2.0"
    assert "Time-dependent classifier" in card.text
    loaded = TimeDependentClassifier.from_pretrained(tmp_path / "classifier")
    assert loaded.config.num_classes == 10 and loaded.config.in_channels == 2
    with pytest.raises(SystemExit):
        train_classifier.parse_args(["--max_train_steps", "0"])
