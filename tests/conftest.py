"""Shared test setup: no network, tiny threads, temporary HF caches."""
import os
import tempfile

_tmp = tempfile.mkdtemp(prefix="psld-tests-hf-")
for key, value in {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "GRADIO_ANALYTICS_ENABLED": "False",
    "HF_HOME": os.path.join(_tmp, "home"),
    "HF_HUB_CACHE": os.path.join(_tmp, "hub"),
    "HF_MODULES_CACHE": os.path.join(_tmp, "modules"),
    "HF_DATASETS_CACHE": os.path.join(_tmp, "datasets"),
    # The test problems are tiny: on a 2-core machine shared with another process, 2 OpenMP threads made
    # small convolutions up to ~100x slower (spinning); 1 thread is robust. Inherited by subprocesses.
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402


torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
