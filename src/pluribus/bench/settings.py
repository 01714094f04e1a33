"""What `pluribus bench` runs: one set of sizes for both sides of every comparison."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class BenchSettings:
    """Sizes of the benchmark; every comparison gives both sides the same.

    size, layers: the student, a random Qwen2 from the tiny preset's config (hidden 64·size) with `layers`
        layers: size 2 with 5 layers has 1.08M parameters.
    prompts, group: GRPO's prompts per step and samples per prompt.
    opd_batch: OPD's prompts per step (one rollout each).
    max_new_tokens: the longest response everywhere.
    warmup, steps, rounds: untimed steps, then timed steps, per process; `rounds` processes per side, the two
        sides alternating, so the other side's noise falls on both (medians over every timed step). Three, so that
        a slow stretch of a shared host that falls on one process of one side (5 of its 15 steps) cannot set that
        side's median; with two it set it (session 18: one process at 0.28-0.36 s a step, the other 0.22-0.27).
    teacher_batch, teacher_counts: the many-teacher OPD step (rollouts over the 12 domains; teacher counts).
    kl_*: the chunked KL's memory measurement (positions, vocabulary, hidden size, chunk).
    threads: torch threads in every process, both sides.
    """

    size: int = 2
    layers: int = 5
    prompts: int = 8
    group: int = 4
    opd_batch: int = 32
    max_new_tokens: int = 32
    warmup: int = 2
    steps: int = 5
    rounds: int = 3
    teacher_batch: int = 48
    teacher_counts: tuple[int, ...] = (1, 4, 12)
    kl_positions: int = 4096
    kl_vocab: int = 131_072
    kl_dim: int = 256
    kl_chunk: int = 1024
    lr: float = 1e-5
    threads: int = 1
    seed: int = 0


# Seconds, not minutes: the harness end to end on a toy model (the figures mean nothing).
SMOKE = BenchSettings(size=1, layers=2, prompts=2, group=2, opd_batch=4, max_new_tokens=4, warmup=1, steps=2,
                      rounds=1, teacher_batch=12, teacher_counts=(1, 2), kl_positions=64, kl_vocab=1024, kl_dim=16,
                      kl_chunk=16)
