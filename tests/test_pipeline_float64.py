"""Issue #15 §1 (pipeline side): devices without float64 (Apple MPS) must be able to run a pipeline call.

A ``TorchDispatchMode`` records every tensor that an aten op creates during a full call. On this CPU-only
machine the target device *is* the CPU, where the scheduler may keep its exact float64 tables; the state is
told apart by its shape: a float64 tensor with the batch size as leading dimension (an odd batch of 3 and an
8x8 state make that unambiguous) is per-sample math in float64 on the target device -- the thing that fails
on MPS. Small float64 tensors (k×k coefficient tables, times) are the scheduler's and are allowed here.
"""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from diffusers_psld import PSLDImg2ImgPipeline, PSLDPipeline
from diffusers_psld.models.classifier import TimeDependentClassifier
from diffusers_psld.schedulers import PSLDScheduler, SSCSScheduler

from _pipeline_stubs import tiny_unet

B = 3


class Float64Recorder(TorchDispatchMode):
    """Records ``(op, shape)`` of every float64 tensor an op returns whose leading dimension is the batch."""

    def __init__(self, batch):
        super().__init__()
        self.batch, self.hits = batch, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.ndim >= 2 and t.shape[0] == self.batch \
                    and t.numel() >= self.batch * 16:
                self.hits.append((str(func), tuple(t.shape)))
        return out


def _pipe(cls=PSLDPipeline, sched=None):
    clf = TimeDependentClassifier(in_channels=2, num_classes=3, block_out_channels=(8, 16), norm_num_groups=4)
    p = cls(unet=tiny_unet(), scheduler=sched or PSLDScheduler(), classifier=clf)
    p.set_progress_bar_config(disable=True)
    return p


def _record(fn):
    rec = Float64Recorder(B)
    with rec:
        fn()
    return rec.hits


def test_recorder_catches_float64_state_math():
    """The detector itself: float64 math on a state-shaped tensor is reported, float32 math and tables are not."""
    z = torch.randn(B, 2, 8, 8)
    assert _record(lambda: z.double() * 2) and not _record(lambda: z * 2 + torch.eye(2, dtype=torch.float64).sum().float())


@pytest.mark.parametrize("sched", [PSLDScheduler(), SSCSScheduler(), PSLDScheduler(sampler="pf_heun")], ids=["em", "sscs", "pf_heun"])
@pytest.mark.parametrize("kwargs", [{}, dict(class_labels=1, guidance_scale=2.0)], ids=["plain", "classifier"])
def test_sampling_call_has_no_float64_state_math(sched, kwargs):
    p = _pipe(sched=sched)
    hits = _record(lambda: p(batch_size=B, num_inference_steps=4, output_type="pt", generator=torch.Generator().manual_seed(0), **kwargs))
    assert not hits, hits


@pytest.mark.parametrize("mode", ["inpaint", "img2img"])
def test_inpainting_and_img2img_have_no_float64_state_math(mode):
    g = torch.Generator().manual_seed(0)
    if mode == "inpaint":
        p = _pipe()
        call = lambda: p(batch_size=B, num_inference_steps=4, output_type="pt", generator=g,  # noqa: E731
                         image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8))
    else:
        p = _pipe(PSLDImg2ImgPipeline)
        call = lambda: p(image=torch.rand(B, 1, 8, 8), strength=0.5, num_inference_steps=4, output_type="pt", generator=g)  # noqa: E731
    hits = _record(call)
    assert not hits, hits


class DeviceFloat64Recorder(TorchDispatchMode):
    """Records every float64 tensor an op returns on ``device_type`` (the device-tagged check)."""

    def __init__(self, device_type):
        super().__init__()
        self.device_type, self.hits = device_type, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor) and t.dtype == torch.float64 and t.device.type == self.device_type:
                self.hits.append((str(func), tuple(t.shape)))
        return out


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (the target device must differ from the CPU)")
@pytest.mark.parametrize("mode", ["plain", "classifier", "inpaint", "img2img"])
def test_no_float64_tensor_on_the_cuda_device(mode):
    """On a real second device: no float64 tensor at all on it (what MPS requires); CPU float64 tables are fine."""
    cls = PSLDImg2ImgPipeline if mode == "img2img" else PSLDPipeline
    p = _pipe(cls).to("cuda")
    g = torch.Generator().manual_seed(0)
    kw = dict(output_type="pt", generator=g, num_inference_steps=4)
    if mode == "img2img":
        kw.update(image=torch.rand(B, 1, 8, 8), strength=0.5)
    else:
        kw.update(batch_size=B)
        if mode == "classifier":
            kw.update(class_labels=1, guidance_scale=2.0)
        if mode == "inpaint":
            kw.update(image=torch.rand(1, 1, 8, 8), mask_image=torch.ones(8, 8))
    rec = DeviceFloat64Recorder("cuda")
    with rec:
        p(**kw)
    assert not rec.hits, rec.hits[:20]
