"""Which reward scores which record: a record's domain -> a reward function `(record, response) -> [0, 1]`.

Every embedded-world domain is routed to its own checker (`pluribus.world.check`) by default. Real
data name a reward *kind* per domain:

    RewardRouter({"gsm8k": "math", "mbpp": "code", "ifeval": "ifeval", "mydomain": "world:add"})

| kind | reads | reward |
| --- | --- | --- |
| `world` | the world domain of the same name | that domain's checker |
| `world:NAME` | what world domain NAME's checker reads | NAME's checker, for a domain of another name |
| `math` | `record.answer` | `check_math`: final answer equals the gold, 0 or 1 |
| `code` | `record.tests`, `meta["entry_point"]` | its code block run on the tests in the sandbox, 0 or 1 |
| `ifeval` | `meta["instruction_id_list"]`, `meta["kwargs"]` | fraction of instructions followed (strict) |
| `grm` | what the judge reads | the generative judge's score, or None; needs `judge=` |

A route may also be any callable `(record, response) -> float`. Routes given override the world's
defaults: the world's `ifeval` domain, for one, becomes real IFEval data under `{"ifeval": "ifeval"}`,
and its rubric domain (`describe`) trains on the judge under `{"describe": "grm"}` while the default
(its hidden checker) stays for evaluation.

A judge returns None where it found no valid judgement: the router passes it on (GRPO masks such a
sample out of the advantage) and never turns it into 0. A judge with a batch method
`score(records, responses)` (as `pluribus.rewards.grm.Judge` has) gets all its rows in one call.

With a `LengthPenalty`, `score` adds DAPO's overlong penalty to every reward (then in [-1, 1]) and
needs each response's token count: the router has no tokenizer, the rollout has the token ids.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from pluribus.data import Record
from pluribus.errors import PluribusError
from pluribus.rewards.ifeval import check_ifeval
from pluribus.rewards.length import LengthPenalty
from pluribus.rewards.math import check_math
from pluribus.world import DOMAINS

RewardFn = Callable[[Record, str], float]
"""`reward(record, response) -> float`, in [0, 1] for every built-in kind."""
JudgeFn = Callable[[Record, str], float | None]
"""`judge(record, response) -> float in [0, 1]`, or None where no valid judgement was found."""

KINDS = ("world", "world:<domain>", "math", "code", "ifeval", "grm")


def math_reward(record: Record, response: str) -> float:
    """`check_math` against `record.answer`."""
    if record.answer is None:
        raise PluribusError(f"record '{record.id}' (domain '{record.domain}'): the math reward needs an 'answer'")
    return check_math(response, record.answer)


def ifeval_reward(record: Record, response: str) -> float:
    """`check_ifeval` (strict) with the record's `meta["instruction_id_list"]` and `meta["kwargs"]`."""
    if "instruction_id_list" not in record.meta:
        raise PluribusError(f"record '{record.id}' (domain '{record.domain}'): the ifeval reward needs "
                            "meta['instruction_id_list'] (and meta['kwargs'])")
    return check_ifeval(response, record.meta["instruction_id_list"], record.meta.get("kwargs"))


def code_reward(record: Record, response: str, timeout_s: float = 5.0) -> float:
    """The response's code (its last fenced block) run against `record.tests` in the sandbox."""
    from pluribus.rewards.code import check_program, extract_code  # the sandbox loads on first use

    _require_tests(record)
    return check_program(extract_code(response), record.tests, record.meta.get("entry_point"), timeout_s=timeout_s)


def _require_tests(record: Record) -> None:
    if not record.tests:
        raise PluribusError(f"record '{record.id}' (domain '{record.domain}'): the code reward needs 'tests'")


