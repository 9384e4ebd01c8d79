"""Time of one scheduler step vs one UNet2DModel forward at CIFAR-10 size, on the current device.

UNet: the DDPM CIFAR-10 configuration with 6 channels (~35.7M parameters), batch 16, 32×32.
Goal: a step costs < 1 % of a forward pass.

Rerun:  python benchmarks/scheduler_overhead.py [--batch 16] [--device cpu] [--out benchmarks/results/scheduler_overhead.md]
"""
import argparse
import os
import platform
import statistics
import time

import torch
from diffusers import UNet2DModel

from diffusers_psld import PSLDScheduler, SSCSScheduler


def ddpm_cifar10_unet(channels: int) -> UNet2DModel:
    return UNet2DModel(
        sample_size=32, in_channels=channels, out_channels=channels, block_out_channels=(128, 256, 256, 256),
        layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"), attention_head_dim=None,
        downsample_padding=0, flip_sin_to_cos=False, freq_shift=1, norm_eps=1e-6, dropout=0.1)


def timed(fn, reps, warmup=2, sync=lambda: None):
    for _ in range(warmup):
        fn()
    sync()
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--unet_reps", type=int, default=5)
    p.add_argument("--step_reps", type=int, default=200)
    p.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results", "scheduler_overhead.md"))
    args = p.parse_args()
    dev = torch.device(args.device)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    unet = ddpm_cifar10_unet(6).to(dev).eval()
    n_params = sum(p.numel() for p in unet.parameters())
    z = torch.randn(args.batch, 6, 32, 32, device=dev)
    sched = PSLDScheduler()
    t_model = sched.model_time(0.5, args.batch, device=dev)
    with torch.no_grad():
        t_unet = timed(lambda: unet(z, t_model), args.unet_reps, sync=sync)
    rows = []
    for name, s in [("PSLD EM", PSLDScheduler(sampler="em")), ("PF-ODE Euler", PSLDScheduler(sampler="pf_euler")),
                    ("PF-ODE Heun", PSLDScheduler(sampler="pf_heun")), ("SSCS", SSCSScheduler())]:
        s.set_timesteps(1000, device=dev)
        eps = torch.randn_like(z)
        gen = torch.Generator(device=dev).manual_seed(0)
        t0 = s.timesteps[0]

        def one_step():
            s._step_index = 0
            s.step(eps, t0, z, generator=gen)

        t_step = timed(one_step, args.step_reps, warmup=5, sync=sync)
        t_set = timed(lambda: s.set_timesteps(1000, device=dev), 3, warmup=1)
        rows.append((name, t_step, 100 * t_step / t_unet, t_set))
    threads = torch.get_num_threads()
    lines = [
        "# Scheduler step overhead",
        "",
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
        f"{threads} threads, device `{dev}`{' (' + torch.cuda.get_device_name() + ')' if dev.type == 'cuda' else ''}.",
        f"UNet2DModel DDPM-CIFAR10 config, 6 channels, {n_params / 1e6:.2f}M parameters, batch {args.batch}, 32×32: "
        f"forward (no grad, median of {args.unet_reps}) = **{t_unet * 1e3:.1f} ms**.",
        "",
        f"| sampler | one `step` (median of {args.step_reps}) | share of a UNet forward | `set_timesteps(1000)` |",
        "|---|---|---|---|",
    ]
    lines += [f"| {n} | {ts * 1e3:.3f} ms | {pct:.3f} % | {tset * 1e3:.0f} ms |" for n, ts, pct, tset in rows]
    lines += ["", f"Command: `python benchmarks/scheduler_overhead.py --batch {args.batch} --device {args.device}`"]
    text = "\n".join(lines) + "\n"
    print(text)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
