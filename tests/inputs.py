"""Random test inputs. Every draw comes from the global torch RNG unless a generator
is passed; ``tests/conftest.py`` seeds it from the test id before each test, and a
failing test's report names that seed."""

from __future__ import annotations

import torch


def random_logits(
    rows: int,
    vocab: int,
    *,
    scale: float = 3.0,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Fresh float32 ``[rows, vocab]`` logits: Gaussian with one boosted token per
    row (a heavy tail of confident rows), so thresholds split the batch."""
    logits = torch.randn(rows, vocab, generator=generator) * scale
    peaks = torch.randint(0, vocab, (rows,), generator=generator)
    boost = torch.rand(rows, generator=generator) * 4 * scale
    logits[torch.arange(rows), peaks] += boost
    return logits


def mask_randomly(
    logits: torch.Tensor,
    fraction: float,
    *,
    generator: torch.Generator | None = None,
    value: float = -torch.inf,
) -> torch.Tensor:
    """``logits`` (float32 ``[B, V]``, any device) with about ``fraction`` of each
    row set to ``value`` (``-inf``, or e.g. ``finfo.min``: another form of mask);
    entry 0 of every row stays as it was. The draw is made on the CPU."""
    mask = torch.rand(logits.shape, generator=generator) < fraction
    mask[:, 0] = False
    return logits.masked_fill(mask.to(logits.device), value)
