"""One OPD step with 1, 4 and 12 LoRA teachers over one base, on the same batch: time and peak memory.

    python benchmarks/opd_teachers.py            # tiny preset size 4, 48 rollouts of ≤ 32 tokens, 7 timed steps
    python benchmarks/opd_teachers.py --smoke    # size 1, 12 rollouts, seconds

The step timed is everything after the rollout: the teachers' hidden states (`TeacherPool.teacher_states`),
the student forward, the chunked exact KL backpropagated one teacher head at a time, and the AdamW step.
The rollout is excluded (it does not depend on the number of teachers); its time is printed once for
scale. The batch is the same for every configuration: 4 prompts from each of the 12 world domains,
sampled once per worker with per-request seeds, so every worker gets the same tokens; with E teachers,
domain k goes to teacher k mod E.

Each configuration runs in a fresh subprocess. Peak memory is the process's resident high-water mark
(VmHWM): for the whole process, and above the RSS reached once the student and the batch exist
(the high-water mark is reset there through /proc/self/clear_refs where Linux allows it).
Not a test: it prints figures.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

MIB = 1 << 20
TEACHER_COUNTS = (1, 4, 12)


def _status(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


def build(root: Path, size: int, rank: int) -> None:
    """The base (the tiny preset) and 12 LoRA teachers over it, each with its own perturbed lora_B."""
    import torch

    from pluribus.models import add_lora, build_tiny, load, save

    base = build_tiny(root / "base", size=size, seed=0)
    for k in range(max(TEACHER_COUNTS)):
        model, tok = load(base)
        model = add_lora(model, rank=rank, alpha=2 * rank)
        gen = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "lora_B" in name:
                    p.copy_(0.05 * torch.randn(p.shape, generator=gen))
        save(model, tok, root / f"teacher-{k}")


def worker(root: Path, teachers: int, batch: int, max_new_tokens: int, warmup: int, steps: int) -> dict:
    """Runs in the subprocess: the timed OPD steps with `teachers` LoRA teachers."""
    import torch

    from pluribus.config import OptimConfig
    from pluribus.models import load, render_prompt
    from pluribus.rollout import Rollout, SamplingParams, sample
    from pluribus.stages.common import make_optimizer, optimizer_step
    from pluribus.teachers import TeacherPool, TeacherSpec, distill_backward, output_head, response_hidden_states
    from pluribus.world import DOMAINS, generate

    torch.manual_seed(0)
    student, tok = load(root / "base")
    domains = list(DOMAINS)[: max(TEACHER_COUNTS)]
    per_domain = max(1, batch // len(domains))
    records = [r for d in domains for r in generate(d, "train", per_domain, seed=0)]
    t0 = time.perf_counter()
    rollout = sample(student, [render_prompt(tok, r.messages()) for r in records],
                     SamplingParams(max_new_tokens, temperature=1.0), eos_id=tok.eos_token_id,
                     pad_id=tok.pad_token_id, request_seeds=range(len(records)))
    rollout_s = time.perf_counter() - t0

    specs = [TeacherSpec(f"t{e}", root / f"teacher-{e}", tuple(d for k, d in enumerate(domains) if k % teachers == e))
             for e in range(teachers)]
    optimizer, scheduler = make_optimizer(student, OptimConfig(lr=1e-4, warmup_steps=0), warmup + steps)
    head, bias = output_head(student)
    baseline = _status("VmRSS")
    reset = _reset_peak()

    pool = TeacherPool(specs, tok, vocab_size=head.shape[0])
    index = pool.route([r.domain for r in records])
    order = pool.order(index)
    index = [index[i] for i in order]
    rollout = Rollout([rollout.prompt_ids[i] for i in order], rollout.response_ids_B_T[order],
                      rollout.response_mask_B_T[order], rollout.sampler_logprobs_B_T[order], None,
                      [rollout.finish_reasons[i] for i in order])
    step_s, teacher_s = [], []
    for step in range(warmup + steps):
        t0 = time.perf_counter()
        states = pool.teacher_states(rollout.prompt_ids, rollout.response_ids_B_T, rollout.response_mask_B_T,
                                     index, tok.pad_token_id)
        t1 = time.perf_counter()
        student.train()
        hidden = response_hidden_states(student, rollout.prompt_ids, rollout.response_ids_B_T,
                                        rollout.response_mask_B_T, tok.pad_token_id)
        loss, _, tokens = distill_backward(hidden, head, states, pool.weights_E, 1024, bias)
        optimizer_step(student, optimizer, scheduler, 1.0)
        del states, hidden
        t2 = time.perf_counter()
        if step >= warmup:
            step_s.append(t2 - t0)
            teacher_s.append(t1 - t0)
    teacher_bytes = pool.resident_bytes
    peak = _status("VmHWM")
    return dict(teachers=teachers, step_s=statistics.median(step_s), teacher_s=statistics.median(teacher_s),
                rollout_s=rollout_s, tokens=int(tokens.sum()), loss=float(loss), loads=pool.loads,
                switches_per_step=pool.adapter_switches / (warmup + steps), peak_mib=peak / MIB,
                above_baseline_mib=(peak - baseline) / MIB if reset else float("nan"),
                teacher_params_mib=teacher_bytes / MIB, threads=torch.get_num_threads())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=4, help="tiny preset size (hidden = 64·size)")
    parser.add_argument("--batch", type=int, default=48, help="rollouts per step (split over 12 domains)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--rank", type=int, default=16, help="LoRA rank of the teachers")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--steps", type=int, default=7, help="timed steps (medians reported)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads in each worker")
    parser.add_argument("--smoke", action="store_true", help="size 1, 12 rollouts, 1 + 2 steps")
    parser.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--root", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.smoke:
        args.size, args.batch, args.max_new_tokens, args.warmup, args.steps = 1, 12, 12, 1, 2

    if args.worker is not None:
        import torch

        torch.set_num_threads(args.threads)
        print(json.dumps(worker(args.root, args.worker, args.batch, args.max_new_tokens, args.warmup, args.steps)))
        return

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        build(root, args.size, args.rank)
        results = []
        for teachers in TEACHER_COUNTS:
            command = [sys.executable, __file__, "--worker", str(teachers), "--root", str(root),
                       "--batch", str(args.batch), "--max-new-tokens", str(args.max_new_tokens),
                       "--warmup", str(args.warmup), "--steps", str(args.steps), "--threads", str(args.threads)]
            done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
            if done.returncode:
                sys.exit(f"worker with {teachers} teachers failed:\n{done.stderr[-3000:]}")
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))

    first = results[0]
    print(f"tiny preset size {args.size}, {first['tokens']} response tokens per step ({args.batch} rollouts), "
          f"LoRA rank {args.rank}, {first['threads']} thread(s); medians of {args.steps} steps after {args.warmup} "
          f"warm-up; rollout excluded (one rollout of this batch: {first['rollout_s']:.2f} s)")
    print(f"{'teachers':>8} {'step s':>8} {'teacher s':>9} {'switches':>8} {'loads':>5} {'peak RSS MiB':>12} "
          f"{'above base MiB':>14} {'teacher params MiB':>18}")
    for r in results:
        print(f"{r['teachers']:>8} {r['step_s']:>8.3f} {r['teacher_s']:>9.3f} {r['switches_per_step']:>8.1f} "
              f"{r['loads']:>5} {r['peak_mib']:>12.1f} {r['above_baseline_mib']:>14.1f} {r['teacher_params_mib']:>18.1f}")
    last = results[-1]
    print(f"12 vs 1 teacher: step time ×{last['step_s'] / first['step_s']:.2f} (target ≤ 1.15), "
          f"peak RSS ×{last['peak_mib'] / first['peak_mib']:.2f} (target ≤ 1.25), "
          f"peak above baseline ×{last['above_baseline_mib'] / first['above_baseline_mib']:.2f}")


if __name__ == "__main__":
    main()
