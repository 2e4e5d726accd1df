"""The C kernels' interface: the prototypes em_inf.cpu_backend declares, read the
same way as the text cpu_kernels.c exports for each entry point, and a library that
differs from them in one argument (or a declaration that differs from the library)
refused at load, with the function, the argument and both types named."""

from __future__ import annotations

import ctypes
import logging
import re
from collections.abc import Callable

import pytest

from em_inf import cpu_backend, cpu_build
from em_inf.cpu_backend import InterfaceError, Prototype

pytestmark = pytest.mark.usefixtures("compiled_cpu_kernels")


def test_a_prototype_is_read_into_types_and_names():
    read = Prototype.parse("int64_t  f(const float*x,\n   int64_t n, void *scratch)")
    assert read == Prototype(
        "int64_t",
        "f",
        (("const float *", "x"), ("int64_t", "n"), ("void *", "scratch")),
    )
    assert Prototype.parse("int g(void)") == Prototype("int", "g", ())


@pytest.mark.parametrize(
    "text", ["f(int n)", "int f(int)", "int f(int n[])", "int f(void (*cb)(int))"]
)
def test_a_prototype_it_cannot_read_is_refused(text):
    with pytest.raises(InterfaceError, match="cannot read|unnamed argument"):
        Prototype.parse(text)


def test_the_loaded_kernels_take_the_declared_ctypes_types():
    """em_inf_logits' ctypes types, against the list cpu_backend.py held by hand."""
    library = cpu_backend.load()
    pointer, i64, f64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_double
    i32 = ctypes.c_int
    assert library.em_inf_logits.restype is None
    assert list(library.em_inf_logits.argtypes) == (
        [pointer, pointer, i64, i64, i64, pointer, i64, pointer, pointer, pointer]
        + [pointer, f64, f64, f64, pointer, pointer, pointer, i32, i64, i32]
    )
    assert library.em_inf_scratch_bytes.restype is i64
    assert list(library.em_inf_lanes.argtypes) == []


def test_the_library_matches_the_declaration():
    declared = tuple(Prototype.parse(text) for text in cpu_backend.PROTOTYPES)
    cpu_backend.check_interface(cpu_backend.load(), declared)  # raises on a mismatch


def declaration_with(old: str, new: str) -> tuple[Prototype, ...]:
    """cpu_backend.PROTOTYPES, read, with ``old`` replaced by ``new`` (once)."""
    assert "\n".join(cpu_backend.PROTOTYPES).count(old) == 1, old
    texts = (text.replace(old, new) for text in cpu_backend.PROTOTYPES)
    return tuple(Prototype.parse(text) for text in texts)


#: (text in PROTOTYPES, its replacement, the error it must raise).
PYTHON_SIDE_CHANGES = [
    (
        "double beta1",
        "float beta1",
        "em_inf_logits does not match its declaration in cpu_backend.py: argument 12"
        " is 'double beta1' in cpu_kernels.c, 'float beta1' in cpu_backend.py",
    ),
    (
        "double beta1, double beta2",
        "double beta2, double beta1",
        "em_inf_logits does not match its declaration in cpu_backend.py: argument 12"
        " is 'double beta1' in cpu_kernels.c, 'double beta2' in cpu_backend.py",
    ),
    (
        "double *sums, int threads)",
        "double *sums)",
        "em_inf_exp_floor does not match its declaration in cpu_backend.py: "
        "argument 5 is 'int threads' in cpu_kernels.c, absent in cpu_backend.py",
    ),
    (
        "int64_t em_inf_scratch_bytes",
        "int em_inf_scratch_bytes",
        "em_inf_scratch_bytes does not match its declaration in cpu_backend.py: "
        "returns int64_t in cpu_kernels.c, int in cpu_backend.py",
    ),
    (
        "int em_inf_lanes(void)",
        "int em_inf_lane_count(void)",
        "cpu_kernels.c exports no prototype for em_inf_lane_count",
    ),
]


@pytest.mark.parametrize(
    "old, new, error",
    PYTHON_SIDE_CHANGES,
    ids=["type", "order", "missing", "return-type", "no-such-function"],
)
def test_a_declaration_that_differs_from_the_library_is_refused(old, new, error):
    declared = declaration_with(old, new)
    with pytest.raises(InterfaceError, match=re.escape(error)):
        cpu_backend.check_interface(cpu_backend.load(), declared)


@pytest.fixture
def load_fresh(monkeypatch) -> Callable[[], tuple[ctypes.CDLL | None, str | None]]:
    """cpu_backend.load() as in a new process (its state is restored afterwards);
    returns (library or None, unavailable_reason())."""
    monkeypatch.setattr(cpu_backend, "_library", None)
    monkeypatch.setattr(cpu_backend, "_failure", None)

    def load() -> tuple[ctypes.CDLL | None, str | None]:
        return cpu_backend.load(), cpu_backend.unavailable_reason()

    return load


def test_load_refuses_a_declaration_that_differs(load_fresh, monkeypatch, caplog):
    old, new, error = PYTHON_SIDE_CHANGES[0]
    monkeypatch.setattr(cpu_backend, "_DECLARED", declaration_with(old, new))
    with caplog.at_level(logging.WARNING, logger=cpu_backend.__name__):
        library, reason = load_fresh()
    assert library is None and reason == error
    assert [record.getMessage() for record in caplog.records] == [
        f"em-inf: compiled CPU kernels unavailable ({error}); using the slower "
        "eager PyTorch path"
    ]


#: (text in cpu_kernels.c, its replacement, the error loading it must raise).
C_SIDE_CHANGES = [
    (
        "int64_t sample, int threads)",
        "int64_t sample, int64_t threads)",
        "em_inf_logits does not match its declaration in cpu_backend.py: argument 20"
        " is 'int64_t threads' in cpu_kernels.c, 'int threads' in cpu_backend.py",
    ),
    (
        "const float *alpha, const float *t_min,",
        "const double *alpha, const float *t_min,",
        "em_inf_temperature does not match its declaration in cpu_backend.py: "
        "argument 9 is 'const double *alpha' in cpu_kernels.c, 'const float *alpha'"
        " in cpu_backend.py",
    ),
]


@pytest.mark.parametrize(
    "old, new, error", C_SIDE_CHANGES, ids=["int-to-int64", "pointer-to-double"]
)
def test_load_refuses_kernels_built_with_another_argument_type(
    old, new, error, load_fresh, tmp_path, monkeypatch
):
    """A copy of cpu_kernels.c with one argument's type changed builds (C cannot
    see the difference) and is refused at load; the eager path is used instead."""
    source = cpu_build.SOURCE.read_text()
    assert source.count(old) == 1, old
    changed = tmp_path / "cpu_kernels.c"
    changed.write_text(source.replace(old, new))
    monkeypatch.setattr(cpu_build, "SOURCE", changed)
    monkeypatch.setenv("EM_INF_CACHE", str(tmp_path))
    library, reason = load_fresh()
    assert library is None and reason == error
    assert any(tmp_path.glob("cpu-kernels/cpu_kernels-*.so"))  # it did build
