"""Last-layer hidden states at the response positions, and the output head that turns them into logits.

OPD never needs a model's `[B, T, V]` logits: it needs the final-norm hidden states `[N, D]` at the
N response positions and the head `[V, D]`, and rebuilds logits a chunk of positions at a time in
`pluribus.core.reverse_kl_chunked`. The hidden states come from the model's decoder (its trunk up to
and including the final norm), so the head's matmul is never run on the whole batch. For Llama and
Qwen2 in transformers 5.x this equals `output_hidden_states=True` → `hidden_states[-1]` (verified in
tests/test_teachers.py); calling the decoder avoids computing the logits at all.

A model whose logits are not `head(h)` (logit scaling, soft-capping) cannot be rebuilt this way:
`check_head_reproduces_logits` refuses it before training starts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from pluribus.errors import PluribusError
from pluribus.models import device_of, prompt_response_batch
from pluribus.models.lean import predicting_hidden_states


def _causal_lm(model):
    """The HF causal LM under a peft wrapper (LoRA layers stay injected in its modules)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def output_head(model) -> tuple[Tensor, Tensor | None]:
    """(weight `[V, D]`, bias `[V]` or None) of the model's output head, as the model holds them (no copy)."""
    head = _causal_lm(model).get_output_embeddings()
    if head is None or not isinstance(getattr(head, "weight", None), Tensor):
        raise PluribusError(f"{type(_causal_lm(model)).__name__}: no linear output head to rebuild logits from")
    return head.weight, getattr(head, "bias", None)


def response_hidden_states(model, prompt_ids: list[list[int]], response_ids_B_T: Tensor,
                           response_mask_B_T: Tensor, pad_id: int, trunk=None, prompts=None, decoded=None) -> Tensor:
    """Final-norm hidden states `[N, D]` at the positions predicting the N masked response tokens.

    Responses are right-padded (as `Rollout` holds them). Rows come sample by sample, each sample's
    tokens in order: row n predicts the n-th True of `response_mask_B_T` in row-major order.
    Gradient flows when called with grad enabled.
    trunk: what runs the decoder, `(input_ids, attention_mask, position_ids) -> [B, L, D]`, when it is not
    the model's own (a data-parallel wrapper's forward, `pluribus.dist.trunk_forward`).
    prompts: the prompts already run at these weights (`pluribus.models.lean.PromptStates`): the lean forward then
    runs the responses only (unused where it does not apply).
    decoded: with `prompts`, the rollout's own projections of the responses (`Rollout.decoded`, same weights): the
    lean forward takes their values instead of computing them.
    """
    if trunk is None:  # the lean forward: each distinct token once, no padding (None where it does not apply)
        hidden_N_D = predicting_hidden_states(model, prompt_ids, response_ids_B_T, response_mask_B_T,
                                              prompts=prompts, decoded=decoded)
        if hidden_N_D is not None:
            return hidden_N_D
    mask_B_T = response_mask_B_T.bool()
    T = int(mask_B_T.sum(-1).max()) if mask_B_T.numel() else 0
    response_ids_B_T, mask_B_T = response_ids_B_T[:, :T], mask_B_T[:, :T]
    ids_B_L, attn_B_L, pos_B_L, P = prompt_response_batch(prompt_ids, response_ids_B_T, mask_B_T, pad_id)
    device = device_of(model)
    # The last response token predicts nothing we score, and later columns never change earlier ones.
    ids_B_L, attn_B_L, pos_B_L = (x[:, :-1].to(device) for x in (ids_B_L, attn_B_L, pos_B_L))
    if trunk is None:
        decoder = _causal_lm(model).get_decoder()
        hidden_B_L_D = decoder(input_ids=ids_B_L, attention_mask=attn_B_L, position_ids=pos_B_L,
                               use_cache=False).last_hidden_state
    else:
        hidden_B_L_D = trunk(input_ids=ids_B_L, attention_mask=attn_B_L, position_ids=pos_B_L)
    return hidden_B_L_D[:, P - 1:][mask_B_T.to(device)]


def check_head_reproduces_logits(model, name: str, vocab_size: int | None = None) -> None:
    """Refuse (one line) a model whose logits are not its head applied to its decoder's output, or
    whose head has another number of rows than `vocab_size`."""
    weight_V_D, bias_V = output_head(model)
    if vocab_size is not None and weight_V_D.shape[0] != vocab_size:
        raise PluribusError(f"{name}: output head has {weight_V_D.shape[0]} rows, the student's {vocab_size}; "
                            "distillation over the full vocabulary needs one vocabulary")
    ids = torch.arange(1, 9, device=weight_V_D.device)[None] % weight_V_D.shape[0]
    was_training = model.training
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=ids).logits.float()
        hidden = _causal_lm(model).get_decoder()(input_ids=ids).last_hidden_state
        rebuilt = torch.nn.functional.linear(hidden, weight_V_D, bias_V).float()
    model.train(was_training)
    if not torch.allclose(rebuilt, logits, rtol=1e-3, atol=1e-3 * float(logits.abs().max().clamp_min(1))):
        raise PluribusError(f"{name}: its logits are not its output head applied to its last hidden states "
                            "(logit scaling or soft-capping?); OPD cannot rebuild them chunk by chunk")
