"""The packed training forward (pluribus.models.lean.predicting_hidden_states) against the HF forward: the same
logits and the same gradients, with shared prompts run once, LoRA and grouped-query attention; and split in two,
the prompts run first (`prompt_states`, on-policy distillation's forward)."""

import shutil

import pytest
import torch

from pluribus.models import add_lora, load, response_logits
from pluribus.models import kernels as native
from pluribus.models.lean import predicting_hidden_states, prompt_states
from pluribus.teachers import output_head


def _batch(G: int, seed: int = 0):
    """Prompts of several lengths, each G times (a GRPO batch), responses of several lengths (right-padded)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(7, 100, (n,), generator=gen).tolist() for n in (5, 9, 3, 12)]
    prompt_ids = [p for p in prompts for _ in range(G)]
    B, T = len(prompt_ids), 9
    lengths = torch.randint(1, T + 1, (B,), generator=gen)
    mask = torch.arange(T)[None] < lengths[:, None]
    return prompt_ids, torch.randint(7, 100, (B, T), generator=gen).masked_fill(~mask, 0), mask


def _hf_only(model, prompt_ids, response, mask):
    import pluribus.models.lean as lean

    original = lean.predicting_hidden_states
    lean.predicting_hidden_states = lambda *args: None
    try:
        return response_logits(model, prompt_ids, response, mask, 0)
    finally:
        lean.predicting_hidden_states = original


def _grads(model, logits_M_V):
    model.zero_grad()
    (logits_M_V.log_softmax(-1)[:, 11].sum() + logits_M_V.pow(2).mean()).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("variant", ["full", "lora", "gqa"])
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_packed_forward_equals_the_hf_forward(request, fixture, variant, kernels, one_thread, monkeypatch):
    """With the native attention kernel (where a compiler is) and with SDPA."""
    monkeypatch.setenv("PLURIBUS_KERNELS", kernels)
    calls = []
    monkeypatch.setattr(native.CpuKernels, "packed_attention",
                        lambda self, *args, _real=native.CpuKernels.packed_attention: (calls.append(1),
                                                                                          _real(self, *args))[1])
    model, _ = load(request.getfixturevalue(fixture))
    if variant == "gqa":  # two query heads share one key head: rebuild the model with one KV head
        from transformers import AutoModelForCausalLM

        config = model.config
        config.num_key_value_heads = 1
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
    if variant == "lora":
        model = add_lora(model, rank=4, alpha=8)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.normal_(0, 0.05)
    model.train()
    prompt_ids, response, mask = _batch(G=3)
    reference = _hf_only(model, prompt_ids, response, mask)[mask]
    expected = _grads(model, reference)
    head, bias = output_head(model)
    hidden = predicting_hidden_states(model, prompt_ids, response, mask)
    assert hidden is not None and hidden.shape == (int(mask.sum()), head.shape[1])
    logits = torch.nn.functional.linear(hidden, head, bias)
    assert (logits - reference).abs().max() < 1e-5
    got = _grads(model, logits)
    assert got.keys() == expected.keys()
    for name in expected:
        scale = expected[name].norm().clamp_min(1e-8)
        assert (got[name] - expected[name]).norm() / scale < 1e-5, name
    # through response_logits (what GRPO calls): the same values at the masked positions, 0 elsewhere
    full = response_logits(model, prompt_ids, response, mask, 0)
    assert torch.equal(full[mask], logits.detach()) or (full[mask] - reference).abs().max() < 1e-5
    assert not full[~mask].any()
    assert bool(calls) == (kernels == "1" and shutil.which("c++") is not None)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
@pytest.mark.parametrize("kernels", ["1", "0"])
def test_prompts_run_first_give_the_one_pass_hidden_states_and_gradients(request, fixture, kernels, one_thread,
                                                                        monkeypatch):
    """`prompt_states`, then `predicting_hidden_states(..., prompts=)` over the responses alone: the one-pass
    forward's hidden states and gradients (which reach the prompt tokens through their keys and values), with
    prompts shared by two rows and a one-token response (predicted from its prompt's last token alone)."""
    monkeypatch.setenv("PLURIBUS_KERNELS", kernels)
    model, _ = load(request.getfixturevalue(fixture))
    model.train()
    prompt_ids, response, mask = _batch(G=2)
    mask[0, 1:] = False
    response[0, 1:] = 0
    head, bias = output_head(model)
    whole = torch.nn.functional.linear(predicting_hidden_states(model, prompt_ids, response, mask), head, bias)
    expected = _grads(model, whole)
    states = prompt_states(model, prompt_ids)
    assert states.prompts == list(dict.fromkeys(tuple(p) for p in prompt_ids)) and len(states.prompts) == 4
    assert len(states.keys_N_Hkv_d) == model.config.num_hidden_layers
    assert states.keys_N_Hkv_d[0].shape[0] == sum(len(p) for p in states.prompts)
    hidden = predicting_hidden_states(model, prompt_ids, response, mask, prompts=states)
    split = torch.nn.functional.linear(hidden, head, bias)
    assert split.shape == whole.shape and (split - whole).abs().max() < 1e-6
    got = _grads(model, split)
    for name in expected:
        assert (got[name] - expected[name]).norm() / expected[name].norm().clamp_min(1e-8) < 1e-5, name
    other = prompt_states(model, prompt_ids[2:])  # not every row's prompt: refused, not guessed
    assert predicting_hidden_states(model, prompt_ids, response, mask, prompts=other) is None


def test_prompt_states_refuse_a_training_model_with_dropout(tiny_qwen2):
    """Decoding from keys and values made with dropout on would sample from another model: None in training mode
    (in eval mode dropout is off)."""
    model, _ = load(tiny_qwen2)
    model.config.attention_dropout = 0.1
    prompt_ids, _, _ = _batch(G=1)
    assert prompt_states(model.train(), prompt_ids) is None
    assert prompt_states(model.eval(), prompt_ids) is not None


def test_what_the_packed_forward_does_not_reproduce_gets_none(tiny_llama, monkeypatch):
    model, _ = load(tiny_llama)
    prompt_ids, response, mask = _batch(G=1)
    assert predicting_hidden_states(model, prompt_ids, response, mask) is not None
    monkeypatch.setenv("PLURIBUS_LEAN", "0")  # the switch that rules the lean forwards out
    assert predicting_hidden_states(model, prompt_ids, response, mask) is None
    monkeypatch.delenv("PLURIBUS_LEAN")
    import pluribus.models.lean as lean

    monkeypatch.setattr(lean, "MAX_MASK_ELEMENTS", 16)  # long sequences: a dense mask too big to be worth it
    assert predicting_hidden_states(model, prompt_ids, response, mask) is None
    monkeypatch.undo()
    holes = mask.clone()
    row = int(mask.sum(-1).argmax())
    holes[row, 0] = False  # not a prefix: not a rollout's mask
    assert predicting_hidden_states(model, prompt_ids, response, holes) is None
    assert predicting_hidden_states(model, [[]] + prompt_ids[1:], response, mask) is None
    model.config.rope_parameters = {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}
    assert predicting_hidden_states(model, prompt_ids, response, mask) is None


def test_the_lm_loss_is_the_padded_forwards(tiny_qwen2, monkeypatch):
    """SFT's and pretraining's loss (`lm_loss`) through the packed forward: the padded forward's value, token count
    and gradients; loss starts of 0 and past a sequence's end included."""
    from pluribus.stages.common import lm_loss

    model, _ = load(tiny_qwen2)
    model.train()
    gen = torch.Generator().manual_seed(3)
    sequences = [torch.randint(7, 100, (n,), generator=gen).tolist() for n in (9, 17, 4, 12, 6)]
    starts = [3, 1, 0, 5, 6]  # the last has no target (start = length)

    def run():
        model.zero_grad()
        loss, count = lm_loss(model, sequences, starts, 0)
        loss.backward()
        return loss.detach(), count, {n: p.grad.clone() for n, p in model.named_parameters()}

    packed = run()
    import pluribus.stages.common as common

    monkeypatch.setattr(common, "target_logits", lambda *args: None)  # the padded forward
    padded = run()
    assert packed[1] == padded[1] == 6 + 16 + 3 + 7
    assert abs(float(packed[0] - padded[0])) < 1e-5
    for name, grad in padded[2].items():
        assert (packed[2][name] - grad).norm() / grad.norm().clamp_min(1e-8) < 1e-5, name



def test_two_threads_give_the_same_gradients_every_time(tiny_llama):
    """A prompt shared by rows runs once, so its keys and values are gathered into every row and their gradients
    add up in the backward. They must add up in one order: with `x[index]` two threads added them in whatever
    order the threads reached them, and the same batch gave other gradients from run to run (pretraining's
    texts all share their first token; at this size 64 rows of up to 40 tokens showed it every time)."""
    model, _ = load(tiny_llama)
    model.train()
    gen = torch.Generator().manual_seed(0)
    B, T = 64, 40
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    response = torch.randint(7, 100, (B, T), generator=gen).masked_fill(~mask, 0)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [_grads(model, model.lm_head(predicting_hidden_states(model, [[5, 6]] * B, response, mask)))
                for _ in range(4)]
    finally:
        torch.set_num_threads(threads)
    for other in runs[1:]:
        assert all(torch.equal(other[name], runs[0][name]) for name in runs[0])


@pytest.mark.skipif(shutil.which("c++") is None, reason="no C++ compiler on this machine")
def test_the_training_kernels_give_one_threads_results_on_two(tiny_qwen2, monkeypatch):
    """With two torch threads the kernels split their rows over both (OpenMP, torch's runtime): the hidden states and
    gradients of one thread (the kernels' sums run in one order on any number of threads, shared keys' gradients added
    in row order; the matmuls are MKL's, whose threads may sum in another order)."""
    calls = []
    monkeypatch.setattr(native.CpuKernels, "packed_attention",
                        lambda self, *args, _real=native.CpuKernels.packed_attention: (calls.append(1),
                                                                                       _real(self, *args))[1])
    model, _ = load(tiny_qwen2)
    model.train()
    B, T = 48, 30  # a batch large enough that every kernel takes both threads
    gen = torch.Generator().manual_seed(1)
    mask = torch.arange(T)[None] < torch.randint(1, T + 1, (B,), generator=gen)[:, None]
    response = torch.randint(7, 100, (B, T), generator=gen).masked_fill(~mask, 0)
    prompt_ids = [[5, 6, 7 + b % 4] for b in range(B)]  # shared prompts: their keys' gradients add over rows
    threads = torch.get_num_threads()
    runs = []
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            calls.clear()
            hidden = predicting_hidden_states(model, prompt_ids, response, mask)
            runs.append((hidden.detach(), _grads(model, model.lm_head(hidden))))
            assert calls, n  # the kernels ran on one thread and on two
    finally:
        torch.set_num_threads(threads)
    (one, one_grads), (two, two_grads) = runs
    assert (one - two).abs().max() < 1e-6
    for name, grad in one_grads.items():
        assert (two_grads[name] - grad).norm() / grad.norm().clamp_min(1e-8) < 1e-6, name


def test_the_packed_layout_of_a_small_batch():
    """`_layout` by hand: rows 0 and 1 share prompt [5, 6] (row 0 runs it, row 1 attends from its response only),
    row 2 has its own; each distinct token once, each row's queries and keys, who owns each output, who predicts."""
    from pluribus.models.lean import _layout

    responses = torch.tensor([[10, 11, 12], [20, 0, 0], [30, 31, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=torch.bool)
    layout = _layout([[5, 6], [5, 6], [7]], responses, mask, torch.float32, None)
    assert layout.ids_N.tolist() == [5, 6, 10, 11, 7, 30]  # a response's last token predicts nothing: not run
    assert layout.position_N.tolist() == [0, 1, 2, 3, 0, 1]
    assert layout.predict_M.tolist() == [1, 2, 3, 1, 4, 5]  # row 1's one token is predicted by the shared prompt's 6
    running, attending = layout.attention
    assert running.query_token_B_Q.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]
    assert running.key_token_B_K.tolist() == [[0, 1, 2, 3], [4, 5, 0, 0]]
    causal = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]]
    short = [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0], [1, 1, 0, 0]]  # padding queries see the whole row: finite
    assert (running.mask_B_1_Q_K[:, 0] == 0).int().tolist() == [causal, short]
    assert torch.isinf(running.mask_B_1_Q_K[running.mask_B_1_Q_K != 0]).all()
    assert attending.key_token_B_K.tolist() == [[0, 1]] and attending.query_token_B_Q.tolist() == [[0]]
    assert running.queried_B.tolist() == [4, 2] and attending.queried_B.tolist() == [0]  # row 1: none of its own
    assert layout.owner_N.tolist() == [0, 1, 2, 3, 4, 5]  # row 2's tokens: its row (1) × Q (4) + their column
    assert layout.adapter_tokens is None and layout.adapter_predicting is None
    adapters = _layout([[5, 6], [5, 6], [7]], responses, mask, torch.float32, ["a", "b", "b"])
    assert adapters.ids_N.tolist() == [5, 6, 10, 11, 5, 6, 7, 30]  # another adapter runs the prompt again
    assert adapters.adapter_tokens == [("a", slice(0, 4)), ("b", slice(4, 8))]
    assert adapters.adapter_predicting == [("a", slice(0, 3)), ("b", slice(3, 6))]
