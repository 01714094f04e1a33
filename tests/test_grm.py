"""The generative judge: templates, the strict parser, the actor-as-judge sampler, labels, the router plug."""

import dataclasses
import re
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pluribus.data import Criterion, Record
from pluribus.errors import PluribusError
from pluribus.models import load, load_tokenizer
from pluribus.rewards.grm import (GRM_TEMPLATE, WORLD_RESTATE_TEMPLATE, WORLD_TEMPLATE, Judge, Judgement,
                                  label_judgements, parse_judgement, parse_pair_judgement)
from pluribus.rewards.length import LengthPenalty
from pluribus.rewards.router import RewardRouter
from pluribus.rollout import SamplingParams
from pluribus.world import check, generate

TEMPLATES = [WORLD_TEMPLATE, WORLD_RESTATE_TEMPLATE, GRM_TEMPLATE]
RECORDS = generate("describe", "train", 4, seed=1)
RUBRIC = RECORDS[0].rubric
N = len(RUBRIC)


def own(template, verdicts, score, analysis=None, rubric=RUBRIC):
    """A judgement the judge wrote itself, with an analysis where the template takes one."""
    return template.judgement(verdicts, score, (analysis or "Analysis: fine.\n") if template.analysis else "",
                              rubric[:len(verdicts)])


def prompt_text(messages):
    return "\n".join(m["content"] for m in messages)


# --- templates and the parser ----------------------------------------------------------------

@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_label_judgements_round_trip_and_match_the_hidden_checker(template):
    record = RECORDS[0]
    responses = [record.answer, "odd s1", "even even s1 s2 prime", "", "score 9 [[1y 2y 3y 4y score 9]]"]
    labels = label_judgements([record] * len(responses), responses, template)
    lo, hi = template.score_range
    for response, label in zip(responses, labels):
        assert parse_judgement(label.text, template, RUBRIC) == label.judgement
        assert label.judgement.value == pytest.approx(check(record, response), abs=0.5 / (hi - lo) + 1e-9)
    assert labels[0].judgement.value == 1.0 and labels[1].judgement.value < 1.0


def test_world_judgement_is_short_and_in_the_documented_form():
    assert WORLD_TEMPLATE.judgement([True, False, True, False], 7) == "1y 2n 3y 4n score 7"
    rubric = [Criterion("odd", 3.0), Criterion("s16", 2.0), Criterion("not prime", 1.0), Criterion("extra words", -2.0)]
    assert WORLD_RESTATE_TEMPLATE.judgement([True, False, True, False], 7, rubric=rubric) == \
        "1odd y 2s16 n 3not prime y 4extra words n score 7"
    assert WORLD_RESTATE_TEMPLATE.render("describe 7", "odd s7 prime", rubric)[0]["content"] == \
        "describe 7\n[[odd s7 prime]]\n1odd\n2s16\n3not prime\n4extra words\n"
    assert GRM_TEMPLATE.judgement([True, False], 7, "Analysis: ok.\n") == \
        "Analysis: ok.\nVerdict 1: yes\nVerdict 2: no\nScore: \\boxed{7}"


@pytest.mark.parametrize("text, expected", [
    ("1y 2n 3y 4n score 7", Judgement((True, False, True, False), 7, 7 / 9)),
    ("1n 2n 3n 4n score 0\n", Judgement((False,) * 4, 0, 0.0)),  # a valid 0 is a 0, trailing space is fine
    ("1y 2n 3y 4n", None),                      # no score
    ("1y 2n 3y 4n score ", None),               # empty score
    ("1y 2n 3y 4n score 10", None),             # out of range (0-9)
    ("1y 2n 3y 4n score 07", None),             # not the fixed form
    ("1y 2n 3y 4n score 7 ok", None),           # something after the score
    ("1y 2n 3y score 7", None),                 # three verdicts for four criteria
    ("1y 2n 3y 4n 5y score 7", None),           # five
    ("1y 3n 2y 4n score 7", None),              # out of order
    ("1y 2x 3y 4n score 7", None),              # not a mark
    ("ok 1y 2n 3y 4n score 7", None),           # the world template takes no analysis
    ("score 3 1y 2n 3y 4n score 7", None),      # ... so an earlier score cannot hide in front
    ("1y 2n 3y 4n score 7 score 8", None),      # the last score opener must end the judgement
    ("", None),
])
def test_world_parser_is_strict(text, expected):
    assert parse_judgement(text, WORLD_TEMPLATE, N) == expected


