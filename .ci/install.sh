#!/usr/bin/env bash
# Create .venv and install the package with its test extras.
# torch is installed first and then pinned, so that nothing pulls a different torch build in afterwards. An
# existing torch in .venv is kept (e.g. your CUDA build); otherwise TORCH_VERSION is installed from your index.
set -euo pipefail
cd "$(dirname "$0")/.."
python=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$python" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
fi
.venv/bin/python -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > .venv/constraints.txt
.venv/bin/python -m pip install -q -c .venv/constraints.txt -e ".[${EXTRAS:-test}]"
