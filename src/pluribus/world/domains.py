"""The embedded world's domains: seeded generators, checkers, and the pretraining corpus's mistakes.

Each domain makes short character-level tasks that a ~1M-parameter model can learn. Related (digits,
letters, one answer per prompt) so one model can hold them all; different (arithmetic, string
manipulation, program synthesis, format following, a rubric) so experts specialise.

Every domain also has `mistake`: a *systematic* wrong procedure (addition without carry, sorting
descending, ...). The pretraining corpus answers mostly with mistakes or noise and only sometimes
correctly, so the base model's most likely answer is wrong while a correct one is in its samples:
weak for real, with signal for RL. Plain Python, no torch.
"""

from __future__ import annotations

import ast
import random
import string
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from pluribus.data import Criterion, Record


@dataclass(frozen=True)
class Instance:
    """What a generator makes: the record's content before it gets an id and a split."""

    prompt: str
    answer: str
    meta: dict[str, Any] = field(default_factory=dict)
    tests: list[str] | None = None
    rubric: list[Criterion] | None = None


@dataclass(frozen=True)
class Domain:
    """A checkable task family.

    make(rng) -> Instance; check(record, response) -> reward in [0, 1]; mistake(rng, inst) -> a
    plausible wrong answer for the pretraining corpus; wrong(inst) -> the systematic wrong
    procedure's answer alone, which may happen to be right (a sum with no carry to drop), so
    imperfect demonstrations teach one clear alternative rather than noise. A response passes when
    its reward is 1.
    """

    name: str
    description: str
    make: Callable[[random.Random], Instance]
    check: Callable[[Record, str], float]
    mistake: Callable[[random.Random, Instance], str]
    wrong: Callable[[Instance], str]
    rubric_domain: bool = False


def exact(record: Record, response: str) -> float:
    """Reward 1 for the exact answer (surrounding white space ignored), else 0."""
    return float(response.strip() == (record.answer or "").strip())


def _differ(wrong: str, right: str, fallback: Callable[[], str]) -> str:
    """A mistake must be a mistake: where the wrong procedure happens to be right, use the fallback."""
    return wrong if wrong != right else fallback()


def _num(rng: random.Random, digits_max: int) -> int:
    """A number whose digit count is uniform in 1..digits_max (so long numbers are not the norm)."""
    d = rng.randint(1, digits_max)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10**d - 1)


# --- arithmetic -------------------------------------------------------------------------------

def _add_make(rng):
    a, b = _num(rng, 2), _num(rng, 2)
    return Instance(f"add {a} {b}", str(a + b), {"a": a, "b": b})


def _add_wrong(inst):
    a, b = inst.meta["a"], inst.meta["b"]  # digit by digit, the carry dropped
    width = max(len(str(a)), len(str(b)))
    return str(int("".join(str((int(x) + int(y)) % 10) for x, y in zip(str(a).zfill(width), str(b).zfill(width)))))


def _add_mistake(rng, inst):
    a, b = inst.meta["a"], inst.meta["b"]
    return _differ(_add_wrong(inst), inst.answer, lambda: str(a + b + rng.choice([-10, 10, 1, -1])))


def _arith_make(rng):
    nums = [rng.randint(1, 9) for _ in range(3)]
    ops = [rng.choice("+-*") for _ in range(2)]
    expr = "".join(f"{n}{o}" for n, o in zip(nums, ops)) + str(nums[-1])
    return Instance(f"calc {expr}", str(eval(expr, {"__builtins__": {}})), {"nums": nums, "ops": ops})


def _arith_wrong(inst):
    nums, ops = inst.meta["nums"], inst.meta["ops"]
    value = nums[0]  # left to right, ignoring precedence
    for n, o in zip(nums[1:], ops):
        value = value + n if o == "+" else value - n if o == "-" else value * n
    return str(value)


def _arith_mistake(rng, inst):
    return _differ(_arith_wrong(inst), inst.answer, lambda: str(int(inst.answer) + rng.choice([-2, -1, 1, 2])))


def _linear_make(rng):
    a, x = rng.randint(2, 9), rng.randint(-9, 9)
    b = rng.choice([i for i in range(-9, 10) if i])
    c = a * x + b
    return Instance(f"solve {a}x{b:+d}={c}", str(x), {"a": a, "b": b, "c": c})


def _linear_wrong(inst):
    return str(inst.meta["c"] - inst.meta["b"])  # forgot to divide


def _linear_mistake(rng, inst):
    return _differ(_linear_wrong(inst), inst.answer, lambda: str(-int(inst.answer) or 1))


def _max_make(rng):
    nums = [rng.randint(10, 99) for _ in range(rng.randint(3, 5))]
    return Instance("max " + " ".join(map(str, nums)), str(max(nums)), {"nums": nums})


