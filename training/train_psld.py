#!/usr/bin/env python
r"""Train a PSLD / CLD / VP-SDE UNet with Accelerate (in the style of diffusers' ``train_unconditional.py``).

With no arguments it trains offline on scikit-learn's digits (16 px, ``digits`` preset) and writes a
Diffusers-layout pipeline (``model_index.json``, ``unet/``, ``scheduler/``), ``samples.png``,
``loss_curve.png`` and a model card ``README.md`` to ``--output_dir``::

    python training/train_psld.py
    accelerate launch training/train_psld.py --dataset_name cifar10 --model_preset cifar10 ...

Defaults: the paper's recipe (Adam 2e-4, betas (0.9, 0.999), linear warm-up from 0 over 5000 steps then
constant, grad-norm clip 1.0, a fixed EMA decay 0.9999, t ~ U(1e-5, 1), fp32) for Hub / image-folder data. For the
offline digits run, where only a few thousand steps fit into minutes on a CPU, the defaults become
lr 1e-3, warm-up 100 steps and EMA with the diffusers warm-up (decay 1 - (1 + step)^(-2/3), capped
at ``--ema_decay``), because a fixed 0.9999 EMA would still be ~90 % the random initialisation after
1000 steps. Every such default is printed at start and recorded in the model card.

Reproducibility and resume: the data order of epoch e is ``randperm`` seeded by (seed, e), split
into per-rank slices of each global batch; t, ε and label dropout of step s come from a generator
seeded by (seed, rank, step, micro-batch). Checkpoints (``checkpoint-<step>``) are written by
``accelerator.save_state`` into ``.tmp-checkpoint-<step>``, completed by a manifest (sizes and SHA-256
of every file, and the run's settings) written last, and renamed with ``os.replace``; old ones are
pruned by an atomic rename to ``.trash-…`` before deletion (:mod:`diffusers_psld.checkpoints`). A killed
run always leaves complete checkpoints only; ``--resume_from_checkpoint latest`` verifies the
checkpoint, refuses changed diffusion/network settings, and continues with exactly the loss
trajectory of an uninterrupted run.

Layout (as diffusers' ``train_unconditional.py``: ``parse_args`` then ``main``): :func:`main` reads
``parse_args`` → :func:`setup` (accelerator, data, network, EMA, optimizer, the checkpoint to resume from, the
Hub repo) → :func:`announce` → :func:`load_checkpoint` → :func:`train` (one optimizer step:
:func:`train_step`; checkpoints: :func:`diffusers_psld.checkpoints.save_state`) → :func:`export` (sample grid,
pipeline, loss curve, model card, upload). The pieces that do not depend on this command line (EMA folders,
the Accelerate state hooks, the per-step generator, the sample grid, the loss plot) are in
:mod:`diffusers_psld.training_utils`, the crash-safe checkpoint files in :mod:`diffusers_psld.checkpoints`.

CPU threads: ``--num_threads`` (default: the usable cores minus one, at least 1; on the 2-core
reference machine 1 thread) — torch's default of one thread per core collapses to seconds per step
as soon as another process competes for a core (measured in the README's *Reliability* section).
"""

import argparse
import json
import math
import os
import re
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

_REPO = Path(__file__).resolve().parent.parent
if str(_REPO) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(_REPO))

DIGITS_DEFAULTS = dict(learning_rate=1e-3, lr_warmup_steps=100, ema_warmup=True, max_train_steps=1000,
                       train_batch_size=64, checkpointing_steps=500, save_images_steps=500,
                       checkpoints_total_limit=2)
PAPER_DEFAULTS = dict(learning_rate=2e-4, lr_warmup_steps=5000, ema_warmup=False, max_train_steps=None,
                      train_batch_size=16, checkpointing_steps=5000, save_images_steps=5000,
                      checkpoints_total_limit=None)
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
GRID_IMAGES, MIN_GRID_IMAGES = 64, 4  # the sample grid: default size, and the smallest a short run scales it to
# A larger image than this has never been a diffusion training resolution here; the data pre-resize of
# --resolution 100000 was killed by the OOM killer at 24 GiB. Bounded before any data is touched.
MAX_RESOLUTION = 1024
# Settings that define the trained model: a resume with other values is refused (no override).
FIXED_SETTINGS = ("diffusion", "gamma", "nu", "beta_min", "beta_max", "kappa", "m_inv", "time_scale", "model_preset",
                  "resolution", "class_conditional", "use_ema", "prediction_type", "offline_digits")
# Settings that may change between runs of one training (step counts, sampling for the grids, I/O).
FREE_SETTINGS = ("output_dir", "logging_dir", "report_to", "report_to_requested", "resume_from_checkpoint",
                 "max_train_steps", "num_epochs", "checkpointing_steps", "checkpoints_total_limit", "save_images_steps",
                 "num_inference_steps", "eval_batch_size", "sampler", "push_to_hub", "hub_model_id", "hub_token",
                 "hub_private_repo", "dataloader_num_workers", "cache_dir", "num_threads", "allow_changed_settings",
                 "defaults_used", "dataset_label", "beta", "resume_history")


