"""The embedded world: checkers accept right answers and reject wrong ones, splits are disjoint,
exports follow the data contract and are right when checked independently of the project's code."""

import json
import random
import re

import pytest

from pluribus.data import Record, read_jsonl, write_jsonl
from pluribus.errors import PluribusError
from pluribus.world import DOMAINS, check, generate, instance_of, split_of, trivial_floor
from pluribus.world.domains import Instance


def test_at_least_twelve_domains_with_a_rubric_domain():
    assert len(DOMAINS) >= 12
    assert any(d.rubric_domain for d in DOMAINS.values())


@pytest.mark.parametrize("name", list(DOMAINS))
def test_checker_accepts_right_and_rejects_wrong(name):
    records = generate(name, "test", 60, seed=3)
    import random

    rng = random.Random(0)
    for r in records:
        assert check(r, r.answer) == 1.0
        assert check(r, "  " + r.answer + "\n") == 1.0  # surrounding white space is not an error
        mistake = DOMAINS[name].mistake(rng, Instance(r.prompt, r.answer, r.meta, r.tests, r.rubric))
        assert 0.0 <= check(r, mistake) < 1.0, (r.prompt, mistake)
        assert check(r, "") < 1.0
        assert 0.0 <= check(r, "garbage !!") < 1.0


@pytest.mark.parametrize("name", list(DOMAINS))
def test_train_and_test_are_disjoint(name):
    train = {r.prompt for r in generate(name, "train", 3000, seed=0)}
    test = {r.prompt for s in (0, 1) for r in generate(name, "test", 300, seed=s)}
    assert not train & test
    assert all(split_of(p) == "test" for p in test)


def test_generation_is_deterministic_and_seeded():
    a = generate("add", "train", 20, seed=5)
    assert a == generate("add", "train", 20, seed=5)
    assert [r.prompt for r in a] != [r.prompt for r in generate("add", "train", 20, seed=6)]


def test_a_training_set_follows_the_domain_distribution_and_a_test_set_is_unique():
    """8,000 unique code demonstrations would hold 5% two-step programs (their space runs out); i.i.d.
    training draws keep the generator's share, which is what the test set holds."""
    share = lambda records: sum(len(r.meta["steps"]) == 2 for r in records) / len(records)  # noqa: E731
    train = generate("code", "train", 8000, seed=0)
    test = generate("code", "test", 400, seed=0)
    assert 0.4 <= share(train) <= 0.6 and 0.3 <= share(test) <= 0.6
    assert share(generate("code", "train", 8000, seed=0, unique=True)) < 0.1
    assert len({r.prompt for r in train}) < len(train)  # repeats, as the distribution has them
    assert len({r.prompt for r in test}) == len(test)


@pytest.mark.parametrize("name", list(DOMAINS))
def test_trivial_floor_is_low(name):
    assert trivial_floor(generate(name, "test", 200)) <= 0.20


