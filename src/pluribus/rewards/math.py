"""Math answer checking for GSM8K/MATH-style data: extract the final answer, compare with the gold.

The final answer of a response is its last balanced `\\boxed{...}`, else the text after its last
GSM8K `####` marker, else its last number. A gold answer is read the same way when it carries a
box or a marker (GSM8K's gold is a worked solution ending in `#### 42`), else taken whole.

Two comparisons, the first that says "equal" wins:
1. a strict normalisation of our own (dollar signs, thousands commas, `\\dfrac`, `\\text{}`,
   trailing `.0`; numbers and fractions compared as exact rationals within 1e-6 relative, the
   precision `math_verify` rounds floats to), cheap and always available;
2. `math_verify` (`parse` + `verify`, the `math` extra) when installed: symbolic equivalence
   (`\\frac{\\sqrt2}{2}` = `\\sqrt{2}/2`, `x=5` = `5`, sets, intervals).

Departures, and why:
- `math_verify` bounds its work with `signal.alarm`, which only the main thread may use; in a
  worker thread it raises. We pass its timeouts (`parsing_timeout`, `timeout_seconds`) only on
  the main thread and `None` elsewhere, so the checker works in thread pools. Without a timeout a
  power tower (`9^{9^{9}}`) or a huge expansion (`(x+1)^{1000}`) would hold the GIL for minutes,
  so answers that could explode that way (nested or huge exponents, chained factorials, very long
  answers) skip `math_verify` everywhere and are judged by the normalisation alone.
- Anything malformed (no answer, unbalanced braces, non-text input) scores 0.0: the checker never
  raises, since it reads untrusted model output.
"""

from __future__ import annotations

import functools
import logging
import re
import threading
from fractions import Fraction
from typing import Any

# math_verify rounds floats to 6 decimals before comparing; match it so both paths agree.
_REL_TOL = 1e-6
# Longer answers are not final answers worth a symbolic comparison; they cost time.
_MAX_ANSWER_CHARS = 300
# The largest integer allowed in an exponent before an answer is judged by normalisation only.
_MAX_EXPONENT = 200
_MATH_VERIFY_TIMEOUT_S = 5

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+)?|-?\.\d+")


def check_math(response: str, answer: str) -> float:
    """1.0 when the response's final answer equals the gold `answer`, else 0.0; never raises."""
    try:
        if not isinstance(response, str) or not isinstance(answer, str):
            return 0.0
        predicted = extract_answer(response)
        gold = _gold_answer(answer)
        if predicted is None or gold is None:
            return 0.0
        if answers_match(predicted, gold):
            return 1.0
        return float(_math_verify_equal(predicted, gold))
    except Exception:  # untrusted text: a checker bug must cost the sample, not the run
        return 0.0


def extract_answer(response: str) -> str | None:
    """The final answer of a response: last balanced `\\boxed{}`, else after `####`, else last number."""
    marked = _marked_answer(response)
    if marked is not None:
        return marked
    numbers = _NUMBER.findall(response)
    return numbers[-1].strip() if numbers else None


def _marked_answer(text: str) -> str | None:
    """What the text marks as its answer: the last balanced `\\boxed{}`, else the line after `####`."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    return _after_marker(text)


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (or `\\fbox{...}`) whose braces balance, else None.

    `\\boxed 5` (no braces, as TeX allows for one token) gives `5`.
    """
    starts = [m.end() for m in re.finditer(r"\\(?:boxed|fbox)", text)]
    for start in reversed(starts):
        i = start
        while i < len(text) and text[i] == " ":
            i += 1
        if i < len(text) and text[i] == "{":
            content = _balanced(text, i)
            if content is not None:
                return content
        elif i > start:
            token = re.match(r"[^\s$]+", text[i:])
            if token:
                return token.group(0)
    return None


def answers_match(predicted: str, gold: str) -> bool:
    """Equality after our normalisation: exact rationals (within 1e-6 relative), else the strings."""
    a, b = normalize_answer(predicted), normalize_answer(gold)
    if not a or not b:
        return False
    x, y = _to_fraction(a), _to_fraction(b)
    if x is not None and y is not None:
        return abs(x - y) <= _REL_TOL * max(1, abs(y))
    return a == b


