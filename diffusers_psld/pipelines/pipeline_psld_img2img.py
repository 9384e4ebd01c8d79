r"""``PSLDImg2ImgPipeline``: image-to-image (SDEdit, Meng et al. 2022) for PSLD / CLD / VP diffusions.

Start from an image instead of the prior: the image's x is pushed through the forward HSM kernel
p(z_τ | x₀) (PSLD paper Eq. 10; the momentum is drawn from the same kernel, m₀ ~ N(0, κM) integrated out) to
the time τ of a mid-schedule call, and the reverse process runs from there, with any scheduler of this
package, guidance and callbacks as in :class:`~.pipeline_psld.PSLDPipeline` (same denoising loop,
:mod:`.denoising`).

Strength rule: after ``scheduler.set_timesteps(num_inference_steps)`` the run starts at the first call whose
forward time (``scheduler.exact_timesteps``) is ``<= strength``, ``begin`` (the call that starts a step where two
share that time), via diffusers' ``scheduler.set_begin_index(begin)``; the image is noised to exactly that time
``τ = scheduler.state_time(begin)``, the grid time nearest to ``strength`` from below, whatever the striding
(diffusers' index rule ``N - floor(N · strength)`` would start at t ≈ 0.25 for strength 0.5 on a quadratic
grid). NFE = ``num_inference_steps - begin`` (≈ ``strength · num_inference_steps`` on a uniform grid).
``strength = 1`` starts from the prior itself, as diffusers' inpainting does at full strength (the kernel at
t = 1 equals the prior up to a remainder of order e⁻⁸ for the default β), so it *is* unconditional sampling,
path by path with the same generator.
"""

import math
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils.torch_utils import randn_tensor

from . import inputs as _inputs
from . import vp_bridge as _vp_bridge
from .denoising import denoise
from .pipeline_psld import PSLDPipeline, PSLDPipelineOutput, set_schedule

__all__ = ["PSLDImg2ImgPipeline", "begin_index_for_strength"]

EXAMPLE_DOC_STRING = r"""
    Example (untrained tiny UNet; use a trained checkpoint for real images)::

        >>> import torch
        >>> from diffusers_psld import PSLDImg2ImgPipeline, PSLDScheduler
        >>> from diffusers_psld.models import build_unet
        >>> pipe = PSLDImg2ImgPipeline(unet=build_unet("tiny", data_channels=1, num_components=2, sample_size=8), scheduler=PSLDScheduler())
        >>> image = torch.rand(1, 1, 8, 8)                  # [B, C, H, W] in [0, 1] (PIL / NumPy work too)
        >>> out = pipe(image=image, strength=0.5, num_inference_steps=10, output_type="np",
        ...            generator=torch.Generator().manual_seed(0))  # runs the last 5 of the 10 calls
        >>> out.images.shape
        (1, 8, 8, 1)
        >>> # pipe = PSLDImg2ImgPipeline.from_pretrained("outputs/psld-digits-psld")   # any saved PSLD pipeline
        >>> # pipe = PSLDImg2ImgPipeline(**PSLDPipeline.from_pretrained(...).components)
"""


def begin_index_for_strength(scheduler, strength: float) -> int:
    """The call at which a run for ``strength`` starts in ``scheduler``'s current schedule (0 for strength 1).

    The first forward time of the schedule (``scheduler.exact_timesteps``) that is ``<= strength``, resolved to a
    call index by the scheduler's own index-by-timestep rule (``scheduler.index_for_timestep``: where two calls
    share a time, e.g. PF-Heun's corrector and the next predictor, the call that starts a step). A run started
    there takes its state at that forward time (``scheduler.state_time(begin)`` once ``set_begin_index(begin)``
    is set), for every sampler.

    Raises:
        ValueError: ``strength`` outside (0, 1] or below the schedule's last time (no call would run).
    """
    s = _inputs.as_real(strength, "strength")
    if not 0.0 < s <= 1.0:
        raise ValueError(f"`strength` must be in (0, 1] (1 = start from pure noise), got {strength!r}")
    if s == 1.0:
        return 0
    times = scheduler.exact_timesteps
    below = torch.nonzero(times <= s + 1e-12).flatten()
    if len(below) == 0:
        raise ValueError(
            f"`strength`={s:g} is below the last time {float(times[-1]):.4g} of this {len(times)}-call schedule: no "
            f"call would run; raise `strength` or `num_inference_steps`"
        )
    return int(scheduler.index_for_timestep(times[below[0]]))


