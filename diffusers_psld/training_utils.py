r"""Pieces of a PSLD training loop that do not depend on its command line (as ``diffusers.training_utils``).

``training/train_psld.py`` is built from these; a loop of your own can use them the same way.

* :func:`step_generator` — the generator of one micro-batch's t, ε and label dropout, a pure function of
  (seed, rank, step, micro-batch): a resumed run draws exactly what the uninterrupted one drew.
* :func:`save_ema` / :func:`load_ema` — an ``EMAModel`` as a plain model folder (safetensors) plus
  ``ema_state.json``; no EMA keys in the UNet config, so loads are warning-free.
* :func:`register_state_hooks` — Accelerate ``save_state`` / ``load_state`` hooks that write and read the
  UNet (and EMA) as Diffusers model folders ``unet/`` and ``unet_ema/``.
* :func:`sample_images` / :func:`make_grid` — the sample grid of a training run (own generator: sampling
  never changes the training trajectory), with a progress bar.
* :func:`plot_loss` / :func:`rewrite_log` — ``train_log.jsonl`` → ``loss_curve.png``; truncate the log on resume.

Nothing here imports Accelerate: the hooks take the ``Accelerator`` as an argument.
"""
from __future__ import annotations

import json
import math
import os

__all__ = ["EMA_STATE", "step_generator", "save_ema", "load_ema", "register_state_hooks", "sample_images", "make_grid",
           "plot_loss", "rewrite_log"]

#: file beside the EMA weights holding the ``EMAModel`` counters (decay, optimization_step, warm-up, ...)
EMA_STATE = "ema_state.json"


def step_generator(seed: int, rank: int, step: int, micro: int):
    """``torch.Generator`` for t, ε and label dropout of micro-batch ``micro`` of optimizer step ``step`` on
    process ``rank``, seeded by ``numpy.random.SeedSequence([seed, rank, step, micro])``."""
    import numpy as np
    import torch

    s = int(np.random.SeedSequence([seed & 0xFFFFFFFF, rank, step, micro]).generate_state(1, dtype=np.uint64)[0])
    return torch.Generator().manual_seed(s & 0x7FFF_FFFF_FFFF_FFFF)


def save_ema(ema, path: str):
    """Save an ``EMAModel`` as a plain model folder (``UNet2DModel`` / ``NCSNppModel``; its config holds only model keys) plus
    ``ema_state.json`` (decay, optimization_step, warm-up …). diffusers' ``EMAModel.save_pretrained``
    writes the EMA keys into the UNet's config.json instead, and every later load then warns that they
    "were passed to UNet2DModel … will be ignored"."""
    from diffusers import UNet2DModel

    model_cls = ema.model_cls or UNet2DModel  # UNet2DModel or NCSNppModel (the class training built)
    model = model_cls.from_config(dict(ema.model_config))
    ema.copy_to(model.parameters())
    model.save_pretrained(path, safe_serialization=True)
    state = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    with open(os.path.join(path, EMA_STATE), "w") as f:
        json.dump(state, f, indent=1)


def load_ema(ema, path: str):
    """Load :func:`save_ema`'s folder (or one written by ``EMAModel.save_pretrained``, EMA keys in
    config.json) into ``ema``: shadow parameters from the safetensors weights, the EMA counters from
    ``ema_state.json``. Reads only safetensors; no diffusers warning (the config is split by hand).

    Raises:
        FileNotFoundError: the folder has no ``diffusion_pytorch_model.safetensors``.
    """
    from diffusers import UNet2DModel
    from safetensors.torch import load_file

    with open(os.path.join(path, "config.json")) as f:
        config = json.load(f)
    ema_keys = set(ema.state_dict()) - {"shadow_params"}
    if os.path.exists(os.path.join(path, EMA_STATE)):
        with open(os.path.join(path, EMA_STATE)) as f:
            state = json.load(f)
    else:  # EMAModel.save_pretrained layout
        state = {k: config[k] for k in ema_keys if k in config}
    config = {k: v for k, v in config.items() if k not in ema_keys}
    weights = os.path.join(path, "diffusion_pytorch_model.safetensors")
    if not os.path.exists(weights):
        raise FileNotFoundError(f"{weights} is missing (EMA weights are read from safetensors only)")
    model = (ema.model_cls or UNet2DModel).from_config(config)
    model.load_state_dict(load_file(weights))
    ema.load_state_dict({**state, "shadow_params": [p.detach().clone() for p in model.parameters()]})


