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
}.items():
    os.environ.setdefault(key, value)

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
