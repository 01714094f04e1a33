"""Scenarios for tests/test_distributed.py, run the same way by one process (imported) and by N (torchrun).

`python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py JOBS.json` runs every job of
the file in turn: [name, kwargs] pairs naming the functions below. Each writes `<out>/result.pt` from
rank 0: the logged losses and the full weights (gathered under FSDP2) after its steps.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import torch


PROBE = [1, 5, 9, 14, 30, 41, 7, 2]


def _finish(model, tokenizer, out: str, losses: list[float], **extra) -> None:
    """Rank 0 writes the losses, the full weights and the live model's logits on PROBE; `<out>/model` is saved
    the way the stages save (once, from rank 0)."""
    from pluribus import dist

    model.eval()
    with dist.gathered(model), torch.no_grad():
        logits = model(input_ids=torch.tensor([PROBE])).logits
    dist.save(model, tokenizer, f"{out}/model")
    state = dist.model_state(model)
    extra["logits"] = logits
    if dist.is_main():
        state = state if state is not None else {k: v.detach().clone() for k, v in model.named_parameters()}
        Path(out).mkdir(parents=True, exist_ok=True)
        torch.save({"losses": losses, "params": state, **extra}, Path(out) / "result.pt")
    dist.barrier()


def rows(batch, part: slice | list[int]):
    """The rows `part` (a slice, or row indices) of a Rollout (every field is a per-row list or tensor, or None)."""
    def pick(values):
        if values is None or isinstance(part, slice):
            return None if values is None else values[part]
        return values[torch.tensor(part)] if isinstance(values, torch.Tensor) else [values[i] for i in part]

    return dataclasses.replace(batch, **{f.name: pick(getattr(batch, f.name)) for f in dataclasses.fields(batch)})


def my_rows(n: int) -> slice:
    from pluribus import dist

    world = dist.world()
    per = n // world.size
    return slice(world.rank * per, (world.rank + 1) * per)


def sft_run(model: str, out: str, mode: str) -> None:
    """The SFT stage itself: 3 steps of 2 micro-batches of 4 (a checkpoint after step 2), saved to `<out>/model`."""
    from pluribus.config import DataConfig, OptimConfig, SFTConfig
    from pluribus.stages import sft
    from pluribus.world import generate

    cfg = SFTConfig(model=model, out=f"{out}/model", data=DataConfig(domains=["add"]), steps=3, batch_size=4,
                    grad_accum=2, optim=OptimConfig(lr=1e-3, warmup_steps=0), checkpoint_every=2, distributed=mode)
    sft.run(cfg, records=generate("add", "train", 16))


def grpo_update(model: str, rollout: str, out: str, mode: str, steps: int = 2, kl_coef: float = 0.05) -> None:
    """`grpo.policy_step` on the same rollouts, each rank its half: μ=2 passes of 2 minibatches, KL to a reference
    (none with kl_coef 0: then rows without an advantage are skipped). The file's `raw_steps`, when present, gives
    each step its own rewards."""
    from pluribus import dist
    from pluribus.config import DataConfig, GRPOConfig, OptimConfig, SamplingConfig
    from pluribus.models import load
    from pluribus.stages import grpo
    from pluribus.stages.common import make_optimizer

    dist.init()
    torch.manual_seed(0)
    data = torch.load(rollout, weights_only=False)
    part = my_rows(len(data["rollout"].prompt_ids))
    cfg = GRPOConfig(model=model, out=out, data=DataConfig(domains=["add"]), group_size=4, prompts_per_step=4,
                     minibatches=2, inner_updates=2, kl_coef=kl_coef, off_policy_delta=0.05, lora=None,
                     sampling=SamplingConfig(max_new_tokens=6, top_p=0.9),
                     optim=OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant"), distributed=mode)
    policy, tokenizer = load(model)
    reference = grpo.reference_policy(policy, False, mode) if kl_coef > 0 else None
    trainer = dist.wrap(policy, mode)
    optimizer, scheduler = make_optimizer(policy, cfg.optim, 100)
    losses = []
    for step in range(steps):
        raw = data["raw_steps"][step] if "raw_steps" in data else data["raw"]
        _, _, stats = grpo.policy_step(trainer, cfg, rows(data["rollout"], part), raw[part], reference,
                                       optimizer, scheduler, tokenizer.pad_token_id)
        losses.append(stats["loss"])
    _finish(policy, tokenizer, out, losses, stats=stats)


def opd_update(model: str, teachers: list[str], rollout: str, out: str, mode: str, steps: int = 2,
               aggregation: str = "teacher_mean") -> None:
    """`opd.distill_step` on the same rollouts (ordered by teacher), each rank its half, two weighted teachers."""
    from pluribus import dist
    from pluribus.config import DataConfig, OPDConfig, OptimConfig, TeacherConfig
    from pluribus.models import load
    from pluribus.stages import opd
    from pluribus.stages.common import make_optimizer
    from pluribus.teachers import TeacherPool, TeacherSpec

    dist.init()
    data = torch.load(rollout, weights_only=False)
    part = my_rows(len(data["teacher_index"]))
    cfg = OPDConfig(model=model, out=out, data=DataConfig(domains=["add"]), chunk_size=16,
                    teachers=[TeacherConfig(path=teachers[0], domains=["add"]),
                              TeacherConfig(path=teachers[1], domains=["reverse"], weight=0.5)],
                    optim=OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant"), distributed=mode,
                    aggregation=aggregation)
    student, tokenizer = load(model)
    trainer = dist.wrap(student, mode, trunk=True)
    pool = TeacherPool([TeacherSpec(f"t{i}", Path(t.path), tuple(t.domains), t.weight)
                        for i, t in enumerate(cfg.teachers)], tokenizer, vocab_size=len(tokenizer))
    optimizer, scheduler = make_optimizer(student, cfg.optim, 100)
    batch, index = rows(data["rollout"], part), data["teacher_index"][part]
    losses, kls = [], []
    for _ in range(steps):
        states = pool.teacher_states(batch.prompt_ids, batch.response_ids_B_T, batch.response_mask_B_T, index,
                                     tokenizer.pad_token_id)
        loss, kl_E, tokens_E, _, stepped = opd.distill_step(student, trainer, batch, states, pool.weights_E,
                                                            optimizer, scheduler, cfg, tokenizer.pad_token_id)
        assert stepped
        losses.append(float(loss))
        kls.append(kl_E.tolist())
    pool.release()
    _finish(student, tokenizer, out, losses, kl_E=kls, tokens_E=tokens_E.tolist())


class SeededJudgements:
    """The judge's engine in `grm_update`: request s's text is a function of s alone (a world-template judgement of
    4 criteria; every fifth one invalid), so a rank judges its rows as one process does only with global seeds."""

    def generate(self, prompt_ids, params, *, request_seeds, **_):
        from types import SimpleNamespace

        from pluribus.rewards.grm import WORLD_TEMPLATE

        return SimpleNamespace(texts=["no judgement" if s % 5 == 0 else
                                      WORLD_TEMPLATE.judgement([bool(s >> i & 1) for i in range(4)], s % 10)
                                      for s in request_seeds])


def grm_update(model: str, batch: str, out: str, mode: str, steps: int = 2, dtype: str = "float32") -> None:
    """`grm.joint_update` on the same episodes and rollouts, each rank its share (`grm.share_of`): the judge's
    verdicts on its generation rows (`SeededJudgements`), its judged items' labels, then μ=2 passes of 2
    minibatches with KL to a frozen copy; the policy in `dtype`."""
    from pluribus import dist
    from pluribus.config import GRMConfig, OptimConfig, SamplingConfig
    from pluribus.models import load
    from pluribus.rewards.grm import WORLD_TEMPLATE, Judge
    from pluribus.stages import grm, grpo
    from pluribus.stages.common import make_optimizer

    world = dist.init()
    data = torch.load(batch, weights_only=False)
    cfg = GRMConfig(model=model, out=out, judge_domains=["sort"], gen_prompts=4, judge_items=4, group_size=2,
                    judge_k=2, minibatches=2, inner_updates=2, kl_coef=0.05, sampling=SamplingConfig(max_new_tokens=6),
                    optim=OptimConfig(lr=3e-4, warmup_steps=0, schedule="constant"), distributed=mode)
    policy, tokenizer = load(model, dtype=getattr(torch, dtype))
    reference = grpo.reference_policy(policy, False, mode)
    trainer = dist.wrap(policy, mode)
    optimizer, scheduler = make_optimizer(policy, cfg.optim, 100)
    share = grm.share_of(data["episodes"], data["n_annotated"], cfg.group_size, world)
    rollout = rows(data["rollout"], share.rows_N.tolist())
    judge = Judge(policy, tokenizer, WORLD_TEMPLATE, k=cfg.judge_k, seed=cfg.seed, engine=SeededJudgements())
    steps_metrics = [grm.joint_update(trainer, cfg, share, rollout, judge, reference, optimizer, scheduler,
                                      tokenizer.pad_token_id) for _ in range(steps)]
    _finish(policy, tokenizer, out, [m["loss"] for m in steps_metrics], metrics=steps_metrics)


def grm_run(model: str, out: str, mode: str) -> None:
    """`grm.run` itself: data labelled by every rank's part of the rollouts, a 2-step warm-up, 2 joint RL steps
    with held-out judge metrics after each, the saves."""
    from pluribus.config import GRMConfig, SamplingConfig
    from pluribus.stages import grm

    grm.run(GRMConfig(model=model, out=f"{out}/model", judge_domains=["sort", "count"], n_train=8, steps=2,
                      gen_prompts=2, judge_items=2, group_size=2, judge_k=2, rubric_labels=6, warmup_steps=2,
                      warmup_batch_size=4, warmup_verifiable=4, eval_every=1, eval_n=3, eval_pairs=2, minibatches=2,
                      kl_coef=0.05, sampling=SamplingConfig(max_new_tokens=8), distributed=mode))


def stage_runs(model: str, teachers: list[str], out: str, mode: str) -> None:
    """`grpo.run` and `opd.run` themselves, 2 steps each: per-rank sampling (whole weights under FSDP2), rewards,
    teacher scoring, reduced metrics, checkpoints and the final save."""
    from pluribus.config import DataConfig, GRPOConfig, OPDConfig, SamplingConfig, TeacherConfig
    from pluribus.stages import grpo, opd
    from pluribus.world import generate

    records = generate("add", "train", 16)
    grpo.run(GRPOConfig(model=model, out=f"{out}/grpo", data=DataConfig(domains=["add"]), steps=2, prompts_per_step=4,
                        group_size=4, sampling=SamplingConfig(max_new_tokens=4), lora=None, kl_coef=0.1,
                        minibatches=2, eval_every=1, checkpoint_every=1, distributed=mode),
             records=records, reward_fn=lambda rows_, texts, lengths: [len(t) % 3 / 2 for t in texts],
             eval_records=generate("add", "test", 4))
    opd.run(OPDConfig(model=model, out=f"{out}/opd", data=DataConfig(domains=["add"]), steps=2, prompts_per_step=4,
                      teachers=[TeacherConfig(path=teachers[0], domains=["add"]),
                                TeacherConfig(path=teachers[1], domains=["reverse"])],
                      sampling=SamplingConfig(max_new_tokens=4), distributed=mode),
            records=records + generate("reverse", "train", 16))


def cli(args: list[str]) -> None:
    """`pluribus ARGS` as `torchrun -m pluribus.cli ARGS` runs it: its own ending (the group left, the worker ended
    without exit-time teardown), so it must be the last job."""
    from pluribus.cli import main

    sys.argv = ["pluribus", *args]
    main()


def backend(out: str) -> None:
    """The backend `dist.init` chose, and the world size, in `<out>/backend.txt`."""
    import torch.distributed as tdist

    from pluribus import dist

    world = dist.init()
    if world.is_main:
        (Path(out) / "backend.txt").write_text(f"{tdist.get_backend()} {world.size}")


if __name__ == "__main__":
    torch.set_num_threads(1)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for name, kwargs in json.loads(Path(sys.argv[1]).read_text()):
        globals()[name](**kwargs)
    from pluribus import dist

    if dist.finish():  # as the command line ends a stage: every rank done, the group left, no exit-time teardown
        dist.exit_process(0)
