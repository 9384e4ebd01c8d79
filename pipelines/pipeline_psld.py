"""Hub custom-pipeline entry point for diffusers-psld checkpoints.

Copy this file next to ``model_index.json`` in a Hub repo (or pass its path) so the generic loader works::

    from diffusers import DiffusionPipeline
    pipe = DiffusionPipeline.from_pretrained("user/psld-digits", custom_pipeline="pipeline_psld",
                                             trust_remote_code=True)

It needs the ``diffusers-psld`` package installed (``pip install diffusers-psld``); it only re-exports the
package's class, so components keep their real classes. Prefer ``diffusers_psld.PSLDPipeline.from_pretrained``,
which needs no remote code.
"""
from diffusers import DiffusionPipeline  # noqa: F401

from diffusers_psld.pipelines.pipeline_psld import PSLDPipeline, PSLDPipelineOutput  # noqa: F401

__all__ = ["PSLDPipeline"]
