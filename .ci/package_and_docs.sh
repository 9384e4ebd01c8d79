#!/usr/bin/env bash
# Package and documentation checks; .ci/run calls this with the pipeline folder its main job saved.
#   1. `python -m build` (sdist + wheel) and `twine check --strict`;
#   2. THE WHEEL (not the checkout) in a fresh virtual environment, used from outside the checkout: import,
#      model-card template inside the package, load and sample the saved pipeline, the generic loader through
#      the pipeline_psld.py the folder carries — a subpackage or data file missing from the wheel fails here;
#   3. the Gradio Space folder (demo/build_space.py) installed from its own requirements.txt in that environment
#      with the wheel uninstalled, run from a copy outside the checkout;
#   4. the documentation, built strictly (nitpicky, warnings are errors) and offline.
set -euo pipefail
cd "$(dirname "$0")/.."
pipeline=$(cd "$1" && pwd)
repo=$PWD
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
t0=$SECONDS

# --- 1. sdist + wheel
pip install -q build twine
python -m build -o "$work/dist" . >"$work/build.log" 2>&1 || { cat "$work/build.log" >&2; exit 1; }
python -m twine check --strict "$work"/dist/*
wheel=$(ls "$work"/dist/diffusers_psld-*.whl)
echo "CI: built $(ls "$work/dist" | tr '\n' ' ')($((SECONDS - t0)) s)"

# --- 2. the wheel in a fresh environment (CPU torch first, as the README says)
python3 -m venv "$work/venv"
"$work/venv/bin/pip" install -q torch==2.13.0
"$work/venv/bin/pip" install -q "$wheel"
(cd "$work" && PYTHONPATH= "$work/venv/bin/python" - "$pipeline" "$repo" <<'PY'
import os
import shutil
import sys

import torch
from diffusers import DiffusionPipeline

import diffusers_psld
from diffusers_psld import PSLDPipeline
from diffusers_psld.hub import DEFAULT_TEMPLATE

pipeline, repo = sys.argv[1], sys.argv[2]
package = os.path.dirname(diffusers_psld.__file__)
assert not package.startswith(repo), f"imported the checkout ({package}), not the installed wheel"
assert str(DEFAULT_TEMPLATE).startswith(package) and DEFAULT_TEMPLATE.is_file(), DEFAULT_TEMPLATE
pipe = PSLDPipeline.from_pretrained(pipeline)
out = pipe(batch_size=2, num_inference_steps=4, generator=torch.Generator().manual_seed(0), output_type="np").images
assert out.shape[0] == 2 and torch.isfinite(torch.as_tensor(out)).all(), out.shape
copy = shutil.copytree(pipeline, "pipeline-copy", ignore=shutil.ignore_patterns("checkpoint-*"))
generic = DiffusionPipeline.from_pretrained(copy, trust_remote_code=True)
assert type(generic).__name__ == "PSLDPipeline", type(generic)
print(f"CI: the installed wheel {diffusers_psld.__version__} loads and samples {tuple(out.shape)}; generic loader OK")
PY
)
echo "CI: wheel install and sampling done ($((SECONDS - t0)) s)"

# --- 3. the Space folder, outside the checkout, installed from its own requirements (the wheel uninstalled)
python demo/build_space.py --wheel "$wheel" --output_dir "$work/space" >/dev/null
"$work/venv/bin/pip" uninstall -q -y diffusers-psld
"$work/venv/bin/pip" install -q -r "$work/space/requirements.txt"
(cd "$work/space" && PYTHONPATH= PSLD_MODEL="$pipeline" GRADIO_ANALYTICS_ENABLED=False "$work/venv/bin/python" - <<'PY'
import os

import app  # the Space's app.py, next to its diffusers_psld/ folder

import diffusers_psld

assert os.path.dirname(diffusers_psld.__file__) == os.path.join(os.getcwd(), "diffusers_psld"), diffusers_psld.__file__
pipe, status = app.load_pipeline()
assert "untrained" not in status.lower(), status
images = app._run(pipe, app.recommended_sampler(pipe), 1, 3, 0)
demo = app.build_demo(pipe, status)
print(f"CI: the Space folder installs and runs outside the checkout ({len(images)} image; {status.splitlines()[0][:80]})")
PY
)
echo "CI: Space check done ($((SECONDS - t0)) s)"

# --- 4. the documentation, strict and offline
pip install -q -e ".[docs]"
python -m sphinx -W --keep-going -n -q -b html docs/source "$work/html"
echo "CI: documentation built with no warnings ($((SECONDS - t0)) s in all for packaging and docs)"
