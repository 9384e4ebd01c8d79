#!/usr/bin/env python
r"""Convert an official PSLD checkpoint (mandt-lab/PSLD, PyTorch Lightning ``.ckpt``) into a ``PSLDPipeline`` directory.

One command::

    python training/convert_official_checkpoint.py --checkpoint psld-…-epoch=2349-loss=0.0201.ckpt \
        --official_script PSLD/scripts_psld/sota/uncond/cifar10/sample_uncond_psld.sh --output_dir psld-cifar10

    python -c "import diffusers_psld as d; p = d.PSLDPipeline.from_pretrained('psld-cifar10'); \
               p.scheduler = d.GDDIMMultistepScheduler.from_config(p.scheduler.config); p(num_inference_steps=20)"

**What the checkpoint holds.** The official ``SDEWrapper`` never calls ``save_hyperparameters``, so a checkpoint
contains only tensors (``state_dict`` with ``score_fn.*`` = online and ``ema_score_fn.*`` = EMA weights, optimizer
and loop state) — no Γ, ν, β, κ or architecture. The converter rebuilds the settings the way Hydra did:

1. a base: ``--config`` (the official dataset YAML, or the ``.hydra/config.yaml`` Hydra wrote into the run
   directory); else, with ``--official_script``, the defaults of the YAML the script selects (``+dataset=…``,
   :data:`OFFICIAL_YAML`); else ``--model_preset`` / ``--dataset`` (the paper's networks, :mod:`ncsnpp_presets`);
2. Lightning ``hyper_parameters`` if a checkpoint has them;
3. the ``dataset.diffusion.* / dataset.clf.*`` overrides of ``--official_script`` (the training or sampling shell
   script of ``scripts_psld/`` that belongs to the checkpoint; repeatable) and ``--override KEY=VALUE``;
4. the flags ``--gamma --nu --beta --kappa --image_size``.

The architecture is then checked against the tensors (strictly: every tensor used, every parameter filled, every
shape equal), so most wrong settings fail with a list of mismatches. Two settings leave no trace in the weights —
``fir`` (FIR vs. nearest/average resampling) and ``dropout`` — so take them from the script or config that trained
the checkpoint. The checkpoint's file name (``…gamma=0.02_nu=4.02…``) is cross-checked against Γ and ν.

**Safety.** The file is read with ``torch.load(weights_only=True)``: PyTorch's restricted unpickler, which builds
only tensors and plain containers and never imports or calls arbitrary code. If Lightning stored a non-tensor
object (e.g. a NumPy scalar or a ``pathlib`` path in callback state), the converter retries with exactly these
data-only types allow-listed (:data:`SAFE_GLOBALS`) and otherwise stops, naming the object — it never falls back
to a full unpickle. A file that is empty, text, another format, truncated or nested more than :data:`MAX_NESTING`
levels deep stops with one line saying so; a weight that is not a floating-point tensor or holds NaN / ±inf stops
the conversion, naming the tensor (nothing is cast or written).

**Output.** ``save_pretrained`` (safetensors) of ``PSLDPipeline(unet=NCSNppModel, scheduler=PSLDScheduler
[, classifier=NCSNppClassifier])`` with the scheduler config reproducing the checkpoint's SDE (Γ, ν, β_min, β_max,
κ; M⁻¹ by critical damping, as the official code) and ``time_scale = 1.0`` (the official networks receive the raw
forward time), ``conversion.json`` (source file, SHA-256, epoch/step, weights used, resolved settings) and a model
card ``README.md`` saying where the weights came from. EMA weights by default (``--weights online`` for the
others). ``--classifier_checkpoint`` (official ``ncsnpp_clf``, ``train_clf.py``) adds the guidance classifier.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import re
import shlex
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from diffusers_psld.checkpoints import sha256_file  # noqa: E402

DATASET_PRESET = {"cifar10": "ncsnpp-cifar10", "celeba64": "ncsnpp-celeba64", "afhqv2": "ncsnpp-afhqv2-128"}
# the paper's SDE of each released model (psld_reference.md §2.5); --gamma/--nu/--config/--official_script win
PAPER_SDE = {"cifar10": dict(gamma=0.01, nu=4.01), "celeba64": dict(gamma=0.005, nu=4.005),
             "afhqv2": dict(gamma=0.01, nu=4.01)}


def _official_yaml(image_size, score_overrides, sde_overrides, with_clf=True) -> dict:
    """The defaults of an official ``main/configs/dataset/<ds>/<ds>_psld.yaml`` (values read from mandt-lab/PSLD
    24e1867): what Hydra starts from before the ``dataset.diffusion.*`` overrides of a script are applied."""
    fn = dict(in_ch=6, out_ch=6, nonlinearity="swish", nf=128, ch_mult=[1, 2, 2, 2], num_res_blocks=4,
              attn_resolutions=[16], dropout=0.1, resamp_with_conv=True, noise_cond=True, fir=False,
              fir_kernel=[1, 3, 3, 1], skip_rescale=True, resblock_type="biggan", progressive="none",
              progressive_input="none", progressive_combine="sum", embedding_type="positional", init_scale=0.0,
              fourier_scale=16)
    sde = dict(name="psld", beta_min=8.0, beta_max=8.0, nu=4.01, gamma=0.01, kappa=0.04, decomp_mode="lower")
    out = {"diffusion": {"data": {"image_size": image_size},
                         "model": {"score_fn": dict(fn, **score_overrides), "sde": dict(sde, **sde_overrides)}}}
    if with_clf:
        clf = {k: v for k, v in fn.items() if k not in ("out_ch", "num_res_blocks")}
        out["clf"] = {"model": {"clf_fn": dict(clf, num_res_blocks=2)}}
    return out


OFFICIAL_YAML = {
    "cifar10/cifar10_psld": _official_yaml(32, {}, {}),
    "celeba64/celeba64_psld": _official_yaml(64, dict(in_ch=3, out_ch=3, ch_mult=[1, 2, 2, 2, 4], num_res_blocks=2),
                                             dict(nu=1.0, gamma=2.0), with_clf=False),
    "afhqv2/afhqv2128_psld": _official_yaml(128, dict(ch_mult=[1, 2, 2, 2, 3], num_res_blocks=2, dropout=0.2), {}),
}


def _safe_globals() -> list:
    """Data-only types a Lightning checkpoint may contain besides tensors (constructors, no code execution)."""
    import pathlib

    out = [pathlib.PosixPath, pathlib.WindowsPath, pathlib.PurePosixPath, pathlib.PureWindowsPath]
    try:
        import numpy as np

        out += [np.dtype, type(np.dtype("float64")), type(np.dtype("float32")), type(np.dtype("int64"))]
        try:
            from numpy._core.multiarray import scalar
        except ImportError:  # numpy < 2
            from numpy.core.multiarray import scalar
        out.append(scalar)
    except ImportError:  # pragma: no cover
        pass
    return out


SAFE_GLOBALS = _safe_globals()


def _err(flag: str, msg: str):
    raise SystemExit(f"error: {flag}: {msg}")


#: deepest container nesting accepted in a checkpoint (a Lightning checkpoint nests fewer than 10 levels); checked
#: without recursion, so a hostile file cannot exhaust the interpreter's stack later on
MAX_NESTING = 100


def _cause(err: BaseException) -> str:
    """``Type: first line`` of a load error (torch's weights-only errors: the unpickler's own sentence)."""
    text = str(err)
    if "WeightsUnpickler error:" in text:
        text = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation", 1)[0]
    first = " ".join(text.split())[:200]
    return f"{type(err).__name__}: {first}" if first else type(err).__name__


def _check_nesting(obj, path: str, flag: str) -> None:
    stack = [(obj, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_NESTING:
            _err(flag, f"{path!r} nests containers more than {MAX_NESTING} levels deep (a Lightning checkpoint nests "
                       f"fewer than 10): not a checkpoint")
        if isinstance(node, dict):
            stack.extend((v, depth + 1) for kv in node.items() for v in kv)
        elif isinstance(node, (list, tuple, set, frozenset)):
            stack.extend((v, depth + 1) for v in node)


def load_checkpoint(path: str, flag: str = "--checkpoint"):
    """Read a checkpoint with ``torch.load(weights_only=True)`` (PyTorch's restricted unpickler: tensors and plain
    containers only, never arbitrary code); one retry with :data:`SAFE_GLOBALS` allowed when the file names a
    non-tensor type; never a full unpickle. Every failure is one ``error: --checkpoint: ...`` line
    (``SystemExit``) that says what the file is: missing, empty, not a PyTorch checkpoint (text, other bytes),
    truncated or corrupt, holding a non-data object (refused: unpickling it could run code), or nested
    beyond :data:`MAX_NESTING` levels."""
    import pickle
    import zipfile

    import torch

    if not os.path.isfile(path):
        _err(flag, f"{path!r} is not a file")
    size = os.path.getsize(path)
    if size == 0:
        _err(flag, f"{path!r} is empty (0 bytes): not a checkpoint")
    with open(path, "rb") as f:
        head = f.read(64)
    # torch.save writes a zip archive (PyTorch >= 1.6); older files are a pickle stream (protocol 2+: 0x80 0x0N)
    legacy_pickle = len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5
    zip_archive = head.startswith(b"PK\x03\x04") or zipfile.is_zipfile(path)  # (a truncated one has no directory)
    if not zip_archive and not legacy_pickle:
        try:
            text = head.decode("utf-8")
            is_text = all(ch.isprintable() or ch in "\n\r\t" for ch in text)
        except UnicodeDecodeError:
            is_text = False
        kind = f"a text file (it starts with {text[:40]!r})" if is_text else None
        kind = kind or f"{size:,} bytes of another format (they start with {head[:8].hex(' ')})"
        _err(flag, f"{path!r} is not a PyTorch checkpoint: {kind}, neither the zip archive torch.save writes nor a "
                   f"legacy pickle")

    def corrupt(err):
        _err(flag, f"{path!r} is truncated or corrupt: it could not be read as a PyTorch checkpoint ({_cause(err)})")

    try:
        try:
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as first:
            if "Unsupported global" not in str(first):
                corrupt(first)  # a malformed stream, not a refused object
            try:
                with torch.serialization.safe_globals(SAFE_GLOBALS):
                    obj = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as second:
                if "Unsupported global" not in str(second):
                    corrupt(second)
                named = re.search(r"GLOBAL (\S+)", str(second))
                _err(flag, f"{path!r} holds an object of type {named.group(1) if named else '(unknown)'}, which is not "
                           f"plain data: weights-only loading refuses it and it is not unpickled (that could run code)")
    except (EOFError, RuntimeError, ValueError, KeyError, IndexError, TypeError, AttributeError, OverflowError,
            MemoryError, RecursionError, OSError, zipfile.BadZipFile, __import__("struct").error) as err:
        corrupt(err)
    _check_nesting(obj, path, flag)
    return obj


# ----------------------------------------------------------------------------- settings
def _set(node: dict, dotted: str, value: Any) -> None:
    keys = dotted.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ValueError(f"cannot set {dotted!r}: {k!r} is not a mapping")
    node[keys[-1]] = value


def _merge(dst: dict, src: dict) -> dict:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _merge(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)
    return dst


def parse_override(text: str, flag: str) -> tuple:
    """``[+]dataset.diffusion.model.score_fn.nf=128`` → (``"diffusion"``, ``"model.score_fn.nf"``, 128)."""
    import yaml

    if "=" not in text:
        _err(flag, f"{text!r} is not KEY=VALUE")
    key, value = text.split("=", 1)
    key = key.lstrip("+")
    if key.startswith("dataset."):
        key = key[len("dataset."):]
    section, _, rest = key.partition(".")
    if section not in ("diffusion", "clf") or not rest:
        _err(flag, f"{text!r}: the key must start with [dataset.]diffusion. or [dataset.]clf.")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        _err(flag, f"{text!r}: cannot parse the value ({e})")
    return section, rest, parsed


def script_tokens(path: str) -> List[str]:
    """The shell tokens of an official ``scripts_psld/*.sh`` command line (continuations joined)."""
    if not os.path.isfile(path):
        _err("--official_script", f"{path!r} is not a file")
    text = Path(path).read_text().replace("\\\n", " ")
    try:
        tokens = shlex.split(text, comments=True)
    except ValueError as e:
        _err("--official_script", f"cannot tokenize {path!r}: {e}")
    return tokens


def overrides_from_script(path: str) -> List[str]:
    """The ``dataset.diffusion.* / dataset.clf.*`` overrides of an official script."""
    keep = [t for t in script_tokens(path) if re.match(r"^\+?dataset\.(diffusion|clf)\.", t)]
    if not keep:
        _err("--official_script", f"{path!r} has no dataset.diffusion.*=… overrides")
    return keep


def base_from_script(path: str) -> Optional[str]:
    """The Hydra base config a script selects with ``+dataset=<ds>/<file>`` (None if it names none)."""
    for t in script_tokens(path):
        if t.startswith("+dataset="):
            return t.split("=", 1)[1]
    return None


def load_yaml_config(path: str) -> dict:
    """The ``{diffusion: …, clf: …}`` node of an official dataset YAML or of a run's ``.hydra/config.yaml``."""
    import yaml

    if not os.path.isfile(path):
        _err("--config", f"{path!r} is not a file")
    with open(path) as f:
        cfg = yaml.safe_load(f)
    if isinstance(cfg, dict) and isinstance(cfg.get("dataset"), dict):
        cfg = cfg["dataset"]
    if not isinstance(cfg, dict) or "diffusion" not in cfg:
        _err("--config", f"{path!r} has no `diffusion:` section (expected an official main/configs/dataset/*.yaml "
                         "or a run's .hydra/config.yaml)")
    return cfg


def preset_settings(preset: str, dataset: Optional[str]) -> dict:
    """The official-style ``{diffusion: {data, model: {score_fn, sde}}}`` of one of our NCSN++ presets."""
    from diffusers_psld.models.ncsnpp_presets import NCSNPP_PRESETS

    if preset not in NCSNPP_PRESETS or preset == "ncsnpp-tiny":
        _err("--model_preset", f"{preset!r}; choose one of {sorted(set(NCSNPP_PRESETS) - {'ncsnpp-tiny'})}")
    spec = NCSNPP_PRESETS[preset]
    score_fn = {k: (list(v) if isinstance(v, tuple) else v) for k, v in spec["ncsnpp"].items()}
    score_fn.update(name="ncsnpp", in_ch=6, out_ch=6, nonlinearity="swish", noise_cond=True)
    sde = dict(name="psld", beta_min=8.0, beta_max=8.0, kappa=0.04, decomp_mode="lower",
               **PAPER_SDE.get(dataset or "", dict(gamma=0.01, nu=4.01)))
    return {"diffusion": {"data": {"image_size": spec["sample_size"], "num_channels": 3, "name": dataset},
                          "model": {"score_fn": score_fn, "sde": sde}}}


def resolve_settings(args, ckpt: dict) -> dict:
    """Merge the sources listed in the module docstring; returns ``{diffusion: …, clf: …?}``."""
    dataset = args.dataset
    bases = [b for b in (base_from_script(x) for x in (args.official_script or [])) if b]
    if args.config:  # a complete official config: the base
        cfg = {"diffusion": {"data": {}, "model": {"score_fn": {}, "sde": {}}}}
    elif args.model_preset is None and bases:  # the yaml the official script starts from (Hydra semantics)
        if bases[0] not in OFFICIAL_YAML:
            _err("--official_script", f"it selects +dataset={bases[0]}, whose defaults this converter does not "
                                      f"know (known: {sorted(OFFICIAL_YAML)}); pass that yaml with --config")
        cfg = copy.deepcopy(OFFICIAL_YAML[bases[0]])
        dataset = dataset or bases[0].split("/")[0]
    else:  # the paper's networks
        preset = args.model_preset or DATASET_PRESET.get(dataset or "", None)
        if dataset is None:  # the paper model a preset stands for
            dataset = {v: k for k, v in DATASET_PRESET.items()}.get(preset)
        if preset is None:
            _err("--model_preset", "needed as the base of the settings (or --dataset cifar10|celeba64|afhqv2, "
                                   "--official_script with a +dataset=… base, or --config)")
        cfg = preset_settings(preset, dataset)
    hp = ckpt.get("hyper_parameters")
    if isinstance(hp, dict):
        node = hp.get("config", hp)
        node = node.get("dataset", node) if isinstance(node, dict) else None
        if isinstance(node, dict) and "model" in node:
            node = {"diffusion": node}
        if isinstance(node, dict) and "diffusion" in node:
            _merge(cfg, node)
    if args.config:
        _merge(cfg, load_yaml_config(args.config))
    overrides = [o for script in (args.official_script or []) for o in overrides_from_script(script)]
    overrides += list(args.override or [])
    for text in overrides:
        section, key, value = parse_override(text, "--override")
        _set(cfg.setdefault(section, {}), key, value)
    d = cfg["diffusion"]
    for flag, key in (("gamma", "gamma"), ("nu", "nu"), ("kappa", "kappa")):
        if getattr(args, flag) is not None:
            d["model"]["sde"][key] = getattr(args, flag)
    if args.beta is not None:
        d["model"]["sde"]["beta_min"] = d["model"]["sde"]["beta_max"] = args.beta
    if args.image_size is not None:
        d["data"]["image_size"] = args.image_size
    if dataset:
        d["data"]["name"] = dataset
    return cfg


def check_filename(path: str, sde: dict) -> None:
    """The official checkpoint names carry ``gamma=…_nu=…``; refuse settings that contradict them."""
    name = os.path.basename(path)
    for key in ("gamma", "nu"):
        m = re.search(rf"(?:^|[_\-]){key}=([0-9.eE+-]+?)(?=[_\-]|\.ckpt$|$)", name)
        if m:
            try:
                found = float(m.group(1))
            except ValueError:
                continue
            if abs(found - float(sde[key])) > 1e-9:
                _err(f"--{key}", f"the settings say {key} = {sde[key]} but the checkpoint name {name!r} says "
                                 f"{found}; pass --{key} {found} (or --ignore_filename if the name is wrong)")


def build_scheduler(sde: dict, sampler: str, striding: str):
    from diffusers_psld import PSLDScheduler
    from diffusers_psld.models.ncsnpp_presets import NCSNPP_TIME_SCALE

    name = str(sde.get("name", "psld")).lower()
    if name == "vpsde":
        return PSLDScheduler(diffusion="vp", beta_min=float(sde.get("beta_min", 0.1)),
                             beta_max=float(sde.get("beta_max", 20.0)), time_scale=NCSNPP_TIME_SCALE,
                             sampler=sampler, striding=striding)
    if name != "psld":
        _err("--override", f"model.sde.name must be psld or vpsde, got {name!r}")
    if str(sde.get("decomp_mode", "lower")).lower() != "lower":
        _err("--override", "model.sde.decomp_mode must be 'lower' (every released model; the sampler converts ε with "
                           "the lower Cholesky factor)")
    gamma, nu = float(sde["gamma"]), float(sde["nu"])
    if nu == 0:
        _err("--nu", "ν = 0 (the official 'score_x' mode, momentum without noise) is not supported")
    return PSLDScheduler(diffusion="psld", gamma=gamma, nu=nu, beta_min=float(sde["beta_min"]),
                         beta_max=float(sde["beta_max"]), kappa=float(sde["kappa"]), time_scale=NCSNPP_TIME_SCALE,
                         sampler=sampler, striding=striding)


def convert_network(state_dict: dict, prefix: str, model):
    from diffusers_psld.models.ncsnpp_convert import convert_state_dict, strip_prefix

    try:
        converted = convert_state_dict(strip_prefix(state_dict, prefix), model)
    except ValueError as e:
        _err("--checkpoint", str(e))
    model.load_state_dict({k: v.float() for k, v in converted.items()}, strict=True)
    return model.eval()


# ----------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert an official PSLD Lightning checkpoint into a PSLDPipeline "
                                            "directory (safetensors).")
    p.add_argument("--checkpoint", required=True, help="official .ckpt (train_sde.py)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--dataset", choices=sorted(DATASET_PRESET), default=None,
                   help="which paper model (sets the default preset, Γ and ν); also the model card's dataset")
    p.add_argument("--model_preset", default=None, help="ncsnpp-cifar10 | ncsnpp-celeba64 | ncsnpp-afhqv2-128")
    p.add_argument("--config", default=None, help="official main/configs/dataset/*.yaml or a run's .hydra/config.yaml")
    p.add_argument("--official_script", action="append", default=None,
                   help="official scripts_psld/…/*.sh whose dataset.diffusion.* / dataset.clf.* overrides produced "
                        "the checkpoint (repeatable, e.g. the score and the classifier script; later ones win)")
    p.add_argument("--override", action="append", default=None,
                   help="Hydra-style dataset.diffusion.model.score_fn.nf=128 (repeatable; last wins)")
    p.add_argument("--gamma", type=float, default=None, help="Γ")
    p.add_argument("--nu", type=float, default=None, help="ν")
    p.add_argument("--beta", type=float, default=None, help="constant β (the paper: 8)")
    p.add_argument("--kappa", type=float, default=None, help="κ (the paper: 0.04)")
    p.add_argument("--image_size", type=int, default=None)
    p.add_argument("--weights", choices=["ema", "online"], default="ema",
                   help="ema_score_fn.* (default; what the paper samples from) or score_fn.*")
    p.add_argument("--sampler", choices=["em", "pf_euler", "pf_heun", "sscs"], default="em",
                   help="sampler written into the scheduler config (any scheduler class can be swapped in later)")
    p.add_argument("--striding", choices=["uniform", "quadratic"], default="uniform")
    p.add_argument("--classifier_checkpoint", default=None,
                   help="official time-dependent classifier .ckpt (train_clf.py, ncsnpp_clf); its settings come from "
                        "the `clf:` section of --config / dataset.clf.* overrides")
    p.add_argument("--ignore_filename", action="store_true", help="skip the gamma=/nu= check of the file name")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if os.path.exists(args.output_dir) and os.listdir(args.output_dir):
        _err("--output_dir", f"{args.output_dir!r} exists and is not empty")
    import torch

    import diffusers_psld  # noqa: F401  (registers the component modules for diffusers' loader)
    from diffusers_psld import hub
    from diffusers_psld.models.ncsnpp import NCSNppModel
    from diffusers_psld.models.ncsnpp_classifier import NCSNppClassifier
    from diffusers_psld.models.ncsnpp_convert import classifier_config_from_official, config_from_official
    from diffusers_psld.pipelines import PSLDPipeline

    ckpt = load_checkpoint(args.checkpoint)
    if not isinstance(ckpt, dict) or not isinstance(ckpt.get("state_dict"), dict):
        _err("--checkpoint", f"{args.checkpoint!r} is a PyTorch file but not a Lightning checkpoint (no `state_dict` "
                             f"mapping)")
    settings = resolve_settings(args, ckpt)
    d = settings["diffusion"]
    sde = d["model"]["sde"]
    if not args.ignore_filename:
        check_filename(args.checkpoint, sde)
    scheduler = build_scheduler(sde, args.sampler, args.striding)
    k = scheduler.num_components
    score_fn, image_size = d["model"]["score_fn"], int(d["data"]["image_size"])
    in_ch, out_ch = int(score_fn["in_ch"]), int(score_fn.get("out_ch", score_fn["in_ch"]))
    if in_ch % k:
        _err("--override", f"score_fn.in_ch = {in_ch} is not a multiple of k = {k} for this SDE")
    if k == 2 and (float(sde["gamma"]) == 0) != (out_ch * 2 == in_ch):
        _err("--gamma", f"Γ = {sde['gamma']} but score_fn.out_ch = {out_ch} (in_ch {in_ch}): the official code "
                        "predicts only ε_m (out_ch = C) exactly when Γ = 0")
    try:
        unet = NCSNppModel(**config_from_official(score_fn, image_size))
    except ValueError as e:
        _err("--override", f"unsupported official score_fn settings: {e}")
    prefix = "ema_score_fn." if args.weights == "ema" else "score_fn."
    unet = convert_network(ckpt["state_dict"], prefix, unet)

    classifier, clf_info = None, None
    if args.classifier_checkpoint:
        cckpt = load_checkpoint(args.classifier_checkpoint, "--classifier_checkpoint")
        if not isinstance(cckpt, dict) or not isinstance(cckpt.get("state_dict"), dict):
            _err("--classifier_checkpoint", f"{args.classifier_checkpoint!r} is a PyTorch file but not a Lightning "
                                            f"checkpoint (no `state_dict` mapping)")
        clf_cfg = settings.get("clf", {}).get("model", {}).get("clf_fn")
        if not clf_cfg:
            _err("--classifier_checkpoint", "no classifier settings: give --config with a `clf:` section and/or "
                                            "dataset.clf.model.clf_fn.* overrides (n_cls, nf, ch_mult, …)")
        try:
            classifier = NCSNppClassifier(**classifier_config_from_official(clf_cfg, image_size))
        except ValueError as e:
            _err("--override", f"unsupported official clf_fn settings: {e}")
        classifier = convert_network(cckpt["state_dict"], "clf_fn.", classifier)
        clf_info = {"file": os.path.basename(args.classifier_checkpoint), "sha256": sha256_file(args.classifier_checkpoint),
                    "epoch": cckpt.get("epoch"), "global_step": cckpt.get("global_step"), "clf_fn": clf_cfg}

    os.makedirs(args.output_dir, exist_ok=True)
    PSLDPipeline(unet=unet, scheduler=scheduler, classifier=classifier).save_pretrained(args.output_dir,
                                                                                       safe_serialization=True)
    n_params = sum(p.numel() for p in unet.parameters())
    info = {"source": "mandt-lab/PSLD official checkpoint (PyTorch Lightning)",
            "checkpoint": {"file": os.path.basename(args.checkpoint), "sha256": sha256_file(args.checkpoint),
                           "epoch": ckpt.get("epoch"), "global_step": ckpt.get("global_step"),
                           "pytorch_lightning_version": ckpt.get("pytorch-lightning_version"),
                           "weights": f"{args.weights} ({prefix}*)"},
            "settings": settings, "parameters": n_params, "time_scale": scheduler.config.time_scale,
            "classifier": clf_info, "torch": torch.__version__}
    with open(os.path.join(args.output_dir, "conversion.json"), "w") as f:
        json.dump(info, f, indent=1, default=str)
    diffusion = "vp" if k == 1 else ("cld" if float(sde["gamma"]) == 0 else "psld")
    dataset = str(d["data"].get("name") or "unknown")
    card = (REPO / "model_cards" / "official_checkpoint_model_card.md")
    hub.write_model_card(args.output_dir, dict(
        diffusion=diffusion, dataset=dataset, title=f"PSLD paper checkpoint ({diffusion.upper()}, {dataset}) in diffusers",
        tags=["psld-official", "ncsnpp"], license="other", repo_or_path=args.output_dir,
        source_file=os.path.basename(args.checkpoint), source_sha256=info["checkpoint"]["sha256"],
        epoch=ckpt.get("epoch"), global_step=ckpt.get("global_step"), weights=info["checkpoint"]["weights"],
        gamma=sde.get("gamma", "n/a"), nu=sde.get("nu", "n/a"), beta=f"{sde.get('beta_min')} → {sde.get('beta_max')}",
        kappa=sde.get("kappa", "n/a"), resolution=image_size, parameters=f"{n_params:,}",
        architecture=json.dumps(score_fn, default=str), classifier_note=(
            f" and the time-dependent classifier `{clf_info['file']}` (SHA-256 `{clf_info['sha256']}`)"
            if clf_info else "")), template_path=card)
    print(f"wrote {args.output_dir}: NCSN++ {n_params:,} parameters ({args.weights} weights), {diffusion} "
          f"Γ={sde.get('gamma')} ν={sde.get('nu')} β={sde.get('beta_min')}→{sde.get('beta_max')} κ={sde.get('kappa')}, "
          f"time_scale {scheduler.config.time_scale}" + (", with classifier" if classifier is not None else ""))
    return info


if __name__ == "__main__":
    main()
