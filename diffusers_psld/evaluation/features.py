r"""Offline feature extractor for FID / IS: a small CNN classifier trained on the evaluation data set.

**Not comparable to published FID / IS.** Published numbers use the TF-Inception-v3 network
(``pt_inception-2015-12-05``); its weights cannot be downloaded on an offline machine. This module
provides a documented stand-in: :class:`DigitsFeatureNet`, a ~30k-parameter CNN trained in seconds on
CPU on the same data set as the generative model (scikit-learn's bundled ``digits`` at 16 px by default
(the same images as :func:`diffusers_psld.data.load_digits_dataset`; 1797 images, 10 classes). Its penultimate layer (``feature_dim``) gives the FID features
(torchmetrics ``FrechetInceptionDistance(feature=<module>)``) and its class logits give the IS
(torchmetrics ``InceptionScore(feature=<module returning logits>)``). Scores computed with it are
useful to compare models *with each other* on this data set only.

Weights are stored with ``ModelMixin.save_pretrained`` (``config.json`` + ``diffusion_pytorch_model.safetensors``);
no pickles are read or written.

Inputs follow torchmetrics' convention: ``uint8`` images in [0, 255] of shape ``[N, C, H, W]`` (floats are
taken to be in [0, 1]); RGB inputs are converted to grey for a 1-channel network, and any spatial size is
resized (bilinear, antialiased) to the network's ``image_size``.
"""
from __future__ import annotations

import time
from typing import Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ModelMixin  # noqa: F401  (diffusers' loader needs the name in this module)
from diffusers.configuration_utils import ConfigMixin, register_to_config
from torch import nn

__all__ = ["DigitsFeatureNet", "FeatureHead", "LogitsHead", "load_digits_images", "train_feature_extractor",
           "load_feature_extractor"]


