"""One decoding step of the vLLM processor on the kernel path: every launch of both
modes, eagerly or replayed as a CUDA graph.

A step is ``n + 1`` launches of the logits-mode kernel (``n`` = the largest
``steps`` among the batch's logits-mode requests) and one of the temperature
kernel. Launched from Python, each costs the host several microseconds (argument
handling and the driver call), which at batch 1 is most of the step. So on CUDA
:class:`StepRunner` captures the whole sequence once per :class:`StepShape` (row
bucket, vocabulary, ``n``, whether the temperature kernel runs, block, slot dtype)
and replays it: one host-to-device copy of three integers and one graph launch per
step, whatever ``n``.

Device memory is taken once, while the engine starts (before vLLM sizes its KV
cache), when the runner is told the most rows and the vocabulary it will see: one
float32 scratch for the logits kernel's chunk partials, big enough for every shape
up to ``max_rows`` rows and :data:`~em_inf.config.MAX_STEPS` steps (with the slot
of the returned rows' partials and the per-row tickets the counting needs:
:func:`logits_mode.scratch_elements`), shared by every graph and direct launch
(they all run in order on one stream), plus the ``[3]`` launch tensor.
:meth:`StepRunner.device_bytes` reports it. A step beyond those bounds (a wider
batch, another vocabulary) allocates its own scratch, with one warning.

A graph fixes its kernels' arguments, but vLLM hands over new logits and a new
row -> slot mapping every step, with a varying row count. The captured kernels are
therefore *indirect*: they read the logits' address, the mapping's address and
the row count from a small device tensor (``launch``) that each step fills with a
non-blocking copy from pinned memory (:class:`em_inf.staging.HostToDevice`); the
grid covers a power-of-two bucket of rows and programs past the row count exit at
once. Everything else a graph touches is static: the per-slot tables (their
address is part of the key), the ``[2, counters.WIDTH]`` counters (ditto), and the
chunk partials, carved from the scratch per graph. Every count, the rows
included, is added on the device: under speculative decoding only the device
knows which rows a step has. No logits are copied in or out.

Without CUDA (Triton's interpreter) nothing can be captured; ``graphs=True`` then
runs, every step, exactly the indirect launch sequence a graph would replay, so
tests exercise buckets, padding rows and static buffers. Batches above
:data:`GRAPH_MAX_ROWS`, logits not contiguous, or ``EM_INF_CUDA_GRAPHS=0`` take the
direct launches (the GPU work there dwarfs the launches).

The first step of a new shape runs the sequence eagerly (compiling the kernels) and
then captures it; capturing does not synchronise the device.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

import torch

from em_inf import checks
from em_inf.backend import batch_invariant
from em_inf.config import MAX_STEPS
from em_inf.kernels import logits_mode, temperature_mode
from em_inf.kernels._common import plan_block
from em_inf.staging import HostToDevice

logger = logging.getLogger(__name__)

#: Largest row count replayed as a graph; buckets are the powers of two up to it.
GRAPH_MAX_ROWS = 512
#: Graphs kept (least recently used dropped first): shapes a deployment meets are
#: few (the buckets times the distinct ``steps`` of its requests).
MAX_GRAPHS = 64
#: ``EM_INF_CUDA_GRAPHS=0`` launches every step eagerly.
GRAPHS_ENV = "EM_INF_CUDA_GRAPHS"


def graphs_wanted(device: torch.device) -> bool:
    """Whether steps on ``device`` replay CUDA graphs: on CUDA, unless
    ``EM_INF_CUDA_GRAPHS=0``."""
    return device.type == "cuda" and os.environ.get(GRAPHS_ENV, "1") != "0"


def bucket_rows(n_rows: int) -> int | None:
    """The graph bucket of a batch of ``n_rows`` rows (the next power of two), or
    ``None`` above :data:`GRAPH_MAX_ROWS`."""
    if n_rows > GRAPH_MAX_ROWS:
        return None
    return 1 << max(0, (n_rows - 1).bit_length())


@dataclasses.dataclass(frozen=True)
class StepShape:
    """What one step's launch sequence (and its graph) depends on.

    Attributes:
        rows: rows of the grid (the batch, or its bucket).
        n_cols: vocabulary size ``V``.
        max_steps: logits-mode passes ``n`` (0: no logits-mode row).
        temperature: whether the temperature kernel runs.
        block: logits per program of the logits kernel (``plan_block``).
        slot_int64: whether the row -> slot mapping is int64 (else int32).
    """

    rows: int
    n_cols: int
    max_steps: int
    temperature: bool
    block: int
    slot_int64: bool

    def chunks(self) -> int:
        """Chunks per row of the logits kernel."""
        return -(-self.n_cols // self.block)

    def scratch_elements(self) -> int:
        """float32 elements of the logits kernel's scratch for this shape."""
        if self.max_steps == 0:
            return 0
        return logits_mode.scratch_elements(self.rows, self.max_steps, self.chunks())

    def partials(self, scratch: _Scratch) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The logits kernel's ``(partials, tickets)`` for this shape (``None``
        without it; :func:`logits_mode.scratch`), views of ``scratch``'s buffer
        where they fit."""
        if self.max_steps == 0:
            return None
        buffer = scratch.view(self.scratch_elements())
        return logits_mode.scratch(buffer, self.rows, self.max_steps, self.chunks())


class _Scratch:
    """One float32 buffer the logits kernel's partials are carved from (module
    docstring); made at start-up for the bounds given, grown never."""

    def __init__(self, device: torch.device, elements: int) -> None:
        self.device = device
        self.buffer = torch.empty(elements, dtype=torch.float32, device=device)
        self._warned = False

    def view(self, elements: int) -> torch.Tensor:
        if elements <= self.buffer.numel():
            return self.buffer[:elements]
        if not self._warned:
            self._warned = True
            logger.warning(
                "EM-INF: a step needs %d bytes of scratch beyond the %d reserved "
                "at start-up; allocating it now",
                4 * elements,
                4 * self.buffer.numel(),
            )
        return torch.empty(elements, dtype=torch.float32, device=self.device)


def launch_step(
    shape: StepShape,
    row_stride: int,
    target: tuple[torch.Tensor, torch.Tensor] | torch.Tensor,
    tables: Any,
    stats: torch.Tensor | None,
    partials: tuple[torch.Tensor, torch.Tensor] | None,
) -> None:
    """Every launch of one step, in order: the logits-mode passes, then the
    temperature kernel. The kernels tell the modes apart by the tables: a slot
    outside the logits mode has ``steps == 0``, one outside the temperature mode
    ``temperature_threshold == +inf``.

    Args:
        target: ``(logits, row_slot)``, or the int64 ``[3]`` launch tensor of an
            indirect (graph) sequence (see :func:`logits_mode.launch_passes`).
        tables: per-slot device tensors ``threshold, kl_weight, lr, steps,
            temperature_threshold, alpha, t_min, t_max`` (``em_inf.core.SlotTables``).
        stats: int64 ``[2, counters.WIDTH]`` counters, row 0 the logits mode's,
            row 1 the temperature mode's (layout: :mod:`em_inf.counters`; each
            row contiguous), or ``None``: nothing counted.
        partials: the logits kernel's ``(partials, tickets)``
            (:meth:`StepShape.partials`), or ``None`` without logits-mode passes.
    """
    if shape.max_steps:
        part, tickets = partials
        logits_mode.launch_passes(
            shape.rows,
            shape.n_cols,
            row_stride,
            target,
            tables.threshold,
            tables.kl_weight,
            tables.lr,
            tables.steps,
            part,
            shape.max_steps,
            shape.block,
            None if stats is None else stats[0],
            tickets,
            slot_int64=shape.slot_int64,
        )
    if shape.temperature:
        temperature_mode.launch_rows(
            shape.rows,
            shape.n_cols,
            row_stride,
            target,
            tables.temperature_threshold,
            tables.alpha,
            tables.t_min,
            tables.t_max,
            None if stats is None else stats[1],
            slot_int64=shape.slot_int64,
        )


class _Replay:
    """One shape's static buffers and, on CUDA, its captured graph."""

    def __init__(self, shape: StepShape, scratch: _Scratch) -> None:
        self.shape = shape
        self.partials = shape.partials(scratch)
        self.graph: torch.cuda.CUDAGraph | None = None


