"""What every training loop shares: records from config, optimizer and schedule, the LM loss, seeding."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
from pathlib import Path

import torch

from pluribus import dist
from pluribus.config import DataConfig, OptimConfig
from pluribus.data import Record, read_jsonl
from pluribus.durable import write_text
from pluribus.errors import PluribusError
from pluribus.models import device_of, pad_batch, target_logits


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def load_records(data: DataConfig, split: str = "train") -> list[Record]:
    """World records for `data.domains` plus every record of `data.jsonl`."""
    from pluribus.world import generate

    if not data.domains and not data.jsonl:
        raise PluribusError("data: no domains and no jsonl files: name world domains (`pluribus world list`) "
                            "or JSONL files to train on")
    records = [r for d in data.domains for r in generate(d, split, data.n_per_domain, data.seed)]
    for path in data.jsonl:
        records.extend(read_jsonl(path))
    return records


def make_optimizer(model, optim: OptimConfig, total_steps: int):
    """AdamW over trainable parameters + a LambdaLR warmup then cosine/linear/constant schedule."""
    params = [p for p in model.parameters() if p.requires_grad]
    # The fused kernel: one pass over each parameter instead of ~10 elementwise ops, 2.2 -> 0.6 ms a step for the
    # bench's 1.1M parameters on one CPU thread (the same AdamW, equal to float rounding).
    fused = all(p.is_floating_point() and p.device.type in ("cpu", "cuda") for p in params) or None
    opt = torch.optim.AdamW(params, lr=optim.lr, betas=optim.betas, weight_decay=optim.weight_decay, fused=fused)

    def factor(step: int) -> float:
        if step < optim.warmup_steps:
            return (step + 1) / optim.warmup_steps
        if optim.schedule == "constant":
            return 1.0
        progress = min(1.0, (step - optim.warmup_steps) / max(1, total_steps - optim.warmup_steps))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if optim.schedule == "cosine" else 1 - progress
        return optim.min_lr_ratio + (1 - optim.min_lr_ratio) * shape

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, factor)


def lm_loss(model, sequences: list[list[int]], loss_starts: list[int], pad_id: int,
            normaliser: int | None = None) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over tokens at positions ≥ loss_start of each sequence; (loss, token count).

    loss_start is the index of the first token that is a target: the prompt length for SFT (the
    prompt is context, not a target), 1 for pretraining on whole texts.
    normaliser: divide the summed loss by this instead of the token count (a data-parallel rank's share
    of a global batch divides by the global count: `target_count` summed over ranks).
    """
    packed = target_logits(model, sequences, loss_starts)  # no padding (pluribus.models.lean), where it applies
    if packed is not None:
        logits_M_V, targets_M = packed
        loss = torch.nn.functional.cross_entropy(logits_M_V.float(), targets_M, reduction="sum")
        count = targets_M.numel()
        return loss / max(1, count if normaliser is None else normaliser), count
    ids, attn = pad_batch(sequences, pad_id, device=device_of(model))
    labels = ids.clone()
    positions = torch.arange(ids.shape[1], device=ids.device)[None, :]
    labels[(positions < torch.tensor(loss_starts, device=ids.device)[:, None]) | (attn == 0)] = -100
    logits = model(input_ids=ids, attention_mask=attn).logits
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1).float(), targets.flatten(),
                                             ignore_index=-100, reduction="sum")
    count = int((targets != -100).sum())
    return loss / max(1, count if normaliser is None else normaliser), count


def target_count(sequences: list[list[int]], loss_starts: list[int]) -> int:
    """The token count `lm_loss` will find, without a forward pass."""
    return sum(max(0, len(s) - max(1, start)) for s, start in zip(sequences, loss_starts))


def global_lm_loss(trainer, world, sequences: list[list[int]], loss_starts: list[int], pad_id: int):
    """`lm_loss` of this rank's part of a global batch, normalised by the global target count
    (`pluribus.dist`), and that count. One process: `lm_loss` itself."""
    if world.size == 1:
        return lm_loss(trainer, sequences, loss_starts, pad_id)
    total = int(dist.all_sum(torch.tensor([target_count(sequences, loss_starts)], device="cpu")).item())
    loss, _ = lm_loss(trainer, sequences, loss_starts, pad_id, normaliser=total)
    return loss, total


def length_buckets(items: list, length, batch_size: int, rng: random.Random) -> list[list]:
    """Split items into batches of similar length (sorted, chunked, batches shuffled): less padding."""
    ordered = sorted(items, key=length)
    batches = [ordered[i:i + batch_size] for i in range(0, len(ordered), batch_size)]
    rng.shuffle(batches)
    return batches


def optimizer_step(model, optimizer, scheduler, grad_clip: float) -> tuple[float, bool]:
    """Clip, step, zero; skip the update when the gradient is not finite. (grad norm, stepped)."""
    params = [p for p in model.parameters() if p.requires_grad]
    norm = dist.scalar(torch.nn.utils.clip_grad_norm_(params, grad_clip))  # FSDP2: a replicated DTensor
    stepped = math.isfinite(norm)
    if stepped:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    scheduler.step()
    return norm, stepped


class MetricsLog:
    """Metric dicts as JSONL, flushed per line (readable while the stage runs), and as TensorBoard scalars in
    `<name>.tb/` beside it when tensorboard (extra `tb`) or tensorboardX is installed.

    start_step: where a resumed loop starts; lines of that step and later (written after the checkpoint it
    resumes from) are dropped, and TensorBoard purges them, so no step is logged twice. 0: a new log.
    """

    def __init__(self, path, start_step: int = 0):
        self.path = Path(path)
        self.enabled = dist.is_main()  # under torchrun, rank 0 writes the (already reduced) metrics
        if not self.enabled:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        kept = []
        if start_step and self.path.is_file():
            for line in self.path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break  # torn by the crash: nothing after it was written
                if row.get("step", -1) < start_step:
                    kept.append(line + "\n")
        write_text(self.path, "".join(kept))
        tb_dir = self.path.with_name(self.path.name.removesuffix(".jsonl").removesuffix(".metrics") + ".tb")
        if not start_step:
            shutil.rmtree(tb_dir, ignore_errors=True)
        self._tb = _summary_writer(tb_dir, start_step)
        self._f = open(self.path, "a")

    def write(self, **metrics) -> None:
        if not self.enabled:
            return
        self._f.write(json.dumps({k: (round(v, 6) if isinstance(v, float) else v) for k, v in metrics.items()}) + "\n")
        self._f.flush()
        if self._tb is not None and "step" in metrics:
            for k, v in metrics.items():
                if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                    self._tb.add_scalar(k, v, metrics["step"])
            self._tb.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._f.close()
        if self._tb is not None:
            self._tb.close()


def _summary_writer(log_dir: Path, purge_step: int):
    """A TensorBoard SummaryWriter when one is installed, else None; events from `purge_step` on are hidden."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        try:
            from tensorboardX import SummaryWriter
        except ImportError:
            return None
    return SummaryWriter(str(log_dir), purge_step=purge_step or None)


def progress(description: str, total: int, completed: int = 0):
    """A rich progress bar with ETA (quiet when not on a terminal and under pytest); `completed` for a resumed loop."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    disable = "PYTEST_CURRENT_TEST" in os.environ or not sys.stderr.isatty() or not dist.is_main()
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                   TextColumn("eta"), TimeRemainingColumn(), TextColumn("{task.fields[info]}"), disable=disable,
                   transient=False)
    task = bar.add_task(description, total=total, completed=completed, info="")
    return bar, task
