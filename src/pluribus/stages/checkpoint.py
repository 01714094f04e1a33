"""Mid-stage checkpoints: a killed training loop resumes where its last checkpoint left it, with the same numbers.

A loop writing `<out>` keeps its checkpoints in `<out>.ckpt/`:

- `key`: the fingerprint of what the loop was started with (its config less `checkpoint_every` and where it
  runs, `distributed` and `device`; and its training records). A folder with another key belongs to another
  run and is cleared.
- `step-<N>/`, N the number of steps completed: `model/`, the weights as the stage's final save writes
  them (an HF folder, or a LoRA adapter), and `state.pt`: optimizer, scheduler, the Python and torch
  RNG states, the loop's own state (its data-order `random.Random`, a half-used batch buffer, ...).
- `rollout-<step>.jsonl` (RL loops): the token-granular log (`pluribus.rollout.TokenLog`) of each
  rollout batch since the last checkpoint. A batch a crash interrupted resumes from its log instead of
  being generated again (DeepSeek-V4 §5.2.3); a finished one replays without generating at all.

A checkpoint is written into `step-<N>.tmp/`, fsynced, renamed to `step-<N>/`, and only then is the
previous one deleted: a folder named `step-<N>` is always whole, and at most two exist at a time.

Under torchrun (`pluribus.dist`) rank 0 writes the checkpoint, from full state dicts (FSDP2 gathers
them), with every rank's RNG states; each rank keeps its own rollout log (`rollout-<step>-rank<r>.jsonl`),
and a resume puts each rank's RNG states back. A checkpoint is the same files whatever the number of
processes, so one process can resume it (its data order is the same; its RNG states are rank 0's).

Resuming is exact: the same seed on the same machine gives bit-identical weights whether or not the
loop was killed. One exception: when the kill fell inside a rollout, the tokens generated after the
restart come from one prefill over prompt + logged prefix instead of step-by-step decoding, so their
sampler log-probs differ from the uninterrupted run's by float rounding (~1e-6), and so may, with
top-p/top-k, a keep mask at its cut-off. The tokens are the same (sampling noise is seeded per request
and position), and so are the scores in practice.
"""

from __future__ import annotations

import functools
import random
import shutil
from pathlib import Path
from typing import Any, Sequence

import torch

from pluribus import dist
from pluribus.crash import armed, crash_point, kill
from pluribus.durable import fingerprint, holds, publish_dir, write_text
from pluribus.errors import PluribusError
from pluribus.models import load_weights, save, saved_weights
from pluribus.rollout import Rollout, SamplingParams, sample

STATE_FILE = "state.pt"
CRASH_AFTER_TOKENS = 3  # how far a rollout gets before the `rollout@N` crash point kills it


def checkpoint_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".ckpt")


