"""Evaluation: per-domain greedy pass@1, mean sampled reward and pass@k, plus the trivial floor.

A response passes when its reward is 1. The same seed gives the same numbers: test records come
from the seeded world and sampling noise is seeded per request.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Callable

from pluribus.config import EvalConfig
from pluribus.data import Record
from pluribus.dist import resolve_device
from pluribus.models import load, render_prompt
from pluribus.rollout import SamplingParams, sample
from pluribus.world import DOMAINS, check, generate, trivial_floor


@dataclass(frozen=True)
class DomainScore:
    domain: str
    n: int
    pass1_greedy: float
    reward_sampled: float | None  # None when no samples were drawn (greedy only)
    pass_at_k: float | None
    k: int
    floor: float


def generate_texts(model, tokenizer, records: list[Record], params: SamplingParams, seed: int,
                   batch_size: int, samples: int = 1, start: int = 0) -> list[list[str]]:
    """`samples` responses per record (texts, EOS stripped), batched, seeded per (record, sample).

    start: the index of `records[0]` in the whole list when this is a part of it (`pluribus.dist.spread`): the
    seeds follow the record's index there, so a part samples what one process sampling the whole list would."""
    prompts = [render_prompt(tokenizer, r.messages()) for r in records]
    jobs = [(i, s) for i in range(len(records)) for s in range(samples)]
    out: list[list[str]] = [[] for _ in records]
    for at in range(0, len(jobs), batch_size):
        chunk = jobs[at:at + batch_size]
        rollout = sample(model, [prompts[i] for i, _ in chunk], params, eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id,
                         request_seeds=[seed * 7_919 + (start + i) * 131 + s for i, s in chunk],
                         tokenizer=tokenizer)
        for (i, _), text in zip(chunk, rollout.texts):
            out[i].append(text)
    return out


def evaluate_model(model, tokenizer, cfg: EvalConfig,
                   reward: Callable[[Record, str], float] = check) -> list[DomainScore]:
    scores = []
    for name in cfg.domains or list(DOMAINS):
        records = generate(name, "test", cfg.n, seed=cfg.seed)
        greedy = generate_texts(model, tokenizer, records, SamplingParams(cfg.max_new_tokens, temperature=0),
                                cfg.seed, cfg.batch_size)
        pass1 = sum(reward(r, g[0]) >= 1.0 for r, g in zip(records, greedy)) / len(records)
        mean_reward = pass_k = None
        if cfg.samples:
            sampled = generate_texts(model, tokenizer, records, SamplingParams(cfg.max_new_tokens, cfg.temperature),
                                     cfg.seed, cfg.batch_size, samples=cfg.samples)
            rewards = [[reward(r, t) for t in ts] for r, ts in zip(records, sampled)]
            mean_reward = sum(map(sum, rewards)) / (len(records) * cfg.samples)
            pass_k = sum(any(x >= 1.0 for x in rs) for rs in rewards) / len(records)
        scores.append(DomainScore(name, len(records), pass1, mean_reward, pass_k, cfg.samples, trivial_floor(records)))
    return scores


def run(cfg: EvalConfig) -> list[DomainScore]:
    model, tokenizer = load(cfg.model, trainable=False, device=resolve_device(cfg.device))
    return evaluate_model(model, tokenizer, cfg)


def as_json(scores: list[DomainScore]) -> list[dict]:
    return [asdict(s) for s in scores]


def table(scores: list[DomainScore], title: str = "evaluation"):
    from rich.table import Table

    t = Table(title=title)
    for col in ("domain", "n", "greedy pass@1", "sampled reward", f"pass@{scores[0].k if scores else 'k'}", "floor"):
        t.add_column(col, justify="right" if col != "domain" else "left")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    for s in scores:
        t.add_row(s.domain, str(s.n), pct(s.pass1_greedy), pct(s.reward_sampled), pct(s.pass_at_k), pct(s.floor))
    if scores:
        def mean(field):
            values = [getattr(s, field) for s in scores]
            return None if None in values else sum(values) / len(values)

        t.add_row("mean", "", *(pct(mean(f)) for f in ("pass1_greedy", "reward_sampled", "pass_at_k", "floor")),
                  style="bold")
    return t
