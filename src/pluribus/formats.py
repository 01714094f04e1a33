"""Public data set formats → the data contract (`pluribus.data.Record`), one converter per format.

| format | a line of it | becomes |
| --- | --- | --- |
| `gsm8k` | `{question, answer: "... #### 42"}` | prompt = question; answer = the worked solution (its `#### 42` is the gold the math checker reads; calculator notes `<<6*7=42>>` dropped) |
| `mbpp` | `{task_id, text, code, test_list, test_setup_code?}` | prompt = text + the tests (they name the function, as in the MBPP prompt); answer = the code in a python fence; tests = setup + test_list |
| `humaneval` | `{task_id, prompt, canonical_solution, test, entry_point}` | prompt = complete the function; answer = signature + solution in a fence; tests = [test], meta.entry_point (the checker calls `check(entry_point)`) |
| `ifeval` | `{key, prompt, instruction_id_list, kwargs}` | prompt; meta.instruction_id_list and meta.kwargs (no answer: nothing to imitate, only constraints to check) |
| `pluribus` | a `Record` as JSON | itself |

Every record of a data set gets the data set's name as its domain: the domain routes its reward and its
teacher. A line that does not fit its format is one error naming the file and line.
Plain Python: no torch.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from pluribus.data import Record, read_jsonl, write_jsonl
from pluribus.errors import PluribusError

_CALCULATOR = re.compile(r"<<[^<>]*>>")


def _fence(code: str) -> str:
    return f"```python\n{code.rstrip()}\n```"


def from_gsm8k(obj: dict[str, Any], n: int) -> Record:
    if "####" not in obj["answer"]:
        raise ValueError("the answer has no '#### <final answer>' line")
    return Record(id=f"gsm8k-{n}", domain="gsm8k", prompt=obj["question"].strip(),
                  answer=_CALCULATOR.sub("", obj["answer"]).strip())


def from_mbpp(obj: dict[str, Any], n: int) -> Record:
    tests = list(obj["test_list"])
    if not tests:
        raise ValueError("test_list is empty")
    setup = (obj.get("test_setup_code") or "").strip()
    prompt = f"{obj['text'].strip()}\nYour code should pass these tests:\n" + "\n".join(tests)
    return Record(id=f"mbpp-{obj.get('task_id', n)}", domain="mbpp", prompt=prompt, answer=_fence(obj["code"]),
                  tests=[setup, *tests] if setup else tests, meta={"task_id": obj.get("task_id", n)})


def from_humaneval(obj: dict[str, Any], n: int) -> Record:
    entry = obj["entry_point"]
    if not str(entry).isidentifier():
        raise ValueError(f"entry_point {entry!r} is not a Python identifier")
    signature = obj["prompt"]
    prompt = f"Complete this Python function and return the whole function in a python code block.\n{_fence(signature)}"
    return Record(id=str(obj["task_id"]).replace("/", "-"), domain="humaneval", prompt=prompt,
                  answer=_fence(signature + obj["canonical_solution"]), tests=[obj["test"]],
                  meta={"entry_point": entry, "task_id": obj["task_id"]})


def from_ifeval(obj: dict[str, Any], n: int) -> Record:
    ids, kwargs = list(obj["instruction_id_list"]), list(obj.get("kwargs") or [{} for _ in obj["instruction_id_list"]])
    if len(ids) != len(kwargs):
        raise ValueError(f"{len(ids)} instructions but {len(kwargs)} kwargs")
    return Record(id=f"ifeval-{obj.get('key', n)}", domain="ifeval", prompt=obj["prompt"],
                  meta={"instruction_id_list": ids, "kwargs": kwargs})


def from_pluribus(obj: dict[str, Any], n: int) -> Record:
    return Record.from_json(obj)


FORMATS: dict[str, Callable[[dict[str, Any], int], Record]] = {
    "gsm8k": from_gsm8k, "mbpp": from_mbpp, "humaneval": from_humaneval, "ifeval": from_ifeval,
    "pluribus": from_pluribus}
REWARDS = {"gsm8k": "math", "mbpp": "code", "humaneval": "code", "ifeval": "ifeval"}
"""The reward kind (`pluribus.rewards.router`) each public format is checked with."""


def read_dataset(path: str | Path, fmt: str, domain: str | None = None) -> list[Record]:
    """The records of a JSONL file in format `fmt`, each with domain `domain` (default: the format's name)."""
    if fmt not in FORMATS:
        raise PluribusError(f"unknown data format '{fmt}' (known: {', '.join(FORMATS)})")

    numbers = itertools.count(1)  # the n-th record: the id of a line that brings none

    def parse(obj: dict[str, Any], where: str) -> Record:
        try:
            record = FORMATS[fmt](obj, next(numbers))
        except KeyError as e:
            raise PluribusError(f"{where}: not a {fmt} record: missing field {e}") from None
        except (ValueError, TypeError, AttributeError, PluribusError) as e:
            raise PluribusError(f"{where}: not a {fmt} record: {e}") from None
        return record if domain is None else replace(record, domain=domain)

    records = read_jsonl(path, parse)
    if not records:
        raise PluribusError(f"{path}: no records")
    return records


def convert(fmt: str, in_path: str | Path, out_path: str | Path, domain: str | None = None) -> int:
    """Convert a JSONL file from format `fmt` to the data contract; returns the number of records."""
    records = read_dataset(in_path, fmt, domain)
    write_jsonl(records, out_path)
    return len(records)
