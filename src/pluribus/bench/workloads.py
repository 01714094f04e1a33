"""The measurements behind `pluribus bench`. Each runs in a fresh process (`pluribus.bench.worker`) or, for the
smoke run, in this one; each returns a JSON-able dict.

How a step is timed, on both sides alike: the interval between the ends of two consecutive optimizer steps,
wall clock and process CPU time, for the steps after the warm-up. So a step is everything a training loop does
between two updates: draw the prompts, generate, score, forward, backward, optimizer step, and the loop's own
bookkeeping (pluribus: metrics line, progress bar, checkpoint test; TRL: its callbacks and metrics).
- pluribus: the real stages (`pluribus.stages.grpo.run`, `pluribus.stages.opd.run`); a step ends when the stage
  writes its metrics line, which follows its optimizer step.
- TRL: `GRPOTrainer` and `DistillationTrainer` (on-policy, β = 1: reverse KL over the full vocabulary); a step
  ends at the `on_step_end` callback, which follows its optimizer step.

The work of a step, on both sides alike: the matrix-multiply FLOPs of everything from the start of the run to
the end of its first step (warm-up, untimed), counted by `torch.utils.flop_counter.FlopCounterMode` (loading a
model multiplies no matrices). Time ratio over work ratio says whether a side is faster by doing less (no
padding, a shared prompt run once) or by running its FLOPs faster.
"""

from __future__ import annotations

import contextlib
import statistics
import tempfile
import time
from pathlib import Path

import torch

from pluribus.bench.memory import MIB, chunked_kl_peak, peak_bytes, reset_peak, rss_bytes
from pluribus.bench.settings import BenchSettings

TEACHER_RANK = 16


# --- models and prompts ---------------------------------------------------------------------------------

def build_models(root: Path, s: BenchSettings) -> dict:
    """The student (random Qwen2, the world's character tokenizer), one full-weight teacher (another random
    init) and `max(teacher_counts)` LoRA teachers over the student; returns the student's description."""
    from pluribus.models import add_lora, count_parameters, load, random_causal_lm, save, tiny_config
    from pluribus.models.tokenizer import build_char_tokenizer

    tokenizer = build_char_tokenizer()
    config = tiny_config(s.size, len(tokenizer), "qwen2")
    config.num_hidden_layers = s.layers
    config.layer_types = ["full_attention"] * s.layers
    for name, seed in (("student", s.seed), ("teacher", s.seed + 1)):
        torch.manual_seed(seed)
        save(random_causal_lm(config), tokenizer, root / name, {"bench": name})
    for k in range(max(s.teacher_counts)):
        model, tok = load(root / "student")
        model = add_lora(model, rank=TEACHER_RANK, alpha=2 * TEACHER_RANK)
        generator = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=generator))
        save(model, tok, root / f"lora-teacher-{k}")
    model, _ = load(root / "student")
    return {"arch": "qwen2", "parameters": count_parameters(model), "hidden": config.hidden_size,
            "layers": config.num_hidden_layers, "intermediate": config.intermediate_size,
            "heads": config.num_attention_heads, "vocab": config.vocab_size}


def grpo_records(s: BenchSettings) -> list:
    """The GRPO step's prompts: one record from each of `s.prompts` domains. The stage draws `prompts_per_step`
    of exactly these records, so every step of both trainers sees the same prompts."""
    from pluribus.world import DOMAINS, generate

    return [generate(d, "train", 1, seed=s.seed)[0] for d in list(DOMAINS)[: s.prompts]]


def opd_records(s: BenchSettings) -> list:
    from pluribus.world import DOMAINS, generate

    return [r for d in DOMAINS for r in generate(d, "train", 50, seed=s.seed)]


def opd_draws(records: list, s: BenchSettings) -> list[list]:
    """The prompts of each OPD step, drawn as the stage draws them (its own `DomainStream`, same seed)."""
    from pluribus.stages.opd import DomainStream

    stream = DomainStream(records, {}, s.seed)
    return [stream.draw(s.opd_batch) for _ in range(s.warmup + s.steps)]


