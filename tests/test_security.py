"""Security: loopback-only servers, pickle-free checkpoints, safe YAML, no shell, no escaping root.

The source scans read the abstract syntax tree of every module in src/, flows/ and tasks/, so a
comment or a docstring mentioning ``shell=True`` does not count, and an aliased call does.
"""

from __future__ import annotations

import ast
import inspect
import socket
from pathlib import Path

import pytest
import torch
from helpers import REPO, SMOKE

from maskdiff.checkpoint import FORMAT, FORMAT_VERSION, CheckpointError, load_checkpoint
from maskdiff.config import ConfigError, load_config
from maskdiff.ops import servers

SOURCES = sorted(
    p for folder in ("src", "flows", "tasks") for p in (REPO / folder).rglob("*.py")
)  # every module of the project's code


def calls(path: Path) -> list[tuple[str, ast.Call]]:
    """(dotted name, call node) of every call in a module, e.g. ``("subprocess.run", node)``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Call):
            out.append((ast.unparse(node.func), node))
    return out


# ----------------------------------------------------------------------------- servers


def test_servers_default_to_loopback() -> None:
    assert servers.LOCALHOST == "127.0.0.1"
    for start in (servers.start_prefect, servers.start_mlflow, servers.free_port):
        assert inspect.signature(start).parameters["host"].default == "127.0.0.1", start
    from flows.cli import build_parser

    ui = build_parser().parse_args(["ui"])
    assert ui.host == "127.0.0.1"


def _listening_addresses(port: int) -> set[str]:
    """Local IPv4/IPv6 addresses with a socket in LISTEN state on ``port`` (from /proc)."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            local, state = line.split()[1], line.split()[3]
            address, hex_port = local.split(":")
            if state == "0A" and int(hex_port, 16) == port:
                found.add(address)
    return found


def _other_address() -> str | None:
    """A non-loopback IPv4 address of this machine, if it has one."""
    try:
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            address = str(info[4][0])
            if not address.startswith("127."):
                return address
    except OSError:
        pass
    return None


@pytest.mark.slow
def test_mlflow_server_listens_on_loopback_only(tmp_path: Path) -> None:
    server = servers.start_mlflow(tmp_path / "mlflow")
    try:
        assert "--host" in server.process.args and "127.0.0.1" in server.process.args
        server.wait_ready(timeout=120)
        port = int(server.url.rsplit(":", 1)[1])
        assert _listening_addresses(port) == {"0100007F"}  # 127.0.0.1, little-endian hex
        with socket.create_connection(("127.0.0.1", port), timeout=5):
            pass
        other = _other_address()
        if other is not None:  # reachable from outside would mean bound beyond loopback
            with pytest.raises(OSError):
                socket.create_connection((other, port), timeout=2).close()
    finally:
        server.stop()
    assert server.process.poll() is not None


@pytest.mark.server
def test_prefect_server_command_binds_loopback(tmp_path: Path) -> None:
    server = servers.start_prefect(tmp_path / "prefect")
    try:
        args = server.process.args
        assert args[args.index("--host") + 1] == "127.0.0.1"
        assert server.url.startswith("http://127.0.0.1:")
    finally:
        server.stop()


# ----------------------------------------------------------------------------- checkpoints


class _Payload:
    """Unpickling this would create ``marker``: what a hostile checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.marker), "w"))


def test_checkpoint_with_a_pickled_object_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    path = tmp_path / "ckpt-00000010.pt"
    torch.save({"format": FORMAT, "version": FORMAT_VERSION, "evil": _Payload(marker)}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert str(path) in message and "weights_only=True" in message and "io.open" in message
    assert "weights_only=False" not in message and "`weights_only` set to `False`" not in message
    assert not marker.exists(), "loading a checkpoint ran pickled code"


def test_every_torch_load_passes_weights_only_true() -> None:
    loads = [(p, node) for p in SOURCES for name, node in calls(p) if name.endswith("torch.load")]
    assert loads, "expected the checkpoint module to call torch.load"
    for path, node in loads:
        kw = {k.arg: k.value for k in node.keywords}
        assert "weights_only" in kw, f"{path}:{node.lineno}: torch.load without weights_only"
        assert isinstance(kw["weights_only"], ast.Constant) and kw["weights_only"].value is True


# ----------------------------------------------------------------------------- YAML, shell


def test_yaml_python_tags_are_refused(tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    bad = tmp_path / "evil.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(ConfigError) as info:
        load_config(bad)
    assert str(bad) in str(info.value)
    assert not marker.exists()


def test_yaml_is_only_loaded_safely() -> None:
    unsafe = {"yaml.load", "yaml.unsafe_load", "yaml.full_load", "yaml.load_all"}
    found = [f"{p}:{n.lineno} {name}" for p in SOURCES for name, n in calls(p) if name in unsafe]
    assert not found, found


def test_no_shell_and_no_command_strings() -> None:
    """No ``shell=True``, ``os.system``, ``os.popen``, ``eval`` or ``exec``; every subprocess
    gets an argument list, never a string that config values could be pasted into."""
    bad = []
    for path in SOURCES:
        for name, node in calls(path):
            where = f"{path.relative_to(REPO)}:{node.lineno} {name}"
            if name in {"os.system", "os.popen", "eval", "exec", "os.execl", "os.spawnl"}:
                bad.append(where)
            for kw in node.keywords:
                if kw.arg == "shell" and not (
                    isinstance(kw.value, ast.Constant) and kw.value.value is False
                ):
                    bad.append(f"{where} shell=")
            if name.startswith("subprocess.") and node.args:
                first = node.args[0]
                if isinstance(first, ast.JoinedStr | ast.BinOp) or (
                    isinstance(first, ast.Constant) and isinstance(first.value, str)
                ):
                    bad.append(f"{where}: a command string")
    assert not bad, bad
    assert len(SOURCES) > 20  # the scan saw the project


# ----------------------------------------------------------------------------- data root


@pytest.mark.parametrize("root", ["../x", "runs/../../etc", "/tmp/a/../b"])
def test_data_root_with_dotdot_is_refused_in_file_and_override(tmp_path: Path, root: str) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(SMOKE, [f"data.root={root}"])
    assert "--set" in str(info.value) and "data.root" in str(info.value)
    path = tmp_path / "climb.yaml"
    path.write_text(f"data:\n  root: {root}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(path) in str(info.value) and "data.root" in str(info.value)
    assert list(tmp_path.iterdir()) == [path]  # nothing was created


def test_command_line_refuses_a_climbing_root(tmp_path: Path) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as info:
        main(["run", "--config", str(SMOKE), "--set", "data.root=../outside"])
    assert "data.root" in str(info.value) and "'..'" in str(info.value)
