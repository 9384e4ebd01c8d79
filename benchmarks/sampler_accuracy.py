r"""Exact-score sampler benchmark: PSLD samplers vs Diffusers' VP schedulers.

Every sampler is driven by the *exact* ε of the data law (no network), so the distances measure
discretisation error only. Two data sets whose diffused marginals are closed form under PSLD and VP:

* ``mixture``: a 64-d Gaussian mixture, 6 components, unequal weights, anisotropic covariances
  (eigenvalues log-uniform in [0.003, 0.3], random rotations). Used for tuning λ, λ_s, striding.
* ``digits``: a Gaussian kernel density over scikit-learn digits (64-d, pixels scaled to [-1, 1]),
  500 images as kernel centres, isotropic bandwidth chosen by held-out log-likelihood on 300 other
  images. Reported untuned (the mixture's tuned settings are reused).

Exact ε. For a component N(μ, U diag(λ) Uᵀ) and a diffusion with HSM mean coefficients a (k-vector)
and covariance Σ_t (k×k) the marginal covariance is, per eigen-direction r of the component, the k×k
block ``a aᵀ λ_r + Σ_t`` in the rotated basis (I_k ⊗ Uᵀ): the score is a rotation plus d small k×k
solves (no 128×128 Cholesky). ``ε = -(L_t ⊗ I)ᵀ ∇log p_t``. VP on Diffusers' discrete schedule is the
k = 1 case with a = √ᾱ, Σ = 1 - ᾱ, L = √(1 - ᾱ). The smoke test checks this against
:class:`diffusers_psld.exact.GaussianMixture` (an independent full-covariance route).

Metrics: Fréchet distance (means and covariances) and sliced Wasserstein-2 distance (256 random
directions) of the data half of 2000 generated samples to 2000 fresh true samples; the noise floor
is the same distance between two independent true sample sets. Fixed seeds everywhere.

Low NFE: the rows ``gDDIM multistep 3M + UniC`` (the corrector option, other settings default) and ``gDDIM
low-NFE (sweep-selected)`` (order, corrector, time grid, σ_min and start chosen per NFE band on the mixture by
``benchmarks/low_nfe_sweep.py``, read from its JSON) sit next to Diffusers' UniPC and DPM-Solver++ at NFE 5 and 8.
A schedule that starts below t = 1 (``sigma_max``) draws its first state from ``sample_prior``'s data-free law
N(0, Σ_{t_0}), which ``analytic_first_step`` completes.

Usage::

    .venv/bin/python benchmarks/sampler_accuracy.py            # full run (NFE 5-250, 2000 samples; ~1 h here)
    .venv/bin/python benchmarks/sampler_accuracy.py --quick    # smoke test
    .venv/bin/python benchmarks/sampler_accuracy.py --nfes 10,20 --num_samples 4000 --samplers gDDIM,DPM --tag _x

``--samplers`` selects rows by substring; ``--goal_seeds`` (default 5) re-runs the 3 best PSLD and the
3 best VP rows of each NFE with fresh sampling seeds (mean ± s.d.; each side keeps its best mean): at
NFE >= 50 every good sampler sits at the finite-sample floor and single-seed differences are noise.

Outputs ``benchmarks/results/sampler_accuracy{_quick}.md``, ``.png`` and ``.json`` (all numbers; ``--replot``
redraws the PNG from it).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import sys
import time

import numpy as np
import scipy.linalg
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler, UniPCMultistepScheduler  # noqa: E402

from diffusers_psld.ode import probability_flow_sample  # noqa: E402
from diffusers_psld.schedulers.scheduling_conjugate import ConjugateScheduler  # noqa: E402
from diffusers_psld.schedulers.scheduling_gddim import GDDIMMultistepScheduler  # noqa: E402
from diffusers_psld.schedulers.scheduling_psld import PSLDScheduler  # noqa: E402
from diffusers_psld.schedulers.scheduling_splitting import SplittingScheduler  # noqa: E402

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


# ---------------------------------------------------------------------------------------------- data
class RotatedMixture:
    """Σ_j w_j N(μ_j, U_j diag(λ_j) U_jᵀ); ``shared=True``: one U = I and one λ for all (a KDE)."""

    def __init__(self, weights, means, eigvecs, eigvals, shared=False):
        self.w = torch.as_tensor(weights, dtype=torch.float64)
        self.w = self.w / self.w.sum()
        self.mu = torch.as_tensor(means, dtype=torch.float64)
        self.U = eigvecs  # [J, d, d] or None (shared isotropic)
        self.lam = torch.as_tensor(eigvals, dtype=torch.float64)  # [J, d] or scalar
        self.shared = shared
        self.d = self.mu.shape[1]

    def sample(self, n, seed):
        g = torch.Generator().manual_seed(seed)
        comp = torch.multinomial(self.w, n, replacement=True, generator=g)
        noise = torch.randn(n, self.d, dtype=torch.float64, generator=g)
        if self.shared:
            return self.mu[comp] + self.lam.sqrt() * noise
        return self.mu[comp] + torch.einsum("nij,nj->ni", self.U[comp], self.lam[comp].sqrt() * noise)

    def score(self, z, a, Sig):
        """∇ log p of the marginal at z ``[B, k, d]`` for mean coefficients a ``[k]`` and Σ ``[k, k]``."""
        if self.shared:
            C = torch.outer(a, a) * self.lam + Sig  # [k, k], same for every component and direction
            W = torch.linalg.inv(C)
            Wz = torch.einsum("ij,bjd->bid", W, z)
            Wa = W @ a
            u = torch.einsum("i,bid->bd", a, Wz)  # aᵀ W z per coordinate
            aWa = a @ Wa
            logits = u @ self.mu.T - 0.5 * aWa * (self.mu ** 2).sum(1)[None] + torch.log(self.w)[None]
            r = torch.softmax(logits, dim=1)
            mbar = r @ self.mu  # [B, d]
            return -Wz + Wa[None, :, None] * mbar[:, None, :]
        logps, scores = [], []
        for j in range(len(self.w)):
            C = torch.outer(a, a)[None] * self.lam[j][:, None, None] + Sig[None]  # [d, k, k]
            W = torch.linalg.inv(C)
            logdet = torch.logdet(C).sum()
            v = torch.einsum("bkd,de->bke", z - a[None, :, None] * self.mu[j][None, None], self.U[j])  # rotate
            Wv = torch.einsum("eij,bje->bie", W, v)
            logps.append(-0.5 * (v * Wv).sum((1, 2)) - 0.5 * logdet + torch.log(self.w[j]))
            scores.append(-torch.einsum("bke,de->bkd", Wv, self.U[j]))
        r = torch.softmax(torch.stack(logps), dim=0)  # [J, B]
        return (r[:, :, None, None] * torch.stack(scores)).sum(0)

    def eps(self, z_flat, a, Sig, L):
        """Exact ε = -(L ⊗ I)ᵀ ∇log p for flat states ``[B, k*d]`` (components stacked)."""
        k = a.shape[0]
        z = z_flat.to(torch.float64).reshape(z_flat.shape[0], k, self.d)
        s = self.score(z, a, Sig)
        return (-torch.einsum("ji,bjd->bid", L, s)).reshape(z_flat.shape).to(z_flat.dtype)


def make_mixture(d=64, J=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.tensor([0.35, 0.25, 0.15, 0.12, 0.08, 0.05])[:J]
    mu = 0.6 * torch.randn(J, d, generator=g, dtype=torch.float64)
    U = torch.linalg.qr(torch.randn(J, d, d, generator=g, dtype=torch.float64))[0]
    lam = torch.exp(torch.empty(J, d, dtype=torch.float64).uniform_(math.log(3e-3), math.log(0.3), generator=g))
    return RotatedMixture(w, mu, U, lam)


def make_digits_kde(n_centres=500, n_val=300, seed=0):
    from sklearn.datasets import load_digits

    X = torch.as_tensor(load_digits().data, dtype=torch.float64) / 8.0 - 1.0  # [1797, 64] in [-1, 1]
    perm = torch.randperm(X.shape[0], generator=torch.Generator().manual_seed(seed))
    centres, val = X[perm[:n_centres]], X[perm[n_centres:n_centres + n_val]]
    best = None
    for bw in (0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5):  # held-out log-likelihood of the KDE
        d2 = torch.cdist(val, centres) ** 2
        ll = (torch.logsumexp(-0.5 * d2 / bw ** 2, 1) - math.log(n_centres) - 0.5 * 64 * math.log(2 * math.pi * bw ** 2)).mean()
        if best is None or ll > best[1]:
            best = (bw, ll.item())
    kde = RotatedMixture(torch.ones(n_centres), centres, None, torch.tensor(best[0] ** 2), shared=True)
    kde.bandwidth = best[0]
    return kde


# ---------------------------------------------------------------------------------------------- metrics
def frechet(x, y):
    x, y = x.numpy(), y.numpy()
    m1, m2 = x.mean(0), y.mean(0)
    c1, c2 = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
    covmean = scipy.linalg.sqrtm(c1 @ c2)
    if np.iscomplexobj(covmean):
        covmean = covmean.real
    return float(((m1 - m2) ** 2).sum() + np.trace(c1 + c2 - 2 * covmean))


_DIRS = {}


def sliced_w2(x, y, n_dirs=256):
    d = x.shape[1]
    if d not in _DIRS:
        g = torch.Generator().manual_seed(1234)
        v = torch.randn(n_dirs, d, generator=g, dtype=torch.float64)
        _DIRS[d] = v / v.norm(dim=1, keepdim=True)
    v = _DIRS[d]
    px, _ = torch.sort(x @ v.T, dim=0)
    py, _ = torch.sort(y @ v.T, dim=0)
    return float(((px - py) ** 2).mean().sqrt())


# ---------------------------------------------------------------------------------------------- drivers
def run_psld_scheduler(sched, data, nfe, n, seed):
    sched.set_timesteps(nfe)
    sde = sched.sde
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((n, 2 * data.d), generator=g, dtype=torch.float64)  # N(0, Σ_t0) if t0 < 1
    calls = 0
    for t in sched.timesteps:
        kern = sde.hsm_kernel(float(t))
        eps = data.eps(z, kern.mean_coef, kern.cov, kern.chol)
        z = sched.step(eps, t, z, generator=g).prev_sample
        calls += 1
    assert calls == nfe
    return z[:, : data.d]


def run_rk45(data, rtol, n, seed, sde_sched=None):
    sched = sde_sched or PSLDScheduler(sampler="pf_euler")
    sde = sched.sde
    g = torch.Generator().manual_seed(seed)
    z = sched.sample_prior((n, 2 * data.d), generator=g, dtype=torch.float64)

    def model(zz, t):
        kern = sde.hsm_kernel(float(t))
        return data.eps(zz, kern.mean_coef, kern.cov, kern.chol)

    out = probability_flow_sample(model, sde, z, rtol=rtol, atol=rtol)
    return out.samples[:, : data.d], out.nfe


def run_vp(sched, data, nfe, n, seed):
    sched.set_timesteps(nfe)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, data.d, generator=g, dtype=torch.float64)
    ac = sched.alphas_cumprod.to(torch.float64)
    for t in sched.timesteps:
        abar = ac[int(t)]
        a = abar.sqrt().reshape(1)
        eps = data.eps(x, a, (1 - abar).reshape(1, 1), (1 - abar).sqrt().reshape(1, 1))
        kw = {"generator": g} if isinstance(sched, DDPMScheduler) else {}
        x = sched.step(eps, t, x, **kw).prev_sample
    return x


VP_SCHEDULERS = {
    "DDIM": lambda sp: DDIMScheduler(timestep_spacing=sp, clip_sample=False),  # default clip_sample=True biases data outside [-1, 1]
    "DPM-Solver++ 2M": lambda sp: DPMSolverMultistepScheduler(solver_order=2, timestep_spacing=sp),
    "DPM-Solver++ 3M": lambda sp: DPMSolverMultistepScheduler(solver_order=3, timestep_spacing=sp),
    "UniPC": lambda sp: UniPCMultistepScheduler(timestep_spacing=sp),
    "DDPM": lambda sp: DDPMScheduler(timestep_spacing=sp, clip_sample=False),
}


SWEEP_JSON = os.path.join(RESULTS, "low_nfe_sweep.json")


def low_nfe_config(nfe: int, path: str = SWEEP_JSON):
    """The configuration ``benchmarks/low_nfe_sweep.py`` selected (on the mixture) for the NFE band of ``nfe``:
    that of the largest swept NFE <= ``nfe`` (the smallest swept NFE below it). None without the sweep's JSON."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        sel = {int(k): v for k, v in json.load(f)["selected"].items()}
    band = max([m for m in sel if m <= nfe] or [min(sel)])
    return {k: v for k, v in sel[band].items() if k != "key"}


