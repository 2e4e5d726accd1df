"""A real server (``em-inf serve``, or vLLM's own) as a child process on loopback,
and its JSON routes.

The server runs in its own session (so stopping it also stops vLLM's engine
processes), with its output in a log file whose tail is shown when it fails to come
up.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

HOST = "127.0.0.1"
# Engine start-up took 50-90 s on a busy 2-core machine; leave room, but bound it.
START_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 60.0
#: Log lines of a server that lost its port to another process between
#: :func:`free_port` and its own bind (em-inf's check, or uvicorn's bind).
PORT_TAKEN = ("is already in use", "Address already in use")
PORT_TRIES = 3


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


def healthy(base_url: str) -> bool:
    """Whether ``GET <base_url>/health`` answers 200."""
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


def get_json(url: str) -> dict[str, Any]:
    """The JSON body of ``GET url``, which must answer 200."""
    with urllib.request.urlopen(url, timeout=30) as response:
        if response.status != 200:
            raise RuntimeError(f"GET {url} answered {response.status}, not 200")
        return json.loads(response.read())


def em_inf_command() -> list[str]:
    """The installed ``em-inf`` console script (``python -m em_inf.cli`` without it)."""
    script = Path(sys.executable).with_name("em-inf")
    if script.is_file():
        return [str(script)]
    found = shutil.which("em-inf")
    return [found] if found else [sys.executable, "-m", "em_inf.cli"]


def log_tail(log_path: Path, lines: int = 60) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(log_path.read_text(errors="replace").splitlines()[-lines:])
    return "(no log)"


class Server(NamedTuple):
    """A running server: its base URL and the pid of its process."""

    base_url: str
    pid: int


def em_inf_server(
    args: Sequence[str],
    log_path: Path,
    *,
    env_changes: Mapping[str, str | None] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> contextlib.AbstractContextManager[Server]:
    """``em-inf serve <args>`` as :func:`http_server` runs it."""
    return http_server(
        [*em_inf_command(), "serve", *args],
        log_path,
        env_changes=env_changes,
        start_timeout_s=start_timeout_s,
    )


@contextlib.contextmanager
def http_server(
    command: Sequence[str],
    log_path: Path,
    *,
    env_changes: Mapping[str, str | None] | None = None,
    start_timeout_s: float = START_TIMEOUT_S,
) -> Iterator[Server]:
    """Run ``<command> --host 127.0.0.1 --port <free>`` (an OpenAI-compatible
    server: ``em-inf serve``, or vLLM's own), its output in ``log_path``; yield it.

    Waits for ``GET /health`` (at most ``start_timeout_s``), and fails with the
    log's tail if the process exits or the time runs out. A server that exits
    because another process took its port (:data:`PORT_TAKEN` in its log) is
    started again on a fresh port, up to :data:`PORT_TRIES` times. On exit sends
    SIGINT (a graceful vLLM shutdown), then SIGKILL to the whole process group if
    needed. ``env_changes``: how the server's environment differs from this
    process's (a string sets the variable, ``None`` removes it), after
    ``HF_HUB_OFFLINE=1`` and ``PYTHONUNBUFFERED=1``.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name, value in (env_changes or {}).items():
        if value is None:
            env.pop(name, None)
        else:
            env[name] = value
    for attempt in range(1, PORT_TRIES + 1):
        port = free_port()
        process = _start([*command, "--host", HOST, "--port", str(port)], log_path, env)
        try:
            base_url = f"http://{HOST}:{port}"
            retry = attempt < PORT_TRIES
            if _wait_healthy(process, base_url, log_path, start_timeout_s, retry):
                break
        except BaseException:
            _stop(process)
            raise
        _stop(process)
    try:
        yield Server(base_url, process.pid)
    finally:
        _stop(process)


def _start(command: list[str], log_path: Path, env: dict) -> subprocess.Popen:
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        return subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _wait_healthy(
    process: subprocess.Popen,
    base_url: str,
    log_path: Path,
    timeout_s: float,
    retry: bool,
) -> bool:
    """Poll ``/health`` until it answers (True); False where the process exited
    over a taken port and ``retry`` allows another start; else raise with the log."""
    deadline = time.monotonic() + timeout_s
    while not healthy(base_url):
        if process.poll() is not None:
            log = log_path.read_text(errors="replace")
            if retry and any(sign in log for sign in PORT_TAKEN):
                return False
            raise RuntimeError(
                f"the server exited with {process.returncode} before it was "
                f"healthy:\n{log_tail(log_path)}"
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"the server was not healthy after {timeout_s:.0f} s:\n"
                f"{log_tail(log_path)}"
            )
        time.sleep(2)
    return True


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGINT)
        try:
            process.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass
    # Engine processes live in the server's process group; make sure none outlive it.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(10)


def loopback_server_pid(base_url: str) -> int:
    """The pid listening on ``base_url``'s port. Raises ``ValueError`` for a URL
    off loopback and ``LookupError`` when nothing of this machine listens there."""
    import psutil

    parsed = urllib.parse.urlparse(base_url)
    host = parsed.hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise ValueError(f"--server must be on loopback (127.0.0.1), got {host!r}")
    port = parsed.port or 80
    for connection in psutil.net_connections(kind="tcp"):
        if connection.status == psutil.CONN_LISTEN and connection.laddr.port == port:
            if connection.pid is not None:
                return connection.pid
    raise LookupError(f"no process of this machine listens on port {port}")
