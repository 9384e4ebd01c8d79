"""Train a time-dependent classifier p(y | z_t) for PSLD class guidance (Accelerate).

Offline default: scikit-learn's 8×8 digits, loaded with :func:`diffusers_psld.data.load_digits_dataset`
(the UNet's training data: PIL **bicubic** resize to the resolution, [-1, 1]). z_t comes from
``scheduler.add_noise`` (the HSM kernel), t ~ U(1e-5, 1); the classifier sees ``scheduler.model_time(t)``.
Writes ``<output_dir>/classifier`` (safetensors + config), a model card ``<output_dir>/classifier/README.md``,
``metrics.json`` and, with ``--pipeline``, a copy of that pipeline with the classifier attached
(``<output_dir>/pipeline``).

With ``--pipeline`` the classifier is trained on the pipeline's own states: its scheduler (SDE and
time scale) and its UNet's ``sample_size``; ``--resolution`` may be omitted and is refused if it differs
(a classifier trained at another size would be fed states it never saw). Without ``--pipeline``:
``PSLDScheduler()`` defaults and 16 px (the default digits model).

Documented recipe for the digits PSLD model (guided accuracy: ``benchmarks/guided_accuracy.py``); the first
command is the Quickstart's, which writes ``outputs/psld-digits-psld``::

    python training/train_psld.py
    python training/train_classifier.py --pipeline outputs/psld-digits-psld --output_dir outputs/clf-digits
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from diffusers_psld.models.classifier import TimeDependentClassifier  # noqa: E402
from diffusers_psld.schedulers import PSLDScheduler  # noqa: E402

CARD = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "model_cards", "classifier_model_card.md")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/classifier-digits")
    p.add_argument("--pipeline", default=None,
                   help="PSLD pipeline dir (e.g. outputs/psld-digits-psld, what `python training/train_psld.py` writes): "
                        "take its scheduler and save a copy with the classifier")
    p.add_argument("--resolution", type=int, default=None,
                   help="image size; default: the --pipeline UNet's sample_size (a different value is refused), else 16")
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    args = p.parse_args(argv)
    for name in ("max_train_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.learning_rate <= 0 or not np.isfinite(args.learning_rate):
        p.error(f"--learning_rate must be a finite number > 0, got {args.learning_rate}")
    if args.resolution is not None and not 4 <= args.resolution <= MAX_RESOLUTION:
        p.error(f"--resolution must be in [4, {MAX_RESOLUTION}] (digits are 8×8 upsampled), got {args.resolution}")
    if args.pipeline is not None:
        size, channels = pipeline_sample_geometry(args.pipeline, p)
        if args.resolution is not None and args.resolution != size:
            p.error(f"--resolution {args.resolution} differs from the pipeline's sample_size {size} ({args.pipeline}/unet): "
                    "guidance feeds the classifier the pipeline's states; omit --resolution")
        if channels != 1:
            p.error(f"--pipeline {args.pipeline!r} models {channels}-channel data; this script trains on the 1-channel digits")
        args.resolution = size
    elif args.resolution is None:
        args.resolution = 16
    return args


MAX_RESOLUTION = 256


def pipeline_sample_geometry(pipeline_dir: str, parser=None):
    """``(sample_size, data_channels)`` of a saved PSLD pipeline, read from ``unet/`` and ``scheduler/`` configs."""
    def fail(msg):
        if parser is not None:
            parser.error(msg)
        raise ValueError(msg)

    unet_cfg = os.path.join(pipeline_dir, "unet", "config.json")
    sched_cfg = os.path.join(pipeline_dir, "scheduler", "scheduler_config.json")
    if not os.path.isfile(unet_cfg) or not os.path.isfile(sched_cfg):
        fail(f"--pipeline {pipeline_dir!r} is not a saved PSLD pipeline (needs unet/config.json and "
             "scheduler/scheduler_config.json)")
    with open(unet_cfg) as f:
        ucfg = json.load(f)
    with open(sched_cfg) as f:
        scfg = json.load(f)
    size = ucfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        if len(size) != 2 or size[0] != size[1]:
            fail(f"--pipeline {pipeline_dir!r}: the UNet's sample_size {size} is not square")
        size = size[0]
    k = 1 if scfg.get("diffusion") == "vp" else 2
    return int(size), int(ucfg["in_channels"]) // k


def load_digits_data(resolution: int):
    """Digits in [-1, 1] as ``[N, 1, R, R]`` float32 and labels ``[N]``: exactly the UNet's training images
    (:func:`diffusers_psld.data.load_digits_dataset`, PIL bicubic)."""
    from diffusers_psld.data import load_digits_dataset

    ds = load_digits_dataset(resolution=resolution)
    return ds.images.float(), ds.labels.long()


def fit_classifier(model, x, y, scheduler, max_train_steps: int, batch_size: int, learning_rate: float,
                   generator: torch.Generator, accelerator=None, log_every: int = 200, log=print):
    """Cross-entropy training of ``model`` on ``(scheduler.add_noise(x0), model_time(t))``, t ~ U(1e-5, 1).

    Args:
        model: a :class:`TimeDependentClassifier` taking ``k * C`` channels.
        x: clean data ``[N, C, H, W]`` in [-1, 1]; y: labels ``[N]``.
        generator: CPU generator for batches, t and noise (reproducible).
        accelerator: optional ``accelerate.Accelerator`` (``prepare`` / ``backward``).

    Returns:
        ``(model in eval mode, final_loss)``.
    """
    device = accelerator.device if accelerator is not None else torch.device("cpu")
    opt = torch.optim.Adam(model.parameters(), lr=learning_rate)
    if accelerator is not None:
        model, opt = accelerator.prepare(model, opt)

    loss_val = float("nan")
    model.train()
    for step in range(max_train_steps):
        idx = torch.randint(len(x), (batch_size,), generator=generator)
        z, tm, _ = _noisy_states(x[idx], scheduler, generator, device)
        loss = F.cross_entropy(model(z, tm), y[idx].to(device))
        if accelerator is not None:
            accelerator.backward(loss)
        else:
            loss.backward()
        opt.step()
        opt.zero_grad()
        loss_val = loss.item()
        if log is not None and (step % log_every == 0 or step == max_train_steps - 1):
            log(f"step {step} loss {loss_val:.4f}")
    if accelerator is not None:
        model = accelerator.unwrap_model(model)
    return model.eval(), loss_val


def main(argv=None):
    args = parse_args(argv)
    from accelerate import Accelerator
    from accelerate.utils import set_seed

    accelerator = Accelerator(mixed_precision=args.mixed_precision)
    set_seed(args.seed)
    if args.pipeline:
        from diffusers_psld.pipelines import PSLDPipeline

        base = PSLDPipeline.from_pretrained(args.pipeline)
        scheduler = base.scheduler
    else:
        base, scheduler = None, PSLDScheduler()
    x, y = load_digits_data(args.resolution)
    g = torch.Generator().manual_seed(args.seed)
    perm = torch.randperm(len(x), generator=g)
    n_val = len(x) // 10
    val, train = perm[:n_val], perm[n_val:]
    k = scheduler.num_components
    groups = 8 if all(c % 8 == 0 for c in args.block_out_channels) else 4
    model = TimeDependentClassifier(in_channels=k * x.shape[1], num_classes=int(y.max()) + 1,
                                    block_out_channels=tuple(args.block_out_channels), norm_num_groups=groups,
                                    sample_size=args.resolution)
    model, loss_val = fit_classifier(model, x[train], y[train], scheduler, args.max_train_steps,
                                            args.train_batch_size, args.learning_rate, g, accelerator,
                                            log=accelerator.print)
    x_val, y_val = x[val], y[val]
    with torch.no_grad():
        # noisy states of the held-out images
        z, tm, t = _noisy_states(x_val, scheduler, g, accelerator.device)
        pred = model(z, tm).argmax(-1).cpu()
        low = t < 0.1
        acc = (pred[low] == y_val[low]).float().mean().item() if low.any() else float("nan")
        acc_all = (pred == y_val).float().mean().item()
    if accelerator.is_main_process:
        out = os.path.join(args.output_dir, "classifier")
        model.save_pretrained(out, safe_serialization=True)
        write_card(out, args, model, scheduler, loss_val, acc)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump({"final_loss": loss_val, "val_acc_t_lt_0.1": acc, "val_acc_all_t": acc_all,
                       "resolution": args.resolution, "resize_filter": "PIL bicubic (diffusers_psld.data)",
                       "pipeline": args.pipeline, "max_train_steps": args.max_train_steps,
                       "train_batch_size": args.train_batch_size, "learning_rate": args.learning_rate,
                       "block_out_channels": list(args.block_out_channels), "seed": args.seed}, f, indent=2)
        if base is not None:
            from diffusers_psld.pipelines import PSLDPipeline

            PSLDPipeline(unet=base.unet, scheduler=base.scheduler, classifier=model).save_pretrained(
                os.path.join(args.output_dir, "pipeline"))
        accelerator.print(f"saved {out}; val acc (t<0.1) {acc:.3f}, all t {acc_all:.3f}")
    return model


def _noisy_states(x, scheduler, generator, device):
    """``(z_t, model_time, t)`` for clean ``x``: t ~ U(1e-5, 1), z_t = ``scheduler.add_noise`` (HSM kernel)."""
    k = scheduler.num_components
    t = torch.rand(len(x), generator=generator, dtype=torch.float64) * (1 - 1e-5) + 1e-5
    noise = torch.randn((len(x), k * x.shape[1], *x.shape[2:]), generator=generator)
    return scheduler.add_noise(x.to(device), noise.to(device), t), scheduler.model_time(t, len(x), device=device), t


def write_card(out, args, model, scheduler, loss, acc):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", license="mit",
                         tags=["diffusers", "psld", "classifier", "classifier-guidance", "time-dependent-classifier"])
    card = ModelCard.from_template(
        data, template_path=CARD, in_channels=model.config.in_channels, dataset="scikit-learn digits",
        num_classes=model.config.num_classes, resolution=args.resolution,
        diffusion=f"{scheduler.config.diffusion} (gamma={scheduler.config.gamma}, nu={scheduler.config.nu})",
        max_train_steps=args.max_train_steps, batch_size=args.train_batch_size, learning_rate=args.learning_rate,
        final_loss=f"{loss:.4f}", eval_accuracy=f"{acc:.3f}", repo_or_path=out)
    card.save(os.path.join(out, "README.md"))


if __name__ == "__main__":
    main()
