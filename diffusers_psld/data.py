r"""Training data for PSLD: the embedded offline digits set and PIL/numpy/torch image transforms.

* :func:`load_digits_dataset` — scikit-learn's 1,797 8×8 handwritten digits (bundled with
  scikit-learn, no download), resized with PIL (bicubic) to the training resolution, 1 channel, in
  [-1, 1], with the digit as label.
* :class:`ImageTransform` — resize (+ optional center crop) and optional horizontal flip for PIL
  images, to a float tensor in [-1, 1] (no torchvision).
* :func:`load_image_dataset` — ``datasets.load_dataset(name, config)`` or an ``imagefolder`` under
  ``--train_data_dir``, wrapped by :class:`HFImageDataset`.
* :func:`check_image_folder` — an ``--train_data_dir`` holds readable images (clear error otherwise).
* :func:`epoch_batches` — the per-rank index batches of one epoch, a pure function of
  ``(seed, epoch)``: the data order (and each sample's random flip) can be recomputed on resume.
"""
from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np
import PIL.Image
import torch

__all__ = ["DigitsDataset", "HFImageDataset", "ImageTransform", "load_digits_dataset", "load_image_dataset",
           "check_image_folder", "IMAGE_EXTENSIONS", "epoch_batches", "sample_rng", "IMAGE_COLUMN_CANDIDATES", "LABEL_COLUMN_CANDIDATES"]

IMAGE_COLUMN_CANDIDATES = ("image", "img", "pixel_values")
LABEL_COLUMN_CANDIDATES = ("label", "labels", "fine_label", "class")


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """Independent RNG for one sample in one epoch (random flips/crops reproducible on resume)."""
    return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch), int(index)])


def _to_tensor(img: PIL.Image.Image, channels: int) -> torch.Tensor:
    arr = np.asarray(img, dtype=np.float32) / 255.0
    if arr.ndim == 2:
        arr = arr[:, :, None]
    arr = arr[:, :, :channels]
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))) * 2.0 - 1.0


class ImageTransform:
    """PIL image → float tensor ``[C, R, R]`` in [-1, 1].

    Args:
        resolution: output size R.
        center_crop: resize the shorter side to R (bilinear) then center-crop R×R (aspect preserved).
            Without it the image is resized directly to R×R, as in the PSLD paper's CelebA-64 pipeline
            (178×218 → 64×64, aspect not preserved).
        random_flip: horizontal flip with probability ½ (needs ``rng``).
        channels: 3 (RGB) or 1 (L).
    """

    def __init__(self, resolution: int, center_crop: bool = False, random_flip: bool = False, channels: int = 3):
        if channels not in (1, 3):
            raise ValueError(f"`channels` must be 1 or 3, got {channels!r}")
        self.resolution, self.center_crop, self.random_flip, self.channels = resolution, center_crop, random_flip, channels

    def __call__(self, img: PIL.Image.Image, rng: Optional[np.random.Generator] = None) -> torch.Tensor:
        r = self.resolution
        img = img.convert("RGB" if self.channels == 3 else "L")
        if self.center_crop:
            w, h = img.size
            s = r / min(w, h)
            nw, nh = max(r, round(w * s)), max(r, round(h * s))
            img = img.resize((nw, nh), PIL.Image.BILINEAR)
            left, top = (nw - r) // 2, (nh - r) // 2
            img = img.crop((left, top, left + r, top + r))
        elif img.size != (r, r):
            img = img.resize((r, r), PIL.Image.BILINEAR)
        if self.random_flip:
            if rng is None:
                raise ValueError("`random_flip` needs an rng (see diffusers_psld.data.sample_rng)")
            if rng.random() < 0.5:
                img = img.transpose(PIL.Image.FLIP_LEFT_RIGHT)
        return _to_tensor(img, self.channels)


