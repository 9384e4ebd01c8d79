"""Offline digits data, PIL transforms, imagefolder loading and the deterministic data order."""
import numpy as np
import PIL.Image
import pytest
import torch

from diffusers_psld import data


def test_digits_dataset():
    ds = data.load_digits_dataset(16)
    assert len(ds) == 1797 and ds.num_classes == 10
    assert ds.images.shape == (1797, 1, 16, 16)
    assert ds.images.min() >= -1 and ds.images.max() <= 1 and ds.images.min() == -1
    row = ds[5]
    assert row["input"].shape == (1, 16, 16) and 0 <= row["label"] < 10


def test_transform_center_crop_resize_flip():
    arr = np.zeros((20, 40, 3), dtype=np.uint8)
    arr[:, :20] = 255  # left half white
    img = PIL.Image.fromarray(arr)
    cc = data.ImageTransform(10, center_crop=True)(img)
    assert cc.shape == (3, 10, 10) and cc.min() >= -1 and cc.max() <= 1
    assert cc[:, :, 0].mean() > 0.9 and cc[:, :, -1].mean() < -0.9  # crop keeps the middle: white|black
    direct = data.ImageTransform(8)(img)
    assert direct.shape == (3, 8, 8)
    gray = data.ImageTransform(8, channels=1)(img)
    assert gray.shape == (1, 8, 8)
    flip = data.ImageTransform(10, center_crop=True, random_flip=True)
    outs = [flip(img, data.sample_rng(0, 0, i)) for i in range(16)]
    flipped = [bool(o[:, :, 0].mean() < 0) for o in outs]
    assert any(flipped) and not all(flipped)
    again = [bool(flip(img, data.sample_rng(0, 0, i))[:, :, 0].mean() < 0) for i in range(16)]
    assert flipped == again  # a pure function of (seed, epoch, index)


def test_epoch_batches_deterministic_and_split():
    a0 = data.epoch_batches(103, 4, 2, 0, seed=7, epoch=0)
    a1 = data.epoch_batches(103, 4, 2, 1, seed=7, epoch=0)
    assert a0 == data.epoch_batches(103, 4, 2, 0, seed=7, epoch=0)
    assert a0 != data.epoch_batches(103, 4, 2, 0, seed=7, epoch=1)
    assert len(a0) == len(a1) == 103 // 8
    g = torch.Generator().manual_seed(7 * 1_000_003)
    perm = torch.randperm(103, generator=g).tolist()
    for i, (b0, b1) in enumerate(zip(a0, a1)):
        assert b0 + b1 == perm[8 * i: 8 * i + 8]  # global batch split into contiguous per-rank slices
    single = data.epoch_batches(103, 8, 1, 0, seed=7, epoch=0)
    assert [b0 + b1 for b0, b1 in zip(a0, a1)] == single


def _folder(tmp_path, n=3):
    for cls in ("cat", "dog"):
        d = tmp_path / "imgs" / "train" / cls
        d.mkdir(parents=True)
        for i in range(n):
            PIL.Image.fromarray(np.full((12, 10, 3), 40 * i, np.uint8)).save(d / f"{i}.png")
    return str(tmp_path / "imgs")


def test_imagefolder_and_column_errors(tmp_path):
    root = _folder(tmp_path)
    ds = data.load_image_dataset(train_data_dir=root, resolution=8, center_crop=True, random_flip=True,
                                 cache_dir=str(tmp_path / "cache"), need_labels=True)
    assert len(ds) == 6 and ds.num_classes == 2
    row = ds[0]
    assert row["input"].shape == (3, 8, 8) and row["label"] in (0, 1)
    with pytest.raises(ValueError, match="--image_column"):
        data.load_image_dataset(train_data_dir=root, image_column="nope", resolution=8, cache_dir=str(tmp_path / "cache"))
    with pytest.raises(ValueError, match="--train_data_dir"):
        data.load_image_dataset(train_data_dir=str(tmp_path / "missing"), resolution=8)
