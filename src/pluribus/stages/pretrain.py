"""Pretrain the tiny preset from scratch on world text, so the base is weak but not hopeless.

The corpus renders world train prompts as chats whose answers are right only `p_correct` of the
time, follow the domain's systematic mistake `p_mistake` of the time, and are another prompt's
answer otherwise (per-domain shares can differ: a long answer sampled token by token needs a
larger share of right demonstrations before any whole sample comes out right). The base's most likely answer is therefore wrong (low greedy pass@1) while right
answers are in its samples (pass@k > 0): RL has signal, and SFT must teach, not merely unlock.
Test prompts never appear: the corpus draws from the train split only.
Under torchrun each process trains on its slice of every batch (`pluribus.dist`).
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from pluribus import dist
from pluribus.config import PretrainConfig
from pluribus.models import build_tiny, count_parameters, load, render_example, render_prompt, render_response
from pluribus.stages.checkpoint import Checkpointer
from pluribus.stages.common import (MetricsLog, global_lm_loss, length_buckets, make_optimizer, optimizer_step,
                                    progress, seed_everything)
from pluribus.world import DOMAINS, Instance, generate, instance_of
from pluribus.world.skills import find_example

POOL_PER_DOMAIN = 4000
BUCKET_BATCHES = 8  # draw this many batches at once and bucket them by length


class CorpusRenderer:
    """`render_example(tokenizer, [user prompt], answer)[0]`, each world prompt and each answer tokenized once.

    The corpus draws its prompts from fixed pools (each ~8 times over the quickstart's pretraining) and its answers
    from a few per prompt; the chat template and the tokenizer take ~65 µs a text, ~7% of a pretraining step on two
    threads, spent on one core while the other waits. A find-skill prompt (random words, new each time) is rendered
    as is. The same ids as `render_example`, by construction: its two parts (`render_prompt`, `render_response`),
    remembered.
    """

    def __init__(self, tokenizer, limit: int = 500_000):  # strings remembered of each kind (the quickstart: ~48,000
        # prompts)
        self.tokenizer, self.limit = tokenizer, limit
        self._prompts: dict[str, list[int]] = {}
        self._answers: dict[str, list[int]] = {}

    def __call__(self, prompt: str, answer: str, remember: bool = True) -> list[int]:
        if not remember:
            return render_example(self.tokenizer, [{"role": "user", "content": prompt}], answer)[0]
        prompt_ids = self._prompts.get(prompt)
        if prompt_ids is None:
            prompt_ids = self._remember(self._prompts, prompt,
                                        render_prompt(self.tokenizer, [{"role": "user", "content": prompt}]))
        answer_ids = self._answers.get(answer)
        if answer_ids is None:
            answer_ids = self._remember(self._answers, answer, render_response(self.tokenizer, answer))
        return prompt_ids + answer_ids

    def _remember(self, memo: dict[str, list[int]], text: str, ids: list[int]) -> list[int]:
        if len(memo) < self.limit:
            memo[text] = ids
        return ids


def corpus_answer(rng: random.Random, inst: Instance, pool: list, domain, p_correct: float, p_mistake: float) -> str:
    u = rng.random()
    if u < p_correct:
        return inst.answer
    if u < p_correct + p_mistake:
        return domain.mistake(rng, inst)
    return rng.choice(pool).answer


def run(cfg: PretrainConfig) -> Path:
    world = dist.init(cfg.device)
    world.per_rank(cfg.batch_size, "pretrain batch_size")
    seed_everything(cfg.seed)
    out = Path(cfg.out)
    init_dir = out.with_name(out.name + ".init")
    if world.is_main:
        build_tiny(init_dir, size=cfg.size, seed=cfg.seed, arch=cfg.arch, init_std=cfg.init_std)
    dist.barrier()
    model, tokenizer = load(init_dir, device=world.device)
    trainer = dist.wrap(model, cfg.distributed)
    domains = cfg.domains or list(DOMAINS)
    pools = {d: [instance_of(r) for r in generate(d, "train", POOL_PER_DOMAIN, seed=cfg.seed + 1000, unique=True)]
             for d in domains}  # unique, as when the base was first measured: the same corpus, the same base
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.steps)
    ckpt = Checkpointer(out, every=cfg.checkpoint_every, total=cfg.steps, config=cfg.model_dump(), records=None,
                        model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)
    first, state = ckpt.restore({"rng": random.Random(cfg.seed), "batches": []})
    rng, batches = state["rng"], state["batches"]  # batches: drawn and bucketed, not yet trained on
    metrics = MetricsLog(out.with_name(out.name + ".metrics.jsonl"), first)
    bar, task = progress("pretrain", cfg.steps, first)
    render = CorpusRenderer(tokenizer)
    start = time.time()
    with bar:
        for step in range(first, cfg.steps):
            if not batches:
                texts = []
                for _ in range(cfg.batch_size * BUCKET_BATCHES):
                    if cfg.p_find and rng.random() < cfg.p_find:
                        texts.append(render(*find_example(rng), remember=False))
                    else:
                        d = rng.choice(domains)
                        inst = rng.choice(pools[d])
                        texts.append(render(inst.prompt, corpus_answer(rng, inst, pools[d], DOMAINS[d],
                                                                       *cfg.shares(d))))
                batches = length_buckets(texts, len, cfg.batch_size, rng)
            seqs = world.shard(batches.pop())
            loss, _ = global_lm_loss(trainer, world, seqs, [1] * len(seqs), tokenizer.pad_token_id)
            loss.backward()
            loss = dist.all_sum(loss.detach())
            norm, _ = optimizer_step(model, optimizer, scheduler, cfg.optim.grad_clip)
            if step % 25 == 0 or step == cfg.steps - 1:
                metrics.write(step=step, loss=loss.item(), grad_norm=norm, lr=scheduler.get_last_lr()[0],
                              elapsed_s=time.time() - start)
            bar.update(task, advance=1, info=f"loss {loss.item():.3f}")
            ckpt.step_done(step, {"rng": rng, "batches": batches})
    metrics.close()
    model.eval()
    return dist.save(model, tokenizer, out, {"stage": "pretrain", "size": cfg.size, "arch": cfg.arch,
                                        "parameters": count_parameters(model), "config": cfg.model_dump()})
