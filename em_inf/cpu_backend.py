"""EM-INF on CPU tensors through the compiled kernels of ``cpu_kernels.c``.

Both modes run in place, fused (logits mode: one update pass and one statistics pass
per Adam step; temperature mode: one pass per solver step), over the rows of a
float32 ``[N, V]`` tensor, in parallel over rows (or, for the rows left when there
are fewer rows than threads, over chunks of a row) with ``torch.get_num_threads()``
threads: the thread count vLLM's CPU worker gives torch. A row's result never depends
on the other rows, the batch size or the thread count (batch invariance): its
reductions run in a fixed order over chunks fixed by ``V``.

The library is compiled on first use (:func:`load`, about a second, then cached on
disk; see :mod:`em_inf.cpu_build`); :func:`em_inf.backend.prepare_backend` does that
while an engine starts. Where it cannot be built, :func:`available` is false and
callers use :mod:`em_inf.torch_backend`, after one warning. The same happens where
it does not match this module: :data:`PROTOTYPES` declares its entry points once,
and :func:`load` checks them against the prototypes the library exports (and its
stats layout against :mod:`em_inf.counters`) before any call, never per call.

The in-place entry points (``em_inf_``, ``adaptive_temperature_``) take the
arguments of :mod:`em_inf.torch_backend` (``[N, 1]`` or ``[N]`` parameter tensors)
plus ``rows``: an optional int64 index of the rows of ``logits`` to process
(parameter entry ``i`` belongs to row ``rows[i]``), so that a sub-batch is
processed where it lies, without a gather. ``em_inf`` and ``adaptive_temperature``
return a new tensor instead, read from the batch where it lies: the compiled path of
:mod:`em_inf.functional`, with its parameters as numbers or columns.

``stats``, when given, is one mode's counters (:mod:`em_inf.counters`): a
contiguous int64 ``[counters.WIDTH]`` CPU tensor the kernels add to, every column,
for the rows they process (logits mode: the rows with ``steps > 0``; temperature
mode: every row). The entropies before and after are computed in the passes EM-INF
runs anyway (the last Adam step accumulates the softmax statistics of the logits it
writes); with ``stats=None`` nothing is counted and no entropy after is computed.
"""

from __future__ import annotations

import contextlib
import ctypes
import itertools
import logging
import re
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from em_inf import checks, counters, cpu_build, reused_results
from em_inf.config import ADAM_BETAS, ADAM_EPS, TEMPERATURE_RTOL

logger = logging.getLogger(__name__)

CPU = torch.device("cpu")


class Scratch(NamedTuple):
    """The kernels' shared scratch: a uint8 tensor, with its address and size kept
    as numbers (a call that need not grow it makes no torch call for it)."""

    tensor: torch.Tensor
    address: int
    size: int

    @classmethod
    def of(cls, tensor: torch.Tensor) -> Scratch:
        """``tensor`` (uint8, contiguous) as the scratch."""
        return cls(tensor, tensor.data_ptr(), tensor.numel())


_lock = threading.Lock()  # one call at a time: they share the scratch buffer
_library: ctypes.CDLL | None = None
_failure: str | None = None
_scratch = Scratch.of(torch.empty(0, dtype=torch.uint8))
#: Each library's scratch bytes per (vocab, threads), asked once (a ctypes call).
_scratch_bytes: dict[tuple[ctypes.CDLL, int, int], int] = {}
#: The entropy bins' edges the kernels compare with (one source: counters.py).
_EDGES = torch.tensor(counters.ENTROPY_EDGES, dtype=torch.float64)
_EDGES_ADDRESS = _EDGES.data_ptr()

