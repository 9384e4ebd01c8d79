"""Gradio demo for diffusers-psld: unconditional, class-guided and inpainting sampling.

Model: ``PSLD_MODEL`` env var (local pipeline dir or Hub id); default ``outputs/psld-digits-psld``
(what ``training/train_psld.py`` writes for the digits data). If that is missing, an **untrained** tiny
UNet is built at startup and the UI says so (its samples are noise). Run: ``python demo/app.py``.
"""
from __future__ import annotations

import os
import sys

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradio as gr  # noqa: E402
from diffusers import UNet2DModel  # noqa: E402

from diffusers_psld.pipelines import PSLDPipeline  # noqa: E402
from diffusers_psld.schedulers import PSLDScheduler, SSCSScheduler  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outputs", "psld-digits-psld")
MAX_BATCH = int(os.environ.get("PSLD_MAX_BATCH", 16))
MAX_STEPS = int(os.environ.get("PSLD_MAX_STEPS", 500))
SAMPLERS = {"Euler-Maruyama (SDE)": "em", "SSCS (SDE, PSLD Eq. 12)": "sscs", "Probability-flow Euler (ODE)": "pf_euler",
            "Probability-flow Heun (ODE)": "pf_heun"}
MASK_PRESETS = ["keep left half", "keep top half", "keep border (fill centre)"]
INPAINT_METHODS = {"replacement (paper; fast, biased for correlated pixels)": "replace",
                   "replacement + Tweedie correction (slower per step)": "tweedie"}
DISPLAY_PX = 128


def untrained_pipeline() -> PSLDPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4, layers_per_block=1)
    return PSLDPipeline(unet=unet, scheduler=PSLDScheduler())


def load_pipeline(model: str | None = None):
    """Return ``(pipeline, status message)``."""
    model = model or os.environ.get("PSLD_MODEL") or DEFAULT_MODEL
    try:
        pipe = PSLDPipeline.from_pretrained(model)
        msg = f"Model: `{model}`."
    except Exception as err:  # noqa: BLE001  (startup must not crash; say what happened)
        pipe = untrained_pipeline()
        msg = (f"**Could not load `{model}` ({type(err).__name__}). Using an UNTRAINED tiny 8×8 UNet: samples are "
               "noise.** Train one with `training/train_psld.py` or set `PSLD_MODEL` to a trained pipeline.")
    pipe.set_progress_bar_config(disable=True)
    return pipe, msg


def _scheduler(pipe, sampler_label):
    name = SAMPLERS.get(sampler_label)
    if name is None:
        raise gr.Error(f"Unknown sampler {sampler_label!r}; choose one of {list(SAMPLERS)}")
    if pipe.num_components == 1 and name == "sscs":
        raise gr.Error("SSCS needs a PSLD/CLD model (this one is VP)")
    if name == "sscs":
        return SSCSScheduler.from_config(pipe.scheduler.config, sampler="sscs")
    return PSLDScheduler.from_config(pipe.scheduler.config, sampler=name)


def _check(batch, steps, seed):
    try:
        batch, steps, seed = int(batch), int(steps), int(seed)
    except (TypeError, ValueError):
        raise gr.Error("batch size, steps and seed must be integers") from None
    if not 1 <= batch <= MAX_BATCH:
        raise gr.Error(f"batch size must be between 1 and {MAX_BATCH}")
    if not 2 <= steps <= MAX_STEPS:
        raise gr.Error(f"steps must be between 2 and {MAX_STEPS}")
    if seed < 0:
        raise gr.Error("seed must be >= 0")
    return batch, steps, seed


