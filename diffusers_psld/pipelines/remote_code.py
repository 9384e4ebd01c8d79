r"""The generic-loader entry: every saved pipeline carries ``pipeline_psld.py`` and names it in ``model_index.json``.

diffusers resolves a pipeline whose ``model_index.json`` has ``"_class_name": ["<file>", "<Class>"]`` from
``<file>.py`` stored next to it (``trust_remote_code=True``), so with what :func:`install` writes::

    DiffusionPipeline.from_pretrained(dir_or_repo, trust_remote_code=True)   # no custom_pipeline= needed

works for a local directory and for a Hub repo that a push uploaded the folder to. The file (:data:`SOURCE`,
identical to the repository's ``pipelines/pipeline_psld.py``) only re-exports this package's classes, so the
components keep their real classes; it needs the package installed (``pip install "diffusers-psld>=0.1.0"``, or
from a source checkout / built wheel until a release exists; diffusers' import check says so otherwise). :class:`PSLDPipeline` reads both forms of ``_class_name`` (directories saved before this change
hold the plain class name) and never executes the file.
"""
from __future__ import annotations

import json
import os
from typing import Union

__all__ = ["FILE_STEM", "SOURCE", "install", "class_name_of"]

#: stem of the file written next to ``model_index.json``
FILE_STEM = "pipeline_psld"

#: the text of the file (identical to the repository's ``pipelines/pipeline_psld.py``)
SOURCE = '''"""Hub custom-pipeline entry point for diffusers-psld checkpoints (written by ``save_pretrained``).

``model_index.json`` names this file (``"_class_name": ["pipeline_psld", "<Class>"]``), so the generic loader
finds the pipeline class without ``custom_pipeline=``::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("user/psld-digits", trust_remote_code=True)

It needs the ``diffusers-psld`` package installed and only re-exports its classes, so components keep their
real classes: ``pip install "diffusers-psld>=0.1.0"`` once released; until then ``pip install -e .`` in a source
checkout or ``pip install diffusers_psld-0.1.0-py3-none-any.whl`` (a wheel built there with ``python -m build``). ``diffusers_psld.PSLDPipeline.from_pretrained``
needs no remote code.
"""
from diffusers import DiffusionPipeline  # noqa: F401

from diffusers_psld.pipelines import PSLDImg2ImgPipeline, PSLDPipeline, PSLDPipelineOutput  # noqa: F401

__all__ = ["PSLDPipeline", "PSLDImg2ImgPipeline"]
'''


def install(save_directory: Union[str, os.PathLike], class_name: str) -> None:
    """Write ``<save_directory>/pipeline_psld.py`` and set ``model_index.json``'s ``_class_name`` to
    ``["pipeline_psld", class_name]`` (both written atomically: temp file + ``os.replace``)."""
    index_path = os.path.join(save_directory, "model_index.json")
    with open(index_path, encoding="utf-8") as f:
        index = json.load(f)
    index["_class_name"] = [FILE_STEM, class_name]
    for path, text in ((os.path.join(save_directory, FILE_STEM + ".py"), SOURCE),
                       (index_path, json.dumps(index, indent=2, sort_keys=True) + "\n")):
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)


def class_name_of(config: dict) -> str:
    """The pipeline class name of a ``model_index.json`` dict: ``"PSLDPipeline"`` or the class of
    ``["pipeline_psld", "PSLDPipeline"]``."""
    name = config.get("_class_name")
    return name[1] if isinstance(name, (list, tuple)) else name
