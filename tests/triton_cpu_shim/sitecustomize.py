"""Lets vLLM's CPU platform take Triton's interpreter for a CPU backend (tests only).

vLLM runs Model Runner V2 only where Triton works. On a CPU build it looks for a
``"cpu"`` entry in ``triton.backends.backends`` (triton-cpu's), which PyPI's Triton
lacks, although the interpreter (``TRITON_INTERPRET=1``) runs every kernel vLLM's V2
runner launches. With this directory on ``PYTHONPATH`` and ``TRITON_INTERPRET=1`` in
the environment before Python starts, every process (vLLM spawns its engine core
and workers) gets a stand-in ``"cpu"`` entry whose driver is never active, so
Triton's own driver choice is unchanged. Never installed with em-inf: the test
suite's runs on Model Runner V2 and on newer vLLM releases put it on the path.
"""

import os


class _InactiveDriver:
    """A driver that never claims a device."""

    @staticmethod
    def is_active() -> bool:
        return False


def _add_cpu_backend() -> None:
    try:
        from triton.backends import Backend, backends
    except ImportError:
        return
    backends.setdefault("cpu", Backend(compiler=None, driver=_InactiveDriver))


if os.environ.get("TRITON_INTERPRET") == "1":
    _add_cpu_backend()
