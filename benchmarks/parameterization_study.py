#!/usr/bin/env python
"""Parameterization study (issue #14 §3): can a PSLD model trained with this package beat VP at equal budget?

Trains every model of :data:`MODELS` with ``training/train_psld.py`` and the **same** budget, data and seed
(``--max_train_steps``, ``digits`` preset, batch 64, seed 0), then samples each with the samplers of
:data:`SAMPLERS` at NFE 10/20/50/100 plus a converged reference (NFE 250), and scores N = 2000 samples
against all 1797 scikit-learn digits with the offline ``DigitsFeatureNet`` features: FID **and** KID
(torchmetrics ``KernelInceptionDistance``, mean ± std over subsets). A second sampling seed repeats the NFE 10
and 20 cells; the real-data floors of both metrics come from bootstrap sets of N real digits (drawn with
replacement: only 1797 exist).

Everything is a job (training a model, or one model × sampler × NFE × seed cell), claimed with an exclusive
file and written atomically (:func:`quality_study.run_claimed_jobs`), so any number of single-thread workers
can run at once (``--worker i --num_workers n``), a killed run resumes (training from its latest checkpoint,
sampling from its finished shards), and ``--deadline_minutes`` stops starting jobs so the lowest plan tiers
are cut first. ``--report`` writes ``parameterization.{json,md,png}`` under ``benchmarks/results/``.

Models (same network preset; C-channel ones have ``out_channels = C``):

* ``vp`` — VP-SDE, ε (k = 1: the C-channel types coincide with diffusers' ``epsilon``/``sample``);
* ``cld`` — CLD (paper: ε_m loss);
* ``psld_eps`` — PSLD Γ = 0.01, the paper's 2C ε;
* ``psld_suff`` — PSLD Γ = 0.01, ``prediction_type="sufficient_epsilon"`` (C channels);
* ``psld_sample`` — PSLD Γ = 0.01, ``prediction_type="sample"`` (x̂₀, ε-equivalent SNR weight);
* ``psld_suff_pc`` — ``psld_suff`` with input preconditioning (σ_data = the data's std; ``--precond_base``
  chooses which model gets the preconditioned twin).

Example (two single-thread workers, then the report)::

    OMP_NUM_THREADS=1 python benchmarks/parameterization_study.py --work_dir outputs/param_study \\
        --feature_extractor outputs/quality/feature_extractor --worker 0 --num_workers 2 &
    OMP_NUM_THREADS=1 python benchmarks/parameterization_study.py --work_dir outputs/param_study \\
        --feature_extractor outputs/quality/feature_extractor --worker 1 --num_workers 2
    python benchmarks/parameterization_study.py --work_dir outputs/param_study \\
        --feature_extractor outputs/quality/feature_extractor --report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from typing import Dict, List, Optional

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import quality_study as qs  # noqa: E402  (sampler builders, plan parsing, job claiming)

from diffusers_psld.evaluation import fid as fidmod  # noqa: E402

MODELS: Dict[str, tuple] = {
    "vp": ("VP-SDE, ε", ["--diffusion", "vp"]),
    "cld": ("CLD, ε (paper)", ["--diffusion", "cld"]),
    "psld_eps": ("PSLD Γ=0.01, 2C ε (paper)", ["--diffusion", "psld", "--gamma", "0.01"]),
    "psld_suff": ("PSLD Γ=0.01, sufficient_epsilon", ["--diffusion", "psld", "--gamma", "0.01",
                                                       "--prediction_type", "sufficient_epsilon"]),
    "psld_sample": ("PSLD Γ=0.01, sample (x̂₀)", ["--diffusion", "psld", "--gamma", "0.01", "--prediction_type", "sample"]),
}
PRECOND_SUFFIX = "_pc"
DEFAULT_MODELS = ["vp", "cld", "psld_eps", "psld_suff", "psld_sample", "psld_suff_pc"]
# the §3 samplers; PF-Heun uses the raw model output (no projection)
SAMPLERS = ["gddim3", "sscs-qs", "em-qs", "pf-heun-us"]
SECOND_SEED = 1000
REFERENCE_NFE = 250  # the converged reference of the default plan
DEFAULT_PLAN = (f"gddim3,sscs-qs,em-qs,pf-heun-us:20;gddim3,sscs-qs,em-qs,pf-heun-us:10;"
                f"gddim3,sscs-qs,em-qs,pf-heun-us:50;gddim3,sscs-qs,em-qs,pf-heun-us:100;"
                f"gddim3,sscs-qs,em-qs,pf-heun-us:10,20@{SECOND_SEED};gddim3,pf-heun-us:{REFERENCE_NFE}")


def model_flags(name: str, sigma_data: float) -> List[str]:
    """train_psld.py flags of a model name (``<base>_pc`` = ``<base>`` with input preconditioning)."""
    if name.endswith(PRECOND_SUFFIX) and name[: -len(PRECOND_SUFFIX)] in MODELS:
        return model_flags(name[: -len(PRECOND_SUFFIX)], sigma_data) + ["--input_preconditioning", "--sigma_data",
                                                                        f"{sigma_data:.4f}"]
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; choose from {sorted(MODELS)} (+ '{PRECOND_SUFFIX}' suffix)")
    return list(MODELS[name][1])


def model_label(name: str) -> str:
    if name.endswith(PRECOND_SUFFIX) and name[: -len(PRECOND_SUFFIX)] in MODELS:
        return MODELS[name[: -len(PRECOND_SUFFIX)]][0] + " + preconditioning"
    return MODELS.get(name, (name,))[0]


def data_std(resolution: int) -> float:
    """Per-pixel std of the training digits in [-1, 1] (σ_data of the input preconditioning)."""
    from diffusers_psld.data import load_digits_dataset

    return float(load_digits_dataset(resolution=resolution).images.float().std())


# ------------------------------------------------------------------------------------------ training
def train_command(args, name: str) -> List[str]:
    return [sys.executable, os.path.join(ROOT, "training", "train_psld.py"), *model_flags(name, args.sigma_data),
            "--model_preset", args.model_preset, "--resolution", str(args.resolution),
            "--max_train_steps", str(args.train_steps), "--train_batch_size", str(args.train_batch_size),
            "--seed", str(args.train_seed), "--output_dir", os.path.join(args.work_dir, "models", name),
            "--checkpointing_steps", str(args.checkpointing_steps), "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest", "--report_to", "none", "--eval_batch_size", str(args.grid_size),
            "--num_inference_steps", str(args.grid_nfe), *args.extra_train_args]


def _train_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("psld_train_script", os.path.join(ROOT, "training", "train_psld.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def run_training(job: dict, args, log) -> dict:
    """Train one model with ``training/train_psld.py`` (in this process, output in ``logs/train_<model>.log``);
    a killed run resumes from the model's latest checkpoint."""
    import contextlib

    t0 = time.perf_counter()
    cmd = train_command(args, job["model"])
    os.makedirs(os.path.join(args.work_dir, "logs"), exist_ok=True)
    log_path = os.path.join(args.work_dir, "logs", f"train_{job['model']}.log")
    log(f"training {job['model']}: {' '.join(cmd[1:])}")
    with open(log_path, "a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
        print(f"$ {' '.join(cmd)}", flush=True)
        _train_module().main(cmd[2:])
    return {**job, "command": cmd, "wall_seconds": time.perf_counter() - t0, "log": log_path}


def trained(args, model: str) -> bool:
    return os.path.isfile(os.path.join(args.work_dir, "train_results", f"train__{model}.json"))


# ------------------------------------------------------------------------------------------ sampling
def applicable(job: dict, args) -> bool:
    """SSCS needs momentum (not VP); gDDIM needs ε_x: refused for a CLD model only with the paper's ε output."""
    if not trained(args, job["model"]):
        return False
    cfg = qs.model_config(os.path.join(args.work_dir, "models", job["model"]))
    vp = cfg.get("diffusion", "psld") == "vp"
    if job["sampler"] in qs.NEEDS_EPS_X and not vp and float(cfg.get("gamma", 0.0)) == 0.0 \
            and cfg.get("prediction_type", "epsilon") == "epsilon":
        return False
    return qs.SAMPLERS[job["sampler"]][2] or not vp


def make_sample_fn(model_dir: str, sampler: str, nfe: int):
    """``sample_fn(batch, generator) -> images [B, C, H, W] in [0, 1]``: the standard Diffusers loop with the saved
    (EMA) UNet and the sampler's scheduler built from the saved config (``prediction_type`` and input
    preconditioning carry over: ``scale_model_input`` → UNet → ``step``)."""
    from diffusers import UNet2DModel

    unet = UNet2DModel.from_pretrained(os.path.join(model_dir, "unet")).eval()
    sched = qs.SAMPLERS[sampler][1](qs.model_config(model_dir))
    k = sched.num_components
    c = sched.check_unet(unet)
    size = unet.config.sample_size

    @torch.no_grad()
    def sample_fn(batch: int, generator: torch.Generator) -> torch.Tensor:
        sched.set_timesteps(nfe)
        z = sched.sample_prior((batch, k * c, size, size), generator=generator)
        for t in sched.timesteps:
            out = unet(sched.scale_model_input(z, t), sched.model_time(t, batch)).sample
            z = sched.step(out, t, z, generator=generator).prev_sample
        if not torch.isfinite(z).all():  # a diverged sampler: count it as the worst images, not a crash
            z = torch.nan_to_num(z, nan=0.0, posinf=1.0, neginf=-1.0)
        return (z[:, :c] / 2 + 0.5).clamp(0, 1)

    return sample_fn, type(sched).__name__


def kid_gamma(real: torch.Tensor, extractor) -> float:
    """γ of KID's kernel k(x, y) = (γ xᵀy + 1)³: 1/E‖f‖² over the real features. torchmetrics' default 1/d assumes
    Inception-scale features; the offline 64-d digits features have xᵀy/d ≈ 11, where the cubic kernel is dominated
    by feature norms and the estimate by its variance."""
    fid, _, _ = fidmod.build_metrics(extractor, splits=1)
    real = fidmod.to_uint8(real)
    with torch.no_grad():
        f = torch.cat([fid.inception(real[i:i + 256]) for i in range(0, real.shape[0], 256)]).double()
    return float(1.0 / (f * f).sum(1).mean())


def compute_fid_kid(fake: torch.Tensor, real: torch.Tensor, extractor, kid_subsets: int, kid_subset_size: int,
                    seed: int = 0, gamma: Optional[float] = None) -> dict:
    """FID and KID (mean, std over ``kid_subsets`` random subsets of ``kid_subset_size``) of uint8 image sets;
    ``gamma``: KID kernel scale (:func:`kid_gamma`; None = torchmetrics' 1/d)."""
    from torchmetrics.image.kid import KernelInceptionDistance

    fake, real = fidmod.to_uint8(fake), fidmod.to_uint8(real)
    fid, _, info = fidmod.build_metrics(extractor, splits=1)
    size = min(kid_subset_size, fake.shape[0], real.shape[0])
    with warnings.catch_warnings():  # KID always warns that it buffers every feature: by design (N <= a few 1000 here)
        warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")
        kid = KernelInceptionDistance(feature=fid.inception, subsets=kid_subsets, subset_size=size, normalize=False,
                                      gamma=gamma, sync_on_compute=False)
    for x, is_real in ((real, True), (fake, False)):
        for i in range(0, x.shape[0], 256):
            fid.update(x[i:i + 256], real=is_real)
            kid.update(x[i:i + 256], real=is_real)
    state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # KID draws its subsets from the global RNG
    try:
        kid_mean, kid_std = kid.compute()
    finally:
        torch.random.set_rng_state(state)
    return {"fid": float(fid.compute()), "kid_mean": float(kid_mean), "kid_std": float(kid_std),
            "kid_subsets": kid_subsets, "kid_subset_size": size, "kid_gamma": gamma, "num_fake": int(fake.shape[0]),
            "num_real": int(real.shape[0]), "feature_extractor": info["feature_extractor"]}


def run_eval(job: dict, args, real: torch.Tensor, log) -> dict:
    t0 = time.perf_counter()
    model_dir = os.path.join(args.work_dir, "models", job["model"])
    sample_fn, sched_name = make_sample_fn(model_dir, job["sampler"], job["nfe"])
    g = qs.sample_job_shards(sample_fn, sched_name, model_dir, job, args, log)
    m = compute_fid_kid(g["images"], real, args.feature_extractor, args.kid_subsets, args.kid_subset_size, job["seed"],
                        args.kid_gamma)
    cfg = qs.model_config(model_dir)
    return {**job, **m, "scheduler": sched_name, "prediction_type": cfg.get("prediction_type", "epsilon"),
            "input_preconditioning": cfg.get("input_preconditioning", False), "num_samples": args.num_samples,
            "generation_seconds": g["seconds"], "wall_seconds": time.perf_counter() - t0,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def real_floor(args, real: torch.Tensor) -> dict:
    """What a perfect sampler gets. FID: bootstrap sets of N real digits (with replacement; only 1797 exist) vs all
    of them, which share images with the reference, so it is an optimistic floor. KID: disjoint random halves of the
    real digits (KID is unbiased, so its expectation does not depend on N; a shared image would bias the cross term
    by k(x, x)), subsets of min(kid_subset_size, half)."""
    g = torch.Generator().manual_seed(1234)
    fids, kids = [], []
    for r in range(args.floor_repeats):
        idx = torch.randint(real.shape[0], (args.num_samples,), generator=g)
        fids.append(compute_fid_kid(real[idx], real, args.feature_extractor, 1, 2, r)["fid"])
        perm = torch.randperm(real.shape[0], generator=g)
        half = real.shape[0] // 2
        kids.append(compute_fid_kid(real[perm[:half]], real[perm[half:]], args.feature_extractor, args.kid_subsets,
                                    args.kid_subset_size, r, args.kid_gamma)["kid_mean"])
    out = {"num_samples": args.num_samples, "repeats": args.floor_repeats, "kid_gamma": args.kid_gamma,
           "what": f"FID: {args.num_samples} real digits drawn with replacement from all {real.shape[0]} vs all "
                   f"(shares images: optimistic); KID: disjoint halves of the {real.shape[0]} real digits"}
    for key, vals in (("fid", fids), ("kid_mean", kids)):
        v = torch.tensor(vals, dtype=torch.float64)
        out[key] = {"values": v.tolist(), "mean": float(v.mean()), "std": float(v.std()) if len(v) > 1 else 0.0}
    return out


# ------------------------------------------------------------------------------------------ worker
def parse_study_plan(spec: str) -> List[dict]:
    """``"gddim3,pf-heun-us:20;pf-heun-us:100|psld_suff,psld_eps;gddim3:10,20@1000|vp"`` → tiers, each
    ``{"samplers", "nfes", "seed" (None = the run's seeds), "models" (None = all of --models)}``: the
    quality-study syntax (``samplers:nfes[@seed]``) plus an optional ``|model,...`` that restricts a tier to those
    models, so expensive cells (NFE 100, a second seed) go only where a comparison needs them.

    Raises ``ValueError`` for an unknown sampler or model, or a malformed tier."""
    tiers = []
    for tier in spec.split(";"):
        body, _, models = tier.partition("|")
        if ":" not in body:
            raise ValueError(f"tier {tier!r}: expected 'samplers:nfes[@seed][|model,...]'")
        try:
            (entry,) = qs.parse_plan(body)
        except ValueError as e:
            raise ValueError(f"tier {tier!r}: {e}") from None
        names = [m.strip() for m in models.split(",") if m.strip()] if models else None
        for m in names or []:
            model_flags(m, 1.0)
        tiers.append({"samplers": entry[0], "nfes": entry[1], "seed": entry[2] if len(entry) > 2 else None,
                      "models": names})
    return tiers


def _tier_text(t: dict) -> str:
    return (f"{', '.join(t['samplers'])} at NFE {', '.join(map(str, t['nfes']))}"
            + (f" (sampling seed {t['seed']})" if t["seed"] is not None else "")
            + (f" on {', '.join(t['models'])}" if t["models"] else ""))


def all_jobs(args) -> List[dict]:
    train = [{"tier": -1, "model": m, "name": f"train__{m}", "kind": "train"} for m in args.models]
    evals = []
    for seed in args.seeds:
        for i, t in enumerate(parse_study_plan(args.plan)):
            models = [m for m in args.models if t["models"] is None or m in t["models"]]
            entry = (t["samplers"], t["nfes"]) if t["seed"] is None else (t["samplers"], t["nfes"], t["seed"])
            evals += [{**j, "tier": i} for j in qs.job_list([entry], models, "unused", seed)]
    evals = list({j["name"]: j for j in reversed(evals)}.values())[::-1]
    evals.sort(key=lambda j: j["tier"])
    return train + evals


def worker(args) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t_start = time.perf_counter()
    dirs = {k: os.path.join(args.work_dir, k) for k in ("train_results", "results")}
    for d in dirs.values():
        os.makedirs(d, exist_ok=True)
    real = qs.load_real(args.resolution)
    args.kid_gamma = kid_gamma(real, args.feature_extractor)

    def log(msg):
        print(f"[worker {args.worker}/{args.num_workers} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    floor_path = os.path.join(args.work_dir, f"floor_n{args.num_samples}.json")
    if args.worker == 0 and not os.path.isfile(floor_path):
        fl = real_floor(args, real)
        with open(floor_path, "w") as f:
            json.dump(fl, f, indent=2)
        log(f"real-data floor: FID {fl['fid']['mean']:.3f} ± {fl['fid']['std']:.3f}, KID {fl['kid_mean']['mean']:.5f}")
    jobs = all_jobs(args)
    train_jobs = [j for j in jobs if j.get("kind") == "train"]
    eval_jobs = [j for j in jobs if j.get("kind") != "train"]
    # the workers take the training jobs in turn first (worker i starts at model i), then the evaluation grid
    shift = args.worker % max(1, len(train_jobs))
    train_jobs = train_jobs[shift:] + train_jobs[:shift]
    total = 0
    while True:
        n = qs.run_claimed_jobs(train_jobs, dirs["train_results"], lambda j: run_training(j, args, log),
                                lambda j: True, log, t_start, args.deadline_minutes)
        n += qs.run_claimed_jobs(eval_jobs, dirs["results"], lambda j: run_eval(j, args, real, log),
                                 lambda j: applicable(j, args), log, t_start, args.deadline_minutes,
                                 lambda r: f"FID {r['fid']:.3f} KID {r['kid_mean']:.5f}")
        total += n
        busy = any(fn.endswith(".claim") for d in dirs.values() for fn in os.listdir(d))
        late = args.deadline_minutes and time.perf_counter() - t_start > 60 * args.deadline_minutes
        if n == 0 and (not busy or late):
            break
        if n == 0:  # another worker is still training a model whose cells are left: wait for it
            time.sleep(args.poll_seconds)
    log(f"finished: {total} jobs in {time.perf_counter() - t_start:.0f} s")
    return total


# ------------------------------------------------------------------------------------------ report
def _cell(r: Optional[dict]) -> str:
    return "—" if r is None else f"{r['fid']:.2f} / {1e3 * r['kid_mean']:.2f}±{1e3 * r['kid_std']:.2f}"


def _seed_stats(fids: List[float]) -> str:
    """``mean ± sd (n seeds)`` of one cell's FIDs over sampling seeds (a single seed: just the value)."""
    if len(fids) < 2:
        return f"{fids[0]:.2f} (1 seed)"
    t = torch.tensor(fids, dtype=torch.float64)
    return f"{float(t.mean()):.2f} ± {float(t.std()):.2f} ({len(fids)} seeds)"


def _cells_at(results: List[dict], nfe: int, pred=lambda m: True) -> Dict[tuple, Dict[int, float]]:
    """``{(model, sampler): {seed: fid}}`` of the results at one NFE (models filtered by ``pred``)."""
    cells: Dict[tuple, Dict[int, float]] = {}
    for r in results:
        if r["nfe"] == nfe and pred(r["model"]):
            cells.setdefault((r["model"], r["sampler"]), {})[r["seed"]] = r["fid"]
    return cells


def _mean(fids: Dict[int, float]) -> float:
    return sum(fids.values()) / len(fids)


def _verdict(psld: Dict[int, float], vp: Dict[int, float], names: tuple = ("PSLD", "VP")) -> str:
    """Test of two cells' FIDs over sampling seeds (``{seed: fid}``; lower FID is better): paired t-test over the
    seeds both cells ran (a seed fixes the prior draws and the noise of every model of the study), Welch's t-test
    when fewer than two seeds are shared. ``names``: what to call the two cells in the verdict."""
    if len(psld) < 2 or len(vp) < 2:
        return "not decidable (a cell has one seed)"
    from scipy.stats import ttest_ind, ttest_rel

    common = sorted(set(psld) & set(vp))
    if len(common) >= 2:
        a, b = [psld[s] for s in common], [vp[s] for s in common]
        pval, test = float(ttest_rel(a, b).pvalue), f"paired over {len(common)} seeds"
    else:
        a, b = list(psld.values()), list(vp.values())
        pval, test = float(ttest_ind(a, b, equal_var=False).pvalue), "Welch"
    d = sum(b) / len(b) - sum(a) / len(a)
    if pval < 0.05:
        return f"Δ = {d:+.2f}, p = {pval:.3f} ({test}): {names[0] if d > 0 else names[1]} better beyond seed noise"
    return f"Δ = {d:+.2f}, p = {pval:.2f} ({test}): within seed noise"


def goals(results: List[dict], models: List[str], seed0: int) -> List[str]:
    """The issue's goal checks, computed from the results (t-tests over sampling seeds as the noise test)."""
    by = {(r["model"], r["sampler"], r["nfe"], r["seed"]): r for r in results}
    lines = ["## Goal checks (computed)", ""]
    lines += ["**Raw PF-ODE vs gDDIM** (PF-Heun NFE 100 with the raw model output vs gDDIM at its highest NFE run "
              "(>= 50) on the same model, as the converged value; goal: within 1.0 FID):", ""]
    for m in models:
        refs = sorted(n for (mm, s, n, sd) in by if (mm, s, sd) == (m, "gddim3", seed0) and n >= 50)
        b = by.get((m, "gddim3", refs[-1], seed0)) if refs else None
        for pf in ("pf-heun-us", "pf-heun-qs"):  # uniform (the figure) and quadratic time steps
            a = by.get((m, pf, 100, seed0))
            if a and b:
                d = a["fid"] - b["fid"]
                lines.append(f"- {model_label(m)}, {pf}: {a['fid']:.2f} vs {b['fid']:.2f} at NFE {b['nfe']} "
                             f"(Δ {d:+.2f}: {'met' if abs(d) <= 1.0 else 'not met'})")
    if not lines[-1].startswith("- "):
        lines.append("- (no model has both cells yet)")
    lines += ["", "**Best PSLD vs best VP at NFE 10 and 20** (for each, the (model, sampler) cell with the lowest mean "
              "FID over the sampling seeds it was run with; a t-test over those seeds, paired where both ran the same "
              "seeds (a seed fixes the prior draws and noise of every model): a claim holds *beyond seed noise* when "
              "p < 0.05 and each cell has >= 2 seeds):", ""]
    for nfe in (10, 20):
        def best(pred):
            cells = _cells_at(results, nfe, pred)
            return min(cells.items(), key=lambda kv: _mean(kv[1])) if cells else None
        p, v = best(lambda m: m.startswith("psld")), best(lambda m: m == "vp")
        if not (p and v):
            continue
        lines.append(f"- NFE {nfe}: PSLD {_seed_stats(list(p[1].values()))} ({model_label(p[0][0])}, {p[0][1]}) vs "
                     f"VP {_seed_stats(list(v[1].values()))} ({v[0][1]}); {_verdict(p[1], v[1])}")
    if not lines[-1].startswith("- "):
        lines.append("- (needs PSLD and VP cells at NFE 10/20)")
    lines += ["", "**Every repeated cell vs the best one at its NFE** (cells run with >= 2 sampling seeds; same test; "
              "which differences between models and samplers are real):", ""]
    for nfe in sorted({r["nfe"] for r in results}):
        rep = {k: v for k, v in _cells_at(results, nfe).items() if len(v) >= 2}
        if len(rep) < 2:
            continue
        ranked = sorted(rep.items(), key=lambda kv: _mean(kv[1]))
        (bm, bs), bf = ranked[0]
        lines.append(f"- NFE {nfe}: best {model_label(bm)}, {bs}: {_seed_stats(list(bf.values()))}")
        for (m, smp), f in ranked[1:]:
            v = _verdict(bf, f, ("the best cell", "this cell"))
            lines.append(f"  - {model_label(m)}, {smp}: {_seed_stats(list(f.values()))}; {v}")
    return lines + [""]


def _samplers_in(results: List[dict]) -> List[str]:
    """The samplers that have results: the study's own (:data:`SAMPLERS`) first, then any other a plan added."""
    have = {r["sampler"] for r in results}
    return [s for s in SAMPLERS if s in have] + sorted(have - set(SAMPLERS))


def markdown(p: dict, args) -> str:
    results, models, seed0 = p["results"], p["models"], p["main_seed"]
    lines = ["# Parameterization study: PSLD output types vs VP on digits (issue #14 §3)", ""]
    if p.get("pilot"):
        lines += [f"**PILOT, not results:** {p['pilot']}", ""]
    fl = p.get("floor")
    lines += [f"Offline `DigitsFeatureNet` features, **not comparable to published FID/KID**; N = {p['num_samples']} "
              "samples vs all 1797 digits. Cells: FID / KID×10³ (mean ± std over subsets; kernel (γxᵀy + 1)³ with "
              "γ = 1/E‖f‖² of the real features). — = not run.", ""]
    if fl:
        lines += [f"**Real-data floor at N = {fl['num_samples']}** ({fl['what']}, {fl['repeats']} draws): FID "
                  f"{fl['fid']['mean']:.2f} ± {fl['fid']['std']:.2f}, KID×10³ {1e3 * fl['kid_mean']['mean']:.2f} ± "
                  f"{1e3 * fl['kid_mean']['std']:.2f}.", ""]
    main = [r for r in results if r["seed"] == seed0]
    all_nfes = sorted({r["nfe"] for r in main})
    if all_nfes:
        lines += ["## Best sampler per model", "", "Lowest FID over the samplers run for that model at that NFE (main "
                  "seed; sampler in brackets).", "", "| model | " + " | ".join(f"NFE {n}" for n in all_nfes) + " |",
                  "|---|" + "---:|" * len(all_nfes)]
        for m in models:
            cells = []
            for n in all_nfes:
                rs = [r for r in main if r["model"] == m and r["nfe"] == n]
                b = min(rs, key=lambda r: r["fid"]) if rs else None
                cells.append("—" if b is None else f"{b['fid']:.2f} ({b['sampler']})")
            lines.append(f"| {model_label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    for s in _samplers_in(results):
        nfes = sorted({r["nfe"] for r in results if r["sampler"] == s and r["seed"] == seed0})
        if not nfes:
            continue
        lines += [f"## {s}: {qs.SAMPLERS[s][0]}", "", "| model | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
                  "|---|" + "---:|" * len(nfes)]
        for m in models:
            cells = [_cell(next((r for r in results if (r["model"], r["sampler"], r["nfe"], r["seed"]) == (m, s, n, seed0)),
                                None)) for n in nfes]
            lines.append(f"| {model_label(m)} | " + " | ".join(cells) + " |")
        lines.append("")
    extra = sorted({r["seed"] for r in results} - {seed0})
    if extra:
        lines += ["## Other sampling seeds", "", "FID / KID×10³ per sampling seed, and the FID's mean ± sd over the seeds "
                  "run (the sampling noise of one cell).", "", "| model | sampler | NFE | " +
                  " | ".join(f"seed {s}" for s in [seed0] + extra) + " | FID over seeds |",
                  "|---|---|---:|" + "---:|" * (2 + len(extra))]
        for k in sorted({(r["model"], r["sampler"], r["nfe"]) for r in results if r["seed"] in extra}):
            rs = [next((r for r in results if (r["model"], r["sampler"], r["nfe"], r["seed"]) == (*k, s)), None)
                  for s in [seed0] + extra]
            stats = _seed_stats([r["fid"] for r in rs if r is not None])
            lines.append(f"| {model_label(k[0])} | {k[1]} | {k[2]} | " + " | ".join(map(_cell, rs)) + f" | {stats} |")
        lines.append("")
    lines += goals(results, models, seed0)
    if p.get("training"):
        lines += ["## Training (same budget for every model)", "", "wall s = the last training session only (a run resumed "
                  "from a checkpoint counts only its last part; machine shared with other jobs).", "",
                  "| model | command | wall s |", "|---|---|---:|"]
        for m in models:
            t = p["training"].get(m)
            if t:
                cmd = " ".join(os.path.relpath(x, ROOT) if os.path.isabs(x) else x for x in t["command"][1:])
                lines.append(f"| {model_label(m)} | `{cmd}` | {t['wall_seconds']:.0f} |")
        lines.append("")
    lines += ["## Plan (priority tiers; the last were cut first)", ""]
    for i, t in enumerate(parse_study_plan(p["plan"])):
        lines.append(f"{i}. {_tier_text(t)}")
    lines += ["", f"Machine: {p['machine']}.", ""]
    if p.get("commands"):
        lines += ["## Commands", "", "```bash", *p["commands"], "```", ""]
    return "\n".join(lines)


def plot(p: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = [r for r in p["results"] if r["seed"] == p["main_seed"]]
    samplers = _samplers_in(results)
    if not samplers:
        return
    fig, axes = plt.subplots(2, len(samplers), figsize=(3.8 * len(samplers), 6.4), squeeze=False)
    for col, s in enumerate(samplers):
        for row, (key, label) in enumerate((("fid", "offline FID"), ("kid_mean", "offline KID"))):
            ax = axes[row, col]
            for i, m in enumerate(p["models"]):
                pts = sorted((r["nfe"], r[key], r.get("kid_std", 0.0) if key == "kid_mean" else 0.0)
                             for r in results if r["sampler"] == s and r["model"] == m)
                if pts:
                    x, y, e = zip(*pts)
                    ax.errorbar(x, y, yerr=e, fmt="o-", ms=3, label=model_label(m), capsize=2,
                                color=f"C{i % 10}")  # one colour per model in every panel
            fl = (p.get("floor") or {}).get(key)
            if fl and fl["mean"] - fl["std"] > 0:
                ax.axhspan(fl["mean"] - fl["std"], fl["mean"] + fl["std"], color="k", alpha=0.12)
            elif fl and fl["mean"] + fl["std"] > 0:  # KID's floor is ~0: dashed line at its mean + std
                ax.axhline(fl["mean"] + fl["std"], color="k", ls="--", lw=0.8, alpha=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = sorted({r["nfe"] for r in results if r["sampler"] == s})
            ax.set_xticks(ticks)
            ax.set_xticklabels([str(x) for x in ticks])
            ax.minorticks_off()
            ax.set_title(s, fontsize=9)
            ax.set_xlabel("NFE")
            ax.set_ylabel(label)
            ax.grid(alpha=0.3, which="both")
    handles = {}
    for ax in axes.flat:  # one legend for the figure: every model that appears in any panel
        for h, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, h)
    fig.legend(handles.values(), handles.keys(), loc="lower center", ncol=min(6, max(1, len(handles))), fontsize=7)
    fig.suptitle(f"digits, N={p['num_samples']}: metric vs NFE per model (grey band / dashed: real-data floor ± std)",
                 fontsize=10)
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_report(args) -> dict:
    results = qs.collect(args.work_dir)
    floor_path = os.path.join(args.work_dir, f"floor_n{args.num_samples}.json")
    training = {}
    for m in args.models:
        f = os.path.join(args.work_dir, "train_results", f"train__{m}.json")
        if os.path.isfile(f):
            training[m] = json.load(open(f))
    payload = {"results": results, "main_seed": args.seeds[0], "models": args.models, "num_samples": args.num_samples,
               "floor": json.load(open(floor_path)) if os.path.isfile(floor_path) else None, "training": training,
               "plan": args.plan, "pilot": args.pilot, "commands": args.commands,
               "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    with open(args.out_md, "w") as f:
        f.write(markdown(payload, args))
    if args.out_png:
        plot(payload, args.out_png)
    return payload


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work_dir", default="outputs/param_study", help="models/, samples/, results/, logs/")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--precond_base", default=None,
                   help="replace the preconditioned model of --models by <this>_pc (e.g. psld_sample)")
    p.add_argument("--feature_extractor", default="outputs/quality/feature_extractor")
    # training budget (identical for every model)
    p.add_argument("--train_steps", type=int, default=3000)
    p.add_argument("--train_batch_size", type=int, default=64)
    p.add_argument("--train_seed", type=int, default=0)
    p.add_argument("--model_preset", default="digits")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--checkpointing_steps", type=int, default=500)
    p.add_argument("--sigma_data", type=float, default=None, help="σ_data of the preconditioned model (default: data std)")
    p.add_argument("--grid_size", type=int, default=16, help="images in each model's samples.png")
    p.add_argument("--grid_nfe", type=int, default=50)
    p.add_argument("--extra_train_args", nargs=argparse.REMAINDER, default=[], help="passed to train_psld.py (last)")
    # evaluation
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--shard_size", type=int, default=250)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base sampling seeds (first = main tables)")
    p.add_argument("--plan", default=DEFAULT_PLAN,
                   help="'samplers:nfes[@seed][|model,...];...' priority tiers (see parse_study_plan)")
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--floor_repeats", type=int, default=5)
    # workers
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--deadline_minutes", type=float, default=None)
    p.add_argument("--poll_seconds", type=float, default=30.0)
    # report
    p.add_argument("--report", action="store_true")
    p.add_argument("--pilot", default=None, help="mark the report as a pilot, with this note")
    p.add_argument("--commands", nargs="*", default=[], help="command lines to list in the report")
    p.add_argument("--out_json", default=os.path.join(HERE, "results", "parameterization.json"))
    p.add_argument("--out_md", default=os.path.join(HERE, "results", "parameterization.md"))
    p.add_argument("--out_png", default=os.path.join(HERE, "results", "parameterization.png"))
    args = p.parse_args(argv)
    for flag in ("train_steps", "train_batch_size", "num_samples", "shard_size", "kid_subsets", "kid_subset_size",
                 "floor_repeats", "checkpointing_steps"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be >= 1, got {getattr(args, flag)}")
    if not 0 <= args.worker < args.num_workers:
        p.error("--worker must be in [0, --num_workers)")
    if args.precond_base:
        model_flags(args.precond_base, 1.0)
        args.models = [m for m in args.models if not m.endswith(PRECOND_SUFFIX)] + [args.precond_base + PRECOND_SUFFIX]
    for m in args.models:
        model_flags(m, 1.0)
    try:
        parse_study_plan(args.plan)
    except ValueError as e:
        p.error(f"--plan: {e}")
    if args.sigma_data is None:
        args.sigma_data = data_std(args.resolution)
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return write_report(args)
    return worker(args)


if __name__ == "__main__":
    main()
