"""Every tensor pluribus makes is on the model's device: a check that fails on a missing `device=`, runnable on a
CPU; and, marked gpu (skipped here), SFT, GRPO and OPD steps on CUDA against the same steps on the CPU.

The check. A tensor made without a device lands on torch's default device, the CPU: on a CPU-only machine that is
always right, so a forgotten `device=` only shows on a GPU. Here such tensors land on `meta` instead while the
model stays on the CPU, and the first time one meets the model's tensors (an index, a mask, a sum, `.item()`) the
operation raises. Not `torch.set_default_device("meta")`, the obvious form of the trick: transformers refuses
`from_pretrained` under a meta default device, and its own loading makes default-device tensors (RoPE tables) that
meta breaks. So `DeviceLessOnMeta` redirects only the tensor constructors (`torch.zeros`, `torch.tensor`, ...)
called from pluribus's own source files; transformers, peft and torch make theirs as usual. Host-side tensors
(Python-built index lists, metric sums, the sampler's CPU noise) say `device="cpu"` explicitly, and pass. A block
also fails when it made a device-less tensor that never met another, and the failure names where each was made.
Not caught: a tensor that torch, transformers or peft make without a device inside a call pluribus makes.
"""

import contextlib
import json
import sys
from pathlib import Path

import pytest
import torch
from test_teachers import make_adapter, make_full
from torch.overrides import TorchFunctionMode
from torch.utils._device import _device_constructors

import pluribus
from pluribus.config import (DataConfig, EvalConfig, GRMConfig, GRPOConfig, LoraConfig, OPDConfig, OptimConfig,
                             PretrainConfig, SamplingConfig, SFTConfig, TeacherConfig, validate)
from pluribus.errors import ConfigError
from pluribus.models import load, render_prompt
from pluribus.models.lean import LeanDecoder
from pluribus.rollout import SamplingParams, sample
from pluribus.stages import evaluate, grm, grpo, opd, pretrain, sft
from pluribus.world import generate

SOURCE = str(Path(pluribus.__file__).parent) + "/"
CONSTRUCTORS = _device_constructors()


class DeviceLessOnMeta(TorchFunctionMode):
    """Tensor constructors called from pluribus's source without a device make `meta` tensors; `made` lists
    where (file:line function)."""

    def __init__(self):
        super().__init__()
        self.made: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in CONSTRUCTORS and kwargs.get("device") is None:
            caller = sys._getframe(1)  # the Python frame that called the constructor
            if caller.f_code.co_filename.startswith(SOURCE):
                kwargs["device"] = "meta"
                self.made.append(f"{caller.f_code.co_filename.removeprefix(SOURCE)}:{caller.f_lineno} "
                                 f"{func.__name__}")
        return func(*args, **kwargs)


@contextlib.contextmanager
def every_tensor_on_its_device():
    """Run the block with `DeviceLessOnMeta`; a device-less tensor fails it, naming where it was made."""
    mode = DeviceLessOnMeta()
    try:
        with mode:
            yield mode
    except Exception as e:
        if mode.made:
            raise AssertionError(f"tensors made without a device: {sorted(set(mode.made))}") from e
        raise
    assert not mode.made, f"tensors made without a device: {sorted(set(mode.made))}"


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(params=["lean", "hf"])
def forward(request, monkeypatch):
    """Both forwards: the lean ones (Llama/Qwen2, the default) and transformers' (PLURIBUS_LEAN=0)."""
    if request.param == "hf":
        monkeypatch.setenv("PLURIBUS_LEAN", "0")
    return request.param


