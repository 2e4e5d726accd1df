"""EM-INF in Hugging Face transformers: ``EMInfLogitsProcessor``, a batched
``LogitsProcessor`` for ``model.generate``.

It runs the public functional API (:mod:`em_inf.functional`: the Triton kernels on
CUDA, the PyTorch path on CPU) on each step's ``[rows, V]`` scores, with the same
settings, presets and validation as the vLLM processor and ``em-inf serve``, so the
same settings give the same distributions in all three.

Order. The paper applies EM-INF to the raw logits, then the temperature (0.1 in the
authors' runs), then samples. The processor owns that temperature
(``temperature=0.1``) and applies it right after EM-INF, so the order does not depend
on where ``generate`` puts its own warpers; ``generate`` must then keep its
temperature at 1.0 (pass ``top_k=0`` too to sample from the whole distribution, as
vLLM does; transformers' default is ``top_k=50``). transformers 5 runs user processors
before its own temperature warper, so ``generate(temperature=0.1)`` with the processor
at 1.0 is the same distribution.

Rows. ``per_row`` gives each prompt (or each row) its own settings. transformers
repeats every prompt ``num_return_sequences`` times (``num_beams`` times in beam
search) in consecutive rows, so a list with one entry per prompt is repeated the same
way; a list with one entry per row is used as it is.

Beam search. transformers hands processors log-probabilities there and adds what
they return to the beams' running scores. EM-INF only depends on the softmax of a
row, so it sees the same distribution it sees in the logits. For such rows (every row
whose ``logsumexp`` is 0, within :data:`LOG_PROB_TOL`) the processor returns the
log-probabilities of the EM-INF distribution, ``log_softmax(EM-INF(z) /
temperature)``: beam search then ranks sequences by their log-likelihood under the
entropy-minimised model, each step's distribution being exactly the one greedy
decoding and sampling see. Other rows leave as EM-INF's logits divided by the
temperature, as in vLLM.

Importing this module imports transformers (the ``hf`` extra); ``em_inf`` itself
never does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from em_inf import functional, metrics, modes
from em_inf.config import MODES, REQUEST_KEY, EMInfConfig, make_config, parse_request
from em_inf.counters import WIDTH

try:
    from transformers.generation.logits_process import LogitsProcessor
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        "em_inf.hf needs Hugging Face transformers: pip install 'em-inf[hf]'"
    ) from err

#: Largest ``|logsumexp|`` of a row that counts as log-probabilities (beam search).
LOG_PROB_TOL = 1e-4

RowEntry = Mapping[str, Any] | EMInfConfig | bool | str | int | None


class EMInfLogitsProcessor(LogitsProcessor):
    """EM-INF as a transformers ``LogitsProcessor``: ``__call__(input_ids, scores)``.

    Args:
        preset: the preset the settings start from (``em_inf.PRESETS``;
            ``"default"`` when omitted).
        per_row: optional settings per prompt or per row of the batch, each on top of
            the processor's own settings, as a vLLM request's are on top of the
            engine's: a mapping (may name a ``preset``; the other keys override it),
            an :class:`~em_inf.config.EMInfConfig` (used as it is), ``True`` / ``"on"``
            (the processor's settings), or ``None`` / ``False`` / ``"off"`` (EM-INF
            off for that row). The module docstring says how it meets
            ``num_return_sequences``.
        temperature: divides the scores after EM-INF (the paper's order); ``> 0``.
        **settings: any :class:`~em_inf.config.EMInfConfig` field (``mode``,
            ``threshold``, ``kl_weight``, ``lr``, ``steps``, ``alpha``, ``t_min``,
            ``t_max``).

    Raises:
        ValueError: naming the field, on any invalid setting (``per_row[i]: ...``
            for an entry of ``per_row``).

    Attributes:
        settings: the processor's :class:`~em_inf.config.EMInfConfig`.
        per_row: ``None``, or a tuple with one ``EMInfConfig`` (``None`` = off) per
            entry of ``per_row``.
        temperature: float.
    """

    # Rows of transformers' continuous batching belong to changing requests, which
    # per_row cannot follow; this processor is for ``generate``.
    supports_continuous_batching = False

    def __init__(
        self,
        preset: str | None = None,
        *,
        per_row: Sequence[RowEntry] | None = None,
        temperature: float = 1.0,
        **settings: Any,
    ) -> None:
        self.settings = make_config(preset, **settings)
        self.per_row = (
            None if per_row is None else _row_settings(per_row, self.settings)
        )
        self.temperature = _check_temperature(temperature)
        self._plans: dict[tuple[int, torch.device], list[_ModeBatch]] = {}
        self._counters: torch.Tensor | None = None  # int64 [2, WIDTH], on the device

    def metrics(self) -> dict[str, dict[str, Any]]:
        """What EM-INF did in every call so far, per mode, in the structure of
        :func:`em_inf.metrics.snapshot` (the figures ``em-inf serve`` exports on
        ``/metrics``): rows, rows below threshold, rows restored, Adam steps or
        solver passes, entropy before / after histograms. Waits for the device."""
        if self._counters is None:
            return metrics.summary(torch.zeros((len(MODES), WIDTH), dtype=torch.int64))
        return metrics.summary(self._counters.cpu().numpy())

    def __repr__(self) -> str:
        rows = "" if self.per_row is None else f", per_row={list(self.per_row)!r}"
        return (
            f"{type(self).__name__}({self.settings!r}{rows}, "
            f"temperature={self.temperature!r})"
        )

    def __call__(
        self, input_ids: torch.LongTensor, scores: torch.FloatTensor
    ) -> torch.FloatTensor:
        """Process one decoding step.

        Args:
            input_ids: ``[rows, length]`` token ids so far (unused: EM-INF depends on
                the scores alone).
            scores: ``[rows, V]`` floating scores: raw logits, or log-probabilities in
                beam search.

        Returns:
            A new float32 ``[rows, V]`` tensor on ``scores``' device.
        """
        if scores.dim() != 2 or not scores.is_floating_point():
            raise ValueError(
                f"scores must be a floating [rows, V] tensor, got {scores.dtype} "
                f"{tuple(scores.shape)}"
            )
        log_prob_rows = torch.logsumexp(scores.float(), dim=-1).abs() <= LOG_PROB_TOL
        plan = self._plan(scores.shape[0], scores.device)
        counters = self._counters_on(scores.device)
        if len(plan) == 1 and plan[0].rows is None:
            out = plan[0].apply(scores, counters)
        else:  # rows left out of every call keep their scores
            out = scores.to(torch.float32, copy=True)
            for batch in plan:
                selected = out.index_select(0, batch.rows)
                out.index_copy_(0, batch.rows, batch.apply(selected, counters))
        if self.temperature != 1.0:
            out.div_(self.temperature)
        if log_prob_rows.any():
            out = torch.where(
                log_prob_rows.unsqueeze(1), torch.log_softmax(out, dim=-1), out
            )
        return out

    def _counters_on(self, device: torch.device) -> torch.Tensor:
        if self._counters is None:
            self._counters = torch.zeros(
                (len(MODES), WIDTH), dtype=torch.int64, device=device
            )
        elif self._counters.device != device:
            self._counters = self._counters.to(device)
        return self._counters

    def _plan(self, rows: int, device: torch.device) -> list[_ModeBatch]:
        """The EM-INF calls for a batch of ``rows`` rows on ``device`` (cached)."""
        key = (rows, device)
        if key not in self._plans:
            if self.per_row is None:
                plan = [_ModeBatch.whole(self.settings)]
            else:
                plan = _ModeBatch.split(_expand(self.per_row, rows), device)
            self._plans[key] = plan
        return self._plans[key]


class _ModeBatch:
    """One functional call: the rows of one mode (``rows`` = ``None``: all of them)
    and their parameters (``modes.PARAMS[mode]``), numbers or ``[len(rows)]``
    tensors."""

    def __init__(
        self,
        mode: str,
        rows: torch.Tensor | None,
        params: dict[str, float | int | torch.Tensor],
    ) -> None:
        self.mode = mode
        self.rows = rows
        self.params = params

    @classmethod
    def whole(cls, config: EMInfConfig) -> _ModeBatch:
        params = {name: getattr(config, name) for name in modes.PARAMS[config.mode]}
        return cls(config.mode, None, params)

    @classmethod
    def split(
        cls, configs: list[EMInfConfig | None], device: torch.device
    ) -> list[_ModeBatch]:
        """One call per mode present among ``configs`` (``None`` rows are left out)."""
        mode_codes = np.array(
            [
                modes.LEFT_ALONE if config is None else MODES.index(config.mode)
                for config in configs
            ]
        )
        plan = []
        for mode, rows in modes.rows_by_mode(mode_codes):
            params = {
                name: torch.tensor(
                    [getattr(configs[i], name) for i in rows],
                    dtype=modes.param_dtype(name),
                    device=device,
                )
                for name in modes.PARAMS[mode]
            }
            whole = len(rows) == len(configs)
            index = None if whole else torch.from_numpy(rows).to(device)
            plan.append(cls(mode, index, params))
        return plan

    def apply(self, logits: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
        """EM-INF on ``logits``' rows; this mode's counts go to ``counters``
        (int64 ``[2, WIDTH]``)."""
        stats = counters[MODES.index(self.mode)]
        return functional.run_mode(self.mode, logits, self.params, stats=stats)


def _row_settings(
    entries: Sequence[RowEntry], base: EMInfConfig
) -> tuple[EMInfConfig | None, ...]:
    """Validate ``per_row``: each entry's settings on top of ``base``."""
    if isinstance(entries, str | Mapping) or not isinstance(entries, Sequence):
        raise ValueError(
            f"per_row must be a list with one settings entry per prompt or row, "
            f"got {type(entries).__name__}"
        )
    if not entries:
        raise ValueError("per_row must not be empty")
    settings = []
    for i, entry in enumerate(entries):
        if entry is None or isinstance(entry, EMInfConfig):
            settings.append(entry)
            continue
        try:
            settings.append(parse_request({REQUEST_KEY: entry}, base))
        except ValueError as err:
            raise ValueError(f"per_row[{i}]: {err}") from None
    return tuple(settings)


def _expand(
    per_row: tuple[EMInfConfig | None, ...], rows: int
) -> list[EMInfConfig | None]:
    """``per_row`` as one entry per row: as it is, or each entry repeated for the
    consecutive rows transformers makes of one prompt."""
    if rows % len(per_row):
        raise ValueError(
            f"per_row has {len(per_row)} entries but the batch has {rows} rows; "
            f"give one entry per prompt (each is repeated for its "
            f"num_return_sequences / num_beams rows) or one per row"
        )
    repeat = rows // len(per_row)
    return [config for config in per_row for _ in range(repeat)]


def _check_temperature(value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or not 0 < value < float("inf")
    ):
        raise ValueError(
            f"em_inf: 'temperature' must be a number in (0, inf), got {value!r}"
        )
    return float(value)
