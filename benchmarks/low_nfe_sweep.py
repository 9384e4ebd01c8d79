#!/usr/bin/env python
r"""Low-NFE sweep of ``GDDIMMultistepScheduler`` on the exact-score benchmark (NFE 5-20): solver order ×
UniC corrector × time grid × σ_min × start (σ_max, with the analytic first step) — and which configuration to use
per NFE band.

Every cell drives PSLD (Γ = 0.01) with the *exact* ε of the data law (``sampler_accuracy``'s data sets,
metrics and driver), so the Fréchet distance measures discretisation error only:

* factors: ``solver_order`` ∈ {2, 3, 4}; ``corrector`` ∈ {none, unic}; time grid ∈ {power 2.5 in t (the
  default), power 1.5 in t, uniform in log-SNR, EDM's ρ = 7 in σ}; σ_min = σ(t_min) with t_min ∈ {1e-3 (the
  default ``sampling_eps``), 0.02, 0.05}; start ∈ {the prior at t = 1 (σ = 258), σ_max = 80 (EDM's), 30
  or 10 with ``analytic_first_step``}; ``lower_order_final=False``. σ is the noise level of the sufficient statistic
  (σ_t² = 1/(aᵀΣ_t⁻¹a)), the σ of VP/EDM models. The scheduler config carries all of it (``time_grid``, ``rho``,
  ``sampling_eps`` = t_min, ``sigma_max``); a start below t = 1 draws the data-free state N(0, Σ_{t_0}) of
  ``sample_prior``. The best cells of each NFE are re-run with ``lower_order_final=True`` and with
  ``interpolation="logsnr"``.
* selection: per NFE, the configuration with the lowest Fréchet distance on the **Gaussian mixture** (the
  benchmark's tuning set: sampling seed 404, 1000 samples, reference seed 303) is the selected one; the **digits
  KDE** (seed 7, 2000 samples, reference seed 101) is the test set, reported for every cell but not used to choose.
* goal check on the digits KDE with 5 fresh sampling seeds (1000-1004): the selected PSLD configuration against
  Diffusers' ``UniPCMultistepScheduler`` and ``DPMSolverMultistepScheduler`` (2M) with their stock DDPM schedule
  (the better of ``linspace`` and ``trailing`` spacing by seed 7), against UniPC on the *same σ schedule* as the
  PSLD row (σ_max … σ_min, then the jump to x̂₀; data-free start N(0, σ_max²/(1 + σ_max²))), and the noise floor
  (true vs true, the same 5 seeds).

Usage::

    OMP_NUM_THREADS=1 nice -n 5 python benchmarks/low_nfe_sweep.py            # ~40 min on one shared core
    OMP_NUM_THREADS=1 python benchmarks/low_nfe_sweep.py --quick              # smoke test (writes *_quick)

Writes ``benchmarks/results/low_nfe_sweep{_quick}.{md,json}``.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shlex
import sys
import time

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import sampler_accuracy as sa  # noqa: E402
from diffusers import DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from diffusers_psld.schedulers.scheduling_gddim import GDDIMMultistepScheduler  # noqa: E402
from diffusers_psld.schedulers.time_grids import noise_level  # noqa: E402

RESULTS = sa.RESULTS
#: sweep grid name -> (``time_grid``, ``rho``)
GRIDS = {"power2.5": ("power", 2.5), "power1.5": ("power", 1.5), "logsnr": ("logsnr", None), "edm7": ("edm", 7.0)}
STARTS = {"prior": None, "sigma80": 80.0, "sigma30": 30.0, "sigma10": 10.0}
FACTORS = {"solver_order": (2, 3, 4), "corrector": ("none", "unic"), "grid": tuple(GRIDS), "t_min": (1e-3, 0.02, 0.05),
           "start": tuple(STARTS)}
GOAL_SEEDS = (1000, 1001, 1002, 1003, 1004)
SELECTED = "PSLD gDDIM, selected configuration"


def key(cfg: dict) -> str:
    extra = "".join(f"-{k}={v}" for k, v in sorted(cfg.items()) if k not in FACTORS)
    return (f"o{cfg['solver_order']}-{cfg['corrector']}-{cfg['grid']}-tmin{cfg['t_min']:g}-{cfg['start']}" + extra)


def make_scheduler(cfg: dict) -> GDDIMMultistepScheduler:
    """The PSLD gDDIM scheduler of a sweep cell: grid, t_min (``sampling_eps``) and start (``sigma_max``) in its config."""
    cfg = dict(cfg)
    grid, t_min, start = cfg.pop("grid"), cfg.pop("t_min"), cfg.pop("start")
    afs = cfg.pop("analytic_first_step", True)  # False: the same data-free start without the analytic first step
    cfg.setdefault("lower_order_final", False)
    time_grid, rho = GRIDS[grid]
    return GDDIMMultistepScheduler(sampling_eps=t_min, time_grid=time_grid, rho=rho, sigma_max=STARTS[start],
                                   analytic_first_step=afs and STARTS[start] is not None, **cfg)


# ---------------------------------------------------------------------------------------------- VP on a σ schedule
def run_vp_sigmas(make, data, sigmas, n, seed, analytic_first_step=False):
    """A Diffusers VP multistep scheduler on the σ list ``sigmas`` (descending, then the jump to σ = 0), driven by the
    exact VP ε at each σ (ᾱ = 1/(1 + σ²)); the state starts data-free, N(0, σ_max²/(1 + σ_max²)). With
    ``analytic_first_step`` the first call adds α_0 x̂₀ to the state (the data term the data-free start lacks, as
    ``GDDIMMultistepScheduler(analytic_first_step=True)`` does; VP's a_1 ≈ 0 at σ = ∞) and hands the scheduler
    the ε with the same x̂₀ at the shifted state, ε' = x/σ_0 (VP σ of the state, √(1 - ᾱ))."""
    sched = make()
    N = len(sigmas)
    sched.set_timesteps(N)
    sched.sigmas = torch.tensor(list(sigmas) + [0.0], dtype=torch.float64)
    sched.timesteps = torch.arange(N, 0, -1)
    g = torch.Generator().manual_seed(seed)
    s0 = float(sigmas[0])
    x = torch.randn(n, data.d, generator=g, dtype=torch.float64) * (s0 / (1 + s0 ** 2) ** 0.5)
    for i, t in enumerate(sched.timesteps):
        abar = torch.tensor(1.0 / (1.0 + float(sigmas[i]) ** 2), dtype=torch.float64)
        eps = data.eps(x, abar.sqrt().reshape(1), (1 - abar).reshape(1, 1), (1 - abar).sqrt().reshape(1, 1))
        if i == 0 and analytic_first_step:
            x0 = (x - (1 - abar).sqrt() * eps) / abar.sqrt()
            eps = x / (1 - abar).sqrt()
            x = x + abar.sqrt() * x0
        x = sched.step(eps, t, x).prev_sample
    return x


# ---------------------------------------------------------------------------------------------- sweep
def all_configs(quick=False):
    if quick:
        return [dict(solver_order=o, corrector=c, grid=g, t_min=tm, start=s) for o, c, g, tm, s in itertools.product(
            (3,), ("none", "unic"), ("power2.5", "logsnr"), (1e-3, 0.05), ("prior", "sigma10"))]
    return [dict(zip(FACTORS, v)) for v in itertools.product(*FACTORS.values())]


def score(data, ref, x):
    return (sa.frechet(x, ref), sa.sliced_w2(x, ref)) if torch.all(torch.isfinite(x)) else (float("nan"),) * 2


def sweep(data, ref, nfes, configs, n, seed, log, name):
    out = {}
    for nfe in nfes:
        out[nfe] = {}
        t0 = time.time()
        for cfg in configs:
            try:
                x = sa.run_psld_scheduler(make_scheduler(cfg), data, nfe, n, seed)
                out[nfe][key(cfg)] = score(data, ref, x)
            except (ValueError, FloatingPointError) as e:  # e.g. a grid that collapses at this NFE
                out[nfe][key(cfg)] = (float("nan"), float("nan"))
                log(f"  [{name}] NFE {nfe} {key(cfg)}: {type(e).__name__}: {e}")
        best = sorted(out[nfe].items(), key=lambda kv: kv[1][0] if kv[1][0] == kv[1][0] else float("inf"))[:3]
        log(f"  [{name}] NFE {nfe}: {len(configs)} cells in {time.time() - t0:.0f} s; best " +
            ", ".join(f"{k} {v[0]:.4g}" for k, v in best))
    return out


def parse_key(k, configs):
    return next(c for c in configs if key(c) == k)


def refine(data, ref, nfes, res, configs, n, seed, top, log, name):
    """The ``top`` cells of each NFE again with ``lower_order_final=True`` and with ``interpolation='logsnr'``."""
    extra = {}
    for nfe in nfes:
        ranked = sorted((v[0], k) for k, v in res[nfe].items() if v[0] == v[0])[:top]
        for _, k in ranked:
            base = parse_key(k, configs)
            for variant in (dict(lower_order_final=True), dict(interpolation="logsnr")):
                cfg = {**base, **variant}
                x = sa.run_psld_scheduler(make_scheduler(cfg), data, nfe, n, seed)
                extra.setdefault(nfe, {})[key(cfg)] = score(data, ref, x)
                configs.append(cfg) if cfg not in configs else None
        log(f"  [{name}] NFE {nfe}: refined the top {top}")
    return extra


def factor_table(res, nfes, configs):
    """Per factor level: the best FD over all other factors (how much each choice matters on its own)."""
    by_key = {key(c): c for c in configs}
    lines = ["| factor | level | " + " | ".join(f"NFE {n}" for n in nfes) + " |", "|---|---|" + "---|" * len(nfes)]
    for f, levels in FACTORS.items():
        for lv in levels:
            cells = []
            for nfe in nfes:
                vals = [v[0] for k, v in res[nfe].items() if k in by_key and by_key[k].get(f) == lv and v[0] == v[0]
                        and set(by_key[k]) == set(FACTORS)]
                cells.append(f"{min(vals):.3g}" if vals else "—")
            lines.append(f"| {f} | {lv} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def goal_check(digits, nfes, selected, n, log):
    """Digits KDE, 5 fresh seeds: the selected PSLD configuration, Diffusers' UniPC / DPM++2M (stock schedule, best
    spacing by seed 7), UniPC on the PSLD row's σ schedule, and the noise floor."""
    ref = digits.sample(n, seed=101)
    out = {}
    for nfe in nfes:
        cfg = selected[nfe]
        rows = {}
        sched = make_scheduler(cfg)
        sched.set_timesteps(nfe)
        sig = noise_level(sched.sde, sched.exact_timesteps.numpy())  # the NFE evaluation σ's (last: σ_min)
        makers = {SELECTED: lambda sd: sa.run_psld_scheduler(make_scheduler(cfg), digits, nfe, n, sd),
                  "PSLD gDDIM, the same without the analytic first step (data-free start at σ_max)":
                      lambda sd: sa.run_psld_scheduler(make_scheduler({**cfg, "analytic_first_step": False}), digits,
                                                       nfe, n, sd),
                  "PSLD gDDIM 3M, package defaults": lambda sd: sa.run_psld_scheduler(GDDIMMultistepScheduler(),
                                                                                      digits, nfe, n, sd),
                  "PSLD gDDIM 3M + UniC, other settings default": lambda sd: sa.run_psld_scheduler(
                      GDDIMMultistepScheduler(corrector="unic"), digits, nfe, n, sd)}
        for vname, make in (("UniPC", sa.VP_SCHEDULERS["UniPC"]), ("DPM-Solver++ 2M", sa.VP_SCHEDULERS["DPM-Solver++ 2M"])):
            best = min(("linspace", "trailing"),
                       key=lambda sp: sa.frechet(sa.run_vp(make(sp), digits, nfe, n, 7), ref))
            makers[f"VP {vname} (stock schedule, {best})"] = (lambda m, sp: lambda sd: sa.run_vp(m(sp), digits, nfe, n, sd))(make, best)
        makers["VP UniPC on the PSLD row's σ schedule"] = lambda sd: run_vp_sigmas(
            lambda: UniPCMultistepScheduler(), digits, sig, n, sd)
        makers["VP UniPC on the PSLD row's σ schedule, with the analytic first step"] = lambda sd: run_vp_sigmas(
            lambda: UniPCMultistepScheduler(), digits, sig, n, sd, analytic_first_step=True)
        makers["VP DPM-Solver++ 2M on the PSLD row's σ schedule"] = lambda sd: run_vp_sigmas(
            lambda: DPMSolverMultistepScheduler(solver_order=2), digits, sig, n, sd)
        makers["noise floor (true vs true)"] = lambda sd: digits.sample(n, seed=sd)
        for name, mk in makers.items():
            vals = np.array([score(digits, ref, mk(sd)) for sd in GOAL_SEEDS])
            rows[name] = {"fd": vals[:, 0].tolist(), "sw": vals[:, 1].tolist()}
            log(f"  goal NFE {nfe:3d} {name:60s} FD {vals[:, 0].mean():.4g} ± {vals[:, 0].std(ddof=1):.2g}")
        out[nfe] = {"selected": key(cfg), "sigmas": sig.tolist(), "rows": rows}
    return out


# ---------------------------------------------------------------------------------------------- report
def _f(v):
    return "nan" if v != v else f"{v:.3g}"


def write_report(path, command, machine, wall, nfes, res, extra, selected, goals, configs, n_mix, n_dig):
    md = ["# Low-NFE sweep of the PSLD gDDIM multistep sampler (exact scores)\n",
          f"Command: `{command}`  \nMachine: {machine}; wall time {wall:.0f} s.  \n"
          f"Cells: PSLD Γ = 0.01 with the exact ε; Fréchet distance (FD) of the data half to true samples. Mixture "
          f"(selection set): {n_mix} samples, sampling seed 404, reference seed 303. Digits KDE (test set): {n_dig} "
          f"samples, sampling seed 7, reference seed 101; goal check with sampling seeds {list(GOAL_SEEDS)}. "
          f"NFE = model evaluations (the final call at t_min included; no evaluation at t = 1 when the start is "
          f"σ_max = 80, 30 or 10 with the analytic first step). `lower_order_final=False` unless named.\n"]
    md.append("## Selected configuration per NFE (lowest FD on the mixture) and the goal check on the digits KDE\n")
    md.append("| NFE | selected (mixture) | mixture FD | digits FD (seed 7) | digits best cell (seed 7; not used to "
              "select) |\n|---|---|---|---|---|")
    for nfe in nfes:
        k = key(selected[nfe])
        dig = {**res["digits"][nfe], **extra["digits"].get(nfe, {})}
        mix = {**res["mixture"][nfe], **extra["mixture"].get(nfe, {})}
        bd = min((v[0], kk) for kk, v in dig.items() if v[0] == v[0])
        md.append(f"| {nfe} | `{k}` | {_f(mix[k][0])} | {_f(dig.get(k, (float('nan'),))[0])} | `{bd[1]}` {_f(bd[0])} |")
    if goals:
        md.append("\n### Goal check: digits KDE, 5 fresh sampling seeds, FD mean ± s.d.\n")
        names = list(next(iter(goals.values()))["rows"])
        for metric, label in (("fd", "FD"), ("sw", "sliced W2")):
            md.append(f"\n{label}, mean ± s.d. over the 5 seeds:\n")
            md.append("| row | " + " | ".join(f"NFE {nfe}" for nfe in goals) + " |\n|---|" + "---|" * len(goals))
            for nm in names:
                cells = [f"{np.mean(g['rows'][nm][metric]):.3g} ± {np.std(g['rows'][nm][metric], ddof=1):.2g}"
                         for g in goals.values()]
                md.append(f"| {nm} | " + " | ".join(cells) + " |")
        md.append("")
        for nfe, g in goals.items():
            rows = {nm: np.mean(v["fd"]) for nm, v in g["rows"].items()}
            floor = rows["noise floor (true vs true)"]
            uni = next(v for kk, v in rows.items() if kk.startswith("VP UniPC (stock"))
            same = rows["VP UniPC on the PSLD row's σ schedule, with the analytic first step"]
            md.append(f"* NFE {nfe} (`{g['selected']}`; σ: {', '.join(f'{s:.3g}' for s in g['sigmas'])}): PSLD "
                      f"{rows[SELECTED]:.3g} = {rows[SELECTED] / floor:.2f} × floor ({floor:.3g}); "
                      f"{rows[SELECTED] / uni:.2f} × Diffusers' UniPC on its stock schedule ({uni:.3g}); "
                      f"{rows[SELECTED] / same:.2f} × UniPC on the same σ schedule with the analytic first step "
                      f"({same:.3g}).")
    for dname in ("digits", "mixture"):
        md.append(f"\n## {dname}: effect of each factor (best FD over all other factors; full factorial cells)\n")
        md.append(factor_table(res[dname], nfes, configs))
        md.append(f"\n## {dname}: the 15 best cells per NFE (incl. the refinements)\n")
        for nfe in nfes:
            cells = sorted(((v[0], v[1], k) for k, v in {**res[dname][nfe], **extra[dname].get(nfe, {})}.items()
                            if v[0] == v[0]))[:15]
            md.append(f"**NFE {nfe}**: " + "; ".join(f"`{k}` {fd:.3g}" for fd, _, k in cells) + "\n")
    md.append("\nKeys: `o<solver_order>-<corrector>-<grid>-tmin<t_min>-<start>`; grids: power ρ in t, log-SNR "
              "uniform, EDM ρ = 7 in σ; starts: `prior` = t = 1, `sigmaX` = σ_max = X with the analytic first step. "
              "All cells are in the JSON.\n")
    with open(path + ".md", "w") as f:
        f.write("\n".join(md))


def machine() -> str:
    cpu = platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs (shared), 1 torch thread, torch {torch.__version__}"


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="few cells, 300 samples (writes *_quick)")
    p.add_argument("--nfes", default="5,8,10,20")
    p.add_argument("--top", type=int, default=5, help="cells per NFE re-run with lower_order_final / logsnr")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--goal_only", action="store_true",
                   help="keep the cells and the selection of the saved JSON; re-run only the goal check")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    nfes = [int(x) for x in args.nfes.split(",")]
    n_mix, n_dig = (300, 300) if args.quick else (1000, 2000)
    configs = all_configs(args.quick)
    t_start = time.time()
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    mixture, digits = sa.make_mixture(), sa.make_digits_kde()
    suffix = "_quick" if args.quick else ""
    path = os.path.join(args.out, f"low_nfe_sweep{suffix}")
    if args.goal_only:
        with open(path + ".json") as f:
            saved = json.load(f)
        nfes = [int(x) for x in saved["selected"]]
        res = {d: {int(k): {kk: tuple(v) for kk, v in r.items()} for k, r in c.items()} for d, c in saved["cells"].items()}
        extra = {d: {int(k): {kk: tuple(v) for kk, v in r.items()} for k, r in c.items()} for d, c in saved["refined"].items()}
        selected = {int(k): {kk: v for kk, v in c.items() if kk != "key"} for k, c in saved["selected"].items()}
        goals = goal_check(digits, nfes, selected, n_dig, log)
        wall = saved["wall_s"] + time.time() - t_start
        write_report(path, saved["command"] + "; goal check re-run with --goal_only", machine(), wall, nfes, res, extra,
                     selected, goals, configs, n_mix, n_dig)
        saved.update(goal={str(nfe): g for nfe, g in goals.items()}, wall_s=wall, log=saved["log"] + lines,
                     command=saved["command"] + "; then --goal_only")
        with open(path + ".json", "w") as f:
            json.dump(saved, f, indent=1)
        return
    sets = {"mixture": (mixture, mixture.sample(n_mix, seed=303), n_mix, 404),
            "digits": (digits, digits.sample(n_dig, seed=101), n_dig, 7)}
    res, extra = {}, {}
    for name, (data, ref, n, seed) in sets.items():
        log(f"{name}: {len(configs)} cells × NFE {nfes}")
        res[name] = sweep(data, ref, nfes, configs, n, seed, log, name)
    base_configs = list(configs)
    for name, (data, ref, n, seed) in sets.items():
        extra[name] = {}
    # refinements: the mixture's top cells (selection) and the digits' top cells (reported only)
    for name, (data, ref, n, seed) in sets.items():
        ex = refine(data, ref, nfes, res["mixture"], configs, n, seed, args.top, log, name)
        for nfe, d in ex.items():
            extra[name].setdefault(nfe, {}).update(d)
    selected = {}
    for nfe in nfes:
        mix = {**res["mixture"][nfe], **extra["mixture"].get(nfe, {})}
        k = min((v[0], kk) for kk, v in mix.items() if v[0] == v[0])[1]
        selected[nfe] = parse_key(k, configs)
        log(f"selected at NFE {nfe}: {k}")
    goals = goal_check(digits, nfes, selected, n_dig, log) if not args.quick else {}
    cmd = "OMP_NUM_THREADS=1 nice -n 5 python benchmarks/low_nfe_sweep.py" + (
        " " + shlex.join(argv if argv is not None else sys.argv[1:]) if (argv or sys.argv[1:]) else "")
    wall = time.time() - t_start
    write_report(path, cmd, machine(), wall, nfes, res, extra, selected, goals, base_configs, n_mix, n_dig)
    with open(path + ".json", "w") as f:
        json.dump({"command": cmd, "machine": machine(), "wall_s": wall, "nfes": nfes,
                   "seeds": {"mixture": {"sampling": 404, "reference": 303, "n": n_mix},
                             "digits": {"sampling": 7, "reference": 101, "n": n_dig, "goal": list(GOAL_SEEDS)}},
                   "cells": {d: {str(nfe): {k: list(v) for k, v in r.items()} for nfe, r in res[d].items()} for d in res},
                   "refined": {d: {str(nfe): {k: list(v) for k, v in r.items()} for nfe, r in extra[d].items()}
                               for d in extra},
                   "selected": {str(nfe): {**selected[nfe], "key": key(selected[nfe])} for nfe in nfes},
                   "goal": {str(nfe): g for nfe, g in goals.items()}, "log": lines}, f, indent=1)
    log(f"done in {wall:.0f} s")


if __name__ == "__main__":
    main()
