"""Multi-teacher on-policy distillation (DeepSeek-V4 §5.2, Eq. 29): many experts merged into one student.

One step: draw prompts from a mixed-domain stream (per-domain sampling weights) → order them by
their domain's teacher → the student's training forward over the distinct prompts, with grad
(`prompt_states`; one process, the HF engine) → student rollouts (`pluribus.rollout.sample`), whose
prefill copies those prompts' keys and values instead of running them again → per teacher, once: its
last-layer hidden states at the response positions (`TeacherPool.teacher_states`) → student
forward with grad over the responses → exact full-vocabulary reverse KL rebuilt chunk by chunk through each teacher's
head, weighted per teacher, backpropagated one teacher head at a time (`distill_backward`) →
optimizer step (skipped when the gradient is not finite) with warmup and a decaying schedule
(cosine by default: a constant rate was seen to undo progress late in training).

The checkers' rewards are logged per domain to watch the merge; they never enter the loss.
The student starts from `cfg.model` (full weights, or a LoRA adapter: a saved adapter keeps
training, `cfg.lora` adds one to a full model). The teachers are separate models loaded from their
own folders, never the student's weights. A LoRA student is saved merged into full weights by
default (`save_merged`), so the result is a plain HF model like the experts' base.

Under torchrun (`pluribus.dist`) each process takes its slice of the drawn prompts, orders that slice
by teacher (the V4 schedule holds on every rank: each of its teachers runs once per step), samples and
scores it with its own teacher pool; Eq. 29's per-teacher means use the global token count of each
teacher (`distill_step`), so N processes compute the update of one.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from pathlib import Path
from typing import Callable

import torch

from pluribus import dist
from pluribus.config import OPDConfig
from pluribus.core import teacher_weights
from pluribus.data import Record
from pluribus.errors import PluribusError
from pluribus.models import add_lora, expand_depth, load, merge_lora, render_prompt, save, set_training
from pluribus.models.lean import PromptStates, prefill_takes_prompt_states, prompt_states
from pluribus.rollout import SamplingParams
from pluribus.rollout.engine import HFEngine, open_engine
from pluribus.stages.checkpoint import Checkpointer
from pluribus.stages.common import MetricsLog, load_records, make_optimizer, optimizer_step, progress, seed_everything
from pluribus.teachers import (TeacherPool, TeacherSpec, check_head_reproduces_logits, distill_backward,
                               output_head, response_hidden_states)

RewardFn = Callable[[list[Record], list[str]], list[float | None]]


def default_reward(routes: dict[str, str] | None = None) -> RewardFn:
    """The router's rewards for the domains it can check (world checkers, and `routes`: domain -> reward kind);
    None elsewhere, and for domains routed to the generative judge (none is at hand here)."""
    from pluribus.rewards.router import RewardRouter

    router = RewardRouter(routes)
    known = {d for d in router.domains if router.kinds[d] != "grm"}


    def score(records: list[Record], texts: list[str]) -> list[float | None]:
        rows = [i for i, r in enumerate(records) if r.domain in known]
        rewards: list[float | None] = [None] * len(records)
        for i, reward in zip(rows, router.score([records[i] for i in rows], [texts[i] for i in rows])):
            rewards[i] = reward
        return rewards

    return score


class DomainStream:
    """Prompts drawn domain by domain: a domain with probability ∝ its weight, then a record of it at random."""

    def __init__(self, records: list[Record], weights: dict[str, float], seed: int):
        self.records = records
        self.by_domain: dict[str, list[Record]] = {}
        for r in records:
            self.by_domain.setdefault(r.domain, []).append(r)
        unknown = sorted(set(weights) - set(self.by_domain))
        if unknown:
            raise PluribusError(f"domain_weights name domain(s) {unknown} with no records "
                                f"(the data has {sorted(self.by_domain)})")
        chosen = {d: weights.get(d, 0.0 if weights else 1.0) for d in self.by_domain}
        self.weights = {d: w for d, w in chosen.items() if w > 0}
        if not self.weights:
            raise PluribusError("the prompt stream is empty: no records, or every domain weight is 0")
        self.rng = random.Random(seed)  # the draw order: a resumed run restores it

    @property
    def domains(self) -> list[str]:
        return list(self.weights)

    def draw(self, n: int) -> list[Record]:
        domains = self.rng.choices(list(self.weights), weights=list(self.weights.values()), k=n)
        return [self.rng.choice(self.by_domain[d]) for d in domains]


def run(cfg: OPDConfig, records: list[Record] | None = None, reward_fn: RewardFn | None = None,
        meta: dict | None = None) -> Path:
    world = dist.init(cfg.device)
    world.per_rank(cfg.prompts_per_step, "opd prompts_per_step")
    seed_everything(cfg.seed)
    model, tokenizer = load(cfg.model, device=world.device)
    if cfg.expand_depth:
        model = expand_depth(model, cfg.expand_depth)
    if cfg.lora is not None and not hasattr(model, "disable_adapter"):
        model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    student_head, _ = output_head(model)
    check_head_reproduces_logits(model, f"student ({cfg.model})")
    trainer = dist.wrap(model, cfg.distributed, trunk=True)
    pool = TeacherPool([TeacherSpec(t.name or "+".join(t.domains), Path(t.path), tuple(t.domains), t.weight)
                        for t in cfg.teachers], tokenizer, vocab_size=student_head.shape[0],
                       device=world.device, allow_eos_mismatch=cfg.allow_eos_mismatch,
                       resident_budget_bytes=int(cfg.teacher_memory_mb * 2**20), prefetch=cfg.teacher_prefetch)
    stream = DomainStream(records if records is not None else load_records(cfg.data), cfg.domain_weights, cfg.seed)
    pool.route(stream.domains)  # fails now, not mid-run, when a domain has no teacher
    reward_fn = reward_fn or default_reward(cfg.data.rewards)
    names = [spec.name for spec in pool.teachers]
    prompts: dict[str, list[int]] = {}
    params = SamplingParams(cfg.sampling.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_p,
                            cfg.sampling.top_k)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.steps)
    out = Path(cfg.out)
    ckpt = Checkpointer(out, every=cfg.checkpoint_every, total=cfg.steps, config=cfg.model_dump(),
                        records=stream.records, model=model, tokenizer=tokenizer, optimizer=optimizer,
                        scheduler=scheduler)
    first, state = ckpt.restore({"stream": stream.rng})
    stream.rng = state["stream"]
    metrics = MetricsLog(out.with_name(out.name + ".metrics.jsonl"), first)
    pad_id, eos_id = tokenizer.pad_token_id, tokenizer.eos_token_id
    engine = open_engine(cfg.rollout.engine, model, cfg.model, seed=cfg.seed, **cfg.rollout.vllm_options())
    bar, task = progress("opd", cfg.steps, first)
    with bar:
        for step in range(first, cfg.steps):
            t0 = time.time()
            drawn = world.shard(stream.draw(cfg.prompts_per_step), "prompts this step")  # then ordered per rank
            teacher_index = pool.route([r.domain for r in drawn])
            order = pool.order(teacher_index)
            batch, teacher_index = [drawn[i] for i in order], [teacher_index[i] for i in order]
            for r in batch:
                if r.id not in prompts:
                    prompts[r.id] = render_prompt(tokenizer, r.messages())
            engine.sync_weights(model)
            dist.unshard(model)  # fsdp2: whole weights while the HF sampler runs
            prompt_ids = [prompts[r.id] for r in batch]
            # The update follows this rollout at the weights that sample it: the prompts' forward, with grad, serves
            # both the sampler's prefill and the student's forward (one process: DDP and FSDP2 own the forward; where
            # the prefill would run the prompts anyway, their activations are not kept across the rollout).
            prompt_run = None
            if world.size == 1 and isinstance(engine, HFEngine) and prefill_takes_prompt_states(model):
                set_training(model)
                prompt_run = prompt_states(model, prompt_ids)
            rewarded = bool(cfg.reward_every) and step % cfg.reward_every == 0
            # ... and the decode's projections of the responses serve the update's forward (full weights: a LoRA
            # layer's parts are not recorded)
            rollout = ckpt.sample(step, model, prompt_ids, params, eos_id=eos_id, pad_id=pad_id,
                                  tokenizer=tokenizer if rewarded else None,  # texts only to score them (~1.5 ms)
                                  engine=engine, prompts=prompt_run,
                                  record=prompt_run is not None and not hasattr(model, "disable_adapter"),
                                  request_seeds=[(cfg.seed * 1_000_003 + step) * 4096 + world.rank * len(batch) + i
                                                 for i in range(len(batch))])
            dist.reshard(model)
            t_sample = time.time()
            states = pool.teacher_states(rollout.prompt_ids, rollout.response_ids_B_T, rollout.response_mask_B_T,
                                         teacher_index, pad_id)
            t_teachers = time.time()
            loss, kl_mean_E, tokens_E, grad_norm, stepped = distill_step(
                model, trainer, rollout, states, pool.weights_E, optimizer, scheduler, cfg, pad_id, prompt_run)
            del states, prompt_run
            rollout.decoded = None  # its projections served the update: freed before the next rollout records
            t_end = time.time()
            tokens = int(tokens_E.sum())
            record = dict(step=step, loss=float(loss), grad_norm=grad_norm, skipped=int(not stepped),
                          lr=scheduler.get_last_lr()[0],
                          kl=float((kl_mean_E * tokens_E).sum() / max(1, tokens)),
                          tokens=tokens, response_len=tokens / (len(batch) * world.size),
                          tokens_per_s=tokens / max(t_end - t0, 1e-9), sample_s=t_sample - t0,
                          teacher_s=t_teachers - t_sample, student_s=t_end - t_teachers, step_s=t_end - t0,
                          teacher_resident_mib=pool.resident_bytes / 2**20)
            record.update({f"kl_{names[e]}": float(kl_mean_E[e]) for e in range(len(names)) if tokens_E[e] > 0})
            every_batch = [r for part in dist.all_gather_objects(batch) for r in part]  # the global batch
            record.update({f"rollouts_{d}": n for d, n in sorted(Counter(r.domain for r in every_batch).items())})
            if rewarded:
                rewards = [x for part in dist.all_gather_objects(reward_fn(batch, rollout.texts)) for x in part]
                record.update(_domain_rewards(every_batch, rewards))
            metrics.write(**record)
            bar.update(task, advance=1, info=f"kl {record['kl']:.3f}")
            ckpt.step_done(step, {"stream": stream.rng})
    metrics.close()
    engine.close()
    pool.release()
    model.eval()
    lora = hasattr(model, "disable_adapter")
    saved = merge_lora(model) if lora and cfg.save_merged else model
    return dist.save(saved, tokenizer, out, {"stage": "opd", **(meta or {}), "lora_merged": lora and cfg.save_merged,
                                        "config": cfg.model_dump()})


def distill_step(model, trainer, rollout, states, weights_E: torch.Tensor, optimizer, scheduler, cfg: OPDConfig,
                 pad_id: int, prompts: PromptStates | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float, bool]:
    """One OPD update from this rank's rollouts and their teachers' cached states: `(loss, kl_mean_E, tokens_E,
    grad norm, stepped)`, the first three over the global batch. A non-finite loss skips the step.
    prompts: the rollout's prompts already run by the student's forward at these weights (one process); with them,
    `rollout.decoded` (when recorded) stands for the projections of its responses.

    `trainer` is `dist.wrap(model, ..., trunk=True)` (the model itself with one process). Under torchrun
    each teacher's weight is scaled by this rank's share of that teacher's global tokens, so the summed
    gradient is Eq. 29 over the global batch. The head's gradient is taken on a detached copy and summed
    over ranks by hand (`dist.add_gradient`): `distill_backward` applies the head outside the model's
    forward, one teacher at a time, where DDP's and FSDP2's hooks do not see it.
    """
    world = dist.world()
    set_training(model)
    tokens_E = torch.bincount(states.teacher_index_N, minlength=weights_E.shape[0])
    global_E = dist.all_sum(tokens_E)  # this rank's own counts with one process
    samples = len(rollout.prompt_ids)
    global_B = samples if world.size == 1 else int(dist.all_sum(torch.tensor(samples, device="cpu")))
    step_weights_E = teacher_weights(weights_E, tokens_E, global_E, global_B, cfg.aggregation)
    if world.size == 1:
        head, bias = output_head(model)
        hidden = response_hidden_states(model, rollout.prompt_ids, rollout.response_ids_B_T,
                                        rollout.response_mask_B_T, pad_id, prompts=prompts, decoded=rollout.decoded)
        loss, kl_mean_E, tokens_E = distill_backward(hidden, head, states, step_weights_E, cfg.chunk_size, bias,
                                                     cfg.forward_kl_weight)
    else:
        hidden = response_hidden_states(model, rollout.prompt_ids, rollout.response_ids_B_T,
                                        rollout.response_mask_B_T, pad_id, trunk=dist.trunk_forward(trainer, model))
        head, bias = (_detached(p) for p in output_head(model))  # after the forward: fsdp2 holds them whole
        loss, kl_mean_E, _ = distill_backward(hidden, head, states, step_weights_E, cfg.chunk_size, bias,
                                              cfg.forward_kl_weight)
        if not (torch.isfinite(loss) and hidden.shape[0] > 0):  # no backward reached the trunk: join the reduction
            (hidden.sum() * 0).backward()
        for param, copy in zip(output_head(model), (head, bias)):
            dist.add_gradient(param, None if copy is None else copy.grad)
        loss, kl_mean_E = dist.all_sum(loss), dist.all_sum(kl_mean_E * tokens_E) / global_E.clamp_min(1)
        tokens_E = global_E
    del hidden
    if torch.isfinite(loss):  # global under torchrun: every rank decides alike
        grad_norm, stepped = optimizer_step(model, optimizer, scheduler, cfg.optim.grad_clip)
    else:
        optimizer.zero_grad(set_to_none=True)
        scheduler.step()
        grad_norm, stepped = float("nan"), False
    return loss, kl_mean_E, tokens_E, grad_norm, stepped


def _detached(param: torch.Tensor | None) -> torch.Tensor | None:
    return None if param is None else param.detach().requires_grad_(param.requires_grad)


def _domain_rewards(batch: list[Record], rewards: list[float | None]) -> dict[str, float]:
    """Mean reward per domain, over the samples that have one."""
    by_domain: dict[str, list[float]] = {}
    for r, reward in zip(batch, rewards):
        if reward is not None:
            by_domain.setdefault(r.domain, []).append(float(reward))
    return {f"reward_{d}": sum(v) / len(v) for d, v in sorted(by_domain.items())}