# ----------------------------------------------------------------------------- arguments
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    g = p.add_argument_group("data")
    g.add_argument("--dataset_name", default=None, help="Hub data set (datasets.load_dataset); default: offline digits")
    g.add_argument("--dataset_config_name", default=None)
    g.add_argument("--train_data_dir", default=None, help="image folder (datasets 'imagefolder'; sub-folders = labels)")
    g.add_argument("--image_column", default=None, help="image column (default: first of image/img/pixel_values)")
    g.add_argument("--label_column", default=None, help="label column for --class_conditional (default: label/labels/...)")
    g.add_argument("--cache_dir", default=None)
    g.add_argument("--resolution", type=int, default=None, help="default: the preset's native size")
    g.add_argument("--center_crop", action="store_true",
                   help="resize the shorter side then center-crop (default: direct resize to R×R, as the paper's CelebA-64)")
    g.add_argument("--random_flip", action="store_true", help="random horizontal flips (deterministic per (seed, epoch, index))")
    g.add_argument("--dataloader_num_workers", type=int, default=0)
    g.add_argument("--num_threads", type=int, default=None,
                   help="torch CPU threads (default: usable cores - 1, at least 1; see the documentation's Reliability page)")
    g = p.add_argument_group("diffusion")
    g.add_argument("--diffusion", choices=["psld", "cld", "vp"], default="psld",
                   help="psld (Γ, ν); cld = PSLD with Γ=0, ν=4; vp = VP-SDE β 0.1→20")
    g.add_argument("--gamma", type=float, default=None, help="Γ (psld default 0.01; cld: must be 0)")
    g.add_argument("--nu", type=float, default=None, help="ν (psld default 4.01, cld default 4.0); must be > Γ")
    g.add_argument("--beta", type=float, nargs="+", default=None,
                   help="β: one value = constant (psld/cld default 8), two = linear min max (vp default 0.1 20)")
    g.add_argument("--kappa", type=float, default=0.04, help="HSM initial momentum variance factor (psld/cld)")
    g.add_argument("--m_inv", type=float, default=None, help="M⁻¹ (default: critical damping (ν-Γ)²/4)")
    g.add_argument("--time_scale", type=float, default=None,
                   help="UNet receives t*time_scale (default: the preset's: 1000, ncsnpp-* 1 = raw t as the paper)")
    g.add_argument("--sampler", choices=["gddim", "em", "pf_euler", "pf_heun", "sscs"], default=None,
                   help="sampler for the sample grids and the saved scheduler (default: gddim, the package's "
                        "recommended GDDIMMultistepScheduler with its NFE-band defaults; sscs for cld with "
                        "--prediction_type epsilon, whose network has no ε_x for gDDIM)")
    g.add_argument("--striding", choices=["uniform", "quadratic"], default=None,
                   help="time grid of the step-wise samplers (--sampler em / pf_euler / pf_heun / sscs; gddim uses its "
                        "NFE-band grid and ignores it): default quadratic for psld/cld, which the quality study found to "
                        "converge on trained k = 2 models where uniform did not; uniform for vp")
    g.add_argument("--prediction_type", choices=["epsilon", "sample", "sufficient_epsilon"], default="epsilon",
                   help="network output: epsilon (the paper's k*C-channel ε), sample (x̂₀, C channels) or sufficient_epsilon "
                        "(the noise of the sufficient statistic of x₀, C channels; consistent by construction). On digits with "
                        "the recommended gDDIM samplers, epsilon and sufficient_epsilon sampled best and sample worst at "
                        "NFE 5-20 (documentation, Samplers); sample helps EM / the raw ODE at NFE <= 10 (Benchmarks)")
    g.add_argument("--input_preconditioning", action=argparse.BooleanOptionalAction, default=False,
                   help="feed the UNet c_in(t) z_t, c_in = (Σ_t + σ_data² a_t a_tᵀ)^(-1/2) (scheduler.scale_model_input)")
    g.add_argument("--sigma_data", type=float, default=0.5, help="σ_data of --input_preconditioning (per-pixel data std, > 0)")
    g.add_argument("--snr_gamma", type=float, default=None,
                   help="min-SNR-γ loss weighting min(SNR_t, γ)/SNR_t in ε units (diffusers' flag; default: off)")
    g = p.add_argument_group("model")
    g.add_argument("--model_preset", default="digits",
                   help="tiny | digits | cifar10 | cifar10-large | celeba64 | afhqv2-128 | ncsnpp-cifar10 | "
                        "ncsnpp-celeba64 | ncsnpp-afhqv2-128 (the paper's NCSN++) | ncsnpp-tiny")
    g.add_argument("--class_conditional", action="store_true",
                   help="class-conditional UNet (num_class_embeds = n_classes + 1; last = null class for CFG)")
    g.add_argument("--cond_drop_prob", type=float, default=0.1, help="label dropout to the null class (CFG)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--train_batch_size", type=int, default=None, help="per process (digits default 64, else 16)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps (digits default 1000)")
    g.add_argument("--num_epochs", type=int, default=None, help="used when --max_train_steps is not given")
    g.add_argument("--learning_rate", type=float, default=None, help="default 2e-4 (paper); digits 1e-3")
    g.add_argument("--lr_warmup_steps", type=int, default=None, help="linear warm-up from 0 (paper 5000; digits 100)")
    g.add_argument("--adam_beta1", type=float, default=0.9)
    g.add_argument("--adam_beta2", type=float, default=0.999)
    g.add_argument("--adam_weight_decay", type=float, default=0.0)
    g.add_argument("--adam_epsilon", type=float, default=1e-8)
    g.add_argument("--max_grad_norm", type=float, default=1.0)
    g.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    g.add_argument("--ema_decay", type=float, default=0.9999, help="EMA decay (maximum decay with --ema_warmup)")
    g.add_argument("--ema_warmup", action=argparse.BooleanOptionalAction, default=None,
                   help="diffusers EMA warm-up 1-(1+step)^(-2/3) (default: on for digits, off (paper) otherwise)")
    g.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"], default="no")
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=0)
    g = p.add_argument_group("checkpoints, logging, output")
    g.add_argument("--output_dir", default=None, help="default outputs/psld-<data>-<diffusion>")
    g.add_argument("--logging_dir", default="logs", help="TensorBoard dir (relative to --output_dir)")
    g.add_argument("--report_to", choices=["tensorboard", "none"], default="tensorboard")
    g.add_argument("--checkpointing_steps", type=int, default=None)
    g.add_argument("--checkpoints_total_limit", type=int, default=None)
    g.add_argument("--resume_from_checkpoint", default=None,
                   help="'latest', a checkpoint directory, or a checkpoint name inside --output_dir (checkpoint-500)")
    g.add_argument("--allow_changed_settings", nargs="+", default=[], metavar="NAME",
                   help="on resume, accept these changed settings (e.g. learning_rate seed); recorded in "
                        "training_args.json. Diffusion and network settings cannot be changed.")
    g.add_argument("--save_images_steps", type=int, default=None, help="sample grid (EMA weights) every N steps")
    g.add_argument("--num_inference_steps", type=int, default=None,
                   help="network evaluations per sample of the sample grids and the model card (default: 20 with "
                        "gddim, 100 with the step-wise samplers)")
    g.add_argument("--eval_batch_size", type=int, default=None,
                   help=f"images in the sample grid (default {GRID_IMAGES}; fewer, at least {MIN_GRID_IMAGES}, when the run "
                        f"is so short that drawing them would take longer than training: see sample_grid_size)")
    g.add_argument("--push_to_hub", action="store_true")
    g.add_argument("--hub_model_id", default=None)
    g.add_argument("--hub_token", default=None, help="Hub token (default: HF_TOKEN / cached login); never logged")
    g.add_argument("--hub_private_repo", action="store_true")
    # test hooks (hidden)
    a("--_inject_nan_at_step", type=int, default=None, help=argparse.SUPPRESS)
    a("--_crash_before_rename_at_step", type=int, default=None, help=argparse.SUPPRESS)
    a("--_debug_ranks", action="store_true", help=argparse.SUPPRESS)
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse ``argv`` (None: ``sys.argv``) and fill/validate with :func:`resolve_and_validate`."""
    return resolve_and_validate(build_parser().parse_args(argv))


def _err(flag: str, msg: str):
    raise ValueError(f"`{flag}`: {msg}")


def resolve_and_validate(args) -> argparse.Namespace:
    """Fill data-dependent defaults and check every flag that can be checked without data. Raises
    ``ValueError`` naming the flag."""
    from diffusers_psld.models.unet_presets import PRESETS, check_resolution

    args.offline_digits = not (args.dataset_name or args.train_data_dir)
    if not 0 <= args.seed <= 2**32 - 1:  # accelerate's set_seed range
        _err("--seed", f"must be in [0, 2**32 - 1], got {args.seed}")
    if args.dataset_name and args.train_data_dir:
        _err("--dataset_name", "give either --dataset_name or --train_data_dir, not both")
    defaults = DIGITS_DEFAULTS if args.offline_digits else PAPER_DEFAULTS
    args.defaults_used = {}
    for k, v in defaults.items():
        if getattr(args, k, None) is None:
            setattr(args, k, v)
            args.defaults_used[k] = v
    if args.model_preset not in PRESETS:
        _err("--model_preset", f"unknown preset {args.model_preset!r}; choose one of {sorted(PRESETS)}")
    if args.resolution is None:
        args.resolution = PRESETS[args.model_preset]["sample_size"]
    if not 1 <= args.resolution <= MAX_RESOLUTION:
        _err("--resolution", f"must be between 1 and {MAX_RESOLUTION} pixels, got {args.resolution}")
    check_resolution(args.model_preset, args.resolution)  # message names --resolution
    if args.time_scale is None:  # NCSN++ presets: 1.0 (raw t, as the official networks); recorded in the scheduler
        args.time_scale = PRESETS[args.model_preset].get("time_scale", 1000.0)
    if not (math.isfinite(args.time_scale) and args.time_scale > 0):
        _err("--time_scale", f"must be a finite number > 0 (the UNet receives t * time_scale), got {args.time_scale}")
    if args.num_threads is None:
        args.num_threads = default_num_threads()
    elif args.num_threads < 1:
        _err("--num_threads", f"must be >= 1, got {args.num_threads}")
    # diffusion
    if args.diffusion == "vp":
        for flag in ("gamma", "nu", "m_inv"):
            if getattr(args, flag) is not None:
                _err(f"--{flag}", "has no meaning for --diffusion vp")
        beta = args.beta or [0.1, 20.0]
    else:
        if args.diffusion == "cld":
            if args.gamma not in (None, 0.0):
                _err("--gamma", f"--diffusion cld means Γ = 0, got {args.gamma}; use --diffusion psld for Γ > 0")
            args.gamma = 0.0
            args.nu = 4.0 if args.nu is None else args.nu
        else:
            args.gamma = 0.01 if args.gamma is None else args.gamma
            args.nu = 4.01 if args.nu is None else args.nu
        if not (math.isfinite(args.gamma) and args.gamma >= 0):
            _err("--gamma", f"Γ must be finite and >= 0, got {args.gamma}")
        if not (math.isfinite(args.nu) and args.nu > args.gamma):
            _err("--nu", f"ν must be finite and > Γ = {args.gamma} (critical damping M⁻¹ = (ν-Γ)²/4), got {args.nu}")
        if not (math.isfinite(args.kappa) and args.kappa > 0):
            _err("--kappa", f"κ must be > 0, got {args.kappa}")
        if args.m_inv is not None and not (math.isfinite(args.m_inv) and args.m_inv > 0):
            _err("--m_inv", f"must be > 0, got {args.m_inv}")
        beta = args.beta or [8.0]
    if len(beta) not in (1, 2) or not all(math.isfinite(b) and b > 0 for b in beta):
        _err("--beta", f"one or two positive numbers expected, got {beta}")
    args.beta_min, args.beta_max = (beta[0], beta[0]) if len(beta) == 1 else (beta[0], beta[1])
    if args.beta_max < args.beta_min:
        _err("--beta", f"max ({args.beta_max}) must be >= min ({args.beta_min})")
    if not (math.isfinite(args.sigma_data) and args.sigma_data > 0):
        _err("--sigma_data", f"must be finite and > 0 (the per-pixel std of the data), got {args.sigma_data}")
    if args.snr_gamma is not None and not (math.isfinite(args.snr_gamma) and args.snr_gamma > 0):
        _err("--snr_gamma", f"must be finite and > 0, got {args.snr_gamma}")
    if args.sampler is None:
        args.sampler = "sscs" if args.diffusion == "cld" and args.prediction_type == "epsilon" else "gddim"
    if args.sampler == "gddim" and args.diffusion == "cld" and args.prediction_type == "epsilon":
        _err("--sampler", "gddim needs ε_x, which a cld network with --prediction_type epsilon does not learn (use sscs, "
                          "em, pf_euler or pf_heun, or a C-channel --prediction_type)")
    if args.num_inference_steps is None:
        args.num_inference_steps = 20 if args.sampler == "gddim" else 100
    if args.striding is None:
        args.striding = "uniform" if args.diffusion == "vp" else "quadratic"
    if args.diffusion == "vp" and args.sampler == "sscs":
        _err("--sampler", "sscs needs momentum (psld/cld)")
    # optimisation
    if args.eval_batch_size is not None and args.eval_batch_size < 1:
        _err("--eval_batch_size", f"must be >= 1, got {args.eval_batch_size}")
    for flag, v, lo in (("--train_batch_size", args.train_batch_size, 1), ("--gradient_accumulation_steps", args.gradient_accumulation_steps, 1),
                        ("--num_inference_steps", args.num_inference_steps, 2),
                        ("--dataloader_num_workers", args.dataloader_num_workers, 0), ("--lr_warmup_steps", args.lr_warmup_steps, 0),
                        ("--checkpointing_steps", args.checkpointing_steps, 1), ("--save_images_steps", args.save_images_steps, 1)):
        if v < lo:
            _err(flag, f"must be >= {lo}, got {v}")
    from diffusers_psld.schedulers.validation import MAX_INFERENCE_STEPS

    if args.num_inference_steps > MAX_INFERENCE_STEPS:  # else found only at the first sample grid, after training
        _err("--num_inference_steps", f"must be <= {MAX_INFERENCE_STEPS}, got {args.num_inference_steps}")
    for flag, v in (("--max_train_steps", args.max_train_steps), ("--num_epochs", args.num_epochs),
                    ("--checkpoints_total_limit", args.checkpoints_total_limit)):
        if v is not None and v < 1:
            _err(flag, f"must be >= 1, got {v}")
    for flag, v in (("--learning_rate", args.learning_rate), ("--adam_epsilon", args.adam_epsilon), ("--max_grad_norm", args.max_grad_norm)):
        if not (math.isfinite(v) and v > 0):
            _err(flag, f"must be > 0, got {v}")
    for flag, v in (("--adam_beta1", args.adam_beta1), ("--adam_beta2", args.adam_beta2), ("--ema_decay", args.ema_decay)):
        if not (0.0 <= v < 1.0):
            _err(flag, f"must be in [0, 1), got {v}")
    if args.adam_weight_decay < 0:
        _err("--adam_weight_decay", f"must be >= 0, got {args.adam_weight_decay}")
    if not (0.0 <= args.cond_drop_prob < 1.0):
        _err("--cond_drop_prob", f"must be in [0, 1), got {args.cond_drop_prob}")
    if args.max_train_steps is None and args.num_epochs is None:
        args.num_epochs = 1
    # output
    if args.output_dir is None:
        data = args.dataset_name or (Path(args.train_data_dir).name if args.train_data_dir else "digits")
        args.output_dir = os.path.join("outputs", f"psld-{data.replace('/', '-')}-{args.diffusion}")
    if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
        inside = os.path.join(args.output_dir, args.resume_from_checkpoint)
        if os.path.basename(os.path.normpath(args.resume_from_checkpoint)) == args.resume_from_checkpoint and os.path.isdir(inside):
            args.resume_from_checkpoint = inside  # a bare name (checkpoint-500) inside --output_dir, as diffusers' scripts
        else:
            _err("--resume_from_checkpoint", f"{args.resume_from_checkpoint!r} is not a checkpoint directory, nor a "
                                             f"checkpoint name inside --output_dir {args.output_dir!r} (or use 'latest')")
    if args.push_to_hub and args.hub_model_id is not None and args.hub_model_id.count("/") > 1:
        _err("--hub_model_id", f"must look like 'name' or 'user/name', got {args.hub_model_id!r}")
    return args


def default_num_threads() -> int:
    """Default torch CPU threads: the usable cores minus one (at least 1), unless ``OMP_NUM_THREADS`` is set.

    One core stays free for the data loader, the OS and any other process: on the shared 2-core
    reference machine, with a busy-loop process running, torch's default (2 threads) took 23 s per
    default training step against 3.9 s with 1 thread (README, *Reliability*)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return int(env)
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover  (macOS, Windows)
        cores = os.cpu_count() or 1
    return max(1, cores - 1)


