"""The lean decode path (pluribus.models.lean): the HF forward's logits, the HF path's tokens, and a clean
refusal of what it does not reproduce."""

import shutil

import pytest
import torch

from pluribus.models import add_lora, load, pad_batch, position_ids_from_mask, render_prompt
from pluribus.rollout import SamplingParams, sample
from pluribus.models import lean as lean_module
from pluribus.models.lean import LeanDecoder


def _prompts(tok, n):
    texts = [f"sort {' '.join(str(7 * i + j) for j in range(i % 4 + 1))}" for i in range(n)]
    return [render_prompt(tok, [{"role": "user", "content": text}]) for text in texts]


def _hf_only(monkeypatch):
    monkeypatch.setattr(lean_module.LeanDecoder, "build", classmethod(lambda cls, model: None))


def _lora(model):
    model = add_lora(model, rank=4, alpha=8)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_lean_logits_equal_the_hf_forward(request, fixture, lora, kernels, one_thread, monkeypatch):
    """With the native decode kernels (where a compiler is) and with PyTorch ops alone."""
    monkeypatch.setenv("PLURIBUS_KERNELS", kernels)
    model, tok = load(request.getfixturevalue(fixture), trainable=False)
    model = _lora(model) if lora else model
    prompts = _prompts(tok, 5)
    ids, attn = pad_batch(prompts, tok.pad_token_id, side="left")
    pos = position_ids_from_mask(attn)
    with torch.no_grad():
        decoder = LeanDecoder.build(model)
        assert decoder is not None
        assert (decoder.kernels is not None) == (kernels == "1" and shutil.which("c++") is not None)
        out = model(input_ids=ids, attention_mask=attn, position_ids=pos, use_cache=True)
        hf, cache = out.logits[:, -1].float(), out.past_key_values
        lean = decoder.prefill(prompts, 6)
        assert (hf - lean).abs().max() < 1e-5
        for _ in range(6):
            token = hf.argmax(-1)
            attn = torch.cat([attn, torch.ones_like(attn[:, :1])], dim=1)
            pos = pos[:, -1:] + 1
            out = model(input_ids=token[:, None], attention_mask=attn, position_ids=pos, past_key_values=cache,
                        use_cache=True)
            hf, cache = out.logits[:, -1].float(), out.past_key_values
            lean = decoder.step(token)
            assert (hf - lean).abs().max() < 1e-5


def test_lean_and_hf_paths_sample_the_same_tokens(tiny_qwen2, monkeypatch, one_thread):
    """Distinct prompts, a GRPO-style batch (each prompt 4 times) and rows that stop early (a frequent token as
    EOS, so finished rows leave the lean cache mid-batch): the same tokens and log-probs either way."""
    model, tok = load(tiny_qwen2, trainable=False)
    distinct = _prompts(tok, 8)
    grouped = [p for p in distinct[:3] for _ in range(4)]
    cases = [(distinct, SamplingParams(10), tok.eos_token_id),
             (grouped, SamplingParams(10, 0.8, 0.9, 20), tok.eos_token_id),
             (distinct * 2, SamplingParams(48), 78)]
    compactions = []
    keep_rows = LeanDecoder.keep_rows
    monkeypatch.setattr(LeanDecoder, "keep_rows",
                        lambda self, rows: (compactions.append(len(rows)), keep_rows(self, rows)))
    lean = [sample(model, p, params, eos_id=eos, pad_id=tok.pad_token_id, seed=5) for p, params, eos in cases]
    assert compactions  # finished rows did leave the cache
    _hf_only(monkeypatch)
    hf = [sample(model, p, params, eos_id=eos, pad_id=tok.pad_token_id, seed=5) for p, params, eos in cases]
    assert len(set(int(n) for n in lean[2].lengths)) > 1  # some rows did stop early
    for a, b in zip(lean, hf):
        assert torch.equal(a.response_ids_B_T, b.response_ids_B_T)
        assert torch.equal(a.response_mask_B_T, b.response_mask_B_T)
        assert (a.sampler_logprobs_B_T - b.sampler_logprobs_B_T).abs().max() < 1e-5
        assert (a.keep_mask_B_T_V is None) == (b.keep_mask_B_T_V is None)
        if a.keep_mask_B_T_V is not None:
            assert torch.equal(a.keep_mask_B_T_V, b.keep_mask_B_T_V)


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_a_prefill_from_the_training_forwards_prompts_samples_the_same(tiny_qwen2, monkeypatch, one_thread):
    """OPD's step: the training forward runs the prompts with grad (`prompt_states`) and the sampler's prefill copies
    their keys and values instead of running them again: the same tokens and log-probs to the bit, a prompt shared
    by two rows among them, and the prompts never run by the decoder."""
    from pluribus.models.lean import prompt_states

    model, tok = load(tiny_qwen2)
    model.train()
    prompts = _prompts(tok, 6)
    prompts = prompts + prompts[:1]
    params = SamplingParams(12, 0.9)
    plain = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3)
    states = prompt_states(model, prompts)
    assert states.last_C_D.requires_grad
    monkeypatch.setattr(LeanDecoder, "_native_prefill", lambda *a: pytest.fail("the prompts ran again"))
    reused = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, seed=3, prompts=states)
    assert torch.equal(reused.response_ids_B_T, plain.response_ids_B_T)
    assert torch.equal(reused.sampler_logprobs_B_T, plain.sampler_logprobs_B_T)
    assert model.training
    from pluribus.models.lean import prefill_takes_prompt_states

    assert prefill_takes_prompt_states(model)
    monkeypatch.setenv("PLURIBUS_KERNELS", "0")  # the PyTorch-ops decoder runs its prompts itself: no states kept
    assert not prefill_takes_prompt_states(model)