def load_digits_images(image_size: int = 16, channels: int = 1) -> Tuple[torch.Tensor, torch.Tensor]:
    """scikit-learn's bundled ``digits`` (offline) as ``uint8`` ``[N, channels, image_size, image_size]`` + labels.

    Uses :func:`diffusers_psld.data.load_digits_dataset` (the generative models' training data: PIL
    bicubic resize of the 17 grey levels) so the extractor sees the same images as the models.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4:
        raise ValueError(f"`image_size` must be an int >= 4, got {image_size!r}")
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3, got {channels!r}")
    from ..data import load_digits_dataset

    ds = load_digits_dataset(resolution=image_size)
    x = ((ds.images + 1) / 2 * 255).round().clamp(0, 255).to(torch.uint8)
    return x.repeat(1, channels, 1, 1), ds.labels.clone()


class DigitsFeatureNet(ModelMixin, ConfigMixin):
    """Small CNN classifier whose penultimate activations serve as FID features.

    Args:
        in_channels: channels the network was trained on (1 for digits).
        image_size: inputs are resized to this size.
        feature_dim: width of the feature layer (the FID dimension).
        num_classes: number of logits (the IS classes).
        width: conv channels.
    """

    @register_to_config
    def __init__(self, in_channels: int = 1, image_size: int = 16, feature_dim: int = 64, num_classes: int = 10,
                 width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1, stride=2), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(2), nn.Flatten(),
            nn.Linear(8 * width, feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(feature_dim, num_classes)

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 [0,255] (or float [0,1]) ``[N, C, H, W]`` → float in [-1, 1] at the network's size/channels."""
        if images.ndim != 4:
            raise ValueError(f"`images` must be [N, C, H, W], got shape {tuple(images.shape)}")
        x = images.float() / 255.0 if images.dtype == torch.uint8 else images.float()
        c = self.config.in_channels
        if x.shape[1] != c:
            if c == 1 and x.shape[1] == 3:
                x = x.mean(1, keepdim=True)
            elif c == 3 and x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            else:
                raise ValueError(f"`images` has {x.shape[1]} channels; this extractor takes {c}")
        s = self.config.image_size
        if x.shape[-2:] != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=True)
        return x.to(self.head.weight.dtype) * 2 - 1

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(self.preprocess(images))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Class logits ``[N, num_classes]``."""
        return self.head(self.features(images))


class FeatureHead(nn.Module):
    """torchmetrics FID feature module: ``[N, C, H, W]`` uint8 → ``[N, feature_dim]`` float32."""

    def __init__(self, net: DigitsFeatureNet):
        super().__init__()
        self.net = net
        self.num_features = int(net.config.feature_dim)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net.features(images)


class LogitsHead(nn.Module):
    """torchmetrics IS feature module: returns class logits (torchmetrics applies the softmax)."""

    def __init__(self, net: DigitsFeatureNet):
        super().__init__()
        self.net = net
        self.num_features = int(net.config.num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def train_feature_extractor(
    images: Optional[torch.Tensor] = None,
    labels: Optional[torch.Tensor] = None,
    image_size: int = 16,
    epochs: int = 12,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    val_fraction: float = 0.2,
    feature_dim: int = 64,
    output_dir: Optional[str] = None,
    verbose: bool = False,
    num_threads: Optional[int] = 1,
):
    """Train :class:`DigitsFeatureNet` (digits by default; about 15-60 s on 2 shared CPU cores at 16 px) and optionally save it.

    Args:
        images, labels: ``uint8 [N, C, H, W]`` and ``long [N]``; ``None`` loads :func:`load_digits_images`.
        image_size: network input size (also the digits resolution when loading them).
        epochs, batch_size, lr, seed: Adam training settings (light random shifts as augmentation).
        val_fraction: held-out fraction for the reported accuracy, in [0, 1).
        output_dir: if given, ``save_pretrained`` there (safetensors).
        num_threads: torch intra-op threads during training (restored afterwards); 1 is fastest for this
            tiny network on a shared CPU (2 threads under load measured 20× slower). ``None`` keeps the current.

    Returns:
        ``(model, info)`` with ``info = {"val_accuracy", "train_accuracy", "seconds", "num_train", ...}``.
    """
    if images is None:
        images, labels = load_digits_images(image_size)
    if labels is None or len(labels) != len(images):
        raise ValueError("`labels` must be given with `images` and have the same length")
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"`val_fraction` must be in [0, 1), got {val_fraction!r}")
    for name, val in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(val, int) or val < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {val!r}")
    prev_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(images, labels, image_size, epochs, batch_size, lr, seed, val_fraction, feature_dim,
                      output_dir, verbose)
    finally:
        torch.set_num_threads(prev_threads)


def _train(images, labels, image_size, epochs, batch_size, lr, seed, val_fraction, feature_dim, output_dir, verbose):
    t0 = time.time()
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    perm = torch.randperm(len(images), generator=g)
    n_val = int(len(images) * val_fraction)
    val_idx, tr_idx = perm[:n_val], perm[n_val:]
    num_classes = int(labels.max()) + 1
    net = DigitsFeatureNet(in_channels=images.shape[1], image_size=image_size, feature_dim=feature_dim,
                           num_classes=max(num_classes, 2))
    opt = torch.optim.Adam(net.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * ((len(tr_idx) + batch_size - 1) // batch_size))
    net.train()
    for epoch in range(epochs):
        order = tr_idx[torch.randperm(len(tr_idx), generator=g)]
        for i in range(0, len(order), batch_size):
            idx = order[i:i + batch_size]
            x = images[idx]
            # augmentation: random shift by up to 1 pixel (at network resolution) via roll
            shift = torch.randint(-1, 2, (2,), generator=g).tolist()
            x = torch.roll(x, shifts=shift, dims=(2, 3))
            loss = F.cross_entropy(net(x), labels[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        if verbose:
            print(f"epoch {epoch + 1}/{epochs} loss {loss.item():.4f}")
    net.eval()

    def acc(idx):
        if len(idx) == 0:
            return None
        with torch.no_grad():
            return float((net(images[idx]).argmax(-1) == labels[idx]).float().mean())

    info = {"train_accuracy": acc(tr_idx), "val_accuracy": acc(val_idx), "seconds": time.time() - t0,
            "num_train": len(tr_idx), "num_val": n_val, "epochs": epochs, "image_size": image_size,
            "feature_dim": feature_dim, "seed": seed}
    if output_dir is not None:
        net.save_pretrained(output_dir, safe_serialization=True)
    return net, info


def load_feature_extractor(path: str) -> DigitsFeatureNet:
    """Load a saved :class:`DigitsFeatureNet` (safetensors) in eval mode."""
    net = DigitsFeatureNet.from_pretrained(path, use_safetensors=True)
    return net.eval()


def images_as_numpy_uint8(images: torch.Tensor) -> np.ndarray:  # pragma: no cover - convenience
    """``[N, C, H, W]`` uint8 tensor → ``[N, H, W, C]`` numpy."""
    return images.permute(0, 2, 3, 1).cpu().numpy()
