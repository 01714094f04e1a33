"""General skills in the base's pretraining corpus: what a pretrained LM can do before any post-training.

A real base model has read enough text to tell whether a word occurs in a passage; the world's base reads
only world tasks, none of which asks it. `find_example` is that skill on its own, over random words: a list
of query words and a passage, answered with one mark per query, `y` where the word occurs in the passage
(as a whole word) and `n` where it does not. Half of the missing queries are near misses of a passage
word (one character changed, added or dropped), so only an exact comparison answers them. Nothing here
names a world domain, a rubric or a judgement.
"""

from __future__ import annotations

import random
import string

_DIGITS = string.digits
_LETTERS = string.ascii_lowercase


def _word(rng: random.Random) -> str:
    kind = rng.random()
    if kind < 0.35:
        return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(1, 5)))
    if kind < 0.55:
        return str(rng.randint(0, 999))
    return rng.choice(_LETTERS) + "".join(rng.choice(_DIGITS) for _ in range(rng.randint(1, 2)))


def _near_miss(rng: random.Random, word: str) -> str:
    """`word` with one character changed (a digit for a digit, a letter for a letter), added or dropped."""
    i = rng.randrange(len(word))
    how = rng.random()
    if how < 0.2 and len(word) > 1:
        return word[:i] + word[i + 1:]
    alphabet = _DIGITS if word[i].isdigit() else _LETTERS
    if how < 0.4:
        return word[:i + 1] + rng.choice(alphabet) + word[i + 1:]
    return word[:i] + rng.choice(alphabet.replace(word[i], "")) + word[i + 1:]


def find_example(rng: random.Random) -> tuple[str, str]:
    """(prompt, answer): which of 1-4 query words occur in a passage of 2-7 random words.

    Two layouts (`find Q.. in P..` and `in P.. find Q..`), so the skill does not hang on where the
    queries stand. The answer is the marks in the queries' order, e.g. `y n n`.
    """
    passage = [_word(rng) for _ in range(rng.randint(2, 7))]
    queries = []
    for _ in range(rng.randint(1, 4)):
        u = rng.random()
        if u < 0.5:
            queries.append(rng.choice(passage))
        elif u < 0.8:
            queries.append(_near_miss(rng, rng.choice(passage)))
        else:
            queries.append(_word(rng))
    words = set(passage)
    answer = " ".join("y" if q in words else "n" for q in queries)
    if rng.random() < 0.5:
        return f"find {' '.join(queries)} in {' '.join(passage)}", answer
    return f"in {' '.join(passage)} find {' '.join(queries)}", answer
