"""Sampling throughput (img/s) of PSLDPipeline vs diffusers' DDPMPipeline, same UNet preset and NFE.

Both pipelines get a freshly initialised UNet2DModel from the same preset (``diffusers_psld.models.
unet_presets``): PSLD with ``in/out = 2C`` channels (k = 2), DDPM with ``C``. Timings alternate between
the two pipelines (PSLD, DDPM, PSLD, ...) so that load from other processes hits both alike; the
reported figure is the median (and best) of ``--repeats`` timed runs after one warm-up run.
Goal: PSLD ≥ 0.95 × DDPM img/s.

Rerun (CPU, ~2-4 min on 2 cores):

    python benchmarks/sampling_throughput.py --configs digits:16:20,cifar10:4:4 \
        --repeats 3 --out benchmarks/results/sampling_throughput.md

``--configs`` is a comma list of ``preset:batch:nfe``. ``--device cuda --dtype bf16`` times the GPU in
bfloat16 weights. PSLD keeps its state and scheduler math in float32 / float64 and casts only the UNet input;
diffusers' DDPMPipeline keeps its whole state in the UNet's dtype, so in bf16 it does slightly less work. Issue #6
§3's GPU figures (``cifar10`` preset, NFE 50 and 100, fp32 and bf16), when a GPU is available:

    for dt in fp32 bf16; do python benchmarks/sampling_throughput.py --device cuda --dtype $dt \
        --configs cifar10:64:50,cifar10:64:100 --repeats 5 --out benchmarks/results/sampling_throughput_gpu_$dt.md; done
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from diffusers import DDPMPipeline, DDPMScheduler  # noqa: E402

from diffusers_psld.models.unet_presets import build_unet, count_parameters  # noqa: E402
from diffusers_psld.pipelines import PSLDPipeline  # noqa: E402
from diffusers_psld.schedulers import PSLDScheduler  # noqa: E402

DATA_CHANNELS = {"tiny": 1, "digits": 1}  # others: RGB
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_configs(spec: str):
    out = []
    for item in spec.split(","):
        try:
            preset, batch, nfe = item.split(":")
            out.append((preset, int(batch), int(nfe)))
        except ValueError as err:
            raise ValueError(f"`--configs` entries must be preset:batch:nfe, got {item!r}") from err
    return out


def _sync(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _run(pipe, batch, nfe, seed, device):
    g = torch.Generator().manual_seed(seed)  # CPU generator: same noise on every device
    _sync(device)
    t0 = time.perf_counter()
    # output_type="pt" then a float32 copy on the CPU, identical for both pipelines: DDPMPipeline's "np" output
    # calls .numpy() on its own dtype, which fails for bfloat16 (NumPy has no bfloat16).
    images = pipe(batch_size=batch, generator=g, num_inference_steps=nfe, output_type="pt").images
    images = torch.as_tensor(images).float().cpu()  # DDPMPipeline before diffusers 0.41 returns NumPy for "pt"
    elapsed = time.perf_counter() - t0
    if not torch.isfinite(images).all():
        raise RuntimeError(f"{type(pipe).__name__} produced non-finite images (batch {batch}, NFE {nfe}); "
                           "the timing would be meaningless")
    return elapsed


def bench(preset: str, batch: int, nfe: int, repeats: int, device="cpu", dtype=torch.float32):
    device = torch.device(device)
    c = DATA_CHANNELS.get(preset, 3)
    torch.manual_seed(0)
    psld = PSLDPipeline(unet=build_unet(preset, c, 2).eval(), scheduler=PSLDScheduler())
    torch.manual_seed(0)
    ddpm = DDPMPipeline(unet=build_unet(preset, c, 1).eval(), scheduler=DDPMScheduler())
    for p in (psld, ddpm):
        p.unet.to(device=device, dtype=dtype)
        p.set_progress_bar_config(disable=True)
    times = {"psld": [], "ddpm": []}
    with torch.no_grad():
        _run(psld, batch, nfe, 0, device)
        _run(ddpm, batch, nfe, 0, device)
        for r in range(repeats):
            order = (("psld", psld), ("ddpm", ddpm)) if r % 2 == 0 else (("ddpm", ddpm), ("psld", psld))
            for name, p in order:
                times[name].append(_run(p, batch, nfe, r + 1, device))
    row = {"preset": preset, "device": str(device), "dtype": str(dtype).replace("torch.", ""), "data_channels": c, "resolution": psld.unet.config.sample_size, "batch": batch, "nfe": nfe,
           "params_psld": count_parameters(psld.unet), "params_ddpm": count_parameters(ddpm.unet)}
    for name in ("psld", "ddpm"):
        med, best = statistics.median(times[name]), min(times[name])
        row[f"{name}_img_s"] = batch / med
        row[f"{name}_img_s_best"] = batch / best
        row[f"{name}_times"] = times[name]
    row["ratio"] = row["psld_img_s"] / row["ddpm_img_s"]
    row["ratio_best"] = row["psld_img_s_best"] / row["ddpm_img_s_best"]
    return row


def load_average():
    try:
        return os.getloadavg()
    except OSError:  # pragma: no cover
        return None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--configs", default="digits:16:20,cifar10:4:4")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu", help="torch device for both UNets, e.g. cpu, cuda, cuda:1")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES), help="UNet weight dtype")
    ap.add_argument("--out", default=None, help="Markdown results file")
    args = ap.parse_args(argv)
    if args.repeats < 1:
        ap.error("--repeats must be >= 1")
    try:
        device = torch.device(args.device)
    except RuntimeError as err:
        ap.error(f"--device: {err}")
    if device.type == "cuda" and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    dtype = DTYPES[args.dtype]
    if args.threads:
        torch.set_num_threads(args.threads)
    load_before = load_average()
    rows = []
    for preset, batch, nfe in parse_configs(args.configs):
        row = bench(preset, batch, nfe, args.repeats, device=device, dtype=dtype)
        rows.append(row)
        print(f"{preset}: PSLD {row['psld_img_s']:.2f} img/s, DDPM {row['ddpm_img_s']:.2f} img/s, "
              f"ratio {row['ratio']:.3f} (best-of: {row['ratio_best']:.3f})", flush=True)
    load_after = load_average()
    accel = (f"GPU {torch.cuda.get_device_name(device)}, " if device.type == "cuda" else "")
    lines = [
        "# Sampling throughput: PSLDPipeline vs DDPMPipeline (same UNet preset, same NFE)",
        "",
        f"Machine: {accel}{platform.machine()}, {os.cpu_count()} CPUs, {platform.processor() or 'cpu'}, torch {torch.__version__}, "
        f"{torch.get_num_threads()} threads, Python {platform.python_version()}. Device `{device}`, UNet dtype {args.dtype}.",
        f"Load average (1/5/15 min) before: {tuple(round(x, 2) for x in load_before) if load_before else 'n/a'}, "
        f"after: {tuple(round(x, 2) for x in load_after) if load_after else 'n/a'}. "
        "Timings alternate PSLD/DDPM so that load from other processes hits both alike; compare the ratio.",
        "",
        "| preset | device | dtype | C | px | params PSLD / DDPM | batch | NFE | PSLD img/s (median) | DDPM img/s (median) | ratio | ratio (best-of) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['device']} | {r['dtype']} | {r['data_channels']} | {r['resolution']} | {r['params_psld']:,} / {r['params_ddpm']:,} | "
                     f"{r['batch']} | {r['nfe']} | {r['psld_img_s']:.2f} | {r['ddpm_img_s']:.2f} | "
                     f"**{r['ratio']:.3f}** | {r['ratio_best']:.3f} |")
    lines += ["", "Raw times (s) per run:", ""]
    for r in rows:
        lines.append(f"- {r['preset']}: PSLD {[round(t, 3) for t in r['psld_times']]}, "
                     f"DDPM {[round(t, 3) for t in r['ddpm_times']]}")
    lines += ["", "Command:", "", "```",
              "python benchmarks/sampling_throughput.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "```", ""]
    text = "\n".join(lines)
    print(text)
    if args.out:
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
            f.write(text)
    return rows


if __name__ == "__main__":
    main()
