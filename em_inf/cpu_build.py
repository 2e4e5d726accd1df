"""Compile em-inf's CPU kernels (``cpu_kernels.c``) for this machine, once, and cache
the shared library on disk.

The source is plain C (no Python or torch headers), built with the system C compiler
at ``-O3 -march=native`` with OpenMP, and never with ``-ffast-math``: masked logits
are ``-inf`` and must stay so. A build takes about a second; its result is cached under
``cache_root() / "cpu-kernels"`` (``$EM_INF_CACHE``, else ``~/.cache/em-inf``), keyed
by the source, the compiler's version, the flags and the CPU's model and features, so
a changed source, compiler or machine builds afresh and anything else loads the
cached file.

``$EM_INF_CC`` names the compiler (default: ``gcc``, else ``cc``, from ``PATH``);
``$EM_INF_CPU_ARCH`` the target given to ``-march`` (default ``native``; e.g.
``x86-64-v3`` builds the AVX2 variant on an AVX-512 machine, to measure it);
``$EM_INF_CPU_SQRT`` how an AVX-512 build takes the Adam update's square root:
``divider`` (``vsqrtps``, correctly rounded) or ``estimate`` (a 14-bit estimate
and a Newton step, within 1 ulp), by default ``estimate`` on Intel CPUs, whose
divider the update otherwise waits on, and ``divider`` elsewhere
(``docs/cost-model.md`` has both machines' figures).
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

#: The kernels' source, shipped inside the package.
SOURCE = Path(__file__).with_name("cpu_kernels.c")
#: Environment variable naming the C compiler.
COMPILER_ENV = "EM_INF_CC"
#: Environment variable naming the target CPU (``-march``; default ``native``).
ARCH_ENV = "EM_INF_CPU_ARCH"
#: Environment variable choosing the update's square root: "divider" or "estimate".
SQRT_ENV = "EM_INF_CPU_SQRT"
SQRT_CHOICES = ("divider", "estimate")
#: The define an AVX-512 build gets when it takes the square root by the estimate.
SQRT_ESTIMATE_FLAG = "-DEM_INF_SQRT_ESTIMATE"

#: Always: optimise, keep IEEE semantics (no -ffast-math: -inf must stay -inf, NaN
#: must be seen) but let sqrt vectorise (-fno-math-errno) and fuse a * b + c
#: (-ffp-contract=fast, fixed here so that it does not depend on the compiler's
#: default).
_BASE_FLAGS = (
    "-O3",
    "-fno-math-errno",
    "-ffp-contract=fast",
    "-fPIC",
    "-shared",
    "-Wno-psabi",
)


#: vLLM's handlers show it in an engine's log: one line per :func:`build` call.
logger = logging.getLogger("vllm.em_inf")


class BuildError(RuntimeError):
    """The kernels could not be compiled; the message says why."""


@dataclass(frozen=True)
class Build:
    """A compiled library: where it is, and whether this call compiled it."""

    path: Path
    compiled: bool
    seconds: float


def compiler() -> str:
    """The C compiler to use: ``$EM_INF_CC``, else ``gcc`` or ``cc`` on ``PATH``."""
    configured = os.environ.get(COMPILER_ENV, "").strip()
    if configured:
        return configured
    return shutil.which("gcc") or shutil.which("cc") or "cc"


def cpu_description() -> str:
    """The CPU's model and feature flags (what ``-march=native`` compiles for)."""
    wanted = ("vendor_id", "model name", "flags", "features", "cpu model", "isa")
    lines = []
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as info:
            for line in info:
                key = line.split(":", 1)[0].strip().lower()
                if key in wanted and line not in lines:
                    lines.append(line.strip())
                if not line.strip() and lines:  # the first processor is enough
                    break
    except OSError:
        pass
    return "\n".join(lines) or f"{platform.machine()} {platform.processor()}"


