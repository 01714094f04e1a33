"""Rollout engines: what generates a training loop's rollouts, behind one small interface.

An engine turns prompts into a `Rollout` (`generate`) and takes the trainer's weights between steps
(`sync_weights`). Two ship:

- `HFEngine` (the default): the trainer's own model generates (`pluribus.rollout.sample`). Weights are
  shared, so a sync only records which model object to use.
- `VLLMEngine` (`pluribus.rollout.vllm_engine`, extra `pluribus[vllm]`): a vLLM engine in the same
  process, loaded from the model folder and sent the trainer's weights (LoRA folded in) before each
  rollout. Imported only when chosen: pluribus imports and runs without vllm.

A loop calls `sync_weights(model)` before every rollout, so the engine samples from the weights the
next update starts from (and a loop resumed from a checkpoint syncs the restored weights).
"""

from __future__ import annotations

from pathlib import Path
from typing import Protocol, Sequence

from pluribus.errors import PluribusError
from pluribus.rollout import Rollout, SamplingParams, sample

ENGINES = ("hf", "vllm")


class RolloutEngine(Protocol):
    """What a training loop needs of a rollout engine."""

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
                 request_seeds: Sequence[int], tokenizer=None, log_path: str | Path | None = None,
                 stop_after_steps: int | None = None, prompts=None, record: bool = False) -> Rollout:
        """One response per prompt, with the sampler's log-probs (see `Rollout`); a row's tokens depend on its
        prompt, the weights and its request seed only. log_path: the token log to resume from and write.
        prompts: the prompts' `pluribus.models.lean.PromptStates` at these weights, if the loop has them (an
        engine may use them in place of running the prompts, or ignore them). record: keep the decode's
        projections of the responses in `Rollout.decoded` where the engine can (else it leaves it None)."""
        ...

    def sync_weights(self, model) -> None:
        """Make the engine sample from `model`'s current weights."""
        ...

    def close(self) -> None:
        """Free what the engine holds."""
        ...


class HFEngine:
    """The trainer's model generates, with a KV cache (`pluribus.rollout.sample`): no copy, nothing to sync."""

    def __init__(self, model) -> None:
        self.model = model

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
                 request_seeds: Sequence[int], tokenizer=None, log_path: str | Path | None = None,
                 stop_after_steps: int | None = None, prompts=None, record: bool = False) -> Rollout:
        return sample(self.model, prompt_ids, params, eos_id=eos_id, pad_id=pad_id, request_seeds=request_seeds,
                      tokenizer=tokenizer, log_path=log_path, stop_after_steps=stop_after_steps, prompts=prompts,
                      record=record)

    def sync_weights(self, model) -> None:
        self.model = model

    def close(self) -> None:
        pass


def open_engine(engine: str, model, model_path: str | Path, **vllm_options) -> RolloutEngine:
    """The named engine for `model` (not yet synced: a loop syncs before each rollout). A vllm engine loads
    `model_path` (a LoRA adapter's base) and takes `vllm_options` (see `VLLMEngine`); hf ignores them."""
    if engine == "hf":
        return HFEngine(model)
    if engine == "vllm":
        from pluribus.rollout.vllm_engine import VLLMEngine

        return VLLMEngine(model_path, **vllm_options)
    raise PluribusError(f"unknown rollout engine {engine!r} (known: {', '.join(ENGINES)})")
