"""Rollouts: batched sampling with a KV cache, and a token-granular write-ahead log.

`sample` turns prompts into a `Rollout`: response token ids, the sampler's log-probs, response
masks, the top-p/top-k keep mask (DeepSeek-V3.2 keeps the sampler's truncation in training so
π_θ and π_old share one action space), finish reasons.

Randomness is per request and per position (Gumbel-max sampling, its noise drawn from the request's seed
and the position: `_GumbelNoise`), not per batch: a request samples the same tokens whatever else is in
its batch. That is what lets an interrupted batch resume from its log (DeepSeek-V4 §5.2.3) and give the
tokens an uninterrupted run would have given; regenerating interrupted requests from scratch biases towards
short answers.
The log holds tokens and log-probs, not top-p/top-k keep masks: a resumed batch rebuilds those of its
logged prefixes with one forward pass (the same masks up to a float-rounding tie at the cut-off).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import torch

from pluribus.models import (device_of, forward_keeping, pad_batch, position_ids_from_mask, response_logits,
                             set_training)
from pluribus.models.lean import DecodedLinears, LeanDecoder, PromptStates, longs


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy; top_k 0 and top_p 1 disable truncation."""

    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0


@dataclass
class Rollout:
    """A batch of sampled responses, one row per request.

    prompt_ids: token ids of each prompt (unpadded).
    response_ids_B_T: generated ids, right-padded with pad_id; includes the EOS when one was sampled.
    response_mask_B_T: 1 on generated tokens (EOS included), 0 on padding.
    sampler_logprobs_B_T: log-prob of each token under the distribution it was sampled from
        (temperature and truncation applied); 0 on padding.
    keep_mask_B_T_V: which tokens the sampler's top-p/top-k left in play at each step, or None when
        there was no truncation.
    finish_reasons: "eos" or "length" per row.
    decoded: the decode's own projections of the responses (`sample(..., record=True)`), for an update at the
        weights that sampled them; None when not asked for or not recorded.
    """

    prompt_ids: list[list[int]]
    response_ids_B_T: torch.Tensor
    response_mask_B_T: torch.Tensor
    sampler_logprobs_B_T: torch.Tensor
    keep_mask_B_T_V: torch.Tensor | None
    finish_reasons: list[str]
    texts: list[str] = field(default_factory=list)
    decoded: DecodedLinears | None = None

    @property
    def lengths(self) -> torch.Tensor:
        return self.response_mask_B_T.sum(-1)

    def sequences(self) -> list[list[int]]:
        """prompt + response ids per row, unpadded."""
        return [p + self.response_ids_B_T[i, : int(n)].tolist()
                for i, (p, n) in enumerate(zip(self.prompt_ids, self.lengths))]


