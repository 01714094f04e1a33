"""Rewards for real data: math answers, IFEval constraints, the overlong penalty, and routing."""

from __future__ import annotations

import importlib.util
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

import pluribus.rewards.math as rmath
from pluribus.data import Record
from pluribus.errors import PluribusError
from pluribus.rewards.ifeval import CONSTRAINTS, check_ifeval, count_sentences, count_words, ifeval_verdicts
from pluribus.rewards.length import LengthPenalty, apply_length_penalty, length_penalty
from pluribus.rewards.math import check_math, extract_answer, last_boxed
from pluribus.rewards.router import RewardRouter
from pluribus.world import DOMAINS, generate

HAS_MATH_VERIFY = importlib.util.find_spec("math_verify") is not None


# --- math -------------------------------------------------------------------------------------

@pytest.mark.parametrize("response, gold", [
    (r"So the answer is $\boxed{\frac{3}{4}}$.", "0.75"),
    (r"\boxed{0.5}", r"\dfrac{1}{2}"),
    (r"\boxed{3/4}", r"\frac{3}{4}"),
    (r"\boxed{2.0}", "2"),
    (r"\boxed{\$1,234}", "1234"),
    (r"\boxed{x = 5}", "5"),
    (r"\boxed{50\%}", "50"),
    (r"\boxed{0.333333}", "1/3"),
    ("She pays 3 + 15 = 18 dollars.\n#### 18", "Work: 3 + 15 = 18\n#### 18"),
    ("Total: 1,000 + 234\n#### 1,234", "#### 1234"),
    ("First 7 apples, then 11 more, so 18.", "18"),
    (r"First \boxed{5}, on second thought \boxed{7}", "7"),
    (r"\boxed 9", "9"),
])
def test_math_right_answers_score_one(response, gold):
    assert check_math(response, gold) == 1.0


@pytest.mark.parametrize("response, gold", [
    (r"\boxed{41}", "42"),
    (r"\boxed{0.33}", "1/3"),
    (r"\boxed{7} was my first guess, but \boxed{5}", "7"),
    ("#### 19", "#### 18"),
    ("I think it is 17 or 18, probably 17.", "18"),
    (r"\boxed{-4}", "4"),
])
def test_math_wrong_answers_score_zero(response, gold):
    assert check_math(response, gold) == 0.0


def test_boxed_extraction_balances_nested_braces():
    assert last_boxed(r"a \boxed{\frac{1}{\sqrt{2}}} b") == r"\frac{1}{\sqrt{2}}"
    assert last_boxed(r"\boxed{\{1, 2\}} and \boxed{\frac{1}{2}") == r"\{1, 2\}"  # last one never closes
    assert last_boxed("no box here") is None
    assert extract_answer("The answer is 12. Done") == "12"
    assert extract_answer("#### 3/4\n") == "3/4"
    assert extract_answer("no digits at all") is None


@pytest.mark.parametrize("response, gold", [
    (None, "1"), (12, "12"), ("", "1"), ("no answer", "1"), (r"{{{\boxed{", "2"), (r"\boxed{}", "0"),
    ("42", None), ("42", ""), (r"\boxed{\frac{1}{0}}", "1"), ("9" * 5000, "9"),
])
def test_math_garbage_scores_zero_without_raising(response, gold):
    assert check_math(response, gold) == 0.0


@pytest.mark.skipif(not HAS_MATH_VERIFY, reason="math-verify (the `math` extra) not installed")
def test_math_symbolic_equivalence_with_math_verify():
    assert check_math(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}") == 1.0
    assert check_math(r"\boxed{\frac{\sqrt{3}}{2}}", r"\frac{1}{\sqrt{2}}") == 0.0
    assert check_math(r"\boxed{\text{(B)}}", "B") == 1.0


def test_math_fallback_without_math_verify(monkeypatch):
    monkeypatch.setattr(rmath, "_math_verify", lambda: None)
    assert check_math(r"\boxed{\frac{3}{4}}", "0.75") == 1.0
    assert check_math("#### 1,234", "1234.0") == 1.0
    assert check_math(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}") == 0.0  # needs symbolic algebra


def test_math_in_threads_matches_main_thread_and_skips_exploding_answers():
    cases = [(r"\boxed{\frac{\sqrt{2}}{2}}", r"\frac{1}{\sqrt{2}}"), (r"\boxed{\frac{3}{4}}", "0.75"),
             (r"\boxed{9^{9^{9}}}", "5"), (r"\boxed{(x+1)^{1000}}", "x"), (r"\boxed{10!!!!}", "3"),
             ("#### 41", "42")]
    in_main = [check_math(r, g) for r, g in cases]
    with ThreadPoolExecutor(max_workers=2) as pool:
        in_threads = list(pool.map(lambda c: check_math(*c), cases))
    assert in_threads == in_main
    assert in_main[1:] == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert in_main[0] == (1.0 if HAS_MATH_VERIFY else 0.0)