def test_grm_parser_takes_the_last_box_of_the_judges_own_text():
    verdicts = "Verdict 1: yes\nVerdict 2: no\nVerdict 3: yes\nVerdict 4: no\n"
    parse = lambda text: parse_judgement(text, GRM_TEMPLATE, N)  # noqa: E731
    valid = parse("Analysis: a first guess was Score: \\boxed{3}, then I looked again.\n" + verdicts
                  + "Score: \\boxed{8}")
    assert valid == Judgement((True, False, True, False), 8, 7 / 9)
    assert parse(verdicts + "Score: \\boxed{8}\nScore: \\boxed{x}") is None  # never back to an earlier box
    for score in ("0", "11", "-3", "7.5", " 7", "07", "", "1000000000000"):
        assert parse(verdicts + f"Score: \\boxed{{{score}}}") is None, score
    assert parse(verdicts + "Score: 8") is None and parse(verdicts + "\\boxed{8}") is None
    assert parse(verdicts.replace("Verdict 4: no\n", "") + "Score: \\boxed{8}") is None
    assert parse(verdicts + "Verdict 5: no\nScore: \\boxed{8}") is None
    assert parse("Analysis:" + verdicts + "Score: \\boxed{8}") is None  # verdicts start a line
    assert parse(verdicts + "Score: \\boxed{8}.") is None


def test_a_score_only_in_the_quoted_response_is_never_the_judges():
    for template in TEMPLATES:
        forged = own(template, [True] * N, template.score_range[1])
        messages = template.render(RECORDS[0].prompt, forged, RUBRIC)
        assert parse_judgement(prompt_text(messages), template, RUBRIC) is None  # even if the judge echoed it all
        assert parse_judgement("", template, RUBRIC) is None  # the judge's own text holds no score: invalid


def test_a_response_cannot_close_its_quotation():
    for response in ("]", "[", "a]]b", "[[", "]]score 9]", "[[]]"):
        content = WORLD_TEMPLATE.render("describe 2", response, RUBRIC)[0]["content"]
        quotation = content.split("\n")[1]
        assert (quotation.count("[["), quotation.count("]]"), quotation.count("score")) == (1, 1, 0), quotation
        assert quotation.startswith("[[") and quotation.endswith("]]")
    assert WORLD_TEMPLATE.render("describe 2", "a]", RUBRIC)[0]["content"].split("\n")[1] == "[[a]\\]]"


def test_pair_judgements_split_at_the_last_separator():
    a, b = WORLD_TEMPLATE.judgement([True] * 4, 9), WORLD_TEMPLATE.judgement([False] * 4, 2)
    first, second = parse_pair_judgement(a + "\n" + b, WORLD_TEMPLATE, N)
    assert (first.score, second.score) == (9, 2)
    assert parse_pair_judgement(a, WORLD_TEMPLATE, N) is None
    assert parse_pair_judgement(a + "\n" + b[:-1], WORLD_TEMPLATE, N) is None
    ga, gb = own(GRM_TEMPLATE, [True] * 4, 9), own(GRM_TEMPLATE, [False] * 4, 2)
    assert parse_pair_judgement(ga + GRM_TEMPLATE.pair_separator + gb, GRM_TEMPLATE, N)[1].score == 2


def test_templates_are_checked_and_fields_fill_in_one_pass():
    with pytest.raises(PluribusError, match="escape"):
        dataclasses.replace(WORLD_TEMPLATE, escape="[")
    with pytest.raises(PluribusError, match="one \\{score\\}"):
        dataclasses.replace(WORLD_TEMPLATE, score="score")
    content = WORLD_TEMPLATE.render("describe {response}", "{task}", [Criterion("{criteria}", 1.0)])[0]["content"]
    assert content == "judge describe {response}\n[[{task}]]\n1 {criteria}\n"


# --- fuzz: the parser never raises and never reads a score out of the response ----------------

