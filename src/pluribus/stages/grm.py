"""Joint RL of generating and judging: the actor is its own generative reward model (DeepSeek-V4 §5).

One GRPO loop (`grpo.policy_step` does the update); every batch holds two kinds of episodes, G
samples each:
- generation: a rubric-domain prompt. Reward: the actor's own judgement of its response (`Judge` on
  the very weights being trained: K sampled judgements, the mean of the valid ones in [0, 1]); None
  where none is valid, which GRPO masks out. No checker enters this reward.
- judging: the actor judges an item (task, response, rubric). Reward +1 when its judgement agrees
  with the item's label, −1 when it disagrees or is not a valid judgement.

A judgement *agrees* with its label when every criterion's verdict equals the label's and its score
is within `score_tolerance` points of the label's (1 on the world's 0-9 scale, so a score rounded the
other way at a half point is no disagreement). The verdicts must match exactly because they are what
the judge checks, the score because it is what the generation reward reads.

Labels come from
- the verifiable domains (`judge_domains`): the actor's own rollouts, labelled by the domain's
  checker against the one-criterion rubric `answer X` (`verifiable_rubric`): met when the checker
  gives 1, score the checker's reward on the template's scale. Fresh rollouts every step, one passing
  and one failing per prompt where the actor's samples have both, so "always no" is not a good judge.
- the annotated set: at most `max_rubric_labels` (200) labelled judgements of rubric-domain items,
  `label_judgements` (the hidden checker) on a fixed set of train prompts with two responses each
  (`candidate_responses`). `annotate` counts them and refuses more than the cap.
- labels spent during RL (`online_labels`, part of the same budget, off by default): every `online_every` steps
  the policy's current responses to `online_per_round` new rubric prompts are labelled (`online_round`), and up
  to half of each step's labelled judging items are drawn from them. The annotated set shows the judge the
  starting policy's responses only; a policy that moves to responses its judge misrates (a bare number rated
  high, docs/grm.md) is otherwise never judged against a label.

Users' data (`cfg.data`, see `users_stage_data`): the rubric domains' JSONL records are the prompts, and
the judgements people wrote of example responses (`meta.labels`) are the annotated set; the verifiable
domains' records are checked by their `data.rewards` (math, code, IFEval), against a rubric naming the
final answer, the tests or the instructions. There is no hidden checker, so the policy is not scored.

Where this departs from the paper, and why:
- A judge warm-up. A model that has never written a judgement samples no valid one; every judging
  episode gets −1 and RL has nothing to follow. So the stage first fine-tunes on the labels it will
  reward: the annotated set (pointwise, and each prompt's two responses as a pair in both orders)
  and verifiable rollouts of the starting policy. This is DeepSeek-GRM's rejective fine-tuning with
  labels in place of rejection sampling, and it uses no rubric label beyond the cap. A share of each
  batch (`warmup_replay`) replays the starting policy's own sampled answers, which teaches nothing
  new but keeps a small model from forgetting how to answer while it learns to judge. The warmed-up
  model is saved to `<out>.warmup`.
- Pairwise judging is taught by the warm-up only; RL's judging episodes are pointwise. Position
  consistency is measured throughout, so drift would show.
- The KL anchor (`kl_coef` > 0) is a frozen copy of the policy as RL starts, with LoRA too: the
  model without its adapter never learnt to judge.

Under torchrun (`pluribus.dist`, DDP or FSDP2) each process rolls out, judges and trains on its slice of every
step's generation prompts and of its judged items (`share_of`: whole groups of each kind); the update is the
global one (`grpo.policy_step` told each row's global index, so the minibatches are one process's), and the
step's metrics are reduced over ranks. Whatever every rank needs whole (the annotated and held-out sets, the
warm-up's data, each step's fresh verifiable items, the held-out judgements behind the judge metrics) is
`dist.spread`: each rank samples its part, seeded by global index, and the parts are gathered, so N
processes label, warm up and measure as one does. FSDP2 gathers the whole weights while the HF sampler runs.

Metrics, on held-out items: `eval_n` test prompts of each rubric domain, two responses each (the
starting policy's sample and one of the answer, the domain's mistakes, a second sample, a sample with
a word repeated), judged greedily and compared with the hidden checker's labels; and the policy's own
greedy and sampled responses on those prompts:
- judge_acc: share of items whose judgement agrees (the judging reward's definition);
  judge_acc_verdicts (every verdict right), judge_acc_score (score within tolerance),
  judge_acc_c<i> (criterion i's verdict right); an invalid judgement is wrong in each.
- judge_invalid: share of invalid judgements.
- judge_position_consistency: of the `eval_pairs` pairs judged in both orders, the share whose two
  judgements are valid and prefer the same response (or tie in both); judge_pair_invalid: share of
  invalid pair judgements.
- judge_acc_own: judge_acc on the policy's own greedy responses of that evaluation;
  judge_acc_verifiable: judge_acc on checkable test prompts, two of the starting policy's rollouts each.
- judge_policy_score / judge_policy_score_sampled: the policy's mean hidden-checker rubric score,
  greedy / one sample at temperature 1; judge_policy_pass: greedy share with score 1;
  policy_examples: four of those samples, to read what the reward does to them.
They go into `<out>.metrics.jsonl` at step 0, every `eval_every` steps and after the last; the
warm-up's `<out>.warmup.metrics.jsonl` has them before and after it. Every RL step also logs
gen_reward (the actor's judgement of its rollouts), gen_invalid_frac, gen_hidden_score (world domains:
the hidden checker on the same rollouts, watched, never a reward) and judging_reward (annotated, verifiable).
"""

