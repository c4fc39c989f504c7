#!/usr/bin/env bash
# Creates (or reuses) the git-ignored virtual environment .venv/ with what the Python tests need:
# torch (CPU use; the PyPI wheel brings CUDA libraries, ~5.6 GB on a fresh machine), numpy,
# maturin, pytest, transformers and safetensors (tests/python/test_export_hf.py). Idempotent: a
# complete environment is only verified.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
if [ -f "$VENV/.ok" ] && "$VENV/bin/python" -c "import torch, numpy, pytest, transformers, safetensors" 2>/dev/null; then
  exit 0
fi
python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet "torch>=2.4" "numpy>=1.24" "maturin>=1.5,<2" "pytest>=7" \
  "transformers>=4.45" "safetensors>=0.4"
"$VENV/bin/python" -c "import torch, numpy, pytest; print('setup-venv: torch', torch.__version__, 'numpy', numpy.__version__)"
touch "$VENV/.ok"