# --- step timing ---------------------------------------------------------------------------------------

def _marks() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _step_times(ends: list[tuple[float, float]], warmup: int) -> dict:
    """Medians of the intervals between consecutive step ends, skipping the first `warmup` steps."""
    wall = [b[0] - a[0] for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    cpu = [b[1] - a[1] for a, b in zip(ends[warmup - 1:], ends[warmup:])]
    if not wall:
        raise RuntimeError(f"{len(ends)} step(s) timed: need warm-up ≥ 1 and at least one step after it")
    return {"step_s": statistics.median(wall), "cpu_s": statistics.median(cpu), "steps_s": wall, "cpu_steps_s": cpu,
            "threads": torch.get_num_threads()}


class FirstStepWork:
    """Matrix-multiply FLOPs from `start()` to the first `step_end()` (later calls do nothing): a FlopCounterMode
    entered and left by hand, because a trainer's step ends inside its own loop."""

    def __init__(self):
        from torch.utils.flop_counter import FlopCounterMode

        self.counter = FlopCounterMode(display=False)
        self.gflop: float | None = None
        self.counting = False

    def start(self) -> None:
        self.counter.__enter__()
        self.counting = True

    def step_end(self) -> None:
        if self.counting:
            self.counter.__exit__(None, None, None)
            self.counting = False
            self.gflop = self.counter.get_total_flops() / 1e9


def _with_work(result: dict, work: FirstStepWork) -> dict:
    return {**result, "step_gflop": work.gflop}


@contextlib.contextmanager
def _timed_metrics(stage_module):
    """Record the time of every metrics line `stage_module.run` writes (the end of each of its steps), and the
    work of its first step."""
    base = stage_module.MetricsLog
    ends: list[tuple[float, float]] = []
    rows: list[dict] = []
    work = FirstStepWork()

    class TimedMetricsLog(base):
        def write(self, **metrics):
            super().write(**metrics)
            ends.append(_marks())
            work.step_end()
            rows.append(metrics)

    stage_module.MetricsLog = TimedMetricsLog
    work.start()
    try:
        yield ends, rows, work
    finally:
        work.step_end()
        stage_module.MetricsLog = base


def _trl_timer():
    from pluribus.models import hf_trainer_callback

    class StepEnds(hf_trainer_callback()):
        def __init__(self):
            self.ends: list[tuple[float, float]] = []
            self.work = FirstStepWork()

        def on_step_end(self, args, state, control, **kwargs):
            self.ends.append(_marks())
            self.work.step_end()

    return StepEnds()


def _no_checkpointing(config_class) -> dict:
    """Activation checkpointing off, by the name the installed transformers gives it in `config_class` (a TRL config,
    a `TrainingArguments`): `activation_checkpointing` from 5.25, whose `gradient_checkpointing` is a deprecated alias
    (removed in v6)."""
    from dataclasses import fields

    names = {f.name for f in fields(config_class)}
    return {"activation_checkpointing" if "activation_checkpointing" in names else "gradient_checkpointing": False}


def _trl_common(s: BenchSettings, out: str, config_class) -> dict:
    """Training arguments both TRL trainers get: float32 on the CPU, no checkpointing, reporting or saving."""
    return dict(output_dir=out, use_cpu=True, bf16=False, fp16=False, **_no_checkpointing(config_class),
                report_to="none", save_strategy="no", logging_strategy="no", max_steps=s.warmup + s.steps,
                learning_rate=s.lr,
                lr_scheduler_type="constant", warmup_steps=0, max_grad_norm=1.0, weight_decay=0.0,
                max_completion_length=s.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, shuffle_dataset=False,
                dataloader_num_workers=0, disable_tqdm=True, seed=s.seed)


def _train_counted(trainer, timer) -> None:
    """`trainer.train()` with its first step's work counted; a failed run does not leave the counter on."""
    timer.work.start()
    try:
        trainer.train()
    finally:
        timer.work.step_end()


def _check_trl_prompts(tokenizer, records: list) -> None:
    """TRL renders conversations itself: it must get the very token ids pluribus samples from."""
    from pluribus.errors import PluribusError
    from pluribus.models import render_prompt

    for r in records[:8]:
        theirs = tokenizer.apply_chat_template([r.messages()], add_generation_prompt=True, tokenize=True,
                                               return_dict=True)["input_ids"][0]
        if list(theirs) != render_prompt(tokenizer, r.messages()):
            raise PluribusError(f"TRL would tokenize prompt {r.id} differently from pluribus: no fair comparison")


# --- GRPO ----------------------------------------------------------------------------------------------

def grpo_pluribus(root: Path, s: BenchSettings) -> dict:
    from pluribus.config import GRPOConfig, validate
    from pluribus.stages import grpo as stage

    records = grpo_records(s)
    with tempfile.TemporaryDirectory(dir=root) as out:
        cfg = validate(GRPOConfig, {
            "model": str(root / "student"), "out": str(Path(out) / "grpo"), "data": {"domains": []},
            "lora": None, "steps": s.warmup + s.steps, "prompts_per_step": s.prompts, "group_size": s.group,
            "inner_updates": 1, "minibatches": 1, "kl_coef": 0.0, "sampling": {"max_new_tokens": s.max_new_tokens},
            "optim": {"lr": s.lr, "warmup_steps": 0, "schedule": "constant"},
            # The random model earns 0 on every sample, so every group's advantage is 0: with the skip on, no
            # forward or backward would run at all. The bench measures the update, as TRL computes it.
            "skip_zero_advantage": False,
            "checkpoint_every": s.warmup + s.steps, "seed": s.seed}, "bench.grpo")
        with _timed_metrics(stage) as (ends, rows, work):
            stage.run(cfg, records=records)
    result = _with_work(_step_times(ends, s.warmup), work)
    result["response_tokens"] = statistics.median(r["response_len"] * s.prompts * s.group for r in rows[s.warmup:])
    return result


def grpo_trl(root: Path, s: BenchSettings) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from pluribus.models import load_causal_lm, load_tokenizer
    from pluribus.rewards.router import RewardRouter

    records = grpo_records(s)
    tokenizer = load_tokenizer(root / "student")
    _check_trl_prompts(tokenizer, records)
    router = RewardRouter()

    def world_reward(prompts, completions, record, **kwargs):  # the stage's reward: the world checkers
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        return router.score([records[i] for i in record], texts)

    # No shuffling: step k takes rows [kP, (k+1)P), each repeated G times; every step holds all P records.
    dataset = Dataset.from_list([{"prompt": r.messages(), "record": i}
                                 for _ in range(s.warmup + s.steps) for i, r in enumerate(records)])
    timer = _trl_timer()
    with tempfile.TemporaryDirectory(dir=root) as out:
        args = GRPOConfig(**_trl_common(s, out, GRPOConfig), per_device_train_batch_size=s.prompts * s.group,
                          num_generations=s.group, beta=0.0, num_iterations=1)
        trainer = GRPOTrainer(model=load_causal_lm(root / "student"), reward_funcs=world_reward, args=args,
                              train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        _train_counted(trainer, timer)
    return _with_work(_step_times(timer.ends, s.warmup), timer.work)


# --- OPD, one teacher -----------------------------------------------------------------------------------

def opd_pluribus(root: Path, s: BenchSettings) -> dict:
    from pluribus.config import OPDConfig, validate
    from pluribus.stages import opd as stage
    from pluribus.world import DOMAINS

    records = opd_records(s)
    with tempfile.TemporaryDirectory(dir=root) as out:
        cfg = validate(OPDConfig, {
            "model": str(root / "student"), "out": str(Path(out) / "opd"), "data": {"domains": []},
            "teachers": [{"path": str(root / "teacher"), "domains": list(DOMAINS), "name": "teacher"}],
            "steps": s.warmup + s.steps, "prompts_per_step": s.opd_batch,
            "sampling": {"max_new_tokens": s.max_new_tokens},
            "optim": {"lr": s.lr, "warmup_steps": 0, "schedule": "constant"}, "reward_every": 0,
            "checkpoint_every": s.warmup + s.steps, "seed": s.seed}, "bench.opd")
        with _timed_metrics(stage) as (ends, rows, work):
            stage.run(cfg, records=records)
    result = _with_work(_step_times(ends, s.warmup), work)
    for part in ("sample_s", "teacher_s", "student_s"):
        result[part] = statistics.median(r[part] for r in rows[s.warmup:] if part in r) \
            if all(part in r for r in rows) else None
    return result


def opd_trl(root: Path, s: BenchSettings) -> dict:
    from datasets import Dataset
    from trl import DistillationConfig, DistillationTrainer

    from pluribus.models import load_causal_lm, load_tokenizer

    records = opd_records(s)
    tokenizer = load_tokenizer(root / "student")
    _check_trl_prompts(tokenizer, records)
    # No shuffling: step k takes the k-th batch the pluribus stage draws.
    dataset = Dataset.from_list([{"prompt": r.messages()} for batch in opd_draws(records, s) for r in batch])
    timer = _trl_timer()
    with tempfile.TemporaryDirectory(dir=root) as out:
        args = DistillationConfig(**_trl_common(s, out, DistillationConfig), per_device_train_batch_size=s.opd_batch,
                                  beta=1.0)
        trainer = DistillationTrainer(model=load_causal_lm(root / "student"),
                                      teacher_model=load_causal_lm(root / "teacher"), args=args,
                                      train_dataset=dataset, processing_class=tokenizer, callbacks=[timer])
        _train_counted(trainer, timer)
    return _with_work(_step_times(timer.ends, s.warmup), timer.work)


# --- rollout throughput --------------------------------------------------------------------------------

def rollout(root: Path, s: BenchSettings) -> dict:
    """Tokens per second of `pluribus.rollout.sample` and `model.generate` on the GRPO batch (P prompts × G) and
    the OPD batch (its first draw), alternating call by call. Same sampling on both sides: temperature 1, no
    top-k or top-p, at most max_new_tokens, a row stops at EOS (counted)."""
    from pluribus.models import load, pad_batch, render_prompt
    from pluribus.rollout import SamplingParams, sample

    model, tok = load(root / "student", trainable=False)
    eos, pad = tok.eos_token_id, tok.pad_token_id
    batches = {"grpo_batch": [r for r in grpo_records(s) for _ in range(s.group)],
               "opd_batch": opd_draws(opd_records(s), s)[0]}
    params = SamplingParams(s.max_new_tokens)
    out = {}
    for name, records in batches.items():
        prompts = [render_prompt(tok, r.messages()) for r in records]
        ids, attn = pad_batch(prompts, pad, side="left")

        def pluribus_call(rep: int) -> int:
            return int(sample(model, prompts, params, eos_id=eos, pad_id=pad, seed=rep).lengths.sum())

        def generate_call(rep: int) -> int:
            with torch.no_grad():
                generated = model.generate(input_ids=ids, attention_mask=attn, do_sample=True, max_new_tokens=
                                           s.max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, pad_token_id=pad,
                                           eos_token_id=eos)
            rows = generated[:, ids.shape[1]:].tolist()
            return sum(row.index(eos) + 1 if eos in row else len(row) for row in rows)

        runs: dict[str, list[tuple[int, float, float]]] = {"pluribus": [], "generate": []}
        calls = {"pluribus": pluribus_call, "generate": generate_call}
        for rep in range(s.warmup + s.steps * s.rounds):
            for side in (("pluribus", "generate") if rep % 2 == 0 else ("generate", "pluribus")):
                wall, cpu = _marks()
                tokens = calls[side](rep)
                wall_end, cpu_end = _marks()
                if rep >= s.warmup:
                    runs[side].append((tokens, wall_end - wall, cpu_end - cpu))
        out[name] = {"rows": len(prompts), **{f"{side}_{key}": value for side, timed in runs.items()
                                              for key, value in _throughput(timed).items()}}
    out["threads"] = torch.get_num_threads()
    return out


def _throughput(timed: list[tuple[int, float, float]]) -> dict:
    return {"tokens_per_s": statistics.median(n / wall for n, wall, _ in timed),
            "cpu_tokens_per_s": statistics.median(n / cpu for n, _, cpu in timed),
            "tokens_per_call": statistics.median(n for n, _, _ in timed)}


# --- OPD with many teachers ----------------------------------------------------------------------------

class _TeacherStep:
    """The OPD step after the rollout with `teachers` LoRA teachers over one base, on a fixed batch: a student of
    its own (`loaded`: the model and tokenizer), its optimizer, its teacher pool, the batch ordered by that pool's
    teachers.

    One `step()`: the teachers' hidden states (`TeacherPool.teacher_states`), the student forward, the chunked exact
    KL backpropagated one teacher head at a time, and the AdamW step. Domain k goes to teacher k mod E."""

    def __init__(self, root: Path, s: BenchSettings, teachers: int, records: list, rollout, loaded: tuple):
        from pluribus.config import OptimConfig
        from pluribus.rollout import Rollout
        from pluribus.stages.common import make_optimizer
        from pluribus.teachers import TeacherPool, TeacherSpec, output_head

        self.student, self.tok = loaded
        domains = list(dict.fromkeys(r.domain for r in records))
        specs = [TeacherSpec(f"t{e}", root / f"lora-teacher-{e}", tuple(d for k, d in enumerate(domains)
                                                                       if k % teachers == e)) for e in range(teachers)]
        self.optimizer, self.scheduler = make_optimizer(self.student, OptimConfig(lr=s.lr, warmup_steps=0),
                                                        s.warmup + s.steps * s.rounds)
        self.head, self.bias = output_head(self.student)
        self.pool = TeacherPool(specs, self.tok, vocab_size=self.head.shape[0])
        index = self.pool.route([r.domain for r in records])
        order = self.pool.order(index)
        self.index = [index[i] for i in order]
        self.rollout = Rollout([rollout.prompt_ids[i] for i in order], rollout.response_ids_B_T[order],
                               rollout.response_mask_B_T[order], rollout.sampler_logprobs_B_T[order], None,
                               [rollout.finish_reasons[i] for i in order])

    def step(self) -> tuple[float, int]:
        """One update; returns (loss, tokens)."""
        from pluribus.stages.common import optimizer_step
        from pluribus.teachers import distill_backward, response_hidden_states

        r, pad = self.rollout, self.tok.pad_token_id
        states = self.pool.teacher_states(r.prompt_ids, r.response_ids_B_T, r.response_mask_B_T, self.index, pad)
        self.student.train()
        hidden = response_hidden_states(self.student, r.prompt_ids, r.response_ids_B_T, r.response_mask_B_T, pad)
        loss, _, tokens = distill_backward(hidden, self.head, states, self.pool.weights_E, 1024, self.bias)
        optimizer_step(self.student, self.optimizer, self.scheduler, 1.0)
        return float(loss), int(tokens.sum())


def _teacher_batch(root: Path, s: BenchSettings) -> tuple[tuple, list, object]:
    """The student and the many-teacher batch: `teacher_batch` prompts spread over the first max(teacher_counts)
    world domains, sampled once by the student with per-request seeds (every process, every count gets the same
    tokens)."""
    from pluribus.models import load, render_prompt
    from pluribus.rollout import SamplingParams, sample
    from pluribus.world import DOMAINS, generate

    torch.manual_seed(s.seed)
    student, tok = load(root / "student")
    domains = list(DOMAINS)[: max(s.teacher_counts)]
    per_domain = max(1, s.teacher_batch // len(domains))
    records = [r for d in domains for r in generate(d, "train", per_domain, seed=s.seed)]
    rollout = sample(student, [render_prompt(tok, r.messages()) for r in records], SamplingParams(s.max_new_tokens),
                     eos_id=tok.eos_token_id, pad_id=tok.pad_token_id, request_seeds=range(len(records)))
    return (student, tok), records, rollout


def opd_teachers(root: Path, s: BenchSettings, teachers: int) -> dict:
    """The OPD step after the rollout with `teachers` LoRA teachers (`_TeacherStep`), alone in this process: its
    peak memory, the process's resident high-water mark, whole and above the RSS once the student and the batch
    exist. The rollout is left out: it does not depend on the number of teachers."""
    loaded, records, rollout = _teacher_batch(root, s)
    baseline = rss_bytes()
    reset = reset_peak()
    run = _TeacherStep(root, s, teachers, records, rollout, loaded)
    ends = [_marks()]
    for _ in range(s.warmup + s.steps):
        loss, tokens = run.step()
        ends.append(_marks())
    peak = peak_bytes()
    result = _step_times(ends, s.warmup + 1)  # ends[0] is the start, not a step end
    result.update(teachers=teachers, tokens=tokens, loss=loss, loads=run.pool.loads,
                  switches_per_step=run.pool.adapter_switches / (s.warmup + s.steps), peak_mib=peak / MIB,
                  above_baseline_mib=(peak - baseline) / MIB if reset and baseline is not None else None,
                  teacher_params_mib=run.pool.resident_bytes / MIB)
    return result


def opd_teachers_alternating(root: Path, s: BenchSettings) -> dict:
    """The step times the teacher-count ratio is taken from: every count's `_TeacherStep` in this one process,
    stepped in turn (the order reversed every round), `warmup` untimed steps each, then `steps · rounds` timed.

    A slow stretch of a shared machine then falls on every count alike; in processes of their own (as the memory
    is measured), a few seconds of a busy neighbour landed on one count's steps (12 vs 1 teachers: 1.24× in one
    run, 0.99-1.03× in separate runs of the same code). Returns {count: step times}."""
    from pluribus.models import load

    _, records, rollout = _teacher_batch(root, s)
    runs = {count: _TeacherStep(root, s, count, records, rollout, load(root / "student")) for count in s.teacher_counts}
    for run in runs.values():
        for _ in range(s.warmup):
            run.step()
    timed: dict[int, list[tuple[float, float]]] = {count: [] for count in runs}
    for rep in range(s.steps * s.rounds):
        for count in (s.teacher_counts if rep % 2 == 0 else s.teacher_counts[::-1]):
            start = _marks()
            runs[count].step()
            end = _marks()
            timed[count].append((end[0] - start[0], end[1] - start[1]))
    return {str(count): {"steps_s": [w for w, _ in t], "cpu_steps_s": [c for _, c in t],
                         "threads": torch.get_num_threads()} for count, t in timed.items()}


def chunked_kl(root: Path, s: BenchSettings) -> dict:
    return chunked_kl_peak(s.kl_positions, s.kl_vocab, s.kl_dim, s.kl_chunk)


TASKS = {"grpo_pluribus": grpo_pluribus, "grpo_trl": grpo_trl, "opd_pluribus": opd_pluribus, "opd_trl": opd_trl,
         "rollout": rollout, "opd_teachers": opd_teachers, "opd_teachers_alternating": opd_teachers_alternating,
         "chunked_kl": chunked_kl}


