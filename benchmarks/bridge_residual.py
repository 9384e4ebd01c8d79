r"""Which residual a trained package network needs behind the denoiser bridge (``RecipeDenoiser(residual=...)``).

For digits x₀ (the training data) and noise levels σ, the denoiser's x̂₀ = D(x₀ + σ n; σ) is computed three ways with
the same trained network and the same y:

* ``own``: the network on a true forward-kernel state z_t at the t with σ_t = σ (its sufficient statistic is y), the
  package's x̂₀ = aᵀ(z - Lε)/aᵀa — what the network does inside its own samplers;
* ``sample``: ``RecipeDenoiser(residual="sample")`` — the residual of z given y drawn from its exact law (so the
  network's input has the law of ``own``'s);
* ``zero``: ``RecipeDenoiser(residual="zero")`` — z = a_t y.

Reported per σ: the mean squared error of x̂₀ against x₀ (per pixel), and the RMS change of x̂₀ between two residual
draws (how much the network's answer depends on the part of z that carries no information about x₀; 0 for an exact
network).

Usage::

    python benchmarks/bridge_residual.py --model_dir outputs/psld-digits-psld [--num_images 512]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusers_psld import PSLDPipeline  # noqa: E402
from diffusers_psld.denoisers import RecipeDenoiser  # noqa: E402
from diffusers_psld.denoisers.bridge import sufficient_statistic  # noqa: E402
from diffusers_psld.evaluation.features import load_digits_images  # noqa: E402
from diffusers_psld.sde import blocks  # noqa: E402

SIGMAS = (0.02, 0.1, 0.3, 1.0, 3.0, 10.0, 50.0)


@torch.no_grad()
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model_dir", required=True)
    p.add_argument("--num_images", type=int, default=512)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    pipe = PSLDPipeline.from_pretrained(args.model_dir)
    unet, sched = pipe.unet.eval(), pipe.scheduler
    size = unet.config.sample_size
    imgs, _ = load_digits_images(size, channels=pipe.data_channels)
    x0 = (imgs[: args.num_images].float() / 127.5 - 1.0)
    g = torch.Generator().manual_seed(args.seed)
    dens = {r: RecipeDenoiser(unet, sched, residual=r, residual_seed=args.seed) for r in ("sample", "zero")}
    print(f"model {args.model_dir}: {sched.config.diffusion} Γ={sched.config.gamma} prediction_type="
          f"{sched.config.prediction_type}, {len(x0)} digits at {size} px")
    print("| σ | t(σ) | MSE own | MSE sample | MSE zero | RMS Δx̂₀ between residual draws |")
    print("|---|---|---|---|---|---|")
    for sigma in SIGMAS:
        t = float(dens["sample"].sigma_to_time(torch.tensor([sigma], dtype=torch.float64)))
        kern = sched.sde.hsm_kernel(t)
        sums = {"own": 0.0, "sample": 0.0, "zero": 0.0, "draw": 0.0}
        for i in range(0, len(x0), args.batch_size):
            xb = x0[i: i + args.batch_size]
            B = xb.shape[0]
            noise = torch.randn((B, sched.num_components * xb.shape[1], *xb.shape[2:]), generator=g)
            z = sched.add_noise(xb, noise, t)
            y, _ = sufficient_statistic(sched, z, t)  # the true state's y = x₀ + σ n: the same y for all three
            out = unet(sched.scale_model_input(z, t), sched.model_time(t, B)).sample
            eps = sched.model_output_to_eps(out, z, t)
            v = z - blocks.apply(kern.chol, eps)
            a = kern.mean_coef
            own = torch.einsum("j,bjn->bn", (a / (a @ a)).float(), v.reshape(B, len(a), -1)).reshape(xb.shape)
            s1 = dens["sample"](y, sigma)
            s2 = dens["sample"](y, sigma)
            zr = dens["zero"](y, sigma)
            sums["own"] += float(((own - xb) ** 2).sum())
            sums["sample"] += float(((s1 - xb) ** 2).sum())
            sums["zero"] += float(((zr - xb) ** 2).sum())
            sums["draw"] += float(((s1 - s2) ** 2).sum())
        n = x0.numel()
        print(f"| {sigma:g} | {t:.4g} | {sums['own'] / n:.4g} | {sums['sample'] / n:.4g} | {sums['zero'] / n:.4g} | "
              f"{(sums['draw'] / n) ** 0.5:.3g} |")


if __name__ == "__main__":
    main()
