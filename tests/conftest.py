"""Shared fixtures: reproducible random inputs whose seed every failure report shows.

Before every test the global random generators (torch, numpy, ``random``) are seeded
from the test id, so a test that draws without a generator of its own draws the same
inputs on every run, and a failure report names the seed.

The Triton kernels' tests (``tests/test_kernels*.py``) need Triton's interpreter,
which is process-wide: a pytest process without ``TRITON_INTERPRET=1`` does not
import them and reports each module as skipped, with the command that runs them.
"""

from __future__ import annotations

import fnmatch
import os
import random
import zlib
from pathlib import Path

import numpy as np
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


class _KernelTestsElsewhere(pytest.Module):
    """A kernel test module seen without the interpreter: one skipped item."""

    def collect(self):
        yield _SkippedKernelTests.from_parent(self, name="interpreter_tests")


class _SkippedKernelTests(pytest.Item):
    def runtest(self) -> None:
        pytest.skip(
            f"the Triton kernels' tests run in their own process: {KERNEL_COMMAND}"
        )


def pytest_pycollect_makemodule(module_path: Path, parent: pytest.Collector):
    if (
        fnmatch.fnmatch(module_path.name, KERNEL_TESTS)
        and os.environ.get("TRITON_INTERPRET") != "1"
    ):
        return _KernelTestsElsewhere.from_parent(parent, path=module_path)
    return None