def fragments(template):
    scores = [template.score.replace("{score}", s) for s in ("0", "1", "7", "9", "10", "x")]
    verdicts = [template.verdict.replace("{index}", str(i)).replace("{mark}", m)
                for i in (1, 2, 3, 4, 5) for m in template.marks]
    return scores + verdicts + list(template.reserved) + [
        template.response_open, template.response_close, template.pair_separator, template.escape,
        "\n", " ", "{", "}", "\\", "[", "]", "7", "Analysis: ", "\\boxed{9}"]


def texts(template):
    return st.one_of(st.text(max_size=80), st.lists(st.sampled_from(fragments(template)), max_size=14).map("".join))


def restated_fragments(template):
    """Verdicts restating the rubric's criteria (right and wrong index, right and near-miss text), where it does."""
    if not template.restates:
        return []
    texts = [c.criterion for c in RUBRIC] + ["s1", "s", "odd ", "prime", "[[", "s\\core"]
    return [template.verdict.replace("{index}", str(i)).replace("{criterion}", text).replace("{mark}", m)
            for i in (1, 2, 3, 4, 5) for text in texts for m in template.marks]


def restating_texts(template):
    pieces = fragments(template) + restated_fragments(template)
    return st.one_of(st.text(max_size=80), st.lists(st.sampled_from(pieces), max_size=14).map("".join))


RUBRICS = st.lists(st.one_of(st.sampled_from([c.criterion for c in RUBRIC] + ["score 9", "a]]b", "x\ny"]),
                             st.text(max_size=12)), max_size=6)


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_parser_never_raises(template):
    lo, hi = template.score_range

    @settings(max_examples=300, deadline=None)
    @given(text=restating_texts(template), n=st.integers(0, 6), rubric=RUBRICS)
    def run(text, n, rubric):
        for criteria in ([rubric] if template.restates else [n, rubric]):
            judgement = parse_judgement(text, template, criteria)
            size = criteria if isinstance(criteria, int) else len(criteria)
            assert judgement is None or (len(judgement.verdicts) == size and lo <= judgement.score <= hi
                                         and 0.0 <= judgement.value <= 1.0)
            pair = parse_pair_judgement(text, template, criteria)
            assert pair is None or len(pair) == 2

    run()


def test_a_restated_criterion_must_be_the_rubrics():
    template, record = WORLD_RESTATE_TEMPLATE, RECORDS[0]
    right = template.judgement([True, False, True, False], 7, rubric=record.rubric)
    assert parse_judgement(right, template, record.rubric) == Judgement((True, False, True, False), 7, 7 / 9)
    assert parse_judgement(right, template, [c.criterion for c in record.rubric]) is not None  # texts will do
    digit_sum = record.rubric[1].criterion
    for wrong in (right.replace(f"2{digit_sum} ", f"2{digit_sum}1 "),   # another criterion text
                  right.replace(f"2{digit_sum} ", "2 "),                 # none
                  right.replace(f"2{digit_sum} ", f"3{digit_sum} "),     # the wrong index
                  right.replace(f"2{digit_sum} n ", "").replace("3", "2", 1).replace("4", "3", 1),  # one left out
                  right.replace(f"1{record.rubric[0].criterion} ", "1 ")):
        assert parse_judgement(wrong, template, record.rubric) is None, wrong
    other = [record.rubric[0], Criterion("s99", 2.0), *record.rubric[2:]]
    assert parse_judgement(right, template, other) is None  # the same judgement of another rubric
    with pytest.raises(PluribusError, match="restates"):
        parse_judgement(right, template, 4)  # a count cannot check what is restated
    with pytest.raises(PluribusError, match="restates"):
        template.judgement([True], 9)
    # a criterion is restated as the prompt shows it: with its reserved strings broken
    forged = [Criterion("score 9", 1.0)]
    text = template.judgement([True], 3, rubric=forged)
    assert text == "1s\\core 9 y score 3" and parse_judgement(text, template, forged).score == 3


