"""The rollout engine interface: the HF engine is `sample` itself, configs choose an engine in one validated
field left out of their dumps by default, and a trainer's weights reach an engine with LoRA folded in.
The vLLM engine itself is tested for real by `make test-vllm` (tests/vllm_engine/)."""

import copy

import pytest
import torch

from pluribus.config import GRPOConfig, OPDConfig, RolloutConfig, validate
from pluribus.errors import ConfigError, PluribusError
from pluribus.models import add_lora, load, render_prompt
from pluribus.models.weights import base_model_path, full_weights
from pluribus.rollout import SamplingParams, sample
from pluribus.rollout.engine import HFEngine, open_engine
from pluribus.rollout.vllm_engine import vllm_installed


def test_the_hf_engine_samples_what_sample_samples(tiny_llama, one_thread):
    model, tok = load(tiny_llama, trainable=False)
    prompts = [render_prompt(tok, [{"role": "user", "content": f"add {i} 5"}]) for i in range(4)]
    params = SamplingParams(8, temperature=0.9, top_p=0.9)
    seeds = [11, 12, 13, 14]
    engine = open_engine("hf", model, tiny_llama)
    assert isinstance(engine, HFEngine)
    engine.sync_weights(model)
    got = engine.generate(prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, request_seeds=seeds)
    want = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, request_seeds=seeds)
    assert torch.equal(got.response_ids_B_T, want.response_ids_B_T)
    assert torch.equal(got.sampler_logprobs_B_T, want.sampler_logprobs_B_T)
    assert torch.equal(got.keep_mask_B_T_V, want.keep_mask_B_T_V)


def test_an_unknown_engine_is_one_clear_error(tiny_llama):
    with pytest.raises(PluribusError, match="unknown rollout engine 'sglang'"):
        open_engine("sglang", None, tiny_llama)


def test_the_default_engine_is_left_out_of_config_dumps():
    # stage and checkpoint keys are fingerprints of these dumps: runs from before the field existed keep theirs
    base = {"model": "m", "out": "o", "data": {"domains": ["add"]}}
    assert "rollout" not in validate(GRPOConfig, base, "x").model_dump()
    opd = {"model": "m", "out": "o", "data": {"domains": ["add"]}, "teachers": [{"path": "t", "domains": ["add"]}]}
    assert "rollout" not in validate(OPDConfig, opd, "x").model_dump()
    assert RolloutConfig().vllm_options() == {"dtype": "float32", "gpu_memory_utilization": 0.5, "kv_cache_mb": None,
                                              "max_model_len": None}


@pytest.mark.skipif(vllm_installed(), reason="vllm is installed here")
def test_a_missing_vllm_is_one_line_naming_the_install():
    base = {"model": "m", "out": "o", "data": {"domains": ["add"]}, "rollout": {"engine": "vllm"}}
    with pytest.raises(ConfigError) as err:
        validate(GRPOConfig, base, "run.yaml", "experts.grpo")
    message = str(err.value)
    assert message.startswith("run.yaml: experts.grpo.rollout.engine: rollout engine vllm: the vllm package is not "
                              "installed") and "pip install 'pluribus[vllm]'" in message and "\n" not in message
    from pluribus.rollout.vllm_engine import VLLMEngine

    with pytest.raises(PluribusError, match="vllm package is not installed"):
        VLLMEngine("anywhere")


def test_full_weights_fold_the_adapter_in_and_leave_the_model_alone(tiny_llama, one_thread):
    model, _ = load(tiny_llama)
    model = add_lora(model, rank=4, alpha=8)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)  # B starts at 0: make the adapter do something
    before = {k: v.clone() for k, v in model.state_dict().items()}
    weights = full_weights(model)
    merged = copy.deepcopy(model).merge_and_unload().state_dict()
    assert set(weights) == set(merged)
    assert max((weights[k] - merged[k]).abs().max().item() for k in merged) < 1e-6
    original = load(tiny_llama)[0].state_dict()
    assert all((weights[k] - original[k]).abs().max() > 1e-3 for k in weights if "q_proj" in k)  # folded in
    assert torch.equal(weights["model.norm.weight"], original["model.norm.weight"])
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert base_model_path(tiny_llama) == tiny_llama
