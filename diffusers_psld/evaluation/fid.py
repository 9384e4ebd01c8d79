r"""Sample generation in resumable seed shards, and FID / IS with torchmetrics.

Generation
----------
``N`` samples are split into shards of ``shard_size`` images; shard ``i`` is generated with
``torch.Generator().manual_seed(base_seed + i)`` by process ``i % world_size`` and written atomically
to ``<dir>/shard_{i:05d}.npz`` (``images``: uint8 ``[n, H, W, C]``, ``seed``, ``seconds``, and
``provenance``: a JSON string of what generated it, see below). A shard that already exists with the
right size **and the same provenance** is not regenerated, so an interrupted run resumes where it
stopped, and the result does not depend on the number of processes. The main process then reads all
shards (the file system is the gather; per-process timings are gathered with Accelerate in
``training/evaluate.py``).

Provenance: the caller passes a ``fingerprint`` dict (``training/evaluate.py``: SHA-256 of every weight
file, scheduler class and config, NFE, guidance, dtype, device type, sampling loop); each shard adds its
seed and the uint8 rule (its size, the sampling batch, is the stored image count). Before generating anything, every existing shard of the run is
compared with it (all ranks read the same files, so all ranks decide alike). A shard written by other
settings (or without provenance, by an older version) is never reused: with ``on_mismatch="error"``
(the default) :class:`ShardMismatchError` names the shard and every differing field; with
``"regenerate"`` it is overwritten. :func:`load_shards` checks the same fingerprint, so a report can
only be computed from shards of the settings it is labelled with.

Conversion to uint8 is the one rule of diffusers' ``numpy_to_pil`` (what ``PSLDPipeline`` uses for
``output_type="pil"``): ``round(255 · clamp(x, 0, 1))`` (round half to even, in the input's float
precision), applied alike to generated samples and to float reference data; 8-bit data is taken as is.
The training digits pushed through the pipeline's output transform ``(x / 2 + 0.5).clamp(0, 1)``
therefore come back bit-identical and score FID 0 (up to float error) against the reference set.

Metrics
-------
* ``"inception"``: torchmetrics' ``FrechetInceptionDistance`` / ``InceptionScore`` with the standard
  TF-Inception-v3 (``NoTrainInceptionV3``: 2048-d pool features for FID, ``logits_unbiased`` for IS),
  weights from ``inception_weights`` (torchmetrics' ``feature_extractor_weights_path``) or downloaded
  by torch-fidelity when online. Needs ``torch-fidelity`` (do **not** install it into a CPU-only
  environment without ``--no-deps``: it pulls torchvision and a CUDA torch). Grey images are
  repeated to 3 channels. Comparable to published numbers (given the same reference set and N).
* a :class:`~diffusers_psld.evaluation.features.DigitsFeatureNet` (or a path to one): offline
  features from a small classifier trained on the data set; **not comparable to published FID/IS**.
"""
from __future__ import annotations

import glob
import json
import math
import os
import re
import time
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from .features import DigitsFeatureNet, FeatureHead, LogitsHead, load_feature_extractor

__all__ = [
    "UINT8_RULE",
    "ShardMismatchError",
    "weights_sha256",
    "to_uint8",
    "shard_path",
    "shard_plan",
    "generate_shards",
    "load_shards",
    "save_pngs",
    "load_image_folder",
    "build_metrics",
    "compute_fid_is",
    "pipeline_sample_fn",
    "INCEPTION_NOTE",
    "CUSTOM_NOTE",
]

INCEPTION_NOTE = "TF-Inception-v3 features (torchmetrics/torch-fidelity): comparable to published FID/IS."
CUSTOM_NOTE = ("Offline features from a small classifier trained on the data set (DigitsFeatureNet): "
               "NOT comparable to published FID/IS; use only to compare models with each other on this data set.")

# A sample function takes (batch_size, generator) and returns images: float [0,1] (NCHW tensor or NHWC
# numpy), or uint8; see `to_uint8`.
SampleFn = Callable[[int, torch.Generator], Union[torch.Tensor, np.ndarray]]


