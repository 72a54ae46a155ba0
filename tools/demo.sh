#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh), starts `nextn serve` on a Unix socket with the embedded
# default model (a small qwen35 - the Qwen3.5/3.6 architecture - Python code model with its MTP block, trained
# by tools/train on the standard library; README "The embedded default model") and MTP speculative decoding,
# asks it to complete Python code over the OpenAI completions API (plain, then streamed), shows the
# drafted/accepted counters, and stops it. NEXTN_DEMO_MODEL=FILE runs another GGUF instead. The device is the
# first OpenCL GPU, else PoCL's CPU device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=${PYTHON:-python3}
MODEL_ARGS=()
if [ -n "${NEXTN_DEMO_MODEL:-}" ]; then
  MODEL_ARGS=(-m "$NEXTN_DEMO_MODEL")
  "$PY" -m nextn inspect "$NEXTN_DEMO_MODEL"
else
  "$PY" -m nextn inspect "$("$PY" -c 'from nextn import default_model; print(default_model.path())')"
fi

SOCK=$(mktemp -u /tmp/nextn-demo-XXXXXX.sock)
"$PY" -m nextn serve "${MODEL_ARGS[@]}" --socket "$SOCK" --parallel 2 --spec-type draft-mtp --spec-draft-n-max 3 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf --unix-socket "$SOCK" http://localhost/health >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "nextn serve exited" >&2; exit 1; }
  sleep 0.2
done
PROMPT=${1:-$'import os\n\n\ndef read_lines(path):\n'}
BODY=$("$PY" -c 'import json, sys; print(json.dumps({"prompt": sys.argv[1], "max_tokens": 64, "temperature": 0}))' "$PROMPT")
echo "--- POST /v1/completions (the prompt, then the model's completion)"
curl -s --unix-socket "$SOCK" http://localhost/v1/completions -H 'Content-Type: application/json' -d "$BODY" |
  "$PY" -c 'import json, sys; r = json.load(sys.stdin); print(sys.argv[1] + r["choices"][0]["text"]); print("---", r["usage"])' "$PROMPT"
echo "--- POST /v1/completions (streamed: the text of each SSE chunk as it arrives)"
printf 'class Stack:\n'
curl -sN --unix-socket "$SOCK" http://localhost/v1/completions -H 'Content-Type: application/json' \
  -d '{"prompt": "class Stack:\n", "max_tokens": 48, "stream": true, "temperature": 0, "repeat_penalty": 1.2}' |
  "$PY" -u -c 'import json, sys
for line in sys.stdin:
    if line.startswith("data: {"):
        print(json.loads(line[6:])["choices"][0]["text"], end="", flush=True)'
echo
echo "--- speculative decoding counters (GET /metrics)"
curl -s --unix-socket "$SOCK" http://localhost/metrics | grep -E '^nextn_tokens_drafted'
