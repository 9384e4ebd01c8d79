#!/usr/bin/env python
r"""NCSN++ (the paper's networks) vs the DDPM-style ``UNet2DModel`` presets: forward time, peak memory, and — on
a GPU — training-step and sampling throughput.

Pairs (paper per-GPU batch): ``ncsnpp-cifar10`` / ``cifar10`` (16), ``ncsnpp-celeba64`` / ``celeba64`` (16),
``ncsnpp-afhqv2-128`` / ``afhqv2-128`` (8); C = 3, k = 2 (6 channels). Every measurement runs in a fresh
subprocess so that the peak memory is its own (CPU: peak RSS growth over the process after imports; CUDA:
``torch.cuda.max_memory_allocated``). Results are appended to ``benchmarks/results/ncsnpp_forward.md`` and
``.json`` (one row per measurement, with the command, load average and time).

    # CPU (this project's machine; one thread):
    OMP_NUM_THREADS=1 python benchmarks/ncsnpp_forward.py --threads 1
    # a smaller batch when the paper's is too slow here:
    OMP_NUM_THREADS=1 python benchmarks/ncsnpp_forward.py --threads 1 --batch 4 --pairs cifar10
    # GPU (issue #16 §3): training-step img/s, fp32 vs bf16 (+ channels_last, + torch.compile), and sampling
    python benchmarks/ncsnpp_forward.py --device cuda --mode train --pairs cifar10 --dtype fp32 bf16 \
        --channels_last --compile
    python benchmarks/ncsnpp_forward.py --device cuda --mode sample --pairs cifar10 --nfe 20 100 --batch 256
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "benchmarks" / "results"
PAIRS = {"cifar10": ("ncsnpp-cifar10", "cifar10", 16), "celeba64": ("ncsnpp-celeba64", "celeba64", 16),
         "afhqv2-128": ("ncsnpp-afhqv2-128", "afhqv2-128", 8)}


def _rss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(spec: dict) -> dict:
    """One measurement in this (fresh) process."""
    sys.path.insert(0, str(REPO))
    import torch

    torch.set_num_threads(spec["threads"])
    from diffusers_psld.models import PRESETS, build_unet

    dev = torch.device(spec["device"])
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    base_rss = _rss_mib()
    model = build_unet(spec["preset"], 3, 2).to(dev)
    n_params = sum(p.numel() for p in model.parameters())
    res, b = PRESETS[spec["preset"]]["sample_size"], spec["batch"]
    time_scale = PRESETS[spec["preset"]].get("time_scale", 1000.0)
    mem_fmt = torch.channels_last if spec["channels_last"] else torch.contiguous_format
    model = model.to(memory_format=mem_fmt)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(b, 6, res, res, generator=gen).to(dev).to(memory_format=mem_fmt)
    t = (torch.rand(b, generator=gen) * 0.999 + 1e-3).to(dev) * time_scale
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize()

    if spec["mode"] == "forward":
        model.eval()
        fn = torch.compile(model) if spec["compile"] else model

        def step():
            with torch.no_grad(), torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                fn(x, t).sample
            sync()
        unit = b
    elif spec["mode"] == "train":
        model.train()
        fn = torch.compile(model) if spec["compile"] else model
        opt = torch.optim.Adam(model.parameters(), lr=1e-4)
        target = torch.randn_like(x)

        def step():
            with torch.autocast(dev.type, dtype=dtype, enabled=dtype != torch.float32):
                loss = torch.nn.functional.mse_loss(fn(x, t).sample.float(), target)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            sync()
        unit = b
    else:  # sample: PSLDPipeline, gDDIM at the given NFE
        from diffusers_psld import GDDIMMultistepScheduler, PSLDPipeline

        model.eval().to(dtype)
        sched = GDDIMMultistepScheduler(time_scale=time_scale)
        pipe = PSLDPipeline(unet=model, scheduler=sched).to(dev)
        pipe.set_progress_bar_config(disable=True)

        def step():
            pipe(batch_size=b, num_inference_steps=spec["nfe"], output_type="pt")
            sync()
        unit = b
    times = []
    for i in range(spec["warmup"] + spec["repeats"]):
        t0 = time.perf_counter()
        step()
        if i >= spec["warmup"]:
            times.append(time.perf_counter() - t0)
    peak = (torch.cuda.max_memory_allocated() / 2 ** 20 if dev.type == "cuda" else _rss_mib() - base_rss)
    med = statistics.median(times)
    return dict(spec, parameters=n_params, seconds=med, seconds_all=times, img_per_s=unit / med, peak_mib=peak)


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return f"{cpu}, {os.cpu_count()} logical CPUs, {gpu}, torch {torch.__version__}, Python {platform.python_version()}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pairs", nargs="+", choices=sorted(PAIRS), default=sorted(PAIRS))
    p.add_argument("--mode", choices=["forward", "train", "sample"], default="forward")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16"], default=["fp32"])
    p.add_argument("--channels_last", action="store_true", help="also measure with channels_last")
    p.add_argument("--compile", action="store_true", help="also measure with torch.compile")
    p.add_argument("--batch", type=int, default=None, help="instead of the paper's per-GPU batch (say so)")
    p.add_argument("--nfe", type=int, nargs="+", default=[20, 100], help="sampling NFE (--mode sample)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--only", choices=["ncsnpp", "ddpm", "both"], default="both")
    p.add_argument("--out", default=str(RESULTS / "ncsnpp_forward"))
    p.add_argument("--_worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        print("RESULT " + json.dumps(worker(json.loads(args._worker))))
        return None
    for v in (args.batch, args.threads, args.repeats):
        if v is not None and v < 1:
            p.error("--batch/--threads/--repeats must be >= 1")
    cmd = "python benchmarks/ncsnpp_forward.py " + " ".join(argv if argv is not None else sys.argv[1:])
    load = tuple(round(x, 2) for x in os.getloadavg())
    rows = []
    variants = [(d, cl, co) for d in args.dtype for cl in ([False, True] if args.channels_last else [False])
                for co in ([False, True] if args.compile else [False])]
    for pair in args.pairs:
        ncsn, ddpm, paper_batch = PAIRS[pair]
        presets = {"ncsnpp": [ncsn], "ddpm": [ddpm], "both": [ncsn, ddpm]}[args.only]
        for preset in presets:
            for dtype, cl, co in variants:
                for nfe in (args.nfe if args.mode == "sample" else [None]):
                    spec = dict(preset=preset, batch=args.batch or paper_batch, paper_batch=paper_batch,
                                mode=args.mode, device=args.device, dtype=dtype, channels_last=cl, compile=co,
                                nfe=nfe, threads=args.threads, warmup=args.warmup, repeats=args.repeats)
                    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
                    proc = subprocess.run([sys.executable, __file__, "--_worker", json.dumps(spec)], env=env,
                                          capture_output=True, text=True)
                    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
                    if proc.returncode or line is None:
                        raise SystemExit(f"measurement {spec} failed:\n{proc.stderr[-3000:]}")
                    r = json.loads(line[7:])
                    rows.append(r)
                    print(f"{preset:18s} B={r['batch']:3d} {args.mode} {dtype} cl={cl} compile={co} nfe={nfe}: "
                          f"{r['seconds']:.2f} s  {r['img_per_s']:.2f} img/s  peak {r['peak_mib']:.0f} MiB  "
                          f"({r['parameters']:,} params)", flush=True)
    meta = dict(command=cmd, machine=machine(), load_before=load, threads=args.threads,
                utc=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()))
    write(args.out, rows, meta)
    return rows


def write(out: str, rows: list, meta: dict) -> None:
    jpath, mpath = Path(out + ".json"), Path(out + ".md")
    runs = json.loads(jpath.read_text()) if jpath.exists() else []
    runs.append(dict(meta, rows=rows))
    jpath.write_text(json.dumps(runs, indent=1))
    lines = ["# NCSN++ vs DDPM-style UNet presets: forward time, peak memory, throughput", "",
             "Written by `benchmarks/ncsnpp_forward.py` (one subprocess per row). CPU peak memory = growth of the "
             "process's peak RSS from after the imports to after the timed calls (model, activations, allocator "
             "slack); CUDA: `torch.cuda.max_memory_allocated`. Times: median of the timed calls after warm-up.", ""]
    for run in runs:
        lines += [f"## {run['utc']} — `{run['command']}`", "",
                  f"{run['machine']}; {run['threads']} thread(s); load average before the run {tuple(run['load_before'])}.",
                  "", "| preset | params | mode | batch (paper) | dtype | ch.-last | compile | NFE | s / call | img/s | "
                      "peak MiB |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in run["rows"]:
            lines.append(f"| `{r['preset']}` | {r['parameters']:,} | {r['mode']} | {r['batch']} ({r['paper_batch']}) | "
                         f"{r['dtype']} | {r['channels_last']} | {r['compile']} | {r['nfe'] or '–'} | "
                         f"{r['seconds']:.2f} | {r['img_per_s']:.2f} | {r['peak_mib']:.0f} |")
        lines.append("")
    mpath.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
