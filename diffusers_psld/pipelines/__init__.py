"""Pipelines of diffusers-psld: ``PSLDPipeline`` (unconditional / guided / inpainting) and
``PSLDImg2ImgPipeline`` (SDEdit), sharing one denoising loop (:mod:`.denoising`)."""
from .guidance import NonFiniteError
from .pipeline_psld import PSLDPipeline, PSLDPipelineOutput
from .pipeline_psld_img2img import PSLDImg2ImgPipeline

__all__ = ["PSLDPipeline", "PSLDImg2ImgPipeline", "PSLDPipelineOutput", "NonFiniteError"]