def low_nfe_scheduler(nfe: int):
    """``GDDIMMultistepScheduler`` with the sweep-selected order, corrector, time grid, σ_min and start for ``nfe``."""
    from low_nfe_sweep import make_scheduler  # late: that module imports this one

    cfg = low_nfe_config(nfe)
    if cfg is None:
        raise FileNotFoundError(f"{SWEEP_JSON} is missing: run benchmarks/low_nfe_sweep.py first")
    return make_scheduler(cfg)


def psld_samplers(tuned):
    """name -> factory(nfe) of a configured PSLD scheduler (tuned: per-NFE settings from the mixture)."""
    def pick(key, nfe, default):
        return tuned.get(key, {}).get(str(nfe), default)

    rows = {
        "EM (uniform)": lambda nfe: PSLDScheduler(sampler="em", striding="uniform"),
        "EM (quadratic)": lambda nfe: PSLDScheduler(sampler="em", striding="quadratic"),
        "SSCS (uniform)": lambda nfe: PSLDScheduler(sampler="sscs", striding="uniform"),
        "SSCS (quadratic)": lambda nfe: PSLDScheduler(sampler="sscs", striding="quadratic"),
        "PF-ODE Euler (quadratic)": lambda nfe: PSLDScheduler(sampler="pf_euler", striding="quadratic"),
        "PF-ODE Heun (quadratic)": lambda nfe: PSLDScheduler(sampler="pf_heun", striding="quadratic"),
        "Exp. integrator λ=0": lambda nfe: ConjugateScheduler(conjugate_b="zero",
                                                             **pick("conj0", nfe, {"striding": "quadratic"})),
        "λ-DDIM-II (B=λ1, tuned)": lambda nfe: ConjugateScheduler(conjugate_b="ones", **pick("conj", nfe, {})),
        "gDDIM conj. (ε_R, B=0, tuned)": lambda nfe: ConjugateScheduler(eps_basis="gddim", conjugate_b="zero",
                                                                         **pick("gconj0", nfe, {})),
        "λ-DDIM-II ε_R (tuned)": lambda nfe: ConjugateScheduler(eps_basis="gddim", conjugate_b="ones",
                                                                **pick("gconj", nfe, {})),
        "gDDIM multistep 2M (tuned)": lambda nfe: GDDIMMultistepScheduler(solver_order=2, **pick("gms2", nfe, {})),
        "gDDIM multistep 3M (tuned)": lambda nfe: GDDIMMultistepScheduler(solver_order=3, **pick("gms3", nfe, {})),
        "gDDIM multistep 3M (defaults)": lambda nfe: GDDIMMultistepScheduler(),
        "gDDIM multistep 3M + UniC": lambda nfe: GDDIMMultistepScheduler(corrector="unic"),
        "gDDIM low-NFE (sweep-selected)": low_nfe_scheduler,
        "RVV (reduced)": lambda nfe: SplittingScheduler(sampler="rvv", striding="quadratic"),
        "NVV (naive)": lambda nfe: SplittingScheduler(sampler="nvv", striding="quadratic"),
        "NOBA (naive, λs=1)": lambda nfe: SplittingScheduler(sampler="noba", striding="quadratic"),
        "ROBA (reduced, tuned)": lambda nfe: SplittingScheduler(sampler="roba", **pick("roba", nfe, {})),
        "CSE (conj. split)": lambda nfe: SplittingScheduler(sampler="cse", striding="quadratic"),
        "CVV (conj. split, tuned)": lambda nfe: SplittingScheduler(sampler="cvv", **pick("cvv", nfe, {})),
        "COBA (conj. split, tuned)": lambda nfe: SplittingScheduler(sampler="coba", **pick("coba", nfe, {})),
    }
    if low_nfe_config(10) is None:  # the sweep has not run: no selected configuration to show
        rows.pop("gDDIM low-NFE (sweep-selected)")
    return rows


