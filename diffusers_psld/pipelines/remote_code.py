r"""The generic-loader entry: every saved pipeline carries ``pipeline_psld.py`` and names it in ``model_index.json``.

diffusers resolves a pipeline whose ``model_index.json`` has ``"_class_name": ["<file>", "<Class>"]`` from
``<file>.py`` stored next to it (``trust_remote_code=True``), so with what :func:`install` writes::

    DiffusionPipeline.from_pretrained(dir_or_repo, trust_remote_code=True)   # no custom_pipeline= needed
    DiffusionPipeline.from_pretrained(dir_or_repo, custom_pipeline="pipeline_psld", trust_remote_code=True)

work for a local directory and for a Hub repo that a push uploaded the folder to. The file (:data:`SOURCE`,
identical to the repository's ``pipelines/pipeline_psld.py``) only re-exports this package's classes, so the
components keep their real classes; it needs the package installed (diffusers' import check says so
otherwise). diffusers' ``custom_pipeline=`` search accepts exactly one ``DiffusionPipeline`` subclass among the
file's module members, so the file imports ``PSLDPipeline`` only and resolves the other classes of
:data:`PIPELINE_CLASSES` by name (a module ``__getattr__``). The file is the same for every saved class (diffusers
re-executes a cached module of the same name into the same module object, so per-class files would leave stale
members behind). :class:`PSLDPipeline` reads both forms of ``_class_name`` (directories saved before the file
existed hold the plain class name) and never executes the file.
"""
from __future__ import annotations

import json
import os
from typing import Optional, Union

__all__ = ["FILE_STEM", "PIPELINE_CLASSES", "SOURCE", "install", "class_name_of"]

#: stem of the file written next to ``model_index.json``
FILE_STEM = "pipeline_psld"

#: the package's pipeline classes the file resolves; the first is its one module member (``custom_pipeline=``)
PIPELINE_CLASSES = ("PSLDPipeline", "PSLDImg2ImgPipeline")

#: the text of the file (identical to the repository's ``pipelines/pipeline_psld.py``)
SOURCE = '''"""Hub custom-pipeline entry point for diffusers-psld checkpoints (written by ``save_pretrained``).

``model_index.json`` names this file (``"_class_name": ["pipeline_psld", "<Class>"]``), so the generic loader
finds the pipeline class without ``custom_pipeline=``::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("user/psld-digits", trust_remote_code=True)

``custom_pipeline="pipeline_psld"`` works too and gives ``PSLDPipeline``: diffusers accepts exactly one pipeline
class among a custom-pipeline file's module members, so the package's other pipeline classes are resolved by
name only. It needs the ``diffusers-psld`` package installed and only re-exports its classes, so components
keep their real classes: ``pip install "diffusers-psld>=0.1.0"`` once released; until then ``pip install -e .``
in a source checkout or ``pip install diffusers_psld-0.1.0-py3-none-any.whl`` (a wheel built there with
``python -m build``). ``diffusers_psld.PSLDPipeline.from_pretrained`` needs no remote code.
"""
from diffusers import DiffusionPipeline  # noqa: F401

from diffusers_psld.pipelines import PSLDPipeline  # noqa: F401

__all__ = ["PSLDPipeline"]


def __getattr__(name):
    """The package's other pipeline classes, by the name ``model_index.json`` gives (not module members)."""
    if name == "PSLDImg2ImgPipeline":
        import diffusers_psld.pipelines

        return getattr(diffusers_psld.pipelines, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
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


def class_name_of(config: dict, source: Optional[str] = None) -> str:
    """The pipeline class name of a ``model_index.json`` dict: ``"PSLDPipeline"`` or the class of
    ``["pipeline_psld", "PSLDPipeline"]``.

    Raises:
        ValueError: ``_class_name`` is neither a non-empty string nor a ``[file, class]`` pair of non-empty
            strings; the message names ``source`` (the file) when given.
    """
    name = config.get("_class_name")
    if isinstance(name, (list, tuple)) and len(name) == 2 and all(isinstance(n, str) and n for n in name):
        return name[1]
    if isinstance(name, str) and name:
        return name
    where = f"{source}: " if source else "model_index.json: "
    raise ValueError(f"{where}`_class_name` must be a pipeline class name (e.g. \"PSLDPipeline\") or a "
                     f"[file, class] pair such as [\"{FILE_STEM}\", \"PSLDPipeline\"], got {name!r}")