#: The kernels' entry points, declared once on this side, as ``cpu_kernels.c``
#: defines them (with the same argument names). :func:`load` checks each against the
#: text the library exports for it (:func:`check_interface`) and sets the function's
#: ctypes types from it; the calls below pass their arguments in this order.
PROTOTYPES = (
    "int64_t em_inf_scratch_bytes(int64_t vocab, int threads)",
    "void em_inf_logits(float *logits, const int64_t *index, int64_t rows, "
    "int64_t vocab, int64_t stride, const float *source, int64_t source_stride, "
    "const float *threshold, const float *kl_weight, const float *lr, "
    "const int64_t *steps, double beta1, double beta2, double eps, void *scratch, "
    "int64_t *stats, const double *edges, int n_edges, int64_t sample, int threads)",
    "void em_inf_temperature(float *logits, const int64_t *index, int64_t rows, "
    "int64_t vocab, int64_t stride, const float *source, int64_t source_stride, "
    "const float *threshold, const float *alpha, const float *t_min, "
    "const float *t_max, double rtol, float *inv_t, void *scratch, "
    "int64_t *stats, const double *edges, int n_edges, int threads)",
    "void em_inf_stats_layout(int n_edges, int64_t *out)",
    "void em_inf_exp_floor(const float *logits, int64_t rows, int64_t vocab, "
    "double *sums, int threads)",
    "void em_inf_exp(const float *x, float *out, int64_t n)",
    "int em_inf_lanes(void)",
)
#: ctypes' type for each C type the prototypes use (any pointer: ``c_void_p``,
#: given a tensor's ``data_ptr()`` or ``None``; return type ``void``: ``None``).
_CTYPES = {"int": ctypes.c_int, "int64_t": ctypes.c_int64, "double": ctypes.c_double}


class InterfaceError(RuntimeError):
    """The compiled kernels do not match what this module declares (their
    prototypes, or their stats layout); the message names the difference."""


@dataclass(frozen=True)
class Prototype:
    """One C function's prototype, normalised: types as tokens joined by spaces
    (``"const float *"``), ``arguments`` one ``(type, name)`` pair each."""

    returns: str
    name: str
    arguments: tuple[tuple[str, str], ...]

    @classmethod
    def parse(cls, text: str) -> Prototype:
        """Read ``"ret name(type arg, ...)"`` (or ``name(void)``); whitespace is
        free. Raises InterfaceError on anything else (arrays, function pointers,
        unnamed arguments)."""
        match = re.fullmatch(r"\s*([\w\s*]+)\(([\w\s*,]*)\)\s*", text)
        head = _tokens(match.group(1)) if match else []
        if len(head) < 2 or not head[-1].isidentifier():
            raise InterfaceError(f"cannot read the C prototype {text!r}")
        listed = match.group(2).strip()
        pieces = [] if listed in ("", "void") else listed.split(",")
        arguments = tuple(_argument(piece, text) for piece in pieces)
        return cls(" ".join(head[:-1]), head[-1], arguments)

    def bind(self, library: ctypes.CDLL) -> None:
        """Set ctypes' return and argument types of this function in ``library``."""
        function = getattr(library, self.name)
        function.restype = None if self.returns == "void" else _ctype(self.returns)
        function.argtypes = [_ctype(kind) for kind, _ in self.arguments]


def _tokens(text: str) -> list[str]:
    return re.findall(r"\w+|\*", text)


def _argument(piece: str, prototype: str) -> tuple[str, str]:
    """``"const float *x"`` -> ``("const float *", "x")``."""
    tokens = _tokens(piece)
    if len(tokens) < 2 or not tokens[-1].isidentifier():
        raise InterfaceError(f"an unnamed argument {piece!r} in {prototype!r}")
    return " ".join(tokens[:-1]), tokens[-1]


def _ctype(kind: str) -> type[ctypes._SimpleCData]:
    if kind.endswith("*"):
        return ctypes.c_void_p
    if kind not in _CTYPES:
        raise InterfaceError(f"no ctypes type for the C type {kind!r}")
    return _CTYPES[kind]


_DECLARED = tuple(Prototype.parse(text) for text in PROTOTYPES)


