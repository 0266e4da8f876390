"""Shared by the aarch64 tests: the cross toolchain, qemu and the device runtime, or a skip."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


def arm64_runtime_or_skip():
    """The aarch64 TVM runtime files when the toolchain and qemu are here; otherwise skip (or fail
    under ``QCOMPILE_REQUIRE_ARM64=1``, as CI sets it) naming what is missing."""
    from qcompile.backends.arm64 import toolchain
    from qcompile.errors import ToolchainError

    missing = [t for t in (toolchain.CXX, toolchain.OBJDUMP, toolchain.QEMU) if toolchain.find_tool(t) is None]
    if not Path(toolchain.SYSROOT, "lib").is_dir():
        missing.append(toolchain.SYSROOT)
    reason = f"arm64 toolchain missing: {', '.join(missing)}" if missing else None
    if reason is None:
        try:
            return toolchain.device_runtime()
        except ToolchainError as err:
            reason = f"aarch64 TVM runtime unavailable: {err}"
    if os.environ.get("QCOMPILE_REQUIRE_ARM64"):
        pytest.fail(reason)
    pytest.skip(reason)
