"""Tuning over TVM RPC (qcompile.backends.rpc): a tracker and one server on loopback measure
the candidates of ``qcompile tune --rpc HOST:PORT --key K``; errors when the farm is missing.

The farm fixture starts TVM's own tracker and server (each in a subprocess of TVM's
PopenWorker) on free loopback ports and stops both afterwards.
"""

from __future__ import annotations

import json
import socket
import struct
import time

import pytest

from conftest import make_mlp_onnx
from qcompile.backends import rpc
from qcompile.cli import main
from qcompile.errors import InputError
from test_tuning import _check_matches_interpreter

KEY = "qcompile-test"
HOST = "127.0.0.1"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _wait_registered(port: int, key: str, timeout_s: float = 120.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            rpc.connect_farm(f"{HOST}:{port}", key, timeout_s=5)
            return
        except rpc.RpcError:
            time.sleep(0.5)
    raise RuntimeError(f"no RPC server registered with key {key} at {HOST}:{port} after {timeout_s} s")


@pytest.fixture(scope="module")
def farm():
    """``HOST:PORT`` of a loopback tracker with one server registered under :data:`KEY`."""
    pytest.importorskip("tornado", reason="the TVM RPC tracker needs tornado (apache-tvm[rpc])")
    from tvm import rpc as tvm_rpc
    from tvm.rpc.tracker import Tracker

    start = _free_port()
    tracker = Tracker(HOST, port=start, port_end=start + 50, silent=True)
    server = None
    try:
        start = _free_port()
        server = tvm_rpc.Server(HOST, port=start, port_end=start + 50, tracker_addr=(HOST, tracker.port),
                                key=KEY, silent=True)
        _wait_registered(tracker.port, KEY)
        yield f"{HOST}:{tracker.port}"
    finally:
        if server is not None:
            server.terminate()
        tracker.terminate()


def _tune_argv(model, db, address, key):
    return ["tune", str(model), "--trials", "2", "--db", str(db), "--bits", "16", "-q", "--rpc", address, "--key", key]


def _records(db) -> list[list]:
    lines = (db / "database_tuning_record.json").read_text().splitlines()
    return [json.loads(line) for line in lines if line.strip()]


# ---------------------------------------------------------------------------- errors (no farm)
def test_parse_address():
    assert rpc.parse_address("tracker.lan:9190") == ("tracker.lan", 9190)
    for bad in ("9190", "host:", "host:port", ":9190", "host:70000"):
        with pytest.raises(InputError, match="HOST:PORT"):
            rpc.parse_address(bad)


def test_unreachable_tracker_is_one_line_exit_2(tmp_path, capsys):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    code = main(_tune_argv(model, tmp_path / "db", f"{HOST}:{_free_port()}", KEY))
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.count("\n") == 0 and err.startswith("qcompile: error: RPC tracker") and "unreachable" in err
    assert not (tmp_path / "db").exists()  # failed before any tuning work


def test_silent_tracker_times_out():
    """A port that accepts but never answers (not a tracker, or a hung one): an error, not a hang."""
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)
        port = listener.getsockname()[1]
        start = time.monotonic()
        with pytest.raises(rpc.RpcError, match="unreachable within 0.5 s"):
            rpc.connect_farm(f"{HOST}:{port}", KEY, timeout_s=0.5)
        assert time.monotonic() - start < 30


def test_wrong_reply_is_not_a_tracker():
    import threading

    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen(1)

        def answer():
            conn, _ = listener.accept()
            with conn:
                conn.recv(4)
                conn.sendall(struct.pack("<i", 12345))

        thread = threading.Thread(target=answer, daemon=True)
        thread.start()
        with pytest.raises(rpc.RpcError, match="not a TVM RPC tracker"):
            rpc.connect_farm(f"{HOST}:{listener.getsockname()[1]}", KEY, timeout_s=5)
        thread.join(5)


def test_rpc_option_checks(tmp_path):
    from qcompile.driver import tune

    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    with pytest.raises(InputError, match="--key"):
        tune(model, bits=16, trials=1, db=tmp_path / "db", rpc=f"{HOST}:9190")
    with pytest.raises(InputError, match="--rpc"):
        tune(model, bits=16, trials=1, db=tmp_path / "db", rpc_key=KEY)
    with pytest.raises(InputError, match="arm64 with --rpc"):
        tune(model, target="arm64", bits=16, trials=1, db=tmp_path / "db")


# ---------------------------------------------------------------------------- builder export
def test_exporter_links_for_the_target(tmp_path):
    """Candidates for aarch64 targets are linked by the cross g++ into an AArch64 shared library."""
    import tvm
    from tvm import te

    from qcompile.backends.arm64 import arm64_target, toolchain
    from qcompile.backends.llvm import host_target

    assert rpc.exporter(host_target()) is rpc.export_host
    target = arm64_target("neoverse-n1")
    assert rpc.exporter(target) is rpc.export_aarch64
    if toolchain.find_tool(toolchain.CXX) is None:
        pytest.skip("aarch64-linux-gnu-g++ missing (apt-get install g++-aarch64-linux-gnu)")
    a = te.placeholder((64,), "float32", name="a")
    func = te.create_prim_func([a, te.compute((64,), lambda i: a[i] * 2.0, name="b")])
    lib = tvm.tirx.build(tvm.IRModule({"main": func}), target=target)
    path = rpc.export_aarch64(lib)
    header = open(path, "rb").read(20)
    assert header[:4] == b"\x7fELF" and struct.unpack("<H", header[18:20])[0] == 183  # EM_AARCH64


# ---------------------------------------------------------------------------- with a farm
def test_key_without_servers(farm, tmp_path, capsys):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    assert main(_tune_argv(model, tmp_path / "db", farm, "no-such-board")) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0
    assert "no server registered with key 'no-such-board'" in err and f"{KEY} (1)" in err


@pytest.mark.slow
def test_tune_over_rpc_then_compile_with_db(farm, tmp_path, capsys):
    model = make_mlp_onnx(tmp_path / "mlp.onnx")
    db = tmp_path / "db"
    assert main(_tune_argv(model, db, farm, KEY)) == 0
    assert "tuned 1 of 1 function(s)" in capsys.readouterr().out
    records = _records(db)
    assert records, "no tuning record"
    run_secs = [r[1][1] for r in records]  # [workload, [trace, run_secs, target, args_info]]
    measured = [s for s in run_secs if s and max(s) < 1.0]  # failed runs are stored as 1e10 s
    assert measured, f"no measured record over RPC: {run_secs}"
    out = tmp_path / "out"
    assert main([str(model), "--bits", "16", "--db", str(db), "-o", str(out), "-q"]) == 0
    assert json.loads((out / "report.json").read_text())["tuning"]["applied"] == ["relu"]
    _check_matches_interpreter(model, out)
