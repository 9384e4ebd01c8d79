"""Gradio demo for diffusers-psld: unconditional, class-guided, inpainting and image-to-image (SDEdit) sampling.

Model: ``PSLD_MODEL`` env var (local pipeline dir or Hub id); default ``outputs/psld-digits-psld``
(what ``training/train_psld.py`` writes for the digits data). If that is missing, an **untrained** tiny
UNet is built at startup and the UI says so (its samples are noise). Any saved PSLD / CLD / VP pipeline loads,
whatever its ``prediction_type`` ("epsilon": k·C-channel UNet; "sample" / "sufficient_epsilon": C channels) and
``input_preconditioning``; the page shows them (:func:`model_info`). Run: ``python demo/app.py``.

Limits (environment variables): ``PSLD_MAX_BATCH`` (16) images per request, ``PSLD_MAX_STEPS`` (500)
steps, ``PSLD_MAX_COST`` (batch × steps × cost factor; default ``PSLD_MAX_BATCH × PSLD_MAX_STEPS``,
where a plain step costs 1, a classifier-free-guided step 2 and a Tweedie-inpainting step
:data:`TWEEDIE_COST` = 6; image-to-image counts the model calls it runs, ≈ strength × steps,
:func:`img2img_nfe`) and ``PSLD_MAX_QUEUE`` (16) waiting requests (``demo.queue(max_size=...)``,
one request runs at a time). Every bad input (seed out of [0, 2**64 - 1] or not an integer, a file that
is not an image, an unknown sampler, a strength outside (0, 1], a request over the limits) is a ``gr.Error``
naming the input; so is whatever the pipelines raise (``ValueError`` / ``TypeError`` for an argument,
``NonFiniteError`` for a NaN or inf during sampling; :func:`pipeline_errors`), instead of Gradio's generic error.

Default sampler: the README's recommendation for the loaded model: gDDIM multistep
(:class:`GDDIMMultistepScheduler`) for PSLD with Γ > 0 and VP, SSCS with quadratic striding for CLD (Γ = 0).
New tabs (e.g. image-to-image) are one ``_<name>_tab(ctx)`` function added to ``TABS``.
"""
from __future__ import annotations

import contextlib
import os
import sys

import numpy as np
import PIL.Image
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

try:
    import gradio as gr  # noqa: E402
except ImportError:  # pragma: no cover - the demo extra is not installed
    sys.exit('demo/app.py needs Gradio: pip install "gradio>=6.0" (in a source checkout: pip install -e ".[demo]")')
from diffusers import UNet2DModel  # noqa: E402

from diffusers_psld.pipelines import NonFiniteError, PSLDImg2ImgPipeline, PSLDPipeline  # noqa: E402
from diffusers_psld.pipelines.pipeline_psld_img2img import begin_index_for_strength  # noqa: E402
from diffusers_psld.schedulers import GDDIMMultistepScheduler, PSLDScheduler, SSCSScheduler  # noqa: E402

DEFAULT_MODEL = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "outputs", "psld-digits-psld")
MAX_BATCH = int(os.environ.get("PSLD_MAX_BATCH", 16))
MAX_STEPS = int(os.environ.get("PSLD_MAX_STEPS", 500))
MAX_COST = int(os.environ.get("PSLD_MAX_COST", MAX_BATCH * MAX_STEPS))
MAX_QUEUE = int(os.environ.get("PSLD_MAX_QUEUE", 16))
#: cost of one Tweedie-inpainting step relative to a plain one (ε Jacobian-vector products + CG; issue #13 §8)
TWEEDIE_COST = 6
MAX_SEED = 2**64 - 1  # torch.Generator.manual_seed accepts [0, 2**64 - 1]
GDDIM = "gDDIM multistep (ODE; recommended for PSLD Γ > 0 and VP)"
SSCS = "SSCS (SDE, PSLD Eq. 12; recommended for CLD)"
# label -> (scheduler class, config overrides); quadratic striding for the step-wise samplers (the README advises
# against uniform striding for k = 2 models); gDDIM uses its own power-2.5 time grid
SAMPLERS = {
    GDDIM: (GDDIMMultistepScheduler, {}),
    SSCS: (SSCSScheduler, {"sampler": "sscs", "striding": "quadratic"}),
    "Euler-Maruyama (SDE)": (PSLDScheduler, {"sampler": "em", "striding": "quadratic"}),
    "Probability-flow Euler (ODE)": (PSLDScheduler, {"sampler": "pf_euler", "striding": "quadratic"}),
    "Probability-flow Heun (ODE)": (PSLDScheduler, {"sampler": "pf_heun", "striding": "quadratic"}),
}
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