def load() -> ctypes.CDLL | None:
    """The compiled kernels, building them on the first call; ``None`` (after one
    warning per process) where they cannot be built or loaded."""
    global _library, _failure
    if _library is not None or _failure is not None:
        return _library
    with _lock:
        if _library is None and _failure is None:
            try:
                built = cpu_build.build()
                library = open_library(built.path)
            except (cpu_build.BuildError, InterfaceError, OSError) as err:
                _failure = str(err)
                logger.warning(
                    "em-inf: compiled CPU kernels unavailable (%s); using the "
                    "slower eager PyTorch path",
                    _failure,
                )
            else:
                _library = library
                logger.info(
                    "em-inf: CPU kernels %s in %.2f s (%s)",
                    "compiled" if built.compiled else "loaded from cache",
                    built.seconds,
                    built.path,
                )
    return _library


@contextlib.contextmanager
def kernels_from(library: ctypes.CDLL) -> Iterator[None]:
    """Within the block, this module's entry points run ``library`` (one
    :func:`open_library` returned) instead of the built kernels:
    ``bench/kernel_ab.py`` times two builds side by side in one process. Not for
    use while other threads call the kernels."""
    global _library
    previous = load()
    _library = library
    try:
        yield
    finally:
        _library = previous


def open_library(path: Path) -> ctypes.CDLL:
    """The library at ``path``, its interface checked and its ctypes types set."""
    library = ctypes.CDLL(str(path))
    check_interface(library, _DECLARED)
    for prototype in _DECLARED:
        prototype.bind(library)
    _check_layout(library)
    return library


def check_interface(library: ctypes.CDLL, declared: tuple[Prototype, ...]) -> None:
    """Raise InterfaceError unless ``library`` defines every ``declared`` entry point
    (:func:`load` passes :data:`PROTOTYPES`, read) with the same prototype: return
    type, then each argument's type and name in order (so a swapped pair of
    same-typed arguments counts). The message names the function, the argument and
    its type on each side."""
    for ours in declared:
        theirs = _exported(library, ours.name)
        difference = _difference(ours, theirs)
        if difference:
            raise InterfaceError(
                f"{ours.name} does not match its declaration in cpu_backend.py: "
                f"{difference}"
            )


def _exported(library: ctypes.CDLL, name: str) -> Prototype:
    """The prototype ``library`` exports for ``name`` (its ENTRY_POINT text)."""
    try:
        text = ctypes.c_char_p.in_dll(library, f"{name}_prototype").value
    except ValueError:
        raise InterfaceError(
            f"cpu_kernels.c exports no prototype for {name} (not an ENTRY_POINT?)"
        ) from None
    return Prototype.parse(text.decode())


def _difference(ours: Prototype, theirs: Prototype) -> str | None:
    """The first difference between two prototypes, in words; None when equal."""
    if ours.returns != theirs.returns:
        return (
            f"returns {theirs.returns} in cpu_kernels.c, {ours.returns} in "
            "cpu_backend.py"
        )
    pairs = itertools.zip_longest(ours.arguments, theirs.arguments)
    for position, (declared, defined) in enumerate(pairs, start=1):
        if declared != defined:
            return (
                f"argument {position} is {_written(defined)} in cpu_kernels.c, "
                f"{_written(declared)} in cpu_backend.py"
            )
    return None


def _written(argument: tuple[str, str] | None) -> str:
    """``("const float *", "x")`` -> ``'const float *x'`` (C's spelling)."""
    if argument is None:
        return "absent"
    kind, name = argument
    return repr(f"{kind}{'' if kind.endswith('*') else ' '}{name}")


def available() -> bool:
    """Whether the compiled kernels can be used (builds them on the first call)."""
    return load() is not None


def unavailable_reason() -> str | None:
    """Why :func:`available` is false (``None`` while it is true or untried)."""
    return _failure


