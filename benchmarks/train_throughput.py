#!/usr/bin/env python
r"""Training throughput: one PSLD HSM step vs a plain diffusers DDPM ε-prediction step, same UNet preset.

PSLD's UNet has ``k*C`` = 2C channels in and out (DDPM: C); everything else (preset, batch, Adam,
grad clipping) is identical. Reports images/s (median over timed steps, after warm-up) and the ratio
PSLD / DDPM (goal >= 0.95). Writes/updates ``benchmarks/results/train_throughput.md``.

    python benchmarks/train_throughput.py --preset digits --channels 1 --resolution 16 --batch 64 --steps 10
    python benchmarks/train_throughput.py --preset cifar10 --channels 3 --batch 16 --steps 3
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402


def machine_info() -> str:
    load = os.getloadavg() if hasattr(os, "getloadavg") else ("n/a",)
    cpu = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} ({torch.get_num_threads()} threads), "
            f"Python {platform.python_version()}, load average before run {tuple(round(x, 2) for x in load)}")


def time_steps(step_fn, warmup: int, steps: int):
    for _ in range(warmup):
        step_fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step_fn()
        times.append(time.perf_counter() - t0)
    return times


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--preset", default="digits")
    p.add_argument("--channels", type=int, default=1)
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="alternate DDPM/PSLD rounds (reduces drift from shared load)")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "train_throughput.md"))
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers import DDPMScheduler

    from diffusers_psld import PSLDScheduler
    from diffusers_psld.losses import hsm_loss
    from diffusers_psld.models import PRESETS, build_unet

    res = args.resolution or PRESETS[args.preset]["sample_size"]
    c, b = args.channels, args.batch
    x0 = torch.rand(b, c, res, res) * 2 - 1

    def make(k):
        torch.manual_seed(0)
        unet = build_unet(args.preset, c, k, res)
        unet.train()
        opt = torch.optim.Adam(unet.parameters(), lr=1e-4)
        return unet, opt

    psld = PSLDScheduler()
    ddpm = DDPMScheduler(num_train_timesteps=1000)
    u_p, o_p = make(2)
    u_d, o_d = make(1)
    g = torch.Generator().manual_seed(0)

    def psld_step():
        loss = hsm_loss(u_p, psld, x0, generator=g)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(u_p.parameters(), 1.0)
        o_p.step()
        o_p.zero_grad(set_to_none=True)

    def ddpm_step():  # diffusers' train_unconditional.py ε-prediction step
        noise = torch.randn(x0.shape, generator=g)
        t = torch.randint(0, 1000, (b,), generator=g)
        z = ddpm.add_noise(x0, noise, t)
        loss = F.mse_loss(u_d(z, t).sample, noise)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(u_d.parameters(), 1.0)
        o_d.step()
        o_d.zero_grad(set_to_none=True)

    info = machine_info()
    cmd = "python " + " ".join([os.path.relpath(__file__, REPO)] + (argv if argv is not None else sys.argv[1:]))
    print(info)
    print(cmd)
    td, tp = [], []
    for r in range(args.rounds):
        td += time_steps(ddpm_step, args.warmup if r == 0 else 1, args.steps)
        tp += time_steps(psld_step, args.warmup if r == 0 else 1, args.steps)
    md, mp = statistics.median(td), statistics.median(tp)
    ips_d, ips_p = b / md, b / mp
    n_p = sum(q.numel() for q in u_p.parameters())
    n_d = sum(q.numel() for q in u_d.parameters())
    row = (f"| `{args.preset}` | {res} | {c} → {2 * c} | {b} | {n_d:,} / {n_p:,} | {ips_d:.1f} | {ips_p:.1f} | "
           f"**{ips_p / ips_d:.3f}** | {len(td)} + {len(tp)} |")
    print(f"DDPM: {ips_d:.2f} img/s (median step {md * 1e3:.1f} ms); PSLD: {ips_p:.2f} img/s "
          f"(median step {mp * 1e3:.1f} ms); ratio PSLD/DDPM = {ips_p / ips_d:.3f}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    header = ("# Training throughput: PSLD (HSM, 2C channels) vs DDPM ε-prediction (C channels)\n\n"
              "One optimizer step (forward, loss, backward, grad-clip 1.0, Adam) per timing; median over the timed steps "
              "after warm-up, DDPM and PSLD rounds alternated. Goal: ratio >= 0.95.\n\n"
              "Caveat: rows measured on a 2-core machine shared with other jobs (load average in the run notes) vary by "
              "several × between runs; a ratio above 1 there means 'not measurably slower', not a speed-up. "
              "Re-run on an idle machine for publishable numbers.\n\n"
              "| preset | px | channels | batch | params DDPM / PSLD | DDPM img/s | PSLD img/s | PSLD/DDPM | timed steps |\n"
              "|---|---|---|---|---|---|---|---|---|\n")
    existing = out.read_text() if out.exists() else ""
    rows = [ln for ln in existing.splitlines() if ln.startswith("| `")]
    notes = [ln for ln in existing.split("\n## Runs\n", 1)[1].splitlines() if ln.strip()] if "\n## Runs\n" in existing else []
    rows.append(row)
    notes.append(f"- `{cmd}` — {info}; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
    out.write_text(header + "\n".join(rows) + "\n\n## Runs\n\n" + "\n".join(notes) + "\n")
    return ips_p / ips_d


if __name__ == "__main__":
    main()
