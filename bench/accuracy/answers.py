"""Answer extraction and comparison for free-form model responses.

Three kinds of gold answer, three extractors:

* ``number`` (GSM8K): the response's final number: a ``\\boxed{}`` that holds a
  number, else the number after ``####`` or "the (final) answer is", else the last
  number in the text. Numbers compare as exact decimals after dropping thousands
  commas, currency signs, units and a trailing full stop (``1,000.00`` == ``1000``).
* ``math`` (MATH-500): the content of the last ``\\boxed{}`` (else "the final answer
  is ..."), normalised the way MATH answers are usually normalised (``\\dfrac`` ->
  ``\\frac``, no ``\\left``/``\\right``, no spaces, no units or degree signs, ``x = ``
  dropped, ``\\frac12`` -> ``\\frac{1}{2}``, ...) and compared as strings, or as
  numbers where both sides are plain numbers or integer fractions.
* ``choice`` (ARC): a letter ``A``..``E`` among the question's options: "the answer is
  (B)", "Answer: B", a leading "B." / "(B)" / "**B**", a lone letter, or else the one
  option whose full text the response quotes.

Every extractor returns ``None`` when it finds nothing; that counts as wrong.
"""

from __future__ import annotations

import re
from fractions import Fraction

# -- \boxed{...} ------------------------------------------------------------------

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``, ``\\boxed 7``), with
    nested braces balanced; ``None`` if there is none or it is never closed."""
    start, command = max((text.rfind(cmd), cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    rest = text[start + len(command) :]
    if rest.startswith(" ") and not rest.lstrip().startswith("{"):
        # "\boxed 7": the argument is the next token.
        match = re.match(r"\s+([^\s$]+)", rest)
        return match.group(1) if match else None
    rest = rest.lstrip()
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, char in enumerate(rest):
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i].strip()
    return None


# -- numbers (GSM8K) ----------------------------------------------------------------

# A number with optional sign, thousands commas and decimals: -1,234.5, 7, .5
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?"
_NUMBER_RE = re.compile(r"(?<![\w.])(" + _NUMBER + r")(?![\d])")
_ANSWER_IS_RE = re.compile(
    r"(?:final answer|the answer|answer)\s*(?:is|:|=)?\s*:?\s*(?:\\\(|\$)?\s*"
    r"(?:\\boxed\{)?\s*(?:\\\$|\$|£|€|USD\s*)?\s*((?:-\s)?" + _NUMBER + r")",
    re.IGNORECASE,
)
_HASHES_RE = re.compile(r"####\s*(?:\\\$|\$)?\s*(" + _NUMBER + r")")


def normalize_number(text: str) -> Fraction | None:
    """``text`` as an exact number, or ``None``.

    Accepts ``1,234.50``, ``$18``, ``18.``, ``-3``, ``50%``, ``12 dollars``, ``3/4``
    and ``\\frac{3}{4}``; anything with letters before the number or other symbols is
    rejected.
    """
    cleaned = text.strip()
    cleaned = re.sub(r"\\text\{([^{}]*)\}", r"\1", cleaned)
    cleaned = cleaned.replace("\\$", "").replace("$", "").replace("\\%", "")
    cleaned = cleaned.replace("%", "").replace("£", "").replace("€", "")
    cleaned = cleaned.replace("\\!", "").replace("{,}", ",").strip()
    cleaned = re.sub(r"^-\s+(?=\d)", "-", cleaned)  # "- 10" -> "-10"
    cleaned = re.sub(r"^(?:[a-zA-Z]\s*=\s*)", "", cleaned)  # "x = 5"
    cleaned = re.sub(r"\s*[a-zA-Z][a-zA-Z .]*$", "", cleaned)  # trailing units
    cleaned = cleaned.rstrip(".").strip()
    frac = re.fullmatch(r"(-?)\\[dt]?frac\{(-?\d+)\}\{(-?\d+)\}", cleaned)
    if frac:
        sign, num, den = frac.groups()
        if int(den) == 0:
            return None
        value = Fraction(int(num), int(den))
        return -value if sign else value
    slash = re.fullmatch(r"(-?\d+)\s*/\s*(-?\d+)", cleaned)
    if slash:
        num, den = (int(part) for part in slash.groups())
        return Fraction(num, den) if den else None
    if not re.fullmatch(_NUMBER, cleaned) or not re.search(r"\d", cleaned):
        return None
    return Fraction(cleaned.replace(",", ""))


def extract_number(text: str) -> str | None:
    """The final numeric answer of a worked solution, as written (commas and all)."""
    boxed = extract_boxed(text)
    if boxed is not None and normalize_number(boxed) is not None:
        return boxed
    for pattern in (_HASHES_RE, _ANSWER_IS_RE):
        matches = [m for m in pattern.findall(text) if re.search(r"\d", m)]
        if matches:
            return matches[-1]
    numbers = [m for m in _NUMBER_RE.findall(text) if re.search(r"\d", m)]
    return numbers[-1] if numbers else None


def numbers_equal(predicted: str | None, gold: str) -> bool:
    """Exact numeric equality after normalisation; ``None`` never matches."""
    if predicted is None:
        return False
    pred_value, gold_value = normalize_number(predicted), normalize_number(gold)
    return pred_value is not None and pred_value == gold_value


# -- MATH answers -------------------------------------------------------------------

_FINAL_ANSWER_RE = re.compile(
    r"final answer is\s*:?\s*\$?(.+?)\$?(?:\.\s|\.?$|\n)", re.IGNORECASE
)


def extract_math_answer(text: str) -> str | None:
    """The last ``\\boxed{}``; else what follows "final answer is"."""
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed
    matches = _FINAL_ANSWER_RE.findall(text)
    return matches[-1].strip() if matches else None


def _fix_fracs(text: str) -> str:
    """``\\frac12`` -> ``\\frac{1}{2}``, ``\\frac1{2}`` -> ``\\frac{1}{2}``."""
    text = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", text)
    text = re.sub(r"\\frac(\d)\{", r"\\frac{\1}{", text)
    return re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", text)


def normalize_math(answer: str) -> str:
    """A canonical string for a MATH answer (see the module docstring)."""
    text = answer.strip()
    text = text.replace("\n", "").replace("\\!", "").replace("\\,", "")
    text = text.replace("\\;", "").replace("\\:", "").replace("~", "")
    text = text.replace("\\\\", "\\")
    text = text.replace("tfrac", "frac").replace("dfrac", "frac")
    text = text.replace("\\left", "").replace("\\right", "")
    text = re.sub(r"\^\s*\{?\\circ\}?", "", text)
    text = text.replace("\\degree", "").replace("°", "")
    text = text.replace("\\$", "").replace("$", "")
    text = text.replace("\\%", "").replace("%", "")
    text = re.sub(r"\\(?:text|textbf|mathrm|mbox)\{\s*([^{}]*?)\s*\}", r"\1", text)
    # Units and words after a value: "5 cm", "10 inches", "4 units" (not "x").
    text = re.sub(
        r"(?<=\d)\s*(?:cm|m|km|inches|inch|in|feet|ft|units|unit|degrees|sq\.?"
        r"|square|meters|dollars|cents|hours|minutes|seconds|days)\b.*$",
        "",
        text,
    )
    # "x = 5", "k = 3" (a short variable on the left): keep the value.
    text = re.sub(r"^\s*[a-zA-Z](?:_\{?\w+\}?)?\s*=\s*", "", text)
    text = text.replace(" ", "")
    text = _fix_fracs(text)
    text = re.sub(r"\\sqrt(\w)", r"\\sqrt{\1}", text)
    text = re.sub(r"(?<![\d])\.(\d)", r"0.\1", text)  # ".5" -> "0.5"
    if re.fullmatch(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?", text):  # 1,000 -> 1000
        text = text.replace(",", "")
    if re.fullmatch(r"-?\d+\.0+", text):  # 5.00 -> 5
        text = text.split(".")[0]
    text = text.rstrip(".")
    slash = re.fullmatch(r"(-?\d+)/(\d+)", text)
    if slash:
        text = f"\\frac{{{slash.group(1)}}}{{{slash.group(2)}}}"
    return text


def math_equal(predicted: str | None, gold: str) -> bool:
    """Normalised string equality, or numeric equality of plain numbers/fractions."""
    if predicted is None:
        return False
    pred_norm, gold_norm = normalize_math(predicted), normalize_math(gold)
    if pred_norm == gold_norm:
        return True
    pred_value, gold_value = normalize_number(pred_norm), normalize_number(gold_norm)
    return pred_value is not None and pred_value == gold_value


# -- multiple choice (ARC) ----------------------------------------------------------

_LETTERS = "ABCDEFGH"


def choice_letters(n_choices: int) -> str:
    """The option letters of a question with ``n_choices`` options: ``ABCD``..."""
    if not 1 <= n_choices <= len(_LETTERS):
        raise ValueError(f"n_choices must be in [1, {len(_LETTERS)}], got {n_choices}")
    return _LETTERS[:n_choices]


def extract_choice(
    text: str, n_choices: int, options: list[str] | None = None
) -> str | None:
    """The option letter a response picks, or ``None``.

    Args:
        text: the model's response.
        n_choices: how many options the question has (letters ``A``... beyond are
            ignored).
        options: the option texts; used only when no letter is found, to accept a
            response that quotes exactly one option.
    """
    letters = choice_letters(n_choices)
    cls = f"[{letters}]"
    stripped = text.strip()
    patterns = (
        # "The answer is (B)", "answer: B", "correct answer is **C**", "Answer - D"
        rf"(?:answer|option|choice)\s*(?:is|:|-|=)?\s*(?:option|choice)?\s*:?\s*"
        rf"[\*\(\[\s]*({cls})(?![a-zA-Z])",
        # "\boxed{B}"
        rf"\\boxed\{{\s*(?:\\text\{{)?({cls})\}}",
    )
    for pattern in patterns:
        matches = re.findall(pattern, stripped, flags=re.IGNORECASE)
        matches = [m for m in matches if m in letters]  # keep case-correct letters
        if matches:
            return matches[-1]
    # A leading letter: "B", "B.", "B)", "(B)", "**B**", "B: water"
    lead = re.match(rf"^[\*\(\[\s]*({cls})(?:[\.\):\]\*,]|\s*$|\s+-|\s)", stripped)
    if lead:
        return lead.group(1)
    # A lone letter on a line of its own, or in parentheses somewhere.
    lone = re.findall(rf"(?:^|\n)\s*\(?({cls})\)?\s*(?:\n|$)", stripped)
    if lone:
        return lone[-1]
    paren = re.findall(rf"\(({cls})\)", stripped)
    if len(set(paren)) == 1:
        return paren[0]
    if options:
        lowered = stripped.lower()
        quoted = [
            letters[i]
            for i, option in enumerate(options[:n_choices])
            if option.strip() and option.strip().lower().rstrip(".") in lowered
        ]
        if len(quoted) == 1:
            return quoted[0]
    return None


# -- one entry point ------------------------------------------------------------------


def score(
    kind: str, response: str, gold: str, options: list[str] | None = None
) -> tuple[str | None, bool]:
    """(extracted answer, correct?) for one response.

    Args:
        kind: ``"number"``, ``"math"`` or ``"choice"``.
        response: the model's text.
        gold: the gold answer (a number, a LaTeX answer, or a letter).
        options: the option texts (``choice`` only).
    """
    if kind == "number":
        predicted = extract_number(response)
        return predicted, numbers_equal(predicted, gold)
    if kind == "math":
        predicted = extract_math_answer(response)
        return predicted, math_equal(predicted, gold)
    if kind == "choice":
        if options is None:
            raise ValueError("score(kind='choice') needs the option texts")
        predicted = extract_choice(response, len(options), options)
        return predicted, predicted == gold
    raise ValueError(f"unknown answer kind {kind!r}; use number, math or choice")
