"""IFEval-style verifiable instructions: a registry of constraint checkers keyed by IFEval's ids.

Data come as in IFEval (Zhou et al., 2023): a prompt's `instruction_id_list` and, aligned with
it, `kwargs` (one dict of arguments per instruction), kept in a `Record`'s `meta`. The reward
is the fraction of the instructions the response follows; prompt-level accuracy is reward == 1.
`strict=False` is IFEval's loose mode: an instruction also counts as followed when the response
follows it after dropping its first and/or last line, and/or every `*` (markdown emphasis).

Our own implementation of the published definitions. Where it departs from the reference code:
- keywords (`existence`, `frequency`) match as whole words, case-insensitively; the reference
  matches substrings, so "cat" would count inside "category": a reward open to that hack teaches it;
- a postscript must start a line; the reference finds the marker anywhere;
- `change_case:english_*` check the case only: the reference also runs a language detector,
  which we do not ship, and `language:response_language` is unsupported for the same reason;
- sentences are split by our own rules (terminal `.`, `!`, `?`; not after common abbreviations,
  initials, acronyms, decimals or inside ellipses), close to the reference's splitter.
Arguments IFEval leaves null (the Hugging Face copy carries every key, mostly null) are dropped
before a checker is called; a missing or unexpected argument is a clear error, never a guess.
"""

from __future__ import annotations

import inspect
import json
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from pluribus.errors import PluribusError

Checker = Callable[..., bool]
"""`checker(response, **kwargs) -> bool`: whether `response` follows the instruction."""

CONSTRAINTS: dict[str, Checker] = {}
"""Every known instruction id -> its checker. Register more with `@constraint("group:name")`."""

_UNSUPPORTED = {
    "language:response_language": "it needs a language detector, which pluribus does not ship",
}
_RELATIONS = ("less than", "at least")


def constraint(instruction_id: str) -> Callable[[Checker], Checker]:
    """Register `checker(response, **kwargs) -> bool` under an IFEval instruction id."""
    def register(checker: Checker) -> Checker:
        CONSTRAINTS[instruction_id] = checker
        return checker
    return register


def check_ifeval(response: str, instruction_ids: Sequence[str],
                 kwargs_list: Sequence[Mapping[str, Any] | None] | None = None, strict: bool = True) -> float:
    """The fraction of the instructions that `response` follows, in [0, 1]."""
    verdicts = ifeval_verdicts(response, instruction_ids, kwargs_list, strict=strict)
    return sum(verdicts) / len(verdicts)


def ifeval_verdicts(response: str, instruction_ids: Sequence[str],
                    kwargs_list: Sequence[Mapping[str, Any] | None] | None = None,
                    strict: bool = True) -> list[bool]:
    """One verdict per instruction. Bad data (unknown id, wrong arguments) raise `PluribusError`."""
    if isinstance(instruction_ids, str) or not instruction_ids:
        raise PluribusError("ifeval: instruction_id_list must be a non-empty list of instruction ids")
    if kwargs_list is None:
        kwargs_list = [None] * len(instruction_ids)
    if len(kwargs_list) != len(instruction_ids):
        raise PluribusError(f"ifeval: {len(instruction_ids)} instruction ids but {len(kwargs_list)} kwargs")
    text = response if isinstance(response, str) else ""
    candidates = [text] if strict else _loose_variants(text)
    candidates = [c for c in candidates if c.strip()]  # an empty response follows nothing
    verdicts = []
    for instruction_id, kwargs in zip(instruction_ids, kwargs_list):
        checker = _checker(instruction_id)
        args = {k: v for k, v in (kwargs or {}).items() if v is not None}
        try:
            inspect.signature(checker).bind("", **args)
        except TypeError as e:
            raise PluribusError(f"ifeval instruction '{instruction_id}': {e}") from None
        try:
            verdicts.append(any(checker(c, **args) for c in candidates))
        except (PluribusError, ValueError, TypeError) as e:
            raise PluribusError(f"ifeval instruction '{instruction_id}': {e}") from None
    return verdicts


def _checker(instruction_id: str) -> Checker:
    if instruction_id in CONSTRAINTS:
        return CONSTRAINTS[instruction_id]
    why = f": {_UNSUPPORTED[instruction_id]}" if instruction_id in _UNSUPPORTED else ""
    raise PluribusError(f"unknown ifeval instruction '{instruction_id}'{why} "
                        f"(known: {', '.join(sorted(CONSTRAINTS))})")


def _loose_variants(response: str) -> list[str]:
    """IFEval's loose mode: the response without its first/last line, and each without `*`."""
    lines = response.split("\n")
    trimmed = [response, "\n".join(lines[1:]).strip(), "\n".join(lines[:-1]).strip(),
               "\n".join(lines[1:-1]).strip()]
    return trimmed + [t.replace("*", "") for t in trimmed]