TUNING_GRIDS = {
    "conj0": [dict(striding=s) for s in ("uniform", "quadratic")],
    "conj": [dict(striding=s, conjugate_lambda=l) for s in ("uniform", "quadratic") for l in (0.0, 0.5, 1.0, 2.0, 3.0)],
    "roba": [dict(striding=s, lambda_s=l) for s in ("uniform", "quadratic") for l in (0.0, 0.5, 1.0)],
    "cvv": [dict(striding=s, conjugate_lambda=l) for s in ("uniform", "quadratic") for l in (0.0, 1.0, 2.0)],
    "coba": [dict(striding=s, conjugate_lambda=l, lambda_s=ls) for s in ("quadratic",) for l in (0.0, 1.0)
             for ls in (0.5, 1.0)],
    "gconj0": [dict(striding=s) for s in ("uniform", "quadratic")],
    "gconj": [dict(striding=s, conjugate_lambda=l) for s in ("uniform", "quadratic") for l in (0.0, 0.5, 1.0)],
    "gms2": [dict(time_spacing="power", spacing_power=r, interpolation=i) for r in (2.0, 2.5, 3.0, 4.0)
             for i in ("time", "logsnr")] + [dict(time_spacing="logsnr", interpolation=i) for i in ("time", "logsnr")],
}
TUNING_GRIDS["gms3"] = TUNING_GRIDS["gms2"]
_TUNE_MAKERS = {
    "conj0": lambda kw: ConjugateScheduler(conjugate_b="zero", **kw),
    "conj": lambda kw: ConjugateScheduler(conjugate_b="ones", **kw),
    "roba": lambda kw: SplittingScheduler(sampler="roba", **kw),
    "cvv": lambda kw: SplittingScheduler(sampler="cvv", **kw),
    "coba": lambda kw: SplittingScheduler(sampler="coba", **kw),
    "gconj0": lambda kw: ConjugateScheduler(eps_basis="gddim", conjugate_b="zero", **kw),
    "gconj": lambda kw: ConjugateScheduler(eps_basis="gddim", conjugate_b="ones", **kw),
    "gms2": lambda kw: GDDIMMultistepScheduler(solver_order=2, **kw),
    "gms3": lambda kw: GDDIMMultistepScheduler(solver_order=3, **kw),
}
# which tuning key each tuned row reads
_ROW_TUNE_KEY = {"Exp. integrator λ=0": "conj0", "λ-DDIM-II (B=λ1, tuned)": "conj", "ROBA (reduced, tuned)": "roba",
                 "CVV (conj. split, tuned)": "cvv", "COBA (conj. split, tuned)": "coba",
                 "gDDIM conj. (ε_R, B=0, tuned)": "gconj0", "λ-DDIM-II ε_R (tuned)": "gconj",
                 "gDDIM multistep 2M (tuned)": "gms2", "gDDIM multistep 3M (tuned)": "gms3"}


