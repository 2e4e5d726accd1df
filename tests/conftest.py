"""Shared fixtures: reproducible random inputs whose seed every failure report shows.

Before every test the global random generators (torch, numpy, ``random``) are seeded
from the test id, so a test that draws without a generator of its own draws the same
inputs on every run, and a failure report names the seed.

The Triton kernels' tests (``tests/test_kernels*.py``) need Triton's interpreter,
which is process-wide: a pytest process without ``TRITON_INTERPRET=1`` leaves them
out of a directory run and names the command that runs them in its terminal
summary; a kernel module named on the command line without it fails, naming it.

prometheus_client is imported here, before any test sets ``PROMETHEUS_MULTIPROC_DIR``
for the engines it starts: it picks its value class once, at import, and this
process's own series (EM-INF's, published by processors made in this process) must
not be left in multiprocess mode with no directory once a test unsets it again.
"""

from __future__ import annotations

import fnmatch
import os
import random
import zlib
from pathlib import Path

import numpy as np
import prometheus_client  # noqa: F401  (see the docstring)
import pytest
import torch


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed derived from the test id: a rerun draws the same inputs, and a failing
    test's report carries a ``seed`` section naming it."""
    value = zlib.crc32(request.node.nodeid.encode())
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture(autouse=True)
def seeded_global_generators(seed: int) -> None:
    """torch's, numpy's and ``random``'s global generators seeded with :func:`seed`."""
    torch.manual_seed(seed)
    np.random.seed(seed)
    random.seed(seed)


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`seed`."""
    return torch.Generator().manual_seed(seed)


@pytest.fixture
def poisoned_empty(monkeypatch: pytest.MonkeyPatch) -> None:
    """``torch.empty`` returning NaN-filled float tensors for the test's duration:
    a kernel that reads scratch it never wrote then shows NaN in its output."""
    real_empty = torch.empty

    def empty(*args, **kwargs):
        out = real_empty(*args, **kwargs)
        if out.is_floating_point():
            out.fill_(torch.nan)
        return out

    monkeypatch.setattr(torch, "empty", empty)


@pytest.fixture
def quiet_interpreter():
    """Triton's interpreter evaluates both sides of ``tl.where`` with numpy;
    underflow in ``exp`` is expected there. Anything else numpy flags fails."""
    with np.errstate(all="raise", under="ignore"):
        yield


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if report.failed:
        for name, value in item.user_properties:
            if name == "seed":
                report.sections.append(
                    ("seed", f"random inputs drawn from seed {value} (the test id)")
                )
    return report


KERNEL_TESTS = "test_kernels*.py"
KERNEL_COMMAND = "TRITON_INTERPRET=1 python -m pytest tests/test_kernels*.py"


def _interpreter_requested() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _named_on_the_command_line(path: Path, config: pytest.Config) -> bool:
    named = {Path(arg.split("::")[0]).resolve() for arg in config.args}
    return path.resolve() in named


def _in_a_directory_on_the_command_line(path: Path, config: pytest.Config) -> bool:
    for arg in config.args:
        named = Path(arg.split("::")[0]).resolve()
        if named.is_dir() and named in path.resolve().parents:
            return True
    return False


def pytest_ignore_collect(collection_path: Path, config: pytest.Config):
    """Without the interpreter a directory run leaves the kernel modules out (they
    would switch the interpreter on for every engine in the process); the terminal
    summary names the command that runs them. Named on the command line, they are
    collected and fail (:func:`pytest_pycollect_makemodule`)."""
    if (
        fnmatch.fnmatch(collection_path.name, KERNEL_TESTS)
        and not _interpreter_requested()
        and not _named_on_the_command_line(collection_path, config)
    ):
        if _in_a_directory_on_the_command_line(collection_path, config):
            config.stash[_KERNELS_LEFT_OUT] = True
        return True
    return None


_KERNELS_LEFT_OUT = pytest.StashKey[bool]()


class _KernelTestsNeedTheInterpreter(pytest.Module):
    """A kernel test module named without the interpreter: one failing item."""

    def collect(self):
        yield _KernelTestsWithoutInterpreter.from_parent(self, name="interpreter")


class _KernelTestsWithoutInterpreter(pytest.Item):
    def runtest(self) -> None:
        pytest.fail(
            f"{self.path.name} runs under Triton's interpreter, in a pytest process "
            f"of its own: {KERNEL_COMMAND}",
            pytrace=False,
        )


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    if fnmatch.fnmatch(module_path.name, KERNEL_TESTS) and not (
        _interpreter_requested()
    ):
        return _KernelTestsNeedTheInterpreter.from_parent(parent, path=module_path)
    return None


def pytest_terminal_summary(terminalreporter, exitstatus, config: pytest.Config):
    if config.stash.get(_KERNELS_LEFT_OUT, False):
        terminalreporter.write_line(
            f"The Triton kernels' tests (tests/{KERNEL_TESTS}) run in a process of "
            f"their own, not this one: {KERNEL_COMMAND}"
        )


@pytest.fixture
def compiled_cpu_kernels() -> None:
    """The compiled CPU kernels, which a machine with a C compiler (CI's) must
    build: where they do not, the test fails with the compiler's reason instead of
    being skipped."""
    from em_inf import cpu_backend

    if not cpu_backend.available():
        pytest.fail(
            f"compiled CPU kernels did not build: {cpu_backend.unavailable_reason()}",
            pytrace=False,
        )
