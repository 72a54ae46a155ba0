#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh), makes the demo model if it is not there yet (a tiny
# random qwen35 - the Qwen3.5/3.6 architecture - with its MTP block), starts `nextn serve` on a Unix socket
# with MTP speculative decoding, queries it with curl (OpenAI chat API, then a streamed completion), shows
# the drafted/accepted counters, and stops it. The device is the first OpenCL GPU, else PoCL's CPU device.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
PY=${PYTHON:-python3}
MODEL=${NEXTN_DEMO_MODEL:-$HOME/.cache/nextn/demo/tiny-qwen35-mtp-q8_0.gguf}
if [ ! -f "$MODEL" ]; then
  mkdir -p "$(dirname "$MODEL")"
  "$PY" -m nextn make-tiny "$MODEL" --arch qwen35 --type Q8_0 --seed 0 --mtp
fi
"$PY" -m nextn inspect "$MODEL"

SOCK=$(mktemp -u /tmp/nextn-demo-XXXXXX.sock)
"$PY" -m nextn serve -m "$MODEL" --socket "$SOCK" --parallel 2 --spec-type draft-mtp --spec-draft-n-max 4 &
SERVER=$!
trap 'kill $SERVER 2>/dev/null; wait $SERVER 2>/dev/null || true' EXIT
for _ in $(seq 1 300); do
  curl -sf --unix-socket "$SOCK" http://localhost/health >/dev/null 2>&1 && break
  kill -0 $SERVER 2>/dev/null || { echo "nextn serve exited" >&2; exit 1; }
  sleep 0.2
done
echo "--- POST /v1/chat/completions"
curl -s --unix-socket "$SOCK" http://localhost/v1/chat/completions -H 'Content-Type: application/json' \
  -d "{\"messages\": [{\"role\": \"user\", \"content\": \"${1:-Once upon a time}\"}], \"max_tokens\": 24, \"temperature\": 0}"
echo
echo "--- POST /v1/completions (streamed)"
curl -sN --unix-socket "$SOCK" http://localhost/v1/completions -H 'Content-Type: application/json' \
  -d '{"prompt": "hello", "max_tokens": 8, "stream": true}'

echo
echo "--- speculative decoding counters (GET /metrics)"
curl -s --unix-socket "$SOCK" http://localhost/metrics | grep -E '^nextn_tokens_drafted'
