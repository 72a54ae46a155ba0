#!/usr/bin/env bash
# Sets up a bare Debian machine (tools/setup.sh, plus what only the tests need: curl and
# systemd-socket-activate for the server tests; makepkg, fakeroot and bsdtar for building the Arch package;
# systemd-analyze for the unit checks) and runs the test suite. Extra arguments go to pytest,
# e.g. `bash tools/test.sh -m slow` for the slow cases only.
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/setup.sh
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
TEST_PKGS="curl systemd makepkg pacman-package-manager fakeroot libarchive-tools git"
missing=""
for p in $TEST_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi
exec "${PYTHON:-python3}" -m pytest -q "$@"
