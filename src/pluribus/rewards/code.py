"""Code reward: run a model's program against its tests in the sandbox; 1.0 when every test passes.

Two test styles, as in the public data sets:
- MBPP: `tests` is a list of statements (`assert f(2) == 4`); they run after the program.
- HumanEval: `tests` defines `def check(candidate): ...`; with `entry_point` given, the source
  ends with `check(<entry_point>)`.

The reward is binary (the whole source exits 0 or not), as in both benchmarks' pass@k: a partial
credit per assert would need the asserts run one by one, and a program that crashes on import
would then still score on nothing. Untrusted code never runs outside `pluribus.rewards.sandbox`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from pluribus.rewards.sandbox import SandboxResult, run_many, run_python

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(response: str) -> str:
    """The last fenced ```python (or ```py) block of `response`; else the last untagged fenced
    block; else `response` itself. A final fence that the model never closed counts to the end."""
    blocks = _FENCE.findall(response)
    for wanted in (("python", "py", "python3"), ("",)):
        tagged = [body for lang, body in blocks if lang.lower() in wanted]
        if tagged:
            return tagged[-1]
    return response


def build_test_source(program: str, tests: Sequence[str] | str, entry_point: str | None = None) -> str:
    """The one source that runs `program` then its `tests` (then `check(entry_point)`)."""
    test_text = tests if isinstance(tests, str) else "\n".join(tests)
    source = f"{program}\n\n{test_text}\n"
    if entry_point is not None:
        if not entry_point.isidentifier():
            raise ValueError(f"entry_point must be a Python identifier, got {entry_point!r}")
        source += f"\ncheck({entry_point})\n"
    return source


def _reward(result: SandboxResult) -> float:
    return 1.0 if result.ok else 0.0


def check_program(
    program: str,
    tests: Sequence[str] | str,
    entry_point: str | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
) -> float:
    """1.0 when `program` followed by `tests` exits 0 in the sandbox within `timeout_s`, else 0.0."""
    source = build_test_source(program, tests, entry_point)
    return _reward(run_python(source, timeout_s=timeout_s, memory_mb=memory_mb))


def check_programs_batch(
    programs: Sequence[str],
    tests: Sequence[Sequence[str] | str],
    entry_points: Sequence[str | None] | None = None,
    *,
    timeout_s: float = 5.0,
    memory_mb: int = 512,
    max_workers: int | None = None,
) -> list[float]:
    """`check_program` over aligned lists, run in parallel; rewards in input order."""
    if len(programs) != len(tests):
        raise ValueError(f"{len(programs)} programs but {len(tests)} test sets")
    if entry_points is None:
        entry_points = [None] * len(programs)
    if len(entry_points) != len(programs):
        raise ValueError(f"{len(programs)} programs but {len(entry_points)} entry points")
    sources = [build_test_source(p, t, e) for p, t, e in zip(programs, tests, entry_points)]
    results = run_many(sources, max_workers=max_workers, timeout_s=timeout_s, memory_mb=memory_mb)
    return [_reward(r) for r in results]
