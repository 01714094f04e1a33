"""Models: tokenizer round-trip, save/load with identical logits (Llama and Qwen2), LoRA, rendering."""

import pytest
import torch

from pluribus.errors import PluribusError
from pluribus.models import (add_lora, count_parameters, expand_depth, load, render_example, render_prompt,
                             response_logprobs, save, token_logprobs)
from pluribus.models.tokenizer import CHARS, build_char_tokenizer

TEXT = "add 12 345 -> Hello, World! f=lambda x:x*x+1 ~`{}[]"


def test_char_tokenizer_is_one_token_per_character():
    tok = build_char_tokenizer()
    ids = tok(TEXT, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(set(tok(c, add_special_tokens=False)["input_ids"][0] for c in CHARS)) == len(CHARS)
    assert tok.eos_token == "<|eos|>" and tok.pad_token == "<|pad|>" and tok.eos_token_id != tok.pad_token_id


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_tokenizer_round_trip_after_reload(fixture, request):
    path = request.getfixturevalue(fixture)
    _, tok = load(path)
    ref = build_char_tokenizer()
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ref(TEXT, add_special_tokens=False)["input_ids"]
    messages = [{"role": "user", "content": "reverse abc"}]
    assert render_prompt(tok, messages) == render_prompt(ref, messages)
    assert tok.decode(render_prompt(tok, messages)) == "<|user|>reverse abc<|assistant|>"
    assert tok.eos_token_id == ref.eos_token_id and tok.pad_token_id == ref.pad_token_id


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_save_load_gives_identical_logits(fixture, request, tmp_path):
    from transformers import AutoModelForCausalLM

    model, tok = load(request.getfixturevalue(fixture))
    with torch.no_grad():
        for p in model.parameters():  # move off the init so a load that re-initialises would show
            p.add_(0.01 * torch.randn_like(p))
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "max 12 99 31"}])])
    model.eval()
    before = model(input_ids=ids).logits
    save(model, tok, tmp_path / "saved")
    again, _ = load(tmp_path / "saved", trainable=False)
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "saved", local_files_only=True)  # the HF way
    assert torch.equal(before, again(input_ids=ids).logits)
    assert torch.equal(before, plain.eval()(input_ids=ids).logits)


def test_lora_adapter_saves_and_reloads_over_its_base(tiny_llama, tmp_path):
    model, tok = load(tiny_llama)
    model = add_lora(model, rank=4, alpha=8)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.add_(0.05)
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "sort 3 1 2"}])])
    model.eval()
    before = model(input_ids=ids).logits
    save(model, tok, tmp_path / "adapter")
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    again, _ = load(tmp_path / "adapter", trainable=False)
    assert torch.allclose(before, again(input_ids=ids).logits, atol=1e-6)
    base, _ = load(tiny_llama, trainable=False)
    assert not torch.allclose(before, base(input_ids=ids).logits, atol=1e-4)  # the adapter does something


def test_render_example_masks_the_prompt_and_ends_with_eos(tiny_llama):
    _, tok = load(tiny_llama)
    ids, n_prompt = render_example(tok, [{"role": "user", "content": "add 1 2"}], "3")
    assert tok.decode(ids[:n_prompt]) == "<|user|>add 1 2<|assistant|>"
    assert ids[n_prompt:] == [tok.convert_tokens_to_ids("3"), tok.eos_token_id]
    full = tok.apply_chat_template([{"role": "user", "content": "add 1 2"}, {"role": "assistant", "content": "3"}],
                                   tokenize=False)
    assert tok(full, add_special_tokens=False)["input_ids"] == ids  # template and generation agree