class PSLDImg2ImgPipeline(PSLDPipeline):
    r"""Image-to-image (SDEdit) for PSLD / CLD / VP diffusions: noise an image to ``t ≈ strength`` with the forward
    HSM kernel, then denoise with the pipeline's scheduler.

    Components and loading are those of :class:`PSLDPipeline` (``unet``, ``scheduler``, optional ``classifier``):
    ``PSLDImg2ImgPipeline.from_pretrained(dir_or_repo)`` loads any saved PSLD pipeline, and
    ``PSLDImg2ImgPipeline(**pipe.components)`` reuses a loaded one.
    """

    @torch.no_grad()
    def __call__(
        self,
        image: Union[PIL.Image.Image, List[PIL.Image.Image], np.ndarray, torch.Tensor] = None,
        strength: float = 0.8,
        num_inference_steps: Optional[int] = None,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Union[Callable[[Any, int, float, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["sample"],  # noqa: B006  (diffusers convention)
        return_momentum: bool = False,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: Optional[float] = None,
        guidance_type: Optional[str] = None,
        batch_size: Optional[int] = None,
        timesteps: Optional[List[float]] = None,
        sigmas: Optional[List[float]] = None,
    ) -> Union[PSLDPipelineOutput, tuple]:
        r"""Denoise ``image`` from ``t ≈ strength``.

        Args:
            image (PIL image, list of them, NumPy ``[H,W]`` / ``[H,W,C]`` / ``[B,H,W,C]`` or tensor ``[C,H,W]`` /
                ``[B,C,H,W]``, values in [0, 1]; uint8 NumPy in [0, 255]): the start image(s). Their size sets the
                output size and must be divisible by the UNet's downsampling factor.
            strength (`float` in (0, 1], defaults to 0.8): how far into the forward process the image is pushed;
                the run starts at the first call whose state time is <= strength (module docstring). Small: close
                to the input; 1: unconditional sampling.
            num_inference_steps (`int` >= 2, *optional*): calls of the *full* schedule (see `strength`); default: the
                scheduler's stored custom schedule if it has one, else 100.
            timesteps, sigmas (`List[float]`, *optional*): the *full* schedule as forward times or noise levels σ_t, as
                in :meth:`PSLDPipeline.__call__` (at most one of `num_inference_steps`, `timesteps`, `sigmas`).
            generator, output_type, return_dict, callback_on_step_end, callback_on_step_end_tensor_inputs,
            return_momentum, class_labels, guidance_scale, guidance_type: as in :meth:`PSLDPipeline.__call__`
                (the callback's step index counts the calls of this run from 0).
            batch_size (`int`, *optional*): number of outputs; defaults to the number of images (one image is
                repeated to `batch_size`).

        Returns:
            :class:`PSLDPipelineOutput` (``.images``, ``.momentum``) or a tuple.

        Raises:
            ValueError / TypeError: a bad argument, named in the message.
            NonFiniteError (a ``FloatingPointError``): a NaN or inf during sampling (call, time and likely cause).
        """
        if image is None:
            raise ValueError("`image` is required: the image(s) to start from")
        if batch_size is None:
            batch_size = _images_in(image)
        batch_size, steps, generator, cb_inputs = self._check_common(
            batch_size, num_inference_steps, output_type, generator, return_momentum, callback_on_step_end,
            callback_on_step_end_tensor_inputs, return_dict)
        _inputs.as_real(strength, "strength")
        device = self._execution_device
        k, C = self.num_components, self.data_channels
        x0 = _inputs.prepare_image(image, C, batch_size, device)
        hw = tuple(x0.shape[-2:])
        _inputs.check_spatial_size(hw, _vp_bridge.network_of(self.unet), "image", self.max_size_factor)
        _inputs.check_batch_memory(batch_size, k * C, hw, device)
        eps_fn, add_classifier_guidance = self._guided_eps_fn(
            class_labels, guidance_scale, guidance_type, batch_size, device, self.unet.dtype)

        set_schedule(self.scheduler, steps, timesteps, sigmas, device)
        begin = begin_index_for_strength(self.scheduler, strength)
        if begin:
            self.scheduler.set_begin_index(begin)  # so that state_time(begin) is the time this start expects
        shape = (batch_size, k * C, *hw)
        if begin == 0:  # strength 1: the prior itself (module docstring)
            z = self.scheduler.sample_prior(shape, generator=generator, device=device, dtype=torch.float32)
        else:  # the forward HSM kernel p(z_τ | x₀) at the state time of the first call that runs
            noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            z = self.scheduler.add_noise(x0, noise, self.scheduler.state_time(begin))
        z = denoise(self, z, add_classifier_guidance(eps_fn), generator=generator, begin_index=begin,
                    callback=callback_on_step_end, callback_tensor_inputs=cb_inputs)
        return self._finish(z, output_type, return_momentum, return_dict)


def _images_in(image) -> int:
    """Number of images in ``image`` (for the default ``batch_size``); 1 for anything unbatched."""
    if isinstance(image, (list, tuple)):
        return max(len(image), 1)
    if isinstance(image, np.ndarray) and image.ndim == 4:
        return image.shape[0]
    if isinstance(image, torch.Tensor) and image.ndim == 4:
        return image.shape[0]
    return 1


PSLDImg2ImgPipeline.__call__.__doc__ = (PSLDImg2ImgPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
