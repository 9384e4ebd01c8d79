#!/usr/bin/env bash
# The oldest supported diffusers: setup.cfg's floor (`diffusers>=X`), installed exactly, in a virtual environment
# of its own (the main .venv keeps the newest release), then the default test suite against it.
# Usage: bash .ci/oldest_diffusers.sh        (from the repository root; called by .ci/run)
set -euo pipefail
cd "$(dirname "$0")/.."
export PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 GRADIO_ANALYTICS_ENABLED=False

floor=$(sed -n 's/^[[:space:]]*diffusers>=\([0-9][0-9.]*\)[[:space:]]*$/\1/p' setup.cfg)
[ -n "$floor" ] || { echo "CI: no 'diffusers>=X' line in setup.cfg" >&2; exit 1; }

env_dir=$(mktemp -d)
trap 'rm -rf "$env_dir"' EXIT
python3 -m venv "$env_dir/venv"
# shellcheck disable=SC1091
. "$env_dir/venv/bin/activate"
pip install -q torch==2.13.0
pip install -q -e ".[test]" "diffusers==$floor"
python -c "import diffusers; assert diffusers.__version__ == '$floor', diffusers.__version__; print('CI: oldest supported diffusers', diffusers.__version__)"

set +e
python -m pytest -q -p no:cacheprovider
rc=$?
set -e
if [ "$rc" = 5 ]; then
  echo "CI: pytest collected no tests against diffusers $floor (exit 5)" >&2
  exit 1
fi
[ "$rc" = 0 ] || echo "CI: the test suite fails against diffusers $floor, the floor setup.cfg claims" >&2
exit "$rc"