def test_response_logprobs_match_a_plain_forward(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    prompts = [render_prompt(tok, [{"role": "user", "content": c}]) for c in ("add 1 2", "reverse abcdef")]
    responses = [[10, 11, 12], [13, 2]]
    resp = torch.tensor([[10, 11, 12], [13, 2, 0]])
    mask = torch.tensor([[True, True, True], [True, True, False]])
    lp, _ = response_logprobs(model, prompts, resp, mask, tok.pad_token_id)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids = torch.tensor([p + r])
        ref = token_logprobs(model(input_ids=ids).logits, ids)[0, len(p) - 1:]
        assert torch.allclose(lp[i, : len(r)], ref, atol=1e-5)


def test_missing_model_folder_is_one_clear_error(tmp_path):
    with pytest.raises(PluribusError, match="model folder not found"):
        load(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PluribusError, match="not a model folder"):
        load(tmp_path / "empty")


def test_forward_keeping_cuts_the_logits_of_any_causal_lm(tiny_llama):
    """transformers' models skip the head before the last `keep` positions; a forward that does not take
    `logits_to_keep` (a user's model) computes them all and gets the same last `keep` rows."""
    from pluribus.models import forward_keeping

    model, _ = load(tiny_llama, trainable=False)
    ids = torch.tensor([[5, 6, 7, 8, 9], [9, 8, 7, 6, 5]])
    full = model(input_ids=ids).logits

    class Plain(torch.nn.Module):  # the forward of a model with no logits_to_keep and no **kwargs
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids):
            return self.inner(input_ids=input_ids)

    for m in (model, Plain()):
        out = forward_keeping(m, 2, input_ids=ids)
        assert out.logits.shape == (2, 2, full.shape[-1])
        torch.testing.assert_close(out.logits, full[:, -2:], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_qwen2"])
def test_expand_depth_computes_the_same_logits_and_trains_its_copies(fixture, request, tmp_path):
    small, tok = load(request.getfixturevalue(fixture))
    with torch.no_grad():
        for p in small.parameters():  # off the init: zeroed copies must not be mistaken for untouched layers
            p.add_(0.01 * torch.randn_like(p))
    grown, _ = load(request.getfixturevalue(fixture))
    grown.load_state_dict(small.state_dict())
    layer = sum(p.numel() for p in small.model.layers[0].parameters())
    expand_depth(grown, copies=2)
    assert len(grown.model.layers) == grown.config.num_hidden_layers == 3 * len(small.model.layers)
    assert count_parameters(grown) == count_parameters(small) + 2 * len(small.model.layers) * layer
    assert [block.self_attn.layer_idx for block in grown.model.layers] == list(range(len(grown.model.layers)))
    prompts = [render_prompt(tok, [{"role": "user", "content": "sort 3 1 2"}])]
    response = torch.tensor([tok("1 2 3", add_special_tokens=False)["input_ids"]])
    ids = torch.tensor([prompts[0] + response[0].tolist()])
    small.eval(), grown.eval()
    assert torch.equal(small(input_ids=ids).logits, grown(input_ids=ids).logits)
    mask = torch.ones_like(response)
    with torch.no_grad():  # the packed forward (pluribus.models.lean) runs the grown layers too
        lean_small = response_logprobs(small, prompts, response, mask, tok.pad_token_id)[0]
        lean_grown = response_logprobs(grown, prompts, response, mask, tok.pad_token_id)[0]
    assert torch.allclose(lean_small, lean_grown, atol=1e-6, rtol=0)
    save(grown, tok, tmp_path / "grown")
    again, _ = load(tmp_path / "grown")
    assert len(again.model.layers) == 3 * len(small.model.layers)
    assert torch.equal(again.eval()(input_ids=ids).logits, grown(input_ids=ids).logits)
    again.train()
    again(input_ids=ids, labels=ids).loss.backward()
    copy = again.model.layers[1]  # the first layer's first copy: zero outputs, live gradients
    assert float(copy.self_attn.o_proj.weight.abs().max()) == 0.0
    assert float(copy.self_attn.o_proj.weight.grad.abs().max()) > 0 and float(copy.mlp.down_proj.weight.grad.abs().max()) > 0
    with pytest.raises(PluribusError, match="copies must be"):
        expand_depth(grown, copies=0)


def test_the_tiny_preset_takes_an_init_std_and_keeps_transformers_default_without_one(tmp_path):
    """`init_std` sets the random init's spread (weights and embeddings); None keeps transformers' 0.02, and an
    old pretraining stage's key (its config dump) holds when the field is left out."""
    from pluribus.config import PretrainConfig
    from pluribus.models import build_tiny

    default, _ = load(build_tiny(tmp_path / "default", size=2, seed=0))
    wide, _ = load(build_tiny(tmp_path / "wide", size=2, seed=0, init_std=0.088))
    for model, std in ((default, 0.02), (wide, 0.088)):
        for weight in (model.model.layers[0].self_attn.q_proj.weight, model.model.layers[3].mlp.down_proj.weight,
                       model.model.embed_tokens.weight):
            assert abs(weight.std().item() - std) < 0.05 * std
    assert "init_std" not in PretrainConfig(out="x").model_dump()
    assert PretrainConfig(out="x", init_std=0.088).model_dump()["init_std"] == 0.088
    with pytest.raises(ValueError):
        PretrainConfig(out="x", init_std=0)


def test_the_pretraining_stage_starts_from_its_configured_init_std(tmp_path):
    """`pretrain.init_std` reaches the random init the stage trains from (its `.init` folder)."""
    import json

    from pluribus.config import PretrainConfig
    from pluribus.stages import pretrain

    out = tmp_path / "base"
    pretrain.run(PretrainConfig(out=str(out), size=1, domains=["add"], steps=1, batch_size=4, init_std=0.3))
    init_dir = out.with_name(out.name + ".init")
    assert json.loads((init_dir / "config.json").read_text())["initializer_range"] == 0.3
    init, _ = load(init_dir)
    assert abs(init.model.layers[0].mlp.up_proj.weight.std().item() - 0.3) < 0.015
