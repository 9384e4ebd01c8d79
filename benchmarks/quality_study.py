#!/usr/bin/env python
"""Quality study (issue #6 §2): offline FID vs NFE for VP, CLD and PSLD (several Γ) on digits.

Loops over models × samplers × NFE in a priority order (``--plan``), samples each combination with
``PSLDPipeline.from_pretrained`` + a scheduler swap, computes FID / IS with the offline
``DigitsFeatureNet`` features (``diffusers_psld.evaluation``) against all 1797 scikit-learn digits, and
writes one JSON per finished job under ``<work_dir>/results/`` (resumable: finished jobs are skipped,
sample shards are reused). Several workers may run at once (``--worker i --num_workers n``); each job
is claimed with an exclusive ``.claim`` file. ``--deadline_minutes`` stops starting new jobs after that
wall time, so what does not fit is left out systematically (lowest tiers last) and shows as "—".

``--report`` merges the per-job results into ``quality.json``, ``quality.md`` and the FID-vs-NFE plot.

Example (the commands used for ``benchmarks/results/quality.md`` are listed there)::

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/quality_study.py --models_dir outputs/quality/models \\
        --feature_extractor outputs/quality/feature_extractor --work_dir outputs/quality/eval \\
        --num_samples 256 --worker 0 --num_workers 2
    python benchmarks/quality_study.py --models_dir outputs/quality/models --work_dir outputs/quality/eval \\
        --feature_extractor outputs/quality/feature_extractor --report
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

from diffusers_psld.evaluation import fid as fidmod  # noqa: E402

DEFAULT_MODELS = ["vp", "cld", "psld_g0.005", "psld_g0.01", "psld_g0.02", "psld_g0.25"]
MODEL_LABELS = {"vp": "VP-SDE", "cld": "CLD (Γ=0)", "psld_g0.005": "PSLD Γ=0.005", "psld_g0.01": "PSLD Γ=0.01",
                "psld_g0.02": "PSLD Γ=0.02", "psld_g0.25": "PSLD Γ=0.25"}


# ------------------------------------------------------------------------------------------ samplers
def _psld(sampler: str, striding: str, project_eps: bool = False):
    def build(config):
        from diffusers_psld.schedulers import PSLDScheduler

        return PSLDScheduler.from_config(config, sampler=sampler, striding=striding, project_eps=project_eps)
    return build


def _sscs(striding: str, project_eps: bool = False):
    def build(config):
        from diffusers_psld.schedulers import SSCSScheduler

        return SSCSScheduler.from_config(config, sampler="sscs", striding=striding, project_eps=project_eps)
    return build


def _conjugate(b: str, striding: str, project_eps: bool = False):
    def build(config):
        from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler

        return ConjugateScheduler.from_config(config, sampler="conjugate", conjugate_b=b, striding=striding,
                                              project_eps=project_eps)
    return build


def _gddim(order: int):
    def build(config):
        from diffusers_psld.schedulers import GDDIMMultistepScheduler

        return GDDIMMultistepScheduler.from_config(config, sampler="gddim_multistep", solver_order=order)
    return build


def _splitting(sampler: str, striding: str, project_eps: bool = False):
    def build(config):
        from diffusers_psld.schedulers.scheduling_splitting import SplittingScheduler

        return SplittingScheduler.from_config(config, sampler=sampler, striding=striding, project_eps=project_eps)
    return build


# name -> (description, builder(config) -> scheduler, applies to VP?)
SAMPLERS: Dict[str, Tuple[str, Callable, bool]] = {
    "em-us": ("Euler-Maruyama, uniform striding", _psld("em", "uniform"), True),
    "em-qs": ("Euler-Maruyama, quadratic striding", _psld("em", "quadratic"), True),
    "sscs-us": ("SSCS, uniform striding", _sscs("uniform"), False),
    "sscs-qs": ("SSCS, quadratic striding", _sscs("quadratic"), False),
    "pf-heun-qs": ("probability-flow ODE, Heun (2 NFE/step), quadratic striding", _psld("pf_heun", "quadratic"), True),
    "pf-heun-us": ("probability-flow ODE, Heun (2 NFE/step), uniform striding", _psld("pf_heun", "uniform"), True),
    "conj0-qs": ("exponential (conjugate, B=0) integrator, quadratic striding; DDIM for VP",
                 _conjugate("zero", "quadratic"), True),
    "rvv-qs": ("reduced velocity-Verlet splitting (1 NFE/step), quadratic striding", _splitting("rvv", "quadratic"),
               False),
    # "-pe": project_eps=True (the consistent ε' = L⁻¹(z - a x̂₀)); the identity for VP, refused for CLD
    "pf-heun-us-pe": ("probability-flow ODE, Heun, uniform striding, projected ε", _psld("pf_heun", "uniform", True),
                      False),
    "em-us-pe": ("Euler-Maruyama, uniform striding, projected ε", _psld("em", "uniform", True), False),
    "em-qs-pe": ("Euler-Maruyama, quadratic striding, projected ε", _psld("em", "quadratic", True), False),
    "sscs-us-pe": ("SSCS, uniform striding, projected ε", _sscs("uniform", True), False),
    "sscs-qs-pe": ("SSCS, quadratic striding, projected ε", _sscs("quadratic", True), False),
    "conj0-qs-pe": ("exponential (conjugate, B=0) integrator, quadratic striding, projected ε",
                    _conjugate("zero", "quadratic", True), False),
    "rvv-qs-pe": ("reduced velocity-Verlet splitting, quadratic striding, projected ε", _splitting("rvv", "quadratic", True),
                  False),
    "gddim3": ("deterministic multistep exponential integrator in gDDIM's basis (order 3, power-2.5 grid; "
               "DPM-Solver++(3M)-like; not for CLD: needs ε_x)", _gddim(3), True),
}
# samplers that need a learned ε_x, which a CLD (Γ = 0) network does not have
NEEDS_EPS_X = {"gddim3", "conj0-qs-pe", "rvv-qs-pe", "pf-heun-us-pe", "em-us-pe", "em-qs-pe", "sscs-us-pe", "sscs-qs-pe"}

# Priority tiers: (samplers, NFEs[, sampling seed]); every applicable model gets a tier before the next
# tier starts. A tier with its own seed repeats jobs with other sample seeds (sampling noise of FID).
DEFAULT_PLAN = [
    (["em-us", "sscs-qs"], [50]),
    (["em-qs", "sscs-us"], [50]),
    (["em-us", "sscs-qs"], [20, 100]),
    (["em-qs", "sscs-us"], [20, 100]),
    (["pf-heun-us"], [100]),
    (["gddim3"], [20, 50]),
    (["em-us", "sscs-qs"], [250]),
    (["sscs-qs"], [50], 1000),
    (["em-us"], [100], 1000),
    (["gddim3"], [100]),
    (["pf-heun-us"], [250]),
    (["em-qs", "sscs-us"], [250]),
    (["pf-heun-us"], [20, 50]),
    (["gddim3"], [250]),
    (["em-us", "sscs-qs"], [1000]),
    (["em-qs", "sscs-us"], [1000]),
    (["pf-heun-us"], [1000]),
    (["gddim3"], [1000]),
    (["pf-heun-us-pe"], [20, 50, 100, 250]),  # PSLD only; Γ = 0.01 SDE "-pe" spot checks: see the report's commands
    (["pf-heun-us-pe"], [1000]),
    (["conj0-qs", "rvv-qs"], [20, 50]),
    (["conj0-qs", "rvv-qs"], [100]),
    (["conj0-qs", "rvv-qs"], [250]),
    (["conj0-qs", "rvv-qs"], [1000]),
    (["conj0-qs-pe", "rvv-qs-pe"], [20, 50]),  # PSLD only (NEEDS_EPS_X; the VP flag is False)
    (["conj0-qs-pe", "rvv-qs-pe"], [100]),
    (["conj0-qs-pe", "rvv-qs-pe"], [250]),
    (["conj0-qs-pe", "rvv-qs-pe"], [1000]),
]


def parse_plan(spec: Optional[str]):
    """``"em-us:50;em-qs,sscs-us:20,50;em-us:50@1000"`` → tiers (``@seed``: that tier's sampling seed);
    ``None`` → :data:`DEFAULT_PLAN`."""
    if not spec:
        return DEFAULT_PLAN
    plan = []
    for tier in spec.split(";"):
        s, n = tier.split(":")
        seed = None
        if "@" in n:
            n, seed = n.split("@")
            seed = int(seed)
        samplers = [x.strip() for x in s.split(",") if x.strip()]
        for x in samplers:
            if x not in SAMPLERS:
                raise ValueError(f"unknown sampler {x!r}; choose from {sorted(SAMPLERS)}")
        nfes = [int(v) for v in n.split(",")]
        plan.append((samplers, nfes) if seed is None else (samplers, nfes, seed))
    return plan


def model_config(model_dir: str) -> dict:
    with open(os.path.join(model_dir, "scheduler", "scheduler_config.json")) as f:
        return json.load(f)


def model_diffusion(model_dir: str) -> str:
    return model_config(model_dir).get("diffusion", "psld")


def job_list(plan, models: List[str], models_dir: str, seed: int) -> List[dict]:
    jobs, seen = [], set()
    for tier, entry in enumerate(plan):
        samplers, nfes = entry[0], entry[1]
        tseed = entry[2] if len(entry) > 2 else seed
        for nfe in nfes:
            for sampler in samplers:
                for m in models:
                    key = (m, sampler, nfe, tseed)
                    if key in seen:
                        continue
                    seen.add(key)
                    jobs.append({"tier": tier, "model": m, "sampler": sampler, "nfe": nfe, "seed": tseed,
                                 "name": f"{m}__{sampler}__nfe{nfe}__seed{tseed}"})
    return jobs


def applicable(job: dict, models_dir: str) -> bool:
    d = os.path.join(models_dir, job["model"])
    if not os.path.isfile(os.path.join(d, "model_index.json")):
        return False
    cfg = model_config(d)
    diffusion = cfg.get("diffusion", "psld")
    if job["sampler"] in NEEDS_EPS_X and diffusion == "psld" and float(cfg.get("gamma", 0.0)) == 0.0:
        return False
    return SAMPLERS[job["sampler"]][2] or diffusion != "vp"


# ------------------------------------------------------------------------------------------ one job
def make_sample_fn(model_dir: str, sampler: str, nfe: int, compile_unet: bool = False):
    from diffusers_psld.pipelines import PSLDPipeline

    pipe = PSLDPipeline.from_pretrained(model_dir)
    pipe.scheduler = SAMPLERS[sampler][1](pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    pipe.unet.eval()
    if compile_unet:  # fp32 still; only the kernel schedule changes (images agree to ~5e-6 on [0, 1])
        pipe.unet = torch.compile(pipe.unet)

    @torch.no_grad()
    def sample_fn(batch_size, generator):
        return pipe(batch_size=batch_size, generator=generator, num_inference_steps=nfe, output_type="np").images

    return sample_fn, type(pipe.scheduler).__name__


def job_fingerprint(model_dir: str, job: dict, sched_name: str) -> dict:
    """What a job's sample shards come from (stored in every shard; a shard of other settings is refused, see
    :func:`diffusers_psld.evaluation.fid.generate_shards`): the weights' SHA-256, scheduler class, sampler, NFE."""
    return {"weights_sha256": fidmod.weights_sha256(model_dir), "scheduler": sched_name, "sampler": job["sampler"],
            "num_inference_steps": int(job["nfe"])}


