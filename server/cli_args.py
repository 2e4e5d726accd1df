"""``em-inf serve``'s command line: vLLM's own ``vllm serve`` parser plus an EM-INF
argument group, and the engine-wide settings those flags add up to."""

from __future__ import annotations

import argparse
from collections.abc import Mapping
from typing import Any

from em_inf.config import FIELD_NAMES, MODES, PRESETS, REQUEST_KEY
from em_inf.heap_trim import DEFAULT_IDLE_S, IDLE_ENV, parse_seconds

from . import vllm_compat
from .cpu_defaults import ONEDNN_CACHE_DEFAULT, ONEDNN_CACHE_ENV, ONEDNN_OWN_CAPACITY

GROUP_TITLE = "EM-INF"
GROUP_DESCRIPTION = (
    "Server-wide EM-INF defaults. Each request may override them with its "
    "'em_inf' body field (or vllm_xargs em_inf_* keys). Unset flags take the "
    "preset's value."
)
USAGE = "em-inf serve [MODEL] [vllm serve options] [--em-inf-* options]"
DESCRIPTION = (
    "Serve MODEL with vLLM's OpenAI-compatible API server and EM-INF "
    "(inference-time entropy minimization) in its sampler. Every `vllm serve` "
    "flag works unchanged. Without MODEL, serves SmolLM2-135M-Instruct, prepared "
    "locally on first use."
)

EPILOG = (
    "All vLLM flags:  em-inf serve --help=all\n"
    "A flag group:    em-inf serve --help=ModelConfig   (case-insensitive)\n"
    "A flag:          em-inf serve --help=max-model-len\n"
    "Per-request settings and presets: GET /v1/em-inf on the running server.\n"
)

_DEFAULTS = PRESETS["default"]
_FIELD_HELP: dict[str, str] = {
    "mode": "'logits' (the paper's EM-INF: Adam steps on the logits) or "
    "'temperature' (adaptive temperature, Algorithm 1).",
    "threshold": "Entropy (nats) below which a token's distribution is left alone.",
    "kl_weight": "Weight of KL(p0 || q) in the logits-mode loss.",
    "lr": "Adam learning rate of the logits mode.",
    "steps": "Most Adam steps per generated token (logits mode).",
    "alpha": "Temperature mode: target entropy is max(threshold, alpha * H0).",
    "t_min": "Temperature mode: lowest temperature.",
    "t_max": "Temperature mode: highest temperature.",
}


def flag_name(field: str) -> str:
    """``kl_weight`` -> ``--em-inf-kl-weight``."""
    return "--em-inf-" + field.replace("_", "-")


def _field_type(field: str) -> type:
    return type(getattr(_DEFAULTS, field))


#: Every option string of the EM-INF group, as ``--em-inf-<name>``.
EM_INF_FLAGS: tuple[str, ...] = (
    "--em-inf-preset",
    "--em-inf-default",
    "--em-inf-allocator",
    "--em-inf-heap-trim",
    "--em-inf-onednn-cache",
    *(flag_name(field) for field in FIELD_NAMES),
)


