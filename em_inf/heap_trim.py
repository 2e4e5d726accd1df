"""Give freed heap back to the system when a server process goes idle.

glibc's malloc keeps the memory a process frees and hands it out again; it returns
to the system only the free space at the top of a heap. A server's transient
buffers (responses with the whole vocabulary's logprobs, batches of many
sequences) leave each process at the high-water mark of what it ever held at once,
and that mark keeps rising under varied load: bench/soak.py measured +12.6% to
+17.6% resident memory over 800 requests, three quarters of it freed memory that
``malloc_trim(0)`` gives back (docs/memory-growth.md).

``em-inf serve`` therefore sets :data:`IDLE_ENV` (``--em-inf-heap-trim``), and
every process of the server (the API server, vLLM's engine core, each worker)
starts an :class:`IdleTrimmer` from vLLM's general-plugin hook
(:func:`start_from_environment`): once a process has used under
:data:`BUSY_CPU_SHARE` of a core for :data:`IDLE_ENV` seconds in a row, it calls
``malloc_trim(0)`` once, and again only after it has been busy. A trim holds
malloc's locks while it walks the heap, so it is done when nothing waits on them.
Without the variable (a plain ``vllm serve`` or ``LLM(...)`` with em-inf
installed) nothing starts; setting it opts in.
"""

from __future__ import annotations

import ctypes
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping

logger = logging.getLogger("vllm.em_inf")
#: Where lines go in a process whose vLLM logging is not configured yet (the API
#: server while it builds its parser; ``em-inf serve`` gives ``em_inf`` a handler).
early_logger = logging.getLogger("em_inf.heap_trim")

#: Seconds a process must stay idle before its freed heap is returned; unset or
#: 0: never.
IDLE_ENV = "EM_INF_HEAP_TRIM_IDLE_S"
#: ``em-inf serve``'s idle time before a trim, in seconds (``--em-inf-heap-trim``).
DEFAULT_IDLE_S = 5.0
#: How often the trimmer reads the process's CPU time, in seconds.
POLL_S = 1.0
#: A poll interval in which the process used less CPU than this share of one core
#: counts as idle (an idle vLLM process wakes only for its queues' timeouts).
BUSY_CPU_SHARE = 0.05

_started_in: int | None = None  # the pid whose trimmer runs (reset by fork)
_start_lock = threading.Lock()


def malloc_trim() -> Callable[[], int] | None:
    """glibc's ``malloc_trim(0)`` as a call returning 1 when memory was returned,
    0 when there was none; ``None`` where the C library has no such function."""
    try:
        function = ctypes.CDLL(None).malloc_trim
    except (AttributeError, OSError):
        return None
    function.argtypes = [ctypes.c_size_t]
    function.restype = ctypes.c_int
    return lambda: function(0)


def resident_bytes() -> int:
    """This process's resident set size, in bytes (``/proc/self/statm``)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class IdleWatch:
    """Decides when to trim from successive readings of the process's CPU time.

    :meth:`observe` takes the CPU seconds and wall seconds of one poll interval
    and answers whether to trim now: true once per idle stretch, on the reading
    that completes ``idle_s`` seconds of idleness after a busy interval (a process
    starts as busy, so the first trim comes after start-up's own allocations).
    """

    def __init__(self, idle_s: float, busy_share: float = BUSY_CPU_SHARE) -> None:
        self.idle_s = idle_s
        self.busy_share = busy_share
        self._idle_for = 0.0
        self._trimmed = False

    def observe(self, cpu_s: float, wall_s: float) -> bool:
        if wall_s <= 0 or cpu_s > self.busy_share * wall_s:
            self._idle_for = 0.0
            self._trimmed = False
            return False
        self._idle_for += wall_s
        if self._trimmed or self._idle_for < self.idle_s:
            return False
        self._trimmed = True
        return True


class IdleTrimmer(threading.Thread):
    """A daemon thread that calls ``trim`` whenever :class:`IdleWatch` says so,
    logging what each trim returned to the system."""

    def __init__(self, idle_s: float, trim: Callable[[], int]) -> None:
        super().__init__(name="em-inf-heap-trim", daemon=True)
        self.watch = IdleWatch(idle_s)
        self.trim = trim

    def run(self) -> None:
        wall, cpu = time.monotonic(), time.process_time()
        while True:
            time.sleep(POLL_S)
            now_wall, now_cpu = time.monotonic(), time.process_time()
            due = self.watch.observe(now_cpu - cpu, now_wall - wall)
            if due:
                self._trim_and_log()
            # The trim's own CPU time is not the process's work.
            wall, cpu = time.monotonic(), time.process_time()

    def _trim_and_log(self) -> None:
        before = resident_bytes()
        started = time.perf_counter()
        returned = self.trim()
        took_ms = (time.perf_counter() - started) * 1e3
        after = resident_bytes()
        _logger().info(
            "heap trim (pid %d): resident %.0f -> %.0f MiB in %.1f ms%s",
            os.getpid(),
            before / 2**20,
            after / 2**20,
            took_ms,
            "" if returned else " (nothing to return)",
        )


def _logger() -> logging.Logger:
    """vLLM's logger where vLLM has configured it, else :data:`early_logger`."""
    return logger if logger.hasHandlers() else early_logger


def parse_seconds(text: str) -> float:
    """``text`` as a number of seconds >= 0 (0: off); ``ValueError`` otherwise."""
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0.0 <= seconds < float("inf"):
        raise ValueError(f"expected a number of seconds >= 0, got {text!r}")
    return seconds


def idle_seconds(environ: Mapping[str, str] = os.environ) -> float:
    """:data:`IDLE_ENV` as seconds (unset: 0, off); ``ValueError`` naming the
    variable when it is not a number of seconds >= 0."""
    text = environ.get(IDLE_ENV, "").strip()
    try:
        return parse_seconds(text) if text else 0.0
    except ValueError as error:
        raise ValueError(f"{IDLE_ENV}: {error}") from None


def start_from_environment() -> IdleTrimmer | None:
    """vLLM general plugin (``vllm.general_plugins``: loaded in the API server, the
    engine core and every worker): start this process's trimmer when
    :data:`IDLE_ENV` asks for one and the C library has ``malloc_trim``; at most
    one per process. Returns the thread started, or ``None``."""
    global _started_in
    try:
        seconds = idle_seconds()
    except ValueError as error:
        _logger().warning("heap trim off: %s", error)
        return None
    trim = malloc_trim() if seconds > 0 else None
    if trim is None:
        return None
    with _start_lock:
        if _started_in == os.getpid():
            return None
        _started_in = os.getpid()
    trimmer = IdleTrimmer(seconds, trim)
    trimmer.start()
    _logger().info(
        "heap trim on (pid %d): freed heap returned after %g s idle "
        "(--em-inf-heap-trim 0 turns it off)",
        os.getpid(),
        seconds,
    )
    return trimmer