def selected(name, patterns):
    """Row filter of ``--samplers``: no patterns = all; otherwise a case-insensitive substring match."""
    return not patterns or any(p.lower() in name.lower() for p in patterns)


def tune(data, ref, nfes, n, seed, log, keys=None):
    """Per-NFE best setting by Fréchet distance on the mixture (a separate sampling seed)."""
    tuned = {}
    for key, grid in TUNING_GRIDS.items():
        if keys is not None and key not in keys:
            continue
        tuned[key] = {}
        for nfe in nfes:
            scores = []
            for kw in grid:
                x = run_psld_scheduler(_TUNE_MAKERS[key](kw), data, nfe, n, seed)
                fd = frechet(x, ref) if torch.all(torch.isfinite(x)) else float("inf")
                scores.append((fd, kw))
            best = min(scores, key=lambda s: s[0])
            tuned[key][str(nfe)] = best[1]
            log(f"  tune {key:6s} NFE {nfe:4d}: best {best[1]} FD {best[0]:.4g}")
    return tuned


def evaluate(data, name, nfes, n, n_ref, tuned, log, rk45_tols, patterns=(), goal_seeds=()):
    ref = data.sample(n_ref, seed=101)
    floor_x = data.sample(n, seed=202)
    rows = {"noise floor (true vs true)": {nfe: (frechet(floor_x, ref), sliced_w2(floor_x, ref)) for nfe in nfes}}
    seed = 7
    makers = {}
    for sname, make in psld_samplers(tuned).items():
        if not selected(sname, patterns):
            continue
        makers[sname] = make
        rows[sname] = {}
        for nfe in nfes:
            t0 = time.time()
            x = run_psld_scheduler(make(nfe), data, nfe, n, seed)
            ok = bool(torch.all(torch.isfinite(x)))
            rows[sname][nfe] = (frechet(x, ref), sliced_w2(x, ref)) if ok else (float("nan"), float("nan"))
            log(f"  [{name}] {sname:28s} NFE {nfe:4d}: FD {rows[sname][nfe][0]:.4g} SW {rows[sname][nfe][1]:.4g} "
                f"({time.time() - t0:.1f}s)")
    rk = {}
    for tol in (rk45_tols if selected("PF-ODE RK45", patterns) else ()):
        x, nfe = run_rk45(data, tol, n, seed)
        rk[nfe] = (frechet(x, ref), sliced_w2(x, ref))
        log(f"  [{name}] RK45 (dopri5) rtol=atol={tol:g}: NFE {nfe} FD {rk[nfe][0]:.4g} SW {rk[nfe][1]:.4g}")
    if rk:
        rows["PF-ODE RK45 (adaptive; NFE measured)"] = rk
    for vname, make in VP_SCHEDULERS.items():
        if not selected(f"VP {vname}", patterns):
            continue
        rows[f"VP {vname}"] = {}
        for nfe in nfes:
            best = None
            for sp in ("leading" if vname in ("DDIM", "DDPM") else "linspace", "trailing"):
                x = run_vp(make(sp), data, nfe, n, seed)
                r = (frechet(x, ref), sliced_w2(x, ref), sp) if torch.all(torch.isfinite(x)) else (float("nan"),) * 2 + (sp,)
                if best is None or r[0] < best[0]:
                    best = r
            rows[f"VP {vname}"][nfe] = best
            log(f"  [{name}] VP {vname:20s} NFE {nfe:4d}: FD {best[0]:.4g} SW {best[1]:.4g} ({best[2]})")
    goal = goal_check(data, name, nfes, n, ref, rows, makers, goal_seeds, log) if goal_seeds else {}
    return rows, goal


