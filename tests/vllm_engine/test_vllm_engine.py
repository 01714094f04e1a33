"""The vLLM rollout engine, for real: `make test-vllm` runs this in a virtual environment of its own with the
CPU build of vLLM (the default `make test` leaves this folder out).

On a tiny Qwen2 saved here: vLLM's sampler log-probs agree with the trainer's recomputed log-probs of the
same tokens (the max difference is printed), with and without top-p/top-k; the same request seeds give the
same tokens; greedy decoding gives the HF engine's tokens; after a training step and a sync the engine
samples from the new weights (a LoRA adapter folded in); a GRPO stage runs on the engine end to end.
"""

import json
import time

import pytest
import torch

pytest.importorskip("vllm")

from pluribus.config import GRPOConfig, validate  # noqa: E402
from pluribus.models import add_lora, load, render_prompt, response_logprobs  # noqa: E402
from pluribus.rollout import SamplingParams, sample  # noqa: E402
from pluribus.rollout.engine import open_engine  # noqa: E402

TOLERANCE = 1e-4  # float32 on both sides: the kernels differ, the maths does not


@pytest.fixture(scope="module")
def trainer(tiny_qwen2):
    torch.manual_seed(0)
    return load(tiny_qwen2)


@pytest.fixture(scope="module")
def engine(tiny_qwen2, trainer):
    start = time.time()
    vllm = open_engine("vllm", trainer[0], tiny_qwen2, kv_cache_mb=64, max_model_len=128)
    print(f"\nvllm engine start-up: {time.time() - start:.1f}s")
    yield vllm
    vllm.close()


def _prompts(tok, n=8):
    return [render_prompt(tok, [{"role": "user", "content": f"add {i} {7 * i + 3}"}]) for i in range(n)]


def _recomputed(model, rollout, params, pad_id):
    with torch.no_grad():
        logprobs, _ = response_logprobs(model.eval(), rollout.prompt_ids, rollout.response_ids_B_T,
                                        rollout.response_mask_B_T, pad_id, params.temperature, rollout.keep_mask_B_T_V)
    return logprobs


def _max_diff(model, rollout, params, pad_id) -> float:
    mask = rollout.response_mask_B_T
    return float((_recomputed(model, rollout, params, pad_id) - rollout.sampler_logprobs_B_T)[mask].abs().max())


@pytest.mark.parametrize("params", [SamplingParams(24, temperature=0.8),
                                    SamplingParams(24, temperature=1.0, top_p=0.9, top_k=20)],
                         ids=["temperature", "top_p_top_k"])
def test_sampler_logprobs_agree_with_the_trainer(trainer, engine, params):
    model, tok = trainer
    engine.sync_weights(model)
    prompts = [p for p in _prompts(tok) for _ in range(2)]
    start = time.time()
    rollout = engine.generate(prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                              request_seeds=list(range(100, 100 + len(prompts))), tokenizer=tok)
    took = time.time() - start
    tokens = int(rollout.lengths.sum())
    diff = _max_diff(model, rollout, params, tok.pad_token_id)
    print(f"\n{params}: {tokens} tokens in {took:.2f}s; max |vLLM − trainer| log-prob = {diff:.2e}")
    assert tokens > len(prompts)  # something was generated
    assert diff < TOLERANCE
    if params.top_p < 1 or params.top_k:
        kept = rollout.keep_mask_B_T_V.sum(-1)[rollout.response_mask_B_T]
        assert (kept <= params.top_k).all() and (kept >= 1).all()
    assert len(rollout.texts) == len(prompts) and rollout.finish_reasons[0] in ("eos", "length")


def test_same_seeds_same_tokens_and_greedy_is_the_hf_engines(trainer, engine):
    model, tok = trainer
    engine.sync_weights(model)
    prompts, ids = _prompts(tok), dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    params = SamplingParams(16, temperature=1.0)
    first = engine.generate(prompts, params, request_seeds=range(8), **ids)
    again = engine.generate(prompts, params, request_seeds=range(8), **ids)
    other = engine.generate(prompts, params, request_seeds=range(50, 58), **ids)
    assert torch.equal(first.response_ids_B_T, again.response_ids_B_T)
    assert not torch.equal(first.response_ids_B_T, other.response_ids_B_T)
    greedy = SamplingParams(16, temperature=0)
    vllm_greedy = engine.generate(prompts, greedy, request_seeds=range(8), **ids)
    hf_greedy = sample(model, prompts, greedy, **ids)
    assert torch.equal(vllm_greedy.response_ids_B_T, hf_greedy.response_ids_B_T)