def model_info(pipe) -> str:
    """One line for the page: the diffusion, the network's ``prediction_type`` and output channels, the input
    preconditioning and the guidance components of ``pipe``."""
    cfg = pipe.scheduler.config
    if pipe.num_components == 1:
        diffusion = "VP"
    elif float(cfg.get("gamma", 0.0)) > 0:
        diffusion = f"PSLD (Γ = {float(cfg['gamma']):g}, ν = {float(cfg['nu']):g})"
    else:
        diffusion = f"CLD (PSLD with Γ = 0, ν = {float(cfg['nu']):g})"
    out_ch = pipe.unet.config.out_channels
    text = (f"{diffusion}; {type(pipe.unet).__name__} output `prediction_type=\"{cfg.get('prediction_type', 'epsilon')}\"` "
            f"({out_ch} channel{'s' if out_ch != 1 else ''})")
    if cfg.get("input_preconditioning", False):
        text += f", input preconditioning (σ_data = {float(cfg['sigma_data']):g})"
    if pipe.is_class_conditional:
        text += f"; class-conditional UNet ({pipe.unet.config.num_class_embeds - 1} classes)"
    if pipe.classifier is not None:
        text += f"; time-dependent classifier ({pipe.classifier.config.num_classes} classes)"
    return text + "."


def recommended_sampler(pipe) -> str:
    """The README's recommended sampler label for this model: gDDIM for PSLD Γ > 0 / VP, SSCS for CLD."""
    cfg = pipe.scheduler.config
    if pipe.num_components == 2 and not float(cfg.get("gamma", 0.0)) > 0:
        return SSCS
    return GDDIM


def _scheduler(pipe, sampler_label):
    if sampler_label not in SAMPLERS:
        raise gr.Error(f"sampler: unknown {sampler_label!r}; choose one of {list(SAMPLERS)}")
    cls, overrides = SAMPLERS[sampler_label]
    if pipe.num_components == 1 and cls is SSCSScheduler:
        raise gr.Error("sampler: SSCS needs a PSLD/CLD model (this one is VP)")
    try:
        return cls.from_config(pipe.scheduler.config, **overrides)
    except ValueError as err:  # e.g. gDDIM on a CLD model
        raise gr.Error(f"sampler: {sampler_label} cannot sample this model: {err}") from None


def _integer(value, name: str, low: int, high: int) -> int:
    """``value`` as an int in [low, high], else a gr.Error naming ``name`` (no silent truncation or wrap-around)."""
    if isinstance(value, str):
        value = value.strip()
        if not value.lstrip("+-").isdigit():
            raise gr.Error(f"{name} must be an integer, got {value!r}")
        value = int(value)
    elif isinstance(value, float):
        if not np.isfinite(value) or value != int(value):
            raise gr.Error(f"{name} must be an integer, got {value!r}")
        value = int(value)
    elif isinstance(value, (bool, type(None))) or not isinstance(value, (int, np.integer)):
        raise gr.Error(f"{name} must be an integer, got {value!r}")
    value = int(value)
    if not low <= value <= high:
        raise gr.Error(f"{name} must be between {low} and {high}, got {value}")
    return value


def _check_inputs(batch, steps, seed):
    """``(batch, steps, seed)`` as ints within the limits, else a gr.Error naming the input."""
    return (_integer(batch, "batch size", 1, MAX_BATCH), _integer(steps, "steps", 2, MAX_STEPS),
            _integer(seed, "seed", 0, MAX_SEED))


def _check_cost(batch: int, calls: int, cost_factor: int = 1, what: str = "a plain step", calls_text: str | None = None):
    """gr.Error if ``batch × calls × cost_factor`` (model calls per image, each costing ``cost_factor`` plain
    steps) is over ``MAX_COST``."""
    cost = batch * calls * cost_factor
    if cost > MAX_COST:
        raise gr.Error(f"this request costs {cost} image-steps (batch {batch} × {calls_text or f'steps {calls}'} × "
                       f"{cost_factor} for {what}), over the limit of {MAX_COST}: lower the batch size or the steps")


def _check(batch, steps, seed, cost_factor: int = 1, what: str = "a plain step"):
    batch, steps, seed = _check_inputs(batch, steps, seed)
    _check_cost(batch, steps, cost_factor, what)
    return batch, steps, seed


