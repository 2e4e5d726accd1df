"""Which implementation runs a batch: the Triton kernels or the PyTorch path.

:mod:`em_inf.functional` and :mod:`em_inf.core` both ask :func:`backend_for`, so a
direct call and the vLLM processor always take the same path for the same tensors.
"""

from __future__ import annotations

import importlib.util
import os

import torch

#: Environment variable that forces a backend: ``triton``, ``torch`` or ``auto``.
BACKEND_ENV = "EM_INF_BACKEND"
BACKENDS: tuple[str, ...] = ("auto", "triton", "torch")


def backend_for(device: torch.device | str) -> str:
    """``"triton"`` or ``"torch"``: the backend a call on ``device`` takes now.

    ``EM_INF_BACKEND`` (read at every call) decides when set to ``triton`` or
    ``torch``; otherwise (``auto`` or unset) CUDA takes Triton when it is installed,
    everything else torch.

    Raises:
        ValueError: on an unknown ``EM_INF_BACKEND``, or ``triton`` forced on CPU
            tensors without ``TRITON_INTERPRET=1``.
    """
    device = torch.device(device)
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV} must be one of {list(BACKENDS)}, got {choice!r}"
        )
    if choice == "auto":
        has_triton = importlib.util.find_spec("triton") is not None
        return "triton" if device.type == "cuda" and has_triton else "torch"
    if choice == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            raise ValueError(
                f"{BACKEND_ENV}=triton on {device.type} tensors needs Triton's "
                f"interpreter: set TRITON_INTERPRET=1 before em_inf.kernels is imported"
            )
    return choice


#: Environment variables that ask for bitwise batch invariance: em-inf's own switch
#: for the functional API, and vLLM's batch-invariant mode.
BATCH_INVARIANT_ENVS: tuple[str, ...] = (
    "EM_INF_BATCH_INVARIANT",
    "VLLM_BATCH_INVARIANT",
)


def batch_invariant() -> bool:
    """Whether every row's result must be bitwise independent of the rest of its
    batch (read at every call): ``EM_INF_BATCH_INVARIANT=1`` or vLLM's
    ``VLLM_BATCH_INVARIANT=1``. Paths that are invariant anyway ignore it; paths
    whose fast plan depends on the batch size switch to a fixed plan."""
    return any(
        os.environ.get(name, "0").strip().lower() in ("1", "true", "on", "yes")
        for name in BATCH_INVARIANT_ENVS
    )
