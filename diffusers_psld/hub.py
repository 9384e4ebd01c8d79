r"""Model cards and Hub uploads for trained PSLD pipelines: the single place that talks to the Hub.

* :func:`render_model_card` fills ``model_cards/psld_model_card.md`` (Hub metadata: ``library_name:
  diffusers``, ``pipeline_tag: unconditional-image-generation``, tags, datasets, license).
* :func:`create_repo` — check that a token exists and create the model repo (``exist_ok=True``), as
  diffusers' training examples do before training; :func:`upload_folder` — upload an output directory
  (checkpoints, temp dirs and logs excluded); :func:`push_folder` = both. Failures raise :class:`HubError`
  with one line naming the repo and the cause; :func:`push_command` is the shell command that uploads a
  directory later (``hf upload``, same exclusions).
* :func:`redact` masks secrets (``hub_token``) in argument dicts before they are logged or stored.

Every Hub call goes through the names ``HfApi`` and ``get_token`` of this module: tests replace those two
names with stubs (no network). The token is passed through, never logged.
"""
from __future__ import annotations

import os
import shlex
from pathlib import Path
from typing import Iterable, Optional

from huggingface_hub import HfApi  # module attribute: tests monkeypatch ``diffusers_psld.hub.HfApi``
from huggingface_hub.utils import get_token  # HF_TOKEN, then the cached login; tests monkeypatch it here

__all__ = ["render_model_card", "write_model_card", "HubError", "create_repo", "upload_folder", "push_folder",
           "push_command", "redact", "DEFAULT_TEMPLATE", "UPLOAD_IGNORE"]

_HERE = Path(__file__).resolve().parent
#: template shipped in the repository (``model_cards/``); a copy next to the package wins if installed
DEFAULT_TEMPLATE = next((p for p in (_HERE / "model_cards" / "psld_model_card.md",
                                     _HERE.parent / "model_cards" / "psld_model_card.md") if p.exists()),
                        _HERE.parent / "model_cards" / "psld_model_card.md")

#: Patterns never uploaded (training checkpoints, temp dirs, logs; ``fnmatch``: ``*`` also matches ``/``).
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "logs/**", "*.tmp", ".trash-*", ".trash-*/**"]
#: the same exclusions as ``hf upload --exclude`` options (:func:`push_command`)
_CLI_EXCLUDE = ["checkpoint-*", ".tmp-*", ".trash-*", "logs/*", "*.tmp"]

_SECRET_KEYS = ("hub_token", "token", "hf_token")

_FALLBACK_TEMPLATE = """---
library_name: diffusers
license: {license}
pipeline_tag: unconditional-image-generation
tags:
{tags}
datasets:
{datasets}
---

# {title}

{diffusion_long} model on {dataset}, trained with diffusers-psld.
"""


def redact(d: dict) -> dict:
    """A copy of ``d`` with secret values (``hub_token`` ...) replaced by ``"***"`` (or kept None)."""
    return {k: ("***" if (k in _SECRET_KEYS and v) else v) for k, v in d.items()}


def _yaml_list(items: Iterable[str]) -> str:
    out = []
    for it in items:
        s = str(it).replace('"', "'")
        out.append(f'- "{s}"' if any(c in s for c in ":#{}[],&*?|<>=!%@`") else f"- {s}")
    return "\n".join(out) if out else "[]"


_DIFFUSION_LONG = {"psld": "Phase Space Langevin Diffusion (PSLD)",
                   "cld": "Critically-damped Langevin Diffusion (CLD, PSLD with Γ = 0)",
                   "vp": "VP-SDE"}


def render_model_card(fields: dict, template_path: Optional[os.PathLike] = None) -> str:
    """Fill the model-card template with ``fields`` (missing ones become ``"n/a"``).

    Required for valid metadata: ``diffusion`` (psld|cld|vp) and ``dataset``. ``tags`` (extra tags)
    and ``license`` (default ``mit``) are optional.
    """
    path = Path(template_path) if template_path else DEFAULT_TEMPLATE
    template = path.read_text(encoding="utf-8") if path.exists() else _FALLBACK_TEMPLATE
    diffusion = fields.get("diffusion", "psld")
    dataset = str(fields.get("dataset", "unknown"))
    tags = ["diffusers", "diffusers-psld", "unconditional-image-generation", "diffusion-models", diffusion]
    for t in fields.get("tags", ()) or ():
        if t not in tags:
            tags.append(t)
    values = dict(fields)
    values.update(
        license=fields.get("license") or "mit",
        tags=_yaml_list(tags),
        datasets=_yaml_list([dataset]),
        diffusion_long=_DIFFUSION_LONG.get(diffusion, diffusion),
        title=fields.get("title") or f"{diffusion.upper()} on {dataset}",
        class_note=fields.get("class_note", ""),
        samples_section=fields.get("samples_section", ""),
        limitations=fields.get("limitations", "Research model; samples reflect the training data and its biases."),
    )

    class _Default(dict):
        def __missing__(self, key):
            return "n/a"

    return template.format_map(_Default(values))


