"""Train a time-dependent classifier p(y | z_t) for PSLD class guidance (Accelerate).

Offline default: scikit-learn's 8×8 digits (``sklearn.datasets.load_digits``), resized with PIL.
z_t comes from ``scheduler.add_noise`` (the HSM kernel), t ~ U(1e-5, 1); the classifier sees
``scheduler.model_time(t)``. Writes ``<output_dir>/classifier`` (safetensors + config), a model card
``<output_dir>/classifier/README.md`` and, with ``--pipeline``, a copy of that pipeline with the
classifier attached (``<output_dir>/pipeline``).

    python training/train_classifier.py --output_dir outputs/clf-digits --max_train_steps 2000
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
    p.add_argument("--pipeline", default=None, help="PSLD pipeline dir: take its scheduler and save a copy with the classifier")
    p.add_argument("--resolution", type=int, default=8)
    p.add_argument("--max_train_steps", type=int, default=2000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=2e-4)
    p.add_argument("--block_out_channels", type=int, nargs="+", default=[32, 64])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    args = p.parse_args(argv)
    for name in ("resolution", "max_train_steps", "train_batch_size"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1")
    if args.learning_rate <= 0:
        p.error("--learning_rate must be > 0")
    return args


def load_digits_data(resolution: int):
    """Digits in [-1, 1] as ``[N, 1, R, R]`` float32 and labels ``[N]``."""
    import PIL.Image
    from sklearn.datasets import load_digits

    d = load_digits()
    imgs = (d.images / 16.0 * 255).astype(np.uint8)
    if resolution != 8:
        imgs = np.stack([np.asarray(PIL.Image.fromarray(im).resize((resolution, resolution), PIL.Image.BILINEAR)) for im in imgs])
    x = torch.from_numpy(imgs.astype(np.float32) / 127.5 - 1.0)[:, None]
    return x, torch.from_numpy(d.target).long()


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
                                    block_out_channels=tuple(args.block_out_channels), norm_num_groups=groups)
    opt = torch.optim.Adam(model.parameters(), lr=args.learning_rate)
    model, opt = accelerator.prepare(model, opt)

    def noisy(idx):
        x0 = x[idx].to(accelerator.device)
        t = torch.rand(len(idx), generator=g, dtype=torch.float64) * (1 - 1e-5) + 1e-5
        noise = torch.randn((len(idx), k * x0.shape[1], *x0.shape[2:]), generator=g).to(accelerator.device)
        return scheduler.add_noise(x0, noise, t), scheduler.model_time(t, len(idx), device=accelerator.device), t

    loss_val = float("nan")
    for step in range(args.max_train_steps):
        idx = train[torch.randint(len(train), (args.train_batch_size,), generator=g)]
        z, tm, _ = noisy(idx)
        loss = F.cross_entropy(model(z, tm), y[idx].to(accelerator.device))
        accelerator.backward(loss)
        opt.step()
        opt.zero_grad()
        loss_val = loss.item()
        if step % 200 == 0 or step == args.max_train_steps - 1:
            accelerator.print(f"step {step} loss {loss_val:.4f}")

    model = accelerator.unwrap_model(model).eval()
    with torch.no_grad():
        z, tm, t = noisy(val)
        pred = model(z, tm).argmax(-1).cpu()
        low = t < 0.1
        acc = (pred[low] == y[val][low]).float().mean().item() if low.any() else float("nan")
        acc_all = (pred == y[val]).float().mean().item()
    if accelerator.is_main_process:
        out = os.path.join(args.output_dir, "classifier")
        model.save_pretrained(out, safe_serialization=True)
        write_card(out, args, model, scheduler, loss_val, acc)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump({"final_loss": loss_val, "val_acc_t_lt_0.1": acc, "val_acc_all_t": acc_all}, f, indent=2)
        if base is not None:
            from diffusers_psld.pipelines import PSLDPipeline

            PSLDPipeline(unet=base.unet, scheduler=base.scheduler, classifier=model).save_pretrained(
                os.path.join(args.output_dir, "pipeline"))
        accelerator.print(f"saved {out}; val acc (t<0.1) {acc:.3f}, all t {acc_all:.3f}")
    return model


def write_card(out, args, model, scheduler, loss, acc):
    from huggingface_hub import ModelCard, ModelCardData

    data = ModelCardData(library_name="diffusers", license="apache-2.0",
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