class RewardRouter:
    """Domain -> reward function, for single records (`router(record, response)`) and batches (`score`).

    routes: domain -> kind (see the module docstring) or a callable; added to, and overriding, the
        world's defaults.
    judge: the generative reward model for `grm` routes, `(record, response) -> float in [0, 1] or None`.
    length_penalty: DAPO's overlong penalty added by `score`; None for none.
    code_timeout_s: the sandbox's time limit for one program of a `code` route.
    """

    def __init__(self, routes: Mapping[str, str | RewardFn] | None = None, *, judge: JudgeFn | None = None,
                 length_penalty: LengthPenalty | None = None, code_timeout_s: float = 5.0) -> None:
        self.judge = judge
        self.length_penalty = length_penalty
        self.code_timeout_s = code_timeout_s
        self.kinds: dict[str, str] = {name: "world" for name in DOMAINS}
        self._rewards: dict[str, RewardFn] = {name: DOMAINS[name].check for name in DOMAINS}
        for domain, spec in (routes or {}).items():
            self.kinds[domain] = spec if isinstance(spec, str) else "custom"
            self._rewards[domain] = self._resolve(domain, spec)

    @property
    def domains(self) -> list[str]:
        return list(self._rewards)

    def reward_fn(self, domain: str) -> RewardFn:
        """The reward function of a domain, or one clear error naming the known domains."""
        if domain not in self._rewards:
            raise PluribusError(f"no reward for domain '{domain}' (known: {', '.join(self._rewards)}); route it, "
                                f"e.g. RewardRouter({{'{domain}': KIND}}) with KIND one of {', '.join(KINDS)}")
        return self._rewards[domain]

    def __call__(self, record: Record, response: str, num_tokens: int | None = None) -> float | None:
        """The reward of one response (with the length penalty when the router has one)."""
        return self.score([record], [response], None if num_tokens is None else [num_tokens])[0]

    def score(self, records: Sequence[Record], responses: Sequence[str],
              num_tokens: Sequence[int] | None = None) -> list[float | None]:
        """Rewards of aligned records and responses; `num_tokens` (response lengths) with a length penalty.

        None where a judge found no valid judgement.
        """
        if len(records) != len(responses):
            raise PluribusError(f"reward router: {len(records)} records but {len(responses)} responses")
        if self.length_penalty is not None and (num_tokens is None or len(num_tokens) != len(records)):
            raise PluribusError("reward router: a length penalty needs num_tokens, one count per response")
        fns = [self.reward_fn(r.domain) for r in records]
        rewards: dict[int, float | None] = {}
        # sandboxed runs are slow one by one, and a judge generates in batches: give each all its rows at once
        for kind, batch in (("code", self._code_batch), ("grm", self._judge_batch)):
            rows = [i for i, r in enumerate(records) if self.kinds[r.domain] == kind]
            if len(rows) > 1:
                rewards.update(zip(rows, batch([records[i] for i in rows], [responses[i] for i in rows])))
        for i, (fn, record, response) in enumerate(zip(fns, records, responses)):
            if i not in rewards:
                rewards[i] = fn(record, response)
        out = [None if rewards[i] is None else float(rewards[i]) for i in range(len(records))]
        if self.length_penalty is not None:
            return [None if r is None else self.length_penalty.apply(r, n) for r, n in zip(out, num_tokens)]
        return out

    def _resolve(self, domain: str, spec: str | RewardFn) -> RewardFn:
        if callable(spec):
            return spec
        if spec == "world":
            if domain not in DOMAINS:
                raise PluribusError(f"domain '{domain}': kind 'world' needs a world domain of that name; "
                                    f"use 'world:NAME' with NAME one of {', '.join(DOMAINS)}")
            return DOMAINS[domain].check
        if isinstance(spec, str) and spec.startswith("world:"):
            name = spec.removeprefix("world:")
            if name not in DOMAINS:
                raise PluribusError(f"domain '{domain}': unknown world domain '{name}' in '{spec}' "
                                    f"(known: {', '.join(DOMAINS)})")
            return DOMAINS[name].check
        if spec == "math":
            return math_reward
        if spec == "ifeval":
            return ifeval_reward
        if spec == "code":
            return lambda record, response: code_reward(record, response, timeout_s=self.code_timeout_s)
        if spec == "grm":
            return lambda record, response: self._judge(domain)(record, response)
        raise PluribusError(f"domain '{domain}': unknown reward kind {spec!r} (known: {', '.join(KINDS)}, "
                            "or a callable)")

    def _judge(self, domain: str) -> JudgeFn:
        if self.judge is None:
            raise PluribusError(f"domain '{domain}' needs the generative judge (grm); pass a judge: "
                                "RewardRouter(..., judge=...)")
        return self.judge

    def _judge_batch(self, records: list[Record], responses: list[str]) -> list[float | None]:
        judge = self._judge(records[0].domain)
        batch = getattr(judge, "score", None)
        return batch(records, responses) if batch is not None else [judge(r, s) for r, s in zip(records, responses)]

    def _code_batch(self, records: list[Record], responses: list[str]) -> list[float]:
        from pluribus.rewards import code

        for record in records:
            _require_tests(record)
        batch = getattr(code, "check_programs_batch", None)
        if batch is None:
            return [code_reward(r, s, timeout_s=self.code_timeout_s) for r, s in zip(records, responses)]
        return batch([code.extract_code(s) for s in responses], [r.tests for r in records],
                     [r.meta.get("entry_point") for r in records], timeout_s=self.code_timeout_s)
