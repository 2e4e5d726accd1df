"""The ``em-inf`` command.

``em-inf serve [MODEL] [vllm serve flags] [--em-inf-* flags]`` starts vLLM's
OpenAI-compatible server with EM-INF in its sampler (see :mod:`em_inf.server`).
"""

from __future__ import annotations

import logging
import os
import sys

from em_inf import __version__
from em_inf.heap_trim import start_from_environment


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``em-inf`` console script; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["serve"]:
        _show_em_inf_logs()
        # Before vLLM (and prometheus_client) is imported: the engine's processes
        # then write EM-INF's series where the API server's /metrics reads them.
        from em_inf.metrics import share_across_processes

        share_across_processes()
    from em_inf.server import vllm_compat
    from em_inf.server.cli_args import make_serve_parser

    parser_class = vllm_compat.get("argument_parser")
    parser = parser_class(
        prog="em-inf",
        description="EM-INF (inference-time entropy minimization) for vLLM.",
    )
    parser.add_argument("--version", action="version", version=f"em-inf {__version__}")
    subparsers = parser.add_subparsers(
        dest="command", metavar="COMMAND", parser_class=parser_class
    )
    serve_parser = make_serve_parser(subparsers)
    args = parser.parse_args(argv)
    if args.command != "serve":
        parser.print_help()
        return 2
    try:
        _set_heap_trim(args)
    except ValueError as error:
        print(f"em-inf serve: error: {error}", file=sys.stderr)
        return 2
    _restart_with_allocator(args)
    # vLLM loaded its plugins in this process while building the parser, before
    # the variable was set; the engine's processes load them after.
    start_from_environment()
    return serve(args, serve_parser, argv[argv.index("serve") + 1 :])


def serve(args, serve_parser, serve_argv: list[str]) -> int:
    """Run ``em-inf serve`` for ``serve_argv`` (parsed: ``args``); blocks until the
    server stops."""
    from em_inf.server.launch import StartupError, prepare, run

    _show_em_inf_logs()
    try:
        run(prepare(args, serve_parser, serve_argv))
    except StartupError as error:
        print(f"em-inf serve: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    return 0


def _set_heap_trim(args) -> None:
    """Put ``--em-inf-heap-trim`` (else a valid ``$EM_INF_HEAP_TRIM_IDLE_S``, else
    the default) in the environment, where every process of the server reads it
    (:func:`em_inf.heap_trim.start_from_environment`); ``ValueError`` for an
    invalid variable."""
    from em_inf.heap_trim import DEFAULT_IDLE_S, IDLE_ENV, idle_seconds

    seconds = getattr(args, "em_inf_heap_trim", None)
    if seconds is None:
        given = os.environ.get(IDLE_ENV, "").strip()
        seconds = idle_seconds() if given else DEFAULT_IDLE_S
    os.environ[IDLE_ENV] = f"{seconds:g}"


#: Set in the environment of an ``em-inf serve`` that started itself again with
#: its allocator: it must not do so twice.
RESTARTED_ENV = "EM_INF_ALLOCATOR_APPLIED"


def _restart_with_allocator(args) -> None:
    """On a CPU engine, start this ``em-inf serve`` process again (``exec``, same
    command line) with the memory allocator ``--em-inf-allocator`` asks for (see
    :func:`em_inf.server.cpu_defaults.allocator_environment`): ``LD_PRELOAD`` and
    ``MALLOC_ARENA_MAX`` act only when a process starts, and vLLM's engine
    processes inherit them from this one."""
    if os.environ.get(RESTARTED_ENV):
        return
    from em_inf.server import vllm_compat
    from em_inf.server.cpu_defaults import ALLOCATOR_ENV, allocator_environment

    requested = getattr(args, "em_inf_allocator", None)
    requested = requested or os.environ.get(ALLOCATOR_ENV, "").strip() or "system"
    if requested not in ("auto", "tcmalloc", "arena", "system"):
        requested = "system"
    if not vllm_compat.get("current_platform").is_cpu():
        return
    changes, line = allocator_environment(requested)
    _show_em_inf_logs()
    logging.getLogger("em_inf.server").info("CPU engine: %s", line)
    if not changes:
        return
    env = dict(os.environ, **changes, **{RESTARTED_ENV: requested})
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
    except OSError as error:  # run on here: the engine processes still get it
        logging.getLogger("em_inf.server").warning(
            "CPU engine: could not restart with the allocator (%s); the engine "
            "processes get it, this one does not",
            error,
        )
        os.environ.update(changes)


def _show_em_inf_logs() -> None:
    """vLLM configures only its own loggers; give em-inf's a handler of its own."""
    em_inf_logger = logging.getLogger("em_inf")
    if em_inf_logger.handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("[em-inf] %(levelname)s %(message)s"))
    em_inf_logger.addHandler(handler)
    em_inf_logger.setLevel(logging.INFO)
    em_inf_logger.propagate = False


if __name__ == "__main__":
    sys.exit(main())