def truncate_logits(logits_B_V: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Bool keep-mask `[B, V]` of the tokens top-k and nucleus top-p leave in play (always ≥ 1)."""
    keep = torch.ones_like(logits_B_V, dtype=torch.bool)
    if top_k and top_k < logits_B_V.shape[-1]:
        kth = torch.topk(logits_B_V, top_k, dim=-1).values[:, -1:]
        keep &= logits_B_V >= kth
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits_B_V.masked_fill(~keep, float("-inf")), dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # keep a token when the mass before it is < top_p: the smallest set reaching top_p
        before = probs.cumsum(-1) - probs
        keep_sorted = before < top_p
        keep &= torch.zeros_like(keep).scatter(-1, order, keep_sorted)
    return keep


# Gumbel noise is drawn for this many (position, token) pairs of a request at a time.
NOISE_BLOCK = 4096


class _GumbelNoise:
    """Gumbel noise `[B, V]` for the rows decoding now, made on the CPU.

    Request r's noise at position t is row t mod K of the `[K, V]` block drawn from a generator seeded by
    (seed_r, t div K), K = max(1, NOISE_BLOCK // V): it depends on the request alone, not on its batch nor on
    where a resumed run starts, and on no device (a GPU samples the tokens a CPU does, up to logit rounding).
    From V = NOISE_BLOCK up, K = 1: a generator seeded per (request, position), nothing kept between steps. On
    smaller vocabularies one seeding serves K positions and each request keeps its current block (at most
    NOISE_BLOCK floats): seeding a generator for each of 32 rows at each step cost ~100 µs of a ~1.6 ms decode
    step on the world's model (V = 103); blocks cost ~35 µs.
    """

    def __init__(self, seeds: Sequence[int], vocab: int):
        self.seeds, self.vocab = list(seeds), vocab
        self.per_block = max(1, NOISE_BLOCK // vocab)
        self.blocks = torch.empty(len(self.seeds) if self.per_block > 1 else 0, self.per_block, vocab,
                                  device="cpu")
        self.held = [-1] * len(self.blocks)  # which block of its request each row of `blocks` holds
        self.generator = torch.Generator()

    def _draw(self, request: int, block: int, out: torch.Tensor) -> torch.Tensor:
        self.generator.manual_seed((self.seeds[request] * 1_000_003 + block) % (2**63 - 1))
        u = torch.rand(out.shape, generator=self.generator, out=out, device="cpu")
        return u.clamp_(1e-20, 1.0).log_().neg_().log_().neg_()  # -log(-log u)

    def __call__(self, requests: Sequence[int], positions: Sequence[int]) -> torch.Tensor:
        if self.per_block == 1:
            noise = torch.empty(len(requests), self.vocab, device="cpu")
            for row, (r, t) in enumerate(zip(requests, positions)):
                self._draw(r, t, noise[row])
            return noise
        # each row's noise is a row of `blocks` seen as [requests · per_block, vocab]: one index_select takes a third
        # of the time of indexing by request and offset
        rows = []
        for r, t in zip(requests, positions):
            block, offset = divmod(t, self.per_block)
            if self.held[r] != block:
                self._draw(r, block, self.blocks[r])
                self.held[r] = block
            rows.append(r * self.per_block + offset)
        return self.blocks.view(-1, self.vocab).index_select(0, longs(rows))


class TokenLog:
    """Write-ahead log: one line per decode step with each active request's token and log-prob.

    A request's prefix is everything logged for it; `replay` rebuilds the prefixes after a crash.
    Lines are flushed as written; a torn last line (crash mid-write) is ignored on replay.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():  # drop a torn last line so new entries start on a line of their own
            data = self.path.read_bytes()
            if data and not data.endswith(b"\n"):
                with open(self.path, "r+b") as f:
                    f.truncate(data.rfind(b"\n") + 1)
        self._f = open(self.path, "a")

    def append(self, step: int, tokens: dict[int, tuple[int, float]]) -> None:
        self._f.write(json.dumps({"t": step, "tok": {str(k): v for k, v in tokens.items()}}) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    @staticmethod
    def replay(path: str | Path) -> dict[int, list[tuple[int, float]]]:
        """request index → [(token, logprob), ...] as logged."""
        prefixes: dict[int, list[tuple[int, float]]] = {}
        path = Path(path)
        if not path.is_file():
            return prefixes
        for line in path.read_text().splitlines():
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                break  # torn write at the crash point: everything before it is intact
            for k, (tok, lp) in entry["tok"].items():
                prefixes.setdefault(int(k), []).append((int(tok), float(lp)))
        return prefixes


@torch.no_grad()
def sample(model, prompt_ids: list[list[int]], params: SamplingParams, *, eos_id: int, pad_id: int,
           seed: int = 0, request_seeds: Sequence[int] | None = None, log_path: str | Path | None = None,
           stop_after_steps: int | None = None, tokenizer=None, prompts: PromptStates | None = None,
           record: bool = False) -> Rollout:
    """Sample one response per prompt with a KV cache.

    request_seeds: per-row seeds (default: seed·100003 + row); a row's tokens depend only on them.
    log_path: token-granular write-ahead log; if it already holds tokens (an interrupted run), those
        prefixes are kept and sampling continues after them.
    stop_after_steps: stop early (to simulate a crash in tests); the log keeps what was sampled.
    prompts: the prompts already run by the training forward at these weights (`prompt_states`): the lean
        decoder's prefill copies their keys and values (the same ones, computed once) instead of running them.
    record: keep the decode steps' projections of the responses (`Rollout.decoded`), so that an update at these
        weights after these `prompts` takes them instead of computing them again (the lean decoder on the native
        kernels, a rollout that resumes nothing; else None).
    """
    # Dropout off where transformers' forward runs (`_HFForward`, `_prefix_keep_mask`); the lean decoder computes
    # eval mode's logits in either mode, so with it the model's mode is left alone (a switch there and back cost
    # ~1.2 ms a step on the world's model).
    was_training = model.training
    B = len(prompt_ids)
    seeds = list(request_seeds) if request_seeds is not None else [seed * 100_003 + i for i in range(B)]
    greedy = params.temperature <= 0
    truncating = params.top_k > 0 or params.top_p < 1.0

    prefixes = TokenLog.replay(log_path) if log_path else {}
    out_tokens: list[list[int]] = [[t for t, _ in prefixes.get(i, [])] for i in range(B)]
    out_logps: list[list[float]] = [[lp for _, lp in prefixes.get(i, [])] for i in range(B)]
    keep_rows: list[list[torch.Tensor]] = [[] for _ in range(B)]
    finished = [bool(o) and (o[-1] == eos_id or len(o) >= params.max_new_tokens) for o in out_tokens]
    log = TokenLog(log_path) if log_path else None

    active = [i for i in range(B) if not finished[i]]
    decoded = None
    if active:
        # Inference mode, not only no_grad: no version counters or autograd bookkeeping on the ~30 small ops of
        # a decode step (+6-9% tokens/s on the world's model). Nothing it makes leaves the loop but Python lists,
        # the keep masks and the recorded projections, copied below into ordinary tensors.
        with torch.inference_mode():
            forward = _decode(model, prompt_ids, active, out_tokens, out_logps, keep_rows, finished, seeds, params,
                              eos_id, pad_id, greedy, truncating, log, stop_after_steps, prompts,
                              record and not prefixes)
        decoded = forward.decoded([len(out_tokens[i]) for i in active])
    if log:
        log.close()

    T = max([len(o) for o in out_tokens] + [1])
    device = device_of(model)
    response = torch.tensor([o + [pad_id] * (T - len(o)) for o in out_tokens], dtype=torch.long,
                            device=device).view(B, T)
    logps = torch.tensor([lp + [0.0] * (T - len(lp)) for lp in out_logps], device=device).view(B, T)
    mask = torch.arange(T, device=device)[None] < torch.tensor([len(o) for o in out_tokens], device=device)[:, None]
    keep = None
    if truncating:
        V = model.config.vocab_size
        keep = torch.ones((B, T, V), dtype=torch.bool, device=device)
        replayed = [i for i in range(B) if prefixes.get(i)]
        if replayed:  # the log keeps no masks: rebuilt from one forward pass over prompt + logged prefix
            keep[replayed] = _prefix_keep_mask(model, [prompt_ids[i] for i in replayed], response[replayed],
                                               [len(prefixes[i]) for i in replayed], params, pad_id)
        for i in range(B):
            if keep_rows[i]:
                rows = torch.stack(keep_rows[i])
                keep[i, len(out_tokens[i]) - len(rows): len(out_tokens[i])] = rows
    set_training(model, was_training)
    reasons = ["eos" if o and o[-1] == eos_id else "length" for o in out_tokens]
    texts = [tokenizer.decode([t for t in o if t != eos_id]) for o in out_tokens] if tokenizer else []
    return Rollout([list(p) for p in prompt_ids], response, mask, logps, keep, reasons, texts, decoded)


def _prefix_keep_mask(model, prompt_ids: list[list[int]], response_ids_B_T: torch.Tensor, prefix_lens: list[int],
                      params: SamplingParams, pad_id: int) -> torch.Tensor:
    """Keep mask `[B, T, V]` of the sampler's truncation over each row's first prefix_lens[b] response tokens
    (True beyond them), as decoding computed it, up to float rounding (prefill, not step by step)."""
    device = response_ids_B_T.device
    set_training(model, False)
    positions_B_T = torch.arange(response_ids_B_T.shape[1], device=device)[None, :] < \
        torch.tensor(prefix_lens, device=device)[:, None]
    logits = response_logits(model, prompt_ids, response_ids_B_T, positions_B_T, pad_id).float() / params.temperature
    keep = truncate_logits(logits.flatten(0, 1), params.top_k, params.top_p).view(logits.shape)
    return keep | ~positions_B_T[..., None]


class _HFForward:
    """Decoding through the model's own forward and its KV cache: any causal LM. Finished rows stay in the
    batch, fed padding and masked out."""

    def __init__(self, model, pad_id: int):
        self.model, self.pad_id = set_training(model, False), pad_id

    def prefill(self, sequences: list[list[int]], max_new_tokens: int, prompts=None, record=False) -> torch.Tensor:
        ids, self.attn = pad_batch(sequences, self.pad_id, side="left", device=device_of(self.model))
        self.position = position_ids_from_mask(self.attn)
        out = forward_keeping(self.model, 1, input_ids=ids, attention_mask=self.attn, position_ids=self.position,
                              use_cache=True)
        self.cache = out.past_key_values
        return out.logits[:, -1].float()

    def decoded(self, lengths: list[int]) -> None:
        """Transformers' forward records nothing (`_LeanForward.decoded`)."""
        return None

    def step(self, tokens_L: torch.Tensor, live: list[int]) -> torch.Tensor:
        feed = tokens_L.new_full((self.attn.shape[0],), self.pad_id)
        feed[live] = tokens_L
        alive = self.attn.new_zeros(self.attn.shape[0])
        alive[live] = 1
        self.attn = torch.cat([self.attn, alive[:, None]], dim=1)
        self.position = self.position[:, -1:] + 1
        out = self.model(input_ids=feed[:, None], attention_mask=self.attn, position_ids=self.position,
                         past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        return out.logits[live, -1].float()


class _LeanForward:
    """Decoding through `LeanDecoder` (Llama/Qwen2 family): the same logits without transformers' per-call
    overhead; once an eighth of its rows have finished, they leave the cache."""

    def __init__(self, decoder: LeanDecoder, pad_id: int):
        self.decoder, self.pad_id = decoder, pad_id

    def prefill(self, sequences: list[list[int]], max_new_tokens: int,
                prompts: PromptStates | None = None, record: bool = False) -> torch.Tensor:
        self.rows = list(range(len(sequences)))  # the cache's rows, as indices of the prefilled sequences
        logits = self.decoder.prefill(sequences, max_new_tokens, prompts)
        # each step's first recorded row and the sequence in each of its slots (`decoded`)
        self.steps: list[tuple[int, list[int]]] | None = \
            [] if record and self.decoder.record(len(sequences) * max_new_tokens) else None
        return logits

    def decoded(self, lengths: list[int]) -> DecodedLinears | None:
        """The recorded projections of each prefilled sequence's fed tokens (`lengths[s]` sampled, all but the
        last fed), sequence by sequence (`LeanDecoder.decoded_linears`); step k fed each live row's token k."""
        if self.steps is None:
            return None
        slots = [{row: first + slot for slot, row in enumerate(rows)} for first, rows in self.steps]
        return self.decoder.decoded_linears(longs(slots[k][s] for s, n in enumerate(lengths) for k in range(n - 1)))

    def step(self, tokens_L: torch.Tensor, live: list[int]) -> torch.Tensor:
        if len(live) <= 0.875 * len(self.rows):
            slot = {row: s for s, row in enumerate(self.rows)}
            self.decoder.keep_rows(torch.tensor([slot[row] for row in live], device=tokens_L.device))
            self.rows = list(live)
        if self.steps is not None:
            self.steps.append((self.decoder.recorded_rows, self.rows))
        if len(live) == len(self.rows):
            return self.decoder.step(tokens_L)
        slot = {row: s for s, row in enumerate(self.rows)}
        slots = [slot[row] for row in live]
        feed = tokens_L.new_full((len(self.rows),), self.pad_id)
        feed[slots] = tokens_L
        return self.decoder.step(feed)[slots]


def _forward_engine(model, pad_id: int):
    decoder = LeanDecoder.build(model)
    return _HFForward(model, pad_id) if decoder is None else _LeanForward(decoder, pad_id)


def _decode(model, prompt_ids, active, out_tokens, out_logps, keep_rows, finished, seeds, params,
            eos_id, pad_id, greedy, truncating, log, stop_after_steps, prompts=None, record=False):
    """The decode loop over the unfinished rows; fills the per-row output lists in place. Returns its forward."""
    forward = _forward_engine(model, pad_id)
    logits = forward.prefill([prompt_ids[i] + out_tokens[i] for i in active],
                             params.max_new_tokens - min(len(out_tokens[i]) for i in active), prompts, record)
    live = list(range(len(active)))  # positions in `active` still decoding: the rows of `logits`
    noise = None if greedy else _GumbelNoise(seeds, logits.shape[-1])
    steps = 0
    while True:
        rows = [active[j] for j in live]
        if greedy:
            logp = torch.log_softmax(logits, -1)
            tok = logp.argmax(-1)
            keep = None
        else:
            scaled = logits / params.temperature
            keep = truncate_logits(scaled, params.top_k, params.top_p) if truncating else None
            if keep is not None:
                scaled = scaled.masked_fill(~keep, float("-inf"))
            logp = torch.log_softmax(scaled, -1)
            tok = (logp + noise(rows, [len(out_tokens[i]) for i in rows]).to(logp.device)).argmax(-1)
        chosen_logp = logp.gather(-1, tok[:, None]).squeeze(-1)
        tokens, logps = tok.tolist(), chosen_logp.tolist()
        logged = {}
        going_on = []  # positions in `live` of the rows that continue
        for k, i in enumerate(rows):
            out_tokens[i].append(tokens[k])
            out_logps[i].append(logps[k])
            if keep is not None:
                keep_rows[i].append(keep[k])
            logged[i] = (tokens[k], logps[k])
            if tokens[k] == eos_id or len(out_tokens[i]) >= params.max_new_tokens:
                finished[i] = True
            else:
                going_on.append(k)
        if log is not None and logged:
            log.append(steps, logged)
        steps += 1
        if not going_on or (stop_after_steps is not None and steps >= stop_after_steps):
            return forward
        live = [live[k] for k in going_on]
        logits = forward.step(tok[going_on], live)