def _max_wrong(inst):
    return str(inst.meta["nums"][0])  # the first, not the largest


def _max_mistake(rng, inst):
    return _differ(_max_wrong(inst), inst.answer, lambda: str(min(inst.meta["nums"])))


def _base_make(rng):
    digits = "".join(rng.choice("1234567") + "".join(rng.choice("01234567") for _ in range(rng.randint(1, 3))))
    return Instance(f"o2b {digits}", format(int(digits, 8), "b"), {"octal": digits})


def _base_wrong(inst):
    return "".join(format(int(c), "b") for c in inst.meta["octal"])  # each digit's bits without leading zeros


def _base_mistake(rng, inst):
    return _differ(_base_wrong(inst), inst.answer, lambda: inst.answer[:-1] + ("1" if inst.answer[-1] == "0" else "0"))


# --- strings ----------------------------------------------------------------------------------

def _word(rng, lo, hi, alphabet=string.ascii_lowercase):
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(lo, hi)))


def _count_make(rng):
    letters = rng.sample("abcdefgh", 5)
    target, others = letters[0], letters[1:]
    k = rng.randint(0, 9)
    chars = [target] * k + [rng.choice(others) for _ in range(rng.randint(max(0, 5 - k), 12 - k))]
    rng.shuffle(chars)
    s = "".join(chars)
    return Instance(f"count {target} in {s}", str(k), {"target": target, "s": s})


def _count_wrong(inst):
    return str(len(inst.meta["s"]))  # every letter counted


def _count_mistake(rng, inst):
    return _differ(_count_wrong(inst), inst.answer, lambda: str(int(inst.answer) + 1))


def _reverse_make(rng):
    s = _word(rng, 3, 7)
    return Instance(f"reverse {s}", s[::-1], {"s": s})


def _reverse_wrong(inst):
    return inst.meta["s"]  # copied, not reversed


def _reverse_mistake(rng, inst):
    s = inst.meta["s"]
    return _differ(_reverse_wrong(inst), inst.answer, lambda: s[1:] + s[0])


def _sort_make(rng):
    nums = [rng.randint(0, 9) for _ in range(rng.randint(4, 7))]
    return Instance("sort " + " ".join(map(str, nums)), " ".join(map(str, sorted(nums))), {"nums": nums})


def _sort_mistake(rng, inst):
    nums = inst.meta["nums"]
    shuffled = nums[:]
    rng.shuffle(shuffled)
    return _differ(_sort_wrong(inst), inst.answer, lambda: " ".join(map(str, shuffled)))


def _sort_wrong(inst):
    return " ".join(map(str, sorted(inst.meta["nums"], reverse=True)))  # descending


_CASE_OPS = {"upper": str.upper, "lower": str.lower, "swap": str.swapcase}


def _case_make(rng):
    op = rng.choice(sorted(_CASE_OPS))
    s = "".join(rng.choice([c, c.upper()]) for c in _word(rng, 3, 6))
    return Instance(f"{op} {s}", _CASE_OPS[op](s), {"op": op, "s": s})


def _case_wrong(inst):
    return inst.meta["s"]  # left as it was


def _case_mistake(rng, inst):
    s = inst.meta["s"]
    return _differ(_case_wrong(inst), inst.answer, lambda: s.swapcase())


# --- code: a program from a spoken specification -------------------------------------------

CODE_PREFIX = "f=lambda x:"
_CODE_OPS = {"plus": "+", "minus": "-", "times": "*"}
_CODE_HIDDEN = (0, 1, 2, -3, 5, 7)


def _code_body(steps: list[tuple[str, int]], parenthesize: bool = True) -> str:
    """The expression for `x` put through `steps` in order; `*` after `+`/`-` needs parentheses."""
    body, additive = "x", False
    for op, k in steps:
        if op == "times" and additive and parenthesize:
            body = f"({body})"
        body, additive = f"{body}{_CODE_OPS[op]}{k}", op != "times"
    return body


def _code_make(rng):
    steps = [(rng.choice(list(_CODE_OPS)), rng.randint(2, 9)) for _ in range(rng.randint(2, 3))]
    body = _code_body(steps)
    f = _compile_body(body)
    spec = " ".join(f"{op} {k}" for op, k in steps)
    tests = [f"assert f({x}) == {f(x)}" for x in _CODE_HIDDEN]
    return Instance(f"code {spec}", f"{CODE_PREFIX}{body}", {"steps": [list(s) for s in steps]}, tests=tests)


def _code_wrong(inst):
    # Writes the steps left to right with no parentheses: precedence then reorders them.
    return f"{CODE_PREFIX}{_code_body([tuple(s) for s in inst.meta['steps']], parenthesize=False)}"