@contextlib.contextmanager
def pipeline_errors():
    """Turn what the package raises for one request into a ``gr.Error`` (shown on the page; Gradio replaces any
    other exception by a generic message): ``ValueError`` / ``TypeError`` (a bad argument, named in the message)
    and :class:`~diffusers_psld.NonFiniteError` (a NaN or inf during sampling: call, time, likely cause)."""
    try:
        yield
    except gr.Error:  # already a message for the page (gr.Error is a ValueError)
        raise
    except NonFiniteError as err:
        raise gr.Error(f"sampling failed (NaN or inf): {err}. Try a lower guidance scale, another sampler or more "
                       "steps; if every request fails, the model's weights are broken") from None
    except (ValueError, TypeError) as err:
        raise gr.Error(f"invalid input: {err}") from None


def _show(images):
    return [im.resize((DISPLAY_PX, DISPLAY_PX * im.height // im.width), PIL.Image.NEAREST) for im in images]


def _sample(pipe, scheduler, batch, steps, seed, pipeline_cls=PSLDPipeline, **kwargs):
    """Run ``pipeline_cls`` on the loaded components (``pipe.unet``, ``pipe.classifier``) with ``scheduler``;
    the inputs are already checked. Pipeline errors become gr.Errors (:func:`pipeline_errors`)."""
    with pipeline_errors():
        runner = pipeline_cls(unet=pipe.unet, scheduler=scheduler, classifier=pipe.classifier)
        runner.set_progress_bar_config(disable=True)
        out = runner(batch_size=batch, num_inference_steps=steps, generator=torch.Generator().manual_seed(seed), **kwargs)
    return _show(out.images)


def _run(pipe, sampler, batch, steps, seed, cost_factor=1, what="a plain step", **kwargs):
    batch, steps, seed = _check(batch, steps, seed, cost_factor, what)
    return _sample(pipe, _scheduler(pipe, sampler), batch, steps, seed, **kwargs)


def img2img_nfe(scheduler, steps: int, strength) -> int:
    """Model calls of a :class:`PSLDImg2ImgPipeline` run with ``steps`` and ``strength`` on ``scheduler``: the
    calls from the start the pipeline picks (:func:`begin_index_for_strength`, ≈ ``strength × steps`` on a uniform
    grid, more on the quadratic / power grids, which crowd calls near t = 0) to the end. Sets the scheduler's
    timesteps (the pipeline sets them again).

    Raises:
        TypeError / ValueError: ``strength`` is not a real number in (0, 1], or below the schedule's last time.
    """
    scheduler.set_timesteps(steps)
    return len(scheduler.timesteps) - begin_index_for_strength(scheduler, strength)


def _model_image(image, ctx):
    """The upload as a PIL image in the model's mode ("L" or "RGB") and size (bilinear resize)."""
    img = PIL.Image.fromarray(np.asarray(image)) if not isinstance(image, PIL.Image.Image) else image
    return img.convert("L" if ctx.C == 1 else "RGB").resize((ctx.W, ctx.H), PIL.Image.BILINEAR)


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


# Gradio components are wrapped per instance (subclassing one makes Gradio write a .pyi stub next to this file)
def checked_image(**kwargs) -> gr.Image:
    """A ``gr.Image`` whose upload of a non-image file is a ``gr.Error`` naming the input (not Gradio's generic one)."""
    comp = gr.Image(**kwargs)
    original = comp.preprocess

    def preprocess(payload):
        try:
            return original(payload)
        except (PIL.UnidentifiedImageError, OSError, ValueError) as err:
            name = getattr(payload, "orig_name", None) or "the uploaded file"
            raise gr.Error(f"{comp.label}: {name!r} is not an image that can be read (PNG, JPEG, WebP, ...): "
                           f"{type(err).__name__}") from None

    comp.preprocess = preprocess
    return comp


def raw_number(*args, **kwargs) -> gr.Number:
    """A ``gr.Number`` that hands the raw value to the handler, which validates it with :func:`_integer` and names
    the input (Gradio's own conversion gives a generic error for ``"abc"`` and rounds integers above 2**53 through
    float)."""
    comp = gr.Number(*args, **kwargs)
    comp.preprocess = lambda payload: payload
    return comp


def raw_slider(*args, **kwargs) -> gr.Slider:
    """A ``gr.Slider`` that hands the raw value to the handler, which validates it and names the input (Gradio's
    own bound check says "Value 0 is less than minimum value 0.01" without naming the slider, and fails on
    ``"abc"`` with a generic error)."""
    comp = gr.Slider(*args, **kwargs)
    comp.preprocess = lambda payload: payload
    return comp


class DemoContext:
    """What every tab needs: the pipeline, its image geometry, its guidance kind and the shared controls."""

    def __init__(self, pipe: PSLDPipeline):
        self.pipe = pipe
        self.C = pipe.data_channels
        size = pipe.unet.config.sample_size
        self.H, self.W = (size, size) if isinstance(size, int) else tuple(size)
        self.n_classes, self.guide_kind = None, None
        if pipe.is_class_conditional:
            self.n_classes = pipe.unet.config.num_class_embeds - 1
            self.guide_kind = "classifier-free guidance (class-conditional UNet)"
        elif pipe.classifier is not None:
            self.n_classes = pipe.classifier.config.num_classes
            self.guide_kind = "classifier guidance (time-dependent classifier)"
        self.default_sampler = recommended_sampler(pipe)

    def controls(self):
        sampler = gr.Dropdown(list(SAMPLERS), value=self.default_sampler, label="sampler")
        steps = raw_slider(2, MAX_STEPS, value=min(50, MAX_STEPS), step=1, label="steps (model evaluations)")
        seed = raw_number(0, precision=0, label="seed (0 … 2**64 - 1)")
        batch = raw_slider(1, MAX_BATCH, value=4, step=1, label="batch size")
        return [sampler, steps, seed, batch]


def _unconditional_tab(ctx: DemoContext):
    def unconditional(sampler, steps, seed, batch):
        return _run(ctx.pipe, sampler, batch, steps, seed)

    with gr.Tab("Unconditional"):
        ctl = ctx.controls()
        btn = gr.Button("Generate", variant="primary", elem_id="generate-unconditional")
        gal = gr.Gallery(label="samples", elem_id="gallery-unconditional", columns=4)
        btn.click(unconditional, ctl, gal, api_name="unconditional")


def _guided_tab(ctx: DemoContext):
    def guided(label, scale, sampler, steps, seed, batch):
        if ctx.n_classes is None:
            raise gr.Error("This model has no classifier and no class-conditional UNet: class guidance is unavailable")
        label = _integer(label, "class label", 0, ctx.n_classes - 1)
        try:
            scale = float(scale)
        except (TypeError, ValueError):
            raise gr.Error(f"guidance scale must be a number, got {scale!r}") from None
        if not 0.0 <= scale <= 100.0:
            raise gr.Error(f"guidance scale must be between 0 and 100, got {scale}")
        cfg = ctx.pipe.is_class_conditional and scale not in (0.0, 1.0)  # two UNet passes per step
        return _run(ctx.pipe, sampler, batch, steps, seed, cost_factor=2 if cfg else 1,
                    what="classifier-free guidance" if cfg else "a plain step", class_labels=label, guidance_scale=scale)

    with gr.Tab("Class-guided"):
        gr.Markdown(f"Guidance: {ctx.guide_kind}, {ctx.n_classes} classes." if ctx.n_classes else
                    "**Unavailable for this model** (no classifier, no class-conditional UNet).")
        label = raw_number(0, precision=0, label="class label")
        # classifier guidance: 8 is the README's measured scale (90 % of digits samples of the requested class vs 43 %
        # at 1); classifier-free guidance: 1 = the conditional model
        default = 8.0 if ctx.n_classes and not ctx.pipe.is_class_conditional else 1.0
        scale = gr.Slider(0.0, 20.0, value=default, step=0.5,
                          label="guidance scale (1 = exact posterior / conditional; classifier guidance on digits: 8)")
        ctl = ctx.controls()
        btn = gr.Button("Generate", variant="primary")
        gal = gr.Gallery(label="samples", columns=4)
        btn.click(guided, [label, scale, *ctl], gal, api_name="guided")


def _inpaint_tab(ctx: DemoContext):
    def inpaint(image, editor, preset, sampler, steps, seed, batch, method=list(INPAINT_METHODS)[0]):
        if image is None:
            raise gr.Error("image: upload an image to inpaint")
        if method not in INPAINT_METHODS:
            raise gr.Error(f"conditioning: unknown inpainting method {method!r}; choose one of {list(INPAINT_METHODS)}")
        tweedie = INPAINT_METHODS[method] == "tweedie"
        # check the limits before decoding / resizing anything
        _check(batch, steps, seed, TWEEDIE_COST if tweedie else 1, "Tweedie inpainting" if tweedie else "a plain step")
        img = _model_image(image, ctx)
        mask = _mask_from_editor(editor, (ctx.H, ctx.W), preset)
        return _run(ctx.pipe, sampler, batch, steps, seed, cost_factor=TWEEDIE_COST if tweedie else 1,
                    what="Tweedie inpainting" if tweedie else "a plain step", image=img, mask_image=mask,
                    inpaint_correction=INPAINT_METHODS[method])

    with gr.Tab("Inpainting"):
        gr.Markdown("Upload an image; paint the region to **regenerate** on the mask editor, or pick a preset "
                    "(used when nothing is painted). Known pixels are kept exactly.")
        image = checked_image(label="image", type="pil", image_mode="L" if ctx.C == 1 else "RGB")
        editor = gr.ImageEditor(label="mask: paint the region to regenerate", type="numpy")
        preset = gr.Dropdown(MASK_PRESETS, value=MASK_PRESETS[0], label="mask preset")
        ctl = ctx.controls()
        method = gr.Dropdown(list(INPAINT_METHODS), value=list(INPAINT_METHODS)[0], label="conditioning",
                             info=f"Tweedie adds ∇ log p(known | z_t) to the score (exact for Gaussian data); each "
                                  f"step costs about {TWEEDIE_COST} plain steps and counts so in the limits")
        btn = gr.Button("Inpaint", variant="primary")
        gal = gr.Gallery(label="inpainted", columns=4)
        btn.click(inpaint, [image, editor, preset, *ctl, method], gal, api_name="inpaint")


def _img2img_tab(ctx: DemoContext):
    def img2img(image, strength, sampler, steps, seed, batch):
        if image is None:
            raise gr.Error("image: upload an image to start from")
        batch, steps, seed = _check_inputs(batch, steps, seed)
        scheduler = _scheduler(ctx.pipe, sampler)
        with pipeline_errors():  # the package's own strength rule and its errors (naming `strength`)
            nfe = img2img_nfe(scheduler, steps, strength)
        _check_cost(batch, nfe, calls_text=f"{nfe} model calls (strength {float(strength):g} of {steps} steps)")
        return _sample(ctx.pipe, scheduler, batch, steps, seed, pipeline_cls=PSLDImg2ImgPipeline,
                       image=_model_image(image, ctx), strength=strength)

    with gr.Tab("Image-to-image"):
        gr.Markdown("SDEdit: the image is noised by the forward diffusion to t ≈ **strength** (momentum drawn from the "
                    "same kernel) and denoised from there; only the calls after that point run (≈ strength × steps "
                    "model evaluations, counted so in the limits). Small strength stays close to the input, 1 is "
                    "unconditional sampling; with the default β = 8, PSLD forgets the input by t ≈ 0.4. The image is "
                    f"resized to {ctx.W}×{ctx.H}.")
        image = checked_image(label="image", type="pil", image_mode="L" if ctx.C == 1 else "RGB")
        strength = raw_slider(0.01, 1.0, value=0.3, step=0.01, label="strength (0 < strength ≤ 1; 1 = from noise)")
        ctl = ctx.controls()
        btn = gr.Button("Generate", variant="primary")
        gal = gr.Gallery(label="samples", columns=4)
        btn.click(img2img, [image, strength, *ctl], gal, api_name="img2img")


#: the tabs in display order; a new tab is one more ``_<name>_tab(ctx)`` function here
TABS = [_unconditional_tab, _guided_tab, _inpaint_tab, _img2img_tab]


def build_demo(pipe: PSLDPipeline, status: str) -> gr.Blocks:
    """The Blocks app with every tab of :data:`TABS`; the queue holds at most ``MAX_QUEUE`` waiting requests."""
    ctx = DemoContext(pipe)
    with gr.Blocks(title="PSLD sampler") as demo:
        gr.Markdown(f"# Phase Space Langevin Diffusion (PSLD)\n{status} {model_info(pipe)}\n\nImages are "
                    f"{ctx.H}×{ctx.W}, {ctx.C} channel(s); shown enlarged. Default sampler: {ctx.default_sampler}. "
                    f"Limits: batch ≤ {MAX_BATCH}, steps ≤ {MAX_STEPS}, batch × steps × cost ≤ {MAX_COST} (Tweedie "
                    f"inpainting counts {TWEEDIE_COST}× a plain step, image-to-image only the calls it runs), at "
                    f"most {MAX_QUEUE} requests waiting.")
        for tab in TABS:
            tab(ctx)
    demo.queue(max_size=MAX_QUEUE, default_concurrency_limit=1)
    return demo


def main():
    pipe, status = load_pipeline()
    print(status)
    build_demo(pipe, status).launch(server_name=os.environ.get("GRADIO_SERVER_NAME", "127.0.0.1"))


if __name__ == "__main__":
    main()
