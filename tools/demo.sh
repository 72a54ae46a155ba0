#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh), then makes the default demo model if it is not there yet
# and generates from it on the OpenCL device (PoCL's CPU device when there is no GPU).
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=${PYTHON:-python3}
MODEL=${NEXTN_DEMO_MODEL:-$HOME/.cache/nextn/demo/tiny-qwen3-q8_0.gguf}
if [ ! -f "$MODEL" ]; then
  mkdir -p "$(dirname "$MODEL")"
  "$PY" -m nextn make-tiny "$MODEL" --arch qwen3 --type Q8_0 --seed 0
fi
"$PY" -m nextn inspect "$MODEL"
"$PY" -m nextn generate -m "$MODEL" -p "${1:-Once upon a time}" -n 32