def _steps(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_the_check_catches_a_tensor_made_without_a_device():
    code = compile("made = torch.zeros(2)\nmade + torch.ones(2, device='cpu')", SOURCE + "stages/example.py", "exec")
    with pytest.raises(AssertionError, match=r"stages/example.py:1 zeros"):
        with every_tensor_on_its_device():
            exec(code, {"torch": torch})
    named = compile("torch.zeros(2, device='cpu') + torch.ones(2, device='cpu')", SOURCE + "example.py", "exec")
    with every_tensor_on_its_device() as mode:
        exec(named, {"torch": torch})
        torch.zeros(2) + torch.ones(2)  # outside pluribus's source: left alone
    assert mode.made == []


def test_pretrain_and_sft_steps(tiny_llama, tmp_path, forward):
    with every_tensor_on_its_device():
        pretrain.run(PretrainConfig(out=str(tmp_path / "base"), size=1, domains=["add"], steps=1, batch_size=4,
                                    device="cpu"))
        sft.run(SFTConfig(model=str(tiny_llama), out=str(tmp_path / "sft"), data=DataConfig(domains=["add"]),
                          steps=1, batch_size=4, device="cpu"), records=generate("add", "train", 8))
    assert _steps(tmp_path / "sft.metrics.jsonl")[0]["loss"] > 0


def test_grpo_step_with_lora_reference_kl_and_top_p(tiny_llama, tmp_path, forward):
    cfg = GRPOConfig(model=str(tiny_llama), out=str(tmp_path / "grpo"), data=DataConfig(domains=["add"]), steps=1,
                     prompts_per_step=2, group_size=4, minibatches=2, kl_coef=0.1, lora=LoraConfig(rank=4, alpha=8),
                     sampling=SamplingConfig(max_new_tokens=6, top_p=0.9), device="cpu")
    with every_tensor_on_its_device():
        grpo.run(cfg, records=generate("add", "train", 4),
                 reward_fn=lambda records, texts, lengths: [t.count("7") / max(1, len(t)) for t in texts])
    assert _steps(tmp_path / "grpo.metrics.jsonl")[0]["skipped_updates"] == 0


def test_opd_step_with_two_lora_teachers_and_a_full_one(tiny_llama, tmp_path, forward):
    teachers = [TeacherConfig(path=str(make_adapter(tiny_llama, tmp_path / "lora-add", seed=1)), domains=["add"]),
                TeacherConfig(path=str(make_adapter(tiny_llama, tmp_path / "lora-max", seed=2)), domains=["max"]),
                TeacherConfig(path=str(make_full(tiny_llama, tmp_path / "full-sort", seed=3)), domains=["sort"])]
    cfg = OPDConfig(model=str(tiny_llama), out=str(tmp_path / "opd"), teachers=teachers, steps=1, prompts_per_step=6,
                    data=DataConfig(domains=["add", "max", "sort"], n_per_domain=4), chunk_size=8,
                    sampling=SamplingConfig(max_new_tokens=6), device="cpu")
    with every_tensor_on_its_device():
        opd.run(cfg)
    step = _steps(tmp_path / "opd.metrics.jsonl")[0]
    assert step["skipped"] == 0 and step["loss"] > 0


def test_grm_step(tiny_llama, tmp_path, forward):
    cfg = validate(GRMConfig, {
        "model": str(tiny_llama), "out": str(tmp_path / "grm"), "judge_domains": ["sort"], "n_train": 4, "steps": 1,
        "gen_prompts": 1, "judge_items": 2, "group_size": 2, "judge_k": 1, "rubric_labels": 4, "warmup_steps": 1,
        "warmup_batch_size": 2, "warmup_verifiable": 2, "eval_n": 2, "eval_pairs": 1, "kl_coef": 0.05,
        "sampling": {"max_new_tokens": 8}, "device": "cpu"}, "test")
    with every_tensor_on_its_device():
        grm.run(cfg)
    assert [row["step"] for row in _steps(tmp_path / "grm.metrics.jsonl")] == [0, 1]


def test_sampling_resumed_from_its_log_and_evaluation(tiny_llama, tmp_path, forward):
    model, tok = load(tiny_llama, trainable=False)
    prompts = [render_prompt(tok, [{"role": "user", "content": f"add {i} {i + 3}"}]) for i in range(3)]
    params = SamplingParams(8, temperature=1.0, top_p=0.9, top_k=20)
    with every_tensor_on_its_device():
        sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
               log_path=tmp_path / "log.jsonl", stop_after_steps=3)
        resumed = sample(model, prompts, params, eos_id=tok.eos_token_id, pad_id=tok.pad_token_id,
                         log_path=tmp_path / "log.jsonl")
        evaluate.run(EvalConfig(model=str(tiny_llama), domains=["add"], n=2, samples=1, max_new_tokens=6,
                                device="cpu"))
    assert resumed.keep_mask_B_T_V is not None and resumed.response_ids_B_T.device.type == "cpu"