def check_output_dir(path: str):
    """Create ``--output_dir`` and prove it is writable (a probe file), else ValueError naming the flag."""
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as err:
        raise ValueError(f"`--output_dir` {path!r} is not writable: {err}") from err




def make_scheduler(args):
    """The scheduler of the run: training, the sample grids and the saved pipeline. ``--sampler gddim``:
    ``GDDIMMultistepScheduler`` (the package's recommended sampler, its NFE-band defaults); else ``PSLDScheduler`` /
    ``SSCSScheduler`` with ``--sampler`` and ``--striding``."""
    from diffusers_psld import GDDIMMultistepScheduler, PSLDScheduler

    param = dict(prediction_type=args.prediction_type, input_preconditioning=args.input_preconditioning,
                 sigma_data=args.sigma_data)
    if args.sampler == "gddim":
        common = dict(beta_min=args.beta_min, beta_max=args.beta_max, time_scale=args.time_scale, **param)
        if args.diffusion == "vp":
            return GDDIMMultistepScheduler(diffusion="vp", **common)
        return GDDIMMultistepScheduler(diffusion="psld", gamma=args.gamma, nu=args.nu, m_inv=args.m_inv,
                                       kappa=args.kappa, **common)
    if args.diffusion == "vp":
        return PSLDScheduler(diffusion="vp", beta_min=args.beta_min, beta_max=args.beta_max, time_scale=args.time_scale,
                             sampler=args.sampler, striding=args.striding, **param)
    return PSLDScheduler(diffusion="psld", gamma=args.gamma, nu=args.nu, m_inv=args.m_inv, beta_min=args.beta_min,
                         beta_max=args.beta_max, kappa=args.kappa, time_scale=args.time_scale, sampler=args.sampler,
                         striding=args.striding, **param)


