"""Load a repository script (benchmarks/, training/) as a module under a unique name.

A plain ``import`` could pick up an unrelated installed package of the same name (e.g. HF's ``evaluate``).
"""
import importlib.util
import os

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))


def load_script(relpath: str, name: str):
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, relpath))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
