"""Hub custom-pipeline entry point for diffusers-psld checkpoints (written by ``save_pretrained``).

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
