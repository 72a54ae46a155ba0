#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh, plus what only the tests need: systemd-socket-activate for
# the server tests; makepkg, fakeroot and bsdtar for building the Arch package; systemd-analyze for the unit
# checks) and runs the test suite. Extra arguments go to pytest, e.g. `bash tools/test.sh -m slow`.
set -euo pipefail
cd "$(dirname "$0")/.."
NEXTN_EXTRA_APT="systemd makepkg pacman-package-manager fakeroot libarchive-tools git" bash tools/setup.sh
exec "${PYTHON:-python3}" -m pytest -q "$@"
