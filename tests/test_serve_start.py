"""``em-inf serve``'s start on a CPU engine, on real servers of the tiny model.

* The memory allocator (``--em-inf-allocator``, server/cpu_defaults.py): by default
  malloc is left alone; with ``auto`` tcmalloc is preloaded where installed (else
  ``MALLOC_ARENA_MAX=2``) in *every* process of the server (the API server, which
  starts itself again with it, and the engine processes it spawns), read back from
  ``/proc/<pid>/maps`` and ``/proc/<pid>/environ``. vLLM renames its engine
  processes (setproctitle), which overwrites their ``/proc/<pid>/environ``: only
  the maps tell for those.
* Freed heap returned at idle (em_inf/heap_trim.py, ``--em-inf-heap-trim``): by
  default every process of the server (API server, engine core, worker) starts
  one trimmer, and each trims once it has been idle after requests.
* No first-request cliff, counted rather than timed: em-inf's CPU kernels are built
  or loaded (``em_inf.cpu_build.build``, which logs one line per call) exactly once
  in each engine process that runs the processor, before the server reports ready,
  and never again after requests of both modes.
* oneDNN's primitive cache (``--em-inf-onednn-cache``): bounded by default, the
  flag and the user's own variable win, 0 leaves oneDNN's own.
"""

from __future__ import annotations

import re
import urllib.parse
from pathlib import Path

import openai
import pytest

from em_inf.heap_trim import IDLE_ENV
from em_inf.server import vllm_compat
from em_inf.server.cpu_defaults import (
    ONEDNN_CACHE_DEFAULT,
    ONEDNN_CACHE_ENV,
    TCMALLOC_PATHS,
    allocator_environment,
    onednn_cache_environment,
)
from em_inf_support.tiny_model import tiny_model_dir
from tests.server_helpers import TINY_VOCAB, running_server

pytestmark = pytest.mark.skipif(
    not vllm_compat.get("current_platform").is_cpu(), reason="CPU engine defaults"
)

#: The test's own allocator settings must not leak into the servers.
CLEAN_ENV = {
    "EM_INF_ALLOCATOR": None,
    "EM_INF_ALLOCATOR_APPLIED": None,
    "LD_PRELOAD": None,
    "MALLOC_ARENA_MAX": None,
    IDLE_ENV: None,
    ONEDNN_CACHE_ENV: None,
}
BUILD_LINE = re.compile(r"em-inf: CPU kernels: build or load \(pid (\d+)\)")
PROCESSOR_LINE = re.compile(r"\((\w+) pid=(\d+)\).*EM-INF \S+ on Model Runner")
READY_LINE = "Application startup complete"
TRIMMER_LINE = re.compile(r"heap trim on \(pid (\d+)\)")
TRIM_LINE = re.compile(r"heap trim \(pid (\d+)\): resident")


# ------------------------------------------------------------ the choice (no server)


def test_auto_preloads_tcmalloc_where_found_else_limits_arenas(monkeypatch, tmp_path):
    library = tmp_path / "libtcmalloc_minimal.so.4"
    library.write_text("")
    monkeypatch.setattr(
        "em_inf.server.cpu_defaults.TCMALLOC_PATHS", (str(tmp_path / "no"), library)
    )
    changes, line = allocator_environment("auto", {})
    assert changes == {"LD_PRELOAD": str(library)}
    assert "tcmalloc" in line and "--em-inf-allocator system" in line
    changes, _ = allocator_environment("auto", {"LD_PRELOAD": "/x/libgomp.so"})
    assert changes == {"LD_PRELOAD": f"{library}:/x/libgomp.so"}
    assert allocator_environment("arena", {})[0] == {"MALLOC_ARENA_MAX": "2"}
    library.unlink()
    changes, line = allocator_environment("auto", {})
    assert changes == {"MALLOC_ARENA_MAX": "2"}
    assert "no tcmalloc found" in line
    assert allocator_environment("tcmalloc", {})[0] == {"MALLOC_ARENA_MAX": "2"}


@pytest.mark.parametrize(
    "environ",
    [{"LD_PRELOAD": "/opt/libjemalloc.so"}, {"MALLOC_ARENA_MAX": "4"}],
)
def test_auto_keeps_the_users_own_allocator_settings(environ):
    assert allocator_environment("auto", environ)[0] == {}
    assert allocator_environment("system", {})[0] == {}


