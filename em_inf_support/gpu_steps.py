"""vLLM-like decoding steps through the processor's core, for ``bench/gpu_check.py``
(timing) and ``tests/test_gpu.py`` (correctness).

A step does what Model Runner V2 and the ``EMInf`` processor do, without vLLM:

* the harness (what vLLM does anyway, timed alone as the baseline): fresh logits
  in the float32 buffer (a device copy) and this step's row -> slot mapping
  uploaded from pinned memory without blocking, the way vLLM builds
  ``expanded_idx_mapping``;
* EM-INF: the step's admissions and removals written to the per-slot settings
  (``add_request`` / ``update_state``), sent to the device
  (``apply_staged_writes``: :meth:`em_inf.core.SlotSettings.flush`), then
  :func:`em_inf.core.apply_to_rows` with the host's request slots and the device
  mapping, the statistics counters and the CUDA-graph runner, and the statistics'
  once-per-step :meth:`em_inf.stats.EMInfStats.tick`.

Two workloads: ``logits`` (every row in the logits mode, preset ``default``: 3
steps, every row far above its threshold, one row per request: what the issue's
targets are stated for) and ``mixed`` (half the rows off, the rest in both modes,
every fourth request with two draft rows as under speculative decoding). Both
admit new requests into recycled slots and retire others at every step, and shuffle
the batch order.
"""

from __future__ import annotations

import dataclasses
import time

import numpy as np
import torch

from em_inf.config import PRESETS, EMInfConfig
from em_inf.core import SlotSettings, apply_to_rows
from em_inf.staging import HostToDevice
from em_inf.stats import EMInfStats

LOGITS = PRESETS["default"]  # 3 steps, threshold 0.3
TEMPERATURE = PRESETS["adaptive-temperature"]


@dataclasses.dataclass
class Step:
    """One step's host-side data."""

    admitted: list[tuple[int, EMInfConfig | None]]  # (slot, settings) written now
    request_slots: np.ndarray  # int64 [R]
    row_slots: np.ndarray  # int64 [N]: the mapping vLLM uploads


def schedule(kind: str, rows: int, n_steps: int, seed: int) -> list[Step]:
    """``n_steps`` steps of ``rows`` logits rows each (``kind``: ``logits`` or
    ``mixed``). The first step admits every request."""
    rng = np.random.default_rng(seed)
    spec = kind == "mixed"
    # Requests and how many rows each owns (mixed: every 4th has 2 draft rows).
    widths = []
    while sum(widths) < rows:
        widths.append(3 if spec and len(widths) % 4 == 3 else 1)
    widths[-1] -= sum(widths) - rows
    n_requests = len(widths)
    free = list(range(n_requests, n_requests + max(2, n_requests // 4)))
    slots = list(range(n_requests))

    def settings(index: int) -> EMInfConfig | None:
        if not spec:
            return LOGITS
        # Request 0 in the temperature mode and 1 in the logits mode for good (both
        # modes every step); the others: half off, logits or temperature.
        if index in (0, 1):
            return (TEMPERATURE, LOGITS)[index]
        draw = rng.random()
        return None if draw < 0.5 else LOGITS if draw < 0.8 else TEMPERATURE

    steps = []
    admitted = [(slot, settings(i)) for i, slot in enumerate(slots)]
    for _ in range(n_steps):
        order = rng.permutation(n_requests)
        request_slots = np.asarray(slots, dtype=np.int64)[order]
        row_slots = np.repeat(request_slots, np.asarray(widths)[order])
        steps.append(Step(admitted, request_slots, row_slots))
        # Between steps: some requests finish, new ones take free slots.
        admitted = []
        for _ in range(max(1, n_requests // 16)):
            low = 2 if spec and n_requests > 2 else 0
            index = int(rng.integers(low, n_requests))
            finished = slots[index]
            slots[index] = free.pop(0)
            free.append(finished)
            admitted += [(finished, None), (slots[index], settings(index))]
    return steps


class Harness:
    """Device buffers of one workload, and the timed step loops.

    Args:
        source: float32 ``[N, V]`` logits every step starts from.
        steps: :func:`schedule`'s steps (cycled).
        runner: an ``em_inf.kernels.step.StepRunner``.
        stats_interval: seconds between statistics snapshots (their lines are
            kept in :attr:`lines`).
    """

    def __init__(
        self,
        source: torch.Tensor,
        steps: list[Step],
        runner,
        stats_interval: float = 1e9,
    ) -> None:
        self.lines: list[str] = []  # the statistics' log lines
        self.source = source
        self.logits = torch.empty_like(source)
        self.steps = steps
        self.runner = runner
        device = source.device
        n_rows = source.shape[0]
        # Two device mappings in turn: a new address every step, as in vLLM.
        self.mappings = [HostToDevice((n_rows,), torch.int64, device) for _ in "ab"]
        n_slots = 1 + max(int(s.request_slots.max()) for s in steps)
        n_slots = max(n_slots, max(slot for s in steps for slot, _ in s.admitted) + 1)
        self.settings = SlotSettings(n_slots, device)
        self.stats = EMInfStats(interval=stats_interval, log=self.lines.append)
        self.index = 0

    def harness_step(self) -> tuple[Step, torch.Tensor]:
        """What vLLM does anyway: fresh logits, this step's mapping uploaded. After
        the first step (which admits every request) the later ones cycle."""
        later = len(self.steps) - 1
        step = self.steps[0 if self.index == 0 else 1 + (self.index - 1) % later]
        mapping = self.mappings[self.index % 2]
        mapping.host()[:] = step.row_slots
        mapping.send()
        self.logits.copy_(self.source)
        self.index += 1
        return step, mapping.device_tensor

    def em_inf_step(self) -> None:
        step, mapping = self.harness_step()
        for slot, config in step.admitted:
            self.settings.set(slot, config)
        self.settings.flush()
        apply_to_rows(
            self.logits,
            step.request_slots,
            self.settings,
            mapping,
            stats=self.stats,
            runner=self.runner,
        )
        self.stats.tick()

    def seconds_per_step(self, em_inf: bool, n_steps: int, warmup: int) -> float:
        """Host-inclusive wall time per step: ``n_steps`` back to back, then one
        synchronisation (the device's time counts where it is the bottleneck)."""
        step = self.em_inf_step if em_inf else self.harness_step
        self.index = 0  # from the first step, which admits every request
        for _ in range(max(1, warmup)):
            step()
        _synchronize(self.source.device)
        start = time.perf_counter()
        for _ in range(n_steps):
            step()
        _synchronize(self.source.device)
        return (time.perf_counter() - start) / n_steps


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
