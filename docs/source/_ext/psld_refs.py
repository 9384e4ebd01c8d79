"""Resolve the short names that this package's docstrings use for its own objects.

Docstrings say :class:`PSLDScheduler` or :meth:`PSLDScheduler.step` from whichever module they live in, and the
guides say ``diffusers_psld.PSLDScheduler`` (the public import path). Sphinx's Python domain only finds a name
relative to the current module, so such references are resolved here: a target is matched against every object
documented in this build whose full name is the target or ends with ``.<target>`` (``diffusers_psld.X`` also
matches the object that ``diffusers_psld.X`` is). Only a *unique* match resolves; an ambiguous or unknown name stays
unresolved, so the strict (nitpicky, warnings-as-errors) build still reports it.
"""
from __future__ import annotations

import importlib

from sphinx.util.nodes import make_refnode

_ROLES = {"class": ("class", "exception"), "exc": ("exception", "class"), "func": ("function", "method"),
          "meth": ("method", "function", "classmethod", "staticmethod"), "attr": ("attribute", "property", "data"),
          "data": ("data", "attribute"), "obj": None, "mod": ("module",), "const": ("data", "attribute")}


def _public_alias(target: str) -> str | None:
    """``diffusers_psld.PSLDScheduler.step`` -> ``diffusers_psld.schedulers.scheduling_psld.PSLDScheduler.step``."""
    parts = target.split(".")
    if parts[0] != "diffusers_psld" or len(parts) < 2:
        return None
    package = importlib.import_module("diffusers_psld")
    obj = getattr(package, parts[1], None)
    if obj is None or not hasattr(obj, "__module__") or not hasattr(obj, "__qualname__"):
        return None
    return ".".join([obj.__module__, obj.__qualname__, *parts[2:]])


def _import(name: str):
    """The object with the full dotted ``name`` (module path, then attributes), or None."""
    parts = name.split(".")
    for i in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:i]))
        except ImportError:
            continue
        for attr in parts[i:]:
            obj = getattr(obj, attr, None)
        return obj
    return None


def _inherited(target: str, objects) -> str | None:
    """``PSLDScheduler.model_time`` -> the documented method of the base class that defines it (the schedulers are
    assembled from mixins in their own modules): the class must resolve uniquely, then its MRO is walked."""
    head, _, attr = target.rpartition(".")
    if not head:
        return None
    alias = _public_alias(head)
    classes = [alias] if alias in objects else [
        n for n, e in objects.items()
        if n.startswith("diffusers_psld.") and e.objtype == "class" and (n == head or n.endswith("." + head))]
    if len(classes) != 1:
        return None
    cls = _import(classes[0])
    for base in getattr(cls, "__mro__", ()):
        if attr in vars(base):
            name = f"{base.__module__}.{base.__qualname__}.{attr}"
            return name if name in objects else None
    return None


def _resolve(app, env, node, contnode):
    if node.get("refdomain") != "py":
        return None
    target = node.get("reftarget", "").lstrip("~.")
    if not target:
        return None
    objects = env.get_domain("py").objects
    kinds = _ROLES.get(node.get("reftype"), None)
    alias = _public_alias(target)
    if alias in objects:
        matches = [alias]
    else:
        matches = [name for name, entry in objects.items()
                   if name.startswith("diffusers_psld.") and (name == target or name.endswith("." + target))
                   and (kinds is None or entry.objtype in kinds)]
    if len(matches) != 1:
        inherited = _inherited(target, objects)
        if inherited is None:
            return None
        matches = [inherited]
    entry = objects[matches[0]]
    return make_refnode(app.builder, node["refdoc"], entry.docname, entry.node_id, contnode, matches[0])


def setup(app):
    app.connect("missing-reference", _resolve)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
