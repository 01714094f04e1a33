"""Supervised fine-tuning: prompt-masked cross-entropy on chat-formatted demonstrations.

Full weights or a LoRA adapter; gradient accumulation; warmup + decay; the result is an HF folder
(a LoRA run saves the adapter, which `pluribus.models.load` puts back on its base).
Under torchrun each process trains on its slice of every batch (`pluribus.dist`): the same updates.
"""

from __future__ import annotations

import random
import time
from pathlib import Path

from pluribus import dist
from pluribus.config import SFTConfig
from pluribus.data import Record
from pluribus.errors import PluribusError
from pluribus.models import add_lora, load, render_example
from pluribus.stages.checkpoint import Checkpointer
from pluribus.stages.common import (MetricsLog, global_lm_loss, load_records, make_optimizer, optimizer_step,
                                    progress, seed_everything)


def demonstrations(tokenizer, records: list[Record]) -> list[tuple[list[int], int]]:
    """(ids, prompt length) per record that has an answer to imitate."""
    demos = [render_example(tokenizer, r.messages(), r.answer) for r in records if r.answer is not None]
    if not demos:
        raise PluribusError("sft: no record has an 'answer' to imitate")
    return demos


def run(cfg: SFTConfig, records: list[Record] | None = None, meta: dict | None = None) -> Path:
    world = dist.init(cfg.device)
    world.per_rank(cfg.batch_size, "sft batch_size")
    seed_everything(cfg.seed)
    records = records if records is not None else load_records(cfg.data)  # a data mistake fails before loading
    model, tokenizer = load(cfg.model, device=world.device)
    if cfg.lora is not None:
        model = add_lora(model, cfg.lora.rank, cfg.lora.alpha, cfg.lora.dropout)
    model.train()
    demos = demonstrations(tokenizer, records)
    trainer = dist.wrap(model, cfg.distributed)
    optimizer, scheduler = make_optimizer(model, cfg.optim, cfg.steps)
    out = Path(cfg.out)
    ckpt = Checkpointer(out, every=cfg.checkpoint_every, total=cfg.steps, config=cfg.model_dump(), records=records,
                        model=model, tokenizer=tokenizer, optimizer=optimizer, scheduler=scheduler)
    first, state = ckpt.restore({"rng": random.Random(cfg.seed), "order": []})
    rng, order = state["rng"], state["order"]  # order: what is left of this epoch's shuffled order
    metrics = MetricsLog(out.with_name(out.name + ".metrics.jsonl"), first)
    bar, task = progress("sft", cfg.steps, first)
    start = time.time()
    with bar:
        for step in range(first, cfg.steps):
            total = 0.0
            for micro in range(cfg.grad_accum):
                batch = []
                for _ in range(cfg.batch_size):  # epochs over a shuffled order, no example twice per epoch
                    if not order:
                        order = list(range(len(demos)))
                        rng.shuffle(order)
                    batch.append(demos[order.pop()])
                mine = world.shard(batch)
                with dist.no_sync(trainer, micro < cfg.grad_accum - 1):
                    loss, _ = global_lm_loss(trainer, world, [ids for ids, _ in mine], [n for _, n in mine],
                                             tokenizer.pad_token_id)
                    (loss / cfg.grad_accum).backward()
                total += float(dist.all_sum(loss.detach())) / cfg.grad_accum
            norm, _ = optimizer_step(model, optimizer, scheduler, cfg.optim.grad_clip)
            if step % 10 == 0 or step == cfg.steps - 1:
                metrics.write(step=step, loss=total, grad_norm=norm, lr=scheduler.get_last_lr()[0],
                              elapsed_s=time.time() - start)
            bar.update(task, advance=1, info=f"loss {total:.3f}")
            ckpt.step_done(step, {"rng": rng, "order": order})
    metrics.close()
    model.eval()
    return dist.save(model, tokenizer, out, {"stage": "sft", **(meta or {}), "config": cfg.model_dump()})