class StepRunner:
    """Runs the processor's steps on one device: eager launches, or replays of one
    CUDA graph per :class:`StepShape` (see the module docstring).

    Args:
        device: the logits' device.
        graphs: replay graphs (on CUDA), or run the indirect sequence a graph would
            replay (elsewhere: for tests); ``False``: direct launches only.
        max_rows: the most logits rows a step will have (vLLM: ``max_num_seqs``
            times one plus the speculative tokens), and
        n_cols: the logits' width: with both, the scratch for every step is
            reserved now (module docstring); without, each shape allocates its own.

    The block plan follows :func:`em_inf.backend.batch_invariant` as it is when the
    runner is made.
    """

    def __init__(
        self,
        device: torch.device,
        *,
        graphs: bool,
        max_rows: int | None = None,
        n_cols: int | None = None,
    ) -> None:
        self.device = torch.device(device)
        self.graphs = graphs
        self._cuda = self.device.type == "cuda"
        #: The batch-invariant block plan (read once: vLLM's mode is per engine).
        self.invariant = batch_invariant()
        self._launch = HostToDevice((3,), torch.int64, self.device)
        elements = 0
        if max_rows is not None and n_cols is not None:
            elements = self.scratch_elements(max_rows, n_cols)
        self._scratch = _Scratch(self.device, elements)
        self._replays: collections.OrderedDict[tuple, _Replay] = (
            collections.OrderedDict()
        )

    def run(
        self,
        logits: torch.Tensor,
        row_slot: torch.Tensor,
        max_steps: int,
        temperature: bool,
        tables: Any,
        stats: torch.Tensor | None,
    ) -> None:
        """One step in place on ``logits`` (float32 ``[N, V]``); ``row_slot``
        (int32/int64 ``[N]``) on the same device; ``max_steps`` / ``temperature``
        as in :class:`StepShape`; ``tables`` as in :func:`launch_step`; ``stats``:
        the int64 ``[2, counters.WIDTH]`` counters on the logits' device (row 0
        logits mode, row 1 temperature mode; :mod:`em_inf.counters`) that the
        kernels add this step's rows to, or ``None``."""
        checks.stats(stats, logits, both_modes=True)
        n_rows, n_cols = logits.shape
        bucket = bucket_rows(n_rows) if self.graphs else None
        if bucket is None or n_rows == 0 or logits.stride(0) != n_cols:
            shape = self._shape(n_rows, n_cols, max_steps, temperature, row_slot)
            partials = shape.partials(self._scratch)
            launch_step(
                shape, logits.stride(0), (logits, row_slot), tables, stats, partials
            )
            return
        # Everything the sequence depends on, cheap to hash (this runs every step).
        key = (bucket, n_cols, max_steps, temperature, row_slot.dtype)
        key += (tables.threshold.data_ptr(), 0 if stats is None else stats.data_ptr())
        launch = self._launch.host()
        launch[:] = (logits.data_ptr(), row_slot.data_ptr(), n_rows)
        self._launch.send()
        replay = self._replays.get(key)
        if replay is not None and replay.graph is not None:
            self._replays.move_to_end(key)
            replay.graph.replay()
            return
        if replay is None:
            shape = self._shape(bucket, n_cols, max_steps, temperature, row_slot)
            replay = self._remember(key, _Replay(shape, self._scratch))
        launch_step(
            replay.shape,
            n_cols,
            self._launch.device_tensor,
            tables,
            stats,
            replay.partials,
        )
        if self._cuda:
            replay.graph = self._capture(replay, tables, stats)

    def warm_up(
        self,
        max_rows: int,
        n_cols: int,
        steps: int,
        tables: Any,
        stats: torch.Tensor | None,
    ) -> list[StepShape]:
        """Run now, on zero logits, the steps that requests of ``steps`` Adam steps
        will take, so that the kernels' compilation and the graphs' capture happen
        while the engine starts, not in the first requests: the logits mode alone,
        with the temperature mode, and the temperature mode alone, at every row
        count :meth:`warm_up_rows` lists. ``tables``, ``stats`` as in :meth:`run`
        (the counters are restored afterwards: nothing is counted). Returns the
        shapes run."""
        sizes = self.warm_up_rows(max_rows, n_cols)
        top = max(sizes)
        logits = torch.zeros((top, n_cols), dtype=torch.float32, device=self.device)
        row_slot = torch.zeros(top, dtype=torch.int64, device=self.device)
        saved = None if stats is None else stats.clone()
        shapes = []
        for rows in sizes:
            for max_steps, temperature in ((steps, False), (steps, True), (0, True)):
                self.run(
                    logits[:rows],
                    row_slot[:rows],
                    max_steps,
                    temperature,
                    tables,
                    stats,
                )
                shapes.append(
                    self._shape(rows, n_cols, max_steps, temperature, row_slot)
                )
        if stats is not None:
            stats.copy_(saved)
        return shapes

    def warm_up_rows(self, max_rows: int, n_cols: int) -> list[int]:
        """The row counts :meth:`warm_up` runs: every graph bucket up to
        ``max_rows``; past the largest bucket, or without graphs, the smallest
        row count of each block plan (:func:`plan_block`: the kernels' compiled
        variants follow it) and ``max_rows`` itself."""
        sizes: list[int] = []
        if self.graphs:
            top = bucket_rows(min(max_rows, GRAPH_MAX_ROWS))
            sizes = [1 << power for power in range(top.bit_length())]
        if not self.graphs or max_rows > GRAPH_MAX_ROWS:
            low = GRAPH_MAX_ROWS + 1 if self.graphs else 1
            blocks: dict[int, int] = {}
            for rows in range(low, max_rows + 1):
                block = plan_block(rows, n_cols, self.device, self.invariant)
                blocks.setdefault(block, rows)
            sizes += sorted({*blocks.values(), max_rows})
        return sizes

    def scratch_elements(self, max_rows: int, n_cols: int) -> int:
        """float32 elements of scratch that every step of at most ``max_rows`` rows
        (graphed ones rounded up to their bucket) and ``n_cols`` logits needs, at
        :data:`MAX_STEPS` steps: the largest
        :func:`logits_mode.scratch_elements` (``rows x (steps + 1) x 3 x chunks``
        partials, the last slot for counting the returned rows' entropy, plus one
        ticket per row) over the row counts, since the block plan (hence the
        chunks) follows the rows."""
        top = max_rows
        if self.graphs and bucket_rows(max_rows) is not None:
            top = bucket_rows(max_rows)
        largest = 0
        for rows in range(1, top + 1):
            block = plan_block(rows, n_cols, self.device, self.invariant)
            chunks = -(-n_cols // block)
            largest = max(
                largest, logits_mode.scratch_elements(rows, MAX_STEPS, chunks)
            )
        return largest

    def device_bytes(self) -> int:
        """Device memory this runner holds: the float32 scratch
        (:meth:`scratch_elements`: partials and tickets) and the int64 ``[3]``
        launch tensor."""
        return 4 * self._scratch.buffer.numel() + 8 * 3

    def _shape(
        self,
        rows: int,
        n_cols: int,
        max_steps: int,
        temperature: bool,
        row_slot: torch.Tensor,
    ) -> StepShape:
        block = (
            plan_block(rows, n_cols, self.device, batch_invariant()) if max_steps else 0
        )
        return StepShape(
            rows, n_cols, max_steps, temperature, block, row_slot.dtype == torch.int64
        )

    def _remember(self, key: tuple, replay: _Replay) -> _Replay:
        self._replays[key] = replay
        while len(self._replays) > MAX_GRAPHS:
            self._replays.popitem(last=False)
        return replay

    def _capture(
        self, replay: _Replay, tables: Any, stats: torch.Tensor | None
    ) -> torch.cuda.CUDAGraph | None:
        """Capture ``replay``'s launch sequence (kernels already compiled by the
        eager run before); on failure log once and stay eager for good."""
        graph = torch.cuda.CUDAGraph()
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        try:
            with torch.cuda.stream(side):
                graph.capture_begin(capture_error_mode="thread_local")
                try:
                    launch_step(
                        replay.shape,
                        replay.shape.n_cols,
                        self._launch.device_tensor,
                        tables,
                        stats,
                        replay.partials,
                    )
                finally:
                    graph.capture_end()
        except RuntimeError as error:
            logger.warning(
                "EM-INF: capturing a CUDA graph failed (%s); launching eagerly", error
            )
            self.graphs = False
            return None
        torch.cuda.current_stream(self.device).wait_stream(side)
        return graph
