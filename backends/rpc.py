"""RPC measurement for MetaSchedule tuning: candidates run on boards behind a TVM RPC tracker.

A farm is a TVM RPC tracker (``python -m tvm.exec.rpc_tracker --host 0.0.0.0 --port 9190``) and
RPC servers registered with it under one key, one per board
(``python -m tvm.exec.rpc_server --tracker HOST:9190 --key K``). ``qcompile tune --rpc HOST:PORT
--key K`` builds candidates on this machine and measures them on the farm, through MetaSchedule's
own ``RPCRunner``: one runner worker per registered server, so the boards measure in parallel.

Invariants:

* :func:`connect_farm` asks the tracker for its summary before any tuning work, with a socket
  timeout (never a hang); an unreachable address, something that is not a tracker, or no server
  registered with the key raises :class:`RpcError` (one line; the CLI exits 2);
* a candidate's artifact is a shared library linked for the target (:func:`exporter`): the host
  ``g++`` for host targets, ``aarch64-linux-gnu-g++`` (:mod:`qcompile.backends.arm64.toolchain`)
  for aarch64 targets, so a server needs the TVM runtime only, no compiler;
* measurement settings are MetaSchedule's defaults (those of its local runner), so records
  measured over RPC and locally are comparable.
"""

from __future__ import annotations

import logging
import os
import socket
import struct
import tempfile
from dataclasses import dataclass

from qcompile.errors import InputError, ToolchainError

__all__ = ["RpcError", "Farm", "parse_address", "connect_farm", "tracker_summary", "make_runner",
           "exporter", "export_host", "export_aarch64", "CONNECT_TIMEOUT_S", "SESSION_TIMEOUT_S"]

logger = logging.getLogger("qcompile")

CONNECT_TIMEOUT_S = 10.0  # tracker connect / summary
SESSION_TIMEOUT_S = 60.0  # one candidate: session request, upload, measurement (slow boards)
_ARTIFACT = "tvm_tmp_mod.so"


class RpcError(ToolchainError):
    """The RPC tracker cannot be reached, is not a tracker, or has no server with the key."""


@dataclass(frozen=True)
class Farm:
    """A tracker address, the key its servers registered under, and how many there are."""

    host: str
    port: int
    key: str
    servers: int = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"


def parse_address(text: str) -> tuple[str, int]:
    """``"HOST:PORT"`` -> ``(host, port)``; :class:`InputError` when malformed."""
    host, sep, port = str(text).rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise InputError(f"--rpc expects HOST:PORT of an RPC tracker (got '{text}')")
    return host, int(port)


def tracker_summary(host: str, port: int, timeout_s: float = CONNECT_TIMEOUT_S) -> dict:
    """The tracker's summary (``{"server_info": [...], "queue_info": {...}}``), within ``timeout_s``."""
    from tvm.rpc import base

    where = f"RPC tracker {host}:{port}"
    try:
        with socket.create_connection((host, port), timeout=timeout_s) as sock:
            sock.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(sock, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                raise RpcError(f"{where}: the process at that address is not a TVM RPC tracker")
            base.sendjson(sock, [base.TrackerCode.SUMMARY])
            code, summary = base.recvjson(sock)
    except (OSError, RuntimeError, ValueError, struct.error) as err:
        # socket.timeout is an OSError; recvall raises RuntimeError on a closed connection
        raise RpcError(f"{where} unreachable within {timeout_s:g} s ({type(err).__name__}: {err})") from None
    if code != base.TrackerCode.SUCCESS:
        raise RpcError(f"{where}: unexpected summary reply {code!r}")
    return summary


def _servers_by_key(summary: dict) -> dict[str, int]:
    counts: dict[str, int] = {}
    for item in summary.get("server_info", []):
        key = str(item.get("key", "")).split(":", 1)[-1]  # the tracker reports "server:<key>"
        counts[key] = counts.get(key, 0) + 1
    return counts


def connect_farm(address: str, key: str, timeout_s: float = CONNECT_TIMEOUT_S) -> Farm:
    """Check the tracker at ``address`` has servers with ``key``; the :class:`Farm` to tune on."""
    if not key:
        raise InputError("--rpc needs --key K: the key the RPC servers registered with")
    host, port = parse_address(address)
    counts = _servers_by_key(tracker_summary(host, port, timeout_s))
    if not counts.get(key):
        known = ", ".join(f"{k} ({n})" for k, n in sorted(counts.items())) or "none"
        raise RpcError(f"RPC tracker {host}:{port} has no server registered with key '{key}' "
                       f"(registered keys: {known})")
    logger.info("RPC tracker %s:%d: %d server(s) with key '%s'", host, port, counts[key], key)
    return Farm(host, port, key, counts[key])


def make_runner(farm: Farm, session_timeout_s: float = SESSION_TIMEOUT_S):
    """MetaSchedule's RPCRunner on ``farm``, one worker per server (parallel measurement)."""
    from tvm.s_tir.meta_schedule.runner import RPCConfig, RPCRunner

    config = RPCConfig(tracker_host=farm.host, tracker_port=farm.port, tracker_key=farm.key,
                       session_timeout_sec=int(session_timeout_s))
    return RPCRunner(rpc_config=config, max_workers=max(1, farm.servers))


def _is_aarch64(target) -> bool:
    triple = str(target.attrs.get("mtriple", "")) if target.attrs is not None else ""
    return triple.startswith("aarch64")


def exporter(target):
    """The builder's ``f_export`` for ``target``: a module-level function (runs in MetaSchedule's
    builder processes), linking a shared library a server of that architecture can load."""
    return export_aarch64 if _is_aarch64(target) else export_host


def _export(mod, cc: str | None) -> str:
    path = os.path.join(tempfile.mkdtemp(prefix="qcompile-rpc-"), _ARTIFACT)
    mod.export_library(path, **({"cc": cc} if cc else {}))
    return path


def export_host(mod) -> str:
    """Link a candidate with the host compiler (x86 servers)."""
    return _export(mod, None)


def export_aarch64(mod) -> str:
    """Link a candidate with ``aarch64-linux-gnu-g++`` (aarch64 servers)."""
    from qcompile.backends.arm64 import toolchain

    return _export(mod, toolchain.require_tool(toolchain.CXX))