def _code_mistake(rng, inst):
    steps = [tuple(s) for s in inst.meta["steps"]]
    wrong = _code_wrong(inst)
    right = _compile_body(inst.answer[len(CODE_PREFIX):])
    if any(_compile_body(wrong[len(CODE_PREFIX):])(x) != right(x) for x in _CODE_HIDDEN):
        return wrong
    return f"{CODE_PREFIX}{_code_body(steps[:-1])}"  # forgets the last step


_SAFE_NODES = (ast.Expression, ast.BinOp, ast.UnaryOp, ast.Add, ast.Sub, ast.Mult, ast.USub, ast.UAdd,
               ast.Name, ast.Load, ast.Constant)


def _compile_body(body: str) -> Callable[[int], int]:
    """Evaluate `body` (integer arithmetic on x) without executing code: walk a whitelisted AST."""
    with warnings.catch_warnings():  # model output like `2x` warns "invalid decimal literal" on stderr
        warnings.simplefilter("ignore", SyntaxWarning)
        tree = ast.parse(body, mode="eval")
    for node in ast.walk(tree):
        if not isinstance(node, _SAFE_NODES):
            raise ValueError(f"not allowed: {type(node).__name__}")
        if isinstance(node, ast.Name) and node.id != "x":
            raise ValueError(f"unknown name {node.id}")
        if isinstance(node, ast.Constant) and (type(node.value) is not int or abs(node.value) > 10**6):
            raise ValueError("only small integer constants")

    def run(node, x):
        if isinstance(node, ast.Expression):
            return run(node.body, x)
        if isinstance(node, ast.Constant):
            return node.value
        if isinstance(node, ast.Name):
            return x
        if isinstance(node, ast.UnaryOp):
            v = run(node.operand, x)
            return -v if isinstance(node.op, ast.USub) else v
        left, right = run(node.left, x), run(node.right, x)
        if isinstance(node.op, ast.Add):
            return left + right
        if isinstance(node.op, ast.Sub):
            return left - right
        if abs(left) > 10**9 or abs(right) > 10**9:
            raise ValueError("too large")
        return left * right

    return lambda x: run(tree, x)


