"""Deterministic crash points for kill tests: `PLURIBUS_CRASH_AT=<where>:<event>` SIGKILLs the process there.

A test that kills a run at a named point needs no sleeps and no luck. `<where>` is the tail of a
folder: a training loop's output (`sft/model`, `experts/max/expert`) or a pipeline stage (`eval`).
`<event>`, with steps numbered as in metrics.jsonl:

- `N`: right after step N (and after the checkpoint that step may take);
- `rollout@N`: in the middle of step N's rollout generation, once a few tokens are in its log;
- `checkpoint@N`: in the middle of writing the checkpoint taken after step N (files written, not renamed);
- `done`: after a pipeline stage's outputs are written, before its DONE marker.

Unset (always, outside tests), every check is one environment lookup.
"""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

ENV = "PLURIBUS_CRASH_AT"


def armed(where: str | Path, event: str) -> bool:
    """Whether `PLURIBUS_CRASH_AT` names this folder and this event."""
    spec = os.environ.get(ENV)
    if not spec:
        return False
    target, _, at = spec.rpartition(":")
    tail = Path(target).parts
    return at == event and bool(tail) and Path(where).parts[-len(tail):] == tail


def kill() -> None:
    """Die at once, as a power cut or the OOM killer would end the process: no cleanup, no exit handlers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def crash_point(where: str | Path, event: str) -> None:
    if armed(where, event):
        kill()