class Checkpointer:
    """Saves and restores one training loop's state; the loop calls `restore` once, then `step_done` after each step.

    out: the loop's final model folder (the checkpoints go beside it, and crash points name it).
    every: steps between checkpoints; one is also taken after the last step (`total`).
    config, records: what the run is (the loop's config as a dict, its training records): a checkpoint of
        another config or other records is never resumed. `checkpoint_every` does not count.
    model, tokenizer, optimizer, scheduler: what a checkpoint saves and a restore fills in place.
    """

    def __init__(self, out: str | Path, *, every: int, total: int, config: dict[str, Any], records: list | None,
                 model, tokenizer, optimizer, scheduler):
        self.out = Path(out)
        self.dir = checkpoint_dir(out)
        self.every, self.total = every, total
        config = {k: v for k, v in config.items() if k not in ("checkpoint_every", "distributed", "device")}
        self.key = fingerprint({"config": config, "records": records})
        self.model, self.tokenizer, self.optimizer, self.scheduler = model, tokenizer, optimizer, scheduler

    def restore(self, state: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        """(steps completed, loop state): from the latest checkpoint, with weights, optimizer, scheduler and
        global RNGs put back; (0, `state`) when there is none."""
        if dist.is_main():
            self._clear_unless_ours()
        dist.barrier()
        saved_dirs = sorted(self.dir.glob("step-*"))
        if not saved_dirs:
            return 0, state
        latest = saved_dirs[-1]
        try:
            # on the CPU (a GPU run's optimizer state too): loading puts it beside the parameters
            saved = torch.load(latest / STATE_FILE, map_location="cpu", weights_only=False)
            if dist.is_fsdp(self.model):
                dist.load_model_state(self.model, saved_weights(latest / "model"))
            else:
                load_weights(self.model, latest / "model")
        except (OSError, RuntimeError, PluribusError) as e:
            raise PluribusError(f"{latest}: checkpoint unreadable ({e}); delete {self.dir} to start the stage "
                                f"afresh") from None
        dist.load_optimizer_state(self.model, self.optimizer, saved["optimizer"])
        self.scheduler.load_state_dict(saved["scheduler"])
        rngs = saved.get("rank_rngs") or [(saved["python_rng"], saved["torch_rng"], saved["cuda_rng"])]
        python_rng, torch_rng, cuda_rng = rngs[dist.world().rank if dist.world().rank < len(rngs) else 0]
        random.setstate(python_rng)
        torch.set_rng_state(torch_rng)
        if cuda_rng is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(cuda_rng)
        if dist.is_main():
            self._drop_rollout_logs(before=saved["step"])
        dist.barrier()
        print(f"[{self.out}] resumed after step {saved['step'] - 1} of {self.total}")
        return saved["step"], saved["loop"]

    def _clear_unless_ours(self) -> None:
        key_file = self.dir / "key"
        if not holds(key_file, self.key):
            shutil.rmtree(self.dir, ignore_errors=True)  # another run's, or none
            self.dir.mkdir(parents=True)
            write_text(key_file, self.key)
            return
        for partial in self.dir.glob("step-*.tmp"):  # a write the crash interrupted
            shutil.rmtree(partial)

    def step_done(self, step: int, state: dict[str, Any]) -> None:
        """After step `step` (0-based) with the loop's `state`: a checkpoint when one is due, then the crash point."""
        done = step + 1
        if done % self.every == 0 or done == self.total:
            self._save(done, state)
        crash_point(self.out, str(step))

    def _save(self, done: int, state: dict[str, Any]) -> None:
        # gathered on every rank (collectives under FSDP2 and torchrun), written by rank 0
        weights, optimizer = dist.model_state(self.model), dist.optimizer_state(self.model, self.optimizer)
        rngs = dist.all_gather_objects((random.getstate(), torch.get_rng_state(),
                                        torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None))
        if dist.is_main():
            self._write(done, state, weights, optimizer, rngs if len(rngs) > 1 else None)
        dist.barrier()

    def _write(self, done: int, state: dict[str, Any], weights: dict | None, optimizer: dict,
               rank_rngs: list | None) -> None:
        final = self.dir / f"step-{done:08d}"
        tmp = final.with_name(final.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        save(self.model, self.tokenizer, tmp / "model", {"checkpoint_of": str(self.out), "steps_done": done},
             state_dict=weights)
        saved = {"step": done, "optimizer": optimizer, "scheduler": self.scheduler.state_dict(),
                 "python_rng": random.getstate(), "torch_rng": torch.get_rng_state(),
                 "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None, "loop": state}
        if rank_rngs is not None:
            saved["rank_rngs"] = rank_rngs
        torch.save(saved, tmp / STATE_FILE)
        crash_point(self.out, f"checkpoint@{done - 1}")
        publish_dir(tmp, final)
        for old in self.dir.glob("step-*"):
            if old != final:
                shutil.rmtree(old)
        self._drop_rollout_logs(before=done)

    def rollout_log(self, step: int) -> Path:
        w = dist.world()
        return self.dir / (f"rollout-{step:08d}.jsonl" if w.size == 1 else f"rollout-{step:08d}-rank{w.rank}.jsonl")

    def _drop_rollout_logs(self, before: int) -> None:
        for log in self.dir.glob("rollout-*.jsonl"):
            if int(log.stem.split("-")[1]) < before:
                log.unlink()

    def sample(self, step: int, model, prompt_ids: list[list[int]], params: SamplingParams, *, eos_id: int,
               pad_id: int, request_seeds: Sequence[int], tokenizer, engine=None, prompts=None,
               record: bool = False) -> Rollout:
        """`pluribus.rollout.sample` (or `engine.generate`, a `pluribus.rollout.engine.RolloutEngine`) through
        step `step`'s token log: an interrupted batch resumes, a finished one replays. prompts: the prompts'
        `PromptStates` at these weights, for the sampler's prefill; record: keep the decode's projections
        (`Rollout.decoded`)."""

        cut = CRASH_AFTER_TOKENS if armed(self.out, f"rollout@{step}") else None
        log = self.rollout_log(step)
        if log.is_file():
            print(f"[{self.out}] step {step}: rollout resumed from its token log")
        generate = engine.generate if engine is not None else functools.partial(sample, model)
        rollout = generate(prompt_ids, params, eos_id=eos_id, pad_id=pad_id, request_seeds=request_seeds,
                           tokenizer=tokenizer, log_path=log, stop_after_steps=cut, prompts=prompts, record=record)
        if cut is not None:
            kill()
        return rollout