@pytest.mark.parametrize(
    ("requested", "environ", "expected"),
    [
        (None, {}, str(ONEDNN_CACHE_DEFAULT)),
        (64, {}, "64"),
        (64, {ONEDNN_CACHE_ENV: "512"}, "64"),  # the flag wins over the variable
        (None, {ONEDNN_CACHE_ENV: "512"}, None),  # the user's variable is kept
        (0, {}, None),  # oneDNN's own
        (0, {ONEDNN_CACHE_ENV: "512"}, None),
    ],
)
def test_onednn_cache_is_bounded_unless_the_user_says_otherwise(
    requested, environ, expected
):
    changes, line = onednn_cache_environment(requested, environ)
    assert changes == ({} if expected is None else {ONEDNN_CACHE_ENV: expected})
    if expected is None:
        kept = environ.get(ONEDNN_CACHE_ENV, "oneDNN's own, 1,024")
        assert "left as it is" in line and kept in line, line
    else:
        assert f"{expected} primitives per process" in line, line
        assert "--em-inf-onednn-cache 0" in line, line


# ---------------------------------------------------------------- real servers


def server_pids(base_url: str) -> list[int]:
    """The pid listening on ``base_url``'s port and every process under it."""
    import psutil

    port = urllib.parse.urlparse(base_url).port
    root = next(
        c.pid
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port and c.pid
    )
    return [root, *(p.pid for p in psutil.Process(root).children(recursive=True))]


def allocator_of(pid: int) -> tuple[bool, str | None]:
    """Whether ``pid`` has tcmalloc mapped, and its ``MALLOC_ARENA_MAX`` (``"?"``
    where its environment cannot be read back: a renamed process)."""
    maps = Path(f"/proc/{pid}/maps").read_text()
    environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    env = dict(item.decode(errors="replace").partition("=")[::2] for item in environ)
    readable = "PATH" in env
    return "libtcmalloc" in maps, env.get("MALLOC_ARENA_MAX") if readable else "?"


def start_tiny(tmp_path_factory, name: str, extra: list[str]):
    args = [str(tiny_model_dir(TINY_VOCAB)), "--dtype", "float32"]
    args += ["--max-model-len", "512", *extra]
    log_path = tmp_path_factory.mktemp(name) / "server.log"
    return running_server(args, log_path, env_changes=CLEAN_ENV), log_path


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    server, log_path = start_tiny(tmp_path_factory, "default-allocator", [])
    with server as base_url:
        yield base_url, log_path


def test_default_leaves_malloc_alone_and_bounds_onednns_cache(default_server):
    base_url, log_path = default_server
    for pid in server_pids(base_url):
        assert allocator_of(pid) in ((False, None), (False, "?")), pid
    log = log_path.read_text()
    assert log.count("CPU engine: memory allocator:") == 1
    assert "memory allocator: the system's" in log
    chosen = f"CPU engine: oneDNN primitive cache: {ONEDNN_CACHE_DEFAULT} primitives"
    assert log.count(chosen) == 1, log[-2000:]


def test_allocator_auto_is_in_every_server_process(tmp_path_factory):
    expected, _ = allocator_environment("auto", {})
    server, log_path = start_tiny(
        tmp_path_factory, "auto-allocator", ["--em-inf-allocator", "auto"]
    )
    with server as base_url:
        pids = server_pids(base_url)
        assert len(pids) >= 3  # API server, engine core, worker (and helpers)
        for pid in pids:
            tcmalloc, arenas = allocator_of(pid)
            if "LD_PRELOAD" in expected:
                assert tcmalloc, pid
            else:
                assert not tcmalloc and arenas in ("2", "?"), pid
        assert allocator_of(pids[0])[1] == expected.get("MALLOC_ARENA_MAX")
    log = log_path.read_text()
    assert log.count("CPU engine: memory allocator:") == 1
    # The restarted API server started its heap trimmer once, after the exec.
    trimmers = [int(pid) for pid in TRIMMER_LINE.findall(log)]
    assert len(trimmers) == len(set(trimmers)) and pids[0] in trimmers, trimmers
    found = any(Path(p).exists() for p in TCMALLOC_PATHS)
    assert ("memory allocator: tcmalloc" in log) == found
    # vLLM's CPU worker stops asking for it.
    assert ("libtcmalloc is not found in LD_PRELOAD" in log) == (not found)