def sample_job_shards(sample_fn, sched_name: str, model_dir: str, job: dict, args, log) -> dict:
    """Generate (or reuse identical) shards of ``job`` and load them: ``load_shards``' dict plus ``"generated"``."""
    fp = job_fingerprint(model_dir, job, sched_name)
    sample_dir = os.path.join(args.work_dir, "samples", job["name"])
    stats = fidmod.generate_shards(sample_fn, sample_dir, args.num_samples, args.shard_size, job["seed"], log=log,
                                   fingerprint=fp)
    g = fidmod.load_shards(sample_dir, args.num_samples, args.shard_size, fingerprint=fp, base_seed=job["seed"])
    return {**g, "generated": stats["generated"]}


def run_job(job: dict, args, real: torch.Tensor, log) -> dict:
    t0 = time.perf_counter()
    model_dir = os.path.join(args.models_dir, job["model"])
    sample_fn, sched_name = make_sample_fn(model_dir, job["sampler"], job["nfe"], args.compile)
    g = sample_job_shards(sample_fn, sched_name, model_dir, job, args, log)
    m = fidmod.compute_fid_is(g["images"], real, args.feature_extractor, batch_size=256, splits=10, seed=job["seed"])
    return {**job, "scheduler": sched_name, "sampler_description": SAMPLERS[job["sampler"]][0],
            "fid": m["fid"], "is_mean": m["is_mean"], "is_std": m["is_std"], "num_samples": args.num_samples,
            "num_real": m["num_real"], "generation_seconds": g["seconds"], "shards_generated": len(g["generated"]),
            "wall_seconds": time.perf_counter() - t0, "feature_extractor": m["feature_extractor"],
            "compiled_unet": bool(getattr(args, "compile", False)),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def noise_floor(args, real: torch.Tensor, repeats: int = 10) -> dict:
    """FID of N random real digits (no model) vs the full reference: the FID a perfect sampler gets at this N."""
    g = torch.Generator().manual_seed(1234)
    vals = []
    for _ in range(repeats):
        idx = torch.randperm(real.shape[0], generator=g)[: args.num_samples]
        vals.append(fidmod.compute_fid_is(real[idx], real, args.feature_extractor, splits=10)["fid"])
    t = torch.tensor(vals)
    return {"num_samples": args.num_samples, "repeats": repeats, "fid_values": vals, "mean": float(t.mean()),
            "std": float(t.std()), "min": float(t.min()), "max": float(t.max()),
            "what": f"FID of {args.num_samples} random real digits (subset, no model) vs all {real.shape[0]} digits"}


def load_real(resolution: int = 16) -> torch.Tensor:
    from diffusers_psld.evaluation.features import load_digits_images

    imgs, _ = load_digits_images(resolution, channels=1)
    return imgs


def run_claimed_jobs(jobs: List[dict], res_dir: str, run: Callable[[dict], dict], is_applicable: Callable[[dict], bool],
                     log: Callable[[str], None], t_start: float, deadline_minutes: Optional[float] = None,
                     summary: Callable[[dict], str] = lambda r: "") -> int:
    """Run ``jobs`` in order, each at most once across workers: a job whose ``<res_dir>/<name>.json`` exists is
    done; one is claimed with an exclusive ``.claim`` file; its result is written atomically. Stops starting jobs
    after ``deadline_minutes`` (from ``t_start``, a ``time.perf_counter()`` value). Returns the jobs run here."""
    done = 0
    for job in jobs:
        if deadline_minutes and (time.perf_counter() - t_start) > 60 * deadline_minutes:
            log("deadline reached: no new jobs")
            break
        out = os.path.join(res_dir, job["name"] + ".json")
        if os.path.isfile(out) or not is_applicable(job):
            continue
        claim = out[:-5] + ".claim"
        try:
            fd = os.open(claim, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.close(fd)
        except FileExistsError:
            continue
        try:
            log(f"start {job['name']} (tier {job['tier']})")
            r = run(job)
            tmp = out + f".tmp{os.getpid()}"
            with open(tmp, "w") as f:
                json.dump(r, f, indent=2)
            os.replace(tmp, out)
            log(f"done {job['name']}: {summary(r)} in {r.get('wall_seconds', 0.0):.0f} s")
            done += 1
        finally:
            if os.path.exists(claim):
                os.remove(claim)
    return done


def worker(args) -> int:
    if args.num_threads:
        torch.set_num_threads(args.num_threads)
    t_start = time.perf_counter()
    res_dir = os.path.join(args.work_dir, "results")
    os.makedirs(res_dir, exist_ok=True)
    real = load_real(args.resolution)

    def log(msg):
        print(f"[worker {args.worker}/{args.num_workers} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    nf_path = os.path.join(args.work_dir, f"noise_floor_n{args.num_samples}.json")
    if args.worker == 0 and not os.path.isfile(nf_path):
        nf = noise_floor(args, real, args.noise_floor_repeats)
        with open(nf_path, "w") as f:
            json.dump(nf, f, indent=2)
        log(f"noise floor: FID {nf['mean']:.3f} ± {nf['std']:.3f} ({nf['what']})")

    jobs = []
    for seed in args.seeds:
        jobs += job_list(parse_plan(args.plan), args.models, args.models_dir, seed)
    jobs = list({j["name"]: j for j in reversed(jobs)}.values())[::-1]  # de-duplicate, keep the first
    jobs.sort(key=lambda j: j["tier"])  # stable: seed order within a tier
    done = run_claimed_jobs(jobs, res_dir, lambda job: run_job(job, args, real, log),
                            lambda job: applicable(job, args.models_dir), log, t_start, args.deadline_minutes,
                            lambda r: f"FID {r['fid']:.3f}")
    log(f"finished: {done} jobs in {time.perf_counter() - t_start:.0f} s")
    return done


# ------------------------------------------------------------------------------------------ report
def collect(work_dir: str) -> List[dict]:
    res_dir = os.path.join(work_dir, "results")
    out = []
    if os.path.isdir(res_dir):
        for fn in sorted(os.listdir(res_dir)):
            if fn.endswith(".json"):
                with open(os.path.join(res_dir, fn)) as f:
                    out.append(json.load(f))
    return out


def training_info(models_dir: str, models: List[str], logs_dir: Optional[str] = None) -> Dict[str, dict]:
    info = {}
    for m in models:
        d = os.path.join(models_dir, m)
        row = {}
        try:
            with open(os.path.join(d, "training_args.json")) as f:
                a = json.load(f)
            row.update({k: a.get(k) for k in ("diffusion", "gamma", "nu", "max_train_steps", "train_batch_size",
                                              "learning_rate", "lr_warmup_steps", "seed", "model_preset")})
        except (OSError, ValueError):
            pass
        try:
            with open(os.path.join(d, "train_log.jsonl")) as f:
                lines = [json.loads(x) for x in f if x.strip()]
            for key in ("loss", "loss_eps_x", "loss_eps_m"):
                tail = [x[key] for x in lines if key in x][-50:]
                if tail:
                    row[f"final_{key}_mean_last50"] = sum(tail) / len(tail)
        except (OSError, ValueError):
            pass
        log = os.path.join(logs_dir, f"train_{m}.log") if logs_dir else None
        if log and os.path.isfile(log):
            import re

            hit = re.findall(r"done: (\d+) steps in ([0-9.]+) s", open(log, errors="replace").read())
            if hit:
                row["train_seconds"] = float(hit[-1][1])
        info[m] = row
    return info


def write_report(args) -> dict:
    results = collect(args.work_dir)
    nf_path = os.path.join(args.work_dir, f"noise_floor_n{args.num_samples}.json")
    nf = json.load(open(nf_path)) if os.path.isfile(nf_path) else None
    meta = {}
    if args.meta and os.path.isfile(args.meta):
        with open(args.meta) as f:
            meta = json.load(f)
    train = training_info(args.models_dir, args.models, args.train_logs_dir) if os.path.isdir(args.models_dir) else {}
    plan = parse_plan(args.plan)
    payload = {"results": results, "main_seed": args.seeds[0], "noise_floor": nf, "training": train, "meta": meta,
               "num_samples": args.num_samples, "models": args.models,
               "plan": [{"samplers": e[0], "nfe": e[1], "seed": e[2] if len(e) > 2 else args.seeds[0]} for e in plan],
               "machine": f"{platform.machine()} {os.cpu_count()} CPUs (shared), torch {torch.__version__}"}
    os.makedirs(os.path.dirname(os.path.abspath(args.out_json)), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(payload, f, indent=2, default=str)
    with open(args.out_md, "w") as f:
        f.write(markdown(payload, args))
    if args.out_png:
        plot(payload, args.out_png)
    return payload


def _f(v) -> str:
    return "—" if v is None else f"{v:.4f}"


def _best_runs(results) -> Dict[Tuple[str, int], dict]:
    """(model, NFE) -> the run with the lowest FID among ``results``."""
    best = {}
    for r in results:
        k = (r["model"], r["nfe"])
        if k not in best or r["fid"] < best[k]["fid"]:
            best[k] = r
    return best


def _fid_grid(by: Dict[Tuple[str, int], dict], models, nfes, with_sampler: bool = False) -> List[str]:
    """Markdown table model × NFE of ``by[(model, nfe)]["fid"]``; bold = best model in the column."""
    lines = ["| model | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|" + "---:|" * len(nfes)]
    for m in models:
        cells = []
        for n in nfes:
            r = by.get((m, n))
            if r is None:
                cells.append("—")
                continue
            col = [by[(mm, n)]["fid"] for mm in models if (mm, n) in by]
            v = f"{r['fid']:.2f}"
            cell = f"**{v}**" if r["fid"] == min(col) and len(col) > 1 else v
            cells.append(cell + (f" ({r['sampler']})" if with_sampler else ""))
        lines.append(f"| {MODEL_LABELS.get(m, m)} | " + " | ".join(cells) + " |")
    return lines


def _table(results, models, sampler, nfes, seed) -> List[str]:
    by = {(r["model"], r["nfe"]): r for r in results if r["sampler"] == sampler and r["seed"] == seed}
    return _fid_grid(by, models, nfes)


def _best_table(results, models, seed) -> List[str]:
    """Per model and NFE, the best FID over samplers (bold: the best model at that NFE)."""
    rs = [r for r in results if r["seed"] == seed]
    nfes = sorted({r["nfe"] for r in rs})
    return _fid_grid(_best_runs(rs), models, nfes, with_sampler=True) if nfes else []


def markdown(p: dict, args) -> str:
    results, models = p["results"], p["models"]
    seed0 = args.seeds[0]
    nf = p["noise_floor"]
    lines = ["# Quality study: offline FID vs NFE on digits (issue #6 §2)", ""]
    if p["meta"].get("summary"):
        lines += [p["meta"]["summary"], ""]
    lines += ["FID uses the offline `DigitsFeatureNet` features (64-d), **not comparable to published FIDs**; "
              f"N = {p['num_samples']} generated samples vs all 1797 scikit-learn digits (16 px). "
              "Bold = best model at that NFE for that sampler. — = not run (cut for compute; see plan).", ""]
    if nf:
        lines += [f"**FID noise floor at N = {nf['num_samples']}:** {nf['mean']:.2f} ± {nf['std']:.2f} "
                  f"(range {nf['min']:.2f}–{nf['max']:.2f}; {nf['what']}, {nf['repeats']} subsets).", ""]
    best = _best_table(results, models, seed0)
    if best:
        lines += ["## Best sampler per model at equal NFE", "",
                  "Lowest FID over all samplers run for that model at that NFE (sampler in brackets). "
                  "SSCS does not apply to VP; gddim3 does not apply to CLD.", ""] + best + [""]
    used = [s for s in SAMPLERS if any(r["sampler"] == s and r["seed"] == seed0 for r in results)]
    for s in used:
        nfes = sorted({r["nfe"] for r in results if r["sampler"] == s and r["seed"] == seed0})
        lines += [f"## {s}: {SAMPLERS[s][0]}", ""] + _table(results, models, s, nfes, seed0) + [""]
    extra = sorted({r["seed"] for r in results} - {seed0})
    if extra:
        lines += ["## Sampling-seed repeats (same model, same sampler, different sample seeds)", "",
                  "| model | sampler | NFE | " + " | ".join(f"seed {s}" for s in [seed0] + extra) + " |",
                  "|---|---|---:|" + "---:|" * (1 + len(extra))]
        keys = sorted({(r["model"], r["sampler"], r["nfe"]) for r in results if r["seed"] in extra})
        for k in keys:
            vals = []
            for s in [seed0] + extra:
                r = next((r for r in results if (r["model"], r["sampler"], r["nfe"], r["seed"]) == (*k, s)), None)
                vals.append(f"{r['fid']:.2f}" if r else "—")
            lines.append(f"| {MODEL_LABELS.get(k[0], k[0])} | {k[1]} | {k[2]} | " + " | ".join(vals) + " |")
        lines.append("")
    if p["training"]:
        lines += ["## Training (identical budget for every model)", "",
                  "| model | diffusion | Γ | ν | steps | batch | lr | seed | final loss (mean of last 50 steps) "
                  "| of which ε_x | ε_m | train wall s |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for m in models:
            t = p["training"].get(m, {})
            fl, tw = t.get("final_loss_mean_last50"), t.get("train_seconds")
            lines.append(f"| {MODEL_LABELS.get(m, m)} | {t.get('diffusion', '?')} | {t.get('gamma', '')} | "
                         f"{t.get('nu', '')} | {t.get('max_train_steps', '?')} | {t.get('train_batch_size', '?')} | "
                         f"{t.get('learning_rate', '?')} | {t.get('seed', '?')} | "
                         f"{'?' if fl is None else f'{fl:.4f}'} | {_f(t.get('final_loss_eps_x_mean_last50'))} | "
                         f"{_f(t.get('final_loss_eps_m_mean_last50'))} | {'?' if tw is None else f'{tw:.0f}'} |")
        lines += ["", "The training losses are **not comparable across diffusions** (VP regresses one ε per pixel, "
                  "CLD only ε_m, PSLD both ε_x and ε_m, each with a different noise-level distribution); compare "
                  "them only between the PSLD Γ values, and even there Γ changes the target.", ""]
    wall = {}
    for r in results:
        wall.setdefault(r["sampler"], []).append(r["generation_seconds"] / (r["nfe"] * r["num_samples"]) * 1e3)
    if wall:
        lines += ["## Evaluation cost", "", "| sampler | jobs | ms per (sample · NFE), median |", "|---|---:|---:|"]
        for s, v in wall.items():
            v = sorted(v)
            lines.append(f"| {s} | {len(v)} | {v[len(v) // 2]:.2f} |")
        tot = sum(r["wall_seconds"] for r in results)
        lines += ["", f"Total evaluation wall time (sum over jobs; workers ran in parallel): {tot / 60:.1f} min.", ""]
    if p["meta"].get("sections"):
        for title, body in p["meta"]["sections"]:
            lines += [f"## {title}", "", body, ""]
    lines += ["## Plan (priority tiers; later tiers were cut first)", ""]
    for i, e in enumerate(parse_plan(args.plan)):
        seed_txt = f" (sampling seed {e[2]})" if len(e) > 2 else ""
        lines.append(f"{i}. {', '.join(e[0])} at NFE {', '.join(map(str, e[1]))}{seed_txt}")
    lines += ["", f"Machine: {p['machine']}.", ""]
    if p["meta"].get("commands"):
        lines += ["## Commands", "", "```bash", *p["meta"]["commands"], "```", ""]
    return "\n".join(lines)


def plot(p: dict, path: str):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    results = [r for r in p["results"] if r["seed"] == p["main_seed"]]
    # a panel per sampler with at least three NFEs run (fewer if no sampler has three); spot checks stay in the tables
    n_nfe = {s: len({r["nfe"] for r in results if r["sampler"] == s}) for s in SAMPLERS}
    if not any(n_nfe.values()):
        return
    samplers = [s for s in SAMPLERS if n_nfe[s] >= min(3, max(n_nfe.values()))]
    best = _best_runs(results)
    # first panel: the best sampler per model and NFE
    results = results + [{**r, "sampler": "best"} for r in best.values()]
    samplers = ["best"] + samplers
    ncol = min(3, len(samplers))
    nrow = (len(samplers) + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.2 * ncol, 3.4 * nrow), squeeze=False)
    colors = dict(zip(DEFAULT_MODELS, ["tab:gray", "tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple"]))
    for ax, s in zip(axes.flat, samplers):
        for m in p["models"]:
            pts = sorted((r["nfe"], r["fid"]) for r in results if r["sampler"] == s and r["model"] == m)
            if pts:
                ax.plot(*zip(*pts), "o-", label=MODEL_LABELS.get(m, m), color=colors.get(m), ms=4)
        nf = p.get("noise_floor")
        if nf:
            ax.axhspan(nf["mean"] - nf["std"], nf["mean"] + nf["std"], color="k", alpha=0.1)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ScalarFormatter())
        ax.yaxis.set_minor_formatter(NullFormatter())
        ticks = sorted({r["nfe"] for r in results if r["sampler"] == s})
        ax.set_xticks(ticks)
        ax.set_xticklabels([str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_title("best sampler per model" if s == "best" else s, fontsize=10)
        ax.set_xlabel("NFE")
        ax.set_ylabel("offline FID")
        ax.grid(alpha=0.3, which="both")
    for ax in list(axes.flat)[len(samplers):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle(f"digits, offline FID (N={p['num_samples']}) vs NFE; grey band: real-data noise floor", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------ CLI
def parse_args(argv=None):
    here = os.path.dirname(os.path.abspath(__file__))
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models_dir", default="outputs/quality/models", help="one saved pipeline per model name")
    p.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    p.add_argument("--feature_extractor", default="outputs/quality/feature_extractor")
    p.add_argument("--work_dir", default="outputs/quality/eval", help="sample shards and per-job results")
    p.add_argument("--num_samples", type=int, default=256)
    p.add_argument("--shard_size", type=int, default=128)
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base sampling seeds (first = main table)")
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--plan", default=None, help="'samplers:nfes;...' tiers (default: DEFAULT_PLAN)")
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--deadline_minutes", type=float, default=None, help="start no new job after this")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="torch.compile the UNet (fp32; ~10%% faster on CPU)")
    p.add_argument("--noise_floor_repeats", type=int, default=10, help="real subsets for the FID noise floor")
    p.add_argument("--report", action="store_true", help="only merge results and write json/md/png")
    p.add_argument("--meta", default=None, help="JSON with summary / sections / commands for the report")
    p.add_argument("--train_logs_dir", default=None, help="train_<model>.log files (training wall time)")
    p.add_argument("--out_json", default=os.path.join(here, "results", "quality.json"))
    p.add_argument("--out_md", default=os.path.join(here, "results", "quality.md"))
    p.add_argument("--out_png", default=os.path.join(here, "results", "quality_fid_vs_nfe.png"))
    args = p.parse_args(argv)
    if args.num_samples < 2 or args.shard_size < 1:
        p.error("--num_samples must be >= 2 and --shard_size >= 1")
    if not 0 <= args.worker < args.num_workers:
        p.error("--worker must be in [0, --num_workers)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        return write_report(args)
    return worker(args)


if __name__ == "__main__":
    main()
