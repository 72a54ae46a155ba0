#!/usr/bin/env bash
# Installs what nextn needs on a bare Debian machine (root or sudo): the OpenCL loader and headers, Debian's
# PoCL as the CPU OpenCL device, a C compiler; then nextn itself (editable, Cython extensions built) with its
# Python dependencies. Safe to run again: each step is skipped when already done.
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"
# NEXTN_EXTRA_APT: more Debian packages to make sure of (tools/test.sh adds what only the tests need)
APT_PKGS="pocl-opencl-icd ocl-icd-opencl-dev opencl-headers clinfo gcc pkg-config libsystemd-dev curl ${NEXTN_EXTRA_APT:-}"
missing=""
for p in $APT_PKGS; do dpkg -s "$p" >/dev/null 2>&1 || missing="$missing $p"; done
if [ -n "$missing" ]; then
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing
fi

PY=${PYTHON:-python3}
# Debian's own python3 marks itself externally managed; nextn installs into whichever python3 runs it.
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
"$PY" -m pip install -q --upgrade pip setuptools wheel "Cython>=3.0" "numpy>=1.24"
"$PY" -m pip install -q --no-build-isolation -e ".[test]"
