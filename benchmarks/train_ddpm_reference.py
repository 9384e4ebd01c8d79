#!/usr/bin/env python
"""Train a discrete-time DDPM reference network the way diffusers' ``train_unconditional.py`` trains one.

The same-network sampler study compares every sampler on networks trained with this package *and* on a network
trained with diffusers' own recipe: ``DDPMScheduler`` (1000 discrete steps, linear β 1e-4 → 0.02), integer
timesteps drawn uniformly, ``scheduler.add_noise`` and the ε-MSE. Everything else is the package's offline digits
budget, so the comparison is about the training objective only: the ``digits`` ``UNet2DModel`` preset (C = 1,
k = 1), scikit-learn's digits at 16 px, batch 64, Adam lr 1e-3 with 100 warm-up steps, grad-norm clip 1, EMA
0.9999 with diffusers' EMA warm-up, seed 0. The result is a ``DDPMPipeline`` directory (EMA weights) that
``DDPMPipeline.from_pretrained`` and ``PSLDPipeline.from_vp_pretrained`` load.

Example::

    OMP_NUM_THREADS=1 python benchmarks/train_ddpm_reference.py --output_dir outputs/study/models/ddpm --max_train_steps 3000
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.abspath(os.path.join(HERE, "..")))

from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402
from diffusers.optimization import get_scheduler  # noqa: E402
from diffusers.training_utils import EMAModel  # noqa: E402

from diffusers_psld.data import load_digits_dataset  # noqa: E402
from diffusers_psld.models.unet_presets import build_unet  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output_dir", required=True)
    p.add_argument("--max_train_steps", type=int, default=3000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--learning_rate", type=float, default=1e-3)
    p.add_argument("--lr_warmup_steps", type=int, default=100)
    p.add_argument("--ema_decay", type=float, default=0.9999)
    p.add_argument("--model_preset", default="digits")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    args = p.parse_args(argv)
    if args.max_train_steps < 1 or args.train_batch_size < 1:
        p.error("--max_train_steps and --train_batch_size must be >= 1")
    return args


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    torch.manual_seed(args.seed)
    ds = load_digits_dataset(resolution=args.resolution, seed=args.seed)
    images = ds.images  # [N, 1, R, R] in [-1, 1]
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02,
                              prediction_type="epsilon")
    unet = build_unet(args.model_preset, data_channels=images.shape[1], num_components=1, sample_size=args.resolution)
    ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=True, inv_gamma=1.0, power=2 / 3,
                   model_cls=type(unet), model_config=unet.config)
    opt = torch.optim.Adam(unet.parameters(), lr=args.learning_rate)
    lr_sched = get_scheduler("constant_with_warmup", opt, num_warmup_steps=args.lr_warmup_steps)
    g = torch.Generator().manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    order, pos = rng.permutation(len(images)), 0
    losses, t0 = [], time.perf_counter()
    for step in range(args.max_train_steps):
        if pos + args.train_batch_size > len(order):  # new epoch, as a shuffled loader with drop_last
            order, pos = rng.permutation(len(images)), 0
        x0 = images[order[pos:pos + args.train_batch_size]]
        pos += args.train_batch_size
        noise = torch.randn(x0.shape, generator=g)
        ts = torch.randint(0, scheduler.config.num_train_timesteps, (x0.shape[0],), generator=g)
        noisy = scheduler.add_noise(x0, noise, ts)
        loss = torch.nn.functional.mse_loss(unet(noisy, ts).sample, noise)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite loss at step {step + 1}")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        lr_sched.step()
        ema.step(unet.parameters())
        losses.append(float(loss))
        if (step + 1) % 100 == 0 or step + 1 == args.max_train_steps:
            print(f"step {step + 1}/{args.max_train_steps} loss(100-mean) {np.mean(losses[-100:]):.4f} "
                  f"{time.perf_counter() - t0:.0f}s", flush=True)
    ema.copy_to(unet.parameters())
    os.makedirs(args.output_dir, exist_ok=True)
    DDPMPipeline(unet=unet, scheduler=scheduler).save_pretrained(args.output_dir)
    with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
        json.dump({**vars(args), "objective": "diffusers DDPMScheduler ε-MSE, discrete t ~ U{0..999}",
                   "final_loss_mean_100": float(np.mean(losses[-100:])),
                   "train_seconds": time.perf_counter() - t0}, f, indent=1)
    print(f"saved {args.output_dir}")


if __name__ == "__main__":
    main()