def test_lean_decoder_prefill_steps_and_dropped_rows(tiny_llama):
    model, tok = load(tiny_llama, trainable=False)
    prompts = [render_prompt(tok, [{"role": "user", "content": text}]) for text in ("add 1 2", "max 3 1", "add 1 2")]
    with torch.no_grad(), every_tensor_on_its_device():
        decoder = LeanDecoder.build(model)
        logits = decoder.prefill(prompts, 4)
        logits = decoder.step(logits.argmax(-1))
        decoder.keep_rows(torch.tensor([2, 0], device="cpu"))
        logits = decoder.step(logits[[2, 0]].argmax(-1))
    assert logits.shape == (2, len(tok)) and torch.isfinite(logits).all()


def test_device_is_validated_in_one_line_and_left_out_of_dumps_when_default(tmp_path):
    fields = {"model": "m", "out": "o", "data": {"domains": ["add"]}}
    for bad in ("gpu", "cuda:x", "CUDA"):
        with pytest.raises(ConfigError) as err:
            validate(SFTConfig, fields | {"device": bad}, "sft.yaml")
        assert str(err.value) == f"sft.yaml: device: unknown device '{bad}' (use auto, cpu, cuda or cuda:N)"
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"^grpo.yaml: device: device cuda:1: no CUDA device on this machine"):
            validate(GRPOConfig, fields | {"device": "cuda:1"}, "grpo.yaml")
    assert "device" not in validate(SFTConfig, fields, "sft.yaml").model_dump()
    assert validate(SFTConfig, fields | {"device": "cpu"}, "sft.yaml").model_dump()["device"] == "cpu"


# --- on a GPU ---------------------------------------------------------------------------------------------------

def _first_step(run, cfg, device: str, tmp_path: Path, **kw) -> dict:
    cfg = cfg.model_copy(update={"device": device, "out": str(tmp_path / device)})
    out = run(cfg, **kw)
    load(out)  # written on any device, it loads on the CPU
    return _steps(tmp_path / f"{device}.metrics.jsonl")[0]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_sft_step_on_cuda_matches_the_cpu(tiny_llama, tmp_path):
    cfg = SFTConfig(model=str(tiny_llama), out="-", data=DataConfig(domains=["add"]), steps=1, batch_size=8)
    records = generate("add", "train", 16)
    cpu, cuda = (_first_step(sft.run, cfg, d, tmp_path, records=records) for d in ("cpu", "cuda"))
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-4)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_grpo_step_on_cuda_matches_the_cpu(tiny_llama, tmp_path):
    """The sampler's noise comes from the CPU on every device, so both sample the same tokens (up to a tie of
    perturbed logits within rounding) and the first update's loss agrees."""
    cfg = GRPOConfig(model=str(tiny_llama), out="-", data=DataConfig(domains=["add"]), steps=1, prompts_per_step=4,
                     group_size=4, kl_coef=0.1, lora=LoraConfig(rank=4, alpha=8),
                     sampling=SamplingConfig(max_new_tokens=8, top_p=0.9), optim=OptimConfig(lr=1e-3))
    records = generate("add", "train", 8)
    reward = lambda records, texts, lengths: [t.count("7") / max(1, len(t)) for t in texts]  # noqa: E731
    cpu, cuda = (_first_step(grpo.run, cfg, d, tmp_path, records=records, reward_fn=reward) for d in ("cpu", "cuda"))
    assert (cuda["response_len"], cuda["reward_mean"]) == (cpu["response_len"], cpu["reward_mean"])
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-4, abs=1e-6)
    assert cuda["kl"] == pytest.approx(cpu["kl"], rel=1e-3, abs=1e-6)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_opd_step_on_cuda_matches_the_cpu(tiny_llama, tmp_path):
    teachers = [TeacherConfig(path=str(make_adapter(tiny_llama, tmp_path / "lora-add", seed=1)), domains=["add"]),
                TeacherConfig(path=str(make_full(tiny_llama, tmp_path / "full-max", seed=2)), domains=["max"])]
    cfg = OPDConfig(model=str(tiny_llama), out="-", teachers=teachers, steps=1, prompts_per_step=8,
                    data=DataConfig(domains=["add", "max"], n_per_domain=8), sampling=SamplingConfig(max_new_tokens=8))
    cpu, cuda = (_first_step(opd.run, cfg, d, tmp_path) for d in ("cpu", "cuda"))
    assert cuda["tokens"] == cpu["tokens"]
    assert cuda["loss"] == pytest.approx(cpu["loss"], rel=1e-4)
