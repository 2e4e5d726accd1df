"""Host-side helpers shared by the EM-INF kernels: argument checks and launch shapes.

Nothing here touches a device at import time; the device's SM count is read (and
cached) the first time a CUDA launch is planned.
"""

from __future__ import annotations

import functools

import torch

#: Programs we aim to launch per pass: about four per SM of a 132-SM H100, so that
#: even batch 1 spreads one row over the whole card (see :func:`plan_chunks`).
_TARGET_PROGRAMS_PER_SM = 4
# CPU tensors run under TRITON_INTERPRET=1, whose cost is per program: one
# stand-in "SM" makes the plan favour the largest block.
_CPU_SMS = 1


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
def plan_chunks(n_rows: int, n_cols: int, device: torch.device) -> tuple[int, int]:
    """``(BLOCK, num_warps)``: how many logits of a row one program holds.

    Every pass is a 2-D grid ``(rows, ceil(V / BLOCK))``. Large blocks cut the
    per-program overhead (the chunk partials every program re-reads, see
    :mod:`em_inf.kernels.logits_mode`); small blocks keep the card busy at small
    batch. We take the largest block in 4096 / 2048 / 1024 that still gives
    ``_TARGET_PROGRAMS_PER_SM`` programs per SM, e.g. on an H100 (132 SMs) with
    V = 151,936: B = 1 -> 1024 (149 programs), B = 8 -> 2048 (600), B >= 15 ->
    4096 (38 per row). Compiled for sm_90 (ptxas of Triton 3.9), the last pass
    holds z, m, v and lam p0 in registers: 127 registers per thread at 4096 / 8
    warps (two programs per SM), 74 at 2048 / 8 warps, 72 at 1024 / 4 warps, no
    spills. ``bench/gpu_check.py`` times the three sizes to check this choice.
    Cached: the decode loop asks for the same few shapes every step.
    """
    wanted = _TARGET_PROGRAMS_PER_SM * sm_count(device)
    block = 1024
    for candidate in (4096, 2048):
        if n_rows * -(-n_cols // candidate) >= wanted:
            block = candidate
            break
    block = min(block, max(128, next_power_of_2(n_cols)))
    return block, warps_for(block)


def warps_for(block: int) -> int:
    """Warps per program: 8 to 16 values per thread for the register-held chunk."""
    return 16 if block >= 8192 else 8 if block >= 2048 else 4


def check_block(block: int) -> tuple[int, int]:
    """A caller's ``block`` override, validated, with its ``num_warps``."""
    if (
        isinstance(block, bool)
        or not isinstance(block, int)
        or block < 128
        or block > 8192
        or block & (block - 1)
    ):
        raise ValueError(f"block must be a power of two in [128, 8192], got {block!r}")
    return block, warps_for(block)


def check_logits(logits: torch.Tensor) -> None:
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
        raise ValueError(
            f"logits must be a [N, V] tensor, got "
            f"{getattr(logits, 'shape', type(logits).__name__)}"
        )
    if logits.dtype != torch.float32:
        raise ValueError(
            f"logits must be float32 (modified in place), got {logits.dtype}"
        )
    if logits.shape[1] > 1 and logits.stride(1) != 1:
        raise ValueError(
            f"logits must be contiguous along the vocabulary, got strides "
            f"{tuple(logits.stride())}"
        )


def check_row_slot(row_slot: torch.Tensor, logits: torch.Tensor) -> None:
    if not isinstance(row_slot, torch.Tensor) or row_slot.shape != (logits.shape[0],):
        raise ValueError(
            f"row_slot must be a [N] = [{logits.shape[0]}] tensor, got "
            f"{getattr(row_slot, 'shape', type(row_slot).__name__)}"
        )
    if row_slot.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"row_slot must be int32 or int64, got {row_slot.dtype}")
    _check_device("row_slot", row_slot, logits)


def check_slot_param(
    name: str,
    value: torch.Tensor,
    logits: torch.Tensor,
    dtypes: tuple[torch.dtype, ...],
) -> None:
    if not isinstance(value, torch.Tensor) or value.dim() != 1:
        raise ValueError(
            f"{name} must be a per-slot [S] tensor, got "
            f"{getattr(value, 'shape', type(value).__name__)}"
        )
    if value.dtype not in dtypes:
        raise ValueError(
            f"{name} must have dtype in {[str(d) for d in dtypes]}, got {value.dtype}"
        )
    if value.stride(0) != 1 and value.numel() > 1:
        raise ValueError(f"{name} must be contiguous, got stride {value.stride(0)}")
    _check_device(name, value, logits)


def _check_device(name: str, value: torch.Tensor, logits: torch.Tensor) -> None:
    if value.device != logits.device:
        raise ValueError(
            f"{name} is on {value.device} but logits are on {logits.device}"
        )