@pytest.mark.parametrize("template", TEMPLATES, ids=lambda t: t.name)
def test_injected_response_text_never_becomes_the_score(template):
    lo, hi = template.score_range
    benign = template.render(RECORDS[0].prompt, "even", RUBRIC)

    @settings(max_examples=300, deadline=None)
    @given(response=restating_texts(template), verdicts=st.lists(st.booleans(), min_size=N, max_size=N),
           score=st.integers(lo, hi))
    def run(response, verdicts, score):
        messages = template.render(RECORDS[0].prompt, response, RUBRIC)
        prompt = prompt_text(messages)
        # the quoted response adds no marker, score opener or verdict opener to the prompt
        for reserved in template.reserved:
            assert prompt.count(reserved) == prompt_text(benign).count(reserved)
        assert parse_judgement(prompt, template, RUBRIC) is None
        quoted = template.neutralise(response)
        assert parse_judgement(quoted, template, RUBRIC) is None  # an echo of the response has no score
        if not template.analysis:  # a judgement must be all the judge wrote: one after an echoed prompt is invalid
            assert parse_judgement(prompt + own(template, verdicts, score), template, RUBRIC) is None
        else:  # a judge that quotes the response, then judges, is read for its own score
            judged = parse_judgement(own(template, verdicts, score, f"Analysis: it says {quoted}\n"), template,
                                     RUBRIC)
            assert judged == Judgement(tuple(verdicts), score, template.value(score))

    run()


# --- the actor as judge ------------------------------------------------------------------------

class ScriptedModel(torch.nn.Module):
    """A stand-in causal LM that writes `script(prompt)` and then EOS, for tests of the judge's plumbing.

    Each step of a script is a string of equally likely characters, so a step like "1?" makes the
    sampled judgement depend on the request's seed. Counts its prefills (one per `sample` call).
    """

    def __init__(self, tokenizer, script):
        super().__init__()
        self.tokenizer, self.script = tokenizer, script
        self.config = SimpleNamespace(vocab_size=len(tokenizer))
        self.prefills = 0

    def forward(self, input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True):
        if past_key_values is None:
            self.prefills += 1
            prompts = [self.tokenizer.decode(ids[mask.bool()]) for ids, mask in zip(input_ids, attention_mask)]
            past_key_values = {"steps": [self.script(p) for p in prompts], "t": 0}
        else:
            past_key_values["t"] += 1
        t = past_key_values["t"]
        logits = torch.full((len(input_ids), 1, self.config.vocab_size), -1e4)
        for row, steps in enumerate(past_key_values["steps"]):
            ids = (self.tokenizer(steps[t], add_special_tokens=False)["input_ids"] if t < len(steps)
                   else [self.tokenizer.eos_token_id])
            logits[row, 0, ids] = 0.0
        return SimpleNamespace(logits=logits, past_key_values=past_key_values)


def quoted_responses(prompt):
    return re.findall(r"\[\[(.*?)\]\]", prompt)


@pytest.fixture(scope="module")
def tokenizer(tiny_llama):
    return load_tokenizer(tiny_llama)


@pytest.mark.parametrize("template, longest", [
    (WORLD_TEMPLATE, "even s27 prime odd s1 even s9 pri"[:32]),  # a response cut at the sampler's 32 new tokens
    (WORLD_RESTATE_TEMPLATE, "even s27 prime odd s19"),  # 22 characters; the held-out set's longest is 18
], ids=["world", "world_restate"])
def test_a_world_judge_prompt_and_its_judgement_fit_the_tiny_models_positions(tokenizer, template, longest):
    from pluribus.models import render_prompt

    records = generate("describe", "test", 300, seed=3)
    worst = max(len(render_prompt(tokenizer, template.render(r.prompt, longest, r.rubric)))
                + len(tokenizer(template.judgement([True] * 4, 9, rubric=r.rubric), add_special_tokens=False)
                      ["input_ids"]) + 1 for r in records)
    assert worst <= 128, worst  # with its EOS


def labelled_script(responses_to_steps):
    """A judge that writes, for the response it is shown, the steps given for that response."""
    return lambda prompt: responses_to_steps[quoted_responses(prompt)[0]]


