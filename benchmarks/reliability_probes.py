"""Probes of loading, configuration and long-computation faults: 64 single calls, each classified by outcome.

Each probe is one call that must either work as documented (a directory layout or a loader) or be refused with a
clear error, i.e. a ``ValueError`` / ``TypeError`` / ``NonFiniteError`` / ``ODESolveError`` /
``ShardMismatchError`` whose message contains the expected words (the input's name, the file, the override).
Outcomes: ``clear``, ``ok`` (worked as documented), ``silent`` (no error where one was due, or a wrong result),
``unclear`` (another exception or message) and ``slow`` (no result within ``PROBE_LIMIT`` seconds, default 20).

    OMP_NUM_THREADS=1 python benchmarks/reliability_probes.py                    # this checkout
    PYTHONPATH=/path/to/older/checkout python benchmarks/reliability_probes.py   # the same probes, older code
    PROBE_LIMIT=600 PROBE_ONLY="rk4|noisy" python benchmarks/reliability_probes.py  # a subset, longer limit

Prints one line per probe and the totals. Runs in ~2-5 min on a 2-core CPU (most of it the time-limited probes).
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import tempfile
import time

import numpy as np
import torch
from diffusers import DiffusionPipeline, UNet2DModel

from diffusers_psld import PSLDImg2ImgPipeline, PSLDPipeline, PSLDScheduler
from diffusers_psld.evaluation import fid as fm
from diffusers_psld.evaluation import likelihood as lk
from diffusers_psld.exact import GaussianMixture
from diffusers_psld.ode import probability_flow_sample
from diffusers_psld.sde import RecipeSDE

LIMIT = float(os.environ.get("PROBE_LIMIT", "20"))
CLEAR_TYPES = ("ValueError", "TypeError", "NonFiniteError", "ODESolveError", "ShardMismatchError")
PROBES = []  # (name, fn, words): fn() raises, returns None (no error) or "SILENT: ..." (a wrong result)
TMP = tempfile.mkdtemp(prefix="psld-probes-")


def probe(name, words=()):
    """Register ``fn`` as a probe; ``words`` must all appear in a clear error (empty: the call must work)."""
    def deco(fn):
        PROBES.append((name, fn, words))
        return fn
    return deco


def tiny_unet(out_channels=2):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=2, out_channels=out_channels, block_out_channels=(8, 16),
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1)


def saved(directory, unet, scheduler):
    path = os.path.join(TMP, directory)
    PSLDPipeline(unet=unet, scheduler=scheduler).save_pretrained(path)
    return path


def edited_copy(base, relpath, **values):
    """A copy of the saved directory ``base`` with ``values`` written into its JSON file ``relpath``."""
    path = os.path.join(tempfile.mkdtemp(dir=TMP), "copy")
    shutil.copytree(base, path)
    with open(os.path.join(path, relpath)) as f:
        config = json.load(f)
    config.update(values)
    with open(os.path.join(path, relpath), "w") as f:
        json.dump(config, f)
    return path


BASE = saved("base", tiny_unet(), PSLDScheduler())

# -- a saved scheduler's sampler that its class cannot run
for bad in ["pf_heunn", "PF_HEUN", "heun", "sscs ", 7, None, ["em"], ""]:
    @probe(f"saved sampler {bad!r}", ("sampler", "valid values", "scheduler_config.json"))
    def _(bad=bad):
        PSLDPipeline.from_pretrained(edited_copy(BASE, "scheduler/scheduler_config.json", sampler=bad))

# -- a scheduler contradicting what the network was trained for (a C-channel "sample" network)
RECORDED = saved("recorded", tiny_unet(out_channels=1), PSLDScheduler(prediction_type="sample", input_preconditioning=True,
                                                                       sigma_data=0.4, gamma=0.02))
for change in [dict(prediction_type="sufficient_epsilon"), dict(input_preconditioning=False), dict(sigma_data=0.5),
               dict(gamma=0.01), dict(nu=5.0), dict(m_inv=1.0), dict(kappa=0.1), dict(beta_min=0.1, beta_max=20.0),
               dict(time_scale=1.0)]:
    @probe(f"scheduler contradicting the UNet: {change}", ("trained with",))
    def _(change=change):
        pipe = PSLDPipeline.from_pretrained(RECORDED)
        pipe.scheduler = PSLDScheduler.from_config(pipe.scheduler.config, **change)
        pipe.set_progress_bar_config(disable=True)
        pipe(batch_size=1, num_inference_steps=3)


@probe("bare unet/+scheduler/ layout, input-preconditioned model: same samples as the pipeline dir")
def _():
    unet = tiny_unet()
    with torch.no_grad():
        for p in unet.parameters():
            p.mul_(3.0)
    full = saved("preconditioned", unet, PSLDScheduler(input_preconditioning=True, sigma_data=0.3))
    bare = full + "_bare"
    shutil.copytree(full, bare, ignore=shutil.ignore_patterns("model_index.json", "*.py"))
    outs = [fm.to_uint8(fm.pipeline_sample_fn(d, num_inference_steps=4)[0](2, torch.Generator().manual_seed(1))).int()
            for d in (full, bare)]
    diff = int((outs[0] - outs[1]).abs().max())
    return f"SILENT: max pixel difference {diff}/255" if diff else None


# -- ODE solves: NaN scores, noisy and discontinuous right-hand sides
GM = GaussianMixture.gaussian(torch.tensor([0.3, -0.2], dtype=torch.float64),
                              torch.tensor([[0.2, 0.05], [0.05, 0.1]], dtype=torch.float64))
VP = RecipeSDE.vp()
EXACT = lk.exact_score_fn(GM, VP)
X = GM.sample(2, torch.Generator().manual_seed(1))


def nan_after_half(z, t):
    return EXACT(z, t) * (float("nan") if t > 0.5 else 1.0)


def noisy(z, t):
    return EXACT(z, t) + 0.3 * torch.randn(z.shape, dtype=z.dtype)


def jump(z, t):
    return torch.full_like(z, 1e300) if t < 0.5 else torch.zeros_like(z)


for method in ("euler", "rk4", "dopri5", "scipy_rk45"):
    @probe(f"likelihood {method}, score turns NaN", ("not finite", "t ="))
    def _(method=method):
        return f"SILENT: returned bpd {lk.ode_likelihood(VP, nan_after_half, X, method=method).bpd.tolist()}"
for method in ("dopri5", "scipy_rk45"):
    @probe(f"likelihood {method}, noisy score (default bounds)", ("max_nfe",))
    def _(method=method):
        return f"SILENT: returned after {lk.ode_likelihood(VP, noisy, X, method=method).nfe} NFE"


@probe("bits_per_dim with a UNet whose output is NaN", ("not finite",))
def _():
    unet, sched = tiny_unet(), PSLDScheduler()
    with torch.no_grad():
        unet.conv_out.bias.fill_(float("nan"))
    lk.bits_per_dim(sched.sde, lk.eps_model_score_fn(unet, sched), torch.randint(0, 256, (1, 1, 8, 8)))


for method in ("dopri5", "scipy_rk45"):
    @probe(f"PF-ODE sampler {method}, discontinuous model (step size underflow)", ("step size underflowed",))
    def _(method=method):
        out = probability_flow_sample(jump, VP, torch.zeros(2, 2, dtype=torch.float64), method=method)
        return f"SILENT: returned {out.samples.flatten()[:2].tolist()} after {out.nfe} NFE"


@probe("PF-ODE sampler dopri5, model turns NaN", ("not finite",))
def _():
    probability_flow_sample(lambda z, t: z * (float("nan") if t < 0.5 else 0.0), VP, torch.ones(2, 2, dtype=torch.float64))


# -- model_index.json, recipe parameters, sample_prior, paths
for bad in (["pipeline_psld"], [], ["pipeline_psld", 3], "", None, 7):
    @probe(f"model_index _class_name {bad!r}", ("_class_name", "model_index.json"))
    def _(bad=bad):
        PSLDPipeline.from_pretrained(edited_copy(BASE, "model_index.json", _class_name=bad))
for kw in (dict(gamma=1e308), dict(nu=1e308), dict(nu=1e160), dict(m_inv=1e-320), dict(beta_min=1e308, beta_max=1e308)):
    @probe(f"PSLDScheduler({kw})", ("overflow",))
    def _(kw=kw):
        sched = PSLDScheduler(**kw)
        return f"SILENT: constructed, kernel covariance at t = 1: {sched.sde.hsm_kernel(1.0).cov.flatten().tolist()}"
for kw in (dict(gamma="0.01"), dict(nu="4"), dict(gamma=True), dict(kappa=b"0.04"), dict(beta_min="8")):
    @probe(f"RecipeSDE.psld({kw})", ("must be a real number",))
    def _(kw=kw):
        RecipeSDE.psld(**kw)
        return "SILENT: accepted"
for masses in ("ab", "2", [True]):
    @probe(f"RecipeSDE(masses={masses!r})", ("masses",))
    def _(masses=masses):
        RecipeSDE(D=[[0.5]], Q=[[0.0]], masses=masses, beta_min=0.1, beta_max=20.0)
        return "SILENT: accepted"
for shape in ((-1, 2, 4, 4), (2, 2, -4, 4), (0, 2, 4, 4), (2.5, 2, 4, 4), (2, 3, 4, 4)):
    @probe(f"sample_prior(shape={shape})", ("`shape`",))
    def _(shape=shape):
        PSLDScheduler().sample_prior(shape)
        return "SILENT: returned"
for dtype in (torch.int64, torch.bool, torch.complex64, "float32"):
    @probe(f"sample_prior(dtype={dtype})", ("`dtype`",))
    def _(dtype=dtype):
        return f"SILENT: returned {PSLDScheduler().sample_prior((1, 2, 2, 2), dtype=dtype).dtype}"
for path in ("", "   "):
    @probe(f"PSLDPipeline.from_pretrained({path!r})", ("pretrained_model_name_or_path",))
    def _(path=path):
        try:
            PSLDPipeline.from_pretrained(path)
        except FileNotFoundError as err:  # the working directory named as the missing directory: unclear
            if os.getcwd() in str(err):
                return f"UNCLEAR: {err}"[:200]
            raise

# -- evaluation shards, image size, custom_pipeline=
for images in (np.zeros((4, 2, 2, 1), np.uint8), np.zeros((4, 4, 4, 3), np.uint8), np.zeros((4, 4, 4, 1), np.float32)):
    @probe(f"shard of another format {images.shape} {images.dtype}", ("shard 1",))
    def _(images=images):
        folder, fingerprint = tempfile.mkdtemp(dir=TMP), {"weights": 1}
        fm.generate_shards(lambda n, g: torch.rand(n, 1, 4, 4, generator=g), folder, 12, 4, base_seed=0,
                           fingerprint=fingerprint)
        with np.load(fm.shard_path(folder, 1)) as z:
            kept = {k: z[k] for k in z.files}
        np.savez(fm.shard_path(folder, 1), **{**kept, "images": images})
        out = fm.load_shards(folder, 12, 4, fingerprint=fingerprint, base_seed=0)["images"]
        return f"SILENT: loaded {tuple(out.shape)} {out.dtype}"


@probe("inpainting a 2048² image with an 8 px model", ("max_size_factor",))
def _():
    pipe = PSLDPipeline.from_pretrained(BASE)
    pipe.set_progress_bar_config(disable=True)
    pipe(image=torch.rand(1, 1, 2048, 2048), mask_image=torch.ones(2048, 2048), num_inference_steps=2)


for cls in (PSLDPipeline, PSLDImg2ImgPipeline):
    @probe(f"DiffusionPipeline.from_pretrained(dir of {cls.__name__}, custom_pipeline='pipeline_psld')")
    def _(cls=cls):
        path = os.path.join(TMP, "custom" + cls.__name__)
        cls(**PSLDPipeline.from_pretrained(BASE).components).save_pretrained(path)
        DiffusionPipeline.from_pretrained(path, custom_pipeline="pipeline_psld", trust_remote_code=True)


class _Slow(Exception):
    pass


def _alarm(*_):
    raise _Slow()


def run(only=None):
    """Run the probes (names containing one of ``only``'s ``|``-separated parts); returns the rows and counts."""
    signal.signal(signal.SIGALRM, _alarm)
    rows, counts = [], {}
    for name, fn, words in PROBES:
        if only and not any(part in name for part in only.split("|")):
            continue
        start = time.perf_counter()
        signal.setitimer(signal.ITIMER_REAL, LIMIT)
        try:
            result = fn()
            if result is None:
                outcome, message = ("ok", "") if not words else ("silent", "no error")
            else:
                outcome, message = ("silent" if result.startswith("SILENT") else "unclear"), result
        except _Slow:
            outcome, message = "slow", f"no result within {LIMIT:g} s"
        except Exception as err:  # noqa: BLE001  (classifying every failure is the point)
            clear = bool(words) and type(err).__name__ in CLEAR_TYPES and all(w in str(err) for w in words)
            outcome, message = ("clear" if clear else "unclear"), f"{type(err).__name__}: {err}".splitlines()[0][:160]
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        counts[outcome] = counts.get(outcome, 0) + 1
        rows.append((name, outcome, time.perf_counter() - start, message))
    return rows, counts


if __name__ == "__main__":
    rows, counts = run(os.environ.get("PROBE_ONLY"))
    for name, outcome, seconds, message in rows:
        print(f"{outcome:8s} {seconds:6.1f}s  {name}  -> {message}")
    print("TOTAL", len(rows), counts)