def _seconds(text: str) -> float:
    try:
        return parse_seconds(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 0, got {text!r}")
    return value


def add_em_inf_arguments(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    """Add the ``EM-INF`` argument group (``--em-inf-*``) to ``parser``."""
    group = parser.add_argument_group(GROUP_TITLE, description=GROUP_DESCRIPTION)
    group.add_argument(
        "--em-inf-preset",
        choices=sorted(PRESETS),
        default=argparse.SUPPRESS,
        help="Preset the defaults start from (default: 'default'). GET /v1/em-inf "
        "lists every preset's values.",
    )
    group.add_argument(
        "--em-inf-default",
        choices=("on", "off"),
        default=argparse.SUPPRESS,
        help="'on' (default): requests that say nothing get EM-INF; 'off': EM-INF "
        "is opt-in per request ('em_inf': true or an object of settings).",
    )
    group.add_argument(
        "--em-inf-allocator",
        choices=("auto", "tcmalloc", "arena", "system"),
        default=argparse.SUPPRESS,
        help="CPU engine's memory allocator in every server process (or "
        "$EM_INF_ALLOCATOR). 'system' (default): malloc as it is; 'tcmalloc': "
        "preloaded from a standard path (libtcmalloc-minimal4), as vLLM's CPU guide "
        "advises; 'arena': glibc with MALLOC_ARENA_MAX=2; 'auto': tcmalloc where "
        "found, else arena. Neither kept a soak's memory flat (bench/README.md).",
    )
    group.add_argument(
        "--em-inf-heap-trim",
        type=_seconds,
        default=argparse.SUPPRESS,
        metavar="SECONDS",
        help="Every server process returns the heap it has freed to the system "
        "(glibc malloc_trim) once it has been idle this long (default: "
        f"{DEFAULT_IDLE_S:g}; or ${IDLE_ENV}). 0 turns it off. Without it "
        "resident memory keeps the high-water mark of every burst "
        "(docs/memory-growth.md).",
    )
    group.add_argument(
        "--em-inf-onednn-cache",
        type=_count,
        default=argparse.SUPPRESS,
        metavar="PRIMITIVES",
        help="CPU engine: oneDNN primitives each process keeps (sets "
        f"${ONEDNN_CACHE_ENV}; default: {ONEDNN_CACHE_DEFAULT}, or that variable "
        "where set). The linear layers keep primitives for every step size they "
        f"meet, so with oneDNN's own {ONEDNN_OWN_CAPACITY:,} a worker's memory "
        "climbs for thousands of requests (docs/memory-growth.md). 0 keeps "
        "oneDNN's own.",
    )
    for field in FIELD_NAMES:
        kind = _field_type(field)
        options: dict[str, Any] = {
            "default": argparse.SUPPRESS,
            "help": _FIELD_HELP[field],
        }
        if field == "mode":
            options["choices"] = MODES
        else:
            options["type"] = kind
            options["metavar"] = "INT" if kind is int else "FLOAT"
        options["help"] += f" Preset 'default': {getattr(_DEFAULTS, field)}."
        group.add_argument(flag_name(field), **options)
    return group


def engine_config_from_args(args: argparse.Namespace) -> dict[str, Any]:
    """``additional_config["em_inf"]`` for the engine: what ``--additional-config``
    already says under ``"em_inf"``, with the ``--em-inf-*`` flags on top."""
    additional = getattr(args, "additional_config", None) or {}
    base = additional.get(REQUEST_KEY) if isinstance(additional, Mapping) else None
    if base is not None and not isinstance(base, Mapping):
        raise ValueError(
            f"--additional-config: {REQUEST_KEY!r} must be an object, got {base!r}"
        )
    engine_config = dict(base or {})
    # Unset flags are absent from ``args`` (their default is SUPPRESS).
    if (preset := getattr(args, "em_inf_preset", None)) is not None:
        engine_config["preset"] = preset
    for field in FIELD_NAMES:
        if (value := getattr(args, "em_inf_" + field, None)) is not None:
            engine_config[field] = value
    if (switch := getattr(args, "em_inf_default", None)) is not None:
        engine_config["enabled"] = switch == "on"
    return engine_config


def serve_subcommand() -> Any:
    """vLLM's ``serve`` subcommand (``subparser_init``, ``validate``, ``cmd``)."""
    commands = vllm_compat.get("serve_subcommand")()
    return next(command for command in commands if command.name == "serve")


def make_serve_parser(
    subparsers: argparse._SubParsersAction | None = None,
) -> argparse.ArgumentParser:
    """The ``serve`` parser: ``vllm serve``'s own (its flags, help and validation),
    plus the EM-INF group.

    Plain ``--help`` lists vLLM's flag groups (``--help=<group>`` / ``--help=all``
    show their flags, as with ``vllm serve``) and spells out the EM-INF group.

    Args:
        subparsers: the ``add_subparsers()`` of the ``em-inf`` parser, made with
            ``parser_class=vllm_compat.get("argument_parser")``; without it, a
            parser for ``em-inf serve`` alone.
    """
    if subparsers is None:
        parser_class = vllm_compat.get("argument_parser")
        subparsers = parser_class(prog="em-inf").add_subparsers(
            parser_class=parser_class
        )
    parser = serve_subcommand().subparser_init(subparsers)
    parser.usage = USAGE
    parser.description = DESCRIPTION
    add_em_inf_arguments(parser)
    parser.epilog = _em_inf_group_help(parser) + "\n" + EPILOG
    return parser


def _em_inf_group_help(parser: argparse.ArgumentParser) -> str:
    """The EM-INF group as ``--help=EM-INF`` shows it, for plain ``--help``."""
    alone = argparse.ArgumentParser(
        prog=parser.prog,
        usage=argparse.SUPPRESS,
        add_help=False,
        formatter_class=parser.formatter_class,
    )
    add_em_inf_arguments(alone)
    return alone.format_help()


def validate_serve_args(args: argparse.Namespace) -> None:
    """``vllm serve``'s own checks of parsed arguments.

    Raises:
        ValueError, TypeError or KeyError: from vLLM, saying what is wrong.
    """
    serve_subcommand().validate(args)
