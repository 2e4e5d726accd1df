"""Fused Triton kernels for EM-INF on ``[N, V]`` float32 logits, in place.

* :func:`em_inf_rows_`: the logits mode (Adam steps on entropy + KL), ``steps + 1``
  launches of a 2-D ``(rows, chunks)`` grid, no ``[N, V]`` scratch.
* :func:`adaptive_temperature_rows_`: the temperature mode (entropy-target solver),
  one launch, one program per row.

Both read per-row parameters through ``row_slot`` (vLLM's ``expanded_idx_mapping``;
``-1`` = leave the row alone) from per-slot ``[S]`` tensors, and optionally add
what they did to one mode's int64 ``[counters.WIDTH]`` counters (``stats``, layout
in :mod:`em_inf.counters`: rows, work, restored, entropy before / after as sums
and histograms) with device atomics, no host sync. Importing this package
imports Triton; :mod:`em_inf.functional` does so lazily. For CPU tensors set
``TRITON_INTERPRET=1`` before the first import.
"""

from em_inf.kernels.logits_mode import em_inf_rows_
from em_inf.kernels.temperature_mode import adaptive_temperature_rows_

__all__ = ["adaptive_temperature_rows_", "em_inf_rows_"]
