"""Host-side helpers shared by the EM-INF kernels: launch plans (argument checks:
:mod:`em_inf.checks`).

Nothing here touches a device at import time; the device's SM count is read (and
cached) the first time a CUDA launch is planned.
"""

from __future__ import annotations

import functools

import torch

#: Programs we aim to launch per pass: about four per SM, so that even batch 1
#: spreads one row over the whole card (see :func:`plan_block`).
_TARGET_PROGRAMS_PER_SM = 4
# CPU tensors run under TRITON_INTERPRET=1, whose cost is per program: one
# stand-in "SM" makes the plan favour the largest block.
_CPU_SMS = 1
#: Block sizes the logits kernel's plan chooses from, largest first.
_BLOCKS = (4096, 2048, 1024)
#: The block of the batch-invariant plan (``em_inf.backend.batch_invariant()``): a
#: function of the vocabulary alone. 2048 sits between the small-batch choice (1024
#: spreads a row over more SMs) and the large-batch one (4096 halves the chunk
#: partials every program combines); bench/README.md ("GPU") gives its cost.
INVARIANT_BLOCK = 2048


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Number of SMs of ``device`` (a fixed stand-in for CPU tensors)."""
    if device.type != "cuda":
        return _CPU_SMS
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _sm_count(index)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


@functools.lru_cache(maxsize=4096)
def plan_block(
    n_rows: int, n_cols: int, device: torch.device, invariant: bool = False
) -> int:
    """Logits per program (``BLOCK``) of the logits kernel's 2-D ``(rows, chunks)``
    grid.

    Large blocks cut the per-program overhead (every program combines its row's
    chunk partials once per replayed step, see :mod:`em_inf.kernels.logits_mode`);
    small blocks keep the card busy at small batch. The fast plan takes the largest
    block in 4096 / 2048 / 1024 that still gives ``_TARGET_PROGRAMS_PER_SM``
    programs per SM: on a 132-SM card with V = 151,936, B = 1 -> 1024 (149
    programs), B = 8 -> 2048 (600), B >= 15 -> 4096 (38 per row). That choice
    depends on ``n_rows``, so a row's reduction order (and bits) would depend on
    its batch: ``invariant=True`` takes :data:`INVARIANT_BLOCK` whatever the batch.
    Either way the block never exceeds the row (rounded up to a power of two, at
    least 128). Cached: the decode loop asks for the same few shapes every step.
    """
    block = _BLOCKS[-1]
    if invariant:
        block = INVARIANT_BLOCK
    else:
        wanted = _TARGET_PROGRAMS_PER_SM * sm_count(device)
        for candidate in _BLOCKS[:-1]:
            if n_rows * -(-n_cols // candidate) >= wanted:
                block = candidate
                break
    return min(block, max(128, next_power_of_2(n_cols)))


def warps_for_held_chunk(block: int) -> int:
    """Warps per program of the logits kernel, which holds its whole ``block`` chunk
    in registers through the Adam replay: 8 to 16 values per thread."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def check_block(block: int) -> int:
    """A tuning ``block`` (bench and tests), validated."""
    if (
        isinstance(block, bool)
        or not isinstance(block, int)
        or block < 128
        or block > 8192
        or block & (block - 1)
    ):
        raise ValueError(f"block must be a power of two in [128, 8192], got {block!r}")
    return block
