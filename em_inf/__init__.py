"""EM-INF for vLLM: inference-time entropy minimization as a batched logits processor.

Import-light on purpose: vLLM's front-end imports this module (with CUDA hidden) to
validate requests, so nothing here touches a device.
"""

from em_inf.config import PRESETS, EMInfConfig

__version__ = "0.1.0"
__all__ = ["EMInf", "EMInfConfig", "PRESETS", "__version__"]