def em_inf_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    kl_weight: torch.Tensor,
    lr: torch.Tensor,
    steps: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM-INF (logits mode) in place on the rows of float32 ``logits`` ``[N, V]``
    (all of them, or those in ``rows``); returns ``logits``. With ``source``, out
    of place instead: the rows are computed from ``source``'s (a float32 CPU
    tensor of ``logits``' shape, only read) into ``logits``' (only written, each
    row listed written whole), which spares a caller wanting a new tensor the copy
    of the batch (:func:`em_inf.functional.em_inf` passes a fresh ``logits``).

    Args:
        threshold, kl_weight, lr: one value per processed row (``[n]`` or
            ``[n, 1]``), any float dtype. steps: the same, integer.
        rows: int64 ``[n]`` indices of the rows to process, or ``None`` (all).
        stats: contiguous int64 ``[counters.WIDTH]`` CPU tensor (one mode's
            counters, :mod:`em_inf.counters`) to add the counts of the rows with
            ``steps > 0`` to: every column (``BELOW``, ``WORK`` = Adam steps of the
            rows not restored, ``RESTORED``, ``ROWS``, entropy sums and bins before
            and after). ``None``: nothing counted, no entropy after computed.
            The entropy after is measured for one row in
            :func:`~em_inf.counters.logits_after_sample` (``EM_INF_ENTROPY_SAMPLE``,
            16 by default): measuring it costs a row that runs all its steps one
            more exponential per logit, +17% of the logits mode's time.
    """
    count, index = _rows(logits, rows)
    if source is not None:
        checks.source_logits(source, logits)
    columns = _logits_columns(count, threshold, kl_weight, lr, steps)
    checks.stats(stats, logits)
    _call_logits(logits, index, count, source, columns, stats)
    return logits


def em_inf(
    logits: torch.Tensor,
    threshold: float | torch.Tensor,
    kl_weight: float | torch.Tensor,
    lr: float | torch.Tensor,
    steps: int | torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """EM-INF (logits mode) on every row of ``logits`` into a new tensor: the
    kernels read each row where it lies and write the new one (no copy of the
    batch first), with the bits :func:`em_inf_` gives a copy. The compiled path
    of :func:`em_inf.functional.em_inf`, checked once, for the least Python per
    call (a small batch's call is mostly that).

    Args:
        logits: float32 CPU ``[N, V]``, contiguous along the vocabulary (rows may
            be strided); only read.
        threshold, kl_weight, lr, steps: a number for every row, or one value per
            row (``[N]`` or ``[N, 1]``), as :func:`em_inf.checks.per_row` takes.
        stats: as :func:`em_inf_`.

    Returns:
        A new float32 ``[N, V]`` tensor (above 1 MiB on the memory of a result
        freed before: :mod:`em_inf.reused_results`).
    """
    checks.readable_logits(logits)
    count = logits.shape[0]
    columns = _logits_columns(count, threshold, kl_weight, lr, steps)
    checks.stats(stats, logits)
    out = reused_results.new_float32(logits.shape)
    _call_logits(out, None, count, logits, columns, stats)
    return out


def adaptive_temperature_(
    logits: torch.Tensor,
    threshold: torch.Tensor,
    alpha: torch.Tensor,
    t_min: torch.Tensor,
    t_max: torch.Tensor,
    *,
    rows: torch.Tensor | None = None,
    stats: torch.Tensor | None = None,
    inv_temperature: torch.Tensor | None = None,
    source: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adaptive-temperature mode in place (or out of place, from ``source``),
    as :func:`em_inf_`; each processed row's entropy ends within
    ``TEMPERATURE_RTOL`` of its target (or ``T`` at the end of ``[t_min, t_max]``
    nearer to it). ``stats``: as :func:`em_inf_`, every
    row counted, ``stats[counters.WORK]`` adding entropy evaluations (the first,
    at ``T = 1``, included) and the entropy after being the solver's evaluation
    at the ``1 / T`` applied. ``inv_temperature``: a float32 ``[n]`` CPU tensor
    that receives each row's ``1 / T`` (1 where the row was left as it was)."""
    count, index = _rows(logits, rows)
    if source is not None:
        checks.source_logits(source, logits)
    columns = _float_columns(
        count, threshold=threshold, alpha=alpha, t_min=t_min, t_max=t_max
    )
    checks.stats(stats, logits)
    if inv_temperature is not None:
        checks.row_output("inv_temperature", inv_temperature, count, logits)
    _call_temperature(logits, index, count, source, columns, stats, inv_temperature)
    return logits


def adaptive_temperature(
    logits: torch.Tensor,
    threshold: float | torch.Tensor,
    alpha: float | torch.Tensor,
    t_min: float | torch.Tensor,
    t_max: float | torch.Tensor,
    *,
    stats: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adaptive-temperature mode on every row of ``logits`` into a new tensor,
    as :func:`em_inf` for the logits mode (the compiled path of
    :func:`em_inf.functional.adaptive_temperature`); ``stats`` as
    :func:`adaptive_temperature_`. Returns a new float32 ``[N, V]`` tensor."""
    checks.readable_logits(logits)
    count = logits.shape[0]
    columns = _float_columns(
        count, threshold=threshold, alpha=alpha, t_min=t_min, t_max=t_max
    )
    checks.stats(stats, logits)
    out = reused_results.new_float32(logits.shape)
    _call_temperature(out, None, count, logits, columns, stats, None)
    return out


def exp_floor(logits: torch.Tensor) -> torch.Tensor:
    """The machine's floor for a batch, for benchmarks: one compiled pass that
    takes ``exp`` of every logit and sums it per row. Returns float64 ``[N]``."""
    checks.in_place_logits(logits, "cpu")
    logits = logits.contiguous()
    sums = torch.empty(logits.shape[0], dtype=torch.float64)
    _library_or_raise().em_inf_exp_floor(
        logits.data_ptr(),
        logits.shape[0],
        logits.shape[1],
        sums.data_ptr(),
        torch.get_num_threads(),
    )
    return sums


def scratch_buffer() -> torch.Tensor:
    """The kernels' scratch as it stands (uint8, grown by the calls that need more),
    for benchmarks that read it to bring it into the caches."""
    return _scratch.tensor


def vector_lanes() -> int:
    """Floats per vector the compiled kernels work in: 16 where they were built for
    AVX-512, else 8 (for benchmarks' records)."""
    return _library_or_raise().em_inf_lanes()


def exp(x: torch.Tensor) -> torch.Tensor:
    """The kernels' ``exp`` (meant for arguments <= 0) on a float32 tensor, for
    tests."""
    x = x.to(torch.float32).contiguous()
    out = torch.empty_like(x)
    _library_or_raise().em_inf_exp(x.data_ptr(), out.data_ptr(), x.numel())
    return out


# -- helpers ---------------------------------------------------------------------


def _library_or_raise() -> ctypes.CDLL:
    library = load()
    if library is None:
        raise RuntimeError(f"em-inf: compiled CPU kernels unavailable: {_failure}")
    return library


def _rows(
    logits: torch.Tensor, rows: torch.Tensor | None
) -> tuple[int, torch.Tensor | None]:
    """(number of rows to process, int64 index or None), after checking that the
    kernels can address ``logits``: rows may be strided, logits within a row not."""
    checks.in_place_logits(logits, "cpu")
    if logits.shape[0] > 1 and logits.stride(0) < logits.shape[1]:
        raise ValueError("logits rows must not overlap")
    if rows is None:
        return logits.shape[0], None
    index = rows.to(torch.int64).reshape(-1).contiguous()
    if index.numel() and not (
        0 <= int(index.min()) and int(index.max()) < logits.shape[0]
    ):
        raise ValueError(f"rows must index [0, {logits.shape[0]}), got {rows}")
    return index.numel(), index


def _logits_columns(
    count: int,
    threshold: float | torch.Tensor,
    kl_weight: float | torch.Tensor,
    lr: float | torch.Tensor,
    steps: int | torch.Tensor,
) -> list[torch.Tensor]:
    """The logits mode's parameters as the kernels take them: float32 ``[count]``
    columns, then int64 ``steps``."""
    columns = _float_columns(count, threshold=threshold, kl_weight=kl_weight, lr=lr)
    columns.append(checks.per_row("steps", steps, count, CPU, torch.int64))
    return columns


def _float_columns(count: int, **params: float | torch.Tensor) -> list[torch.Tensor]:
    """Each parameter, checked, as a float32 ``[count]`` CPU column, in the order
    given."""
    return [
        checks.per_row(name, value, count, CPU, torch.float32)
        for name, value in params.items()
    ]


def _call_logits(
    out: torch.Tensor,
    index: torch.Tensor | None,
    count: int,
    source: torch.Tensor | None,
    columns: list[torch.Tensor],
    stats: torch.Tensor | None,
) -> None:
    """``em_inf_logits`` on checked arguments: ``count`` rows of ``out`` (those in
    ``index``, or all), from ``source``'s rows (``None``: in place)."""
    sample = (
        counters.DEFAULT_CPU_SAMPLE if stats is None else counters.logits_after_sample()
    )
    _launch(
        "em_inf_logits",
        out,
        source,
        _pointer(index),
        count,
        [column.data_ptr() for column in columns],
        _LOGITS_SETTINGS,
        _pointer(stats),
        sample,
    )


def _call_temperature(
    out: torch.Tensor,
    index: torch.Tensor | None,
    count: int,
    source: torch.Tensor | None,
    columns: list[torch.Tensor],
    stats: torch.Tensor | None,
    inv_temperature: torch.Tensor | None,
) -> None:
    """``em_inf_temperature`` on checked arguments, as :func:`_call_logits`."""
    _launch(
        "em_inf_temperature",
        out,
        source,
        _pointer(index),
        count,
        [column.data_ptr() for column in columns],
        (TEMPERATURE_RTOL, _pointer(inv_temperature)),
        _pointer(stats),
    )


#: The logits mode's Adam settings, as its entry point takes them.
_LOGITS_SETTINGS = (ADAM_BETAS[0], ADAM_BETAS[1], ADAM_EPS)


def _launch(
    entry: str,
    out: torch.Tensor,
    source: torch.Tensor | None,
    index: int | None,
    count: int,
    columns: Sequence[int],
    settings: tuple,
    stats: int | None,
    *last: int,
) -> None:
    """One mode's entry point with its arguments in the prototypes' order:
    ``count`` rows of ``out`` (at the int64 indices at address ``index``, or all;
    from ``source``'s rows, or in place), the addresses of their parameter
    ``columns``, the mode's ``settings``, the scratch, the counters' address
    (``stats``) and the bins' edges, the mode's ``last`` arguments, the thread
    count. Addresses, not tensors: :class:`RowsCall` takes them once."""
    library = _library_or_raise()
    threads = torch.get_num_threads()
    vocab = out.shape[1]
    with _lock:
        getattr(library, entry)(
            out.data_ptr(),
            index,
            count,
            vocab,
            out.stride(0),
            _pointer(source),
            0 if source is None else source.stride(0),
            *columns,
            *settings,
            _scratch_for(library, vocab, threads),
            stats,
            _EDGES_ADDRESS,
            len(counters.ENTROPY_EDGES),
            *last,
            threads,
        )


class RowsCall:
    """One mode's kernels in place on the same rows of each step's logits, with the
    same settings: the rows' index and parameter columns (and the counters, the
    first time they are passed) are checked and their addresses taken once, and a
    call checks only its logits. The vLLM processor's CPU path, whose batch
    usually repeats the last step's (:meth:`em_inf.core.SlotSettings.mode_rows`):
    right after the model's forward pass each torch call, even reading a tensor's
    dtype, costs about 10 us (caches refilled), and a step's arguments took dozens.
    ``EM_INF_ENTROPY_SAMPLE`` (:func:`~em_inf.counters.logits_after_sample`) is
    read when the call is made, not at each call.

    Args:
        mode: ``"logits"`` or ``"temperature"``.
        index: int64 ``[n]`` CPU indices of the rows to process (ascending or
            not), or ``None``: every row of logits with ``n`` rows.
        columns: the mode's parameters (``modes.PARAMS[mode]`` order), ``[n]``
            each, as :func:`em_inf_` / :func:`adaptive_temperature_` take them.
    """

    def __init__(
        self, mode: str, index: torch.Tensor | None, columns: Sequence[torch.Tensor]
    ) -> None:
        count = columns[0].shape[0]
        if mode == "logits":
            checked = _logits_columns(count, *columns)
        else:
            names = ("threshold", "alpha", "t_min", "t_max")
            checked = _float_columns(count, **dict(zip(names, columns, strict=True)))
        if index is not None:
            index = index.to(torch.int64).reshape(-1).contiguous()
            if index.numel() != count or (count and int(index.min()) < 0):
                raise ValueError(
                    f"rows must be {count} indices >= 0, one per parameter, got {index}"
                )
        self._index, self._columns = index, checked  # what the addresses point to
        # The rows as _launch takes them: the index's address, the count, the
        # columns' addresses.
        self._rows = (
            _pointer(index),
            count,
            tuple(column.data_ptr() for column in checked),
        )
        # The logits' rows a call needs: exactly count (every row) or more than
        # the index's largest.
        self._every_row = index is None
        self._rows_needed = (
            count if index is None or not count else int(index.max()) + 1
        )
        self._stats: tuple[torch.Tensor | None, int | None] = (None, None)
        # The mode's entry point, settings and last arguments; the sample is read
        # once (the environment, read per call, took ~50 us after a forward pass).
        if mode == "logits":
            sample = counters.logits_after_sample()
            self._entry = ("em_inf_logits", _LOGITS_SETTINGS, (sample,))
        else:
            self._entry = ("em_inf_temperature", (TEMPERATURE_RTOL, None), ())

    def __call__(self, logits: torch.Tensor, stats: torch.Tensor | None = None) -> None:
        """Process ``logits`` (float32 CPU ``[N, V]``, contiguous along the
        vocabulary, rows may be strided) in place, counting into ``stats`` (as
        :func:`em_inf_`'s)."""
        rows, _ = _rows(logits, None)
        if rows != self._rows_needed and (self._every_row or rows < self._rows_needed):
            raise ValueError(
                f"logits has {rows} rows; these settings are for "
                f"{'exactly' if self._every_row else 'at least'} {self._rows_needed}"
            )
        if stats is not self._stats[0]:
            checks.stats(stats, logits)
            self._stats = (stats, _pointer(stats))
        entry, settings, last = self._entry
        _launch(entry, logits, None, *self._rows, settings, self._stats[1], *last)


def _pointer(tensor: torch.Tensor | None) -> int | None:
    return None if tensor is None else tensor.data_ptr()


def _check_layout(library: ctypes.CDLL) -> None:
    """Raise unless the kernels write stats in :mod:`em_inf.counters`' layout."""
    layout = torch.zeros(11, dtype=torch.int64)
    library.em_inf_stats_layout(_EDGES.numel(), layout.data_ptr())
    expected = [
        counters.BELOW,
        counters.WORK,
        counters.RESTORED,
        counters.ROWS,
        counters.SUM_BEFORE,
        counters.SUM_AFTER,
        counters.HIST_BEFORE,
        counters.HIST_AFTER,
        counters.WIDTH,
        counters.FIXED_POINT,
    ]
    if layout[:10].tolist() != expected or _EDGES.numel() > layout[10]:
        raise InterfaceError(
            f"the kernels' stats layout {layout.tolist()} is not counters.py's "
            f"{expected} (at most {int(layout[10])} edges)"
        )


def _scratch_for(library: ctypes.CDLL, vocab: int, threads: int) -> int:
    """Address of the shared scratch buffer, grown when needed (kept across calls:
    a fresh one would page-fault its megabytes on every call). Call under _lock."""
    global _scratch
    needed = _scratch_bytes.get((library, vocab, threads))
    if needed is None:
        needed = _scratch_bytes[library, vocab, threads] = library.em_inf_scratch_bytes(
            vocab, threads
        )
    if _scratch.size < needed:
        _scratch = Scratch.of(torch.empty(needed, dtype=torch.uint8))
    return _scratch.address
