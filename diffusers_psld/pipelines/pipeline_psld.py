r"""``PSLDPipeline``: unconditional, class-guided, classifier-free-guided and inpainting sampling.

The module path ``diffusers_psld.pipelines.pipeline_psld`` is imported by the ``pipeline_psld.py`` file that
``PSLDPipeline.save_pretrained`` writes next to ``model_index.json`` (the generic loader, see
:mod:`.remote_code`), so keep it stable.

Where each concern lives:

* argument checks and image / mask / label / ``latents`` preparation: :mod:`.inputs`;
* the ε handed to the scheduler, composed from the UNet (``PSLDPipeline._unet_eps``, the one place where
  the network output becomes ε), classifier-free guidance, classifier guidance (PSLD Eq. 13-14) and the Tweedie
  inpainting correction: :mod:`.guidance`;
* the denoising loop, shared with :class:`~.pipeline_psld_img2img.PSLDImg2ImgPipeline`: :mod:`.denoising`;
* inpainting's step hook (known pixels of x **and** m replaced by a forward-kernel draw after every step) and
  the correction's math: :mod:`diffusers_psld.inpainting`;
* diffusers' VP / EDM networks as the ``unet`` (``from_vp``, ``from_vp_pretrained``) and this pipeline's network
  for diffusers' samplers (``to_vp``): :mod:`.vp_bridge`, with the math in :mod:`diffusers_psld.denoisers`.

Conventions: the state is ``z = [x ; m]`` (``k*C`` channels; k = 2 for PSLD/CLD, 1 for VP), kept in float32
whatever the UNet's dtype (cast at the network boundary). Only x is returned, mapped from [-1, 1] to [0, 1];
m on request. Inpainting's ``mask_image`` is 1 (white) where the pixel is **known / kept** -- the RePaint
convention, the *opposite* of Stable-Diffusion inpainting.
"""

import glob
import json
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput, UNet2DModel
from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback
from diffusers.utils import logging

# Component modules must be imported so that diffusers' loader finds them in ``sys.modules``.
from .. import inpainting as _inpainting
from .. import training_record as _training_record
from ..checkpoints import staged_directory as _staged_directory
from ..denoisers import Denoiser
from ..denoisers import bridge as _bridge
from ..models import classifier as _classifier_module  # noqa: F401
from ..models.classifier import TimeDependentClassifier
from ..models.ncsnpp import NCSNppModel
from ..models.ncsnpp_classifier import NCSNppClassifier
from ..schedulers import PSLDScheduler
from . import guidance as _guidance
from . import inputs as _inputs
from . import remote_code as _remote_code
from . import vp_bridge as _vp_bridge
from .denoising import denoise, to_output

__all__ = ["PSLDPipeline", "PSLDPipelineOutput", "set_schedule"]

logger = logging.get_logger(__name__)  # pylint: disable=invalid-name

OUTPUT_TYPES = _inputs.OUTPUT_TYPES
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


def _looks_like_local_path(path: str) -> bool:
    """A Hub repo id is ``name`` or ``namespace/name``; anything else (absolute, ``./``, ``~``, deeper) is a path."""
    return os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or os.sep != "/" and os.sep in path \
        or os.path.exists(path)