# --- ifeval -----------------------------------------------------------------------------------

# instruction id, kwargs, a response that follows it, one that does not
IFEVAL_CASES = [
    ("length_constraints:number_words", {"num_words": 5, "relation": "less than"},
     "Four words right here.", "This answer has six words."),
    ("length_constraints:number_words", {"num_words": 3, "relation": "at least"},
     "one two three", "one two"),
    ("length_constraints:number_sentences", {"num_sentences": 2, "relation": "less than"},
     "Mr. Smith paid 3.50 dollars.", "One. Two. Three."),
    ("length_constraints:number_sentences", {"num_sentences": 3, "relation": "at least"},
     "One! Two? Three.", "Only one sentence here."),
    ("length_constraints:number_paragraphs", {"num_paragraphs": 2},
     "First part.\n***\nSecond part.", "First part.\n***\n\n***\nSecond part."),
    ("length_constraints:nth_paragraph_first_word",
     {"num_paragraphs": 2, "nth_paragraph": 2, "first_word": "then"},
     "We start.\n\nThen, we end.", "We start.\n\nFinally we end."),
    ("keywords:existence", {"keywords": ["ocean", "Blue"]},
     "The blue OCEAN is wide.", "The blue sky is wide."),
    ("keywords:forbidden_words", {"forbidden_words": ["bad", "awful"]},
     "A badge is fine.", "That was Awful."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "at least"},
     "A cat saw a Cat.", "A cat in the category."),
    ("keywords:frequency", {"keyword": "cat", "frequency": 2, "relation": "less than"},
     "One cat only.", "cat cat"),
    ("keywords:letter_frequency", {"letter": "z", "let_frequency": 2, "let_relation": "at least"},
     "Zebra zone.", "Zebra."),
    ("detectable_content:number_placeholders", {"num_placeholders": 2},
     "Dear [name], at [address].", "Dear [name]."),
    ("detectable_content:postscript", {"postscript_marker": "P.S."},
     "Body text.\nP.S. one more thing", "Body text with tips. shown"),
    ("detectable_content:postscript", {"postscript_marker": "P.P.S"},
     "Body.\n\nP.P.S see you", "Body.\n\nP.S. see you"),
    ("detectable_format:number_bullet_lists", {"num_bullets": 2},
     "Items:\n* apples\n- pears", "Items:\n* apples\n* pears\n* plums"),
    ("detectable_format:constrained_response", {},
     "My answer is maybe.", "Maybe."),
    ("detectable_format:number_highlighted_sections", {"num_highlights": 2},
     "*first* and **second**", "*first* only"),
    ("detectable_format:multiple_sections", {"section_spliter": "SECTION", "num_sections": 2},
     "SECTION 1\nintro\nSECTION 2\nbody", "SECTION 1\nall in one"),
    ("detectable_format:json_format", {},
     '```json\n{"a": [1, 2]}\n```', '{"a": [1, 2]'),
    ("detectable_format:title", {},
     "<<A Day Out>>\nWe went.", "A Day Out\nWe went. <<>>"),
    ("combination:two_responses", {},
     "First take.\n******\nSecond take.", "First take.\n******\nFirst take."),
    ("combination:repeat_prompt", {"prompt_to_repeat": "Write a haiku."},
     "write a haiku. Leaves fall...", "Here is a haiku: leaves fall..."),
    ("startend:end_checker", {"end_phrase": "Any other questions?"},
     "That is all. Any other questions?", "Any other questions? That is all."),
    ("startend:quotation", {},
     '"All of it quoted."', '"Half quoted." and more'),
    ("change_case:english_lowercase", {},
     "all lower case, 42 times.", "Not all lower case."),
    ("change_case:english_capital", {},
     "ALL CAPS, 42 TIMES.", "ALL CAPS BUT one."),
    ("change_case:capital_word_frequency", {"capital_frequency": 2, "capital_relation": "at least"},
     "NASA and the ESA met.", "Only NASA here."),
    ("punctuation:no_comma", {},
     "No commas here.", "Well, there is one."),
]


@pytest.mark.parametrize("instruction_id, kwargs, follows, violates", IFEVAL_CASES,
                         ids=[f"{c[0]}-{i}" for i, c in enumerate(IFEVAL_CASES)])
