"""GRPO, DeepSeek-V3.2 style: G samples per prompt, rewards from the router, μ updates per batch.

One step: sample prompts → G rollouts each (KV cache, sampler log-probs and keep mask) → rewards
→ group advantages → (reference log-probs if kl_coef > 0) → μ passes of minibatch updates of
`pluribus.core.grpo_loss`. π_old is the sampler's own distribution (temperature and top-p/top-k
applied), and π_θ is computed over the same truncated action space. A step whose gradient is not
finite is skipped and logged, never applied.

The reference model is the starting weights: with LoRA, the same model with the adapter disabled
(no second copy); with full weights, a frozen copy.

Under torchrun (`pluribus.dist`) each process samples, rewards and trains on its slice of the prompts
(whole groups, so advantages need nothing from other ranks); a minibatch is the same set of rollouts as
with one process (one permutation of the global batch, rank 0's), each rank holding its part, and the
loss is normalised by the minibatch's global token (or sequence) count. Metrics cover the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import random
import time
from pathlib import Path
from typing import Callable

import torch

from pluribus import dist
from pluribus.config import EvalConfig, GRPOConfig, PolicyUpdateConfig
from pluribus.core import group_advantages, grpo_loss
from pluribus.data import Record
from pluribus.models import add_lora, load, render_prompt, response_logprobs, save, set_training
from pluribus.rewards.length import LengthPenalty
from pluribus.rollout import SamplingParams
from pluribus.rollout.engine import open_engine
from pluribus.stages.checkpoint import Checkpointer
from pluribus.stages.common import (MetricsLog, load_records, make_optimizer, optimizer_step, progress,
                                    seed_everything)

RewardFn = Callable[[list[Record], list[str], list[int]], list[float | None]]


def default_reward(cfg: GRPOConfig) -> RewardFn:
    """The router's rewards (world checkers, and `cfg.data.rewards` for JSONL domains), with the overlong penalty
    when configured."""
    from pluribus.rewards.router import RewardRouter

    penalty = LengthPenalty(cfg.max_len_penalty_tokens, cfg.len_penalty_cache_tokens) \
        if cfg.max_len_penalty_tokens else None
    router = RewardRouter(cfg.data.rewards, length_penalty=penalty)
    return lambda records, texts, lengths: router.score(records, texts, lengths if penalty else None)


def reference_policy(model, lora: bool, distributed: str = "ddp"):
    """A context manager under which `model` computes the reference policy (take it before `dist.wrap`;
    under fsdp2 the frozen copy is sharded too)."""
    if lora:
        return model.disable_adapter
    frozen = copy.deepcopy(model).eval()
    for p in frozen.parameters():
        p.requires_grad_(False)
    frozen = dist.wrap(frozen, distributed, frozen=True)
    return lambda: contextlib.nullcontext(frozen)


def run(cfg: GRPOConfig, records: list[Record] | None = None, reward_fn: RewardFn | None = None,
        meta: dict | None = None, eval_records: list[Record] | None = None) -> Path:
    world = dist.init(cfg.device)
    world.per_rank(cfg.prompts_per_step, "grpo prompts_per_step")
    seed_everything(cfg.seed)
    model, tokenizer = load(cfg.model, device=world.device)
    if cfg.lora is not None and not hasattr(model, "disable_adapter"):  # a saved adapter keeps training
        model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    lora = hasattr(model, "disable_adapter")
    reference = reference_policy(model, lora, cfg.distributed) if cfg.kl_coef > 0 else None
    trainer = dist.wrap(model, cfg.distributed)
    records = records if records is not None else load_records(cfg.data)
    reward_fn = reward_fn or default_reward(cfg)
    prompts = {r.id: render_prompt(tokenizer, r.messages()) for r in records}
    params = SamplingParams(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p,
                            cfg.sampling.top_k)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.steps * cfg.inner_updates * cfg.minibatches)
    out = Path(cfg.out)
    ckpt = Checkpointer(out, every=cfg.checkpoint_every, total=cfg.steps, config=cfg.model_dump(), records=records,
                        model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)
    first, state = ckpt.restore({"rng": random.Random(cfg.seed)})
    rng = state["rng"]
    metrics = MetricsLog(out.with_name(out.name + ".metrics.jsonl"), first)
    engine = open_engine(cfg.rollout.engine, model, cfg.model, seed=cfg.seed, **cfg.rollout.vllm_options())
    bar, task = progress("grpo", cfg.steps, first)
    G = cfg.group_size
    with bar:
        for step in range(first, cfg.steps):
            t0 = time.time()
            batch = rng.sample(records, min(cfg.prompts_per_step, len(records)))
            rows = [r for r in world.shard(batch, "prompts this step") for _ in range(G)]
            engine.sync_weights(model)
            dist.unshard(model)  # fsdp2: whole weights while the HF sampler runs
            rollout = ckpt.sample(step, model, [prompts[r.id] for r in rows], params, eos_id=tokenizer.eos_token_id,
                                  pad_id=tokenizer.pad_token_id, tokenizer=tokenizer, engine=engine,
                                  request_seeds=[(cfg.seed * 1_000_003 + step) * 4096 + world.rank * len(rows) + i
                                                 for i in range(len(rows))])
            dist.reshard(model)
            t_sample = time.time() - t0
            lengths = rollout.lengths.tolist()
            raw = reward_fn(rows, rollout.texts, lengths)
            rewards, valid, stats = policy_step(trainer, cfg, rollout, raw, reference, optimizer, scheduler,
                                                tokenizer.pad_token_id)
            if world.size > 1:  # the metrics describe the global batch
                rewards, valid = dist.all_gather_rows(rewards), dist.all_gather_rows(valid)
                lengths = dist.all_gather_rows(rollout.lengths).tolist()
            elapsed = time.time() - t0
            solved = rewards[valid] >= 1.0
            record = dict(step=step, reward_mean=float(rewards[valid].mean()) if valid.any() else 0.0,
                          reward_std=float(rewards[valid].std()) if valid.sum() > 1 else 0.0,
                          pass_rate=float(solved.float().mean()) if valid.any() else 0.0,
                          invalid_frac=float((~valid).float().mean()),
                          response_len=sum(lengths) / len(lengths), lr=scheduler.get_last_lr()[0],
                          tokens_per_s=sum(lengths) / max(t_sample, 1e-9), step_s=elapsed, **stats)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0 and eval_records:
                with dist.gathered(model):
                    record["eval_pass1"] = greedy_pass1(model, tokenizer, eval_records, cfg.sampling.max_new_tokens)
            metrics.write(**record)
            bar.update(task, advance=1, info=f"reward {record['reward_mean']:.2f}")
            ckpt.step_done(step, {"rng": rng})
    metrics.close()
    engine.close()
    model.eval()
    return dist.save(model, tokenizer, out, {"stage": "grpo", **(meta or {}), "config": cfg.model_dump()})


def policy_step(model, cfg: PolicyUpdateConfig, rollout, raw_N: list[float | None], reference, optimizer,
                scheduler, pad_id: int, rows_N: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """One GRPO update from a rollout batch and its rewards: group advantages, then μ passes of minibatches.

    `model` is what the loss runs through: the model, or its `pluribus.dist.wrap` under torchrun, where
    `rollout` and `raw_N` are this rank's whole groups and the update is that of the global batch.
    rows_N: each row's index in the global batch (every rank holds the same number of rows), which fixes the
    minibatches; None: this rank's contiguous block (rank r holds rows [r·N, (r+1)·N)).

    Rows `[g·G, (g+1)·G)` form group g (G = cfg.group_size). A None reward is invalid: masked out of its
    group's advantage, never read as 0. GRPO's update, and the joint generate-and-judge loop's
    (`pluribus.stages.grm`).
    Returns (rewards_N with NaN where invalid, valid_N, averaged update stats).
    """
    device = rollout.response_mask_B_T.device
    valid_N = torch.tensor([r is not None for r in raw_N], device=device)
    rewards_N = torch.tensor([float("nan") if r is None else float(r) for r in raw_N], device=device)
    adv_N = group_advantages(rewards_N, cfg.group_size, scale=cfg.advantage_scale, valid_N=valid_N)
    return rewards_N, valid_N, _update(model, cfg, rollout, adv_N, reference, optimizer, scheduler, pad_id, rows_N)


def _update(model, cfg: PolicyUpdateConfig, rollout, adv_N, reference, optimizer, scheduler, pad_id,
            rows_N: torch.Tensor | None = None) -> dict:
    """μ passes of minibatch updates on one rollout batch; returns averaged stats.

    A minibatch is a slice of one permutation of the global batch (rank 0's draw); each rank trains on
    the rows of it that it holds (`rows_N` places them), its loss scaled to its share of the minibatch's
    global normaliser. A rank that holds none of a minibatch still runs it with a zero mask, so the
    gradient all-reduce meets every rank.

    Rows whose advantage is exactly 0 (a group whose rewards are all equal, an invalid reward) carry no
    gradient when nothing but the policy term is in the loss (kl_coef = 0): with `skip_zero_advantage` they
    count in the normaliser but get no forward or backward, and a minibatch with no other row gets a zero
    gradient and its AdamW step (momentum and weight decay act as they would). The update is the same, to
    float rounding; `clip_frac`, `kl`, `entropy` and `masked_seq_frac` describe the rows trained.
    """
    world = dist.world()
    N = adv_N.shape[0]
    # Row bookkeeping on the host: the permutation comes from the CPU generator, as on every device (the same
    # minibatches on a GPU), and picks rows of the batch tensors once moved to their device.
    local = torch.full((N * world.size,), -1, dtype=torch.long, device="cpu")  # global row -> this rank's, or -1
    mine = torch.arange(N, device="cpu")
    local[mine + world.rank * N if rows_N is None else rows_N] = mine
    mask = rollout.response_mask_B_T
    zero = (adv_N == 0).tolist()
    skipping = cfg.skip_zero_advantage and cfg.kl_coef == 0
    signal = [not z for z in zero] if skipping else [True] * N
    by_tokens = cfg.aggregation == "token_mean"
    counts = (mask.sum(-1) if by_tokens else (mask.sum(-1) > 0)).tolist()  # each row's share of the normaliser
    ref_logprobs = None
    if reference is not None:
        with torch.no_grad(), reference() as ref_model:
            ref_logprobs, _ = response_logprobs(ref_model or model, rollout.prompt_ids, rollout.response_ids_B_T,
                                                mask, pad_id, cfg.sampling.temperature, rollout.keep_mask_B_T_V)
    sums = {"loss": 0.0, "clip_frac": 0.0, "kl": 0.0, "masked_seq_frac": 0.0, "entropy": 0.0, "grad_norm": 0.0}
    skipped = updates = trained = 0
    size = N * world.size // cfg.minibatches
    set_training(model)
    for _ in range(cfg.inner_updates):
        order = dist.broadcast(torch.randperm(N * world.size, device="cpu"))
        for m in range(cfg.minibatches):
            picked = [i for i in local[order[m * size:(m + 1) * size]].tolist() if i >= 0]
            live = [i for i in picked if signal[i]]
            if skipping and dist.all_true(not live):  # no rank holds a row with an advantage
                updates += 1
                _, stepped = _zero_gradient_step(model, optimizer, scheduler, cfg.optim.grad_clip)
                skipped += not stepped
                continue
            held = bool(live)
            live = live or [0]  # a rank holding no live row of the minibatch runs row 0, masked out
            idx = torch.tensor(live, dtype=torch.long, device=mask.device)
            rows_mask = mask[idx] if held else torch.zeros_like(mask[idx])
            keep = None if rollout.keep_mask_B_T_V is None else rollout.keep_mask_B_T_V[idx]
            logprobs, entropy = response_logprobs(model, [rollout.prompt_ids[i] for i in live],
                                                  rollout.response_ids_B_T[idx], rows_mask, pad_id,
                                                  cfg.sampling.temperature, keep)
            loss, stats = grpo_loss(logprobs, rollout.sampler_logprobs_B_T[idx], adv_N[idx], rows_mask,
                                    ref_logprobs_B_T=None if ref_logprobs is None else ref_logprobs[idx],
                                    kl_coef=cfg.kl_coef, kl_estimator=cfg.kl_estimator, eps_low=cfg.eps_low,
                                    eps_high=cfg.eps_high, off_policy_delta=cfg.off_policy_delta,
                                    aggregation=cfg.aggregation)
            count = stats["tokens" if by_tokens else "sequences"]
            skipped_count = sum(counts[i] for i in picked if not signal[i])
            if world.size > 1 or skipped_count:  # this rank's terms over the minibatch's global normaliser
                loss = loss * (count / dist.all_sum(count + skipped_count).clamp_min(1))
            if not dist.all_true(bool(torch.isfinite(loss))):
                optimizer.zero_grad(set_to_none=True)
                skipped += 1
                continue
            loss.backward()
            norm, stepped = optimizer_step(model, optimizer, scheduler, cfg.optim.grad_clip)
            skipped += not stepped
            updates += 1
            trained += 1
            sums["loss"] += float(dist.all_sum(loss.detach()))
            sums["grad_norm"] += norm if stepped else 0.0
            tokens, rows = float(stats["tokens"]), float(held) * len(idx)
            means = dist.weighted_means({"entropy": (float(entropy[rows_mask].mean()) if held else 0.0,
                                                     float(rows_mask.sum())),
                                         "clip_frac": (float(stats["clip_frac"]), tokens),
                                         "kl": (float(stats["kl"]), tokens),
                                         "masked_seq_frac": (float(stats["masked_seq_frac"]), rows)})
            for k, v in means.items():
                sums[k] += v
    out = {k: v / max(1, updates if k in ("loss", "grad_norm") else trained) for k, v in sums.items()}
    out["skipped_updates"] = skipped
    out["zero_adv_frac"] = dist.weighted_means({"z": (sum(zero) / max(1, N), N)})["z"]
    return out


def _zero_gradient_step(model, optimizer, scheduler, grad_clip: float) -> tuple[float, bool]:
    """The optimizer step of a minibatch whose gradient is zero: AdamW still moves the weights (momentum, decay)."""
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    return optimizer_step(model, optimizer, scheduler, grad_clip)


def greedy_pass1(model, tokenizer, records: list[Record], max_new_tokens: int, batch_size: int = 256) -> float:
    """Greedy pass@1 on records with the world checkers (cheap progress signal inside a loop)."""
    from pluribus.stages.evaluate import generate_texts
    from pluribus.world import check

    texts = generate_texts(model, tokenizer, records, SamplingParams(max_new_tokens, temperature=0), 0, batch_size)
    return sum(check(r, t[0]) >= 1.0 for r, t in zip(records, texts)) / len(records)