# declared in advance: the recommended PSLD sampler and the sweep-selected low-NFE configuration
GOAL_ALWAYS = ("gDDIM multistep 3M (defaults)", "gDDIM low-NFE (sweep-selected)")


def goal_check(data, name, nfes, n, ref, rows, makers, seeds, log, top=3):
    """Re-run the ``top`` best PSLD and VP rows of each NFE (ranked by their seed-7 FD; on the PSLD side also the
    recommended default, :data:`GOAL_ALWAYS`) with fresh sampling seeds and keep, per side, the row with the lowest
    mean FD: mean ± standard deviation of FD and SW. A single seed cannot rank converged samplers (their
    differences are sampling noise), and picking by one seed favours lucky rows; the fresh seeds remove that
    selection bias."""
    out = {}
    for nfe in nfes:
        def ranked(is_vp):
            cands = [(res[nfe][0], nm) for nm, res in rows.items() if nfe in res and not nm.startswith("noise")
                     and not nm.startswith("PF-ODE RK45") and nm.startswith("VP ") == is_vp and res[nfe][0] == res[nfe][0]]
            return [nm for _, nm in sorted(cands)[:top]]

        cand_p, cand_v = ranked(False), ranked(True)
        cand_p += [nm for nm in GOAL_ALWAYS if nm in makers and nm not in cand_p and nfe in rows.get(nm, {})]
        if not cand_p or not cand_v:
            continue
        res = {}
        for nm in cand_p + cand_v:
            vals = []
            for sd in seeds:
                if nm.startswith("VP "):
                    x = run_vp(VP_SCHEDULERS[nm[3:]](rows[nm][nfe][2]), data, nfe, n, sd)
                else:
                    x = run_psld_scheduler(makers[nm](nfe), data, nfe, n, sd)
                vals.append((frechet(x, ref), sliced_w2(x, ref)) if torch.all(torch.isfinite(x)) else (float("inf"),) * 2)
            v = np.array(vals)
            res[nm] = (v.mean(0), v.std(0, ddof=1) if len(seeds) > 1 else np.zeros(2))
            log(f"  [{name}] goal NFE {nfe:4d} {nm:30s}: FD {res[nm][0][0]:.4g} ± {res[nm][1][0]:.2g}  "
                f"SW {res[nm][0][1]:.4g} ± {res[nm][1][1]:.2g}  ({len(seeds)} seeds)")
        bp = min(cand_p, key=lambda nm: res[nm][0][0])
        bv = min(cand_v, key=lambda nm: res[nm][0][0])
        out[nfe] = (bp, bv, res)
    return out


