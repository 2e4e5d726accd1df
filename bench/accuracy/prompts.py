"""Chat messages for each task. The model's own chat template turns them into a
prompt (vLLM's tokenizer offline, the server's template online), so one wording
serves every instruction-tuned model.

The math wording is the one Qwen2.5-Math/Instruct models are evaluated with
("Please reason step by step, and put your final answer within \\boxed{}.").
"""

from __future__ import annotations

from bench.accuracy.answers import choice_letters
from bench.accuracy.datasets import Problem

MATH_INSTRUCTION = (
    "Please reason step by step, and put your final answer within \\boxed{}."
)
CHOICE_INSTRUCTION = "Answer with the letter of the correct option ({letters})."


def user_message(problem: Problem) -> str:
    """The user turn: the question (and options) plus the answer-format instruction."""
    if problem.kind in ("number", "math"):
        return f"{problem.question}\n{MATH_INSTRUCTION}"
    letters = choice_letters(len(problem.options))
    lines = [problem.question, ""]
    lines += [
        f"{letter}. {text}"
        for letter, text in zip(letters, problem.options, strict=True)
    ]
    listed = ", ".join(letters[:-1]) + f" or {letters[-1]}"
    lines += ["", CHOICE_INSTRUCTION.format(letters=listed)]
    return "\n".join(lines)


def messages(problem: Problem, system: str | None = None) -> list[dict[str, str]]:
    """OpenAI-style chat messages; ``system`` adds a system turn."""
    turns = [{"role": "system", "content": system}] if system else []
    return [*turns, {"role": "user", "content": user_message(problem)}]