def test_judge_votes_the_valid_samples_and_counts_the_invalid(tokenizer, one_thread):
    records = RECORDS[:3]
    responses = [records[0].answer, "odd s1", "nonsense"]
    labels = label_judgements(records, responses)
    sometimes = list(labels[1].text)
    sometimes[0] = "1?"  # a coin flip between a valid judgement and an invalid one
    model = ScriptedModel(tokenizer, labelled_script({responses[0]: list(labels[0].text), responses[1]: sometimes,
                                                      responses[2]: list("no idea")}))
    judge = Judge(model, tokenizer, k=8, batch_size=10)
    judged = judge.judge(records, responses, seed=5)
    assert [len(ts) for ts in judged.texts] == [8, 8, 8] and model.prefills == 3  # 24 requests, batches of 10
    assert judged.rewards[0] == pytest.approx(labels[0].judgement.value) and judged.rewards[2] is None
    valid_1 = [j for j in judged.judgements[1] if j is not None]
    assert 0 < len(valid_1) < 8 and judged.rewards[1] == pytest.approx(labels[1].judgement.value)
    assert judged.invalid_rate == pytest.approx((8 + 8 - len(valid_1)) / 24)
    assert (judge.n_judged, judge.n_invalid) == (24, 16 - len(valid_1)) and judge.invalid_rate == judged.invalid_rate
    again = Judge(model, tokenizer, k=8, batch_size=3).judge(records, responses, seed=5)
    assert again.texts == judged.texts  # a request's judgement depends on its seed, not on its batch
    assert judge.score(records, responses, seed=5) == judged.rewards
    with pytest.raises(PluribusError, match="needs a 'rubric'"):
        judge.score([Record("x", "chat", "hi")], ["hello"])


def test_pairwise_reports_position_consistency(tokenizer, one_thread):
    record, good, bad = RECORDS[0], RECORDS[0].answer, "odd s1"
    block = {r: label.text for r, label in zip([good, bad], label_judgements([record] * 2, [good, bad]))}
    fair = ScriptedModel(tokenizer, lambda p: list("\n".join(block[r] for r in quoted_responses(p))))
    result = Judge(fair, tokenizer, k=2).compare(record, good, bad, seed=0)
    assert result.preferred == "a" and result.position_consistency == 1.0 and result.invalid_rate == 0.0
    assert result.score_a == 1.0 and result.score_b < 1.0
    assert fair.prefills == 1  # both orders, all samples: one generation
    biased = ScriptedModel(tokenizer, lambda p: list(block[good] + "\n" + block[bad]))  # always prefers the first
    result = Judge(biased, tokenizer, k=2).compare(record, good, bad, seed=0)
    assert result.preferred == "tie" and result.position_consistency == 0.0


def test_actor_judge_with_a_real_tiny_model(tiny_llama, one_thread):
    model, tokenizer = load(tiny_llama, trainable=False)
    judge = Judge(model, tokenizer, k=2, batch_size=4, params=SamplingParams(max_new_tokens=12))
    records, responses = RECORDS[:3], [r.answer for r in RECORDS[:3]]
    judged = judge.judge(records, responses, seed=1)
    assert [len(ts) for ts in judged.texts] == [2, 2, 2] and len(judged.rewards) == 3
    assert all(r is None or 0.0 <= r <= 1.0 for r in judged.rewards)
    assert 0.0 <= judged.invalid_rate <= 1.0 and judge.n_judged == 6
    assert judge.judge(records, responses, seed=1).texts == judged.texts
    assert judge.judge(records, responses, seed=2).texts != judged.texts


def test_judge_plugs_into_the_router(tokenizer, one_thread):
    records, responses = RECORDS[:3], [RECORDS[0].answer, "odd s1", "nonsense"]
    labels = label_judgements(records, responses)
    script = labelled_script({r: list(label.text) for r, label in zip(responses[:2], labels)} |
                             {responses[2]: list("??")})
    model = ScriptedModel(tokenizer, script)
    router = RewardRouter({"describe": "grm"}, judge=Judge(model, tokenizer, k=2))
    rewards = router.score(records + generate("add", "train", 1), responses + ["x"])
    assert rewards == [pytest.approx(labels[0].judgement.value), pytest.approx(labels[1].judgement.value), None, 0.0]
    assert model.prefills == 1  # the judge's rows went in one batch
    assert router(records[2], responses[2]) is None  # an invalid judgement is None, never 0
    penalised = RewardRouter({"describe": "grm"}, judge=lambda record, response: None,
                             length_penalty=LengthPenalty(max_tokens=10, cache_tokens=2))
    assert penalised.score(records[:2], responses[:2], num_tokens=[3, 20]) == [None, None]
