"""Running the benchmarks from a plain copy of the tree (no ``pip install``), as on
the GPU machine."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path


def map_kernels_package() -> None:
    """Make ``em_inf.kernels`` importable from a plain checkout: the installed
    package maps it to the top-level ``kernels/`` folder (pyproject's
    ``package-dir``), a copied tree does not, so register the folder by hand."""
    try:
        if importlib.util.find_spec("em_inf.kernels") is not None:
            return
    except ModuleNotFoundError:
        pass
    folder = Path(__file__).resolve().parents[1] / "kernels"
    spec = importlib.util.spec_from_file_location(
        "em_inf.kernels",
        folder / "__init__.py",
        submodule_search_locations=[str(folder)],
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["em_inf.kernels"] = module
    spec.loader.exec_module(module)
