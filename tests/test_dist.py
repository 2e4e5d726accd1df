"""What ``make dist`` builds is em-inf, whole: the wheel, installed into a throw-away
environment beside the test one, runs without this checkout.

The throw-away environment is a fresh venv holding only the built wheel; it reaches
em-inf's dependencies (torch, vLLM, ...) through a ``.pth`` line naming the test
environment's site-packages, which puts them on ``sys.path`` after its own. The test
environment's editable em-inf is not among them (an editable install is a path hook
that only its own ``site-packages`` activates), so every ``em_inf`` module imported
there comes from the wheel: the test checks each one's file.
"""

from __future__ import annotations

import json
import site
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest

from tests.version_matrix import ROOT

#: The command ``make dist`` runs (Makefile), with the output folder appended.
BUILD = [sys.executable, "-m", "build", "--outdir"]


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("dist")
    result = subprocess.run(
        [*BUILD, str(out), str(ROOT)], capture_output=True, text=True, timeout=900
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    [wheel] = out.glob("em_inf-*.whl")
    [sdist] = out.glob("em_inf-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist}


@pytest.fixture(scope="module")
def installed(built, tmp_path_factory) -> Path:
    """A fresh venv with the wheel installed (no dependencies); its ``python``."""
    root = tmp_path_factory.mktemp("throwaway")
    venv = root / "venv"
    subprocess.run(
        [sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True
    )
    python = venv / "bin" / "python"
    pip = [
        sys.executable,
        "-m",
        "pip",
        "--python",
        str(python),
        "--disable-pip-version-check",
    ]
    result = subprocess.run(
        [*pip, "install", "--no-deps", "-q", str(built["wheel"])],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    [own_site] = (venv / "lib").glob("python3*/site-packages")
    (own_site / "test-environment.pth").write_text(
        "\n".join(site.getsitepackages()) + "\n"
    )
    return python


def run_in(python: Path, program: str, tmp_path: Path, **env) -> str:
    result = subprocess.run(
        [str(python), "-c", textwrap.dedent(program)],
        cwd=tmp_path,  # not the checkout: nothing may come from it
        capture_output=True,
        text=True,
        timeout=600,
        env={"PATH": "/usr/bin:/bin", "HOME": str(Path.home()), **env},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout


def test_the_wheel_carries_every_package_and_the_c_source(built):
    names = set(zipfile.ZipFile(built["wheel"]).namelist())
    for module in ("em_inf/processor.py", "em_inf/cpu_kernels.c"):
        assert module in names, sorted(names)
    for package in ("em_inf/kernels/", "em_inf/server/"):
        assert any(name.startswith(package) for name in names), package
    assert not any(name.startswith("tests/") for name in names)
    # What tests and bench share, the tiny-model builder included, stays out.
    assert not any(name.startswith("em_inf_support/") for name in names)
    assert "em_inf/models.py" in names


def test_the_sdist_builds_the_same_packages(built):
    with tarfile.open(built["sdist"]) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for path in ("em_inf/cpu_kernels.c", "kernels/step.py", "server/launch.py"):
        assert path in names, path
    assert "pyproject.toml" in names and "README.md" in names


def test_installed_wheel_imports_processor_kernels_and_server(installed, tmp_path):
    report = run_in(
        installed,
        """
        import json, em_inf, em_inf.kernels, em_inf.server, em_inf.server.launch
        from em_inf import EMInf
        print(json.dumps({
            "em_inf": em_inf.__file__,
            "kernels": em_inf.kernels.__file__,
            "server": em_inf.server.__file__,
            "processor": __import__("sys").modules[EMInf.__module__].__file__,
        }))
        """,
        tmp_path,
    )
    files = json.loads(report)
    venv = installed.parents[1]
    for name, path in files.items():
        assert Path(path).is_relative_to(venv), f"{name} from {path}, not the wheel"


def test_installed_wheel_compiles_the_cpu_kernels_from_its_own_source(
    installed, tmp_path
):
    cache = tmp_path / "cache"
    report = run_in(
        installed,
        """
        import json
        from em_inf import cpu_backend, cpu_build
        print(json.dumps({"available": cpu_backend.available(),
                          "reason": cpu_backend.unavailable_reason(),
                          "source": str(cpu_build.SOURCE)}))
        """,
        tmp_path,
        EM_INF_CACHE=str(cache),
    )
    state = json.loads(report)
    assert state["available"], state["reason"]
    assert Path(state["source"]).is_relative_to(installed.parents[1]), state
    assert list((cache / "cpu-kernels").rglob("*.so")), "nothing compiled"


def test_installed_console_script_answers_help(installed, tmp_path):
    script = installed.with_name("em-inf")
    result = subprocess.run(
        [str(script), "serve", "--help=all"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--em-inf-preset" in result.stdout
    assert "--tensor-parallel-size" in result.stdout  # vLLM's own flags
