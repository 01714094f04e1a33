"""The data contract shared by the embedded world and users' own data (DESIGN.md §4).

One JSON record a line: `id`, `domain`, `prompt` (text or chat messages), and what the domain's
reward needs: `answer`, `tests`, `rubric` (list of `{criterion, weight, kind}`), `meta`.
Plain Python: no torch, so the world and the rewards can use it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from pluribus.errors import PluribusError

RUBRIC_KINDS = ("essential", "important", "optional", "pitfall")


@dataclass(frozen=True)
class Criterion:
    """One rubric item (Rubrics-as-Rewards): what to look for, how much it counts, its kind.

    A pitfall carries a negative weight: meeting it (making the mistake) costs reward.
    """

    criterion: str
    weight: float
    kind: str = "important"


@dataclass(frozen=True)
class Record:
    """One task. `prompt` is text, or a list of `{role, content}` chat messages."""

    id: str
    domain: str
    prompt: str | list[dict[str, str]]
    answer: str | None = None
    tests: list[str] | None = None
    rubric: list[Criterion] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def messages(self) -> list[dict[str, str]]:
        """The prompt as chat messages (a text prompt is one user turn)."""
        if isinstance(self.prompt, str):
            return [{"role": "user", "content": self.prompt}]
        return list(self.prompt)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        return {k: v for k, v in out.items() if v is not None}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "record") -> "Record":
        for key in ("id", "domain", "prompt"):
            if key not in obj:
                raise PluribusError(f"{where}: missing field '{key}'")
        unknown = set(obj) - {"id", "domain", "prompt", "answer", "tests", "rubric", "meta"}
        if unknown:
            raise PluribusError(f"{where}: unknown field(s) {sorted(unknown)}")
        prompt = obj["prompt"]
        if not isinstance(prompt, str):
            if not (isinstance(prompt, list) and all(
                    isinstance(m, dict) and {"role", "content"} <= set(m) for m in prompt)):
                raise PluribusError(f"{where}: 'prompt' must be text or a list of {{role, content}} messages")
        rubric = obj.get("rubric")
        if rubric is not None:
            items = []
            for j, item in enumerate(rubric):
                if not isinstance(item, dict) or "criterion" not in item or "weight" not in item:
                    raise PluribusError(f"{where}: rubric[{j}] needs 'criterion' and 'weight'")
                kind = item.get("kind", "pitfall" if float(item["weight"]) < 0 else "important")
                if kind not in RUBRIC_KINDS:
                    raise PluribusError(f"{where}: rubric[{j}].kind '{kind}' is not one of {RUBRIC_KINDS}")
                items.append(Criterion(str(item["criterion"]), float(item["weight"]), kind))
            rubric = items
        return cls(id=str(obj["id"]), domain=str(obj["domain"]), prompt=prompt,
                   answer=None if obj.get("answer") is None else str(obj["answer"]),
                   tests=obj.get("tests"), rubric=rubric, meta=dict(obj.get("meta") or {}))


def write_jsonl(records: Iterable[Record], path: str | Path) -> None:
    """Write records atomically (temp file + rename), one JSON object a line."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        for r in records:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def read_jsonl(path: str | Path, parse: Callable[[dict[str, Any], str], Record] | None = None) -> list[Record]:
    """Read records; a missing file or a malformed line is one clear error naming file and line.

    parse: `(object, where) -> Record` for a line in another format (`pluribus.formats`); default the contract's."""
    path = Path(path)
    if not path.is_file():
        raise PluribusError(f"{path}: data file not found")
    records = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise PluribusError(f"{path}:{n}: not valid JSON ({e.msg})") from None
            if not isinstance(obj, dict):
                raise PluribusError(f"{path}:{n}: a record must be a JSON object")
            records.append((parse or Record.from_json)(obj, f"{path}:{n}"))
    return records
