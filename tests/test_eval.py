"""Evaluation: the same seed gives the same numbers; scores are bounded and greedy pass@1 counts passes."""

from pluribus.config import EvalConfig
from pluribus.models import load
from pluribus.stages import evaluate


def test_same_seed_same_numbers(tiny_llama):
    cfg = EvalConfig(model=str(tiny_llama), domains=["max", "reverse"], n=6, samples=3, max_new_tokens=8)
    first, second = evaluate.as_json(evaluate.run(cfg)), evaluate.as_json(evaluate.run(cfg))
    assert first == second
    assert all(0.0 <= s["pass1_greedy"] <= 1.0 and 0.0 <= s["pass_at_k"] <= 1.0 for s in first)
    assert all(0.0 <= s["reward_sampled"] <= 1.0 and 0.0 <= s["floor"] <= 1.0 for s in first)


def test_a_perfect_model_scores_one(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    cfg = EvalConfig(model=str(tiny_llama), domains=["max"], n=5, samples=2, max_new_tokens=8)
    (score,) = evaluate.evaluate_model(model, tok, cfg, reward=lambda record, response: 1.0)
    assert score.pass1_greedy == 1.0 and score.pass_at_k == 1.0 and score.reward_sampled == 1.0
    (score,) = evaluate.evaluate_model(model, tok, cfg, reward=lambda record, response: 0.0)
    assert score.pass1_greedy == 0.0 and score.pass_at_k == 0.0


def test_greedy_only_skips_sampling_and_shows_dashes(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    cfg = EvalConfig(model=str(tiny_llama), domains=["max", "case"], n=4, samples=0, max_new_tokens=8)
    calls = []
    scores = evaluate.evaluate_model(model, tok, cfg, reward=lambda r, t: calls.append(t) or 1.0)
    assert len(calls) == 8  # one greedy response per prompt, nothing sampled
    assert all(s.pass1_greedy == 1.0 and s.reward_sampled is None and s.pass_at_k is None for s in scores)
    row = [c._cells[-1] for c in evaluate.table(scores).columns]
    assert row == ["mean", "", "100.0", "-", "-", f"{100 * sum(s.floor for s in scores) / 2:.1f}"]