def test_a_logged_batch_replays_and_an_interrupted_one_keeps_its_prefixes(trainer, engine, tmp_path):
    from pluribus.rollout import TokenLog

    model, tok = trainer
    engine.sync_weights(model)
    prompts, ids = _prompts(tok), dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, request_seeds=range(8))
    params = SamplingParams(12, temperature=1.0)
    done = engine.generate(prompts, params, log_path=tmp_path / "done.jsonl", **ids)
    replayed = engine.generate(prompts, params, log_path=tmp_path / "done.jsonl", **ids)
    assert torch.equal(done.response_ids_B_T, replayed.response_ids_B_T)
    assert torch.equal(done.sampler_logprobs_B_T, replayed.sampler_logprobs_B_T)

    cut = engine.generate(prompts, params, log_path=tmp_path / "cut.jsonl", stop_after_steps=3, **ids)
    assert (cut.lengths <= 3).all() and len(TokenLog.replay(tmp_path / "cut.jsonl")) == 8
    resumed = engine.generate(prompts, params, log_path=tmp_path / "cut.jsonl", **ids)
    assert torch.equal(resumed.response_ids_B_T[:, :3], done.response_ids_B_T[:, :3])  # the logged prefixes stay
    assert (resumed.lengths > 3).any() and _max_diff(model, resumed, params, tok.pad_token_id) < TOLERANCE


def test_the_engine_samples_the_new_weights_after_a_step_and_a_sync(tiny_qwen2, engine):
    model, tok = load(tiny_qwen2)
    model = add_lora(model, rank=8, alpha=16)  # the sync must fold the adapter in
    engine.sync_weights(model)
    prompts, ids = _prompts(tok), dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    params = SamplingParams(16, temperature=1.0)
    before = engine.generate(prompts, params, request_seeds=range(8), **ids)

    # one training step: raise the log-probs of the tokens just sampled (a policy-gradient step, advantage 1)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    model.train()
    logprobs, _ = response_logprobs(model, before.prompt_ids, before.response_ids_B_T, before.response_mask_B_T,
                                    tok.pad_token_id)
    (-logprobs[before.response_mask_B_T].mean()).backward()
    optimizer.step()

    stale = _max_diff(model, before, params, tok.pad_token_id)
    start = time.time()
    engine.sync_weights(model)
    synced_s = time.time() - start
    after = engine.generate(prompts, params, request_seeds=range(100, 108), **ids)
    fresh = _max_diff(model, after, params, tok.pad_token_id)
    greedy = SamplingParams(16, temperature=0)
    print(f"\nafter a step: the old rollout is {stale:.2e} off the trainer; after the sync ({synced_s * 1000:.0f} ms) "
          f"the new rollout is {fresh:.2e} off")
    assert stale > 1e-2  # the step changed the policy
    assert fresh < TOLERANCE  # and the engine samples from the changed one
    assert torch.equal(engine.generate(prompts, greedy, request_seeds=range(8), **ids).response_ids_B_T,
                       sample(model.eval(), prompts, greedy, **ids).response_ids_B_T)


def test_a_grpo_stage_runs_on_the_vllm_engine(tiny_qwen2, tmp_path, engine):
    from pluribus.stages import grpo
    from pluribus.world import generate

    engine.close()  # one engine at a time in this process
    cfg = validate(GRPOConfig, {"model": str(tiny_qwen2), "out": str(tmp_path / "grpo"), "data": {"domains": ["add"]},
                                "steps": 2, "prompts_per_step": 2, "group_size": 2, "lora": None,
                                "sampling": {"max_new_tokens": 8},
                                "rollout": {"engine": "vllm", "kv_cache_mb": 64, "max_model_len": 128}}, "test")
    out = grpo.run(cfg, records=generate("add", "train", 8))
    rows = [json.loads(line) for line in (tmp_path / "grpo.metrics.jsonl").read_text().splitlines()]
    assert (out / "config.json").is_file() and [r["step"] for r in rows] == [0, 1]
    assert all(r["response_len"] > 0 for r in rows)