def load_data(args):
    from diffusers_psld import data

    if args.offline_digits:
        if args.image_column is not None:
            _err("--image_column", "the offline digits set has no columns; give --dataset_name or --train_data_dir")
        need, avail = digits_memory(args.resolution)
        if avail is not None and need > avail // 2:
            _err("--resolution", f"{args.resolution} px would need {need / 2**30:.1f} GiB to hold the offline digits "
                                 f"in memory; {avail / 2**30:.1f} GiB are available (the set is kept in memory, "
                                 f"use at most half of it)")
        ds = data.load_digits_dataset(args.resolution, seed=args.seed, random_flip=args.random_flip)
        args.dataset_label = "sklearn-digits"
        channels = 1
    else:
        channels = 3
        ds = data.load_image_dataset(args.dataset_name, args.dataset_config_name, args.train_data_dir, args.image_column,
                                     args.label_column, args.resolution, args.center_crop, args.random_flip,
                                     channels=channels, cache_dir=args.cache_dir, seed=args.seed,
                                     need_labels=args.class_conditional)
        args.dataset_label = args.dataset_name or Path(args.train_data_dir).name
    if len(ds) == 0:
        raise ValueError("the training data set is empty (check `--dataset_name` / `--train_data_dir`)")
    if args.class_conditional and not ds.num_classes:
        _err("--class_conditional", "the data set has no labels")
    return ds, channels


def digits_memory(resolution: int):
    """(bytes the in-memory digits set needs at ``resolution``: 1797 float32 images plus the stacking copy,
    bytes of memory available now or None when unknown)."""
    from diffusers_psld.pipelines.inputs import available_memory  # MemAvailable (counts reclaimable page cache)

    return 2 * 1797 * resolution * resolution * 4, available_memory("cpu")




def list_checkpoints(output_dir: str):
    """Complete checkpoints (``checkpoint-<step>`` with their manifest; temp and trash dirs excluded),
    oldest first, as (step, path). See :func:`diffusers_psld.checkpoints.list_checkpoints`."""
    from diffusers_psld import checkpoints as ckpt

    return ckpt.list_checkpoints(output_dir)


# ----------------------------------------------------------------------------- checkpoints and resume
def public_settings(args) -> dict:
    """The run's settings as written to training_args.json and into every checkpoint's manifest (JSON
    values, the Hub token redacted)."""
    from diffusers_psld import hub

    raw = {k: v for k, v in vars(args).items() if not k.startswith("_") and k not in ("defaults_used", "notes")}
    return json.loads(json.dumps(hub.redact(raw), default=str))