from __future__ import annotations

import random
import string
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import torch

from pluribus import dist
from pluribus.config import GRMConfig
from pluribus.data import Criterion, Record
from pluribus.errors import PluribusError
from pluribus.models import add_lora, load, render_example, render_prompt
from pluribus.rewards.grm import (GRM_TEMPLATE, WORLD_RESTATE_TEMPLATE, WORLD_TEMPLATE, Judge, Judged, Judgement,
                                  JudgeTemplate, Label, label_judgements, parse_judgement, task_text, write_label)
from pluribus.rewards.math import extract_answer
from pluribus.rollout import SamplingParams
from pluribus.rollout.engine import open_engine
from pluribus.stages.common import (MetricsLog, global_lm_loss, load_records, make_optimizer, optimizer_step,
                                    progress, seed_everything)
from pluribus.stages.evaluate import generate_texts
from pluribus.stages.grpo import policy_step, reference_policy
from pluribus.world import check, domain as world_domain, generate, instance_of, rubric_score

TEMPLATES = {"world": WORLD_TEMPLATE, "world_restate": WORLD_RESTATE_TEMPLATE, "grm": GRM_TEMPLATE}


@dataclass(frozen=True)
class JudgeItem:
    """A response to judge and the judgement it should get."""

    record: Record
    """The task, with the rubric the judge is shown."""
    response: str
    label: Label
    """The right judgement: its text in the template's form (the warm-up's target) and what it says."""


def agrees(judgement: Judgement | None, label: Judgement, tolerance: int) -> bool:
    """Every verdict equal to the label's and the score within `tolerance` points; an invalid judgement never agrees."""
    return (judgement is not None and judgement.verdicts == label.verdicts
            and abs(judgement.score - label.score) <= tolerance)


def judging_rewards(texts: Sequence[str], items: Sequence[JudgeItem], template: JudgeTemplate,
                    tolerance: int) -> list[float]:
    """+1 where the judge's own text is a judgement that agrees with its item's label, else −1 (invalid included)."""
    return [1.0 if agrees(parse_judgement(text, template, item.record.rubric), item.label.judgement, tolerance)
            else -1.0 for text, item in zip(texts, items, strict=True)]


def verifiable_rubric(record: Record) -> list[Criterion]:
    """A checkable record's rubric: one criterion, `answer X`, met when the checker gives the response 1."""
    if record.answer is None:
        raise PluribusError(f"record '{record.id}': a verifiable judging item needs an 'answer'")
    return [Criterion(f"answer {record.answer}", 1.0, "essential")]


def users_verifiable_rubric(record: Record) -> list[Criterion]:
    """`verifiable_rubric` for users' records: the tests of a code record, the instructions of an IFEval one,
    else the final answer of the record's answer (GSM8K's worked solution ends in `#### 42`)."""
    if record.tests:
        return [Criterion("the program passes these tests:\n" + "\n".join(record.tests), 1.0, "essential")]
    if "instruction_id_list" in record.meta:
        return [Criterion("the response follows every instruction of the task", 1.0, "essential")]
    if record.answer is None:
        raise PluribusError(f"record '{record.id}': a verifiable judging item needs an 'answer', 'tests' or "
                            "IFEval instructions")
    return [Criterion(f"answer {extract_answer(record.answer) or record.answer}", 1.0, "essential")]


@dataclass(frozen=True)
class Verifier:
    """How checkable records become labelled judging items: their checker and the rubric the judge is shown."""

    check: Callable[[Record, str], float]
    rubric: Callable[[Record], list[Criterion]]


WORLD_VERIFIER = Verifier(check, verifiable_rubric)


def checker_items(records: Sequence[Record], responses: Sequence[str], template: JudgeTemplate,
                  verifier: Verifier = WORLD_VERIFIER, rewards: Sequence[float] | None = None) -> list[JudgeItem]:
    """Judging items of checkable records, labelled by their domain's checker against its one-criterion rubric
    (`rewards`: the checker's, where already known)."""
    items = []
    for i, (record, response) in enumerate(zip(records, responses, strict=True)):
        reward = verifier.check(record, response) if rewards is None else rewards[i]
        rubric = verifier.rubric(record)
        items.append(JudgeItem(replace(record, rubric=rubric), response,
                               write_label([reward >= 1.0], reward, template, rubric)))
    return items


def annotate(records: Sequence[Record], responses: Sequence[str], cap: int, template: JudgeTemplate) -> list[JudgeItem]:
    """The annotated set: the hidden checker's judgements of rubric-domain responses, at most `cap` of them."""
    if len(records) > cap:
        raise PluribusError(f"annotated set: {len(records)} labelled rubric judgements exceed the cap of {cap}")
    return _hidden_checker_items(records, responses, template)


def _hidden_checker_items(records: Sequence[Record], responses: Sequence[str],
                          template: JudgeTemplate) -> list[JudgeItem]:
    labels = label_judgements(records, responses, template)
    return [JudgeItem(r, s, label) for r, s, label in zip(records, responses, labels)]


