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


def test_check_image_folder_names_empty_folders_and_unreadable_files(tmp_path):
    empty = tmp_path / "empty"
    (empty / "a").mkdir(parents=True)
    (empty / "a" / "readme.txt").write_text("x")
    with pytest.raises(ValueError, match=r"--train_data_dir.*contains no image files"):
        data.check_image_folder(str(empty))
    root = _folder(tmp_path)
    assert data.check_image_folder(root) == 6
    bad = tmp_path / "imgs" / "train" / "cat" / "broken.png"
    bad.write_bytes(b"\x89PNG not really")
    with pytest.raises(ValueError, match=r"--train_data_dir.*1 of 7 image files.*broken\.png"):
        data.check_image_folder(root)


def test_undecodable_image_in_a_loaded_set_names_the_file(tmp_path):
    """A file that passes the header check but cannot be decoded (truncated) fails with its path, not deep in PIL."""
    root = _folder(tmp_path)
    victim = tmp_path / "imgs" / "train" / "dog" / "big.png"
    PIL.Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(victim)
    ds = data.load_image_dataset(train_data_dir=root, resolution=8, cache_dir=str(tmp_path / "cache"))
    victim.write_bytes(victim.read_bytes()[:200])  # truncated after loading: header intact, pixels gone
    idx = next(i for i in range(len(ds)) if "big.png" in ds._describe(i))
    with pytest.raises(ValueError, match=r"big\.png.*cannot be decoded"):
        ds[idx]


def test_offline_hub_dataset_error_names_the_flag(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"`--dataset_name` 'cifar10' could not be loaded.*offline mode is on"):
        data.load_image_dataset(dataset_name="cifar10", resolution=8)
