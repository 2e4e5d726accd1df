"""The release watch: ``make vllm-watch`` (``python -m tests.vllm_watch``).

The test suite is hermetic: its result never depends on what the package index
holds. This command is the other half. It asks the index for vLLM's releases and

1. fails on any release that the ``vllm`` extra admits and the matrix has not
   proven (a patch or ``.post`` release inside the range included): pip could
   install it for a user today;
2. for each release newer than the newest proven one, fetches its layer (printing
   the wheel's sha256, to pin in ``LAYERS`` of tests/vllm_layers.py), runs the
   matrix's layer run on it (the serve surface, the processor, a whole engine and
   ``em-inf serve``) and prints what breaks; it fails when anything does.

``--notice`` (what ``make test`` runs) only prints one line when a newer release
is out, naming it and this command, and never fails: not even without an index.

How the supported range grows: when this command passes on a new release, add
it to ``LAYERS`` with its sha256 (and the light dependencies it needs), widen the
``vllm`` extra's upper bound in pyproject.toml to it, and run ``make test``.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys

from packaging.version import Version

from tests.version_matrix import execute, imported_vllm, layer_run, vllm_extra
from tests.vllm_layers import END_TO_END, LAYERS, Layer, prepare_layer

PROVEN = {Version(v) for v in (END_TO_END, *LAYERS)}
COMMAND = "make vllm-watch"


def released_versions() -> list[Version]:
    """vLLM's releases on the package index (``pip index versions vllm``), oldest
    first.

    Raises:
        RuntimeError: pip could not ask the index, or answered in a form not known.
    """
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = re.search(r"Available versions: (.+)", result.stdout)
    if result.returncode != 0 or found is None:
        raise RuntimeError(f"pip index versions vllm: {result.stderr.strip()[-300:]}")
    return sorted(Version(v) for v in found.group(1).split(", "))


def admitted_unproven(releases: list[Version]) -> list[Version]:
    """Releases the ``vllm`` extra admits that the matrix has not proven."""
    specifier = vllm_extra().specifier
    return [v for v in releases if specifier.contains(v, True) and v not in PROVEN]


def newer_than_proven(releases: list[Version]) -> list[Version]:
    newest = max(PROVEN)
    return [v for v in releases if v > newest and not v.is_prerelease]


def notice() -> int:
    """One line for ``make test``; always 0."""
    try:
        newer = newer_than_proven(released_versions())
    except (RuntimeError, OSError, subprocess.TimeoutExpired) as error:
        print(f"vLLM release watch: could not ask the package index ({error})")
        return 0
    if newer:
        names = ", ".join(map(str, newer))
        print(
            f"notice: vLLM {names} is out and em-inf has not been checked on it "
            f"(users keep vLLM {max(PROVEN)}); `{COMMAND}` checks it"
        )
    return 0


def try_release(version: Version) -> bool:
    """Run the matrix's layer run on an unpinned ``version``; print the outcome."""
    newest_layer = LAYERS[str(max(map(Version, LAYERS)))]
    layer = Layer(sha256=None, dependencies=newest_layer.dependencies)
    try:
        prepare_layer(str(version), layer)
    except RuntimeError as error:
        print(f"vLLM {version}: the layer could not be prepared: {error}")
        return False
    run = layer_run(str(version))
    environment = run.environment()
    print(f"vLLM {version}: imports as {imported_vllm(environment)}", flush=True)
    outcome = execute(run, environment)
    print(f"vLLM {version}: {outcome.counts} (exit {outcome.returncode})")
    if outcome.returncode != 0:
        failed = re.findall(r"^(?:FAILED|ERROR) .*$", outcome.output, re.MULTILINE)
        print("\n".join(failed) or outcome.tail())
    return outcome.returncode == 0


def watch() -> int:
    releases = released_versions()
    status = 0
    unproven = admitted_unproven(releases)
    if unproven:
        print(
            f"the `vllm` extra admits {', '.join(map(str, unproven))}, which the "
            "matrix has not proven: add them to LAYERS (tests/vllm_layers.py) or "
            "close the extra's range below them"
        )
        status = 1
    newer = newer_than_proven(releases)
    if not newer:
        print(f"no vLLM release newer than {max(PROVEN)} (the newest proven)")
    for version in newer:
        if not try_release(version):
            status = 1
    return status


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tests.vllm_watch")
    parser.add_argument(
        "--notice", action="store_true", help="one line if a newer vLLM is out"
    )
    args = parser.parse_args(argv)
    return notice() if args.notice else watch()


if __name__ == "__main__":
    sys.exit(main())