def parse_program(response: str) -> Callable[[int], int] | None:
    """The function a response defines, if it is `f=lambda x:<arithmetic on x>`; else None.

    This evaluates without executing: the world's code domain stays safe with no sandbox. Real code
    (arbitrary Python) is checked by `pluribus.rewards` in the sandbox instead.
    """
    text = response.strip()
    if not text.startswith(CODE_PREFIX):
        return None
    try:
        return _compile_body(text[len(CODE_PREFIX):].strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


def _code_check(record: Record, response: str) -> float:
    """Fraction of the hidden tests the program passes (tests read `assert f(X) == Y`)."""
    program = parse_program(response)
    if program is None or not record.tests:
        return 0.0
    passed = 0
    for test in record.tests:
        call, expected = test.removeprefix("assert f(").split(") == ")
        try:
            passed += program(int(call)) == int(expected)
        except (ValueError, RecursionError):
            pass
    return passed / len(record.tests)


# --- instruction following with checkable format constraints -------------------------------

_SEPS = "-,|+/"


def _ifeval_make(rng):
    word, n, sep = _word(rng, 2, 4), rng.randint(2, 4), rng.choice(_SEPS)
    case = rng.choice(["upper", "lower"])
    answer = sep.join([word.upper() if case == "upper" else word] * n)
    return Instance(f"say {word} {n}x sep{sep} {case}", answer,
                    {"word": word, "n": n, "sep": sep, "case": case})


def _ifeval_constraints(meta: dict[str, Any], response: str) -> list[bool]:
    """The four constraints: separator, count, the word itself, letter case."""
    text = response.strip()
    parts = text.split(meta["sep"])
    return [
        meta["sep"] in text and all(s not in text for s in _SEPS if s != meta["sep"]),
        len(parts) == meta["n"],
        all(p.lower() == meta["word"] for p in parts),
        text == (text.upper() if meta["case"] == "upper" else text.lower()),
    ]


def _ifeval_check(record: Record, response: str) -> float:
    met = _ifeval_constraints(record.meta, response)
    return sum(met) / len(met)


def _ifeval_wrong(inst):
    m = inst.meta  # the other letter case
    return m["sep"].join([m["word"] if m["case"] == "upper" else m["word"].upper()] * m["n"])


def _ifeval_mistake(rng, inst):
    m = inst.meta
    wrong_case = m["word"] if m["case"] == "upper" else m["word"].upper()
    return m["sep"].join([wrong_case] * (m["n"] + rng.choice([0, 1])))


# --- rubric: no rule in training, a hidden checker per criterion for evaluation --------------

def _is_prime(n: int) -> bool:
    return n > 1 and all(n % d for d in range(2, int(n**0.5) + 1))


def _describe_answer(n: int) -> str:
    words = ["even" if n % 2 == 0 else "odd", f"s{sum(map(int, str(n)))}"]
    return " ".join(words + (["prime"] if _is_prime(n) else []))


def _rubric_make(rng):
    # Criteria are terse (`odd`, `s14`, `not prime`, `extra words`) so that a judge prompt, its response
    # and the judgement fit the tiny model's 128 positions; `rubric_verdicts` gives their meaning. Like
    # a Rubrics-as-Rewards rubric they are written knowing the answer: the judge compares, it need not
    # compute a digit sum or a primality test.
    n = rng.randint(2, 999)
    digit_sum = sum(map(int, str(n)))
    rubric = [
        Criterion("even" if n % 2 == 0 else "odd", 3.0, "essential"),
        Criterion(f"s{digit_sum}", 2.0, "important"),
        Criterion("prime" if _is_prime(n) else "not prime", 1.0, "optional"),
        Criterion("extra words", -2.0, "pitfall"),  # met (y) when the response makes the mistake
    ]
    return Instance(f"describe {n}", _describe_answer(n), {"n": n}, rubric=rubric)


def rubric_verdicts(record: Record, response: str) -> list[bool]:
    """The hidden checker: one verdict per rubric criterion of the rubric domain, in order.

    1 the parity word, and not the other; 2 the digit-sum word `s<sum>`; 3 `prime` said exactly when n is
    prime; 4 (pitfall) extra words: a word repeated, a word outside the format, or two `s` words.
    """
    n = record.meta["n"]
    words = response.split()
    parity = "even" if n % 2 == 0 else "odd"
    allowed = {"even", "odd", "prime"} | {f"s{k}" for k in range(0, 40)}
    return [
        parity in words and ({"even", "odd"} - {parity}).isdisjoint(words),
        f"s{sum(map(int, str(n)))}" in words,
        ("prime" in words) == _is_prime(n),
        len(words) != len(set(words)) or not set(words) <= allowed or sum(w.startswith("s") for w in words) > 1,
    ]


def rubric_score(rubric: list[Criterion], verdicts: list[bool]) -> float:
    """Rubrics-as-Rewards aggregation: Σ w_j c_j / Σ_{w_j>0} w_j, clipped to [0, 1]."""
    total = sum(c.weight for c in rubric if c.weight > 0)
    score = sum(c.weight for c, met in zip(rubric, verdicts) if met)
    return min(1.0, max(0.0, score / total)) if total > 0 else 0.0


def _rubric_check(record: Record, response: str) -> float:
    return rubric_score(record.rubric or [], rubric_verdicts(record, response))


def _rubric_wrong(inst):
    n = inst.meta["n"]  # the parity flipped
    return f"{'odd' if n % 2 == 0 else 'even'} s{sum(map(int, str(n)))}"


def _rubric_mistake(rng, inst):
    n = inst.meta["n"]
    wrong_parity = "odd" if n % 2 == 0 else "even"
    return f"{wrong_parity} s{sum(map(int, str(n))) + rng.choice([-1, 1])}"


DOMAINS: dict[str, Domain] = {d.name: d for d in [
    Domain("add", "add two numbers of up to 2 digits", _add_make, exact, _add_mistake, _add_wrong),
    Domain("arith", "evaluate + - * over three digits, with precedence", _arith_make, exact, _arith_mistake, _arith_wrong),
    Domain("linear", "solve a*x+b=c for an integer x", _linear_make, exact, _linear_mistake, _linear_wrong),
    Domain("max", "the largest of 3-5 two-digit numbers", _max_make, exact, _max_mistake, _max_wrong),
    Domain("base", "write a 2-4 digit octal number in binary", _base_make, exact, _base_mistake, _base_wrong),
    Domain("count", "count one letter's occurrences in a string", _count_make, exact, _count_mistake, _count_wrong),
    Domain("reverse", "reverse a string", _reverse_make, exact, _reverse_mistake, _reverse_wrong),
    Domain("sort", "sort 4-7 digits ascending", _sort_make, exact, _sort_mistake, _sort_wrong),
    Domain("case", "upper, lower or swap the case of a word", _case_make, exact, _case_mistake, _case_wrong),
    Domain("code", "write f(x) from a spoken chain of steps (plus, minus, times); judged by hidden tests", _code_make,
           _code_check, _code_mistake, _code_wrong),
    Domain("ifeval", "repeat a word under separator, count and case constraints", _ifeval_make,
           _ifeval_check, _ifeval_mistake, _ifeval_wrong),
    Domain("describe", "describe a number against a weighted rubric (GRM-judged in training)",
           _rubric_make, _rubric_check, _rubric_mistake, _rubric_wrong, rubric_domain=True),
]}
