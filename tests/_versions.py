"""Behaviour of the installed diffusers that some tests depend on (read from diffusers' own sources per release).

The package supports every diffusers release from the floor in ``setup.cfg``; where an older release lacks a
behaviour that a test asserts, the test states the release that has it instead of failing."""
import diffusers
from packaging.version import Version

DIFFUSERS = Version(diffusers.__version__).release

#: from 0.38, a local directory's custom pipeline code is refused without ``trust_remote_code=True`` (before:
#: only Hub code was)
LOCAL_CODE_NEEDS_TRUST = DIFFUSERS >= (0, 38)
#: from 0.39, ``downsample_2d`` casts its FIR kernel to the input dtype (NCSN++ in bfloat16 / float16)
FIR_IN_HALF_PRECISION = DIFFUSERS >= (0, 39)
#: from 0.41, ``DDPMPipeline(output_type="pt")`` returns a tensor (before: NumPy, which has no bfloat16)
DDPM_PT_OUTPUT = DIFFUSERS >= (0, 41)