def flag_sets(cpu: str) -> list[tuple[str, ...]]:
    """Flags to try, best first: tuned for this CPU (or ``$EM_INF_CPU_ARCH``) with
    OpenMP, then without ``-march`` (a compiler that does not know the CPU), then
    without OpenMP (a compiler without it: one thread)."""
    arch = os.environ.get(ARCH_ENV, "").strip() or "native"
    native = [f"-march={arch}"]
    x86 = platform.machine().lower() in ("x86_64", "amd64")
    if x86 and (arch == "x86-64-v4" or (arch == "native" and " avx512f" in cpu)):
        native.append("-mprefer-vector-width=512")  # compilers default to 256 bits
        if sqrt_method(cpu) == "estimate":
            native.append(SQRT_ESTIMATE_FLAG)
    return [
        (*_BASE_FLAGS, *native, "-fopenmp"),
        (*_BASE_FLAGS, "-fopenmp"),
        (*_BASE_FLAGS, *native),
    ]


def sqrt_method(cpu: str) -> str:
    """How an AVX-512 build takes the update's square root: ``$EM_INF_CPU_SQRT``,
    else ``estimate`` on an Intel CPU (``cpu``: :func:`cpu_description`) and
    ``divider`` on any other.

    Raises:
        BuildError: ``$EM_INF_CPU_SQRT`` is neither choice.
    """
    chosen = os.environ.get(SQRT_ENV, "").strip().lower()
    if chosen and chosen not in SQRT_CHOICES:
        raise BuildError(
            f"{SQRT_ENV}={chosen!r}: expected one of {', '.join(SQRT_CHOICES)}"
        )
    return chosen or ("estimate" if "GenuineIntel" in cpu else "divider")


def _compiler_version(cc: str) -> str:
    try:
        done = subprocess.run(
            [cc, "--version"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"C compiler {cc!r} not usable: {err}") from None
    if done.returncode != 0:
        raise BuildError(f"C compiler {cc!r} not usable: {done.stderr.strip()}")
    return done.stdout


def cache_dir() -> Path:
    from em_inf.models import cache_root

    return cache_root() / "cpu-kernels"


def build(source: Path | None = None) -> Build:
    """The path of the compiled kernels (of ``source``, a variant to measure, or
    of :data:`SOURCE`), compiling them first when no cached build fits this
    source, compiler and machine.

    Raises:
        BuildError: no compiler, or every flag set failed (the message holds the
            compiler's last error).
    """
    started = time.perf_counter()
    logger.info("em-inf: CPU kernels: build or load (pid %d)", os.getpid())
    cc = compiler()
    version = _compiler_version(cc)
    source = SOURCE if source is None else source
    text = source.read_bytes()
    cpu = cpu_description()
    errors = []
    for flags in flag_sets(cpu):
        key = hashlib.sha256(
            b"\0".join(
                [text, cc.encode(), version.encode(), " ".join(flags).encode()]
                + [cpu.encode(), platform.machine().encode()]
            )
        ).hexdigest()[:20]
        target = cache_dir() / f"cpu_kernels-{key}.so"
        if target.exists():
            return Build(target, False, time.perf_counter() - started)
        try:
            _compile(cc, flags, source, target)
        except BuildError as err:
            errors.append(str(err))
            continue
        return Build(target, True, time.perf_counter() - started)
    raise BuildError(errors[-1] if errors else "no flags to try")


def _compile(cc: str, flags: tuple[str, ...], source: Path, target: Path) -> None:
    """Compile ``source`` to ``target`` atomically (other processes may race: each
    writes its own temporary file and renames it into place)."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(
            prefix=target.stem + ".", suffix=".tmp", dir=target.parent
        )
        os.close(handle)
    except OSError as err:
        raise BuildError(
            f"cannot write the kernel cache {target.parent}: {err}"
        ) from None
    try:
        done = subprocess.run(
            [cc, *flags, "-o", temporary, str(source), "-lm"],
            capture_output=True,
            text=True,
            timeout=300,
        )
        if done.returncode != 0:
            message = done.stderr.strip().splitlines()
            raise BuildError(
                f"{cc} {' '.join(flags)} failed: " + " | ".join(message[-3:])
            )
        os.replace(temporary, target)
    except (OSError, subprocess.SubprocessError) as err:
        raise BuildError(f"{cc} failed: {err}") from None
    finally:
        if os.path.exists(temporary):
            os.unlink(temporary)
