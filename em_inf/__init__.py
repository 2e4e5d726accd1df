"""EM-INF for vLLM: inference-time entropy minimization as a batched logits processor.

Import-light on purpose: vLLM's front-end imports this module (with CUDA hidden) to
validate requests, so nothing here touches a device, and vLLM itself is imported only
when ``EMInf`` is first used.
"""

from typing import Any

from em_inf.config import PRESETS, EMInfConfig

__version__ = "0.1.0"
__all__ = ["EMInf", "EMInfConfig", "PRESETS", "__version__"]


def __getattr__(name: str) -> Any:
    if name == "EMInf":
        from em_inf.processor import EMInf

        return EMInf
    raise AttributeError(f"module 'em_inf' has no attribute {name!r}")
