r"""``PSLDPipeline``: unconditional, class-guided, classifier-free-guided and inpainting sampling.

The module path ``diffusers_psld.pipelines.pipeline_psld`` is recorded in saved ``model_index.json``
files (``_class_name`` only; components record their own module paths), so keep it stable.

Conventions
-----------
* The state is ``z = [x ; m]`` (``k*C`` channels; k = 2 for PSLD/CLD, 1 for VP). Only the data half
  ``x`` is returned as the image, mapped from [-1, 1] to [0, 1]; the momentum ``m`` on request.
* **Classifier guidance** (PSLD paper Eq. 13-14): with a time-dependent classifier p(y | z_t) on the
  full state, the score becomes ``s_θ + guidance_scale · ∇_z log p(y | z_t)`` (gradient w.r.t. both x
  and m), which in ε-space is ``ε - guidance_scale · Lᵀ ∇_z log p(y | z_t)``
  (:meth:`PSLDScheduler.score_to_eps_shift`). Every sampler then applies ``G Gᵀ`` (or its own
  reverse-drift weighting) to the guided score, i.e. Eq. 14. The classifier receives the **forward**
  time ``scheduler.model_time(t)``, the same as the UNet (the official code passes the reverse time).
* **Classifier-free guidance**: with a class-conditional UNet (``num_class_embeds = n_classes + 1``,
  the last index is the *null* class used for label dropout), the standard Diffusers form
  ``ε = ε_u + guidance_scale · (ε_c - ε_u)`` is used: ``guidance_scale = 1`` samples the conditional
  model without guidance (one UNet pass), ``0`` the unconditional one, ``> 1`` extrapolates
  (batch doubled: ``[cond ; null]``). Without ``class_labels`` a class-conditional UNet samples
  unconditionally through the null class.
* **Inpainting**: ``mask_image`` is 1 (white) where the pixel is **known / kept** and 0 (black) where
  it is generated -- the RePaint convention and the *opposite* of Stable-Diffusion inpainting. After
  every step the known pixels of both x and m are replaced by a fresh draw from the forward HSM kernel
  p(z_τ | x₀) at the current state time τ (``scheduler.state_time``); at the end (τ = 0) they are the
  kernel mean, so the known data is returned exactly. Replacement alone (``inpaint_correction=None`` /
  ``"replace"``, the paper's method and the default) drops the term ∇ log p(x₀ᵏⁿᵒʷⁿ | z_t) of the
  conditional score, so for correlated data the filled-in pixels are biased towards their *marginal*
  law. ``inpaint_correction="tweedie"`` adds that term by second-order Tweedie (exact for Gaussian
  data; conjugate gradients with vector-Jacobian products through the UNet): see
  :mod:`diffusers_psld.inpainting` for the derivation, guards and cost.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging
from diffusers.utils.torch_utils import randn_tensor

# Component modules must be imported so that diffusers' loader finds them in ``sys.modules``.
from .. import inpainting as _inpainting
from ..models import classifier as _classifier_module  # noqa: F401
from ..models.classifier import TimeDependentClassifier
from ..schedulers import PSLDScheduler

__all__ = ["PSLDPipeline", "PSLDPipelineOutput"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = ("pil", "np", "pt")
GUIDANCE_TYPES = ("classifier", "cfg")

EXAMPLE_DOC_STRING = r"""
    Example (runs on CPU in a second with an untrained tiny UNet; use a trained checkpoint for real images)::

        >>> import torch
        >>> from diffusers import UNet2DModel
        >>> from diffusers_psld.pipelines import PSLDPipeline
        >>> from diffusers_psld.schedulers import PSLDScheduler, SSCSScheduler
        >>> unet = UNet2DModel(sample_size=8, in_channels=2, out_channels=2, block_out_channels=(8, 16),
        ...                    down_block_types=("DownBlock2D", "DownBlock2D"),
        ...                    up_block_types=("UpBlock2D", "UpBlock2D"), norm_num_groups=4, layers_per_block=1)
        >>> pipe = PSLDPipeline(unet=unet, scheduler=PSLDScheduler())
        >>> out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0),
        ...            output_type="np")
        >>> out.images.shape
        (2, 8, 8, 1)
        >>> pipe = PSLDPipeline(unet=pipe.unet, scheduler=SSCSScheduler.from_config(pipe.scheduler.config))
        >>> pipe.save_pretrained("psld-tiny")  # doctest: +SKIP
        >>> pipe = PSLDPipeline.from_pretrained("psld-tiny")  # or a Hub id  # doctest: +SKIP
