r"""Model cards and Hub uploads for trained PSLD pipelines: the single place that talks to the Hub.

* :func:`render_model_card` fills ``model_cards/psld_model_card.md`` (Hub metadata: ``library_name:
  diffusers``, ``pipeline_tag: unconditional-image-generation``, tags, datasets, license).
* :func:`push_folder` = ``HfApi.create_repo(exist_ok=True)`` + ``HfApi.upload_folder``. Tests replace
  ``HfApi`` in this module with a recording stub. The token is passed through, never logged.
* :func:`redact` masks secrets (``hub_token``) in argument dicts before they are logged or stored.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Optional

from huggingface_hub import HfApi  # module attribute: tests monkeypatch ``diffusers_psld.hub.HfApi``

__all__ = ["render_model_card", "write_model_card", "push_folder", "redact", "DEFAULT_TEMPLATE", "UPLOAD_IGNORE"]

_HERE = Path(__file__).resolve().parent
#: template shipped in the repository (``model_cards/``); a copy next to the package wins if installed
DEFAULT_TEMPLATE = next((p for p in (_HERE / "model_cards" / "psld_model_card.md",
                                     _HERE.parent / "model_cards" / "psld_model_card.md") if p.exists()),
                        _HERE.parent / "model_cards" / "psld_model_card.md")

#: Patterns never uploaded (training checkpoints, temp dirs, logs).
UPLOAD_IGNORE = ["checkpoint-*", "checkpoint-*/**", ".tmp-*", ".tmp-*/**", "logs/**", "*.tmp", ".trash-*", ".trash-*/**"]

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


def push_folder(folder: os.PathLike, repo_id: str, token: Optional[str] = None, private: bool = False,
                commit_message: str = "Upload PSLD pipeline", ignore_patterns: Optional[list] = None) -> str:
    """Create ``repo_id`` (``exist_ok=True``) and upload ``folder`` (checkpoints, temp dirs and logs
    excluded). Returns the repo id the Hub reports. ``token`` is never printed."""
    if not repo_id or not isinstance(repo_id, str):
        raise ValueError(f"`--hub_model_id` must be a repo id like 'user/name', got {repo_id!r}")
    api = HfApi(token=token)
    url = api.create_repo(repo_id=repo_id, exist_ok=True, private=private, repo_type="model")
    rid = getattr(url, "repo_id", None) or repo_id
    api.upload_folder(repo_id=rid, folder_path=str(folder), commit_message=commit_message,
                      ignore_patterns=list(ignore_patterns or UPLOAD_IGNORE), repo_type="model")
    return rid