def candidate_responses(model, tokenizer, records: Sequence[Record], max_new_tokens: int, seed: int,
                        edits: float = 0.0) -> list[str]:
    """Two responses per rubric record, in order: the policy's own sample, then one of the answer, the
    domain's systematic wrong answer, one of its mistakes, a second sample, or the first with a word repeated.

    edits: the share of second responses that are instead the first with one digit changed (`changed_digit`),
    so a near miss in a number (a wrong digit sum) is not a rarity among the labels; 0 for the held-out items."""
    if not records:
        return []
    rng = random.Random(f"candidates:{seed}")
    samples = spread_texts(model, tokenizer, records, SamplingParams(max_new_tokens, temperature=1.0), seed, samples=2)
    out = []
    for record, (own, second) in zip(records, samples):
        dom, inst = world_domain(record.domain), instance_of(record)
        words = own.split() or [record.answer or ""]
        repeated = " ".join(words + [rng.choice(words)])
        other = rng.choice([record.answer or "", dom.wrong(inst), dom.mistake(rng, inst), second, repeated])
        if edits and rng.random() < edits:
            other = changed_digit(rng, own if any(c.isdigit() for c in own) else record.answer or "")
        out += [own, other]
    return out


def word_rubric_item(rng: random.Random, item: JudgeItem, template: JudgeTemplate) -> JudgeItem:
    """A checker-labelled item of a verifiable domain re-asked against a rubric of the rubric domain's shape:
    (essential) its `answer X` criterion, the checker's verdict; (important, optional) a word, met when it is one
    of the response's words, half the time a near miss (one character changed) of one of them; (pitfall) `extra
    words`, met when the response repeats a word or has more words than the answer. Every verdict is a rule's
    on the actor's own rollout, so these are unlimited, and they train what the rubric judge does (compare a
    criterion's word with the response's words, weigh the verdicts into a score) without a rubric label."""
    record, words = item.record, item.response.split()
    answer_words = (record.answer or "").split()
    pool = words or answer_words or ["x"]

    def word() -> str:
        w = rng.choice(pool)
        return near_miss(rng, w) if rng.random() < 0.5 else w

    rubric = [replace(record.rubric[0], weight=3.0), Criterion(word(), 2.0, "important"),
              Criterion(word(), 1.0, "optional"), Criterion("extra words", -2.0, "pitfall")]
    extra = len(words) != len(set(words)) or len(words) > max(1, len(answer_words))
    verdicts = [item.label.judgement.verdicts[0], rubric[1].criterion in words, rubric[2].criterion in words, extra]
    return JudgeItem(replace(record, rubric=rubric), item.response,
                     write_label(verdicts, rubric_score(rubric, verdicts), template, rubric))


def near_miss(rng: random.Random, word: str) -> str:
    """`word` with one character changed: a digit (where it has one) to another digit, else a letter to another."""
    if any(c.isdigit() for c in word):
        return changed_digit(rng, word)
    at = [i for i, c in enumerate(word) if c.isalpha()]
    if not at:
        return word + "x"
    i = rng.choice(at)
    letters = string.ascii_uppercase if word[i].isupper() else string.ascii_lowercase
    return word[:i] + rng.choice([c for c in letters if c != word[i]]) + word[i + 1:]


def changed_digit(rng: random.Random, text: str) -> str:
    """`text` with one of its digits (chosen at random) replaced by another; `text` itself where it has none."""
    at = [i for i, c in enumerate(text) if c.isdigit()]
    if not at:
        return text
    i = rng.choice(at)
    return text[:i] + rng.choice([d for d in "0123456789" if d != text[i]]) + text[i + 1:]