def _unembedded(model, hidden):
    from pluribus.teachers import output_head

    head, bias = output_head(model)
    logits = torch.nn.functional.linear(hidden, head, bias)
    model.zero_grad()
    (logits.log_softmax(-1)[:, 11].sum() + logits.pow(2).mean()).backward()
    return logits.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_the_decodes_projections_stand_for_the_updates_forward(request, fixture, tmp_path, monkeypatch, one_thread):
    """OPD's update after its rollout: the decode's own projections of the responses (`record=True`) give the
    prompts-first forward's logits and gradients with no response token projected again; recording samples the
    same tokens to the bit, rows leaving the cache mid-rollout and a prompt shared by two rows included; a rollout
    that resumes from its token log records nothing (its first tokens were not decoded here), nor one whose record
    would exceed its memory budget."""
    from pluribus.models.lean import predicting_hidden_states, prompt_states

    model, tok = load(request.getfixturevalue(fixture))
    model.train()
    prompts = _prompts(tok, 15)
    prompts = prompts + prompts[:1]
    params = SamplingParams(16, 1.0)
    with torch.no_grad():  # the untrained model rarely ends a row: the token in most rows stands for EOS here
        probe = sample(model, prompts, params, eos_id=-1, pad_id=tok.pad_token_id, seed=4)
    rows_with = torch.stack([torch.bincount(row, minlength=model.config.vocab_size) > 0
                             for row in probe.response_ids_B_T]).sum(0)
    kw = dict(eos_id=int(rows_with.argmax()), pad_id=tok.pad_token_id, seed=4)
    dropped = []
    monkeypatch.setattr(LeanDecoder, "keep_rows",
                        lambda self, rows, _real=LeanDecoder.keep_rows: (dropped.append(len(rows)), _real(self, rows)))
    with torch.no_grad():
        states = prompt_states(model, prompts)
        plain = sample(model, prompts, params, prompts=states, **kw)
        recorded = sample(model, prompts, params, prompts=states, record=True, **kw)
    assert plain.decoded is None and recorded.decoded is not None
    assert torch.equal(recorded.response_ids_B_T, plain.response_ids_B_T)
    assert torch.equal(recorded.sampler_logprobs_B_T, plain.sampler_logprobs_B_T)
    assert dropped and len(set(recorded.lengths.tolist())) > 1  # rows ended early and left the cache
    layers = recorded.decoded.layers
    assert len(layers) == model.config.num_hidden_layers
    assert layers[0]["q"].shape[0] == int((recorded.lengths - 1).clamp_min(0).sum())
    batch = (recorded.prompt_ids, recorded.response_ids_B_T, recorded.response_mask_B_T)
    expected, expected_grads = _unembedded(model, predicting_hidden_states(
        model, *batch, prompts=prompt_states(model, prompts)))
    projected = []
    hooks = [m.register_forward_hook(lambda *a: projected.append(1)) for name, m in model.named_modules()
             if name.endswith(("q_proj", "v_proj", "down_proj"))]
    states = prompt_states(model, prompts)
    projected.clear()  # the prompts' projections run above, with grad: none of the responses' below
    got, grads = _unembedded(model, predicting_hidden_states(model, *batch, prompts=states, decoded=recorded.decoded))
    for hook in hooks:
        hook.remove()
    assert not projected
    assert (got - expected).abs().max() < 1e-5
    for name in expected_grads:
        assert (grads[name] - expected_grads[name]).norm() / expected_grads[name].norm().clamp_min(1e-8) < 1e-5, name
    log = tmp_path / "tokens.log"
    sample(model, prompts, params, log_path=log, stop_after_steps=3, **kw)
    with torch.no_grad():
        resumed = sample(model, prompts, params, log_path=log, record=True, **kw)
    assert torch.equal(resumed.response_ids_B_T, plain.response_ids_B_T) and resumed.decoded is None
    monkeypatch.setattr(lean_module, "RECORD_MAX_BYTES", 4096)  # more than the budget: nothing kept, same tokens
    with torch.no_grad():
        capped = sample(model, prompts, params, prompts=prompt_states(model, prompts), record=True, **kw)
    assert torch.equal(capped.response_ids_B_T, plain.response_ids_B_T) and capped.decoded is None


def test_unsupported_models_fall_back_to_hf(tiny_llama):
    model, _ = load(tiny_llama, trainable=False)
    assert LeanDecoder.build(model) is not None
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert LeanDecoder.build(model) is None
    model.config.rope_parameters = {"rope_type": "default", "rope_theta": 10000.0}
    model.config.hidden_act = "gelu"
    assert LeanDecoder.build(model) is None


def test_packs_hold_every_context_within_capacity():
    lengths = [30, 9, 12, 64, 70, 5, 5, 33, 18]
    packs = lean_module._packs(lengths)
    assert sorted(c for pack in packs for c in pack) == list(range(len(lengths)))
    capacity = max(lean_module.PACK_TOKENS, max(lengths))
    assert all(sum(lengths[c] for c in pack) <= capacity for pack in packs)
    assert len(packs) < len(lengths)  # short contexts share packs