def _show(images):
    return [im.resize((DISPLAY_PX, DISPLAY_PX * im.height // im.width), PIL.Image.NEAREST) for im in images]


def _run(pipe, sampler, batch, steps, seed, **kwargs):
    batch, steps, seed = _check(batch, steps, seed)
    runner = PSLDPipeline(unet=pipe.unet, scheduler=_scheduler(pipe, sampler), classifier=pipe.classifier)
    runner.set_progress_bar_config(disable=True)
    try:
        out = runner(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    except ValueError as err:
        raise gr.Error(str(err)) from None
    return _show(out.images)


def _mask_from_editor(editor, size, preset):
    """Keep-mask (1 = keep) from painted strokes (painted = regenerate), else from the preset."""
    H, W = size
    layers = (editor or {}).get("layers") if isinstance(editor, dict) else None
    painted = None
    for layer in layers or []:
        arr = np.asarray(PIL.Image.open(layer) if isinstance(layer, str) else layer)
        if arr.ndim == 3 and arr.shape[-1] == 4:
            a = PIL.Image.fromarray((arr[..., 3] > 0).astype(np.uint8) * 255).resize((W, H), PIL.Image.NEAREST)
            painted = np.asarray(a) > 0 if painted is None else painted | (np.asarray(a) > 0)
    if painted is not None and painted.any():
        return (~painted).astype(np.float32)
    mask = np.zeros((H, W), dtype=np.float32)
    if preset == "keep left half":
        mask[:, : W // 2] = 1
    elif preset == "keep top half":
        mask[: H // 2] = 1
    elif preset == "keep border (fill centre)":
        mask[:] = 1
        mask[H // 4: H - H // 4, W // 4: W - W // 4] = 0
    else:
        raise gr.Error(f"unknown mask preset {preset!r}")
    return mask


def build_demo(pipe: PSLDPipeline, status: str) -> gr.Blocks:
    C = pipe.data_channels
    size = pipe.unet.config.sample_size
    H, W = (size, size) if isinstance(size, int) else tuple(size)
    n_classes = None
    if pipe.is_class_conditional:
        n_classes, guide_kind = pipe.unet.config.num_class_embeds - 1, "classifier-free guidance (class-conditional UNet)"
    elif pipe.classifier is not None:
        n_classes, guide_kind = pipe.classifier.config.num_classes, "classifier guidance (time-dependent classifier)"

    def unconditional(sampler, steps, seed, batch):
        return _run(pipe, sampler, batch, steps, seed)

    def guided(label, scale, sampler, steps, seed, batch):
        if n_classes is None:
            raise gr.Error("This model has no classifier and no class-conditional UNet: class guidance is unavailable")
        try:
            label = int(label)
        except (TypeError, ValueError):
            raise gr.Error("class label must be an integer") from None
        if not 0 <= label < n_classes:
            raise gr.Error(f"class label must be in [0, {n_classes - 1}]")
        return _run(pipe, sampler, batch, steps, seed, class_labels=label, guidance_scale=float(scale))

    def inpaint(image, editor, preset, sampler, steps, seed, batch, method=list(INPAINT_METHODS)[0]):
        if image is None:
            raise gr.Error("Upload an image to inpaint")
        if method not in INPAINT_METHODS:
            raise gr.Error(f"Unknown inpainting method {method!r}; choose one of {list(INPAINT_METHODS)}")
        img = PIL.Image.fromarray(np.asarray(image)) if not isinstance(image, PIL.Image.Image) else image
        img = img.convert("L" if C == 1 else "RGB").resize((W, H), PIL.Image.BILINEAR)
        mask = _mask_from_editor(editor, (H, W), preset)
        return _run(pipe, sampler, batch, steps, seed, image=img, mask_image=mask, inpaint_correction=INPAINT_METHODS[method])

    def controls():
        sampler = gr.Dropdown(list(SAMPLERS), value=list(SAMPLERS)[0], label="sampler")
        steps = gr.Slider(2, MAX_STEPS, value=min(100, MAX_STEPS), step=1, label="steps (model evaluations)")
        seed = gr.Number(0, precision=0, label="seed")
        batch = gr.Slider(1, MAX_BATCH, value=4, step=1, label="batch size")
        return [sampler, steps, seed, batch]

    with gr.Blocks(title="PSLD sampler") as demo:
        gr.Markdown(f"# Phase Space Langevin Diffusion (PSLD)\n{status}\n\nImages are {H}×{W}, {C} channel(s); shown enlarged.")
        with gr.Tab("Unconditional"):
            ctl = controls()
            btn = gr.Button("Generate", variant="primary", elem_id="generate-unconditional")
            gal = gr.Gallery(label="samples", elem_id="gallery-unconditional", columns=4)
            btn.click(unconditional, ctl, gal, api_name="unconditional")
        with gr.Tab("Class-guided"):
            gr.Markdown(f"Guidance: {guide_kind}, {n_classes} classes." if n_classes else
                        "**Unavailable for this model** (no classifier, no class-conditional UNet).")
            label = gr.Number(0, precision=0, label="class label")
            scale = gr.Slider(0.0, 20.0, value=1.0, step=0.5, label="guidance scale (1 = exact posterior / conditional)")
            ctl = controls()
            btn = gr.Button("Generate", variant="primary")
            gal = gr.Gallery(label="samples", columns=4)
            btn.click(guided, [label, scale, *ctl], gal, api_name="guided")
        with gr.Tab("Inpainting"):
            gr.Markdown("Upload an image; paint the region to **regenerate** on the mask editor, or pick a preset "
                        "(used when nothing is painted). Known pixels are kept exactly.")
            image = gr.Image(label="image", type="pil", image_mode="L" if C == 1 else "RGB")
            editor = gr.ImageEditor(label="mask: paint the region to regenerate", type="numpy")
            preset = gr.Dropdown(MASK_PRESETS, value=MASK_PRESETS[0], label="mask preset")
            ctl = controls()
            method = gr.Dropdown(list(INPAINT_METHODS), value=list(INPAINT_METHODS)[0], label="conditioning",
                                 info="Tweedie adds ∇ log p(known | z_t) to the score (exact for Gaussian data); "
                                      "a few extra backward passes per step")
            btn = gr.Button("Inpaint", variant="primary")
            gal = gr.Gallery(label="inpainted", columns=4)
            btn.click(inpaint, [image, editor, preset, *ctl, method], gal, api_name="inpaint")
    return demo


def main():
    pipe, status = load_pipeline()
    print(status)
    build_demo(pipe, status).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))


if __name__ == "__main__":
    main()