"""


@dataclass
class PSLDPipelineOutput(ImagePipelineOutput):
    """Output of :class:`PSLDPipeline` (an :class:`~diffusers.ImagePipelineOutput`).

    Args:
        images: the data half x in [0, 1]: a list of PIL images, a NumPy array ``[B, H, W, C]`` or a
            tensor ``[B, C, H, W]`` (``output_type`` "pil" / "np" / "pt").
        momentum: the momentum half m (raw values, not rescaled) when ``return_momentum=True``: a tensor
            ``[B, (k-1)*C, H, W]`` for ``output_type="pt"``, otherwise a NumPy array ``[B, H, W, (k-1)*C]``.
    """

    momentum: Optional[Union[torch.Tensor, np.ndarray]] = None


def _snapshot_download(repo_id: str, **kwargs) -> str:
    """Thin wrapper (one patch point for tests) around ``huggingface_hub.snapshot_download``."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo_id, **kwargs)


class PSLDPipeline(DiffusionPipeline):
    r"""Sampling pipeline for PSLD / CLD / VP diffusions trained with ε-prediction on ``[x ; m]`` states.

    Components:
        unet (:class:`~diffusers.UNet2DModel`): ε-network with ``k*C`` input and output channels.
            Optionally class-conditional (``num_class_embeds = n_classes + 1``, last index = null class)
            for classifier-free guidance.
        scheduler (:class:`~diffusers_psld.PSLDScheduler` or :class:`~diffusers_psld.SSCSScheduler`):
            any scheduler of this package (swap with ``SSCSScheduler.from_config(pipe.scheduler.config)``).
        classifier (:class:`~diffusers_psld.models.classifier.TimeDependentClassifier`, *optional*):
            time-dependent classifier p(y | z_t) on the full ``k*C``-channel state for class guidance.

    Loading: :meth:`from_pretrained` accepts a local directory or a Hub repo id (downloaded with
    ``huggingface_hub.snapshot_download`` first, because diffusers 0.42.1 cannot resolve third-party
    components from a Hub id). ``DiffusionPipeline.from_pretrained`` on our repos needs
    ``custom_pipeline=...`` (see the top-level ``pipelines/`` folder of the repository).
    """

    model_cpu_offload_seq = "classifier->unet"
    _optional_components = ["classifier"]
    _callback_tensor_inputs = ["sample", "pred_original_sample"]
    #: diagnostics of the last call with ``inpaint_correction="tweedie"`` (one ``TweedieInfo`` per model call), else None
    inpaint_info = None

    def __init__(self, unet: UNet2DModel, scheduler: PSLDScheduler, classifier: Optional[TimeDependentClassifier] = None):
        super().__init__()
        k = getattr(scheduler, "num_components", None)
        if k is None:
            raise ValueError(f"`scheduler` must be a diffusers_psld scheduler (PSLDScheduler/SSCSScheduler), got {type(scheduler).__name__}")
        if unet.config.in_channels % k != 0 or unet.config.out_channels != unet.config.in_channels:
            raise ValueError(
                f"`unet` must have in_channels == out_channels == k*C with k={k} components; got "
                f"in_channels={unet.config.in_channels}, out_channels={unet.config.out_channels}"
            )
        if classifier is not None and classifier.config.in_channels != unet.config.in_channels:
            raise ValueError(
                f"`classifier` must take the full state ({unet.config.in_channels} channels), got "
                f"in_channels={classifier.config.in_channels}"
            )
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load from a local directory or a Hub repo id.

        A repo id is fetched with ``huggingface_hub.snapshot_download`` (honouring ``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``; offline mode
        uses the local cache) and then loaded from the snapshot directory. Other keyword arguments go to
        :meth:`diffusers.DiffusionPipeline.from_pretrained` (e.g. ``torch_dtype``, ``classifier=None``).
        """
        path = pretrained_model_name_or_path
        if not os.path.isdir(str(path)):
            dl = {key: kwargs.pop(key) for key in ("revision", "cache_dir", "token", "local_files_only",
                                                   "force_download", "proxies") if key in kwargs}
            dl = {key: val for key, val in dl.items() if val is not None}
            path = _snapshot_download(str(path), **dl)
        return super().from_pretrained(path, **kwargs)

    # ------------------------------------------------------------------ properties
    @property
    def num_components(self) -> int:
        return self.scheduler.num_components

    @property
    def data_channels(self) -> int:
        return self.unet.config.in_channels // self.num_components

    @property
    def is_class_conditional(self) -> bool:
        """True when the UNet has class embeddings (classifier-free guidance; last index = null class)."""
        return self.unet.config.num_class_embeds is not None

    @property
    def num_timesteps(self):
        return getattr(self, "_num_timesteps", None)

    @property
    def interrupt(self):
        return getattr(self, "_interrupt", False)

    # ------------------------------------------------------------------ input checks
    def _sample_hw(self):
        size = self.unet.config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    def _prepare_labels(self, class_labels, batch_size, n_classes, device, what):
        if isinstance(class_labels, (int, np.integer)) and not isinstance(class_labels, bool):
            labels = torch.full((batch_size,), int(class_labels), dtype=torch.long)
        else:
            try:
                labels = torch.as_tensor(class_labels)
            except Exception as err:  # noqa: BLE001
                raise ValueError(f"`class_labels` must be an int, a list of ints or a tensor, got {type(class_labels).__name__}") from err
            if labels.is_floating_point() or labels.dtype == torch.bool or labels.ndim > 1:
                raise ValueError(f"`class_labels` must be integer class indices, got dtype {labels.dtype} shape {tuple(labels.shape)}")
            labels = labels.reshape(-1).long()
            if labels.numel() == 1:
                labels = labels.expand(batch_size).clone()
            if labels.numel() != batch_size:
                raise ValueError(f"`class_labels` must have 1 or batch_size={batch_size} entries, got {labels.numel()}")
        if labels.min() < 0 or labels.max() >= n_classes:
            raise ValueError(
                f"`class_labels` must be in [0, {n_classes - 1}] ({n_classes} classes of the {what}), got "
                f"{labels.min().item()}..{labels.max().item()}"
            )
        return labels.to(device)

    def _prepare_image(self, image, batch_size, device) -> torch.Tensor:
        """``image`` → float32 tensor ``[B, C, H, W]`` in [-1, 1]; inputs must lie in [0, 1]."""
        C = self.data_channels
        if isinstance(image, PIL.Image.Image):
            image = [image]
        if isinstance(image, (list, tuple)) and len(image) and all(isinstance(im, PIL.Image.Image) for im in image):
            mode = {1: "L", 3: "RGB", 4: "RGBA"}.get(C)
            if mode is None:
                raise ValueError(f"`image` as PIL needs a 1/3/4-channel model; this model has C={C}; pass a tensor")
            image = np.stack([np.asarray(im.convert(mode), dtype=np.float32) / 255.0 for im in image])
            if image.ndim == 3:
                image = image[..., None]
        if isinstance(image, np.ndarray):
            arr = image
            if arr.dtype == np.uint8:
                arr = arr.astype(np.float32) / 255.0
            if arr.ndim == 2:
                arr = arr[None, :, :, None]
            elif arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4:
                raise ValueError(f"`image` as a NumPy array must be [H, W], [H, W, C] or [B, H, W, C], got shape {image.shape}")
            tensor = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32)).permute(0, 3, 1, 2)
        elif isinstance(image, torch.Tensor):
            tensor = image.detach().to("cpu", torch.float32)
            if tensor.ndim == 3:
                tensor = tensor[None]
            if tensor.ndim != 4:
                raise ValueError(f"`image` as a tensor must be [C, H, W] or [B, C, H, W], got shape {tuple(image.shape)}")
        else:
            raise ValueError(f"`image` must be a PIL image, a list of them, a NumPy array or a tensor; got {type(image).__name__}")
        if tensor.shape[1] != C:
            raise ValueError(f"`image` must have {C} channel(s) (the model's data channels), got {tensor.shape[1]} (shape {tuple(tensor.shape)})")
        if not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1:
            raise ValueError(f"`image` values must lie in [0, 1], got range [{tensor.min().item():.4g}, {tensor.max().item():.4g}]")
        if tensor.shape[0] not in (1, batch_size):
            raise ValueError(f"`image` must hold 1 or batch_size={batch_size} images, got {tensor.shape[0]}")
        return tensor.expand(batch_size, -1, -1, -1).to(device) * 2.0 - 1.0

    def _prepare_mask(self, mask_image, image: torch.Tensor, device) -> torch.Tensor:
        """``mask_image`` → float32 {0, 1} tensor ``[B, 1, H, W]`` (1 = keep), binarised at 0.5."""
        if isinstance(mask_image, PIL.Image.Image):
            mask_image = [mask_image]
        if isinstance(mask_image, (list, tuple)) and len(mask_image) and all(isinstance(m, PIL.Image.Image) for m in mask_image):
            mask_image = np.stack([np.asarray(m.convert("L"), dtype=np.float32) / 255.0 for m in mask_image])
        if isinstance(mask_image, np.ndarray):
            arr = mask_image.astype(np.float32) / 255.0 if mask_image.dtype == np.uint8 else mask_image
            mask = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
            if mask.ndim == 4 and mask.shape[-1] == 1:  # [B, H, W, 1]
                mask = mask.permute(0, 3, 1, 2)
        elif isinstance(mask_image, torch.Tensor):
            mask = mask_image.detach().to("cpu", torch.float32)
        else:
            raise ValueError(f"`mask_image` must be a PIL image, a list of them, a NumPy array or a tensor; got {type(mask_image).__name__}")
        if mask.ndim == 2:
            mask = mask[None, None]
        elif mask.ndim == 3:
            mask = mask[:, None]
        if mask.ndim != 4 or mask.shape[1] != 1:
            raise ValueError(f"`mask_image` must be [H, W], [B, H, W] or [B, 1, H, W] (one channel), got shape {tuple(mask.shape)}")
        B, _, H, W = image.shape
        if mask.shape[-2:] != (H, W):
            raise ValueError(f"`mask_image` size {tuple(mask.shape[-2:])} does not match `image` size {(H, W)}")
        if mask.shape[0] not in (1, B):
            raise ValueError(f"`mask_image` must hold 1 or {B} masks, got {mask.shape[0]}")
        if not torch.isfinite(mask).all() or mask.min() < 0 or mask.max() > 1:
            raise ValueError(f"`mask_image` values must lie in [0, 1] (1 = keep), got range [{mask.min().item():.4g}, {mask.max().item():.4g}]")
        return (mask >= 0.5).float().expand(B, -1, -1, -1).to(device)

    # ------------------------------------------------------------------ model calls
    def _unet_eps(self, z, t, labels, unet_dtype):
        """ε from the UNet at state ``z`` (float32) and time ``t``; the input is cast to ``unet_dtype``.

        ``unet_dtype`` (the UNet's dtype) is resolved once per ``__call__`` by the caller, because diffusers' ``ModelMixin.dtype``
        walks every submodule (~0.6 ms per query on the digits preset: ~2.5 % of a CPU step)."""
        B = z.shape[0]
        tm = self.scheduler.model_time(t, B, device=z.device)
        kwargs = {} if labels is None else {"class_labels": labels}
        out = self.unet(z.to(unet_dtype), tm, **kwargs).sample
        return out.to(z.dtype)

    def _classifier_grad(self, z, t, labels):
        """∇_z log p(y | z_t) (w.r.t. the full state), summed over the batch (per-sample gradients)."""
        tm = self.scheduler.model_time(t, z.shape[0], device=z.device)
        with torch.enable_grad():
            zin = z.detach().to(self.classifier.dtype).requires_grad_(True)
            out = self.classifier(zin, tm)
            logits = (out.logits if hasattr(out, "logits") else out).float()
            logp = torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).sum()
            (grad,) = torch.autograd.grad(logp, zin)
        return grad.to(z.dtype)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: int = 100,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Optional[Union[Callable[[Any, int, float, Dict], Dict], PipelineCallback, MultiPipelineCallbacks]] = None,
        callback_on_step_end_tensor_inputs: List[str] = ["sample"],  # noqa: B006  (diffusers convention)
        return_momentum: bool = False,
        class_labels: Optional[Union[int, List[int], torch.Tensor]] = None,
        guidance_scale: Optional[float] = None,
        guidance_type: Optional[str] = None,
        image: Optional[Union[PIL.Image.Image, List[PIL.Image.Image], np.ndarray, torch.Tensor]] = None,
        mask_image: Optional[Union[PIL.Image.Image, List[PIL.Image.Image], np.ndarray, torch.Tensor]] = None,
        inpaint_correction: Optional[str] = None,
        inpaint_cg_iters: int = 4,
        inpaint_cg_tol: float = 1e-3,
        inpaint_ridge: float = 1e-3,
    ) -> Union[PSLDPipelineOutput, tuple]:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            generator (`torch.Generator` or list of them, *optional*): for reproducibility; the same
                generator state gives identical outputs.
            num_inference_steps (`int`, defaults to 100): exact number of UNet evaluations (>= 2),
                including the final denoising step (doubled by classifier-free guidance with scale ≠ 0, 1).
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (``[B, H, W, C]`` float32) or
                `"pt"` (``[B, C, H, W]``); values in [0, 1].
            return_dict (`bool`, defaults to True): return a :class:`PSLDPipelineOutput` instead of a tuple
                ``(images,)`` / ``(images, momentum)``.
            callback_on_step_end (*optional*): ``fn(pipe, i, t, tensors) -> dict`` called after every step
                with the requested tensors (`"sample"`: the full ``[x ; m]`` state, `"pred_original_sample"`);
                a returned `"sample"` replaces the state. A `PipelineCallback` also works.
            callback_on_step_end_tensor_inputs (`List[str]`): names from ``_callback_tensor_inputs``.
            return_momentum (`bool`, defaults to False): also return the momentum half m (PSLD/CLD only).
            class_labels (`int`, list or tensor, *optional*): target class(es) for classifier guidance
                (needs ``classifier``) or classifier-free guidance (needs a class-conditional UNet).
            guidance_scale (`float`, *optional*): classifier guidance: weight of ∇ log p(y | z_t)
                (default 1.0 = exact Bayes posterior score); classifier-free: ``ε_u + s (ε_c - ε_u)``
                (default 1.0 = conditional model, no extrapolation). Requires `class_labels`.
            guidance_type (`str`, *optional*): `"classifier"` or `"cfg"`; by default `"cfg"` if the UNet is
                class-conditional, else `"classifier"`.
            image (PIL / NumPy ``[B,H,W,C]`` / tensor ``[B,C,H,W]`` in [0, 1], *optional*): known image for
                inpainting (1 or `batch_size` images; its size sets the output size).
            mask_image (PIL "L" / NumPy / tensor in [0, 1], *optional*): **1 = keep (known), 0 = generate**
                (opposite of Stable-Diffusion inpainting); binarised at 0.5; shape ``[H, W]``, ``[B, H, W]``
                or ``[B, 1, H, W]``.
            inpaint_correction (`str`, *optional*): how the unknown pixels are conditioned on the known ones.
                `None` / `"replace"` (default): the paper's replacement only -- after every step the known
                pixels of x and m are a fresh draw from the forward kernel; cheap (no extra network work) but
                **biased for correlated data**: it drops ∇ log p(x₀ᵏⁿᵒʷⁿ | z_t) from the conditional score,
                so filled-in pixels lean towards their marginal (with the exact score of a correlated
                Gaussian and known pixels 3 s.d. out, the filled-in mean moves only 25-50 % of the way).
                `"tweedie"`: replacement plus that term, ``J_Kᵀ C_KK⁻¹ (y - x̂₀_K)`` from second-order Tweedie
                (exact for Gaussian data), added on the unknown entries of x and m. **Cost per model call**:
                the forward pass keeps its autograd graph, plus up to ``inpaint_cg_iters + 1`` backward passes
                and the memory of a training step; measured on the `digits` preset (CPU, batch 8 and 32) a
                step takes ≈ (2.1 + 0.96·n_cg)x the time of a plain replacement step: 4.1x at 2 CG
                iterations, 6x at the default 4, 9.8x at 8. Works with every
                scheduler of this package and with classifier-free guidance (the guided ε is differentiated);
                classifier-guidance gradients are added after the correction and not differentiated.
                Diagnostics of the last call: ``pipe.inpaint_info`` (one :class:`~diffusers_psld.inpainting.TweedieInfo`
                per model call).
            inpaint_cg_iters (`int`, defaults to 4): maximum conjugate-gradient iterations (backward passes)
                per model call for solving ``C_KK s = y - x̂₀_K``. Exact Gaussian data needs |K| (the number of
                known pixels) in exact arithmetic; with a trained network CG stalls after a few iterations (its
                implied C_KK is not SPD), and 4, 8 and 16 gave the same fill error on the digits model.
            inpaint_cg_tol (`float`, defaults to 1e-3): CG stops once every sample's residual is below this
                fraction of its initial residual.
            inpaint_ridge (`float`, defaults to 1e-3): ridge ``λ = inpaint_ridge · (rᵀ C r / rᵀ r)`` added to
                ``C_KK`` (relative to C's Rayleigh quotient, so it is scale-free across noise levels). A
                non-positive-definite C (possible for a learned network) truncates CG, or drops the correction
                for that sample and step with a logged warning; no NaN is produced.

        Returns:
            :class:`PSLDPipelineOutput` (``.images``, ``.momentum``) or a tuple.
        """
        # ---- checks
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be a positive int, got {batch_size!r}")
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 2:
            raise ValueError(
                f"`num_inference_steps` must be an int >= 2 (reverse steps + the final denoising step), got {num_inference_steps!r}"
            )
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"`output_type` must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"`generator` list must have batch_size={batch_size} entries, got {len(generator)}")
        k = self.num_components
        if return_momentum and k < 2:
            raise ValueError("`return_momentum=True` needs an augmented diffusion (PSLD/CLD); this scheduler is VP (no momentum)")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {bad}")
        if (image is None) != (mask_image is None):
            raise ValueError("`image` and `mask_image` must be given together for inpainting")
        inpaint_method = _inpainting.check_inpaint_args(inpaint_correction, inpaint_cg_iters, inpaint_cg_tol, inpaint_ridge)
        if inpaint_method != "replace" and image is None:
            raise ValueError(f"`inpaint_correction={inpaint_correction!r}` needs `image` and `mask_image` (inpainting)")

        # ---- guidance mode
        if guidance_type is not None and guidance_type not in GUIDANCE_TYPES:
            raise ValueError(f"`guidance_type` must be one of {GUIDANCE_TYPES} or None, got {guidance_type!r}")
        if guidance_type is None:
            guidance_type = "cfg" if self.is_class_conditional else "classifier"
        if guidance_scale is not None:
            if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)) or not np.isfinite(guidance_scale) or guidance_scale < 0:
                raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {guidance_scale!r}")
            if class_labels is None and guidance_scale != 1.0:
                raise ValueError("`guidance_scale` needs `class_labels` (which class to guide towards)")
        scale = 1.0 if guidance_scale is None else float(guidance_scale)
        device = self._execution_device
        unet_dtype = self.unet.dtype
        labels = None
        if guidance_type == "cfg":
            if not self.is_class_conditional:
                raise ValueError("`guidance_type='cfg'` needs a class-conditional UNet (num_class_embeds = n_classes + 1)")
            n_cls = self.unet.config.num_class_embeds - 1
            null = torch.full((batch_size,), n_cls, dtype=torch.long, device=device)
            if class_labels is not None:
                labels = self._prepare_labels(class_labels, batch_size, n_cls, device, "class-conditional UNet (last index is the null class)")
        elif class_labels is not None:
            if self.classifier is None:
                raise ValueError(
                    "`class_labels` needs a `classifier` component (classifier guidance) or a class-conditional UNet "
                    "(classifier-free guidance); this pipeline has neither"
                )
            labels = self._prepare_labels(class_labels, batch_size, self.classifier.config.num_classes, device, "classifier")

        # ---- inpainting inputs
        C = self.data_channels
        if image is not None:
            x_known = self._prepare_image(image, batch_size, device)
            mask = self._prepare_mask(mask_image, x_known, device)
            H, W = x_known.shape[-2:]
        else:
            H, W = self._sample_hw()

        # ---- sampling
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        timesteps = self.scheduler.timesteps
        self._num_timesteps = len(timesteps)
        self._interrupt = False
        shape = (batch_size, k * C, H, W)
        z = self.scheduler.sample_prior(shape, generator=generator, device=device, dtype=torch.float32)

        def known_state(time: float) -> torch.Tensor:
            if time <= 0.0:  # kernel mean at t = 0: the clean known data (and zero mean momentum)
                noise = torch.zeros(shape, device=device, dtype=torch.float32)
            else:
                noise = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
            tt = torch.full((batch_size,), float(time), dtype=torch.float64)
            return self.scheduler.add_noise(x_known, noise, tt)

        if image is not None:
            mask_k = mask.repeat(1, k * C, 1, 1)
            z = mask_k * known_state(self.scheduler.state_time(0)) + (1 - mask_k) * z

        def model_eps(zz: torch.Tensor, t_f: float) -> torch.Tensor:
            """The (classifier-free-guided) ε at ``zz``; differentiable when grad is enabled."""
            if guidance_type == "cfg":
                if labels is None or scale == 0.0:
                    return self._unet_eps(zz, t_f, null, unet_dtype)
                if scale == 1.0:
                    return self._unet_eps(zz, t_f, labels, unet_dtype)
                eps_c, eps_u = self._unet_eps(torch.cat([zz, zz]), t_f, torch.cat([labels, null]), unet_dtype).chunk(2)
                return eps_u + scale * (eps_c - eps_u)
            return self._unet_eps(zz, t_f, None, unet_dtype)

        self.inpaint_info = [] if inpaint_method == "tweedie" else None
        if inpaint_method == "tweedie" and not bool(self.scheduler.sde.eps_mask().all()):
            logger.warning(
                "inpaint_correction='tweedie' with CLD (Γ = 0): x̂₀ uses ε_x, which CLD training does not learn; the "
                "correction is only reliable with an exact ε or a PSLD (Γ > 0) / VP network"
            )
        for i, t in enumerate(self.progress_bar(timesteps)):
            if self.interrupt:
                break
            t_f = float(t)
            if inpaint_method == "tweedie":
                kern = self.scheduler.hsm_kernel_at(t_f)
                eps, g, info = _inpainting.tweedie_correction(
                    lambda zz: model_eps(zz, t_f), z, x_known, mask, kern.mean_coef, kern.cov, kern.chol, t=t_f,
                    cg_iters=inpaint_cg_iters, cg_tol=float(inpaint_cg_tol), ridge=float(inpaint_ridge),
                )
                eps = eps - self.scheduler.score_to_eps_shift(g, t_f)
                self.inpaint_info.append(info)
            else:
                eps = model_eps(z, t_f)
            if guidance_type != "cfg":
                if labels is not None and scale != 0.0:
                    grad = self._classifier_grad(z, t_f, labels)
                    eps = eps - scale * self.scheduler.score_to_eps_shift(grad, t_f)
            step = self.scheduler.step(eps, t, z, generator=generator)
            z = step.prev_sample
            if image is not None:
                z = mask_k * known_state(self.scheduler.state_time(i + 1)) + (1 - mask_k) * z
            if callback_on_step_end is not None:
                tensors = {"sample": z, "pred_original_sample": step.pred_original_sample}
                cb_out = callback_on_step_end(self, i, t, {name: tensors[name] for name in callback_on_step_end_tensor_inputs})
                if cb_out is not None:
                    z = cb_out.pop("sample", z)

        if self.inpaint_info:
            dropped = sum(info.dropped for info in self.inpaint_info)
            truncated = sum(info.truncated for info in self.inpaint_info)
            if dropped:
                logger.warning(
                    f"inpaint_correction='tweedie': C_KK was not positive definite for {dropped} of "
                    f"{batch_size * len(self.inpaint_info)} sample-steps (correction dropped there: plain replacement; CG "
                    f"truncated at negative curvature for {truncated} more); see `pipe.inpaint_info`"
                )

        # ---- output
        x = z[:, :C]
        images = (x / 2 + 0.5).clamp(0, 1)
        momentum = z[:, C:] if return_momentum else None
        if output_type != "pt":
            images = images.cpu().permute(0, 2, 3, 1).float().numpy()
            if momentum is not None:
                momentum = momentum.cpu().permute(0, 2, 3, 1).float().numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, momentum) if return_momentum else (images,)
        return PSLDPipelineOutput(images=images, momentum=momentum)


PSLDPipeline.__call__.__doc__ = (PSLDPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