def rubric_records(domains: Sequence[str], split: str, n: int, seed: int) -> list[Record]:
    """`n` records taken in turn from each rubric domain."""
    per_domain = [generate(d, split, -(-n // len(domains)), seed=seed) for d in domains]
    return [r for group in zip(*per_domain) for r in group][:n]


def as_pairs(items: Sequence[JudgeItem]) -> list[tuple[JudgeItem, JudgeItem]]:
    """Consecutive items of the same record (as `candidate_responses` makes them) side by side."""
    return [(a, b) for a, b in zip(items[::2], items[1::2]) if a.record.id == b.record.id]


def verifiable_pairs(model, tokenizer, records: Sequence[Record], template: JudgeTemplate, params: SamplingParams,
                     seed: int, samples: int = 4,
                     verifier: Verifier = WORLD_VERIFIER) -> list[tuple[JudgeItem, JudgeItem]]:
    """Two of the actor's own rollouts per checkable record, labelled by the checker: one passing and one
    failing, in random order, where its `samples` rollouts have both; else two of them. Under torchrun each
    rank samples and checks its part of the records (`pluribus.dist.spread`), and every rank gets every pair."""
    if not records:
        return []

    def checked(part: list[Record], start: int) -> list[tuple[list[str], list[float]]]:
        texts = generate_texts(model, tokenizer, part, params, seed, 256, samples=samples, start=start)
        return [(rollouts, [verifier.check(r, t) for t in rollouts]) for r, rollouts in zip(part, texts)]

    rng = random.Random(f"verifiable:{seed}")
    pairs = []
    for record, (rollouts, rewards) in zip(records, dist.spread(records, checked)):
        passed = [i for i, reward in enumerate(rewards) if reward >= 1.0]
        failed = [i for i, reward in enumerate(rewards) if reward < 1.0]
        two = [rng.choice(passed), rng.choice(failed)] if passed and failed else rng.sample(range(len(rollouts)), 2)
        rng.shuffle(two)
        first, second = checker_items([record, record], [rollouts[i] for i in two], template, verifier,
                                      [rewards[i] for i in two])
        pairs.append((first, second))
    return pairs


def spread_texts(model, tokenizer, records: Sequence[Record], params: SamplingParams, seed: int,
                 samples: int = 1) -> list[list[str]]:
    """`generate_texts` of every record, each rank sampling its part (seeded as one process would)."""
    return dist.spread(records, lambda part, start: generate_texts(model, tokenizer, part, params, seed, 256,
                                                                  samples=samples, start=start))


# --- the judge warm-up --------------------------------------------------------------------------

def judge_examples(tokenizer, template: JudgeTemplate, items: Sequence[JudgeItem],
                   pairs: Sequence[tuple[JudgeItem, JudgeItem]]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) of each item's judgement and of each pair's, in both orders."""
    examples = [render_example(tokenizer, template.render(task_text(i.record), i.response, i.record.rubric),
                               i.label.text) for i in items]
    for a, b in pairs:
        for x, y in ((a, b), (b, a)):
            conversation = template.render_pair(task_text(x.record), x.response, y.response, x.record.rubric)
            target = x.label.text + template.pair_separator + y.label.text
            examples.append(render_example(tokenizer, conversation, target))
    return examples


def warm_up(model, tokenizer, annotated: list[tuple[list[int], int]], verifiable: list[tuple[list[int], int]],
            replay: list[tuple[list[int], int]], cfg: GRMConfig, metrics: MetricsLog, trainer=None) -> None:
    """SFT on labelled judgements, each batch `warmup_replay` replayed responses, then `annotated_share` of the
    rest from the annotated set and the remainder from verifiable rollouts.

    trainer: what the loss runs through (the model's `pluribus.dist.wrap` under torchrun, each rank training
    on its slice of every batch, as `pluribus.stages.sft` does); None: the model."""
    if not annotated and not verifiable:
        raise PluribusError("grm warm-up: no labelled judgement to learn from "
                            "(rubric_labels and warmup_verifiable are 0)")
    rng = random.Random(f"warmup:{cfg.seed}")
    optimizer, scheduler = make_optimizer(model, cfg.warmup_optim, cfg.warmup_steps)
    n_replay = round(cfg.warmup_batch_size * cfg.warmup_replay) if replay else 0
    judging = cfg.warmup_batch_size - n_replay
    n_annotated = judging if not verifiable else round(judging * cfg.annotated_share) if annotated else 0
    world, trainer = dist.world(), trainer if trainer is not None else model
    trainer.train()
    bar, task = progress("grm warm-up", cfg.warmup_steps)
    with bar:
        for step in range(cfg.warmup_steps):
            batch = (rng.choices(replay, k=n_replay) + rng.choices(annotated, k=n_annotated)
                     + rng.choices(verifiable, k=judging - n_annotated))
            mine = world.shard(batch, "grm warmup_batch_size")
            loss, _ = global_lm_loss(trainer, world, [ids for ids, _ in mine], [n for _, n in mine],
                                     tokenizer.pad_token_id)
            loss.backward()
            norm, _ = optimizer_step(model, optimizer, scheduler, cfg.warmup_optim.grad_clip)
            value = float(dist.all_sum(loss.detach()))
            if step % 10 == 0:
                metrics.write(step=step, loss=value, grad_norm=norm, lr=scheduler.get_last_lr()[0])
            bar.update(task, advance=1, info=f"loss {value:.3f}")


def replay_examples(model, tokenizer, records: Sequence[Record], max_new_tokens: int,
                    seed: int) -> list[tuple[list[int], int]]:
    """The policy's own sampled response to each record, as SFT examples: it keeps what it was, learns nothing new."""
    texts = spread_texts(model, tokenizer, records, SamplingParams(max_new_tokens, temperature=1.0), seed)
    return [render_example(tokenizer, r.messages(), t[0]) for r, t in zip(records, texts)]


# --- measuring the judge and the policy ---------------------------------------------------------

def judge_metrics(judge: Judge, items: Sequence[JudgeItem], pairs: Sequence[tuple[JudgeItem, JudgeItem]],
                  tolerance: int, seed: int) -> dict[str, float]:
    """judge_acc, judge_acc_verdicts, judge_acc_score, judge_acc_c<i>, judge_invalid and, with pairs,
    judge_position_consistency and judge_pair_invalid (see the module docstring). Under torchrun each rank
    judges its part of the items and pairs, and every rank reads every judgement."""
    found = dist.spread(items, lambda part, start: [js[0] for js in judge.judge(
        [i.record for i in part], [i.response for i in part], k=1, seed=seed, start=start).judgements])
    labels = [i.label.judgement for i in items]
    out = {"judge_acc": _share(agrees(j, y, tolerance) for j, y in zip(found, labels)),
           "judge_acc_verdicts": _share(j is not None and j.verdicts == y.verdicts for j, y in zip(found, labels)),
           "judge_acc_score": _share(j is not None and abs(j.score - y.score) <= tolerance
                                     for j, y in zip(found, labels)),
           "judge_invalid": _share(j is None for j in found)}
    for c in range(max(len(y.verdicts) for y in labels)):
        rows = [(j, y) for j, y in zip(found, labels) if c < len(y.verdicts)]
        out[f"judge_acc_c{c + 1}"] = _share(j is not None and j.verdicts[c] == y.verdicts[c] for j, y in rows)
    if pairs:
        comparisons = dist.spread(pairs, lambda part, start: judge.compare_many(
            [a.record for a, _ in part], [a.response for a, _ in part], [b.response for _, b in part], k=1, seed=seed,
            start=start))
        out["judge_position_consistency"] = _share(c.position_consistency == 1.0 for c in comparisons)
        out["judge_pair_invalid"] = _share(c.invalid_rate for c in comparisons)
    return out


def policy_metrics(model, tokenizer, judge: Judge, records: Sequence[Record], max_new_tokens: int, tolerance: int,
                   seed: int) -> dict[str, float | list[str]]:
    """judge_policy_score (greedy), judge_policy_pass, judge_policy_score_sampled, judge_acc_own, and four
    sampled responses as policy_examples (to see what the reward is doing to them)."""
    greedy = [t[0] for t in spread_texts(model, tokenizer, records, SamplingParams(max_new_tokens, 0.0), seed)]
    sampled = [t[0] for t in spread_texts(model, tokenizer, records, SamplingParams(max_new_tokens, 1.0), seed)]
    scores = [check(r, t) for r, t in zip(records, greedy)]
    own = judge_metrics(judge, _hidden_checker_items(records, greedy, judge.template), [], tolerance, seed)
    return {"judge_policy_score": _share(scores), "judge_policy_pass": _share(s >= 1.0 for s in scores),
            "judge_policy_score_sampled": _share(check(r, t) for r, t in zip(records, sampled)),
            "judge_acc_own": own["judge_acc"],
            "policy_examples": [f"{r.prompt} -> {t}" for r, t in zip(records[:4], sampled[:4])]}


@dataclass(frozen=True)
class HeldOut:
    """What the judge and the policy are measured on: test prompts only, labelled by the checkers."""

    items: list[JudgeItem]
    """Rubric-domain test prompts, two responses each (`candidate_responses`), hidden-checker labels."""
    verifiable: list[JudgeItem]
    """Checkable test prompts, two of the starting policy's rollouts each, checker labels."""
    records: list[Record]
    """The rubric-domain test prompts, for the policy's own responses."""


def evaluate(model, tokenizer, template: JudgeTemplate, held_out: HeldOut, cfg: GRMConfig) -> dict:
    """Every judge_* metric, the judge greedy (one judgement per item); judge_acc_verifiable on checkable items.
    Under torchrun every rank samples its part of each set (whole weights under FSDP2) and computes every metric."""
    with dist.gathered(model):
        return _evaluate(model, tokenizer, template, held_out, cfg)


def _evaluate(model, tokenizer, template: JudgeTemplate, held_out: HeldOut, cfg: GRMConfig) -> dict:
    judge = Judge(model, tokenizer, template, k=1, params=SamplingParams(template.max_new_tokens, temperature=0.0))
    pairs = as_pairs(held_out.items)[:cfg.eval_pairs]
    out = judge_metrics(judge, held_out.items, pairs, cfg.score_tolerance, cfg.seed) if held_out.items else {}
    if held_out.verifiable:
        out["judge_acc_verifiable"] = judge_metrics(judge, held_out.verifiable, [], cfg.score_tolerance,
                                                    cfg.seed)["judge_acc"]
    if not held_out.records:  # users' rubric domains have no hidden checker to score the policy with
        return out
    return out | policy_metrics(model, tokenizer, judge, held_out.records, cfg.sampling.max_new_tokens,
                                cfg.score_tolerance, cfg.seed)


def _share(values) -> float:
    values = [float(v) for v in values]
    return sum(values) / len(values) if values else 0.0


# --- the stage ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Episodes:
    """One step's prompts: generation episodes, then judging episodes; G samples of each, consecutive."""

    generation: list[Record]
    """Rubric-domain prompts, rewarded by the actor's own judgement."""
    judging: list[JudgeItem]
    """Items the actor judges, rewarded by agreement with their labels (annotated ones first)."""

    def conversations(self, template: JudgeTemplate) -> list[list[dict[str, str]]]:
        return ([r.messages() for r in self.generation]
                + [template.render(task_text(i.record), i.response, i.record.rubric) for i in self.judging])

    def kinds(self, group_size: int) -> list[str]:
        """Per rollout row: "generation" or "judging"."""
        return ["generation"] * (len(self.generation) * group_size) + ["judging"] * (len(self.judging) * group_size)


def draw_episodes(rng: random.Random, gen_records: Sequence[Record], n_gen: int, annotated: Sequence[JudgeItem],
                  n_annotated: int, fresh: Sequence[JudgeItem], online: Sequence[JudgeItem] = ()) -> Episodes:
    """`n_gen` rubric prompts; `n_annotated` labelled items, then the fresh verifiable items. Once labels were spent
    during RL (`online`), up to half of the labelled items are drawn from those, the rest from the annotated set:
    a few labels of what the policy writes now would otherwise be drawn about once in a run."""
    generation = rng.sample(list(gen_records), min(n_gen, len(gen_records)))
    n_online = min(len(online), n_annotated // 2)
    labelled = rng.sample(list(annotated), min(n_annotated - n_online, len(annotated))) + rng.sample(list(online),
                                                                                                      n_online)
    return Episodes(generation, labelled + list(fresh))


def episode_rewards(episodes: Episodes, texts: Sequence[str], group_size: int, judge: Judge,
                    tolerance: int, start: int = 0) -> tuple[list[float | None], Judged, list[float]]:
    """(the reward of every row, the judge's verdicts on the generation rows, the judging rows' rewards).

    A generation row's reward is the actor's judgement of it (None where no judgement was valid); a
    judging row's is +1 or −1 (`judging_rewards`). Only the judge's own text is ever parsed.
    start: the global index of the first generation row (a rank's share: `Share.first_gen_row`).
    """
    n_gen = len(episodes.generation) * group_size
    judged = judge.judge([r for r in episodes.generation for _ in range(group_size)], texts[:n_gen], start=start)
    judging = judging_rewards(texts[n_gen:], [i for i in episodes.judging for _ in range(group_size)], judge.template,
                              tolerance)
    return judged.rewards + judging, judged, judging


@dataclass(frozen=True)
class StageData:
    gen_records: list[Record]
    """Rubric-domain train prompts for generation episodes."""
    checkable: list[Record]
    """Train prompts of the verifiable domains, whose fresh rollouts become judging items."""
    annotated: list[JudgeItem]
    """The annotated set: at most the cap of hidden-checker labels (of people's labels, for users' data)."""
    held_out: HeldOut
    verifier: Verifier = WORLD_VERIFIER
    """How the verifiable domains' rollouts are labelled."""
    online_prompts: list[Record] = field(default_factory=list)
    """Rubric-domain train prompts whose responses are labelled during RL (`online_labels`), in the order spent."""


def stage_data(model, tokenizer, template: JudgeTemplate, cfg: GRMConfig) -> StageData:
    """Prompts, the annotated set (responses of the starting policy, labelled, capped) and the held-out items."""
    max_new = cfg.sampling.max_new_tokens
    upfront = cfg.rubric_labels - cfg.online_labels
    labelled = rubric_records(cfg.domains, "train", -(-upfront // 2), cfg.seed + 2)
    responses = candidate_responses(model, tokenizer, labelled, max_new, cfg.seed + 2, cfg.label_edits)
    annotated = annotate([r for r in labelled for _ in range(2)][:upfront], responses[:upfront],
                         cfg.max_rubric_labels - cfg.online_labels, template)
    test = rubric_records(cfg.domains, "test", cfg.eval_n, cfg.seed)
    per_domain = -(-cfg.eval_n // len(cfg.judge_domains)) if cfg.judge_domains else 0
    checkable_test = [r for d in cfg.judge_domains for r in generate(d, "test", per_domain, seed=cfg.seed)]
    held_out = HeldOut(
        _hidden_checker_items([r for r in test for _ in range(2)],
                              candidate_responses(model, tokenizer, test, max_new, cfg.seed + 3), template),
        [i for pair in verifiable_pairs(model, tokenizer, checkable_test, template, _rollout_params(cfg), cfg.seed + 3)
         for i in pair],
        test)
    return StageData(rubric_records(cfg.domains, "train", cfg.n_train, cfg.seed + 1),
                     [r for d in cfg.judge_domains for r in generate(d, "train", cfg.n_train, seed=cfg.seed + 1)],
                     annotated, held_out, online_prompts=rubric_records(cfg.domains, "train", cfg.online_labels,
                                                                        cfg.seed + 6) if cfg.online_labels else [])


def users_stage_data(model, tokenizer, template: JudgeTemplate, cfg: GRMConfig) -> StageData:
    """The same from users' records (`cfg.data`): the rubric domains' records are the generation prompts and
    their labelled judgements (`meta["labels"]`, see `labelled_items`) the annotated set; the verifiable
    domains' records, checked by `cfg.data.rewards`, give fresh judging items. With no test split and no
    hidden checker, the judge is measured on the annotated set itself and on two rollouts of each of up to
    `eval_n` verifiable records; the policy is not scored."""
    from pluribus.rewards.router import RewardRouter

    records = load_records(cfg.data)
    by_domain = {d: [r for r in records if r.domain == d] for d in [*cfg.domains, *cfg.judge_domains]}
    empty = [d for d, rs in by_domain.items() if not rs]
    if empty:
        raise PluribusError(f"grm: no records of domain(s) {empty} in {cfg.data.jsonl}")
    router = RewardRouter(cfg.data.rewards)
    unrouted = [d for d in cfg.judge_domains if router.kinds.get(d) in (None, "grm")]
    if unrouted:
        raise PluribusError(f"grm: verifiable domain(s) {unrouted} need a checking reward in data.rewards "
                            "(math, code, ifeval or world:NAME)")
    gen_records = [r for d in cfg.domains for r in by_domain[d]]
    checkable = [r for d in cfg.judge_domains for r in by_domain[d]]
    annotated = labelled_items(gen_records, template, cfg.max_rubric_labels)[:cfg.rubric_labels]
    verifier = Verifier(router, users_verifiable_rubric)
    pairs = verifiable_pairs(model, tokenizer, checkable[:cfg.eval_n], template, _rollout_params(cfg), cfg.seed + 3,
                             verifier=verifier)
    return StageData(gen_records, checkable, annotated, HeldOut(annotated, [i for p in pairs for i in p], []),
                     verifier)


def labelled_items(records: Sequence[Record], template: JudgeTemplate, cap: int) -> list[JudgeItem]:
    """Judgements people wrote, from each rubric record's `meta["labels"]`: `[{response, verdicts}]`, one
    verdict (true: met) per rubric criterion; the score is the rubric's weighted one. At most `cap`."""
    items = []
    for record in records:
        for j, label in enumerate(record.meta.get("labels") or []):
            rubric = record.rubric or []
            verdicts = label.get("verdicts") if isinstance(label, dict) else None
            if not (rubric and isinstance(label.get("response"), str) and isinstance(verdicts, list)
                    and len(verdicts) == len(rubric) and all(isinstance(v, bool) for v in verdicts)):
                raise PluribusError(f"record '{record.id}': meta.labels[{j}] needs a 'response' and 'verdicts', one "
                                    f"true/false per rubric criterion ({len(rubric)})")
            items.append(JudgeItem(record, label["response"],
                                   write_label(verdicts, rubric_score(rubric, verdicts), template, rubric)))
    if len(items) > cap:
        raise PluribusError(f"annotated set: {len(items)} labelled rubric judgements exceed the cap of {cap}")
    return items


def online_round(model, tokenizer, template: JudgeTemplate, data: StageData, cfg: GRMConfig, spent: int,
                 seed: int) -> list[JudgeItem]:
    """The next `online_per_round` labels of the `online_labels` budget (fewer at its end): the policy's current
    sampled response to each of the next rubric prompts, labelled by the hidden checker (the annotator)."""
    records = data.online_prompts[spent:spent + cfg.online_per_round]  # online_labels prompts in all
    if not records:
        return []
    with dist.gathered(model):
        texts = spread_texts(model, tokenizer, records, _rollout_params(cfg), seed)
    return _hidden_checker_items(records, [t[0] for t in texts], template)


def _rollout_params(cfg: GRMConfig, max_new_tokens: int | None = None) -> SamplingParams:
    return SamplingParams(max_new_tokens or cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p,
                          cfg.sampling.top_k)


@dataclass(frozen=True)
class Share:
    """A rank's part of one step's episodes (all of them with one process): whole groups of each kind."""

    episodes: Episodes
    """Its slice of the generation prompts and its slice of the judged items."""
    n_annotated: int
    """How many of its judged items (the first) come from the annotated set."""
    rows_N: torch.Tensor
    """Each of its rollout rows' index in the global batch: every generation row, then every judging row, as one
    process orders them (the minibatches are the one-process minibatches)."""

    @property
    def first_gen_row(self) -> int:
        """The global index of its first generation row (its judge's request seeds follow one process's)."""
        return int(self.rows_N[0]) if len(self.episodes.generation) else 0


def share_of(episodes: Episodes, n_annotated: int, group_size: int, world: dist.World) -> Share:
    """`world`'s rank's contiguous slice of the generation prompts and of the judged items (each must split evenly)."""
    gen = world.shard(episodes.generation, "grm generation prompts this step")
    judging = world.shard(episodes.judging, "grm judged items this step")
    first_gen, first_judged = world.rank * len(gen), world.rank * len(judging)
    n_gen_rows = len(episodes.generation) * group_size
    rows = ([*range(first_gen * group_size, (first_gen + len(gen)) * group_size)]
            + [*range(n_gen_rows + first_judged * group_size, n_gen_rows + (first_judged + len(judging)) * group_size)])
    return Share(Episodes(gen, judging), max(0, min(n_annotated - first_judged, len(judging))),
                 torch.tensor(rows, device="cpu"))


def joint_update(trainer, cfg: GRMConfig, share: Share, rollout, judge: Judge, reference, optimizer, scheduler,
                 pad_id: int) -> dict:
    """One step's rewards and update from this rank's share of the episodes and its rollout rows: its judge's
    verdicts on its generation rows, its judged items' labels, then `grpo.policy_step`, the global update.
    Returns the step's metrics over the global batch (reduced over ranks): gen_reward, gen_invalid_frac,
    judging_reward(_annotated, _verifiable), gen_hidden_score (the world's domains) and the update's stats."""
    G = cfg.group_size
    with dist.gathered(trainer):  # fsdp2: whole weights while the judge samples
        raw, judged, judging = episode_rewards(share.episodes, rollout.texts, G, judge, cfg.score_tolerance,
                                               share.first_gen_row)
    _, _, stats = policy_step(trainer, cfg, rollout, raw, reference, optimizer, scheduler, pad_id, share.rows_N)
    n_gen, n_ann = len(share.episodes.generation) * G, share.n_annotated * G
    means = {"gen_reward": _mean_count(r for r in judged.rewards if r is not None),
             "gen_invalid_frac": (judged.invalid_rate, sum(len(js) for js in judged.judgements)),
             "judging_reward": _mean_count(judging), "judging_reward_annotated": _mean_count(judging[:n_ann]),
             "judging_reward_verifiable": _mean_count(judging[n_ann:])}
    if cfg.data is None:  # the world's rubric domains have a hidden checker to watch (never a reward)
        gen_rows = [r for r in share.episodes.generation for _ in range(G)]
        means["gen_hidden_score"] = _mean_count(check(r, t) for r, t in zip(gen_rows, rollout.texts[:n_gen]))
    return dist.weighted_means(means) | stats


def _mean_count(values) -> tuple[float, float]:
    """(`_share` of the values, how many): one rank's part of a mean over ranks."""
    values = [float(v) for v in values]
    return _share(values), float(len(values))


def run_warm_up(model, tokenizer, template: JudgeTemplate, data: StageData, cfg: GRMConfig, out: Path,
                trainer=None) -> dict:
    """The judge warm-up, measured before and after (and saved to `<out>.warmup`); returns the metrics after it.
    trainer: what its loss runs through (see `warm_up`)."""
    metrics = MetricsLog(out.with_name(out.name + ".warmup.metrics.jsonl"))
    metrics.write(step=0, **evaluate(model, tokenizer, template, data.held_out, cfg))
    rng = random.Random(f"warmup-data:{cfg.seed}")
    prompts = rng.sample(data.checkable, min(cfg.warmup_verifiable, len(data.checkable)))
    with dist.gathered(model):
        own = verifiable_pairs(model, tokenizer, prompts, template, _rollout_params(cfg), cfg.seed + 4,
                               verifier=data.verifier)
        replay = replay_examples(model, tokenizer, data.gen_records + data.checkable[::4],
                                 cfg.sampling.max_new_tokens, cfg.seed + 5)
    checked = [i for pair in own for i in pair]
    if cfg.word_rubrics and data.verifier is WORLD_VERIFIER:
        rng_words = random.Random(f"word-rubrics:{cfg.seed}")
        checked += [word_rubric_item(rng_words, i, template) for i in checked]
    warm_up(model, tokenizer, judge_examples(tokenizer, template, data.annotated, as_pairs(data.annotated)),
            judge_examples(tokenizer, template, checked, own), replay, cfg, metrics, trainer)
    after = evaluate(model, tokenizer, template, data.held_out, cfg)
    metrics.write(step=cfg.warmup_steps, **after)
    metrics.close()
    dist.save(model, tokenizer, out.with_name(out.name + ".warmup"), {"stage": "grm-warmup",
                                                                     "config": cfg.model_dump()})
    return after


def run(cfg: GRMConfig, meta: dict | None = None) -> Path:
    world = dist.init(cfg.device)
    world.per_rank(cfg.gen_prompts, "grm gen_prompts")
    world.per_rank(cfg.judge_items, "grm judge_items")
    if cfg.warmup_steps:
        world.per_rank(cfg.warmup_batch_size, "grm warmup_batch_size")
    seed_everything(cfg.seed)
    template = TEMPLATES[cfg.template]
    if cfg.judge_max_new_tokens:
        template = replace(template, max_new_tokens=cfg.judge_max_new_tokens)
    model, tokenizer = load(cfg.model, device=world.device)
    if cfg.lora is not None and not hasattr(model, "disable_adapter"):  # a saved adapter keeps training
        model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    out = Path(cfg.out)
    data = stage_data(model, tokenizer, template, cfg) if cfg.data is None else users_stage_data(model, tokenizer,
                                                                                                  template, cfg)
    # the KL anchor is a frozen copy of the policy as RL starts, a judge already (with LoRA too: the model
    # without its adapter never learnt to judge, and the KL would pull the judge back); copied before wrapping
    # (fsdp2 shards it as it shards the policy) and given the warmed-up weights below
    reference = reference_policy(model, lora=False, distributed=cfg.distributed) if cfg.kl_coef > 0 else None
    trainer = dist.wrap(model, cfg.distributed)
    start = (run_warm_up(model, tokenizer, template, data, cfg, out, trainer) if cfg.warmup_steps
             else evaluate(model, tokenizer, template, data.held_out, cfg))
    if reference is not None and cfg.warmup_steps:
        with torch.no_grad(), reference() as anchor:
            for kept, trained in zip(anchor.parameters(), model.parameters(), strict=True):
                kept.copy_(trained)  # fsdp2: shards of the same layout, copied locally

    # one sampling for both kinds of rows (the loss recomputes log-probs at this temperature): room for a judgement
    params = _rollout_params(cfg, max(cfg.sampling.max_new_tokens, template.max_new_tokens))
    engine = open_engine(cfg.rollout.engine, model, cfg.model, seed=cfg.seed, **cfg.rollout.vllm_options())
    reward_judge = Judge(model, tokenizer, template, k=cfg.judge_k, seed=cfg.seed,
                         params=SamplingParams(template.max_new_tokens, cfg.judge_temperature), engine=engine)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.steps * cfg.inner_updates * cfg.minibatches)
    metrics = MetricsLog(out.with_name(out.name + ".metrics.jsonl"))
    metrics.write(step=0, annotated_labels=len(data.annotated), **start)
    rng, G = random.Random(cfg.seed), cfg.group_size
    n_annotated = min(round(cfg.judge_items * cfg.annotated_share) if data.checkable else cfg.judge_items,
                      len(data.annotated))
    online: list[JudgeItem] = []  # labels spent during RL so far
    n_fresh = cfg.judge_items - n_annotated if data.checkable else 0
    bar, task = progress("grm", cfg.steps)
    with bar:
        for step in range(cfg.steps):
            t0 = time.time()
            fresh_prompts = rng.sample(data.checkable, n_fresh)
            episodes = draw_episodes(rng, data.gen_records, cfg.gen_prompts, data.annotated, n_annotated, [], online)
            engine.sync_weights(model)  # the rollouts and the reward's judgements come from this step's weights
            with dist.gathered(model):  # fsdp2: whole weights while the HF sampler runs
                fresh = verifiable_pairs(model, tokenizer, fresh_prompts, template, _rollout_params(cfg),
                                         cfg.seed * 7_919 + step, verifier=data.verifier)
                episodes = replace(episodes, judging=episodes.judging + [first for first, _ in fresh])
                share = share_of(episodes, n_annotated, G, world)
                prompts = [render_prompt(tokenizer, c) for c in share.episodes.conversations(template)]
                rollout = engine.generate([p for p in prompts for _ in range(G)], params,
                                          eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                          tokenizer=tokenizer,
                                          request_seeds=[(cfg.seed * 1_000_003 + step) * 4096 + int(i)
                                                         for i in share.rows_N])
            row = dict(step=step + 1, **joint_update(trainer, cfg, share, rollout, reward_judge, reference, optimizer,
                                                     scheduler, tokenizer.pad_token_id),
                       lr=scheduler.get_last_lr()[0], step_s=time.time() - t0)
            if cfg.online_labels and (step + 1) % cfg.online_every == 0 and step + 1 < cfg.steps:
                labelled = online_round(model, tokenizer, template, data, cfg, len(online), cfg.seed * 7_919 + step)
                online += labelled
                if labelled:
                    row |= {"online_labels": len(online),
                            "online_label_score": _share(i.label.judgement.value for i in labelled)}
            if (cfg.eval_every and (step + 1) % cfg.eval_every == 0) or step + 1 == cfg.steps:
                row |= evaluate(model, tokenizer, template, data.held_out, cfg)
            metrics.write(**row)
            bar.update(task, advance=1, info=f"judging {row['judging_reward']:+.2f} gen {row['gen_reward']:.2f}")
    metrics.close()
    engine.close()
    model.eval()
    spent = {"online_labels": len(online)} if cfg.online_labels else {}  # labels used in all: annotated + online
    return dist.save(model, tokenizer, out, {"stage": "grm", "annotated_labels": len(data.annotated), **spent,
                                             **(meta or {}), "config": cfg.model_dump()})
