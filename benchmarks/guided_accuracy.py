#!/usr/bin/env python
r"""Classifier-guidance accuracy: how often a guided sample is classified as the requested class.

For a PSLD pipeline with a ``classifier`` component (``training/train_classifier.py --pipeline``), each
guidance scale s draws ``--num_per_class`` samples for every class c (classifier guidance, PSLD Eq. 13-14:
ε − s·Lᵀ∇_z log p(y = c | z_t)) and classifies them with an **independent** network: the offline
:class:`~diffusers_psld.evaluation.features.DigitsFeatureNet` (another architecture, trained on clean images
only; ``training/train_feature_extractor.py``). Reported per class and averaged. Scale 0 is the unguided
baseline with the same seeds and labels (the requested class is ignored), ≈ the class frequency of the
model's samples (≈ 10 % for digits).

    python benchmarks/guided_accuracy.py --pipeline outputs/clf-digits/pipeline \
        --feature_extractor outputs/fx-digits16 --scales 0 1 2 4 8 --num_per_class 50

Writes ``<output>.json`` and ``<output>.md`` (default ``benchmarks/results/guided_accuracy``) with the
machine, command and timings. The samples of each scale use generator seeds ``seed + chunk`` (chunks of
``--batch_size`` images, labels ``[0]*n + [1]*n + ...``), so every scale sees the same initial noise.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

SCHEDULERS = ("saved", "gddim", "em", "sscs")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pipeline", required=True, help="saved PSLDPipeline directory with a classifier/ component")
    p.add_argument("--feature_extractor", required=True,
                   help="DigitsFeatureNet directory (training/train_feature_extractor.py); trained there if missing")
    p.add_argument("--scales", type=float, nargs="+", default=[0.0, 1.0, 2.0, 4.0, 8.0])
    p.add_argument("--num_per_class", type=int, default=50)
    p.add_argument("--num_inference_steps", type=int, default=50)
    p.add_argument("--scheduler", choices=SCHEDULERS, default="gddim",
                   help="gddim: GDDIMMultistepScheduler (README's recommendation for PSLD Γ > 0); em: PSLDScheduler "
                        "Euler-Maruyama (quadratic striding); sscs: SSCSScheduler; saved: the pipeline's own")
    p.add_argument("--batch_size", type=int, default=100)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--output", default=os.path.join("benchmarks", "results", "guided_accuracy"),
                   help="output path without extension (.json and .md are written)")
    p.add_argument("--save_grid", type=int, default=0, metavar="N",
                   help="also write <output>_s<scale>.png: N samples per class (one row per requested class)")
    args = p.parse_args(argv)
    for name in ("num_per_class", "num_inference_steps", "batch_size", "num_threads"):
        if getattr(args, name) < 1:
            p.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    if any(not (s >= 0 and s < float("inf")) for s in args.scales):
        p.error(f"--scales must be finite numbers >= 0, got {args.scales}")
    if not os.path.isfile(os.path.join(args.pipeline, "model_index.json")):
        p.error(f"--pipeline {args.pipeline!r} is not a saved pipeline (no model_index.json)")
    if not os.path.isdir(os.path.join(args.pipeline, "classifier")):
        p.error(f"--pipeline {args.pipeline!r} has no classifier/ component (training/train_classifier.py --pipeline)")
    return args


def load_pipeline(path: str, scheduler: str):
    from diffusers_psld.pipelines import PSLDPipeline
    from diffusers_psld.schedulers import GDDIMMultistepScheduler, PSLDScheduler, SSCSScheduler

    pipe = PSLDPipeline.from_pretrained(path)
    cfg = pipe.scheduler.config
    if scheduler == "gddim":
        pipe.scheduler = GDDIMMultistepScheduler.from_config(cfg)
    elif scheduler == "em":
        pipe.scheduler = PSLDScheduler.from_config(cfg, sampler="em", striding="quadratic")
    elif scheduler == "sscs":
        pipe.scheduler = SSCSScheduler.from_config(cfg, sampler="sscs", striding="quadratic")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def guided_samples(pipe, judge, labels: torch.Tensor, scale: float, num_inference_steps: int, batch_size: int,
                   seed: int):
    """``(uint8 images [N, C, H, W], judge's predicted classes [N])`` of samples guided towards ``labels``
    (scale 0: unguided, same noise)."""
    from diffusers_psld.evaluation.fid import to_uint8

    preds, images = [], []
    for j, start in enumerate(range(0, len(labels), batch_size)):
        lab = labels[start:start + batch_size]
        out = pipe(batch_size=len(lab), class_labels=lab, guidance_scale=float(scale),
                   num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed + j),
                   output_type="np").images
        images.append(to_uint8(out))
        preds.append(judge(images[-1]).argmax(-1))
    return torch.cat(images), torch.cat(preds)


def save_grid(images: torch.Tensor, labels: torch.Tensor, per_class: int, path: str, px: int = 2):
    """One row per requested class, ``per_class`` samples each, enlarged ``px`` times (nearest)."""
    import numpy as np
    import PIL.Image

    rows = []
    for c in labels.unique().tolist():
        row = images[labels == c][:per_class]
        rows.append(np.concatenate(list(row.permute(0, 2, 3, 1).numpy()), axis=1))
    grid = np.concatenate(rows, axis=0)
    im = PIL.Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid)
    im.resize((im.width * px, im.height * px), PIL.Image.NEAREST).save(path)


def summarize(preds: torch.Tensor, labels: torch.Tensor, num_classes: int) -> dict:
    per_class = [float((preds[labels == c] == c).float().mean()) for c in range(num_classes)]
    return {"per_class": per_class, "average": sum(per_class) / num_classes,
            "predicted_histogram": torch.bincount(preds, minlength=num_classes).tolist()}


def markdown(r: dict) -> str:
    n = r["num_classes"]
    judge_acc = f"{r['judge_val_accuracy']:.3f}" if isinstance(r["judge_val_accuracy"], float) else "n/a"
    clf = r["classifier"]
    if isinstance(clf, dict):
        clf = (f"{clf.get('max_train_steps')} steps, batch {clf.get('train_batch_size')}, lr {clf.get('learning_rate')}, "
               f"channels {clf.get('block_out_channels')}, {clf.get('resolution')} px; held-out accuracy "
               f"{clf.get('val_acc_t_lt_0.1', float('nan')):.3f} at t < 0.1, {clf.get('val_acc_all_t', float('nan')):.3f} "
               "over t ~ U(0, 1)")
    head = "| scale | average | " + " | ".join(str(c) for c in range(n)) + " | s |"
    lines = [
        "# Classifier-guidance accuracy (digits PSLD)", "",
        f"Fraction of guided samples that the independent DigitsFeatureNet (`{r['judge']}`, validation accuracy "
        f"{judge_acc}) classifies as the requested class, per class (%) and averaged; {r['num_per_class']} "
        f"samples per class, {r['scheduler']} at NFE {r['num_inference_steps']}; scale 0 = unguided (same seeds "
        "and labels).", "",
        head, "|" + "---|" * (n + 3),
    ]
    for row in r["rows"]:
        lines.append(f"| {row['scale']:g} | **{100 * row['average']:.1f} %** | "
                     + " | ".join(f"{100 * a:.0f}" for a in row["per_class"]) + f" | {row['seconds']:.0f} |")
    grids = [f"[scale {row['scale']:g}]({os.path.basename(row['grid'])})" for row in r["rows"] if row.get("grid")]
    lines += ["", f"Pipeline: `{r['pipeline']}`; classifier: {clf}.", f"Machine: {r['machine']}.", ""]
    if grids:
        lines += ["Samples (rows = requested class): " + ", ".join(grids) + ".", ""]
    lines += ["Command:", "", "```", r["command"], "```", ""]
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.num_threads)
    from diffusers_psld.evaluation.features import load_feature_extractor, train_feature_extractor

    pipe = load_pipeline(args.pipeline, args.scheduler)
    size = pipe.unet.config.sample_size
    if os.path.isdir(args.feature_extractor):
        judge = load_feature_extractor(args.feature_extractor)
        info_path = os.path.join(args.feature_extractor, "training_info.json")
        judge_acc = json.load(open(info_path))["val_accuracy"] if os.path.isfile(info_path) else None
    else:
        judge, info = train_feature_extractor(image_size=int(size), output_dir=args.feature_extractor, num_threads=1)
        judge_acc = info["val_accuracy"]
    judge = judge.eval()
    n_cls = int(pipe.classifier.config.num_classes)
    if judge.config.num_classes != n_cls:
        raise ValueError(f"the feature network has {judge.config.num_classes} classes, the classifier {n_cls}")
    labels = torch.arange(n_cls).repeat_interleave(args.num_per_class)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    rows = []
    for s in args.scales:
        t0 = time.perf_counter()
        images, preds = guided_samples(pipe, judge, labels, s, args.num_inference_steps, args.batch_size, args.seed)
        row = {"scale": s, **summarize(preds, labels, n_cls), "seconds": time.perf_counter() - t0}
        if args.save_grid:
            row["grid"] = f"{args.output}_s{s:g}.png"
            save_grid(images, labels, args.save_grid, row["grid"])
        rows.append(row)
        print(f"scale {s:g}: average {100 * row['average']:.1f} %  per class "
              + " ".join(f"{100 * a:.0f}" for a in row["per_class"]) + f"  ({row['seconds']:.0f} s)", flush=True)
    clf_metrics = os.path.join(os.path.dirname(os.path.abspath(args.pipeline)), "metrics.json")
    from diffusers_psld.evaluation.fid import weights_sha256

    result = {
        "pipeline": args.pipeline, "weights_sha256": weights_sha256(args.pipeline),
        "classifier": json.load(open(clf_metrics)) if os.path.isfile(clf_metrics) else "classifier/ of the pipeline",
        "scheduler": type(pipe.scheduler).__name__, "num_inference_steps": args.num_inference_steps,
        "num_per_class": args.num_per_class, "num_classes": n_cls, "seed": args.seed,
        "judge": args.feature_extractor, "judge_val_accuracy": judge_acc,
        "rows": rows,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{torch.get_num_threads()} thread(s), load average {os.getloadavg()[0]:.1f} at the end",
        "command": " ".join(["python", "benchmarks/guided_accuracy.py", *(argv if argv is not None else sys.argv[1:])]),
    }
    with open(args.output + ".json", "w") as f:
        json.dump(result, f, indent=2)
    with open(args.output + ".md", "w") as f:
        f.write(markdown(result))
    return result


if __name__ == "__main__":
    main()