# ---------------------------------------------------------------------------------------------- report
def _fmt(v):
    return "nan" if v != v else (f"{v:.3g}" if v >= 1e-3 else f"{v:.1e}")


def table(rows, nfes, metric):
    head = "| sampler | " + " | ".join(f"NFE {n}" for n in nfes) + " |\n|---|" + "---|" * len(nfes) + "\n"
    out = head
    for name, res in rows.items():
        if name.startswith("PF-ODE RK45"):
            cells = ", ".join(f"{_fmt(v[metric])} @ {k}" for k, v in sorted(res.items()))
            out += f"| {name} | {cells} |" + " |" * (len(nfes) - 1) + "\n"
            continue
        out += f"| {name} | " + " | ".join(_fmt(res[n][metric]) for n in nfes) + " |\n"
    # best rows
    def best(prefix_vp):
        r = []
        for n in nfes:
            vals = [(res[n][metric], name) for name, res in rows.items()
                    if n in res and not name.startswith("noise") and name.startswith("VP ") == prefix_vp
                    and res[n][metric] == res[n][metric]]
            r.append(min(vals) if vals else (float("nan"), "-"))
        return r
    bp, bv = best(False), best(True)
    out += "| **best PSLD** | " + " | ".join(f"**{_fmt(v)}** ({nm})" for v, nm in bp) + " |\n"
    out += "| **best VP (diffusers)** | " + " | ".join(f"**{_fmt(v)}** ({nm[3:]})" for v, nm in bv) + " |\n"
    return out, bp, bv