class DigitsDataset(torch.utils.data.Dataset):
    """In-memory image tensors ``[N, C, R, R]`` in [-1, 1] with integer labels (optional random flip)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int, seed: int = 0,
                 random_flip: bool = False):
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.seed, self.epoch, self.random_flip = seed, 0, random_flip
        self.channels, self.resolution = images.shape[1], images.shape[-1]

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        x = self.images[i]
        if self.random_flip and sample_rng(self.seed, self.epoch, i).random() < 0.5:
            x = x.flip(-1)
        return {"input": x, "label": int(self.labels[i])}


def load_digits_dataset(resolution: int = 16, seed: int = 0, random_flip: bool = False) -> DigitsDataset:
    """scikit-learn's 8×8 digits (1,797 images, 10 classes) resized to ``resolution`` with PIL bicubic,
    1 channel in [-1, 1]. Embedded in scikit-learn, so it works offline."""
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = []
    for a in d.images:  # values 0..16
        im = PIL.Image.fromarray(np.clip(a / 16.0 * 255.0, 0, 255).astype(np.uint8), mode="L")
        if resolution != 8:
            im = im.resize((resolution, resolution), PIL.Image.BICUBIC)
        imgs.append(np.asarray(im, dtype=np.float32) / 255.0)
    images = torch.from_numpy(np.stack(imgs))[:, None] * 2.0 - 1.0
    return DigitsDataset(images, torch.as_tensor(d.target, dtype=torch.long), num_classes=10, seed=seed,
                         random_flip=random_flip)


class HFImageDataset(torch.utils.data.Dataset):
    """A ``datasets.Dataset`` of PIL images (+ optional labels) → ``{"input": tensor, "label": int}``."""

    def __init__(self, hf_dataset, image_column: str, transform: ImageTransform, label_column: Optional[str] = None,
                 num_classes: Optional[int] = None, seed: int = 0):
        self.ds, self.image_column, self.transform = hf_dataset, image_column, transform
        self.label_column, self.num_classes, self.seed, self.epoch = label_column, num_classes, seed, 0
        self.channels, self.resolution = transform.channels, transform.resolution

    def set_epoch(self, epoch: int):
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.ds)

    def _describe(self, i: int) -> str:
        """Where image ``i`` comes from (its file path when the data set keeps one)."""
        try:
            import datasets

            raw = self.ds.cast_column(self.image_column, datasets.Image(decode=False))[int(i)][self.image_column]
            if isinstance(raw, dict) and raw.get("path"):
                return f"image {i} ({raw['path']})"
        except Exception:  # noqa: BLE001  (only used to word an error)
            pass
        return f"image {i}"

    def __getitem__(self, i):
        try:
            row = self.ds[int(i)]
            img = row[self.image_column]
            if not isinstance(img, PIL.Image.Image):
                img = PIL.Image.fromarray(np.asarray(img))
            img.load()
        except (OSError, ValueError, TypeError, SyntaxError) as err:  # PIL: UnidentifiedImageError, truncated files
            raise ValueError(f"{self._describe(i)} of the training data cannot be decoded as an image "
                             f"({type(err).__name__}: {err})") from err
        x = self.transform(img, sample_rng(self.seed, self.epoch, i))
        label = int(row[self.label_column]) if self.label_column is not None else -1
        return {"input": x, "label": label}


def load_image_dataset(dataset_name: Optional[str] = None, dataset_config_name: Optional[str] = None,
                       train_data_dir: Optional[str] = None, image_column: Optional[str] = None,
                       label_column: Optional[str] = None, resolution: int = 32, center_crop: bool = False,
                       random_flip: bool = False, channels: int = 3, cache_dir: Optional[str] = None,
                       seed: int = 0, need_labels: bool = False) -> HFImageDataset:
    """Load the ``train`` split of a Hub dataset (``--dataset_name``/``--dataset_config_name``) or an
    ``imagefolder`` (``--train_data_dir``) and wrap it. Errors name the flag at fault."""
    import datasets

    if dataset_name:
        try:
            ds = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split="train")
        except (OSError, ValueError) as err:  # ConnectionError, OfflineModeIsEnabled, DatasetNotFoundError, bad config
            raise ValueError(_hub_load_error(dataset_name, dataset_config_name, err)) from err
    elif train_data_dir:
        check_image_folder(train_data_dir)
        try:
            ds = datasets.load_dataset("imagefolder", data_dir=train_data_dir, cache_dir=cache_dir, split="train")
        except (OSError, ValueError) as err:  # EmptyDatasetError and friends
            raise ValueError(f"`--train_data_dir` {train_data_dir!r} could not be read as an image folder: "
                             f"{type(err).__name__}: {err}") from err
    else:
        raise ValueError("give `--dataset_name` or `--train_data_dir` (or neither for the offline digits set)")
    cols = list(ds.column_names)
    if image_column is None:
        image_column = next((c for c in IMAGE_COLUMN_CANDIDATES if c in cols), None)
        if image_column is None:
            raise ValueError(f"no image column found among {cols}; pass `--image_column`")
    elif image_column not in cols:
        raise ValueError(f"`--image_column` {image_column!r} is not a column of the data set; columns: {cols}")
    num_classes = None
    if label_column is None and need_labels:
        label_column = next((c for c in LABEL_COLUMN_CANDIDATES if c in cols), None)
        if label_column is None:
            raise ValueError(f"`--class_conditional` needs a label column; none of {LABEL_COLUMN_CANDIDATES} in {cols}")
    if label_column is not None:
        if label_column not in cols:
            raise ValueError(f"label column {label_column!r} is not a column of the data set; columns: {cols}")
        feat = ds.features[label_column]
        num_classes = getattr(feat, "num_classes", None)
        if num_classes is None:
            num_classes = int(max(ds[label_column])) + 1
    if len(ds) == 0:
        raise ValueError("the training data set is empty (check `--dataset_name`/`--train_data_dir`)")
    tf = ImageTransform(resolution, center_crop=center_crop, random_flip=random_flip, channels=channels)
    return HFImageDataset(ds, image_column, tf, label_column=label_column, num_classes=num_classes, seed=seed)


def _hub_load_error(name: str, config: Optional[str], err: BaseException) -> str:
    import os

    offline = [k for k in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE") if os.environ.get(k, "").strip().lower() in ("1", "true", "yes", "on")]
    first = str(err).strip().splitlines()[0] if str(err).strip() else ""
    why = f"{type(err).__name__}: {first}"
    hint = (f"offline mode is on ({', '.join(offline)}=1), so only data sets already in the cache can be used"
            if offline else "check the name, your network connection and, for a gated data set, your Hub login")
    cfg = f" (config {config!r})" if config else ""
    return (f"`--dataset_name` {name!r}{cfg} could not be loaded ({why}); {hint}. Load it once with network access "
            f"(it is then cached in --cache_dir / HF_DATASETS_CACHE), or pass --train_data_dir with an image folder, "
            f"or leave both out for the offline digits.")


# Extensions that datasets' imagefolder loads (lower case).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm", ".pbm")


def check_image_folder(train_data_dir: str, max_listed: int = 5) -> int:
    """Check an ``--train_data_dir`` before loading it: a directory that holds image files, each one
    opening as an image (PIL reads the header only, ~0.1 ms per file). Returns the number of images.

    Raises:
        ValueError: naming ``--train_data_dir`` when the path is not a directory, holds no image files, or
            holds files with an image extension that PIL cannot identify (up to ``max_listed`` are named).
    """
    import os

    if not os.path.isdir(train_data_dir):
        raise ValueError(f"`--train_data_dir` {train_data_dir!r} is not a directory")
    files = []
    for root, dirs, names in os.walk(train_data_dir):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files.extend(os.path.join(root, n) for n in sorted(names) if n.lower().endswith(IMAGE_EXTENSIONS))
    if not files:
        raise ValueError(f"`--train_data_dir` {train_data_dir!r} contains no image files (searched recursively for "
                         f"{', '.join(IMAGE_EXTENSIONS)})")
    bad = []
    for f in files:
        try:
            with PIL.Image.open(f) as im:
                im.size  # noqa: B018  (header parsed)
        except (OSError, ValueError, SyntaxError) as err:
            bad.append((f, f"{type(err).__name__}: {err}"))
    if bad:
        shown = "; ".join(f"{f} ({why})" for f, why in bad[:max_listed])
        more = f" and {len(bad) - max_listed} more" if len(bad) > max_listed else ""
        raise ValueError(f"`--train_data_dir` {train_data_dir!r}: {len(bad)} of {len(files)} image files cannot be "
                         f"read as images: {shown}{more}. Remove or replace them.")
    return len(files)


def epoch_batches(num_samples: int, batch_size: int, num_processes: int, process_index: int, seed: int,
                  epoch: int) -> List[List[int]]:
    """This rank's index batches for one epoch (drop_last).

    The order is ``randperm(num_samples)`` from a generator seeded by ``(seed, epoch)``; each global
    batch of ``batch_size * num_processes`` consecutive indices is split into contiguous per-rank
    slices of ``batch_size``. Nothing depends on RNG state, so a resumed run sees the same batches.
    """
    g = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(epoch)) % (2**63 - 1))
    perm = torch.randperm(num_samples, generator=g).tolist()
    gb = batch_size * num_processes
    out = []
    for start in range(0, num_samples - gb + 1, gb):
        lo = start + process_index * batch_size
        out.append(perm[lo:lo + batch_size])
    return out


def collate(rows: Sequence[dict]) -> dict:
    """Stack ``{"input", "label"}`` rows into a batch."""
    return {"input": torch.stack([r["input"] for r in rows]),
            "label": torch.as_tensor([r["label"] for r in rows], dtype=torch.long)}
