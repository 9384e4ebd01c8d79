"""Which ODE do the deterministic samplers of a trained model converge to? (PF-Heun vs gDDIM vs adaptive RK45)

For the same prior draws, runs a saved :class:`PSLDPipeline` with

* ``GDDIMMultistepScheduler`` (data prediction: uses only x̂₀ = aᵀ(z - Lε)/aᵀa; the classic grid to ``sampling_eps``,
  whose limit is the ODE solution) at two NFEs,
* ``PSLDScheduler(sampler="pf_heun")`` with the raw ε and with ``project_eps=True`` at several NFEs,
* the adaptive probability-flow ODE (:func:`diffusers_psld.ode.probability_flow_sample`, dopri5), raw and
  projected (an integrator independent of both),

and reports the RMS distance between the final images (on [0, 1]) of every pair, plus the size of the
network's inconsistent ε component, ``|L⁻¹(z - Lε - a x̂₀)|`` in ε units, along the projected adaptive
trajectory. Two runs that converge to the same ODE agree to the integrators' error; two different ODEs
do not, however many steps are taken.

    OMP_NUM_THREADS=1 python benchmarks/ode_consistency.py --model_dir outputs/quality/models/psld_g0.01 \\
        --batch_size 24 --out benchmarks/results/ode_consistency_psld_g0.01.md
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from diffusers_psld.ode import probability_flow_sample
from diffusers_psld.pipelines import PSLDPipeline
from diffusers_psld.sampling import eps_projection
from diffusers_psld.schedulers import GDDIMMultistepScheduler, PSLDScheduler
from diffusers_psld.sde import blocks


def _to_image(z, k):
    return (blocks.project(z, k).double() / 2 + 0.5).clamp(0, 1)


def run(args):
    torch.set_num_threads(args.num_threads)
    pipe = PSLDPipeline.from_pretrained(args.model_dir)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    base = pipe.scheduler.config
    if base.diffusion != "psld" or base.gamma == 0:
        raise ValueError("needs a PSLD model with gamma > 0 (gDDIM and project_eps use ε_x)")
    sde = pipe.scheduler.sde
    runs, times = {}, {}

    def pipeline_run(name, sched, nfe):
        pipe.scheduler = sched
        t0 = time.perf_counter()
        with torch.no_grad():
            img = pipe(batch_size=args.batch_size, generator=torch.Generator().manual_seed(args.seed),
                       num_inference_steps=nfe, output_type="pt").images
        runs[name], times[name] = img.double(), time.perf_counter() - t0
        print(f"{name}: {times[name]:.0f} s", flush=True)

    for n in args.gddim_nfe:
        pipeline_run(f"gDDIM-3M NFE {n}", GDDIMMultistepScheduler.from_config(base, schedule_preset="classic"), n)
    for proj in (False, True):
        for n in args.heun_nfe:
            sched = PSLDScheduler.from_config(base, sampler="pf_heun", striding="uniform", project_eps=proj)
            pipeline_run(f"PF-Heun{' proj.' if proj else ''} NFE {n}", sched, n)

    # adaptive RK45 from the same prior draw (the pipeline draws the prior first from the generator)
    sched = PSLDScheduler.from_config(base)
    c = pipe.unet.config.in_channels
    z0 = sched.sample_prior((args.batch_size, c, pipe.unet.config.sample_size, pipe.unet.config.sample_size),
                            generator=torch.Generator().manual_seed(args.seed))
    profile = []

    def net(z, t):
        return pipe.unet(z, sched.model_time(t, z.shape[0])).sample

    def net_logged(z, t):
        eps = net(z, t)
        kern = sde.hsm_kernel(float(t))
        Mz, Me = eps_projection(kern.mean_coef, kern.chol)
        e64, z64 = eps.double(), z.double()
        orth = e64 - (blocks.apply(Mz, z64) + blocks.apply(Me, e64))  # ε - ε' (in ε units)
        profile.append((float(t), orth.pow(2).mean().sqrt().item(), e64.pow(2).mean().sqrt().item()))
        return eps

    for proj in (False, True):
        name = f"adaptive RK45{' proj.' if proj else ''} (rtol {args.rtol:g})"
        t0 = time.perf_counter()
        with torch.no_grad():
            out = probability_flow_sample(net_logged if proj else net, sde, z0.clone(), rtol=args.rtol, atol=args.rtol,
                                          project_eps=proj)
        runs[name], times[name] = _to_image(out.samples, sde.k), time.perf_counter() - t0
        times[name + " NFE"] = out.nfe
        print(f"{name}: NFE {out.nfe}, {times[name]:.0f} s", flush=True)

    names = list(runs)
    rms = {a: {b: (runs[a] - runs[b]).pow(2).mean().sqrt().item() for b in names} for a in names}
    return {"model_dir": args.model_dir, "batch_size": args.batch_size, "seed": args.seed, "names": names,
            "rms": rms, "seconds": {k: v for k, v in times.items()}, "profile": sorted(profile),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}",
            "threads": args.num_threads, "command": args.command}


def markdown(r) -> str:
    names = r["names"]
    short = {n: f"({i + 1})" for i, n in enumerate(names)}
    lines = [f"# Which ODE do the deterministic samplers converge to? `{os.path.basename(r['model_dir'].rstrip('/'))}`",
             "", f"{r['batch_size']} samples, prior seed {r['seed']}, images on [0, 1]; {r['machine']}, "
             f"{r['threads']} thread(s). Command: `{r['command']}`", "",
             "RMS distance between the final images of every pair of runs (same prior draw):", "",
             "| run | " + " | ".join(short[n] for n in names) + " |", "|---" * (len(names) + 1) + "|"]
    for a in names:
        lines.append(f"| {short[a]} {a} | " + " | ".join(f"{r['rms'][a][b]:.4f}" for b in names) + " |")
    lines += ["", "Inconsistent part of the network's ε along the projected adaptive trajectory, "
              "RMS of ε - ε' (ε units; ε' = L⁻¹(z - a x̂₀)) and of ε:", "", "| t | RMS(ε - ε') | RMS(ε) |", "|---|---|---|"]
    prof = r["profile"]
    step = max(1, len(prof) // 16)
    for t, o, e in prof[::step]:
        lines.append(f"| {t:.4f} | {o:.4f} | {e:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model_dir", required=True)
    p.add_argument("--batch_size", type=int, default=24)
    p.add_argument("--seed", type=int, default=123)
    p.add_argument("--gddim_nfe", type=int, nargs="+", default=[250, 1000])
    p.add_argument("--heun_nfe", type=int, nargs="+", default=[250, 1000, 4000])
    p.add_argument("--rtol", type=float, default=1e-4, help="rtol = atol of the adaptive solver")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--out", default=None, help="Markdown report (a .json with the same stem is written too)")
    args = p.parse_args(argv)
    if args.batch_size < 1:
        p.error("--batch_size must be >= 1")
    args.command = "python benchmarks/ode_consistency.py " + " ".join(argv if argv is not None else __import__("sys").argv[1:])
    r = run(args)
    md = markdown(r)
    print(md)
    if args.out:
        with open(args.out, "w") as f:
            f.write(md)
        with open(os.path.splitext(args.out)[0] + ".json", "w") as f:
            json.dump(r, f, indent=1)
    return r


if __name__ == "__main__":
    main()
