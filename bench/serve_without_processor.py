"""``em-inf serve`` exactly, minus the logits processor: the baseline server for
``bench/load.py --server`` memory and latency comparisons.

The middleware still validates each request's settings (400s), answers
``GET /v1/em-inf`` and hands valid settings to vLLM, but no engine step runs EM-INF,
so every settings check of the load mismatches by design; read its latency and
memory figures only. Same arguments as ``em-inf serve``::

    python -m bench.serve_without_processor --logprobs-mode processed_logprobs \\
        --max-logprobs -1 --host 127.0.0.1 --port 8001
"""

from __future__ import annotations

import dataclasses
import sys

from em_inf import cli
from em_inf.server import launch
from em_inf.server.launch import PROCESSOR

_prepare = launch.prepare


def prepare_without_processor(*args, **kwargs) -> launch.Launch:
    """:func:`em_inf.server.launch.prepare`, with em-inf's processor dropped from
    ``--logits-processors`` (and the flag itself when nothing else is left)."""
    prepared = _prepare(*args, **kwargs)
    argv = list(prepared.argv)
    at = argv.index("--logits-processors")
    end = at + 1
    while end < len(argv) and not argv[end].startswith("-"):
        end += 1
    others = [entry for entry in argv[at + 1 : end] if entry != PROCESSOR]
    argv[at:end] = ["--logits-processors", *others] if others else []
    return dataclasses.replace(prepared, argv=argv)


if __name__ == "__main__":
    launch.prepare = prepare_without_processor
    sys.exit(cli.main(["serve", *sys.argv[1:]]))