def test_ifeval_checker_on_following_and_violating_response(instruction_id, kwargs, follows, violates):
    assert check_ifeval(follows, [instruction_id], [kwargs]) == 1.0
    assert check_ifeval(violates, [instruction_id], [kwargs]) == 0.0


def test_every_registered_ifeval_checker_is_tested():
    assert {c[0] for c in IFEVAL_CASES} == set(CONSTRAINTS)


def test_ifeval_reward_is_fraction_followed_and_empty_follows_nothing():
    ids = ["punctuation:no_comma", "change_case:english_lowercase", "detectable_format:title"]
    assert check_ifeval("hello there", ids, [{}, {}, {}]) == pytest.approx(2 / 3)
    assert ifeval_verdicts("Hello, there", ids, [{}, {}, {}]) == [False, False, False]
    assert check_ifeval("   ", ["punctuation:no_comma"], [{}]) == 0.0


def test_ifeval_loose_mode_forgives_a_preamble_line_and_markdown():
    response = "Sure, here it is:\n<<title>>\nthe body"
    assert check_ifeval(response, ["punctuation:no_comma"], [{}], strict=True) == 0.0
    assert check_ifeval(response, ["punctuation:no_comma"], [{}], strict=False) == 1.0
    assert check_ifeval("*hi there*", ["startend:end_checker"], [{"end_phrase": "there"}], strict=False) == 1.0


def test_ifeval_drops_null_kwargs_as_in_the_hf_dataset():
    kwargs = {"num_words": 3, "relation": "at least", "keywords": None, "end_phrase": None}
    assert check_ifeval("one two three", ["length_constraints:number_words"], [kwargs]) == 1.0


def test_ifeval_bad_data_is_a_clear_error():
    with pytest.raises(PluribusError, match="unknown ifeval instruction 'keywords:nope'.*keywords:existence"):
        check_ifeval("x", ["keywords:nope"], [{}])
    with pytest.raises(PluribusError, match="language:response_language.*language detector"):
        check_ifeval("x", ["language:response_language"], [{"language": "en"}])
    with pytest.raises(PluribusError, match="number_words.*num_words"):
        check_ifeval("x", ["length_constraints:number_words"], [{"relation": "at least"}])
    with pytest.raises(PluribusError, match="relation must be one of"):
        check_ifeval("x", ["length_constraints:number_words"], [{"num_words": 3, "relation": "at most"}])
    with pytest.raises(PluribusError, match="2 instruction ids but 1 kwargs"):
        check_ifeval("x", ["punctuation:no_comma", "startend:quotation"], [{}])


def test_word_and_sentence_counts():
    assert count_words("It's 3.5 km, isn't it?") == 8  # IFEval counts runs of word characters
    assert count_sentences("Dr. J. Watson paid 3.14 dollars. Really? Yes... it is! \"Quoted.\" End") == 5


# --- length penalty ---------------------------------------------------------------------------

@pytest.mark.parametrize("num_tokens, expected", [
    (0, 0.0), (80, 0.0),          # free up to max - cache = 80
    (81, -0.05), (90, -0.5),      # (80 - L) / 20 on the ramp
    (100, -1.0), (150, -1.0),     # -1 at and beyond max
])
def test_length_penalty_hand_worked(num_tokens, expected):
    assert length_penalty(num_tokens, max_tokens=100, cache_tokens=20) == pytest.approx(expected)


def test_length_penalty_without_cache_is_a_cliff_and_adds_to_reward():
    assert length_penalty(100, 100, 0) == 0.0
    assert length_penalty(101, 100, 0) == -1.0
    assert apply_length_penalty(1.0, 90, 100, 20) == pytest.approx(0.5)
    assert LengthPenalty(100, 20).apply(0.0, 95) == pytest.approx(-0.75)
    with pytest.raises(PluribusError, match="cache_tokens"):
        LengthPenalty(100, 120)
    with pytest.raises(PluribusError, match="max_tokens"):
        length_penalty(5, 0, 0)


# --- router -----------------------------------------------------------------------------------

def test_router_scores_every_world_domain_by_its_checker():
    router = RewardRouter()
    records = [r for name in DOMAINS for r in generate(name, "test", 3, seed=1)]
    assert router.score(records, [r.answer for r in records]) == [1.0] * len(records)
    assert all(router(r, "") < 1.0 for r in records)


