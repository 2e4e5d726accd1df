"""Which implementation runs a batch: the Triton kernels, the compiled CPU kernels or
the eager PyTorch path.

:mod:`em_inf.functional` and :mod:`em_inf.core` both ask :func:`backend_for`, so a
direct call and the vLLM processor always take the same path for the same tensors.
"""

from __future__ import annotations

import importlib.util
import os

import torch

from em_inf import cpu_backend

#: Environment variable that forces a backend: ``cpu`` (compiled CPU kernels),
#: ``torch`` (eager PyTorch), ``triton`` or ``auto``.
BACKEND_ENV = "EM_INF_BACKEND"
BACKENDS: tuple[str, ...] = ("auto", "cpu", "torch", "triton")


def backend_for(device: torch.device | str) -> str:
    """``"triton"``, ``"cpu"`` or ``"torch"``: the backend a call on ``device`` takes
    now.

    ``EM_INF_BACKEND`` (read at every call) decides when set to ``triton``, ``cpu``
    or ``torch``; otherwise (``auto`` or unset) CUDA takes Triton when it is
    installed, CPU tensors the compiled CPU kernels when they can be built (the
    first call builds them; where they cannot, one warning and ``torch``), anything
    else ``torch``.

    Raises:
        ValueError: on an unknown ``EM_INF_BACKEND``, ``triton`` forced on CPU
            tensors without ``TRITON_INTERPRET=1``, or ``cpu`` forced on other
            tensors or where the CPU kernels cannot be built.
    """
    if not isinstance(device, torch.device):
        device = torch.device(device)
    choice = os.environ.get(BACKEND_ENV, "auto").strip().lower() or "auto"
    if choice not in BACKENDS:
        raise ValueError(
            f"{BACKEND_ENV} must be one of {list(BACKENDS)}, got {choice!r}"
        )
    if choice == "auto":
        if device.type == "cuda":
            has_triton = importlib.util.find_spec("triton") is not None
            return "triton" if has_triton else "torch"
        return "cpu" if device.type == "cpu" and cpu_backend.available() else "torch"
    if choice == "triton" and device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET", "0") not in ("1", "true", "True"):
            raise ValueError(
                f"{BACKEND_ENV}=triton on {device.type} tensors needs Triton's "
                f"interpreter: set TRITON_INTERPRET=1 before em_inf.kernels is imported"
            )
    if choice == "cpu":
        if device.type != "cpu":
            raise ValueError(f"{BACKEND_ENV}=cpu on {device.type} tensors")
        if not cpu_backend.available():
            raise ValueError(
                f"{BACKEND_ENV}=cpu, but the compiled CPU kernels are unavailable: "
                f"{cpu_backend.unavailable_reason()}"
            )
    return choice


def prepare_backend(device: torch.device | str) -> str:
    """Choose the backend for ``device`` now and make it ready (compiling the CPU
    kernels when they will be used), so that no request pays for it; an engine
    calls this while it starts. Returns the backend's name."""
    return backend_for(device)


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
