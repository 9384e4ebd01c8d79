"""Pipelines of diffusers-psld."""
from .pipeline_psld import PSLDPipeline, PSLDPipelineOutput

__all__ = ["PSLDPipeline", "PSLDPipelineOutput"]
