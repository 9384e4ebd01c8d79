#!/usr/bin/env python
"""Same-network sampler study: every network with every sampler, diffusers' own samplers always included.

For each trained network (this package's VP, CLD and PSLD models and a VP network trained with diffusers'
discrete ``DDPMScheduler`` loss) the study samples N images with

* diffusers' samplers — what a diffusers user would pick: DDIM, DPM-Solver++ 2M / 3M (default and Karras σ),
  UniPC and Euler, each built with ``from_config`` from the network's VP scheduler config (stock settings). A
  package network answers as a VP ε-model through ``PSLDPipeline.to_vp()`` (the exact sufficient-statistic bridge);
* this package's samplers — gDDIM (orders 2 and 3), SSCS, Euler–Maruyama and the conjugate integrator on the
  network's own recipe, and PSLD samplers on VP networks through ``PSLDPipeline.from_vp``,

at the same NFE and from the **same prior draws**: every sample function draws ξ ~ N(0, I) of shape
``[B, 2C, H, W]`` (float32) first from the shard's generator; VP-state samplers start from ξ[:, :C] (times
``init_noise_sigma``), phase-space samplers from the prior the scheduler draws from the same ξ. A sampling seed
therefore fixes the prior draws of every cell, and cells are compared with paired t-tests over seeds
(``parameterization_study._verdict``).

Scores: offline FID and KID (DigitsFeatureNet features) of N samples vs all 1797 scikit-learn digits; the real-data
floor is measured the same way. Jobs are claimed files (any number of single-thread workers; a killed run
resumes from finished shards).

Example (two workers, then the report)::

    OMP_NUM_THREADS=1 python benchmarks/sampler_study.py --models_dir outputs/study/models \\
        --feature_extractor outputs/study/fx --work_dir outputs/study/eval --worker 0 --num_workers 2 &
    OMP_NUM_THREADS=1 python benchmarks/sampler_study.py --models_dir outputs/study/models \\
        --feature_extractor outputs/study/fx --work_dir outputs/study/eval --worker 1 --num_workers 2
    python benchmarks/sampler_study.py --models_dir outputs/study/models --feature_extractor outputs/study/fx \\
        --work_dir outputs/study/eval --report
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, ".."))
sys.path.insert(0, ROOT)
sys.path.insert(0, HERE)

import parameterization_study as ps  # noqa: E402  (FID/KID, real-data floor, paired tests)
import quality_study as qs  # noqa: E402  (job claiming, shards)

from diffusers_psld.evaluation import fid as fidmod  # noqa: E402

# ------------------------------------------------------------------------------------------ networks
#: name -> (label, kind): "package" = a PSLDPipeline directory written by train_psld.py, "ddpm" = a diffusers
#: DDPMPipeline directory (benchmarks/train_ddpm_reference.py)
NETWORKS: Dict[str, Tuple[str, str]] = {
    "vp": ("VP-SDE, ε (this package)", "package"),
    "ddpm": ("DDPM, ε (diffusers' discrete loss)", "ddpm"),
    "psld_eps": ("PSLD Γ=0.01, 2C ε (paper)", "package"),
    "psld_sample": ("PSLD Γ=0.01, sample (x̂₀)", "package"),
    "psld_suff": ("PSLD Γ=0.01, sufficient_epsilon", "package"),
    "cld": ("CLD, ε (paper)", "package"),
}
VP_NETWORKS = ("vp", "ddpm")


class Network:
    """One trained network with the two views the samplers need: a VP ε-model with a diffusers scheduler config
    (``vp()``), and a ``PSLDPipeline`` for a recipe scheduler (``psld_pipeline(scheduler)``): the network's own
    pipeline when the scheduler's recipe is the network's, else the bridge ``PSLDPipeline.from_vp``."""

    def __init__(self, models_dir: str, name: str):
        if name not in NETWORKS:
            raise ValueError(f"unknown network {name!r}; choose from {sorted(NETWORKS)}")
        self.name, self.dir = name, os.path.join(models_dir, name)
        self.label, self.kind = NETWORKS[name]
        self._pipe = self._vp = None

    @property
    def pipe(self):
        """The package's own pipeline (package networks only)."""
        if self._pipe is None:
            from diffusers_psld import PSLDPipeline

            self._pipe = PSLDPipeline.from_pretrained(self.dir)
            self._pipe.set_progress_bar_config(disable=True)
            self._pipe.unet.eval()
        return self._pipe

    def vp(self):
        """``(unet, scheduler)``: the network as a VP ε-model under a diffusers DDPM-family scheduler."""
        if self._vp is None:
            if self.kind == "ddpm":
                from diffusers import DDPMPipeline

                p = DDPMPipeline.from_pretrained(self.dir)
                p.unet.eval()
                self._vp = (p.unet, p.scheduler)
            else:
                self._vp = self.pipe.to_vp()
        return self._vp

    def config(self) -> dict:
        """The network's recipe scheduler config (package networks), None for a ddpm network."""
        return None if self.kind == "ddpm" else dict(self.pipe.scheduler.config)

    def recipe(self) -> str:
        if self.kind == "ddpm":
            return "vp-discrete"
        cfg = self.config()
        if cfg.get("diffusion", "psld") == "vp":
            return "vp"
        return "cld" if float(cfg.get("gamma", 0.0)) == 0.0 else "psld"

    def psld_pipeline(self, scheduler):
        """A ``PSLDPipeline`` that samples this network with the recipe ``scheduler``."""
        from diffusers_psld import PSLDPipeline

        if self.kind == "package" and _same_recipe(self.config(), dict(scheduler.config)):
            pipe = PSLDPipeline(unet=self.pipe.unet, scheduler=scheduler, classifier=None)
        else:
            unet, vp_sched = self.vp()
            pipe = PSLDPipeline.from_vp(unet, vp_sched, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def data_channels(self) -> int:
        unet = self.vp()[0] if self.kind == "ddpm" else self.pipe.unet
        return unet.config.in_channels if self.kind == "ddpm" else self.pipe.data_channels

    def sample_size(self) -> int:
        unet = self.vp()[0] if self.kind == "ddpm" else self.pipe.unet
        s = unet.config.sample_size
        return s if isinstance(s, int) else s[0]


RECIPE_KEYS = ("diffusion", "gamma", "nu", "m_inv", "beta_min", "beta_max", "kappa", "time_scale", "prediction_type",
               "input_preconditioning", "sigma_data")


def _same_recipe(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in RECIPE_KEYS)


# ------------------------------------------------------------------------------------------ samplers
def _diffusers(cls_name: str, **kw):
    def build(net: Network):
        import diffusers

        unet, vp_sched = net.vp()
        return unet, getattr(diffusers, cls_name).from_config(vp_sched.config, **kw)
    return build


#: diffusers' samplers: name -> (label, builder(net) -> (unet, scheduler)); stock settings from the network's config
DIFFUSERS_SAMPLERS: Dict[str, Tuple[str, Callable]] = {
    "ddim": ("diffusers DDIM", _diffusers("DDIMScheduler")),
    "dpmpp2m": ("diffusers DPM-Solver++ 2M", _diffusers("DPMSolverMultistepScheduler", solver_order=2)),
    "dpmpp3m": ("diffusers DPM-Solver++ 3M", _diffusers("DPMSolverMultistepScheduler", solver_order=3)),
    "dpmpp2m-karras": ("diffusers DPM-Solver++ 2M, Karras σ",
                       _diffusers("DPMSolverMultistepScheduler", solver_order=2, use_karras_sigmas=True)),
    "dpmpp3m-karras": ("diffusers DPM-Solver++ 3M, Karras σ",
                       _diffusers("DPMSolverMultistepScheduler", solver_order=3, use_karras_sigmas=True)),
    "unipc": ("diffusers UniPC (bh2, order 2)", _diffusers("UniPCMultistepScheduler")),
    "euler": ("diffusers Euler (discrete)", _diffusers("EulerDiscreteScheduler")),
}


def _package(cls_name: str, recipe: str = "native", **kw):
    """A package scheduler on the network's own recipe (``"native"``) or on the PSLD Γ = 0.01 / VP preset."""
    def build(net: Network):
        import diffusers_psld

        cls = getattr(diffusers_psld, cls_name)
        if recipe == "native":
            if net.kind == "ddpm":  # the VP recipe of this package, sampling the discrete network via the bridge
                return cls(diffusion="vp", **kw)
            return cls.from_config(net.config(), **kw)
        base = {"psld": {"diffusion": "psld", "gamma": 0.01}, "vp": {"diffusion": "vp"}}[recipe]
        return cls(**base, **kw)
    return build


def _own_recipe_gddim(n: "Network") -> bool:
    """gDDIM needs ε_x: not on a CLD network that predicts the paper's ε (ε_m only)."""
    return n.recipe() != "cld" or n.config().get("prediction_type") != "epsilon"


#: package samplers: name -> (label, builder(net) -> recipe scheduler, applicable(net) -> bool, recipe)
PACKAGE_SAMPLERS: Dict[str, Tuple[str, Callable, Callable, str]] = {
    "gddim": ("gDDIM, package defaults (NFE bands; own recipe)", _package("GDDIMMultistepScheduler"),
              _own_recipe_gddim, "native"),
    "gddim2": ("gDDIM order 2, classic grid (own recipe)", _package("GDDIMMultistepScheduler", solver_order=2,
                                                                   schedule_preset="classic"), _own_recipe_gddim,
               "native"),
    "gddim3": ("gDDIM order 3, classic grid (own recipe)", _package("GDDIMMultistepScheduler", solver_order=3,
                                                                   schedule_preset="classic"), _own_recipe_gddim,
               "native"),
    "sscs": ("SSCS, quadratic striding (own recipe)", _package("SSCSScheduler", sampler="sscs", striding="quadratic"),
             lambda n: n.recipe() in ("psld", "cld"), "native"),
    "em": ("Euler–Maruyama, quadratic striding (own recipe)", _package("PSLDScheduler", sampler="em",
                                                                       striding="quadratic"), lambda n: True, "native"),
    "conj": ("conjugate integrator B=0, quadratic striding (own recipe)",
             _package("ConjugateScheduler", sampler="conjugate", conjugate_b="zero", striding="quadratic"),
             lambda n: True, "native"),
    "vp-gddim": ("VP gDDIM, package defaults (NFE bands), through the bridge",
                 _package("GDDIMMultistepScheduler", "vp"), lambda n: n.recipe() not in ("vp", "vp-discrete"), "vp"),
    "psld-gddim": ("PSLD Γ=0.01 gDDIM, package defaults (NFE bands), through the bridge",
                   _package("GDDIMMultistepScheduler", "psld"), lambda n: n.recipe() != "psld", "psld"),
    "psld-gddim2": ("PSLD Γ=0.01 gDDIM order 2, classic grid, through the bridge",
                    _package("GDDIMMultistepScheduler", "psld", solver_order=2, schedule_preset="classic"),
                    lambda n: n.recipe() != "psld", "psld"),
    "psld-gddim3": ("PSLD Γ=0.01 gDDIM order 3, classic grid, through the bridge",
                    _package("GDDIMMultistepScheduler", "psld", solver_order=3, schedule_preset="classic"),
                    lambda n: n.recipe() != "psld", "psld"),
}
SAMPLERS = {**{k: v[0] for k, v in DIFFUSERS_SAMPLERS.items()}, **{k: v[0] for k, v in PACKAGE_SAMPLERS.items()}}
EXTRA_SAMPLERS: Dict[str, dict] = {}


def register_extra_samplers(spec: Dict[str, dict]) -> None:
    """Add package samplers from a JSON-able spec ``{name: {"class", "recipe" ("native" | "psld" | "vp"),
    "kwargs", "label"?, "networks"? (list; default: every network the recipe applies to)}}`` — how schedule and
    solver sweeps add rows (e.g. ``{"vp-g3-uniform-s0.15": {"class": "GDDIMMultistepScheduler", "recipe":
    "native", "kwargs": {"solver_order": 3, "time_grid": "uniform", "sigma_min": 0.15}}}``).

    Raises ``ValueError`` for a name that exists already, an unknown class or recipe, or a name that is not
    file-name safe."""
    import re

    import diffusers_psld

    for name, e in spec.items():
        if name in SAMPLERS and EXTRA_SAMPLERS.get(name) != e:
            raise ValueError(f"extra sampler {name!r}: the name is taken")
        if not re.fullmatch(r"[A-Za-z0-9_.+-]+", name):
            raise ValueError(f"extra sampler {name!r}: use letters, digits and _.+- only (it names files)")
        cls, recipe = e.get("class"), e.get("recipe", "native")
        if not hasattr(diffusers_psld, str(cls)):
            raise ValueError(f"extra sampler {name!r}: unknown scheduler class {cls!r}")
        if recipe not in ("native", "psld", "vp"):
            raise ValueError(f"extra sampler {name!r}: recipe must be 'native', 'psld' or 'vp', got {recipe!r}")
        nets = e.get("networks")
        gddim = cls == "GDDIMMultistepScheduler"

        def ok(n, nets=nets, recipe=recipe, gddim=gddim):
            if nets is not None and n.name not in nets:
                return False
            if recipe == "native":
                return not gddim or _own_recipe_gddim(n)
            return n.recipe() != recipe  # a foreign recipe through the bridge (native rows cover the own one)

        label = e.get("label") or f"{cls} ({recipe}) " + ", ".join(f"{k}={v}" for k, v in e.get("kwargs", {}).items())
        PACKAGE_SAMPLERS[name] = (label, _package(cls, recipe, **e.get("kwargs", {})), ok, recipe)
        SAMPLERS[name] = label
        EXTRA_SAMPLERS[name] = e


def family(sampler: str) -> str:
    return "diffusers" if sampler in DIFFUSERS_SAMPLERS else "package"


def applicable(net: Network, sampler: str) -> bool:
    if not os.path.isdir(net.dir) or not (os.path.isfile(os.path.join(net.dir, "model_index.json"))):
        return False
    if sampler in DIFFUSERS_SAMPLERS:
        return True
    if sampler not in PACKAGE_SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose from {sorted(SAMPLERS)}")
    return PACKAGE_SAMPLERS[sampler][2](net)


def is_psld_cell(net: Network, sampler: str) -> bool:
    """A cell sampled by a PSLD-recipe scheduler (own recipe on a PSLD network, or through the bridge)."""
    if family(sampler) != "package":
        return False
    recipe = PACKAGE_SAMPLERS[sampler][3]
    return recipe == "psld" or (recipe == "native" and net.recipe() == "psld")


def draw_prior_noise(batch: int, channels: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """ξ ~ N(0, I) ``[B, 2C, H, W]`` float32: the shared prior draw of every sampler (see the module docstring)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor((batch, 2 * channels, size, size), generator=generator, dtype=torch.float32)


def make_sample_fn(net: Network, sampler: str, nfe: int):
    """``(sample_fn(batch, generator) -> images [B, C, H, W] in [0, 1], scheduler_class_name)``; exactly ``nfe``
    network evaluations per image (checked)."""
    C, size = net.data_channels(), net.sample_size()
    if sampler in DIFFUSERS_SAMPLERS:
        unet, sched = DIFFUSERS_SAMPLERS[sampler][1](net)
        import inspect

        # stochastic diffusers schedulers draw their noise from the shard's generator; UniPC's step takes none
        step_kw = "generator" in inspect.signature(sched.step).parameters

        @torch.no_grad()
        def sample_fn(batch: int, generator: torch.Generator) -> torch.Tensor:
            xi = draw_prior_noise(batch, C, size, generator)
            sched.set_timesteps(nfe)
            if len(sched.timesteps) != nfe:
                raise RuntimeError(f"{type(sched).__name__}: {len(sched.timesteps)} timesteps for NFE {nfe}")
            x = xi[:, :C] * sched.init_noise_sigma
            for t in sched.timesteps:
                eps = unet(sched.scale_model_input(x, t), t).sample
                x = sched.step(eps, t, x, **({"generator": generator} if step_kw else {})).prev_sample
            return (x / 2 + 0.5).clamp(0, 1)

        return sample_fn, type(sched).__name__

    sched = PACKAGE_SAMPLERS[sampler][1](net)
    pipe = net.psld_pipeline(sched)
    k = sched.num_components

    @torch.no_grad()
    def sample_fn(batch: int, generator: torch.Generator) -> torch.Tensor:
        state = generator.get_state()
        xi = draw_prior_noise(batch, C, size, generator)
        sched.set_timesteps(nfe)
        if k == 1:  # the scheduler's prior scale (sqrt Σ_t0 for a schedule that starts below t = 1) on ξ[:, :C]
            from diffusers_psld.sde import blocks

            scale = sched._prior_scale if getattr(sched, "_init_scale", None) is None else sched._init_scale
            latents = blocks.apply(scale, xi[:, :C])
        else:  # the scheduler's own prior draw from the same ξ (same generator state, same shape and dtype)
            latents = sched.sample_prior(xi.shape, generator=torch.Generator().set_state(state))
        out = pipe(batch_size=batch, generator=generator, num_inference_steps=nfe, latents=latents,
                   output_type="pt").images
        return torch.nan_to_num(out, nan=0.0)  # a diverged sampler counts as its images, not as a crash

    return sample_fn, type(sched).__name__


# ------------------------------------------------------------------------------------------ jobs
DIFFUSERS_ALL = ",".join(DIFFUSERS_SAMPLERS)
DEFAULT_PLAN = (f"{DIFFUSERS_ALL},gddim2,gddim3,conj,psld-gddim2,psld-gddim3:10,20;"
                f"{DIFFUSERS_ALL},gddim2,gddim3,psld-gddim2,psld-gddim3:5;"
                "sscs,em:20,50;dpmpp2m,dpmpp3m,unipc,gddim3,psld-gddim3:50")


def parse_plan(spec: str) -> List[dict]:
    """``"a,b:10,20[@seed][|net,...];..."`` → tiers ``{"samplers", "nfes", "seed", "networks"}``.

    Raises ``ValueError`` for an unknown sampler or network or a malformed tier."""
    tiers = []
    for tier in spec.split(";"):
        body, _, nets = tier.partition("|")
        if ":" not in body:
            raise ValueError(f"tier {tier!r}: expected 'samplers:nfes[@seed][|network,...]'")
        s, n = body.split(":", 1)
        seed = None
        if "@" in n:
            n, seed_s = n.split("@")
            seed = int(seed_s)
        samplers = [x.strip() for x in s.split(",") if x.strip()]
        for x in samplers:
            if x not in SAMPLERS:
                raise ValueError(f"tier {tier!r}: unknown sampler {x!r}; choose from {sorted(SAMPLERS)}")
        names = [m.strip() for m in nets.split(",") if m.strip()] if nets else None
        for m in names or []:
            if m not in NETWORKS:
                raise ValueError(f"tier {tier!r}: unknown network {m!r}; choose from {sorted(NETWORKS)}")
        nfes = [int(v) for v in n.split(",")]
        if any(v < 2 for v in nfes):
            raise ValueError(f"tier {tier!r}: NFEs must be >= 2")
        tiers.append({"samplers": samplers, "nfes": nfes, "seed": seed, "networks": names})
    return tiers


def all_jobs(args) -> List[dict]:
    jobs, seen = [], set()
    for seed in args.seeds:
        for i, t in enumerate(parse_plan(args.plan)):
            tseed = seed if t["seed"] is None else t["seed"]
            for nfe in t["nfes"]:
                for smp in t["samplers"]:
                    for m in args.networks:
                        if t["networks"] is not None and m not in t["networks"]:
                            continue
                        key = (m, smp, nfe, tseed)
                        if key not in seen:
                            seen.add(key)
                            jobs.append({"tier": i, "model": m, "sampler": smp, "nfe": nfe, "seed": tseed,
                                         "name": f"{m}__{smp}__nfe{nfe}__seed{tseed}"})
    jobs.sort(key=lambda j: j["tier"])
    return jobs


def run_eval(job: dict, args, real: torch.Tensor, nets: Dict[str, Network], log) -> dict:
    t0 = time.perf_counter()
    net = nets[job["model"]]
    sample_fn, sched_name = make_sample_fn(net, job["sampler"], job["nfe"])
    g = qs.sample_job_shards(sample_fn, sched_name, net.dir, job, args, log)
    m = ps.compute_fid_kid(g["images"], real, args.feature_extractor, args.kid_subsets, args.kid_subset_size,
                           job["seed"], args.kid_gamma)
    return {**job, **m, "family": family(job["sampler"]), "psld_sampler": is_psld_cell(net, job["sampler"]),
            "recipe": net.recipe(), "scheduler": sched_name, "num_samples": args.num_samples,
            "generation_seconds": g["seconds"], "wall_seconds": time.perf_counter() - t0,
            "finished": time.strftime("%Y-%m-%d %H:%M:%S")}


def worker(args) -> int:
    torch.set_num_threads(args.num_threads)
    t_start = time.perf_counter()
    res_dir = os.path.join(args.work_dir, "results")
    os.makedirs(res_dir, exist_ok=True)
    real = qs.load_real(args.resolution)
    args.kid_gamma = ps.kid_gamma(real, args.feature_extractor)
    nets = {m: Network(args.models_dir, m) for m in args.networks}

    def log(msg):
        print(f"[worker {args.worker}/{args.num_workers} {time.strftime('%H:%M:%S')}] {msg}", flush=True)

    floor_path = os.path.join(args.work_dir, f"floor_n{args.num_samples}.json")
    if args.worker == 0 and not os.path.isfile(floor_path):
        fl = ps.real_floor(args, real)
        with open(floor_path, "w") as f:
            json.dump(fl, f, indent=2)
        log(f"real-data floor: FID {fl['fid']['mean']:.3f} ± {fl['fid']['std']:.3f}")
    jobs = all_jobs(args)
    jobs = jobs[args.worker:] + jobs[:args.worker] if args.interleave else jobs
    n = qs.run_claimed_jobs(jobs, res_dir, lambda j: run_eval(j, args, real, nets, log),
                            lambda j: applicable(nets[j["model"]], j["sampler"]), log, t_start,
                            args.deadline_minutes, lambda r: f"FID {r['fid']:.3f} KID {r['kid_mean']:.5f}")
    log(f"finished: {n} jobs in {time.perf_counter() - t_start:.0f} s")
    return n


# ------------------------------------------------------------------------------------------ report
def collect(work_dir: str, samplers=None) -> List[dict]:
    """The finished cells of ``work_dir``; with ``samplers``, only those of the named samplers (a work directory
    may also hold the cells of a schedule sweep, which must not compete with the study's rows)."""
    res_dir = os.path.join(work_dir, "results")
    out = []
    for fn in sorted(os.listdir(res_dir)) if os.path.isdir(res_dir) else []:
        if fn.endswith(".json"):
            with open(os.path.join(res_dir, fn)) as f:
                r = json.load(f)
            if samplers is None or r.get("sampler") in samplers:
                out.append(r)
    return out


def cells_at(results: List[dict], nfe: int, pred=lambda r: True) -> Dict[tuple, Dict[int, float]]:
    """``{(network, sampler): {seed: fid}}`` at one NFE, for the results that satisfy ``pred``."""
    cells: Dict[tuple, Dict[int, float]] = {}
    for r in results:
        if r["nfe"] == nfe and pred(r):
            cells.setdefault((r["model"], r["sampler"]), {})[r["seed"]] = r["fid"]
    return cells


def best_cell(cells: Dict[tuple, Dict[int, float]], most_seeds: bool = False):
    """The (key, {seed: fid}) with the lowest mean FID, or None; ``most_seeds``: among the cells that ran the most
    sampling seeds (the deciding cells: a one-seed cell cannot be compared beyond seed noise)."""
    if not cells:
        return None
    if most_seeds:
        top = max(len(v) for v in cells.values())
        cells = {k: v for k, v in cells.items() if len(v) == top}
    return min(cells.items(), key=lambda kv: ps._mean(kv[1]))


def _stat(fids: Dict[int, float]) -> str:
    return ps._seed_stats(list(fids.values()))


def goal_lines(results: List[dict], nfes: List[int]) -> List[str]:
    """The goal checks: on the VP networks and on the best PSLD network, the package's best PSLD-recipe sampler vs
    diffusers' best sampler per NFE (paired t-test over shared seeds; beyond seed noise = p < 0.05 with >= 2 seeds);
    the package's VP gDDIM vs DPM-Solver++(2M) on the VP network at NFE 10."""
    lines = ["## Goal checks (computed)", "",
             "For each network and NFE: the best cell (lowest mean FID, among the cells that ran the most seeds) among "
             "diffusers' samplers "
             "and among this package's PSLD-recipe samplers, and a t-test over sampling seeds (paired where both ran "
             "the same seeds: a seed fixes the prior draws). *Beyond seed noise* means p < 0.05 with >= 2 seeds per "
             "cell; a single-seed comparison is reported as not decidable.", ""]
    psld_nets = sorted({r["model"] for r in results if r.get("recipe") == "psld"})
    best_psld_net = None
    for nfe in (20, 10):  # the best PSLD network: lowest best-cell FID at NFE 20 (10 if 20 is missing)
        bc = best_cell(cells_at(results, nfe, lambda r: r["model"] in psld_nets and r["psld_sampler"]))
        if bc:
            best_psld_net = bc[0][0]
            break
    for net in [m for m in VP_NETWORKS if any(r["model"] == m for r in results)] + \
               ([best_psld_net] if best_psld_net else []):
        lines.append(f"**{NETWORKS[net][0]}**" + (" (the best PSLD network)" if net == best_psld_net else ""))
        for nfe in nfes:
            d = best_cell(cells_at(results, nfe, lambda r, m=net: r["model"] == m and r["family"] == "diffusers"),
                          most_seeds=True)
            p = best_cell(cells_at(results, nfe, lambda r, m=net: r["model"] == m and r["psld_sampler"]), most_seeds=True)
            if not (d and p):
                continue
            ratio = ps._mean(p[1]) / ps._mean(d[1])
            verdict = ps._verdict(p[1], d[1], ("PSLD", "diffusers"))
            lines.append(f"- NFE {nfe}: PSLD {p[0][1]} {_stat(p[1])} vs diffusers {d[0][1]} {_stat(d[1])}; "
                         f"ratio {ratio:.2f}; {verdict}")
        lines.append("")
    v = cells_at(results, 10, lambda r: r["model"] == "vp")
    if ("vp", "dpmpp2m") in v:
        for smp in ("gddim", "gddim2", "gddim3"):
            if ("vp", smp) in v:
                lines.append(f"- VP network, NFE 10: package VP {smp} {_stat(v[('vp', smp)])} vs DPM-Solver++(2M) "
                             f"{_stat(v[('vp', 'dpmpp2m')])}; "
                             f"{ps._verdict(v[('vp', smp)], v[('vp', 'dpmpp2m')], ('package', 'diffusers'))}")
        lines.append("")
    return lines


#: the README's headline rows: (label, network, [samplers]; the best of the samplers per NFE)
HEADLINE = [
    ("VP network: this package's VP gDDIM (defaults)", "vp", ["gddim"]),
    ("VP network: diffusers' best (UniPC, DPM-Solver++ 2M/3M, DDIM, Euler)", "vp",
     ["unipc", "dpmpp2m", "dpmpp3m", "dpmpp2m-karras", "dpmpp3m-karras", "ddim", "euler"]),
    ("VP network: PSLD gDDIM (defaults) through the bridge", "vp", ["psld-gddim"]),
    ("PSLD network (paper's ε): VP gDDIM (defaults) through the bridge", "psld_eps", ["vp-gddim"]),
    ("PSLD network (paper's ε): PSLD gDDIM (defaults)", "psld_eps", ["gddim"]),
    ("PSLD network (paper's ε): diffusers' best, through `to_vp()`", "psld_eps",
     ["unipc", "dpmpp2m", "dpmpp3m", "dpmpp2m-karras", "dpmpp3m-karras", "ddim", "euler"]),
]


def headline_lines(results: List[dict], nfes: List[int]) -> List[str]:
    """The headline table: per row and NFE the best listed sampler's FID, mean ± s.d. over the sampling seeds that
    every row of the same network ran at that NFE (so the rows of a network are compared on the same prior draws)."""
    L = ["## Headline (FID, mean ± s.d. over the sampling seeds shared by the rows of a network; best of the listed "
         "samplers)", "", "| network and sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
         "|---|" + "---:|" * len(nfes)]
    cells = {}
    for label, net, samplers in HEADLINE:
        for n in nfes:
            cells[(label, n)] = best_cell(cells_at(results, n, lambda r, net=net, ss=samplers: r["model"] == net
                                                   and r["sampler"] in ss), most_seeds=True)
    for label, net, samplers in HEADLINE:
        row = []
        for n in nfes:
            b = cells[(label, n)]
            if b is None:
                row.append("—")
                continue
            shared = set(b[1])
            for other, onet, _ in HEADLINE:
                if onet == net and cells[(other, n)] is not None:
                    shared &= set(cells[(other, n)][1])
            fids = {k: v for k, v in b[1].items() if k in shared} or b[1]
            row.append(_stat(fids) + ("" if len(samplers) == 1 else f" `{b[0][1]}`"))
        L.append(f"| {label} | " + " | ".join(row) + " |")
    return L + [""]


def markdown(p: dict) -> str:
    results, floor = p["results"], p.get("floor")
    nfes = sorted({r["nfe"] for r in results})
    nets = [m for m in NETWORKS if any(r["model"] == m for r in results)]
    seed0 = p["main_seed"]
    L = ["# Same-network sampler study: every network with every sampler", "",
         f"Machine: {p['machine']}. N = {p['num_samples']} samples per cell vs all 1797 scikit-learn digits (16 px), "
         "offline DigitsFeatureNet FID and KID. Prior draws shared by every cell of a sampling seed.", ""]
    if floor:
        L += [f"Real-data floor: FID {floor['fid']['mean']:.2f} ± {floor['fid']['std']:.2f}, "
              f"KID {1e3 * floor['kid_mean']['mean']:.2f}e-3 ({floor['what']}).", ""]
    L += ["Networks: " + "; ".join(f"`{m}` = {NETWORKS[m][0]}" for m in nets) + ".", "",
          "Commands:", "", *[f"    {c}" for c in p["commands"]], ""]
    L += headline_lines(results, nfes)
    L += goal_lines(results, [n for n in nfes if n <= 20])
    L += ["## Best sampler per network and NFE", "", "| network | " + " | ".join(f"NFE {n}" for n in nfes) + " |",
          "|---|" + "---:|" * len(nfes)]
    for m in nets:
        row = []
        for n in nfes:
            b = best_cell(cells_at(results, n, lambda r, m=m: r["model"] == m))
            row.append("—" if b is None else f"{ps._mean(b[1]):.2f} `{b[0][1]}`")
        L.append(f"| {NETWORKS[m][0]} | " + " | ".join(row) + " |")
    L += ["", "## Best network per NFE (with its best sampler)", ""]
    for n in nfes:
        b = best_cell(cells_at(results, n))
        if b:
            L.append(f"- NFE {n}: {NETWORKS[b[0][0]][0]} with `{b[0][1]}`: {_stat(b[1])}")
    L += ["", f"## Every cell (sampling seed {seed0}; FID / KID×1e3)", ""]
    for n in nfes:
        L += [f"### NFE {n}", "", "| sampler | " + " | ".join(f"`{m}`" for m in nets) + " |",
              "|---|" + "---:|" * len(nets)]
        for s in SAMPLERS:
            cells = []
            for m in nets:
                r = next((r for r in results if (r["model"], r["sampler"], r["nfe"], r["seed"]) == (m, s, n, seed0)),
                         None)
                cells.append("—" if r is None else f"{r['fid']:.2f} / {1e3 * r['kid_mean']:.2f}")
            if any(c != "—" for c in cells):
                L.append(f"| {SAMPLERS[s]} | " + " | ".join(cells) + " |")
        L.append("")
    rep = [(k, n, v) for n in nfes for k, v in cells_at(results, n).items() if len(v) >= 2]
    if rep:
        L += ["## Cells with several sampling seeds (mean ± sd)", ""]
        L += [f"- NFE {n}, `{k[0]}`, `{k[1]}`: {_stat(v)}" for k, n, v in rep] + [""]
    return "\n".join(L)


def write_report(args) -> dict:
    results = [r for r in collect(args.work_dir, SAMPLERS if args.only_registered else None)
               if r["model"] in args.networks and (not args.report_nfes or r["nfe"] in args.report_nfes)
               and (not args.report_samplers or r["sampler"] in args.report_samplers)]
    if not results:
        raise SystemExit(f"--report: no finished cell in {args.work_dir} matches --networks {args.networks}"
                         + (f", --report_nfes {args.report_nfes}" if args.report_nfes else "")
                         + (f", --report_samplers {args.report_samplers}" if args.report_samplers else "")
                         + "; nothing written")
    floor_path = os.path.join(args.work_dir, f"floor_n{args.num_samples}.json")
    floor = json.load(open(floor_path)) if os.path.isfile(floor_path) else None
    p = {"results": results, "floor": floor, "num_samples": args.num_samples, "main_seed": args.seeds[0],
         "networks": {m: NETWORKS[m][0] for m in args.networks}, "samplers": SAMPLERS, "plan": args.plan,
         "extra_samplers": EXTRA_SAMPLERS,
         "commands": args.commands or [" ".join([os.path.basename(sys.executable), *sys.argv])],
         "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}, "
                    f"{platform.python_implementation()} {platform.python_version()}"}
    os.makedirs(os.path.dirname(args.out_md), exist_ok=True)
    with open(args.out_json, "w") as f:
        json.dump(p, f, indent=1)
    with open(args.out_md, "w") as f:
        f.write(markdown(p))
    return p


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models_dir", default="outputs/study/models", help="one directory per network of --networks")
    p.add_argument("--work_dir", default="outputs/study/eval", help="samples/ and results/")
    p.add_argument("--feature_extractor", default="outputs/study/fx")
    p.add_argument("--networks", nargs="+", default=list(NETWORKS))
    p.add_argument("--plan", default=DEFAULT_PLAN)
    p.add_argument("--extra_samplers", default=None,
                   help="JSON file {name: {class, recipe, kwargs, label?, networks?}} of more package samplers")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="base sampling seeds (first = main tables)")
    p.add_argument("--num_samples", type=int, default=2000)
    p.add_argument("--shard_size", type=int, default=250)
    p.add_argument("--resolution", type=int, default=16)
    p.add_argument("--kid_subsets", type=int, default=100)
    p.add_argument("--kid_subset_size", type=int, default=1000)
    p.add_argument("--floor_repeats", type=int, default=5)
    p.add_argument("--worker", type=int, default=0)
    p.add_argument("--num_workers", type=int, default=1)
    p.add_argument("--interleave", action="store_true", help="worker i starts at job i (else all in plan order)")
    p.add_argument("--num_threads", type=int, default=1)
    p.add_argument("--deadline_minutes", type=float, default=None)
    p.add_argument("--report", action="store_true")
    p.add_argument("--all_cells", dest="only_registered", action="store_false",
                   help="report every cell of --work_dir (default: only the samplers of this study and of "
                        "--extra_samplers)")
    p.add_argument("--commands", nargs="*", default=[])
    p.add_argument("--report_nfes", type=int, nargs="+", default=None,
                   help="--report: only these NFEs (default: every NFE that ran); --networks filters the networks")
    p.add_argument("--report_samplers", nargs="+", default=None, help="--report: only these samplers (default: all)")
    p.add_argument("--out_json", default=os.path.join(HERE, "results", "sampler_study.json"))
    p.add_argument("--out_md", default=os.path.join(HERE, "results", "sampler_study.md"))
    args = p.parse_args(argv)
    if args.extra_samplers:
        with open(args.extra_samplers) as f:
            try:
                register_extra_samplers(json.load(f))
            except ValueError as e:
                p.error(f"--extra_samplers: {e}")
    for m in args.networks:
        if m not in NETWORKS:
            p.error(f"--networks: unknown network {m!r}; choose from {sorted(NETWORKS)}")
    for s in args.report_samplers or []:
        if s not in SAMPLERS:
            p.error(f"--report_samplers: unknown sampler {s!r}; choose from {sorted(SAMPLERS)}")
    if any(n < 2 for n in args.report_nfes or []):
        p.error("--report_nfes: NFEs must be >= 2")
    try:
        parse_plan(args.plan)
    except ValueError as e:
        p.error(f"--plan: {e}")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.report:
        write_report(args)
        print(f"wrote {args.out_md}")
        return 0
    worker(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
