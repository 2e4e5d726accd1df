"""Freed heap returned to the system at idle (em_inf/heap_trim.py).

* ``malloc_trim`` really returns memory: a child process frees 192 MiB of small
  blocks below one it keeps (so glibc cannot shrink the heap's top by itself), its
  resident set stays up, and drops by at least 90% of the freed bytes after the
  call.
* :class:`IdleWatch` against a reference that reads the same polls as runs of idle
  intervals: one trim per idle run, on the poll where the run reaches ``idle_s``.
* The plugin entry point: nothing without the variable, one trimmer per process
  with it, a warning (not a crash inside vLLM's plugin loader) for a bad value.
* ``em-inf serve --em-inf-heap-trim``: refuses a bad value before any engine
  starts. tests/test_serve_start.py checks a real server's processes.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from em_inf.heap_trim import (
    BUSY_CPU_SHARE,
    IDLE_ENV,
    IdleWatch,
    idle_seconds,
    malloc_trim,
    parse_seconds,
)

pytestmark = pytest.mark.skipif(malloc_trim() is None, reason="needs glibc")

FREED_MIB = 192

CHILD_FREES_BELOW_A_KEPT_BLOCK = textwrap.dedent(
    f"""
    import ctypes, json
    from em_inf.heap_trim import malloc_trim, resident_bytes

    libc = ctypes.CDLL(None)
    libc.malloc.restype = ctypes.c_void_p
    libc.malloc.argtypes = [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    libc.memset.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_size_t]
    block = 4096
    blocks = []
    for _ in range({FREED_MIB} * 2**20 // block):
        pointer = libc.malloc(block)
        libc.memset(pointer, 1, block)  # touched: resident
        blocks.append(pointer)
    kept = libc.malloc(block)  # above the others: the heap's top stays in use
    libc.memset(kept, 1, block)
    for pointer in blocks:
        libc.free(pointer)
    del blocks
    freed = resident_bytes()
    answer = malloc_trim()()
    print(json.dumps({{"freed": freed, "trimmed": resident_bytes(), "answer": answer}}))
    """
)


def test_malloc_trim_returns_freed_blocks_that_free_keeps():
    done = subprocess.run(
        [sys.executable, "-c", CHILD_FREES_BELOW_A_KEPT_BLOCK],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    import json

    reading = json.loads(done.stdout.strip().splitlines()[-1])
    returned_mib = (reading["freed"] - reading["trimmed"]) / 2**20
    assert reading["answer"] == 1, reading
    assert returned_mib >= 0.9 * FREED_MIB, reading


def trims_by_runs(polls: list[tuple[float, float]], idle_s: float) -> list[int]:
    """Reference: the indices of ``polls`` on which a trim is due, found by cutting
    the polls into runs of idle intervals."""
    due, run_wall, fired = [], 0.0, False
    for index, (cpu, wall) in enumerate(polls):
        idle = wall > 0 and cpu <= BUSY_CPU_SHARE * wall
        if not idle:
            run_wall, fired = 0.0, False
            continue
        run_wall += wall
        if run_wall >= idle_s and not fired:
            due.append(index)
            fired = True
    return due


POLL = st.tuples(
    st.sampled_from([0.0, 0.01, 0.05, 0.049, 0.051, 0.3, 1.0, 2.0]),
    st.sampled_from([0.0, 0.5, 1.0, 1.0, 1.0, 1.3]),
)


@settings(max_examples=300, deadline=None)
@given(
    polls=st.lists(POLL, max_size=60),
    idle_s=st.sampled_from([0.5, 1.0, 2.0, 5.0]),
)
def test_idle_watch_trims_once_per_idle_run(polls, idle_s):
    watch = IdleWatch(idle_s)
    got = [i for i, (cpu, wall) in enumerate(polls) if watch.observe(cpu, wall)]
    assert got == trims_by_runs(polls, idle_s), (polls, idle_s)


def test_idle_watch_on_a_server_day():
    """Start-up (busy), idle 10 s, a burst, idle 3 s (too short), a burst, idle 6 s:
    two trims, 5 s into each long idle stretch."""
    busy, idle = (0.8, 1.0), (0.0, 1.0)
    polls = [busy] * 4 + [idle] * 10 + [busy] * 2 + [idle] * 3 + [busy] + [idle] * 6
    watch = IdleWatch(5.0)
    got = [i for i, poll in enumerate(polls) if watch.observe(*poll)]
    assert got == [4 + 4, 4 + 10 + 2 + 3 + 1 + 4]


@pytest.mark.parametrize("text", ["-1", "nan", "inf", "five", ""])
def test_bad_seconds_are_refused_with_the_variable_named(text):
    with pytest.raises(ValueError, match="seconds >= 0"):
        parse_seconds(text)
    if text:
        with pytest.raises(ValueError, match=IDLE_ENV):
            idle_seconds({IDLE_ENV: text})


def test_seconds_accepted():
    assert idle_seconds({}) == 0.0
    assert idle_seconds({IDLE_ENV: " 0 "}) == 0.0
    assert idle_seconds({IDLE_ENV: "2.5"}) == 2.5


CHILD_STARTS_TRIMMERS = textwrap.dedent(
    """
    import logging, threading
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from em_inf.heap_trim import start_from_environment
    first = start_from_environment()
    second = start_from_environment()
    names = [t.name for t in threading.enumerate()]
    print(first is not None, second is not None, names.count("em-inf-heap-trim"))
    """
)


@pytest.mark.parametrize(
    ("value", "expected", "logged"),
    [
        (None, "False False 0", ""),
        ("0", "False False 0", ""),
        ("5", "True False 1", "heap trim on"),
        ("soon", "False False 0", "heap trim off: EM_INF_HEAP_TRIM_IDLE_S"),
    ],
)
def test_plugin_starts_one_trimmer_when_asked(value, expected, logged):
    import os

    env = {k: v for k, v in os.environ.items() if k != IDLE_ENV}
    if value is not None:
        env[IDLE_ENV] = value
    done = subprocess.run(
        [sys.executable, "-c", CHILD_STARTS_TRIMMERS],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    assert done.stdout.strip() == expected, done
    assert logged in done.stderr and (logged or not done.stderr.strip()), done.stderr


def test_serve_refuses_a_bad_value_before_starting():
    import os

    env = dict(os.environ, **{IDLE_ENV: "-3"})
    done = subprocess.run(
        [sys.executable, "-m", "em_inf.cli", "serve", "--port", "1"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert done.returncode == 2, done
    assert f"em-inf serve: error: {IDLE_ENV}: expected a number of seconds >= 0" in (
        done.stderr
    )
    flag = subprocess.run(
        [sys.executable, "-m", "em_inf.cli", "serve", "--em-inf-heap-trim", "-3"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert flag.returncode == 2, flag
    assert "--em-inf-heap-trim: expected a number of seconds >= 0" in flag.stderr