def _independent_answer(prompt: str, meta: dict) -> str | None:
    """Solve the task from the prompt text alone, with none of the project's code."""
    op, _, rest = prompt.partition(" ")
    if op == "add":
        a, b = map(int, rest.split())
        return str(a + b)
    if op == "calc":
        assert re.fullmatch(r"[0-9+\-*]+", rest)
        return str(eval(rest))
    if op == "solve":
        m = re.fullmatch(r"(\d+)x([+-]\d+)=(-?\d+)", rest)
        a, b, c = map(int, m.groups())
        return str((c - b) // a)
    if op == "max":
        return str(max(map(int, rest.split())))
    if op == "o2b":
        return bin(int(rest, 8))[2:]
    if op == "count":
        letter, _, s = rest.partition(" in ")
        return str(s.count(letter))
    if op == "reverse":
        return rest[::-1]
    if op == "sort":
        return " ".join(sorted(rest.split(), key=int))
    if op in ("upper", "lower", "swap"):
        return {"upper": rest.upper(), "lower": rest.lower(), "swap": rest.swapcase()}[op]
    if op == "say":
        word, n, sep, case = re.fullmatch(r"(\w+) (\d)x sep(.) (upper|lower)", rest).groups()
        return sep.join([word.upper() if case == "upper" else word] * int(n))
    if op == "describe":
        n = int(rest)
        prime = n > 1 and all(n % d for d in range(2, n))
        return " ".join(["even" if n % 2 == 0 else "odd", f"s{sum(int(c) for c in rest)}"] + (["prime"] if prime else []))
    return None


@pytest.mark.parametrize("name", list(DOMAINS))
def test_exported_test_records_are_right(name, tmp_path):
    from typer.testing import CliRunner

    from pluribus.cli import app

    out = tmp_path / f"{name}.jsonl"
    result = CliRunner().invoke(app, ["world", "export", "--domain", name, "--split", "test", "--n", "50",
                                      "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    lines = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(lines) == 50
    for obj in lines:
        assert {"id", "domain", "prompt"} <= set(obj) and obj["domain"] == name
        if name == "code":  # run the answer against its own tests and the spoken steps, in a fresh namespace
            namespace: dict = {}
            exec(obj["answer"], namespace)  # noqa: S102 - our own generated answer, not model output
            for test in obj["tests"]:
                exec(test, namespace)  # noqa: S102
            words = obj["prompt"].split()[1:]
            for x in range(-5, 6):
                value = x
                for op, k in zip(words[::2], map(int, words[1::2])):
                    value = {"plus": value + k, "minus": value - k, "times": value * k}[op]
                assert namespace["f"](x) == value, obj
        else:
            assert _independent_answer(obj["prompt"], obj.get("meta", {})) == obj["answer"], obj
    assert [r.to_json() for r in read_jsonl(out)] == lines


def test_user_jsonl_loads_like_world_data(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({"id": "u1", "domain": "add", "prompt": [{"role": "user", "content": "add 2 2"}],
                                "answer": "4"}) + "\n")
    (record,) = read_jsonl(path)
    assert record.messages() == [{"role": "user", "content": "add 2 2"}]
    assert check(record, "4") == 1.0 and check(record, "5") == 0.0


def test_bad_jsonl_is_one_clear_error(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"id": "1", "domain": "add", "prompt": "x"}\n{not json\n')
    with pytest.raises(PluribusError, match=r"bad.jsonl:2: not valid JSON"):
        read_jsonl(path)
    path.write_text('{"id": "1", "prompt": "x"}\n')
    with pytest.raises(PluribusError, match="missing field 'domain'"):
        read_jsonl(path)
    with pytest.raises(PluribusError, match="not found"):
        read_jsonl(tmp_path / "none.jsonl")


def test_rubric_records_round_trip(tmp_path):
    records = generate("describe", "test", 5)
    write_jsonl(records, tmp_path / "r.jsonl")
    back = read_jsonl(tmp_path / "r.jsonl")
    assert back == records
    assert {c.kind for c in back[0].rubric} == {"essential", "important", "optional", "pitfall"}


def test_code_checker_never_executes_model_output():
    (record,) = generate("code", "test", 1)
    assert check(record, "f=lambda x:__import__('os').system('touch /tmp/pwned')") == 0.0
    assert check(record, "f=lambda x:(lambda: 1)()") == 0.0
    assert check(record, "f=lambda x:" + "9" * 50) == 0.0


def test_unknown_domain_is_a_clear_error():
    with pytest.raises(PluribusError, match="unknown domain 'nope'"):
        generate("nope", "train", 1)
    assert isinstance(Record(id="x", domain="add", prompt="p"), Record)


@pytest.mark.parametrize("name", list(DOMAINS))
def test_with_mistakes_replaces_the_given_share_with_wrong_answers(name):
    from pluribus.world import with_mistakes

    records = generate(name, "train", 400, seed=3)
    noisy = with_mistakes(records, 0.5, seed=0)
    flipped = [(n, r) for n, r in zip(noisy, records) if n.meta.get("demo_mistake")]
    wrongable = [r for r in records if check(r, DOMAINS[name].wrong(instance_of(r))) < 1.0]
    assert len(wrongable) >= 0.15 * len(records)  # every domain's wrong procedure is often wrong
    assert 0.4 * len(wrongable) <= len(flipped) <= 0.6 * len(wrongable)
    assert all(check(r, n.answer) < 1.0 for n, r in flipped)  # a mistake is always wrong
    assert all(n.answer == DOMAINS[name].wrong(instance_of(r)) for n, r in flipped)  # and always the systematic one
    assert all(n == r for n, r in zip(noisy, records) if not n.meta.get("demo_mistake"))
    assert with_mistakes(records, 0.5, seed=0) == noisy and with_mistakes(records, 0.0) == records


def _edit_distance(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]


def test_find_examples_mark_exactly_the_queries_that_occur():
    """The general skill in the base's corpus: one mark per query, `y` exactly when it is a whole word of the
    passage; both layouts occur; a good share of the absent queries are one edit from a passage word."""
    from pluribus.world.skills import find_example

    rng = random.Random(3)
    layouts, absent, near = set(), 0, 0
    for _ in range(2000):
        prompt, answer = find_example(rng)
        head, rest = prompt.split(" ", 1)
        layouts.add(head)
        if head == "find":
            queries, passage = rest.split(" in ")
        else:
            passage, queries = rest.split(" find ")
        queries, passage = queries.split(), passage.split()
        assert 1 <= len(queries) <= 4 and 2 <= len(passage) <= 7 and len(prompt) + len(answer) <= 100
        assert answer.split() == ["y" if q in passage else "n" for q in queries]
        for q in queries:
            if q not in passage:
                absent += 1
                near += min(_edit_distance(q, w) for w in passage) == 1
    assert layouts == {"find", "in"}
    assert 0.5 < near / absent < 0.9  # 60% of misses are drawn as near misses (a few land on another word)
    assert find_example(random.Random(7)) == find_example(random.Random(7))


def test_the_find_share_is_left_out_of_a_pretraining_key_when_zero():
    """An old pretraining stage's key (its config dump) holds when the new field keeps its default."""
    from pluribus.config import PretrainConfig

    assert "p_find" not in PretrainConfig(out="x").model_dump()
    assert PretrainConfig(out="x", p_find=0.1).model_dump()["p_find"] == 0.1


def test_the_pretraining_corpus_renderer_gives_render_examples_ids(tiny_llama):
    """Remembered prompts and answers give exactly `render_example`'s ids, again and again, and a text that is not
    remembered (a find-skill prompt) too; the memo holds no more than its limit."""
    from pluribus.models import load_tokenizer, render_example
    from pluribus.stages.pretrain import CorpusRenderer, corpus_answer
    from pluribus.world.skills import find_example

    tokenizer = load_tokenizer(tiny_llama)
    render = CorpusRenderer(tokenizer)
    rng = random.Random(3)
    pools = {d: [instance_of(r) for r in generate(d, "train", 5, seed=1, unique=True)] for d in DOMAINS}
    texts = []
    for _ in range(300):  # 60 prompts: each drawn ~5 times, with its right, its mistaken and other answers
        d = rng.choice(sorted(pools))
        inst = rng.choice(pools[d])
        texts.append((inst.prompt, corpus_answer(rng, inst, pools[d], DOMAINS[d], 0.3, 0.5), True))
    texts += [(*find_example(rng), False) for _ in range(20)]
    for prompt, answer, remember in texts:
        expected = render_example(tokenizer, [{"role": "user", "content": prompt}], answer)[0]
        assert render(prompt, answer, remember=remember) == expected
    assert len(render._prompts) == len({p for p, _, r in texts if r}) <= 60
    small = CorpusRenderer(tokenizer, limit=2)
    for prompt, answer, _ in texts[:30]:
        assert small(prompt, answer) == render_example(tokenizer, [{"role": "user", "content": prompt}], answer)[0]
    assert len(small._prompts) == 2 and len(small._answers) == 2
