"""The rollout engine: greedy is argmax, sampler log-probs match the trainer's, truncation masks,
and an interrupted batch resumes from its token log with the tokens of an uninterrupted run."""

import torch

from pluribus.models import load, render_prompt, response_logprobs
from pluribus.rollout import SamplingParams, TokenLog, sample, truncate_logits


def _prompts(tok, n=6):
    return [render_prompt(tok, [{"role": "user", "content": f"add {i} {7 * i + 3}"}]) for i in range(n)]


def test_truncation_keeps_top_k_and_the_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert truncate_logits(logits, 2, 1.0).tolist() == [[True, True, False, False]]
    assert truncate_logits(logits, 0, 0.7).tolist() == [[True, True, False, False]]
    assert truncate_logits(logits, 0, 0.85).tolist() == [[True, True, True, False]]
    assert truncate_logits(logits, 0, 0.1).tolist() == [[True, False, False, False]]


def test_greedy_is_argmax_of_a_full_forward(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    prompts = _prompts(tok, 3)
    r = sample(model, prompts, SamplingParams(6, temperature=0), eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    for i, p in enumerate(prompts):
        ids = list(p)
        for t in range(int(r.lengths[i])):
            nxt = int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            assert nxt == int(r.response_ids_B_T[i, t])
            ids.append(nxt)


def test_sampler_logprobs_match_the_trainer(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    params = SamplingParams(10, temperature=0.8, top_p=0.9, top_k=30)
    r = sample(model, _prompts(tok), params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id)
    assert r.keep_mask_B_T_V is not None and r.keep_mask_B_T_V.shape[:2] == r.response_ids_B_T.shape
    chosen_kept = r.keep_mask_B_T_V.gather(-1, r.response_ids_B_T.unsqueeze(-1)).squeeze(-1)
    assert chosen_kept[r.response_mask_B_T].all()  # no token outside the sampler's support
    lp, _ = response_logprobs(model, r.prompt_ids, r.response_ids_B_T, r.response_mask_B_T, tok.pad_token_id,
                              params.temperature, r.keep_mask_B_T_V)
    assert (lp - r.sampler_logprobs_B_T)[r.response_mask_B_T].abs().max() < 1e-4


def test_a_request_samples_the_same_tokens_in_any_batch(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    prompts = _prompts(tok)
    params = SamplingParams(8)
    full = sample(model, prompts, params, eos_id=2, pad_id=0, seed=3)
    alone = sample(model, prompts[2:3], params, eos_id=2, pad_id=0, request_seeds=[3 * 100_003 + 2])
    n = int(alone.lengths[0])
    assert torch.equal(full.response_ids_B_T[2, :n], alone.response_ids_B_T[0, :n])
    other = sample(model, prompts, params, eos_id=2, pad_id=0, seed=4)
    assert not torch.equal(full.response_ids_B_T, other.response_ids_B_T)


def test_interrupted_batch_resumes_with_the_same_tokens(tiny_llama, tmp_path):
    model, tok = load(tiny_llama, trainable=False)
    prompts = _prompts(tok, 8)
    params = SamplingParams(12)
    reference = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7)
    log = tmp_path / "rollout.log"
    partial = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7,
                     log_path=log, stop_after_steps=5)
    assert int(partial.lengths.max()) == 5 and int(reference.lengths.max()) > 5  # really interrupted
    with open(log, "a") as f:
        f.write('{"t": 5, "tok": {"0": [1')  # a torn write at the crash point
    resumed = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7, log_path=log)
    assert torch.equal(resumed.response_ids_B_T, reference.response_ids_B_T)
    assert torch.equal(resumed.response_mask_B_T, reference.response_mask_B_T)
    assert torch.allclose(resumed.sampler_logprobs_B_T, reference.sampler_logprobs_B_T, atol=1e-4)
    assert resumed.finish_reasons == reference.finish_reasons
    prefixes = TokenLog.replay(log)
    assert all(len(prefixes[i]) == int(reference.lengths[i]) for i in range(8))


def test_a_resumed_truncating_batch_keeps_the_samplers_masks(tiny_llama, tmp_path):
    model, tok = load(tiny_llama, trainable=False)
    prompts = _prompts(tok, 8)
    params = SamplingParams(12, temperature=0.9, top_p=0.8, top_k=20)
    args = dict(eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=7)
    reference = sample(model, prompts, params, **args)
    log = tmp_path / "rollout.log"
    sample(model, prompts, params, **args, log_path=log, stop_after_steps=5)
    resumed = sample(model, prompts, params, **args, log_path=log)  # prefixes from the log, the rest decoded
    replayed = sample(model, prompts, params, **args, log_path=log)  # all from the log: nothing decoded
    assert not reference.keep_mask_B_T_V.all()  # the masks do truncate
    for rollout in (resumed, replayed):
        assert torch.equal(rollout.response_ids_B_T, reference.response_ids_B_T)
        assert torch.equal(rollout.keep_mask_B_T_V, reference.keep_mask_B_T_V)


def test_gumbel_noise_depends_on_the_request_and_the_position_alone():
    from pluribus.rollout import NOISE_BLOCK, _GumbelNoise

    seeds, V = [11, 12, 13], 1000  # 4 positions a block: steps 0-11 cross two block boundaries
    in_order = _GumbelNoise(seeds, V)
    rows = {t: in_order([0, 1, 2], [t] * 3) for t in range(12)}
    late = _GumbelNoise(seeds, V)  # request 1 alone, resumed mid-block at position 6
    for t in range(6, 12):
        assert torch.equal(late([1], [t])[0], rows[t][1])
    mixed = _GumbelNoise(seeds, V)  # rows at different positions in one call (a resumed batch)
    assert torch.equal(mixed([2, 0], [9, 3]), torch.stack([rows[9][2], rows[3][0]]))
    assert not torch.equal(rows[0][0], rows[0][1]) and not torch.equal(rows[0][0], rows[1][0])
    everything = torch.cat(list(rows.values())).flatten()  # standard Gumbel: mean γ ≈ 0.5772, variance π²/6
    assert abs(everything.mean().item() - 0.5772) < 0.03 and abs(everything.var().item() - 1.6449) < 0.1

    big = NOISE_BLOCK  # one position a block: a generator seeded per (request, position), as before blocks
    generator = torch.Generator().manual_seed(12 * 1_000_003 + 5)
    expected = -torch.log(-torch.log(torch.rand(big, generator=generator).clamp(1e-20, 1.0)))
    large = _GumbelNoise(seeds, big)
    assert torch.equal(large([1], [5])[0], expected) and large.blocks.numel() == 0  # nothing kept between steps


def test_sampling_runs_without_dropout_and_keeps_the_models_mode(tiny_llama, monkeypatch):
    """A model in training mode with dropout samples what it samples in eval mode, through the lean decoder and
    through transformers' forward (PLURIBUS_LEAN=0), and is left in training mode; the lean path never switches the
    mode (transformers' `train()` costs ~0.6 ms a call)."""
    model, tok = load(tiny_llama, trainable=False)
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.9
    prompts = _prompts(tok, 4)
    params = SamplingParams(8)
    reference = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=1)
    switches = []
    original = type(model).train

    def counted(self, mode=True):
        switches.append(mode)
        return original(self, mode)

    monkeypatch.setattr(type(model), "train", counted)
    for lean in ("1", "0"):
        monkeypatch.setenv("PLURIBUS_LEAN", lean)
        switches.clear()
        model.train()
        switches.clear()
        r = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=1)
        assert torch.equal(r.response_ids_B_T, reference.response_ids_B_T), lean
        assert (r.sampler_logprobs_B_T - reference.sampler_logprobs_B_T).abs().max() < 1e-5
        assert model.training
        assert switches == ([] if lean == "1" else [False, True])