def normalize_answer(text: str) -> str:
    """A canonical spelling of a short answer: no dollar signs, text markup, spaces or thousands commas."""
    s = text.strip()
    s = re.sub(r"\\text\{(.*?)\}|\\textbf\{(.*?)\}|\\mathrm\{(.*?)\}|\\mbox\{(.*?)\}",
               lambda m: next(g for g in m.groups() if g is not None), s)
    s = s.replace("\\$", "").replace("$", "")
    s = re.sub(r"\\[dt]frac", r"\\frac", s)
    s = re.sub(r"\\left|\\right|\\[!,;: ]", "", s)
    s = re.sub(r"\^\s*\{?\s*\\circ\s*\}?", "", s)
    s = s.replace("\\%", "").replace("%", "")
    s = re.sub(r"\s+", "", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)
    s = re.sub(r"^[a-zA-Z]\w*=(?=[^=])", "", s)  # "x=5" -> "5"
    s = s.rstrip(".")
    return s if "\\" in s else s.lower()  # "B" = "b", but "\\Pi" is not "\\pi"


def _to_fraction(s: str) -> Fraction | None:
    """An exact rational for an integer, decimal, `a/b` or `\\frac{a}{b}`, else None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s) or \
        re.fullmatch(r"(-?)\\frac(\d)(\d)", s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * num / den
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
    if m:
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)", s) and len(s) < 1000:
        return Fraction(s)
    return None


def _gold_answer(answer: str) -> str | None:
    marked = _marked_answer(answer)
    return marked if marked is not None else answer.strip() or None


def _after_marker(text: str) -> str | None:
    """The rest of the line after the last GSM8K `####` marker, if any."""
    at = text.rfind("####")
    if at < 0:
        return None
    rest = text[at + 4:].strip().splitlines()
    return rest[0].strip() if rest and rest[0].strip() else None


def _balanced(text: str, open_at: int) -> str | None:
    """The text inside the brace group opening at `open_at`, or None when it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1:i]
    return None


# --- math_verify ------------------------------------------------------------------------------

@functools.cache
def _math_verify() -> Any:
    """The `math_verify` module, or None when the `math` extra is not installed."""
    try:
        import math_verify
    except ImportError:
        return None
    # Its one-off warning that timeouts are off is for callers who did not bound the work;
    # _too_costly does that here, so drop that message (and only that one).
    for name in ("math_verify.parser", "math_verify.grader"):
        logging.getLogger(name).addFilter(
            lambda record: not record.getMessage().startswith("Timeout is disabled"))
    return math_verify


def _math_verify_equal(predicted: str, gold: str) -> bool:
    mv = _math_verify()
    if mv is None or _too_costly(predicted) or _too_costly(gold):
        return False
    # signal.alarm works on the main thread only; elsewhere math_verify must run without it.
    timeout = _MATH_VERIFY_TIMEOUT_S if threading.current_thread() is threading.main_thread() else None
    gold_parsed = mv.parse(f"${gold}$", parsing_timeout=timeout)
    predicted_parsed = mv.parse(f"${predicted}$", parsing_timeout=timeout)
    if not gold_parsed or not predicted_parsed:
        return False
    return bool(mv.verify(gold_parsed, predicted_parsed, timeout_seconds=timeout))


def _too_costly(expr: str) -> bool:
    """Whether a symbolic comparison of `expr` could run away: towers, huge powers, big factorials."""
    s = expr.replace("**", "^")
    if len(s) > _MAX_ANSWER_CHARS:
        return True
    if re.search(r"!\s*!|[)}]\s*!|\d{5,}\s*!", s):
        return True
    for m in re.finditer(r"\^", s):
        exponent, end = _exponent_at(s, m.end())
        if exponent is None or "^" in exponent or "!" in exponent:
            return True
        if any(int(n) > _MAX_EXPONENT for n in re.findall(r"\d+", exponent)):
            return True
        if s[end:].lstrip().startswith("^"):  # 2^3^4: a tower without braces
            return True
    return False


def _exponent_at(s: str, i: int) -> tuple[str | None, int]:
    """The exponent starting at `i` (a brace or parenthesis group, else one token) and where it ends."""
    while i < len(s) and s[i] == " ":
        i += 1
    if i >= len(s):
        return "", i
    if s[i] in "{(":
        close = "}" if s[i] == "{" else ")"
        depth = 0
        for j in range(i, len(s)):
            depth += s[j] == s[i]
            depth -= s[j] == close
            if depth == 0:
                return s[i + 1:j], j + 1
        return None, len(s)
    m = re.match(r"-?\d+|\\[a-zA-Z]+|.", s[i:], flags=re.DOTALL)
    return m.group(0), i + m.end()
