"""Shared fixtures: reproducible random inputs whose seed every failure report shows."""

from __future__ import annotations

import zlib

import pytest
import torch


@pytest.fixture
def seed(request: pytest.FixtureRequest) -> int:
    """A seed derived from the test id: a rerun draws the same inputs, and a failing
    test's report carries a ``seed`` section naming it."""
    value = zlib.crc32(request.node.nodeid.encode())
    request.node.user_properties.append(("seed", value))
    return value


@pytest.fixture
def generator(seed: int) -> torch.Generator:
    """A CPU ``torch.Generator`` seeded with :func:`seed`."""
    return torch.Generator().manual_seed(seed)


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