def _compare(count: int, relation: str, n: Any) -> bool:
    if relation == "less than":
        return count < int(n)
    if relation == "at least":
        return count >= int(n)
    raise PluribusError(f"relation must be one of {_RELATIONS}, got {relation!r}")


def _word_list(words: Sequence[str] | str) -> list[str]:
    """A list of words; a lone string is one word, not a sequence of letters."""
    if isinstance(words, str):
        return [words]
    if not isinstance(words, Sequence) or not all(isinstance(w, str) for w in words):
        raise PluribusError(f"expected a list of words, got {words!r}")
    return list(words)


def _word_pattern(word: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(word.strip())}(?!\w)", re.IGNORECASE)


def count_words(text: str) -> int:
    """Words as IFEval counts them: runs of word characters."""
    return len(re.findall(r"\w+", text))


# Titles and the like that never end a sentence ("etc." and "no." often do, so they are not here).
_ABBREVIATIONS = ("mr", "mrs", "ms", "dr", "prof", "st", "jr", "sr", "inc", "ltd", "vs", "e.g", "i.e",
                  "ph.d", "capt", "lt")
_PROTECT = "\x00"


def split_sentences(text: str) -> list[str]:
    """Sentences: text ending at `.`, `!` or `?` (with any closing quote), or at the end."""
    s = " " + text.replace("\n", " ") + " "
    s = re.sub(r"(?<=\d)\.(?=\d)", _PROTECT, s)  # 3.14
    s = re.sub(r"\.{2,}", lambda m: _PROTECT * len(m.group(0)), s)  # ellipsis inside a sentence
    s = re.sub(r"\b((?:[A-Za-z]\.){2,})", lambda m: m.group(1).replace(".", _PROTECT), s)  # U.S.A.
    s = re.sub(r"(?<=\s)([A-Z])\.(?=\s)", r"\1" + _PROTECT, s)  # initials: J. Smith
    for abbr in _ABBREVIATIONS:
        s = re.sub(rf"(?i)(?<![\w.]){re.escape(abbr)}\.(?=\s)",
                   lambda m: m.group(0)[:-1].replace(".", _PROTECT) + _PROTECT, s)
    pieces = re.split(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+", s)
    return [p.replace(_PROTECT, ".").strip() for p in pieces if re.search(r"\w", p)]


def count_sentences(text: str) -> int:
    return len(split_sentences(text))


# --- keywords ---------------------------------------------------------------------------------

@constraint("keywords:existence")
def _keywords_existence(response: str, keywords: Sequence[str]) -> bool:
    return all(_word_pattern(k).search(response) for k in _word_list(keywords))


@constraint("keywords:forbidden_words")
def _forbidden_words(response: str, forbidden_words: Sequence[str]) -> bool:
    return not any(_word_pattern(w).search(response) for w in _word_list(forbidden_words))


@constraint("keywords:frequency")
def _keyword_frequency(response: str, keyword: str, frequency: int, relation: str) -> bool:
    return _compare(len(_word_pattern(keyword).findall(response)), relation, frequency)


@constraint("keywords:letter_frequency")
def _letter_frequency(response: str, letter: str, let_frequency: int, let_relation: str) -> bool:
    return _compare(response.lower().count(letter.lower()), let_relation, let_frequency)


# --- length -----------------------------------------------------------------------------------

@constraint("length_constraints:number_words")
def _number_words(response: str, num_words: int, relation: str) -> bool:
    return _compare(count_words(response), relation, num_words)


@constraint("length_constraints:number_sentences")
def _number_sentences(response: str, num_sentences: int, relation: str) -> bool:
    return _compare(count_sentences(response), relation, num_sentences)


@constraint("length_constraints:number_paragraphs")
def _number_paragraphs(response: str, num_paragraphs: int) -> bool:
    """Paragraphs separated by the markdown divider `***`; no empty paragraph between two."""
    paragraphs = re.split(r"\s?\*\*\*\s?", response)
    count = len(paragraphs)
    for i, paragraph in enumerate(paragraphs):
        if not paragraph.strip():
            if i in (0, len(paragraphs) - 1):
                count -= 1
            else:
                return False
    return count == int(num_paragraphs)


@constraint("length_constraints:nth_paragraph_first_word")
def _nth_paragraph_first_word(response: str, num_paragraphs: int, nth_paragraph: int, first_word: str) -> bool:
    """Exactly `num_paragraphs` paragraphs (split by blank lines); the n-th (from 1) starts with the word."""
    paragraphs = [p.strip() for p in re.split(r"\n\s*\n", response) if p.strip()]
    n = int(nth_paragraph)
    if len(paragraphs) != int(num_paragraphs) or not 1 <= n <= len(paragraphs):
        return False
    first = re.match(r"[\"'“‘*#\s]*(\w+)", paragraphs[n - 1])
    return bool(first) and first.group(1).lower() == first_word.strip().lower()


# --- detectable content and format ------------------------------------------------------------

@constraint("detectable_content:number_placeholders")
def _number_placeholders(response: str, num_placeholders: int) -> bool:
    return len(re.findall(r"\[[^\[\]\n]*\]", response)) >= int(num_placeholders)


@constraint("detectable_content:postscript")
def _postscript(response: str, postscript_marker: str) -> bool:
    marker = postscript_marker.strip()
    if marker.upper().rstrip(".") == "P.P.S":
        pattern = r"p\.\s?p\.\s?s"
    elif marker.upper().rstrip(".") == "P.S":
        pattern = r"p\.\s?s\."
    else:
        pattern = re.escape(marker)
    return re.search(rf"^\s*{pattern}", response, flags=re.IGNORECASE | re.MULTILINE) is not None


@constraint("detectable_format:number_bullet_lists")
def _number_bullet_lists(response: str, num_bullets: int) -> bool:
    """Exactly `num_bullets` markdown bullets (lines starting with `* ` or `- `)."""
    bullets = re.findall(r"^\s*(?:\*[^*\n]|-).*$", response, flags=re.MULTILINE)
    return len(bullets) == int(num_bullets)


_CONSTRAINED = ("My answer is yes.", "My answer is no.", "My answer is maybe.")


@constraint("detectable_format:constrained_response")
def _constrained_response(response: str) -> bool:
    return any(option in response for option in _CONSTRAINED)


@constraint("detectable_format:number_highlighted_sections")
def _number_highlighted_sections(response: str, num_highlights: int) -> bool:
    """At least `num_highlights` non-empty markdown highlights, `*like this*` or `**this**`."""
    single = [h for h in re.findall(r"\*[^\n*]*\*", response) if h.strip("*").strip()]
    double = [h for h in re.findall(r"\*\*[^\n*]*\*\*", response) if h.strip("*").strip()]
    return len(single) + len(double) >= int(num_highlights)


@constraint("detectable_format:multiple_sections")
def _multiple_sections(response: str, section_spliter: str, num_sections: int) -> bool:
    """At least `num_sections` sections, each opened by `<section_spliter> <number>`."""
    sections = re.split(rf"\s?{re.escape(section_spliter.strip())}\s?\d+\s?", response)
    return len(sections) - 1 >= int(num_sections)


@constraint("detectable_format:json_format")
def _json_format(response: str) -> bool:
    """The whole response is JSON (a surrounding ```json fence is allowed)."""
    text = response.strip()
    text = re.sub(r"^```(?:json)?\s*", "", text, flags=re.IGNORECASE)
    text = re.sub(r"\s*```$", "", text).strip()
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


@constraint("detectable_format:title")
def _title(response: str) -> bool:
    """A title in double angular brackets, `<<like this>>`, with something inside."""
    return any(t.strip("<>").strip() for t in re.findall(r"<<[^\n]+?>>", response))


# --- combination, start/end, case, punctuation ------------------------------------------------

@constraint("combination:two_responses")
def _two_responses(response: str) -> bool:
    """Two different responses separated by six asterisks `******`."""
    parts = response.split("******")
    kept = []
    for i, part in enumerate(parts):
        if part.strip():
            kept.append(part.strip())
        elif i not in (0, len(parts) - 1):
            return False
    return len(kept) == 2 and kept[0] != kept[1]


@constraint("combination:repeat_prompt")
def _repeat_prompt(response: str, prompt_to_repeat: str) -> bool:
    """The response starts with the request, word for word (case aside)."""
    return response.strip().lower().startswith(prompt_to_repeat.strip().lower())


@constraint("startend:end_checker")
def _end_checker(response: str, end_phrase: str) -> bool:
    """The response ends with `end_phrase` exactly (case aside); nothing may follow it."""
    return response.strip().strip('"').lower().endswith(end_phrase.strip().lower())


@constraint("startend:quotation")
def _quotation(response: str) -> bool:
    text = response.strip()
    return len(text) > 1 and text[0] == '"' and text[-1] == '"'


@constraint("change_case:english_lowercase")
def _english_lowercase(response: str) -> bool:
    return response.islower()


@constraint("change_case:english_capital")
def _english_capital(response: str) -> bool:
    return response.isupper()


@constraint("change_case:capital_word_frequency")
def _capital_word_frequency(response: str, capital_frequency: int, capital_relation: str) -> bool:
    capitals = [w for w in re.findall(r"\w+", response) if w.isupper()]
    return _compare(len(capitals), capital_relation, capital_frequency)


@constraint("punctuation:no_comma")
def _no_comma(response: str) -> bool:
    return "," not in response
