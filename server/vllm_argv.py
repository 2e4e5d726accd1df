"""The ``vllm serve`` command line that ``em-inf serve`` runs.

It is the user's own command line, less the options em-inf owns or rewrites (the
``--em-inf-*`` flags; ``--logits-processors``, ``--middleware``,
``--additional-config``, which come back once each, holding the user's values and
EM-INF's), plus em-inf's defaults as ordinary ``vllm serve`` flags. Options are
recognised in every spelling vLLM's parser takes: ``--name value``, ``--name=value``,
underscores for dashes, and ``--json-flag.key value`` for JSON flags. Pure Python.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

#: How many values an option takes: 1, or "+" (one or more, up to the next option).
Arity = int | str

#: The ``vllm serve`` options em-inf rewrites, with their arity.
REWRITTEN: dict[str, Arity] = {
    "--logits-processors": "+",
    "--middleware": 1,
    "--additional-config": 1,
}


def _option_name(token: str) -> str | None:
    """``--additional_config.em_inf=..`` -> ``--additional-config``; ``None`` for a
    token that is not a long option."""
    if not token.startswith("--") or token == "--":
        return None
    key = re.split(r"[=.]", token[2:], maxsplit=1)[0]
    return "--" + key.replace("_", "-")


def without_options(argv: Sequence[str], options: Mapping[str, Arity]) -> list[str]:
    """``argv`` without every occurrence of ``options`` and their values.

    Args:
        argv: a ``vllm serve`` command line (after ``serve``).
        options: option -> arity (:data:`Arity`).
    """
    kept: list[str] = []
    index = 0
    while index < len(argv):
        token = argv[index]
        if token == "--":  # the rest is positional
            kept.extend(argv[index:])
            break
        index += 1
        name = _option_name(token)
        if name not in options:
            kept.append(token)
            continue
        if "=" in token:  # the value is in the token
            continue
        if options[name] == "+":
            while index < len(argv) and not argv[index].startswith("-"):
                index += 1
        else:
            index += int(options[name])
    return kept


def option(name: str, *values: Any) -> list[str]:
    """``--name v1 v2`` as command-line tokens (objects as JSON)."""
    return [
        name,
        *(json.dumps(v) if isinstance(v, Mapping) else str(v) for v in values),
    ]


def vllm_serve_argv(
    user_argv: Sequence[str],
    *,
    owned: Iterable[str],
    model: str | None,
    defaults: Sequence[str],
    logits_processors: Sequence[str],
    middleware: Sequence[str],
    additional_config: Mapping[str, Any],
) -> list[str]:
    """The arguments of ``vllm serve`` (after ``serve``).

    Args:
        user_argv: what the user gave ``em-inf serve``.
        owned: em-inf's own options (one value each), dropped.
        model: a model to put first, when the user gave none.
        defaults: em-inf's default flags (only for options the user left unset).
        logits_processors, middleware, additional_config: the complete values of
            these options.
    """
    options: dict[str, Arity] = {name: 1 for name in owned}
    options.update(REWRITTEN)
    argv = [] if model is None else [model]
    argv += without_options(user_argv, options)
    argv += defaults
    argv += option("--logits-processors", *logits_processors)
    for path in middleware:
        argv += option("--middleware", path)
    argv += option("--additional-config", dict(additional_config))
    return argv