def _check_safetensors(folder: str, use_safetensors, passed=()) -> None:
    """Refuse component folders (those named in ``model_index.json`` and not passed in ``passed``) whose weights
    exist only as pickles (``*.bin`` / ``*.pt`` / ``*.pth``), unless ``use_safetensors=False`` was passed
    explicitly (diffusers then loads them with ``torch.load(weights_only=True)``)."""
    if use_safetensors is False:
        return
    try:
        with open(os.path.join(folder, "model_index.json"), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return  # diffusers reports a missing / broken model_index.json itself
    for sub, entry in sorted(index.items()):
        if sub.startswith("_") or sub in passed or not isinstance(entry, list) or entry[:1] == [None]:
            continue
        path = os.path.join(folder, sub)
        pickles = [p for ext in ("bin", "pt", "pth") for p in glob.glob(os.path.join(path, f"*.{ext}"))]
        if pickles and not glob.glob(os.path.join(path, "*.safetensors")):
            raise ValueError(
                f"`{sub}` in {folder} has weights only as pickle files ({', '.join(sorted(os.path.basename(p) for p in pickles))}), "
                "not safetensors; diffusers-psld loads safetensors only (a pickle can run arbitrary code). Re-save it with "
                "`save_pretrained(..., safe_serialization=True)`, or, for a file you trust, pass `use_safetensors=False` "
                "(loaded with torch.load(weights_only=True))"
            )


#: ``num_inference_steps`` when a call names no schedule and the scheduler stores none
DEFAULT_INFERENCE_STEPS = 100


def set_schedule(scheduler, num_inference_steps: Optional[int] = None, timesteps=None, sigmas=None, device=None) -> int:
    """diffusers' ``retrieve_timesteps`` for the pipelines: ``scheduler.set_timesteps`` with at most one of
    ``num_inference_steps``, ``timesteps``, ``sigmas``; with none, the scheduler's stored custom schedule
    (``custom_timesteps`` / ``custom_sigmas``) or ``DEFAULT_INFERENCE_STEPS`` (100) calls. Returns the NFE
    (``len(scheduler.timesteps)``).

    Raises:
        ValueError: more than one of the three given (the message names them); the scheduler's errors for a bad
            list name the argument, the offending index and value, and the allowed range.
    """
    given = [name for name, v in (("num_inference_steps", num_inference_steps), ("timesteps", timesteps),
                                  ("sigmas", sigmas)) if v is not None]
    if len(given) > 1:
        raise ValueError(f"pass at most one of `num_inference_steps`, `timesteps` and `sigmas`, got "
                         f"{' and '.join(f'`{g}`' for g in given)}")
    if not given:
        stored = any(scheduler.config.get(key) is not None for key in ("custom_timesteps", "custom_sigmas"))
        if stored:
            scheduler.set_timesteps(device=device)
        else:
            scheduler.set_timesteps(DEFAULT_INFERENCE_STEPS, device=device)
    else:
        scheduler.set_timesteps(num_inference_steps, device=device, timesteps=timesteps, sigmas=sigmas)
    return len(scheduler.timesteps)


class PSLDPipeline(DiffusionPipeline):
    r"""Sampling pipeline for PSLD / CLD / VP diffusions trained with ε-prediction on ``[x ; m]`` states.

    Components:
        unet (:class:`~diffusers.UNet2DModel`): ε-network with ``k*C`` input and output channels.
            Optionally class-conditional (``num_class_embeds = n_classes + 1``, last index = null class)
            for classifier-free guidance. Or a :class:`~diffusers_psld.denoisers.Denoiser` ``D(y; σ)`` over the
            C data channels (a diffusers VP / EDM network wrapped by :meth:`from_vp`), which any recipe samples.
        scheduler (:class:`~diffusers_psld.PSLDScheduler` or another scheduler of this package):
            swap with e.g. ``SSCSScheduler.from_config(pipe.scheduler.config)``.
        classifier (:class:`~diffusers_psld.models.classifier.TimeDependentClassifier`, *optional*):
            time-dependent classifier p(y | z_t) on the full ``k*C``-channel state for class guidance.

    Loading: :meth:`from_pretrained` accepts a local directory or a Hub repo id (downloaded with
    ``huggingface_hub.snapshot_download`` first, because diffusers 0.42.1 cannot resolve third-party
    components from a Hub id) and loads safetensors weights only. Saved directories carry ``pipeline_psld.py``
    and ``"_class_name": ["pipeline_psld", "<Class>"]`` (:mod:`.remote_code`), so the generic
    ``DiffusionPipeline.from_pretrained(dir, trust_remote_code=True)`` works too.

    Training record: :meth:`save_pretrained` stores the recipe, ``time_scale`` and ``prediction_type`` /
    ``input_preconditioning`` / ``sigma_data`` the network samples with in its config (``_psld_training``,
    :mod:`diffusers_psld.training_record`); construction, loading and every call refuse (ValueError naming both
    values) a scheduler that contradicts it, also after ``pipe.scheduler`` is replaced. Sampler, striding,
    ``sampling_eps`` and step count stay free; directories saved without a record load unchecked.
    """

    model_cpu_offload_seq = "classifier->unet"
    _optional_components = ["classifier"]
    _callback_tensor_inputs = ["latents", "sample", "pred_original_sample"]
    #: diagnostics of the last call with ``inpaint_correction="tweedie"`` (one ``TweedieInfo`` per model call), else None
    inpaint_info = None
    #: largest ``image`` / ``latents`` size per side, as a multiple of the UNet's ``sample_size`` (ValueError beyond;
    #: ``None``: unbounded). A step's cost grows faster than the pixel count (attention); see ``inputs.MAX_SIZE_FACTOR``
    max_size_factor: Optional[float] = _inputs.MAX_SIZE_FACTOR

    def __init__(self, unet: Union[UNet2DModel, NCSNppModel, Denoiser], scheduler: PSLDScheduler,
                 classifier: Optional[Union[TimeDependentClassifier, NCSNppClassifier]] = None):
        super().__init__()
        k = getattr(scheduler, "num_components", None)
        if k is None or not hasattr(scheduler, "check_unet"):
            raise ValueError(f"`scheduler` must be a diffusers_psld scheduler (PSLDScheduler/SSCSScheduler), got {type(scheduler).__name__}")
        if isinstance(unet, Denoiser):  # D(y; σ) over C channels: any recipe samples it (see `from_vp`)
            state_channels = k * unet.data_channels
        else:
            # in_channels = k*C, out_channels = k*C ("epsilon") or C ("sample" / "sufficient_epsilon"): ValueError otherwise
            scheduler.check_unet(unet)
            _training_record.check(unet, scheduler)  # the recipe / prediction_type the UNet records, if any
            state_channels = unet.config.in_channels
        if classifier is not None and classifier.config.in_channels != state_channels:
            raise ValueError(
                f"`classifier` must take the full state ({state_channels} channels), got "
                f"in_channels={classifier.config.in_channels}"
            )
        self.register_modules(unet=unet, scheduler=scheduler, classifier=classifier)

    # ------------------------------------------------------------------ loading / saving
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: Union[str, os.PathLike], **kwargs):
        """Load from a local directory or a Hub repo id (safetensors weights only).

        A repo id is fetched with ``huggingface_hub.snapshot_download`` (honouring ``revision``,
        ``cache_dir``, ``token``, ``local_files_only``, ``force_download``, ``proxies``; offline mode
        uses the local cache) and then loaded from the snapshot directory. Other keyword arguments go to
        :meth:`diffusers.DiffusionPipeline.from_pretrained` (e.g. ``torch_dtype``, ``classifier=None``).

        Raises:
            ValueError: an empty ``pretrained_model_name_or_path``.
            FileNotFoundError: a local path (absolute, ``./…``, ``~…``, or deeper than ``namespace/name``) that
                is not a directory; or a ``namespace/name`` that is neither a local directory nor fetchable from
                the Hub (the message names both readings and the Hub error).
            ValueError: a component whose weights exist only as pickles (``*.bin``), unless
                ``use_safetensors=False`` is passed (then loaded with ``torch.load(weights_only=True)``).
        """
        path = str(pretrained_model_name_or_path)
        if not path.strip():
            raise ValueError(f"`pretrained_model_name_or_path` must be a pipeline directory or a Hub repo id, got {path!r}")
        if not os.path.isdir(path):
            if _looks_like_local_path(path):
                raise FileNotFoundError(f"`pretrained_model_name_or_path`: the directory {path!r} does not exist"
                                        + (" (it is a file; pass the pipeline's folder)" if os.path.isfile(path) else ""))
            dl = {key: kwargs.pop(key) for key in ("revision", "cache_dir", "token", "local_files_only",
                                                   "force_download", "proxies") if key in kwargs}
            dl = {key: val for key, val in dl.items() if val is not None}
            try:
                path = _snapshot_download(path, **dl)
            except Exception as err:  # noqa: BLE001  (Hub / network / offline-cache errors)
                # "outputs/run" is both a relative path and a valid "namespace/name" repo id: name both readings
                raise FileNotFoundError(
                    f"`pretrained_model_name_or_path`={path!r}: there is no local directory {os.path.abspath(path)!r}, "
                    f"and as a Hub repo id it could not be fetched ({type(err).__name__}: {str(err).splitlines()[0][:300]})"
                ) from err
        _check_safetensors(path, kwargs.get("use_safetensors"), passed=[k for k in ("unet", "scheduler", "classifier") if k in kwargs])
        return super().from_pretrained(path, **kwargs)

    @classmethod
    def from_vp(cls, unet, vp_scheduler, scheduler=None, **denoiser_kwargs) -> "PSLDPipeline":
        r"""Sample a diffusers VP / EDM network with this package's samplers (exact, through the sufficient statistic).

        The network is wrapped as a :class:`~diffusers_psld.denoisers.Denoiser` D(y; σ) by
        :func:`~diffusers_psld.denoisers.denoiser_for_scheduler`; at every call the pipeline reduces the state z_t to
        ``y_t = σ_t² a_tᵀΣ_t⁻¹ z_t`` (= x₀ + σ_t n), takes x̂₀ = D(y_t; σ_t) = E[x₀ | z_t] and hands the scheduler
        ``ε = L_t⁻¹(z_t - a_t x̂₀)``. The pipeline keeps ``generator``, ``latents``, output types, callbacks,
        inpainting, img2img (``PSLDImg2ImgPipeline(**pipe.components)``) and class conditioning (classifier-free
        guidance needs a null class: ``null_class=True``); ``save_pretrained`` / ``from_pretrained`` round-trip it.

        Args:
            unet: a diffusers ``UNet2DModel``-like network (``unet(x, timestep, class_labels=None).sample``) with
                ``config.in_channels`` = ``out_channels`` = C (2C out for a learned variance) and ``sample_size``; or a
                :class:`~diffusers_psld.denoisers.Denoiser` (then ``vp_scheduler`` may be None).
            vp_scheduler: the diffusers scheduler it was trained with, or its config: DDPM-family (``DDPMScheduler``,
                ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, ``PNDMScheduler``,
                ``EulerDiscreteScheduler``, …; ``prediction_type`` ``epsilon``, ``v_prediction`` or ``sample``) or EDM
                (``EDMEulerScheduler``, ``EDMDPMSolverMultistepScheduler``).
            scheduler: the scheduler of this package to sample with (any class and recipe: PSLD, CLD, VP); default
                ``GDDIMMultistepScheduler()``.
            **denoiser_kwargs: options of the wrapper, e.g. ``null_class=True`` (the network's last class index is
                an unconditional class).

        Raises:
            ValueError: the network's channels do not fit (C in, C out), an unknown scheduler family or
                ``beta_schedule``, a ``prediction_type`` the wrapper cannot read, ``vp_scheduler`` is a scheduler of
                this package (its networks load with :meth:`from_pretrained`), or ``scheduler`` is not one.
        """
        return _vp_bridge.from_vp(cls, unet, vp_scheduler, scheduler=scheduler, **denoiser_kwargs)

    @classmethod
    def from_vp_pretrained(cls, path_or_hub_id: Union[str, os.PathLike], scheduler=None, **kwargs) -> "PSLDPipeline":
        """:meth:`from_vp` for a saved DDPM-style diffusers pipeline (``model_index.json`` with a ``UNet2DModel`` in
        ``unet/`` and its scheduler config in ``scheduler/``), a local directory or a Hub id (fetched with
        ``huggingface_hub.snapshot_download`` first, as :meth:`from_pretrained` does). Safetensors weights only,
        unless ``use_safetensors=False`` is passed.

        Keyword arguments: the download options of :meth:`from_pretrained` (``revision``, ``cache_dir``, ``token``,
        ``local_files_only``, ``force_download``, ``proxies``), the network loading options ``torch_dtype`` and
        ``variant``, and the denoiser options of :meth:`from_vp` (``null_class``).

        Raises:
            FileNotFoundError: neither a directory nor a fetchable Hub id.
            ValueError: not a pipeline directory with a ``UNet2DModel`` and a scheduler config; pickle-only weights;
                and the errors of :meth:`from_vp`.
        """
        return _vp_bridge.from_vp_pretrained(cls, path_or_hub_id, scheduler=scheduler, **kwargs)

    def to_vp(self, scheduler_config: Optional[dict] = None, residual: str = "sample", residual_seed: Optional[int] = None):
        r"""This pipeline's network as a diffusers VP ε-model: ``(unet, scheduler)`` for diffusers' pipelines and samplers.

        ``unet`` is a :class:`~diffusers_psld.denoisers.VPEpsilonModel` (a ``ModelMixin`` with diffusers' UNet call
        signature ``unet(sample, timestep, class_labels=None).sample`` and ``config.in_channels`` = ``out_channels`` =
        C, ``sample_size``) that returns E[ε | x_τ] on the DDPM schedule of ``scheduler``, a ``DDPMScheduler``
        (default :func:`~diffusers_psld.denoisers.default_vp_config`: diffusers' default linear schedule, T = 1000,
        σ ∈ [0.0100, 157.4], ``clip_sample=False``). So
        ``DDPMPipeline(unet, DPMSolverMultistepScheduler.from_config(scheduler.config))()`` samples this network, and
        so does DDIM; UniPC and PNDM (whose ``step`` takes no ``generator``, which ``DDPMPipeline`` passes) run in the
        standard loop, and Euler-type schedulers in a loop that calls ``scale_model_input`` and starts from
        ``init_noise_sigma`` (``DDPMPipeline`` does neither; see the bridge documentation).

        Args:
            scheduler_config: entries replacing the default schedule's (e.g. ``{"num_train_timesteps": 2000}``).
            residual, residual_seed: for a network of this package (:class:`~diffusers_psld.denoisers.RecipeDenoiser`):
                how the part of the state that carries no information about x₀ is filled; ``"sample"`` (default) draws
                it from its exact law, reproducibly with ``residual_seed``.

        Works for PSLD, CLD and VP networks of every ``prediction_type``, and for a pipeline made by :meth:`from_vp`
        (its denoiser is reused). The returned ``unet`` shares this pipeline's network (no copy).
        """
        return _vp_bridge.to_vp(self, scheduler_config, residual=residual, residual_seed=residual_seed)

    @classmethod
    def load_config(cls, *args, **kwargs):
        """diffusers' ``load_config``; a ``["pipeline_psld", "<Class>"]`` ``_class_name`` is read as ``"<Class>"``,
        so loading through this class never executes the directory's ``pipeline_psld.py``."""
        out = super().load_config(*args, **kwargs)
        config = out[0] if isinstance(out, tuple) else out
        if isinstance(config, dict):
            where = args[0] if args else kwargs.get("pretrained_model_name_or_path")
            where = os.path.join(where, cls.config_name) if where is not None and os.path.isdir(where) else where
            config["_class_name"] = _remote_code.class_name_of(config, None if where is None else str(where))
        return out

    def save_pretrained(self, save_directory: Union[str, os.PathLike], *args, **kwargs):
        """diffusers' ``save_pretrained`` into a temporary directory whose entries replace those of
        ``save_directory`` only once every file is written (:func:`~diffusers_psld.checkpoints.staged_directory`):
        a failure, e.g. tied weights that safetensors refuses, leaves ``save_directory`` as it was.

        A UNet without a training record first gets the scheduler's (:func:`diffusers_psld.training_record.stamp`:
        ``_psld_training`` in ``unet/config.json``), so the saved network carries the recipe and
        ``prediction_type`` it samples with; ``ValueError`` if the current scheduler contradicts an existing record."""
        _training_record.stamp(self.unet, self.scheduler)
        if kwargs.get("push_to_hub") and "repo_id" not in kwargs:  # diffusers' default: the directory's name
            kwargs["repo_id"] = os.path.basename(os.path.normpath(os.fspath(save_directory)))
        with _staged_directory(save_directory) as staging:
            super().save_pretrained(staging, *args, **kwargs)

    def save_config(self, save_directory: Union[str, os.PathLike], push_to_hub: bool = False, **kwargs):
        """Write ``model_index.json`` naming ``["pipeline_psld", "<Class>"]`` and the ``pipeline_psld.py`` file
        next to it (:mod:`.remote_code`); ``save_pretrained`` and ``push_to_hub`` then carry both."""
        super().save_config(save_directory, push_to_hub=False, **kwargs)
        _remote_code.install(save_directory, type(self).__name__)

    # ------------------------------------------------------------------ properties
    @property
    def num_components(self) -> int:
        return self.scheduler.num_components

    @property
    def data_channels(self) -> int:
        if isinstance(self.unet, Denoiser):
            return self.unet.data_channels
        return self.unet.config.in_channels // self.num_components

    @property
    def is_class_conditional(self) -> bool:
        """True when the UNet has class embeddings (classifier-free guidance; last index = null class)."""
        return _vp_bridge.class_layout(self.unet)[0] is not None

    @property
    def num_timesteps(self):
        return getattr(self, "_num_timesteps", None)

    @property
    def interrupt(self):
        return getattr(self, "_interrupt", False)

    def _sample_hw(self):
        size = _vp_bridge.network_of(self.unet).config.sample_size
        return (size, size) if isinstance(size, int) else tuple(size)

    # ------------------------------------------------------------------ model calls
    def _unet_eps(self, z, t, labels, unet_dtype):
        """ε ``[B, k*C, H, W]`` from the UNet at state ``z`` (float32) and forward time ``t``: the network sees
        ``scheduler.scale_model_input(z, t)`` cast to ``unet_dtype``, and its output (``scheduler.config.prediction_type``:
        k*C-channel ε, or C-channel x̂₀ / sufficient-statistic ε) is lifted to the full ε by
        ``scheduler.model_output_to_eps``.

        The one place where the network output becomes ε. ``unet_dtype`` (the UNet's dtype) is resolved once
        per ``__call__`` by the caller, because diffusers' ``ModelMixin.dtype`` walks every submodule (~0.6 ms per
        query on the digits preset: ~2.5 % of a CPU step).

        A :class:`~diffusers_psld.denoisers.Denoiser` (``from_vp``) is called on the state's sufficient statistic instead:
        ``(y, σ)`` = :func:`~diffusers_psld.denoisers.bridge.sufficient_statistic` (no ``scale_model_input``: the
        denoiser scales its own input), x̂₀ = D(y; σ), and ε = L⁻¹(z - a x̂₀)
        (:func:`~diffusers_psld.denoisers.bridge.denoised_to_eps`), exact for the exact denoiser.

        Raises:
            NonFiniteError: the UNet (denoiser) output has a NaN / inf.
        """
        kwargs = {} if labels is None else {"class_labels": labels}
        if isinstance(self.unet, Denoiser):  # (z, t) -> (y, σ) -> x̂₀ = D(y; σ) -> ε = L⁻¹(z - a x̂₀)  (exact)
            y, sigma = _bridge.sufficient_statistic(self.scheduler, z, t)
            x0 = _guidance.check_finite(self.unet(y, sigma, **kwargs), "the denoiser output x̂₀",
                                        "denoiser output non-finite: check the network's weights, dtype and input")
            return _bridge.denoised_to_eps(self.scheduler, x0.to(z.dtype), z, t)
        B = z.shape[0]
        tm = self.scheduler.model_time(t, B, device=z.device)
        net_in = self.scheduler.scale_model_input(z, t)  # identity unless `input_preconditioning`
        out = self.unet(net_in.to(unet_dtype), tm, **kwargs).sample
        out = _guidance.check_finite(out, f"the UNet output ({unet_dtype})",
                                     "UNet output non-finite: check its weights and the input state; fp16 may overflow")
        # `prediction_type` -> the full k*C ε (identity for "epsilon"); guidance and inpainting act on ε
        return self.scheduler.model_output_to_eps(out.to(z.dtype), z, t)

    def _classifier_grad(self, z, t, labels):
        """∇_z log p(y | z_t) w.r.t. the full state, per sample (:func:`.guidance.classifier_log_prob_grad`)."""
        return _guidance.classifier_log_prob_grad(self.classifier, self.scheduler, z, t, labels)

    # ------------------------------------------------------------------ shared checks and ε
    def _check_common(self, batch_size, num_inference_steps, output_type, generator, return_momentum,
                      callback_on_step_end, callback_on_step_end_tensor_inputs, return_dict=True):
        """Validate the arguments both pipelines share; returns ``(batch_size, steps, generator, tensor_inputs)``."""
        _training_record.check(self.unet, self.scheduler)  # `pipe.scheduler` may have been replaced since __init__
        batch_size = _inputs.as_int(batch_size, "batch_size", 1)
        steps = None if num_inference_steps is None else _inputs.as_int(num_inference_steps, "num_inference_steps", 2)
        _inputs.check_output_type(output_type)
        _inputs.check_bool(return_dict, "return_dict")
        return_momentum = _inputs.check_bool(return_momentum, "return_momentum")
        if callback_on_step_end is not None and not callable(callback_on_step_end):
            raise TypeError(
                f"`callback_on_step_end` must be callable (fn(pipe, i, t, tensors) -> dict or None) or a PipelineCallback, "
                f"got {type(callback_on_step_end).__name__} {callback_on_step_end!r}"
            )
        generator = _inputs.check_generator(generator, batch_size)
        if return_momentum and self.num_components < 2:
            raise ValueError("`return_momentum=True` needs an augmented diffusion (PSLD/CLD); this scheduler is VP (no momentum)")
        if isinstance(callback_on_step_end, (PipelineCallback, MultiPipelineCallbacks)):
            callback_on_step_end_tensor_inputs = callback_on_step_end.tensor_inputs
        bad = [name for name in callback_on_step_end_tensor_inputs if name not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"`callback_on_step_end_tensor_inputs` must be among {self._callback_tensor_inputs}, got {bad}")
        return batch_size, steps, generator, list(callback_on_step_end_tensor_inputs)

    def _guided_eps_fn(self, class_labels, guidance_scale, guidance_type, batch_size, device, unet_dtype):
        """Validate the guidance arguments and compose the ε-function: UNet → classifier-free guidance →
        (the caller may wrap inpainting here) ; returns ``(eps_fn, add_classifier_guidance)`` where the second
        wraps an ε-function with classifier guidance (identity when unused)."""
        if guidance_type is not None and guidance_type not in GUIDANCE_TYPES:
            raise ValueError(f"`guidance_type` must be one of {GUIDANCE_TYPES} or None, got {guidance_type!r}")
        if guidance_type is None:
            guidance_type = "cfg" if self.is_class_conditional else "classifier"
        scale = _inputs.check_guidance_scale(guidance_scale)
        if scale is not None and class_labels is None and scale != 1.0:
            raise ValueError("`guidance_scale` needs `class_labels` (which class to guide towards)")
        scale = 1.0 if scale is None else scale

        def unet_eps(z, t, labels):
            return self._unet_eps(z, t, labels, unet_dtype)

        if guidance_type == "cfg":
            if not self.is_class_conditional:
                raise ValueError("`guidance_type='cfg'` needs a class-conditional UNet (num_class_embeds = n_classes + 1)")
            _, n_cls, has_null = _vp_bridge.class_layout(self.unet)
            if not has_null:  # a wrapped diffusers network without an unconditional class: conditional sampling only
                if class_labels is None or scale != 1.0:
                    raise ValueError(
                        "this class-conditional network has no null (unconditional) class, so it cannot sample without "
                        "`class_labels` nor run classifier-free guidance (guidance_scale other than 1): pass `class_labels` "
                        "and leave `guidance_scale` at 1, or, if its last class index is an unconditional class, wrap it "
                        "with `null_class=True` (PSLDPipeline.from_vp(..., null_class=True))")
                labels = _inputs.prepare_labels(class_labels, batch_size, n_cls, device, "class-conditional network")
                return (lambda z, t: unet_eps(z, t, labels)), lambda fn: fn
            null = torch.full((batch_size,), n_cls, dtype=torch.long, device=device)
            labels = None if class_labels is None else _inputs.prepare_labels(
                class_labels, batch_size, n_cls, device, "class-conditional UNet (last index is the null class)")
            return _guidance.cfg_eps_fn(unet_eps, labels, null, scale), lambda fn: fn
        eps_fn = _guidance.cfg_eps_fn(unet_eps, None, None, scale)
        if class_labels is None:
            return eps_fn, lambda fn: fn
        if self.classifier is None:
            raise ValueError(
                "`class_labels` needs a `classifier` component (classifier guidance) or a class-conditional UNet "
                "(classifier-free guidance); this pipeline has neither"
            )
        labels = _inputs.prepare_labels(class_labels, batch_size, self.classifier.config.num_classes, device, "classifier")
        return eps_fn, lambda fn: _guidance.with_classifier_guidance(
            fn, lambda z, t: self._classifier_grad(z, t, labels), self.scheduler, scale)

    def _finish(self, z, output_type, return_momentum, return_dict):
        images, momentum = to_output(z, self.data_channels, output_type, return_momentum, self.numpy_to_pil)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, momentum) if return_momentum else (images,)
        return PSLDPipelineOutput(images=images, momentum=momentum)

    # ------------------------------------------------------------------ sampling
    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: Optional[Union[torch.Generator, List[torch.Generator]]] = None,
        num_inference_steps: Optional[int] = None,
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
        latents: Optional[torch.Tensor] = None,
        timesteps: Optional[List[float]] = None,
        sigmas: Optional[List[float]] = None,
    ) -> Union[PSLDPipelineOutput, tuple]:
        r"""Generate images.

        Args:
            batch_size (`int`, defaults to 1): number of images (>= 1; NumPy integers accepted). Refused
                (ValueError) before any allocation when the float32 state ``[batch_size, k*C, H, W]`` alone exceeds
                the device's free memory (CPU: ``os.sysconf`` free pages on Linux; CUDA: ``mem_get_info``; the
                check is skipped where that is unknown).
            generator (`torch.Generator` or a list of `batch_size` of them, *optional*): for reproducibility;
                the same generator state gives identical outputs (anything else: TypeError).
            num_inference_steps (`int`, *optional*): exact number of UNet evaluations (>= 2) on the scheduler's named
                time grid, including the final denoising step (doubled by classifier-free guidance with scale ≠ 0, 1).
                1 is refused by design: the single call would be the final denoising step from
                ``sampling_eps`` alone, skipping the whole reverse process. Default: the custom schedule stored in
                the scheduler config (``custom_timesteps`` / ``custom_sigmas``) if it has one, else 100.
            timesteps (`List[float]`, *optional*): a custom schedule of descending forward times in (0, 1]
                (diffusers' ``timesteps=``; :meth:`~diffusers_psld.PSLDScheduler.set_timesteps`): one step between
                consecutive times and the final call at the last one. Not with `num_inference_steps` or `sigmas`.
            sigmas (`List[float]`, *optional*): the same by noise levels σ_t (EDM / Karras / Align-Your-Steps lists;
                a trailing 0 is accepted). Both are stored in the scheduler config, so a saved pipeline samples with
                them again.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (``[B, H, W, C]`` float32) or
                `"pt"` (``[B, C, H, W]``); values in [0, 1].
            return_dict (`bool`, defaults to True; bools only): return a :class:`PSLDPipelineOutput` instead of a tuple
                ``(images,)`` / ``(images, momentum)``.
            callback_on_step_end (*optional*): ``fn(pipe, i, t, tensors) -> dict`` called after every step
                with the requested tensors (`"latents"` or `"sample"`: the full ``[x ; m]`` state,
                `"pred_original_sample"`: x̂₀); a returned `"latents"` / `"sample"` replaces the state. A
                `PipelineCallback` also works. Checked: a non-callable is a TypeError; the return value must be
                None or a dict whose keys are among ``_callback_tensor_inputs`` (ValueError otherwise: typos are
                not ignored); a returned state must be a finite float tensor of the state's shape on its device
                (float32, or float16/bfloat16, cast to float32); `"pred_original_sample"` may only be returned
                unchanged (the object that was passed).
            callback_on_step_end_tensor_inputs (`List[str]`): names from ``_callback_tensor_inputs``.
            return_momentum (`bool`, defaults to False; bools only): also return the momentum half m (PSLD/CLD only).
            class_labels (`int`, list or tensor, *optional*): target class(es) for classifier guidance
                (needs ``classifier``) or classifier-free guidance (needs a class-conditional UNet).
            guidance_scale (`float`, *optional*): classifier guidance: weight of ∇ log p(y | z_t)
                (default 1.0 = exact Bayes posterior score); classifier-free: ``ε_u + s (ε_c - ε_u)``
                (default 1.0 = conditional model, no extrapolation). Requires `class_labels`. A finite number in
                [0, 1e6] (NumPy floats accepted).
            guidance_type (`str`, *optional*): `"classifier"` or `"cfg"`; by default `"cfg"` if the UNet is
                class-conditional, else `"classifier"`.
            image (PIL / NumPy ``[B,H,W,C]`` / tensor ``[B,C,H,W]`` in [0, 1], *optional*): known image for
                inpainting (1 or `batch_size` images; its size sets the output size and must be divisible by
                the UNet's downsampling factor; sizes beyond 4x / below 1/4 of ``sample_size`` log a warning, beyond
                ``pipe.max_size_factor`` (8x per side by default) are refused: set it to None to lift the bound).
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

            latents (`torch.Tensor` ``[batch_size, k*C, H, W]``, *optional*): the initial state ``[x ; m]``
                instead of a prior draw (diffusers' ``latents=``): float32 (or float16/bfloat16), finite, on the
                pipeline's execution device; ``H, W`` set the output size (the image's size when inpainting).

        Returns:
            :class:`PSLDPipelineOutput` (``.images``, ``.momentum``) or a tuple.

        Raises:
            ValueError / TypeError: a bad argument (the message names it and what is expected).
            NonFiniteError (a ``FloatingPointError``): a NaN or inf appeared during sampling; the message names
                the call, its forward time and the likely cause (UNet output, guidance, scheduler update).
        """
        batch_size, steps, generator, cb_inputs = self._check_common(
            batch_size, num_inference_steps, output_type, generator, return_momentum, callback_on_step_end,
            callback_on_step_end_tensor_inputs, return_dict)
        if (image is None) != (mask_image is None):
            raise ValueError("`image` and `mask_image` must be given together for inpainting")
        inpaint_method = _inpainting.check_inpaint_args(inpaint_correction, inpaint_cg_iters, inpaint_cg_tol, inpaint_ridge)
        if inpaint_method != "replace" and image is None:
            raise ValueError(f"`inpaint_correction={inpaint_correction!r}` needs `image` and `mask_image` (inpainting)")
        device = self._execution_device
        k, C = self.num_components, self.data_channels
        x_known = mask = None
        if image is not None:
            x_known = _inputs.prepare_image(image, C, batch_size, device)
            _inputs.check_spatial_size(tuple(x_known.shape[-2:]), _vp_bridge.network_of(self.unet), "image",
                                       self.max_size_factor)
            mask = _inputs.prepare_mask(mask_image, x_known, device)
        if latents is not None:
            z = _inputs.check_latents(latents, batch_size, k * C, device, None if x_known is None else x_known.shape[-2:])
            _inputs.check_spatial_size(tuple(z.shape[-2:]), _vp_bridge.network_of(self.unet), "latents",
                                       self.max_size_factor)
            hw = tuple(z.shape[-2:])
        else:
            hw = self._sample_hw() if x_known is None else tuple(x_known.shape[-2:])
            _inputs.check_batch_memory(batch_size, k * C, hw, device)
        eps_fn, add_classifier_guidance = self._guided_eps_fn(
            class_labels, guidance_scale, guidance_type, batch_size, device, self.unet.dtype)

        set_schedule(self.scheduler, steps, timesteps, sigmas, device)
        if latents is None:
            z = self.scheduler.sample_prior((batch_size, k * C, *hw), generator=generator, device=device, dtype=torch.float32)
        after_step = None
        self.inpaint_info = [] if inpaint_method == "tweedie" else None
        if x_known is not None:
            after_step = _inpainting.replacement_hook(self.scheduler, x_known, mask, generator)
            z = after_step(z, 0)
            if inpaint_method == "tweedie":
                if not bool(self.scheduler.sde.eps_mask().all()):
                    logger.warning(
                        "inpaint_correction='tweedie' with CLD (Γ = 0): x̂₀ uses ε_x, which CLD training does not learn; the "
                        "correction is only reliable with an exact ε or a PSLD (Γ > 0) / VP network")
                eps_fn = _guidance.with_tweedie_inpainting(eps_fn, self.scheduler, x_known, mask, inpaint_cg_iters,
                                                           float(inpaint_cg_tol), float(inpaint_ridge), self.inpaint_info)
        eps_fn = add_classifier_guidance(eps_fn)
        z = denoise(self, z, eps_fn, generator=generator, after_step=after_step, callback=callback_on_step_end,
                    callback_tensor_inputs=cb_inputs)
        self._warn_inpaint_drops(batch_size)
        return self._finish(z, output_type, return_momentum, return_dict)

    def _warn_inpaint_drops(self, batch_size):
        if not self.inpaint_info:
            return
        dropped = sum(info.dropped for info in self.inpaint_info)
        truncated = sum(info.truncated for info in self.inpaint_info)
        if dropped:
            logger.warning(
                f"inpaint_correction='tweedie': C_KK was not positive definite for {dropped} of "
                f"{batch_size * len(self.inpaint_info)} sample-steps (correction dropped there: plain replacement; CG "
                f"truncated at negative curvature for {truncated} more); see `pipe.inpaint_info`"
            )


PSLDPipeline.__call__.__doc__ = (PSLDPipeline.__call__.__doc__ or "") + EXAMPLE_DOC_STRING
