#!/usr/bin/env bash
# Debian packages the project needs beyond Python: the aarch64 cross toolchain and
# qemu-user for the arm64 target. Installs only what is missing; warns (does not fail)
# when it cannot install (no root and no sudo): the arm64 tests then skip with a reason.
set -uo pipefail
if command -v aarch64-linux-gnu-g++ >/dev/null && command -v qemu-aarch64 >/dev/null; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
    if command -v sudo >/dev/null; then SUDO="sudo"; else
        echo "warning: cannot install gcc-aarch64-linux-gnu/qemu-user (not root): arm64 tests will skip" >&2
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq && $SUDO apt-get install -y -qq \
    gcc-aarch64-linux-gnu g++-aarch64-linux-gnu qemu-user >/dev/null \
    || echo "warning: apt-get install of the arm64 toolchain failed: arm64 tests will skip" >&2