def register_state_hooks(accelerator, ema=None):
    """Make ``accelerator.save_state(dir)`` write each prepared model as a Diffusers folder ``dir/unet/``
    (safetensors, main process only) and ``ema`` (an ``EMAModel`` or None) as ``dir/unet_ema/``
    (:func:`save_ema`), and ``load_state(dir)`` read them back on every process, as diffusers' training
    examples do."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            if ema is not None:
                save_ema(ema, os.path.join(output_dir, "unet_ema"))
            for m in models:
                accelerator.unwrap_model(m).save_pretrained(os.path.join(output_dir, "unet"))
        while weights:
            weights.pop()

    def load_hook(models, input_dir):
        if ema is not None:
            load_ema(ema, os.path.join(input_dir, "unet_ema"))
            ema.to(accelerator.device)
        while models:
            # the prepared model: DistributedDataParallel (several processes) or compiled wraps the UNet
            m = accelerator.unwrap_model(models.pop())
            loaded = type(m).from_pretrained(input_dir, subfolder="unet")
            m.register_to_config(**loaded.config)
            m.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)


def sample_images(unet, scheduler_config: dict, n: int, data_channels: int, resolution: int, num_inference_steps: int,
                  seed: int, class_labels=None, device="cpu", progress: bool = False):
    """Sample ``n`` images (data half in [-1, 1], ``[n, data_channels, resolution, resolution]``) with the
    standard loop: a copy of the scheduler and an own generator seeded with ``seed``, so no global RNG is
    consumed and sampling never changes the training trajectory. ``class_labels`` (``[n]`` long) default to
    the null class of a class-conditional UNet. ``progress`` shows a bar over the network evaluations."""
    import torch
    from tqdm.auto import tqdm

    from .schedulers import PSLDScheduler

    sched = PSLDScheduler.from_config(scheduler_config)
    k = sched.num_components
    g = torch.Generator().manual_seed(seed)
    sched.set_timesteps(num_inference_steps)
    dtype = next(unet.parameters()).dtype
    z = sched.sample_prior((n, k * data_channels, resolution, resolution), generator=g).to(device)
    kw = {}
    if unet.config.num_class_embeds is not None:
        if class_labels is None:
            class_labels = torch.full((n,), unet.config.num_class_embeds - 1, dtype=torch.long)
        kw["class_labels"] = class_labels.to(device)
    with torch.no_grad():
        for t in tqdm(sched.timesteps, desc=f"sample grid ({n} images)", disable=not progress, leave=False):
            eps = unet(sched.scale_model_input(z, t).to(dtype), sched.model_time(t, n).to(device), **kw).sample
            z = sched.step(eps.float(), t, z, generator=g).prev_sample
    return z[:, :data_channels].clamp(-1, 1)


def make_grid(x, nrow=None):
    """``[N, C, H, W]`` in [-1, 1] → PIL grid (2 px gaps, nearest-upscaled to at least 256 px wide)."""
    import numpy as np
    import PIL.Image

    n, c, h, w = x.shape
    nrow = nrow or int(math.ceil(math.sqrt(n)))
    ncol = int(math.ceil(n / nrow))
    pad = 2
    grid = np.ones((ncol * (h + pad) + pad, nrow * (w + pad) + pad, c), dtype=np.float32)
    arr = ((x.float().cpu().numpy() + 1) / 2).transpose(0, 2, 3, 1)
    for i in range(n):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = arr[i]
    img = PIL.Image.fromarray((grid[:, :, 0] if c == 1 else grid).clip(0, 1).__mul__(255).round().astype(np.uint8))
    scale = max(1, math.ceil(256 / img.width))
    return img.resize((img.width * scale, img.height * scale), PIL.Image.NEAREST) if scale > 1 else img


def rewrite_log(path: str, upto_step: int):
    """Keep only the lines of the JSON-lines loss log ``path`` with ``step <= upto_step`` (a resumed run
    writes the rest again); atomic (temporary file + ``os.replace``). No-op when the file does not exist."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        lines = [ln for ln in f if ln.strip() and json.loads(ln)["step"] <= upto_step]
    with open(path + ".tmp", "w") as f:
        f.writelines(lines)
    os.replace(path + ".tmp", path)


def plot_loss(log_path: str, out_png: str):
    """Loss curve (raw and 50-step moving average, log scale) from the JSON-lines log ``log_path`` to
    ``out_png``; returns the path, or None without matplotlib or without log lines."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        return None
    with open(log_path) as f:
        rows = [json.loads(ln) for ln in f if ln.strip()]
    if not rows:
        return None
    s = np.array([r["step"] for r in rows])
    v = np.array([r["loss"] for r in rows])
    fig, ax = plt.subplots(figsize=(5, 3.2), dpi=100)
    ax.plot(s, v, lw=0.5, alpha=0.4, label="loss")
    w = min(50, len(v))
    if w > 1:
        ax.plot(s[w - 1:], np.convolve(v, np.ones(w) / w, mode="valid"), lw=1.5, label=f"{w}-step mean")
    ax.set_xlabel("step")
    ax.set_ylabel("HSM ε loss")
    ax.set_yscale("log")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