@pytest.mark.parametrize("name, wrong", [
    ("add", lambda r: str(int(r.answer) + 1)),
    ("reverse", lambda r: r.answer[::-1] + "x"),
    ("sort", lambda r: r.answer[::-1] + " 0"),
    ("code", lambda r: "def f(x):return 0"),
])
def test_router_world_wrong_answers_score_zero(name, wrong):
    router = RewardRouter()
    records = generate(name, "train", 4, seed=2)
    assert router.score(records, [wrong(r) for r in records]) == [0.0] * 4


def test_router_real_data_kinds():
    router = RewardRouter({"gsm8k": "math", "ifeval": "ifeval", "mine": "world:add"})
    math_record = Record("g1", "gsm8k", "Tom has 3 ...", answer="3 + 15 = 18\n#### 18")
    if_record = Record("i1", "ifeval", "Write about cats without commas, in lower case.",
                       meta={"instruction_id_list": ["punctuation:no_comma", "change_case:english_lowercase"],
                             "kwargs": [{}, {}]})
    mine = Record("m1", "mine", "add 2 3", answer="5")
    records = [math_record, math_record, if_record, if_record, if_record, mine, mine]
    responses = [r"so \boxed{18}", r"so \boxed{17}", "cats purr.", "Cats purr.", "Cats, purr.", "5", "6"]
    assert router.score(records, responses) == [1.0, 0.0, 1.0, 0.5, 0.0, 1.0, 0.0]
    assert router.kinds["ifeval"] == "ifeval" and router.kinds["add"] == "world"


def test_router_code_kind():
    pytest.importorskip("pluribus.rewards.code")
    from pluribus.rewards.sandbox import SandboxUnavailable

    router = RewardRouter({"mbpp": "code"})
    record = Record("c1", "mbpp", "Write add(a, b).", tests=["assert add(2, 3) == 5", "assert add(-1, 1) == 0"])
    right = "Here:\n```python\ndef add(a, b):\n    return a + b\n```"
    wrong = "```python\ndef add(a, b):\n    return a - b\n```"
    try:
        assert router.score([record, record], [right, wrong]) == [1.0, 0.0]
        assert router(record, right) == 1.0
    except SandboxUnavailable as e:
        pytest.skip(f"no sandbox here: {e}")


def test_router_grm_custom_and_length_penalty():
    with pytest.raises(PluribusError, match="domain 'chat' needs the generative judge \\(grm\\); pass a judge"):
        RewardRouter({"chat": "grm"})(Record("x", "chat", "hi"), "hello")
    judged = RewardRouter({"chat": "grm"}, judge=lambda record, response: 0.25)
    assert judged(Record("x", "chat", "hi"), "hello") == 0.25
    custom = RewardRouter({"chat": lambda record, response: float(len(response) > 3)})
    assert custom.score([Record("x", "chat", "hi")] * 2, ["hello", "hi"]) == [1.0, 0.0]

    penalised = RewardRouter(length_penalty=LengthPenalty(max_tokens=100, cache_tokens=20))
    record = generate("add", "train", 1)[0]
    assert penalised.score([record] * 3, [record.answer, record.answer, "0x"], num_tokens=[10, 90, 200]) == \
        pytest.approx([1.0, 0.5, -1.0])
    with pytest.raises(PluribusError, match="needs num_tokens"):
        penalised.score([record], [record.answer])


def test_router_errors_name_what_is_known():
    router = RewardRouter({"gsm8k": "math"})
    with pytest.raises(PluribusError, match="no reward for domain 'nope' \\(known: add, .*gsm8k\\)"):
        router(Record("x", "nope", "?"), "1")
    with pytest.raises(PluribusError, match="unknown reward kind 'maths'.*math, code, ifeval, grm"):
        RewardRouter({"gsm8k": "maths"})
    with pytest.raises(PluribusError, match="unknown world domain 'adder'.*add"):
        RewardRouter({"mine": "world:adder"})
    with pytest.raises(PluribusError, match="kind 'world' needs a world domain"):
        RewardRouter({"mine": "world"})
    with pytest.raises(PluribusError, match="math reward needs an 'answer'"):
        router(Record("x", "gsm8k", "?"), "1")
    with pytest.raises(PluribusError, match="2 records but 1 responses"):
        router.score([Record("x", "gsm8k", "?", answer="1")] * 2, ["1"])


def test_router_reads_jsonl_records(tmp_path):
    # Records from a user's JSONL carry IFEval's format through `meta` unchanged.
    line = {"id": "i2", "domain": "ifeval", "prompt": "Answer in JSON.",
            "meta": {"instruction_id_list": ["detectable_format:json_format"], "kwargs": [{}]}}
    record = Record.from_json(json.loads(json.dumps(line)))
    assert RewardRouter({"ifeval": "ifeval"})(record, '{"ok": true}') == 1.0
