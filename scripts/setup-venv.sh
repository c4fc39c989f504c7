#!/usr/bin/env bash
# Creates (or reuses) the git-ignored virtual environment .venv/ with scripts/requirements-dev.txt
# (torch, numpy, maturin, pytest, transformers, …). Idempotent: an environment made from the same
# requirements file (its sha256 is stamped in .venv/.ok) is only verified.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=.venv
REQ=scripts/requirements-dev.txt
stamp=$(sha256sum "$REQ" | cut -d' ' -f1)
# The gguf-py dequantization reference of SmolLM2's first rows (tests/gguf_smollm2.rs): model
# data, so it lives in the git-ignored models/ beside the model, made once both are there.
derive() {
  local model=models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf ref=models/smollm2/dequant_ref.safetensors
  if [ -f "$model" ] && [ ! -f "$ref" ]; then
    "$VENV/bin/python" tests/fixtures/make_gguf_dequant_fixture.py --smollm2 > /dev/null
    echo "setup-venv: wrote $ref (gguf-py's dequantization of the model's first rows)"
  fi
}
if [ -f "$VENV/.ok" ] && [ "$(cat "$VENV/.ok")" = "$stamp" ] \
   && "$VENV/bin/python" -c "import torch, numpy, pytest, transformers" 2>/dev/null; then
  derive
  exit 0
fi
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -r "$REQ"
"$VENV/bin/python" -c "import torch, numpy, transformers; print('setup-venv: torch', torch.__version__, 'numpy', numpy.__version__, 'transformers', transformers.__version__)"
echo "$stamp" > "$VENV/.ok"
derive