def _required_files(args):
    req = ["unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
    if args.use_ema:
        req += ["unet_ema/config.json", "unet_ema/diffusion_pytorch_model.safetensors"]
    return req


def _intact_hint(args, step: int, parent: str) -> str:
    """Where to resume instead of a damaged ``checkpoint-<step>`` inside ``parent``."""
    from diffusers_psld import checkpoints as ckpt

    prev = ckpt.last_intact(parent, below_step=step, required=_required_files(args))
    if prev is None:
        return (f"No intact earlier checkpoint in {parent!r}: start a new run (another --output_dir, or "
                f"without --resume_from_checkpoint).")
    inside = os.path.abspath(parent) == os.path.abspath(args.output_dir)
    return (f"The last loadable checkpoint is {prev}: resume from it with "
            f"`--resume_from_checkpoint {os.path.basename(prev) if inside else prev}` (this one is left in place "
            f"for inspection).")


def _load_failure(args, path: str, err: BaseException) -> str:
    """The message for checkpoint ``path`` that :func:`resolve_resume` accepted but ``load_state`` could not
    load. It is called damaged only when its files fail verification now; a checkpoint whose files match
    its manifest is reported as intact but not loadable by this code (with the versions that wrote it, when
    the manifest records them); one whose manifest lists no files is said to be unverifiable."""
    from diffusers_psld import checkpoints as ckpt

    step = int(CHECKPOINT_RE.match(os.path.basename(path)).group(1))
    what = f"`--resume_from_checkpoint`: {path} could not be loaded ({type(err).__name__}: {err})"
    problem = ckpt.verify(path, _required_files(args))
    if problem:  # changed after the check at start
        return f"{what}. It is damaged: {problem}. {_intact_hint(args, step, os.path.dirname(path))}"
    manifest = ckpt.read_manifest(path)
    if not isinstance(manifest.get("files"), dict):
        return (f"{what}. Its manifest lists no file hashes (written by an older version), so its files cannot be "
                f"verified. {_intact_hint(args, step, os.path.dirname(path))}")
    then, now = manifest.get("versions") or {}, ckpt.library_versions()
    changed = ", ".join(f"{k} {then[k]} → {now.get(k, 'not installed')}" for k in sorted(then) if then[k] != now.get(k))
    way_out = (f"It was written with other library versions ({changed}): resume with those, or start a new run in "
               f"another --output_dir." if changed else "Start a new run in another --output_dir.")
    return f"{what}. Its files are intact (they match its manifest), but this training code cannot load them. {way_out}"


def resolve_resume(args):
    """The checkpoint to resume from (None: start a new run), checked before anything is written.

    ``latest`` is the newest complete checkpoint. The checkpoint must verify against its manifest and
    must have been trained with the same diffusion and network settings (:data:`FIXED_SETTINGS`);
    other changed settings need ``--allow_changed_settings NAME`` and are recorded in
    ``args.resume_history`` (→ training_args.json).

    Raises:
        ValueError: naming ``--resume_from_checkpoint`` (damaged checkpoint: the bad file and the last
            loadable checkpoint; changed settings: each difference) or ``--allow_changed_settings``.
    """
    from diffusers_psld import checkpoints as ckpt

    history = []
    old_args_path = os.path.join(args.output_dir, "training_args.json")
    old_args = None
    if os.path.exists(old_args_path):
        try:
            with open(old_args_path) as f:
                old_args = json.load(f)
            history = list(old_args.get("resume_history", []))
        except (OSError, json.JSONDecodeError, AttributeError):
            old_args = None
    args.resume_history = history
    known = set(vars(args))
    for name in args.allow_changed_settings:
        if name in FIXED_SETTINGS:
            _err("--allow_changed_settings", f"{name!r} defines the trained model (diffusion or network) and cannot "
                                             f"change on resume; start a new run instead")
        if name not in known or name.startswith("_"):
            _err("--allow_changed_settings", f"{name!r} is not a training setting (use the flag's name without --, "
                                             f"e.g. learning_rate)")
    path = args.resume_from_checkpoint
    if path == "latest":
        cks = ckpt.list_checkpoints(args.output_dir)
        path = cks[-1][1] if cks else None
    if not path:
        args.resume_history = []  # a new run: no history
        return None
    path = os.path.normpath(path)
    m = CHECKPOINT_RE.match(os.path.basename(path))
    if not m:
        _err("--resume_from_checkpoint", f"{path!r} is not named checkpoint-<step>")
    problem = ckpt.verify(path, _required_files(args))
    if problem:
        _err("--resume_from_checkpoint", f"checkpoint {path} is damaged: {problem}. "
                                         f"{_intact_hint(args, int(m.group(1)), os.path.dirname(path))}")
    stored = ckpt.read_manifest(path).get("settings") or old_args
    if not isinstance(stored, dict):
        print(f"note: {path} records no settings (written by an older version): resuming without comparing them",
              file=sys.stderr, flush=True)
        return path
    hard, soft = ckpt.compare_settings(stored, public_settings(args), FIXED_SETTINGS, FREE_SETTINGS)
    refused = hard + [d for d in soft if d[0] not in args.allow_changed_settings]
    if refused:
        lines = []
        for k, a, b in hard:
            lines.append(f"  {k}: {a!r} in the checkpoint, {b!r} now (defines the model: cannot change)")
        for k, a, b in soft:
            if k not in args.allow_changed_settings:
                lines.append(f"  {k}: {a!r} in the checkpoint, {b!r} now (pass --allow_changed_settings {k} to accept)")
        _err("--resume_from_checkpoint", f"{path} was trained with other settings:\n" + "\n".join(lines) +
             "\nRepeat the checkpoint's values, or start a new run in another --output_dir.")
    if soft:
        changed = {k: [a, b] for k, a, b in soft}
        args.resume_history = history + [{"checkpoint": os.path.basename(path), "step": int(m.group(1)),
                                          "changed": changed}]
        print("resuming with changed settings (recorded in training_args.json): "
              + ", ".join(f"{k} {a!r} -> {b!r}" for k, (a, b) in changed.items()), flush=True)
    return path



# ----------------------------------------------------------------------------- set-up
@dataclass
class Training:
    """One run's objects after :func:`setup` (what diffusers' ``train_unconditional.py`` keeps as locals of
    ``main``). ``unet`` is the prepared model (wrapped in ``DistributedDataParallel`` on several processes;
    ``accelerator.unwrap_model(unet)`` is the ``UNet2DModel`` / ``NCSNppModel``)."""

    args: argparse.Namespace
    accelerator: Any
    scheduler: Any
    ds: Any
    channels: int
    unet: Any
    ema: Any
    optimizer: Any
    lr_scheduler: Any
    n_params: int
    public_args: dict
    resume_path: Optional[str]
    batches_per_epoch: int
    log_path: str
    hub_repo_id: Optional[str] = None

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process


def choose_logger(args) -> str:
    """``--report_to`` as it really happens: TensorBoard falls back to ``none`` (with a note) when it is not
    installed; both values are recorded (training_args.json, the model card)."""
    args.report_to_requested = args.report_to
    if args.report_to == "tensorboard":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            print("note: TensorBoard is not installed (pip install tensorboard), so this run logs to train_log.jsonl "
                  "only; training_args.json and the model card record report_to = none", file=sys.stderr, flush=True)
            args.report_to = "none"
    return args.report_to


def sample_grid_size(args, world: int) -> Optional[str]:
    """Default ``--eval_batch_size``: :data:`GRID_IMAGES` images, unless drawing them would cost more network
    evaluations than the whole training run (``max_train_steps × global batch × 3``, a backward pass costing
    about two forward passes): then as many as that budget allows at ``--num_inference_steps``, at least
    :data:`MIN_GRID_IMAGES`. The inference steps are never reduced (they decide what the samples look like).
    A 4-step run on an image folder otherwise drew a 64-image, 100-step grid for 137 s after 4 training steps.
    Returns a note for the start banner when the grid was scaled (None otherwise or when the flag is given)."""
    if args.eval_batch_size is not None:
        return None
    budget = args.max_train_steps * args.train_batch_size * world * args.gradient_accumulation_steps * 3
    args.eval_batch_size = int(min(GRID_IMAGES, max(MIN_GRID_IMAGES, budget // args.num_inference_steps)))
    if args.eval_batch_size == GRID_IMAGES:
        return None
    return (f"sample grid: {args.eval_batch_size} images × {args.num_inference_steps} steps, not {GRID_IMAGES}, so that "
            f"drawing it costs no more than this short run's training (--eval_batch_size sets it)")


def warmup_note(args) -> Optional[str]:
    """A note for the start banner when the linear LR warm-up is longer than the run: the learning rate then
    never reaches ``--learning_rate`` (the folder/Hub default warm-up is the paper's 5000 steps). The warm-up
    is not scaled to ``--max_train_steps``: that would change the LR schedule of a run that is later resumed
    with a larger ``--max_train_steps``, and resuming must continue the same run exactly."""
    if args.lr_warmup_steps <= args.max_train_steps:
        return None
    frac = args.max_train_steps / args.lr_warmup_steps
    return (f"note: the learning-rate warm-up ({args.lr_warmup_steps} steps) is longer than this run "
            f"({args.max_train_steps} steps): the learning rate rises from 0 to only {args.learning_rate * frac:.3g} "
            f"({100 * frac:.2g} % of {args.learning_rate:g}) by the end; for a short run pass a smaller --lr_warmup_steps")


def setup(args) -> Training:
    """Accelerator, output directory, the checkpoint to resume from (verified, settings compared), data,
    network, EMA, optimizer and LR schedule, prepared by Accelerate with the checkpoint hooks registered.
    Raises ``ValueError`` naming the flag for every input problem, before anything is trained."""
    import torch
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, set_seed
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    from diffusers_psld import checkpoints as ckpt
    from diffusers_psld import data as psld_data
    from diffusers_psld.models.unet_presets import build_unet
    from diffusers_psld.training_utils import register_state_hooks

    torch.set_num_threads(args.num_threads)
    scheduler = make_scheduler(args)  # validates the SDE parameters again (RecipeSDE)
    report_to = choose_logger(args)
    accelerator = Accelerator(mixed_precision=args.mixed_precision, log_with=None if report_to == "none" else report_to,
                              project_config=ProjectConfiguration(project_dir=args.output_dir,
                                                                  logging_dir=os.path.join(args.output_dir, args.logging_dir)))
    if accelerator.is_main_process:
        check_output_dir(args.output_dir)
        stale = ckpt.remove_stale(args.output_dir)
        if stale:
            print(f"removed leftovers of an interrupted run: {', '.join(stale)}", flush=True)
    accelerator.wait_for_everyone()
    resume_path = resolve_resume(args)  # verified, settings compared (ValueError naming the flag otherwise)
    hub_repo_id = create_hub_repo(args, accelerator)  # --push_to_hub: token and repo checked before training
    ds, channels = load_data(args)
    world, rank = accelerator.num_processes, accelerator.process_index
    if len(ds) < args.train_batch_size * world:
        _err("--train_batch_size", f"the data set has {len(ds)} images, fewer than one global batch "
                                   f"({args.train_batch_size} × {world} processes)")
    batches_per_epoch = len(psld_data.epoch_batches(len(ds), args.train_batch_size, world, rank, args.seed, 0))
    if args.max_train_steps is None:
        args.max_train_steps = args.num_epochs * max(1, batches_per_epoch // args.gradient_accumulation_steps)
    args.notes = [n for n in (warmup_note(args), sample_grid_size(args, world)) if n]
    set_seed(args.seed)  # model initialisation identical on every rank

    num_class_embeds = ds.num_classes + 1 if args.class_conditional else None
    # out_channels = k*C (prediction_type "epsilon") or C (the C-channel types); a UNet2DModel or an NCSN++ preset
    unet = build_unet(args.model_preset, channels, scheduler.num_components, args.resolution, num_class_embeds,
                      out_channels=scheduler.output_channels(channels))
    scheduler.check_unet(unet)
    n_params = sum(p.numel() for p in unet.parameters())
    ema = None
    if args.use_ema:
        # without warm-up the decay is fixed (min_decay = decay), as the paper's code (a constant τ = 0.9999);
        # EMAModel's own default would ramp it as min(decay, (1 + step) / (10 + step)) over ~90k steps
        ema = EMAModel(unet.parameters(), decay=args.ema_decay, use_ema_warmup=args.ema_warmup, inv_gamma=1.0,
                       power=2 / 3, min_decay=0.0 if args.ema_warmup else args.ema_decay, model_cls=type(unet),
                       model_config=unet.config)
    register_state_hooks(accelerator, ema)

    optimizer = torch.optim.Adam(unet.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                 weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    # AcceleratedScheduler steps num_processes times per optimizer step: scale the warm-up accordingly
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=args.lr_warmup_steps * world)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema is not None:
        ema.to(accelerator.device)
    return Training(args=args, accelerator=accelerator, scheduler=scheduler, ds=ds, channels=channels, unet=unet,
                    ema=ema, optimizer=optimizer, lr_scheduler=lr_scheduler, n_params=n_params,
                    public_args=public_settings(args), resume_path=resume_path, batches_per_epoch=batches_per_epoch,
                    log_path=os.path.join(args.output_dir, "train_log.jsonl"), hub_repo_id=hub_repo_id)


def create_hub_repo(args, accelerator) -> Optional[str]:
    """``--push_to_hub``: check the token and create the Hub repo (an existing one is fine) before anything
    is trained, as diffusers' training examples do; returns the repo id the Hub reports (None without
    ``--push_to_hub``). The main process asks the Hub; every process gets the outcome.

    Raises:
        ValueError: ``error: `--push_to_hub`: ...`` naming the cause (no token, offline, refused).
    """
    if not args.push_to_hub:
        return None
    from diffusers_psld import hub

    outcome = [None, None]  # repo id, error message
    if accelerator.is_main_process:
        repo_id = args.hub_model_id or Path(args.output_dir).name
        try:
            outcome = [hub.create_repo(repo_id, token=args.hub_token, private=args.hub_private_repo), None]
        except hub.HubError as err:
            outcome = [None, f"`--push_to_hub`: {err}; nothing was trained"]
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast_object_list

        broadcast_object_list(outcome)
    if outcome[1]:
        raise ValueError(outcome[1])
    return outcome[0]


def announce(t: Training):
    """The start banner and the defaults used (main process), training_args.json, the trackers."""
    args = t.args
    if t.is_main:
        print(f"diffusers-psld training: {args.diffusion} on {args.dataset_label} ({len(t.ds)} images, "
              f"{args.resolution}px, C={t.channels}, k={t.scheduler.num_components}); preset {args.model_preset} "
              f"({t.n_params:,} params); {t.world} process(es) × batch {args.train_batch_size} × accumulation "
              f"{args.gradient_accumulation_steps}; {args.max_train_steps} steps", flush=True)
        if args.defaults_used:
            why = "offline digits defaults (short CPU run)" if args.offline_digits else "paper defaults"
            print(f"{why}: " + ", ".join(f"{k}={v}" for k, v in args.defaults_used.items()), flush=True)
        for note in args.notes:
            print(note, flush=True)
        with open(os.path.join(args.output_dir, "training_args.json"), "w") as f:
            json.dump(t.public_args, f, indent=1, default=str)
    if args.report_to != "none":
        t.accelerator.init_trackers("psld", config={k: (v if isinstance(v, (int, float, str, bool)) else str(v))
                                                    for k, v in t.public_args.items()})


# ----------------------------------------------------------------------------- resume
def load_checkpoint(t: Training) -> int:
    """Load the checkpoint :func:`resolve_resume` chose (every process) and cut the loss log back to it.
    Returns the step to continue from (0 for a new run).

    Raises:
        ValueError: naming ``--resume_from_checkpoint`` when the checkpoint does not load (:func:`_load_failure`).
    """
    from diffusers_psld.training_utils import rewrite_log

    args, path = t.args, t.resume_path
    global_step = 0
    if path is None and args.resume_from_checkpoint and t.is_main:
        print("no checkpoint found in --output_dir: starting a new run", flush=True)
    if path is not None:
        try:
            t.accelerator.load_state(path)
        except Exception as err:  # noqa: BLE001  (re-raised with the checkpoint named and what its files say)
            raise ValueError(_load_failure(args, path, err)) from err
        global_step = int(CHECKPOINT_RE.match(os.path.basename(path)).group(1))
        if t.is_main:
            print(f"resumed from {path} at step {global_step}", flush=True)
    if t.is_main:
        if global_step == 0 and os.path.exists(t.log_path):
            os.remove(t.log_path)
        rewrite_log(t.log_path, global_step)
    t.accelerator.wait_for_everyone()
    return global_step


# ----------------------------------------------------------------------------- the training loop
def batches_from(t: Training, micro_index: int):
    """Endless ``(epoch, batch)`` stream of this rank from micro-batch ``micro_index`` on: the order of epoch e
    is a pure function of (seed, e), so a resumed run sees what the uninterrupted one saw."""
    import torch

    from diffusers_psld import data as psld_data

    args = t.args
    epoch, offset = divmod(micro_index, t.batches_per_epoch)
    while True:
        t.ds.set_epoch(epoch)
        idx = psld_data.epoch_batches(len(t.ds), args.train_batch_size, t.world, t.rank, args.seed, epoch)[offset:]
        loader = torch.utils.data.DataLoader(t.ds, batch_sampler=idx, collate_fn=psld_data.collate,
                                             num_workers=args.dataloader_num_workers)
        for b in loader:
            yield epoch, b
        epoch, offset = epoch + 1, 0


def train_step(t: Training, batch_iter, global_step: int):
    """One optimizer step (``--gradient_accumulation_steps`` micro-batches, gradients synchronised on the
    last): HSM loss, backward, clip, Adam, LR schedule, EMA. Returns ``(loss, logs, epoch)``, the loss averaged
    over processes and micro-batches.

    Raises:
        FloatingPointError: a non-finite loss on any process; names the step and the last good checkpoint.
    """
    import numpy as np
    import torch

    from diffusers_psld import data as psld_data
    from diffusers_psld.losses import hsm_loss
    from diffusers_psld.training_utils import step_generator

    args, acc, unet = t.args, t.accelerator, t.unet
    accum = args.gradient_accumulation_steps
    step_losses, comp = [], {}
    for micro in range(accum):
        epoch, batch = next(batch_iter)
        x0 = batch["input"].to(acc.device)
        g = step_generator(args.seed, t.rank, global_step, micro)
        labels = None
        if args.class_conditional:
            labels = batch["label"].clone()
            drop = torch.rand(labels.shape[0], generator=g) < args.cond_drop_prob
            labels[drop] = t.ds.num_classes  # the null class
            labels = labels.to(acc.device)
        if args._debug_ranks and global_step == 0 and micro == 0:
            print(f"[rank {t.rank}/{t.world}] first batch indices "
                  f"{psld_data.epoch_batches(len(t.ds), args.train_batch_size, t.world, t.rank, args.seed, 0)[0]}",
                  flush=True)
        with acc.autocast():
            loss, stats = hsm_loss(unet, t.scheduler, x0, generator=g, class_labels=labels, return_stats=True,
                                   snr_gamma=args.snr_gamma)
        if args._inject_nan_at_step == global_step + 1:
            loss = loss * float("nan")
        gathered = acc.gather(loss.detach().float().reshape(1))
        if not bool(gathered.isfinite().all()):
            ck = list_checkpoints(args.output_dir)
            raise FloatingPointError(
                f"non-finite loss ({gathered.tolist()}) at step {global_step + 1} (epoch {epoch}); training stopped. "
                f"Last good checkpoint: {ck[-1][1] if ck else 'none'}")
        step_losses.append(gathered.double().mean().item())
        for kname, v in stats.items():
            if kname.startswith("loss_"):
                comp[kname] = comp.get(kname, 0.0) + acc.gather(v.float().reshape(1)).mean().item() / accum
        if micro < accum - 1:
            with acc.no_sync(unet):
                acc.backward(loss / accum)
        else:
            acc.backward(loss / accum)
    if args.max_grad_norm is not None:
        acc.clip_grad_norm_(unet.parameters(), args.max_grad_norm)
    lr_now = t.optimizer.param_groups[0]["lr"]
    t.optimizer.step()
    t.lr_scheduler.step()
    t.optimizer.zero_grad(set_to_none=True)
    if t.ema is not None:
        t.ema.step(unet.parameters())
    loss_val = float(np.mean(step_losses))
    logs = {"loss": loss_val, "lr": lr_now, **comp}
    if t.ema is not None:
        logs["ema_decay"] = t.ema.cur_decay_value if t.ema.cur_decay_value is not None else 0.0
    return loss_val, logs, epoch


def save_samples(t: Training, step: int, progress: bool = False):
    """The sample grid with the EMA weights (main process; None elsewhere): ``samples/step-<step>.png`` and
    TensorBoard. Uses its own generator: the training trajectory does not change."""
    from diffusers_psld.training_utils import make_grid, sample_images

    if not t.is_main:
        return None
    import torch

    args = t.args
    model = t.accelerator.unwrap_model(t.unet)
    if t.ema is not None:
        t.ema.store(model.parameters())
        t.ema.copy_to(model.parameters())
    was_training = model.training
    model.eval()
    labels = (torch.arange(args.eval_batch_size) % t.ds.num_classes) if args.class_conditional else None
    x = sample_images(model, dict(t.scheduler.config), args.eval_batch_size, t.channels, args.resolution,
                      args.num_inference_steps, seed=args.seed, class_labels=labels, device=t.accelerator.device,
                      progress=progress)
    if was_training:
        model.train()
    if t.ema is not None:
        t.ema.restore(model.parameters())
    img = make_grid(x)
    os.makedirs(os.path.join(args.output_dir, "samples"), exist_ok=True)
    img.save(os.path.join(args.output_dir, "samples", f"step-{step:07d}.png"))
    if args.report_to == "tensorboard":
        tb = t.accelerator.get_tracker("tensorboard", unwrap=True)
        tb.add_images("samples", ((x.cpu() + 1) / 2).clamp(0, 1), step)
    return img


def train(t: Training, global_step: int):
    """The loop: optimizer steps from ``global_step`` to ``--max_train_steps`` with logging (progress bar,
    train_log.jsonl, trackers), checkpoints every ``--checkpointing_steps`` and sample grids every
    ``--save_images_steps``. Returns ``(global_step, last_losses, wall_seconds)``."""
    from tqdm.auto import tqdm

    from diffusers_psld import checkpoints as ckpt

    args = t.args
    batch_iter = batches_from(t, global_step * args.gradient_accumulation_steps)

    def crash_hook(step):  # test hook: a kill after the write, before the rename
        if args._crash_before_rename_at_step == step:
            def crash():
                raise RuntimeError(f"injected crash between temp write and rename at step {step}")
            return crash
        return None

    t.unet.train()
    progress = tqdm(total=args.max_train_steps, initial=global_step, disable=not t.is_main, desc="steps")
    t_start, steps_done, last_losses = time.time(), 0, []
    try:  # close the bar on any exit: an unclosed bar is printed again when it is garbage collected
        while global_step < args.max_train_steps:
            loss_val, logs, epoch = train_step(t, batch_iter, global_step)
            global_step += 1
            steps_done += 1
            last_losses = (last_losses + [loss_val])[-100:]
            progress.update(1)
            progress.set_postfix(loss=f"{loss_val:.4f}", lr=f"{logs['lr']:.2e}",
                                 steps_per_s=f"{steps_done / max(time.time() - t_start, 1e-9):.2f}")
            if t.is_main:
                with open(t.log_path, "a") as f:
                    f.write(json.dumps({"step": global_step, **logs}) + "\n")
            if args.report_to != "none":
                t.accelerator.log(logs, step=global_step)
            if global_step % args.checkpointing_steps == 0:
                ckpt.save_state(t.accelerator, args.output_dir, global_step,
                                {"epoch": epoch, "loss": loss_val, "settings": t.public_args,
                                 "versions": ckpt.library_versions()},
                                keep=args.checkpoints_total_limit, before_rename=crash_hook(global_step))
            if global_step % args.save_images_steps == 0 and global_step < args.max_train_steps:
                save_samples(t, global_step)
                t.accelerator.wait_for_everyone()
    finally:
        progress.close()
    if args._debug_ranks:
        w = t.accelerator.unwrap_model(t.unet)
        print(f"[rank {t.rank}/{t.world}] param_checksum={sum(p.double().sum().item() for p in w.parameters())!r}",
              flush=True)
    return global_step, last_losses, time.time() - t_start


# ----------------------------------------------------------------------------- final export
def export(t: Training, global_step: int, last_losses: list, wall: float):
    """Main process: the final sample grid (samples.png), the pipeline with the EMA weights, loss_curve.png,
    the model card and the Hub upload."""
    from diffusers_psld import hub
    from diffusers_psld.training_utils import plot_loss

    args = t.args
    print(f"drawing the final sample grid: {args.eval_batch_size} images × {args.num_inference_steps} steps", flush=True)
    img = save_samples(t, global_step, progress=True)
    img.save(os.path.join(args.output_dir, "samples.png"))
    model = t.accelerator.unwrap_model(t.unet)
    if t.ema is not None:
        t.ema.copy_to(model.parameters())  # the saved pipeline carries the EMA weights
    save_pipeline(model, make_scheduler(args), args.output_dir)
    plot_loss(t.log_path, os.path.join(args.output_dir, "loss_curve.png"))
    fields = card_fields(args, t.public_args, t.n_params, t.world, global_step, last_losses, wall, t.channels,
                         t.scheduler.num_components, t.ema)
    if t.hub_repo_id is not None:
        fields["repo_or_path"] = t.hub_repo_id  # as the Hub names it ('user/name')
    hub.write_model_card(args.output_dir, fields)
    print(f"done: {global_step} steps in {wall:.1f} s; pipeline, samples.png and README.md in {args.output_dir}",
          flush=True)
    if t.hub_repo_id is not None:
        try:
            hub.upload_folder(args.output_dir, t.hub_repo_id, token=args.hub_token,
                              commit_message=f"PSLD {args.diffusion} on {args.dataset_label}, step {global_step}")
        except hub.HubError as err:
            raise hub.HubError(f"`--push_to_hub`: {err}. The local files in {args.output_dir} are complete; push them "
                               f"later with: {hub.push_command(args.output_dir, t.hub_repo_id)}") from err
        print(f"pushed {args.output_dir} to the Hub repo {t.hub_repo_id}", flush=True)


def save_pipeline(unet, scheduler, output_dir: str):
    """Save as a ``PSLDPipeline`` (Diffusers layout, safetensors; the pipeline checks the UNet's channels against
    the scheduler's ``prediction_type``). Returns ``"pipeline"``."""
    from diffusers_psld.pipelines import PSLDPipeline

    PSLDPipeline(unet=unet, scheduler=scheduler).save_pretrained(output_dir, safe_serialization=True)
    return "pipeline"


def card_fields(args, public_args, n_params, world, steps, last_losses, wall, channels, k, ema) -> dict:
    import platform

    import torch

    ema_txt = "off"
    if ema is not None:
        ema_txt = f"decay {args.ema_decay}" + (" with diffusers warm-up 1-(1+step)^(-2/3)" if args.ema_warmup else " (fixed)")
    beta = f"{args.beta_min}" if args.beta_min == args.beta_max else f"linear {args.beta_min} → {args.beta_max}"
    return dict(
        diffusion=args.diffusion, dataset=args.dataset_label, resolution=args.resolution, channels=channels,
        class_note=" class-conditional (null class for classifier-free guidance)" if args.class_conditional else "",
        repo_or_path=args.hub_model_id if args.push_to_hub and args.hub_model_id else args.output_dir,
        num_inference_steps=args.num_inference_steps, num_components=k, state_channels=k * channels,
        gamma=args.gamma if args.diffusion != "vp" else "n/a", nu=args.nu if args.diffusion != "vp" else "n/a",
        beta=beta, kappa=args.kappa if args.diffusion != "vp" else "n/a",
        eps_components="ε_m only (Γ = 0)" if args.diffusion == "cld" else "all",
        prediction_type=args.prediction_type,
        input_preconditioning=f"c_in(t) = (Σ_t + σ_data² a aᵀ)^(-1/2), σ_data = {args.sigma_data}"
        if args.input_preconditioning else "none",
        snr_gamma="none" if args.snr_gamma is None else f"min-SNR-γ, γ = {args.snr_gamma}",
        sampler=("GDDIMMultistepScheduler, NFE-band defaults" if args.sampler == "gddim"
                 else f"{args.sampler}, {args.striding} striding"), model_preset=args.model_preset,
        parameters=f"{n_params:,}",
        learning_rate=args.learning_rate, adam_beta1=args.adam_beta1, adam_beta2=args.adam_beta2,
        adam_weight_decay=args.adam_weight_decay, adam_epsilon=args.adam_epsilon, lr_warmup_steps=args.lr_warmup_steps,
        max_grad_norm=args.max_grad_norm, train_batch_size=args.train_batch_size, num_processes=world,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        effective_batch=args.train_batch_size * world * args.gradient_accumulation_steps, steps=steps, ema=ema_txt,
        mixed_precision=args.mixed_precision, seed=args.seed,
        final_loss=f"{sum(last_losses) / len(last_losses):.4f}" if last_losses else "n/a",
        wall_time=f"{wall / 60:.1f} min", hardware=f"{platform.machine()} CPU ×{os.cpu_count()} ({args.num_threads} torch "
        f"thread(s)), torch {torch.__version__}" + ("" if not torch.cuda.is_available() else f", {torch.cuda.get_device_name(0)}")
        + f"; logging: {'TensorBoard + ' if args.report_to == 'tensorboard' else ''}train_log.jsonl"
        + (f" ({args.report_to_requested} was requested but is not installed)" if args.report_to_requested != args.report_to else ""),
        samples_section="## Samples\n\n![samples](samples.png)\n\nEMA weights, seed {}.".format(args.seed),
        tags=["class-conditional"] if args.class_conditional else [],
    )


# ----------------------------------------------------------------------------- main
def main(argv=None):
    """Train as the command line ``argv`` says (None: ``sys.argv``); returns ``{"global_step", "output_dir",
    "wall_s"}``. Input problems raise ``ValueError`` naming the flag (the script prints ``error: ...``)."""
    args = parse_args(argv)
    t = setup(args)
    announce(t)
    global_step = load_checkpoint(t)
    global_step, last_losses, wall = train(t, global_step)
    t.accelerator.wait_for_everyone()
    if t.is_main:
        export(t, global_step, last_losses, wall)
    t.accelerator.wait_for_everyone()
    t.accelerator.end_training()
    if t.world == 1:  # allow several in-process runs (tests)
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
    return {"global_step": global_step, "output_dir": args.output_dir, "wall_s": wall}


def cli(argv=None) -> int:
    """The command line: :func:`main`, with the errors a user can act on printed as one ``error: ...`` line
    (bad input: exit code 2; a checkpoint that could not be written or a failed Hub upload: exit code 1)."""
    from diffusers_psld.checkpoints import CheckpointError
    from diffusers_psld.hub import HubError

    try:
        main(argv)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except (CheckpointError, HubError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(cli())