def plot(all_rows, nfes, path, goals=None):
    """Distance vs NFE, one line per sampler (seed 7); the y axis is clipped at 30× the noise floor (exploding
    samplers leave the top of the panel; the tables have their values). gDDIM rows and the VP multistep rows are
    bold. With ``goals`` (the JSON form) a third column shows the fresh-seed goal check: FD mean ± s.d. of the
    best PSLD and the best VP row per NFE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ncol = 3 if goals else 2
    fig, axes = plt.subplots(len(all_rows), ncol, figsize=(7.5 * ncol, 6 * len(all_rows)), squeeze=False)
    for r, (dname, rows) in enumerate(all_rows.items()):
        for c, (metric, label) in enumerate([(0, "Fréchet distance"), (1, "sliced W2")]):
            ax = axes[r][c]
            floor = min(v[metric] for v in rows.get("noise floor (true vs true)", {0: (1.0, 1.0)}).values())
            lo = min([floor] + [v[metric] for res in rows.values() for v in res.values() if v[metric] == v[metric]])
            for i, (name, res) in enumerate(rows.items()):
                xs = sorted(int(x) for x in res)
                ys = [res[x][metric] if x in res else res[str(x)][metric] for x in xs]
                style = "--" if name.startswith("VP ") else ":" if name.startswith("noise") else "-"
                bold = name.startswith("gDDIM") or any(k in name for k in ("DPM-Solver", "UniPC"))
                ax.plot(xs, ys, style, marker="o" if not name.startswith("noise") else None, ms=4 if bold else 3,
                        lw=2.2 if bold else 0.9, label=name, color=plt.cm.tab20(i % 20) if not name.startswith("noise")
                        else "k")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_ylim(0.8 * lo, 30 * floor)
            ax.set_xlabel("NFE")
            ax.set_title(f"{dname}: {label} to true samples (exact score)\n(y clipped at 30× the noise floor)",
                         fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
        axes[r][1].legend(fontsize=7, loc="upper right", ncol=2)
        if goals and goals.get(dname):
            ax = axes[r][2]
            g = goals[dname]
            ns = sorted(int(x) for x in g)
            for side, color, lab in (("psld", "C3", "best PSLD row"), ("vp", "C0", "best VP row (diffusers)")):
                m = [g[str(x)]["runs"][g[str(x)][side]]["mean"][0] for x in ns]
                sd = [g[str(x)]["runs"][g[str(x)][side]]["sd"][0] for x in ns]
                ax.errorbar(ns, m, yerr=sd, marker="o", capsize=3, color=color, label=lab)
                for x, y in zip(ns, m):
                    ax.annotate(g[str(x)][side].replace("VP ", ""), (x, y), fontsize=6, rotation=20,
                                xytext=(3, 6 if side == "psld" else -12), textcoords="offset points")
            floor = min(v[0] for v in rows.get("noise floor (true vs true)", {0: (float("nan"),) * 2}).values())
            ax.axhline(floor, color="k", ls=":", lw=0.8, label="noise floor (true vs true)")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel("NFE")
            ax.set_title(f"{dname}: goal check, FD mean ± s.d. over fresh seeds", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def _to_json(all_rows, goals):
    rows = {d: {nm: {str(n): list(v) for n, v in res.items()} for nm, res in rows.items()} for d, rows in all_rows.items()}
    g = {d: {str(n): {"psld": bp, "vp": bv, "runs": {nm: {"mean": m.tolist(), "sd": sd.tolist()} for nm, (m, sd) in res.items()}}
             for n, (bp, bv, res) in goal.items()} for d, goal in goals.items()}
    return {"rows": rows, "goal": g}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="reduced smoke-test run (writes the *_quick files)")
    p.add_argument("--nfes", default=None, help="comma-separated NFE list (default 10,20,50,100,250; quick 10,20)")
    p.add_argument("--num_samples", type=int, default=None,
                   help="generated and true (reference) samples per set (default 2000; quick 300)")
    p.add_argument("--samplers", default="", help="comma-separated substrings selecting rows (default: all), e.g. "
                   "'gDDIM,DPM-Solver'")
    p.add_argument("--goal_seeds", type=int, default=None,
                   help="fresh sampling seeds for the goal check of the best PSLD/VP rows (default 5; quick 0)")
    p.add_argument("--datasets", default="mixture,digits", help="comma-separated subset of mixture,digits")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: two threads on a shared 2-core box measured several times slower)")
    p.add_argument("--out", default=RESULTS)
    p.add_argument("--tag", default=None, help="output file suffix (default '' or '_quick')")
    p.add_argument("--replot", action="store_true", help="only redraw the PNG from the saved JSON of a previous run")
    args = p.parse_args(argv)
    torch.set_num_threads(max(1, args.threads))
    global TUNING_GRIDS
    if args.quick:
        nfes, n, n_tune, rk_tols, n_goal = [5, 10, 20], 300, 200, [1e-2], 0
        TUNING_GRIDS = {"conj": [dict(striding="quadratic", conjugate_lambda=l) for l in (0.0, 1.0)],
                        "gms3": [dict(time_spacing="power", spacing_power=r, interpolation="time") for r in (2.0, 3.0)]}
    else:
        nfes, n, n_tune, rk_tols, n_goal = [5, 8, 10, 20, 50, 100, 250], 2000, 1000, [3e-1, 1e-1, 3e-2, 1e-2, 1e-3], 5
    if args.nfes:
        nfes = [int(x) for x in args.nfes.split(",")]
    if args.num_samples:
        if args.num_samples < 2:
            raise SystemExit("--num_samples must be >= 2")
        n = args.num_samples
        n_tune = max(n // 2, 2)
    if args.goal_seeds is not None:
        n_goal = args.goal_seeds
    n_ref = n
    patterns = [x.strip() for x in args.samplers.split(",") if x.strip()]
    datasets = [x.strip() for x in args.datasets.split(",") if x.strip()]
    if not set(datasets) <= {"mixture", "digits"} or not datasets:
        raise SystemExit(f"--datasets must be a subset of mixture,digits, got {args.datasets!r}")
    os.makedirs(args.out, exist_ok=True)
    suffix = args.tag if args.tag is not None else ("_quick" if args.quick else "")
    goal_seeds = [1000 + i for i in range(n_goal)]
    json_path = os.path.join(args.out, f"sampler_accuracy{suffix}.json")
    if args.replot:
        with open(json_path) as f:
            saved = json.load(f)
        rows = {d: {nm: {int(n): v for n, v in res.items()} for nm, res in r.items()} for d, r in saved["rows"].items()}
        plot(rows, nfes, os.path.join(args.out, f"sampler_accuracy{suffix}.png"), saved.get("goal"))
        return rows, {}
    lines = []

    def log(msg):
        print(msg, flush=True)
        lines.append(msg)

    t_start = time.time()
    mixture = make_mixture()
    digits = make_digits_kde()
    log(f"digits KDE bandwidth (held-out log-likelihood): {digits.bandwidth}")
    log("tuning on the Gaussian mixture (separate seed, FD to a separate reference set)")
    keys = {_ROW_TUNE_KEY[nm] for nm in psld_samplers({}) if nm in _ROW_TUNE_KEY and selected(nm, patterns)}
    tuned = tune(mixture, mixture.sample(n_tune, seed=303), nfes, n_tune, seed=404, log=log, keys=keys)
    all_rows, goals = {}, {}
    for key, data, label in (("mixture", mixture, "Gaussian mixture (64-d, tuned)"),
                             ("digits", digits, "digits KDE (64-d, untuned)")):
        if key in datasets:
            all_rows[label], goals[label] = evaluate(data, key, nfes, n, n_ref, tuned, log, rk_tols, patterns, goal_seeds)
    cli = list(argv if argv is not None else sys.argv[1:])
    command = "OMP_NUM_THREADS=1 .venv/bin/python benchmarks/sampler_accuracy.py" + (" " + shlex.join(cli) if cli else "")
    md = [f"# Sampler accuracy with exact scores{' (quick)' if args.quick else ''}\n",
          f"Command: `{command}`; {n} generated vs {n_ref} true samples, seeds fixed; wall time "
          f"{time.time() - t_start:.0f} s (shared 2-core CPU).\n",
          "Distances of the data half to fresh true samples; `noise floor` = two independent true sets. "
          "VP rows: Diffusers schedulers driven by the exact discrete-time VP ε, the better of the default "
          "and `trailing` timestep spacing per NFE. PSLD: Γ=0.01, ν=4.01, β=8, ε=1e-3, final denoising "
          "call included in NFE. RK45 cells are `value @ measured NFE`. Tables: one sampling seed (7); "
          "the goal check re-runs the 3 best PSLD and VP rows of each NFE with fresh seeds.\n",
          f"Digits KDE bandwidth {digits.bandwidth} (held-out log-likelihood). Tuned settings (per NFE, "
          f"mixture only, FD with {n_tune} samples): `{json.dumps(tuned)}`\n"]
    summary = {}
    for dname, rows in all_rows.items():
        for metric, mname in ((0, "Fréchet distance"), (1, "sliced W2")):
            tab, bp, bv = table(rows, nfes, metric)
            md.append(f"## {dname} — {mname}\n\n{tab}\n")
            summary[f"{dname} {mname}"] = {n_: (bp[i][0], bv[i][0]) for i, n_ in enumerate(nfes)}
    md.append("## Goal check (best PSLD ≤ best VP), single seed, from the tables\n")
    for key, res in summary.items():
        md.append(f"* {key}: " + ", ".join(f"NFE {n_}: {_fmt(a)} vs {_fmt(b)} "
                                           f"({'yes' if a <= b else f'no, ×{a / b:.2f}'})" for n_, (a, b) in res.items()))
    if any(goals.values()):
        md.append(f"\n## Goal check with {len(goal_seeds)} fresh sampling seeds (mean ± s.d.)\n")
        md.append("The 3 best rows of each side by their seed-7 FD (PSLD side: plus `gDDIM multistep 3M (defaults)` "
                  "and `gDDIM low-NFE (sweep-selected)`, "
                  "declared in advance) are re-run with fresh seeds; each side keeps the row with the lowest mean FD "
                  "(all candidates are in the log). `tie` = the difference of the means is within 2 standard "
                  "errors.\n")
        md.append("| data | NFE | best PSLD row | FD | SW | best VP row | FD | SW | FD: PSLD ≤ VP? |\n"
                  "|---|---|---|---|---|---|---|---|---|")
        for dname, goal in goals.items():
            for nfe, (bp, bv, res) in goal.items():
                (mp, sp), (mv, sv) = res[bp], res[bv]
                se = math.sqrt((sp[0] ** 2 + sv[0] ** 2) / max(len(goal_seeds), 1))
                verdict = ("yes" if mp[0] <= mv[0] else "no") + (" (tie)" if abs(mp[0] - mv[0]) <= 2 * se else "") + \
                    f", ratio {mp[0] / mv[0]:.2f}"
                md.append(f"| {dname.split(' (')[0]} | {nfe} | {bp} | {mp[0]:.3g} ± {sp[0]:.2g} | {mp[1]:.3g} ± {sp[1]:.2g} "
                          f"| {bv[3:]} | {mv[0]:.3g} ± {sv[0]:.2g} | {mv[1]:.3g} ± {sv[1]:.2g} | {verdict} |")
    md.append("\n## Log\n\n```\n" + "\n".join(lines) + "\n```\n")
    with open(os.path.join(args.out, f"sampler_accuracy{suffix}.md"), "w") as f:
        f.write("\n".join(md))
    saved = _to_json(all_rows, goals)
    with open(json_path, "w") as f:
        json.dump(saved, f, indent=1)
    plot(all_rows, nfes, os.path.join(args.out, f"sampler_accuracy{suffix}.png"), saved["goal"])
    log(f"done in {time.time() - t_start:.0f} s")
    return all_rows, goals


if __name__ == "__main__":
    main()