# ---------------------------------------------------------------------------------------- conversion
#: the float → uint8 rule of :func:`to_uint8` (recorded in every shard's provenance)
UINT8_RULE = "round(255*clamp(x,0,1)) half-to-even (diffusers numpy_to_pil)"


def to_uint8(images) -> torch.Tensor:
    """Images → uint8 ``[N, C, H, W]`` tensor.

    Accepts a torch tensor ``[N, C, H, W]`` (float in [0, 1] or uint8), a NumPy array ``[N, H, W, C]``
    (diffusers' ``output_type="np"``), or a list of PIL images. Floats are **rounded** exactly as
    diffusers' ``numpy_to_pil`` does: ``round(255 · clamp(x, 0, 1))`` (half to even) in the input's
    precision (float16 / bfloat16 are computed in float32), so ``output_type="np"`` and ``"pil"`` give
    the same bytes and float reference data is converted by the same rule.
    """
    if isinstance(images, (list, tuple)):
        images = np.stack([np.asarray(im) for im in images])
        if images.ndim == 3:
            images = images[..., None]
    if isinstance(images, np.ndarray):
        if images.ndim != 4:
            raise ValueError(f"`images` as a NumPy array must be [N, H, W, C], got shape {images.shape}")
        images = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2)
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"`images` must be [N, C, H, W] (tensor) or [N, H, W, C] (numpy), got {type(images)}")
    if images.dtype == torch.uint8:
        return images.cpu().contiguous()
    if not images.is_floating_point():
        raise ValueError(f"`images` must be uint8 or floating point in [0, 1], got dtype {images.dtype}")
    x = images.detach()
    if x.dtype not in (torch.float32, torch.float64):
        x = x.float()
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).cpu().contiguous()


# ---------------------------------------------------------------------------------------- shards
def shard_path(directory: str, index: int) -> str:
    return os.path.join(directory, f"shard_{index:05d}.npz")


