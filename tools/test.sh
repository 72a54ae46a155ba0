#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh) and runs the test suite. Extra arguments go to pytest,
# e.g. `bash tools/test.sh -m slow` for the slow cases only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