def write_model_card(output_dir: os.PathLike, fields: dict, template_path: Optional[os.PathLike] = None) -> Path:
    """Render the card and write ``<output_dir>/README.md`` atomically (temp file + ``os.replace``)."""
    text = render_model_card(fields, template_path)
    out = Path(output_dir) / "README.md"
    tmp = out.with_suffix(".md.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, out)
    return out


class HubError(RuntimeError):
    """A Hub call failed: no token, the repo could not be created, or an upload failed (one line: the repo
    and the cause; the token never appears)."""


def _cause(err: BaseException) -> str:
    first = (str(err).strip().splitlines() or [""])[0]
    return f"{type(err).__name__}: {first[:300]}" if first else type(err).__name__


def _check_repo_id(repo_id):
    if not repo_id or not isinstance(repo_id, str) or repo_id.count("/") > 1:
        raise ValueError(f"`--hub_model_id` must be a repo id like 'name' or 'user/name', got {repo_id!r}")


def _create(api, repo_id: str, private: bool) -> str:
    try:
        url = api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model")
    except Exception as err:  # noqa: BLE001  (network, offline mode, 401/403 ...: one line, the cause named)
        raise HubError(f"could not create the Hub repo {repo_id!r} ({_cause(err)})") from err
    return getattr(url, "repo_id", None) or repo_id


def _upload(api, folder, repo_id: str, commit_message: str, ignore_patterns) -> None:
    try:
        api.upload_folder(repo_id=repo_id, folder_path=str(folder), commit_message=commit_message,
                          ignore_patterns=list(ignore_patterns or UPLOAD_IGNORE), repo_type="model")
    except Exception as err:  # noqa: BLE001
        raise HubError(f"uploading {str(folder)!r} to the Hub repo {repo_id!r} failed ({_cause(err)})") from err


def _api(token: Optional[str]):
    token = token or get_token()
    if not token:
        raise HubError("no Hub token: pass one (--hub_token), set HF_TOKEN, or log in with `hf auth login`")
    return HfApi(token=token)


def create_repo(repo_id: str, token: Optional[str] = None, private: bool = False) -> str:
    """Check that a Hub token exists (``token``, else ``HF_TOKEN`` / the cached login) and create the model
    repo ``repo_id`` (``'name'`` or ``'user/name'``; an existing repo is fine). Returns the id the Hub
    reports (``'user/name'``).

    Raises:
        ValueError: ``repo_id`` is not a repo id.
        HubError: no token, or the Hub refused or could not be reached (offline mode, network, permissions).
    """
    _check_repo_id(repo_id)
    return _create(_api(token), repo_id, private)


def upload_folder(folder: os.PathLike, repo_id: str, token: Optional[str] = None,
                  commit_message: str = "Upload PSLD pipeline", ignore_patterns: Optional[list] = None) -> str:
    """Upload ``folder`` to the existing model repo ``repo_id`` (without :data:`UPLOAD_IGNORE`: checkpoints,
    temp dirs, logs). Returns ``repo_id``.

    Raises:
        HubError: no token, or the upload failed; the message names the folder, the repo and the cause.
    """
    _upload(_api(token), folder, repo_id, commit_message, ignore_patterns)
    return repo_id


def push_command(folder: os.PathLike, repo_id: str) -> str:
    """The shell command that uploads ``folder`` to ``repo_id`` later with the same exclusions as
    :func:`upload_folder` (``hf upload``, huggingface_hub's command line; the token comes from ``HF_TOKEN``
    or ``hf auth login``)."""
    excludes = " ".join(f"--exclude {shlex.quote(p)}" for p in _CLI_EXCLUDE)
    return f"hf upload {shlex.quote(repo_id)} {shlex.quote(str(folder))} . {excludes}"


def push_folder(folder: os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload PSLD pipeline", ignore_patterns: Optional[list] = None) -> str:
    """Create ``repo_id`` (``exist_ok=True``) and upload ``folder`` (checkpoints, temp dirs and logs
    excluded): :func:`create_repo` then :func:`upload_folder` with one client. Returns the repo id the Hub
    reports. ``token`` is never printed.

    Raises:
        ValueError: ``repo_id`` is not a repo id.
        HubError: no token, the repo could not be created, or the upload failed.
    """
    _check_repo_id(repo_id)
    api = _api(token)
    rid = _create(api, repo_id, private)
    _upload(api, folder, rid, commit_message, ignore_patterns)
    return rid
