"""Start and stop a real ``em-inf serve`` process for the server tests.

The server runs as a child process on loopback, in its own session (so stopping it
also stops vLLM's engine processes), with its output in a log file whose tail is
shown when it fails to come up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from pathlib import Path

HOST = "127.0.0.1"
# Engine start-up took 50-90 s on a busy 2-core machine; leave room, but bound it.
START_TIMEOUT_S = 420.0
STOP_TIMEOUT_S = 60.0


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((HOST, 0))
        return probe.getsockname()[1]


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


def _healthy(base_url: str) -> bool:
    try:
        with urllib.request.urlopen(base_url + "/health", timeout=5) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
        return False


@contextlib.contextmanager
def running_server(
    args: Sequence[str], log_path: Path, *, unset_env: Sequence[str] = ()
) -> Iterator[str]:
    """Run ``em-inf serve <args> --host 127.0.0.1 --port <free>``; yield its base URL.

    Waits for ``GET /health`` (at most :data:`START_TIMEOUT_S`), and fails with the
    log's tail if the process exits or the time runs out. On exit sends SIGINT (a
    graceful vLLM shutdown), then SIGKILL to the whole process group if needed.
    ``unset_env``: variables of this process the server must not inherit.
    """
    port = free_port()
    command = [*em_inf_command(), "serve", *args, "--host", HOST, "--port", str(port)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    for name in unset_env:
        env.pop(name, None)
    base_url = f"http://{HOST}:{port}"
    with log_path.open("w") as log:
        log.write("$ " + " ".join(command) + "\n")
        log.flush()
        process = subprocess.Popen(
            command,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _healthy(base_url):
            if process.poll() is not None:
                raise RuntimeError(
                    f"em-inf serve exited with {process.returncode} before it was "
                    f"healthy:\n{log_tail(log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"em-inf serve not healthy after {START_TIMEOUT_S:.0f} s:\n"
                    f"{log_tail(log_path)}"
                )
            time.sleep(2)
        yield base_url
    finally:
        _stop(process)


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