def shard_plan(num_samples: int, shard_size: int) -> List[int]:
    """Sizes of the shards covering ``num_samples`` (the last may be smaller)."""
    for name, v in (("num_samples", num_samples), ("shard_size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {v!r}")
    n_full, rest = divmod(num_samples, shard_size)
    return [shard_size] * n_full + ([rest] if rest else [])


class ShardMismatchError(ValueError):
    """An existing shard was generated with other settings than the current run."""


def weights_sha256(model_dir: str) -> Dict[str, str]:
    """SHA-256 of the weight files (``*.safetensors``, ``*.bin``) of a saved pipeline (relative path → hex).

    Only the pipeline's component folders are read: those named in ``model_index.json`` (``unet``,
    ``classifier``, ...), else ``unet/`` (bare layout); training checkpoints next to them are not hashed.

    Raises:
        ValueError: ``model_dir`` is not a directory or its components hold no weight file.
    """
    from ..checkpoints import sha256_file

    if not os.path.isdir(model_dir):
        raise ValueError(f"`model_dir` must be a directory, got {model_dir!r}")
    index = os.path.join(model_dir, "model_index.json")
    if os.path.isfile(index):
        with open(index) as f:
            components = sorted(k for k, v in json.load(f).items() if not k.startswith("_") and isinstance(v, list))
    else:
        components = ["unet"]
    out = {}
    for comp in components:
        for root, _, files in os.walk(os.path.join(model_dir, comp)):
            for name in sorted(files):
                if name.endswith((".safetensors", ".bin")):
                    path = os.path.join(root, name)
                    out[os.path.relpath(path, model_dir).replace(os.sep, "/")] = sha256_file(path)
    if not out:
        raise ValueError(f"`model_dir` {model_dir!r} holds no weight file (*.safetensors / *.bin) in {components}")
    return dict(sorted(out.items()))


def _jsonable(obj):
    """A JSON-stable copy (tuples → lists, NumPy / torch scalars → Python) for comparing provenance."""
    return json.loads(json.dumps(obj, sort_keys=True, default=lambda o: o.item() if hasattr(o, "item") else str(o)))


def _shard_provenance(fingerprint: Optional[dict], seed: int, size: int) -> dict:
    # the size (= sampling batch) is checked against the stored image count: a shard of the same settings
    # but another size (``num_samples`` changed) is incomplete and regenerated, not foreign
    return _jsonable({"fingerprint": fingerprint or {}, "seed": int(seed), "uint8_rule": UINT8_RULE})


def _flatten(d, prefix=""):
    out = {}
    for k, v in (d.items() if isinstance(d, dict) else []):
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def provenance_differences(stored: Optional[dict], expected: dict) -> List[str]:
    """``"field: stored ≠ now"`` lines between two provenance dicts (empty when they agree)."""
    if stored is None:
        return ["no provenance recorded (shard written by an older version of this tool)"]
    a, b = _flatten(stored), _flatten(expected)
    return [f"{k}: {a.get(k, '<absent>')!r} (shard) != {b.get(k, '<absent>')!r} (now)"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def _read_shard_meta(path: str):
    """``(n_images, provenance or None)`` of a shard, or ``None`` when missing / unreadable."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as f:
            n = f["images"].shape[0]
            prov = json.loads(str(f["provenance"])) if "provenance" in f.files else None
        return n, prov
    except Exception:  # corrupt / partial file: regenerate
        return None


def _check_existing(directory: str, sizes: List[int], base_seed: int, fingerprint: Optional[dict],
                    on_mismatch: str) -> Dict[int, List[str]]:
    """Shard index → differences for every existing, readable shard whose provenance differs.

    Raises :class:`ShardMismatchError` (listing the first such shard's differences) when
    ``on_mismatch == "error"``.
    """
    bad = {}
    for i, size in enumerate(sizes):
        meta = _read_shard_meta(shard_path(directory, i))
        if meta is None:
            continue
        diffs = provenance_differences(meta[1], _shard_provenance(fingerprint, base_seed + i, size))
        if diffs:
            bad[i] = diffs
    if bad and on_mismatch == "error":
        i = min(bad)
        raise ShardMismatchError(
            f"{len(bad)} existing shard(s) in {directory!r} were generated with other settings than this run "
            f"(shards {sorted(bad)[:10]}{'…' if len(bad) > 10 else ''}); shard {i} differs in:\n  "
            + "\n  ".join(bad[i][:20])
            + "\nUse a new --output_dir, or pass --regenerate_mismatched_shards (on_mismatch='regenerate') to "
              "overwrite them. No shard was modified."
        )
    return bad


def _shard_ok(path: str, size: int, provenance: Optional[dict] = None) -> bool:
    meta = _read_shard_meta(path)
    if meta is None or meta[0] != size:
        return False
    return provenance is None or not provenance_differences(meta[1], provenance)


def generate_shards(
    sample_fn: SampleFn,
    directory: str,
    num_samples: int,
    shard_size: int,
    base_seed: int = 0,
    process_index: int = 0,
    num_processes: int = 1,
    log: Optional[Callable[[str], None]] = None,
    fingerprint: Optional[dict] = None,
    on_mismatch: str = "error",
) -> Dict[str, object]:
    """Generate this process's shards (``i % num_processes == process_index``), reusing identical ones.

    Shard ``i`` uses ``torch.Generator().manual_seed(base_seed + i)``; the generator is passed to
    ``sample_fn(batch_size, generator)``. An existing shard is reused only if it has the right size and
    the same provenance (``fingerprint`` + seed + :data:`UINT8_RULE`).

    Args:
        fingerprint: JSON-able dict describing what ``sample_fn`` samples (weights hash, scheduler config,
            NFE, guidance, ...); stored in every shard. ``None`` stores ``{}``.
        on_mismatch: ``"error"`` (default): raise :class:`ShardMismatchError` before generating anything
            if any existing shard of the run has other provenance; ``"regenerate"``: overwrite those shards.

    Returns:
        ``{"generated": [indices], "skipped": [indices], "regenerated": [indices generated over a shard of
        other settings], "images": n generated now, "seconds": generation time}``.
    """
    if on_mismatch not in ("error", "regenerate"):
        raise ValueError(f"`on_mismatch` must be 'error' or 'regenerate', got {on_mismatch!r}")
    if not (isinstance(num_processes, int) and num_processes >= 1):
        raise ValueError(f"`num_processes` must be an int >= 1, got {num_processes!r}")
    if not (isinstance(process_index, int) and 0 <= process_index < num_processes):
        raise ValueError(f"`process_index` must be in [0, {num_processes}), got {process_index!r}")
    sizes = shard_plan(num_samples, shard_size)
    os.makedirs(directory, exist_ok=True)
    mismatched = _check_existing(directory, sizes, base_seed, fingerprint, on_mismatch)
    generated, skipped, n_images, seconds = [], [], 0, 0.0
    for i, size in enumerate(sizes):
        if i % num_processes != process_index:
            continue
        path = shard_path(directory, i)
        provenance = _shard_provenance(fingerprint, base_seed + i, size)
        if i not in mismatched and _shard_ok(path, size, provenance):
            skipped.append(i)
            continue
        if i in mismatched and log is not None:
            log(f"shard {i}: regenerating (other settings: {'; '.join(mismatched[i][:3])})")
        g = torch.Generator().manual_seed(base_seed + i)
        t0 = time.perf_counter()
        imgs = to_uint8(sample_fn(size, g))
        dt = time.perf_counter() - t0
        if imgs.shape[0] != size:
            raise RuntimeError(f"`sample_fn` returned {imgs.shape[0]} images for batch_size={size}")
        tmp = path[:-4] + f".tmp{os.getpid()}.npz"
        np.savez(tmp, images=imgs.permute(0, 2, 3, 1).numpy(), seed=np.int64(base_seed + i), seconds=np.float64(dt),
                 provenance=np.array(json.dumps(provenance, sort_keys=True)))
        os.replace(tmp, path)
        generated.append(i)
        n_images += size
        seconds += dt
        if log is not None:
            log(f"shard {i}: {size} images in {dt:.2f} s (seed {base_seed + i})")
    return {"generated": generated, "skipped": skipped,
            "regenerated": sorted(i for i in mismatched if i in generated), "images": n_images, "seconds": seconds}


def load_shards(directory: str, num_samples: int, shard_size: int, fingerprint: Optional[dict] = None,
                base_seed: Optional[int] = None) -> Dict[str, object]:
    """Read all shards of a run: ``{"images": uint8 [N, C, H, W], "seconds": total generation seconds}``.

    With ``fingerprint`` and ``base_seed``, every shard's provenance must match (as in
    :func:`generate_shards`), otherwise :class:`ShardMismatchError`. Every shard must hold uint8 ``[n, H, W, C]``
    images (C = 1 or 3) of the first shard's size, otherwise :class:`ShardMismatchError` naming the shard.
    """
    sizes = shard_plan(num_samples, shard_size)
    imgs, secs = [], 0.0
    for i, size in enumerate(sizes):
        path = shard_path(directory, i)
        meta = _read_shard_meta(path)
        if meta is None or meta[0] != size:
            raise FileNotFoundError(f"shard {i} ({size} images) missing or incomplete: {path}")
        if fingerprint is not None or base_seed is not None:
            if fingerprint is None or base_seed is None:
                raise ValueError("`fingerprint` and `base_seed` must be given together")
            diffs = provenance_differences(meta[1], _shard_provenance(fingerprint, base_seed + i, size))
            if diffs:
                raise ShardMismatchError(f"shard {i} ({path}) was generated with other settings: " + "; ".join(diffs[:20]))
        with np.load(path, allow_pickle=False) as f:
            images = f["images"]
            secs += float(f["seconds"])
        # every shard must hold uint8 [n, H, W, C] images of the first shard's size (one image format per run)
        first = imgs[0].shape[1:] if imgs else None
        if images.ndim != 4 or images.dtype != np.uint8 or images.shape[-1] not in (1, 3) \
                or (first is not None and images.shape[1:] != first):
            want = f"[{size}, {first[0]}, {first[1]}, {first[2]}] uint8 like shard 0" if first is not None else \
                f"uint8 [{size}, H, W, C] with C = 1 or 3"
            raise ShardMismatchError(
                f"shard {i} ({path}) holds images of shape {list(images.shape)} {images.dtype}, expected {want}: the "
                "folder mixes runs of different image formats; use a new output directory or delete the shard")
        imgs.append(images)
    arr = np.concatenate(imgs)
    return {"images": torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous(), "seconds": secs}


def save_pngs(images: torch.Tensor, directory: str, start: int = 0) -> List[str]:
    """Write uint8 ``[N, C, H, W]`` images as ``{index:06d}.png`` (grey for C = 1)."""
    import PIL.Image

    os.makedirs(directory, exist_ok=True)
    paths = []
    for j, im in enumerate(to_uint8(images).permute(0, 2, 3, 1).numpy()):
        p = os.path.join(directory, f"{start + j:06d}.png")
        PIL.Image.fromarray(im[..., 0] if im.shape[-1] == 1 else im).save(p)
        paths.append(p)
    return paths


def load_image_folder(directory: str, channels: Optional[int] = None) -> torch.Tensor:
    """All PNG/JPEG files of a folder (sorted) as uint8 ``[N, C, H, W]``; ``channels`` 1 → L, 3 → RGB."""
    import PIL.Image

    files = sorted(f for f in glob.glob(os.path.join(directory, "*"))
                   if re.search(r"\.(png|jpe?g|bmp|webp)$", f, re.IGNORECASE))
    if not files:
        raise ValueError(f"no images found in {directory!r}")
    mode = {1: "L", 3: "RGB", None: None}[channels]
    arrs = []
    for f in files:
        im = PIL.Image.open(f)
        im = im.convert(mode) if mode else im
        a = np.asarray(im)
        arrs.append(a[..., None] if a.ndim == 2 else a)
    return to_uint8(np.stack(arrs))


# ---------------------------------------------------------------------------------------- metrics
def _inception_module(features_list: Sequence[str], weights_path: Optional[str]):
    # looked up at call time so tests can monkeypatch torchmetrics' class
    from torchmetrics.image import fid as tm_fid

    return tm_fid.NoTrainInceptionV3(name="inception-v3-compat", features_list=list(features_list),
                                     feature_extractor_weights_path=weights_path)


class _RGB(torch.nn.Module):
    """Repeat grey images to 3 channels in front of an Inception module (which needs RGB)."""

    def __init__(self, module: torch.nn.Module, num_features: Optional[int] = None):
        super().__init__()
        self.module = module
        if num_features is not None:
            self.num_features = num_features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)
        out = self.module(images)
        return out[0] if isinstance(out, (tuple, list)) else out


def build_metrics(extractor: Union[str, DigitsFeatureNet] = "inception", inception_weights: Optional[str] = None,
                  splits: int = 10, inception_fid_features: int = 2048):
    """``(fid, inception_score, info)`` torchmetrics objects for uint8 images.

    Args:
        extractor: ``"inception"`` (standard TF-Inception-v3 via torchmetrics), a
            :class:`DigitsFeatureNet`, or a directory holding one (``save_pretrained`` output).
        inception_weights: local path of ``weights-inception-2015-12-05-6726825d.pth`` for the Inception
            path (torchmetrics' ``feature_extractor_weights_path``); ``None`` lets torch-fidelity download it.
        splits: IS splits.
        inception_fid_features: Inception layer for FID (64, 192, 768 or 2048 = the standard pool features).
    """
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    if isinstance(splits, bool) or not isinstance(splits, int) or splits < 1:
        raise ValueError(f"`splits` must be an int >= 1, got {splits!r}")
    if isinstance(extractor, str) and extractor == "inception":
        if inception_weights is not None and not os.path.isfile(inception_weights):
            raise ValueError(f"`inception_weights` must be an existing file, got {inception_weights!r}")
        if inception_fid_features not in (64, 192, 768, 2048):
            raise ValueError(f"`inception_fid_features` must be 64, 192, 768 or 2048, got {inception_fid_features!r}")
        fid_feat = _RGB(_inception_module([str(inception_fid_features)], inception_weights),
                        num_features=inception_fid_features)
        is_feat = _RGB(_inception_module(["logits_unbiased"], inception_weights))
        info = {"feature_extractor": f"inception-v3-compat (TF-Inception, {inception_fid_features}-d FID features, "
                                     "logits_unbiased for IS)",
                "inception_weights": inception_weights, "comparable_to_published": True, "note": INCEPTION_NOTE}
    else:
        if isinstance(extractor, str):
            if not os.path.isdir(extractor):
                raise ValueError(f"`extractor` must be 'inception', a DigitsFeatureNet or a directory with one; "
                                 f"got {extractor!r}")
            path, extractor = extractor, load_feature_extractor(extractor)
        elif isinstance(extractor, DigitsFeatureNet):
            path = None
        else:
            raise ValueError(f"`extractor` must be 'inception', a DigitsFeatureNet or a directory, got {type(extractor)}")
        extractor = extractor.eval()
        fid_feat, is_feat = FeatureHead(extractor), LogitsHead(extractor)
        info = {"feature_extractor": f"DigitsFeatureNet ({extractor.config.feature_dim}-d features, "
                                     f"{extractor.config.num_classes} classes, {extractor.config.image_size} px)",
                "feature_extractor_path": path, "comparable_to_published": False, "note": CUSTOM_NOTE}
    # sync_on_compute=False: the images are already gathered (the main process computes alone; with the
    # default, torchmetrics would wait in a collective for the other ranks of an Accelerate run).
    fid = FrechetInceptionDistance(feature=fid_feat, normalize=False, reset_real_features=True, sync_on_compute=False)
    with warnings.catch_warnings():  # "will save all extracted features in buffer": expected for IS
        warnings.filterwarnings("ignore", message=".*save all extracted features.*")
        inception_score = InceptionScore(feature=is_feat, splits=splits, normalize=False, sync_on_compute=False)
    return fid, inception_score, info


@torch.no_grad()
def compute_fid_is(fake, real, extractor: Union[str, DigitsFeatureNet] = "inception",
                   inception_weights: Optional[str] = None, batch_size: int = 256, splits: int = 10,
                   seed: int = 0, inception_fid_features: int = 2048) -> Dict[str, object]:
    """FID(fake, real) and IS(fake) with torchmetrics.

    Args:
        fake, real: images accepted by :func:`to_uint8` (uint8 ``[N, C, H, W]`` preferred).
        extractor, inception_weights, splits, inception_fid_features: see :func:`build_metrics`
            (``splits`` is capped at N).
        batch_size: feature-extraction batch.
        seed: IS shuffles the features with the global RNG; it is seeded here (and restored).
    """
    fake, real = to_uint8(fake), to_uint8(real)
    if fake.shape[0] < 2 or real.shape[0] < 2:
        raise ValueError(f"FID needs >= 2 images per set, got {fake.shape[0]} fake and {real.shape[0]} real")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"`batch_size` must be an int >= 1, got {batch_size!r}")
    fid, inc, info = build_metrics(extractor, inception_weights, min(splits, fake.shape[0]), inception_fid_features)
    t0 = time.perf_counter()
    for i in range(0, real.shape[0], batch_size):
        fid.update(real[i:i + batch_size], real=True)
    for i in range(0, fake.shape[0], batch_size):
        fid.update(fake[i:i + batch_size], real=False)
        inc.update(fake[i:i + batch_size])
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)
    try:
        is_mean, is_std = inc.compute()
    finally:
        torch.random.set_rng_state(state)
    fid_val = float(fid.compute())
    return {"fid": fid_val, "is_mean": float(is_mean), "is_std": float(is_std) if math.isfinite(float(is_std)) else None,
            "is_splits": min(splits, fake.shape[0]), "num_fake": int(fake.shape[0]), "num_real": int(real.shape[0]),
            "metric_seconds": time.perf_counter() - t0, **info}


# ---------------------------------------------------------------------------------------- pipelines
def scheduler_classes() -> Dict[str, type]:
    """``--scheduler`` names of :func:`pipeline_sample_fn` / ``training/evaluate.py`` → scheduler classes."""
    from ..schedulers import (ConjugateScheduler, GDDIMMultistepScheduler, PSLDScheduler, SplittingScheduler,
                              SSCSScheduler)

    return {"psld": PSLDScheduler, "sscs": SSCSScheduler, "gddim": GDDIMMultistepScheduler,
            "conjugate": ConjugateScheduler, "splitting": SplittingScheduler}


def _load_components(model_dir: str, torch_dtype=None):
    """The UNet and scheduler of a bare ``unet/`` + ``scheduler/`` directory (no ``model_index.json``), each of the
    class its config names (``UNet2DModel`` or ``NCSNppModel``; a scheduler class of this package)."""
    from diffusers import UNet2DModel

    from ..models import NCSNppModel
    from ..schedulers import PSLDScheduler, schedulers_by_name

    def class_name(sub, config_name):
        path = os.path.join(model_dir, sub, config_name)
        try:
            with open(path, encoding="utf-8") as f:
                return json.load(f).get("_class_name")
        except (OSError, ValueError) as err:
            raise ValueError(f"`model_dir` {model_dir!r} has no model_index.json, so it must hold {sub}/{config_name} "
                             f"(a saved {sub}); reading it failed: {err}") from err

    nets = {"UNet2DModel": UNet2DModel, "NCSNppModel": NCSNppModel}
    name = class_name("unet", "config.json")
    if name not in nets:
        raise ValueError(f"{os.path.join(model_dir, 'unet', 'config.json')}: `_class_name` must be one of {sorted(nets)}, got {name!r}")
    kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
    unet = nets[name].from_pretrained(model_dir, subfolder="unet", use_safetensors=True, **kw)
    schedulers = schedulers_by_name()
    name = class_name("scheduler", PSLDScheduler.config_name)
    sched = schedulers.get(name, PSLDScheduler).from_pretrained(model_dir, subfolder="scheduler")
    return unet, sched


def pipeline_sample_fn(model_dir: str, scheduler: Optional[str] = None, sampler: Optional[str] = None,
                       striding: Optional[str] = None, num_inference_steps: int = 100,
                       device: Union[str, torch.device] = "cpu", torch_dtype=None,
                       project_eps: Optional[bool] = None):
    """A ``SampleFn`` for a saved pipeline directory, with an optional scheduler swap.

    The directory is a ``PSLDPipeline.save_pretrained`` output (``model_index.json``) or a bare ``unet/`` +
    ``scheduler/`` layout; both are sampled by one :class:`~diffusers_psld.PSLDPipeline` (built from the two
    components for the bare layout), so every layout gets the same loop: ``scale_model_input`` (input
    preconditioning), ``prediction_type`` conversion and the network's training-record check included.

    Args:
        scheduler: one of (``"psld"``, ``"sscs"``, ``"gddim"``, ``"conjugate"``,
            ``"splitting"``) or ``None`` (keep the saved one). The SDE parameters and ``prediction_type`` come
            from the saved scheduler config (``from_config``).
        sampler: a sampler of that class (``PSLDScheduler``: ``em``, ``pf_euler``, ``pf_heun``, ``sscs``;
            ``SplittingScheduler``: ``roba``, ``cvv``, ...); ``None`` keeps the class's own choice.
        striding: ``uniform`` / ``quadratic``; ``None`` keeps it.
        project_eps: the schedulers' ``project_eps`` (consistent ε; needs Γ > 0); ``None`` keeps it.

    Returns:
        ``(sample_fn, info)``; ``sample_fn(batch_size, generator)`` returns ``[B, H, W, C]`` float32 images in
        [0, 1]; ``info`` describes the model and scheduler for the report, and ``info["fingerprint"]`` is the
        provenance to pass to :func:`generate_shards` / :func:`load_shards` (SHA-256 of every weight file,
        sampling loop, scheduler class and config, NFE, guidance, UNet dtype, device type).
    """
    from ..pipelines import PSLDPipeline
    from ..schedulers import PSLDScheduler

    if not os.path.isdir(model_dir):
        raise ValueError(f"`model_dir` must be a directory (a saved pipeline), got {model_dir!r}")
    classes = scheduler_classes()
    if scheduler is not None and scheduler not in classes:
        raise ValueError(f"`scheduler` must be one of {sorted(classes)} or None, got {scheduler!r}")
    if os.path.isfile(os.path.join(model_dir, "model_index.json")):
        kw = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        pipe = PSLDPipeline.from_pretrained(model_dir, **kw)
        layout = "PSLDPipeline"
    else:
        unet, sched = _load_components(model_dir, torch_dtype)
        pipe = PSLDPipeline(unet=unet, scheduler=sched)
        layout = "unet/ + scheduler/ (no model_index.json)"
    unet, sched = pipe.unet, pipe.scheduler
    overrides = {}
    if sampler is not None:
        overrides["sampler"] = sampler
    if striding is not None:
        overrides["striding"] = striding
    if project_eps is not None:
        overrides["project_eps"] = project_eps
    if scheduler is not None:
        cls = classes[scheduler]
        if "sampler" in overrides and overrides["sampler"] not in cls._samplers:
            raise ValueError(f"`sampler` must be one of {cls._samplers} (or unset) with scheduler={scheduler!r}, got {sampler!r}")
        sched = cls.from_config(sched.config, **overrides)
    elif overrides:  # keep the saved class when it runs the requested sampler, else PSLDScheduler (EM/PF/SSCS)
        cls = type(sched) if overrides.get("sampler", sched.config.sampler) in type(sched)._samplers else PSLDScheduler
        sched = cls.from_config(sched.config, **overrides)
    pipe.scheduler = sched
    pipe = pipe.to(device)
    pipe.unet.eval()
    pipe.set_progress_bar_config(disable=True)

    k = sched.num_components
    if pipe is not None:  # the pipeline knows its layout (also for a wrapped diffusers network, `from_vp`)
        size, data_channels = tuple(pipe._sample_hw()), pipe.data_channels
    else:
        size = unet.config.sample_size
        size = (size, size) if isinstance(size, int) else tuple(size)
        data_channels = unet.config.in_channels // k

    @torch.no_grad()
    def sample_fn(batch_size: int, generator: torch.Generator):
        return pipe(batch_size=batch_size, generator=generator, num_inference_steps=num_inference_steps,
                    output_type="np").images

    info = {
        "model": os.path.abspath(model_dir),
        "model_layout": layout,
        "unet_parameters": int(sum(p.numel() for p in unet.parameters())),
        "scheduler": type(sched).__name__,
        "sampler": sched.config.sampler,
        "striding": sched.config.striding,
        "project_eps": bool(getattr(sched.config, "project_eps", False)),
        "diffusion": sched.config.diffusion,
        "num_inference_steps": num_inference_steps,
        "num_components": k,
        "data_channels": data_channels,
        "resolution": list(size),
        "scheduler_config": {key: v for key, v in dict(sched.config).items() if not key.startswith("_")},
    }
    # what generated the samples: compared with every existing shard before reusing it (generate_shards)
    info["fingerprint"] = _jsonable({
        "weights_sha256": weights_sha256(model_dir),
        "sampling_loop": "PSLDPipeline",  # one loop for every layout
        "scheduler": info["scheduler"],
        "scheduler_config": info["scheduler_config"],
        "num_inference_steps": int(num_inference_steps),
        "guidance": None,  # evaluate.py samples unconditionally
        "unet_dtype": str(unet.dtype),
        "device_type": torch.device(device).type,
    })
    return sample_fn, info
