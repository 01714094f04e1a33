"""The embedded world: ≥12 generated, checkable domains that run anywhere (DESIGN.md §5).

Splits are disjoint by construction: a prompt's split is a hash of its text, so no test prompt can
ever be generated for train, whatever the seeds. Records follow `pluribus.data`, so a user's JSONL
drops in wherever the world's data does.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import replace

from pluribus.data import Record
from pluribus.errors import PluribusError
from pluribus.world.domains import DOMAINS, Domain, Instance, parse_program, rubric_score, rubric_verdicts

SPLITS = ("train", "test")
TEST_FRACTION = 0.25

__all__ = ["DOMAINS", "Domain", "Instance", "SPLITS", "domain", "generate", "split_of", "check", "instance_of",
           "parse_program", "rubric_score", "rubric_verdicts", "trivial_floor", "with_mistakes"]


def domain(name: str) -> Domain:
    """The named domain, or one clear error listing the known ones."""
    if name not in DOMAINS:
        raise PluribusError(f"unknown domain '{name}' (known: {', '.join(DOMAINS)})")
    return DOMAINS[name]


def split_of(prompt: str) -> str:
    """The split a prompt belongs to, fixed by a hash of its text."""
    h = int.from_bytes(hashlib.sha256(prompt.encode()).digest()[:8], "big") / 2**64
    return "test" if h < TEST_FRACTION else "train"


def generate(name: str, split: str, n: int, seed: int = 0, unique: bool | None = None) -> list[Record]:
    """`n` records of one domain and split, deterministic in (name, split, seed).

    With `unique`, prompts do not repeat unless the domain's space runs out (then they may). By
    default a test set is unique (each test prompt counts once) and a training set is drawn i.i.d.
    from the domain's distribution, repeats and all: unique draws exhaust the small parts of a
    space first (the 576 two-step programs, the one-digit sums) and so skew a large training set
    toward the large parts (8,000 unique code demonstrations hold 5% two-step programs; the
    distribution, and the test set, 40%).
    """
    if split not in SPLITS:
        raise PluribusError(f"unknown split '{split}' (use train or test)")
    if unique is None:
        unique = split == "test"
    dom = domain(name)
    rng = random.Random(f"{name}:{split}:{seed}")
    records, seen, tries = [], set(), 0
    while len(records) < n:
        inst = dom.make(rng)
        tries += 1
        if split_of(inst.prompt) != split:
            continue
        if unique and inst.prompt in seen and tries < 50 * n:
            continue
        seen.add(inst.prompt)
        records.append(Record(id=f"{name}-{split}-{seed}-{len(records)}", domain=name, prompt=inst.prompt,
                              answer=inst.answer, tests=inst.tests, rubric=inst.rubric, meta=inst.meta))
    return records


def instance_of(record: Record) -> Instance:
    """A world record back as the generator's instance (what a domain's `mistake` reads)."""
    return Instance(record.prompt, record.answer, record.meta, record.tests, record.rubric)


def with_mistakes(records: list[Record], p_mistake: float, seed: int = 0) -> list[Record]:
    """Imperfect demonstrations: each answer replaced by its domain's systematic wrong procedure
    with probability `p_mistake` (seeded), where that procedure gives a wrong answer (a sum with no
    carry is left alone). SFT on them learns the skill and one clear alternative side by side: the
    headroom RL then removes. The mistaken records are marked `meta["demo_mistake"] = True`."""
    rng = random.Random(f"mistakes:{seed}")
    out = []
    for r in records:
        if rng.random() < p_mistake:
            wrong = domain(r.domain).wrong(instance_of(r))
            if check(r, wrong) < 1.0:
                r = replace(r, answer=wrong, meta={**r.meta, "demo_mistake": True})
        out.append(r)
    return out


def check(record: Record, response: str) -> float:
    """The domain's reward for a response, in [0, 1]."""
    return domain(record.domain).check(record, response)


def trivial_floor(records: list[Record], candidates: int = 20) -> float:
    """Pass rate of always giving one answer: the best, over the most common answers, of its pass@1."""
    counts: dict[str, int] = {}
    for r in records:
        counts[r.answer or ""] = counts.get(r.answer or "", 0) + 1
    common = sorted(counts, key=counts.get, reverse=True)[:candidates]
    return max(sum(check(r, a) >= 1.0 for r in records) / len(records) for a in common) if records else 0.0