def trimmed_pids(log_path: Path, first_line: int = 0, wait_for=(), wait_s=60.0):
    """The pids that logged a heap trim from ``first_line`` of the log on, polled
    until they include ``wait_for`` or ``wait_s`` have passed."""
    import time

    deadline = time.monotonic() + wait_s
    while True:
        lines = log_path.read_text(errors="replace").splitlines()[first_line:]
        found = {int(m.group(1)) for m in map(TRIM_LINE.search, lines) if m}
        if found >= set(wait_for) or time.monotonic() > deadline:
            return found
        time.sleep(1)


def test_every_server_process_trims_its_heap_when_idle(default_server):
    base_url, log_path = default_server
    pids = server_pids(base_url)
    lines = log_path.read_text(errors="replace").splitlines()
    trimmers = [int(m.group(1)) for m in map(TRIMMER_LINE.search, lines) if m]
    # One each: the API server, the engine core, the worker (helper processes
    # such as the resource tracker run no vLLM code).
    assert len(trimmers) == len(set(trimmers)) >= 3, trimmers
    assert set(trimmers) <= set(pids), (trimmers, pids)
    assert pids[0] in trimmers  # the API server, started by em-inf serve itself
    # Each has been busy starting, then idle: each trimmed.
    trimmed = trimmed_pids(log_path, wait_for=trimmers)
    assert trimmed >= set(trimmers), (trimmed, trimmers)

    # Work that keeps the worker busy for seconds: it trims again once idle.
    worker = int(next(m for m in map(PROCESSOR_LINE.search, lines) if m).group(2))
    assert worker in trimmers
    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    before = len(log_path.read_text(errors="replace").splitlines())
    client.completions.create(
        model=model, prompt="Hello", max_tokens=64, n=8, temperature=1.0
    )
    assert worker in trimmed_pids(log_path, before, wait_for=[worker]), worker


def kernel_lines(log_path: Path) -> tuple[list[str], list[int], list[int], int]:
    lines = log_path.read_text(errors="replace").splitlines()
    builds = [i for i, line in enumerate(lines) if BUILD_LINE.search(line)]
    processors = [i for i, line in enumerate(lines) if PROCESSOR_LINE.search(line)]
    ready = next(i for i, line in enumerate(lines) if READY_LINE in line)
    return lines, builds, processors, ready


def test_kernels_are_built_once_per_engine_process_before_ready(default_server):
    base_url, log_path = default_server
    lines, builds, processors, ready = kernel_lines(log_path)
    assert builds and processors
    built_in = [int(BUILD_LINE.search(lines[i]).group(1)) for i in builds]
    runs_processor = [int(PROCESSOR_LINE.search(lines[i]).group(2)) for i in processors]
    # Each engine process that runs the processor built (or loaded) them once.
    assert sorted(built_in) == sorted(set(runs_processor)), (built_in, runs_processor)
    assert max(builds + processors) < ready
    assert "cpu backend" in lines[processors[0]]  # the kernels, not the fallback

    client = openai.OpenAI(base_url=base_url + "/v1", api_key="unused")
    model = client.models.list().data[0].id
    modes = [{"threshold": 0.0, "steps": 3}, {"mode": "temperature", "threshold": 0.0}]
    for settings in modes:
        for stream in (False, True):
            for n in (1, 2):
                response = client.completions.create(
                    model=model,
                    prompt="The capital of France is",
                    max_tokens=4,
                    temperature=0.7 if n > 1 else 0.0,
                    n=n,
                    stream=stream,
                    extra_body={"em_inf": settings},
                )
                if stream:
                    list(response)
            client.chat.completions.create(
                model=model,
                messages=[{"role": "user", "content": "Hi"}],
                max_tokens=4,
                extra_body={"em_inf": settings},
            )
    _, builds_after, processors_after, _ = kernel_lines(log_path)
    assert builds_after == builds
    assert processors_after == processors
