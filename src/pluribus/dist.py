"""Data parallelism under `torchrun`: process group, sharding, reductions, DDP/FSDP2 wrapping, rank-0 saves.

Every training stage calls `init()` first. Launched by `torchrun --nproc_per_node N` (WORLD_SIZE > 1
in the environment) it joins the process group, gloo on CPU and NCCL on GPU; otherwise it returns a
one-process `World` and nothing below communicates, so a plain `python`/`pluribus` run computes
exactly what it did before this module existed. When a command has done its work, the command line
calls `finish()` (every rank waits for the others, then leaves the group) and `exit_process()`.

The contract every loop follows, so that N processes × 1/N of the batch compute what one process
computes on the whole batch:
- Each rank takes its contiguous slice of the global batch (`World.shard`); every rank draws the
  same global batch from identically seeded generators, so nothing but results is exchanged.
- Each rank's loss is its share of the global loss: its terms divided by the *global* normaliser
  (tokens, sequences, tokens per teacher: `all_sum` of the local counts).
- Gradients are summed over ranks, not averaged (`wrap` sets DDP's comm hook and FSDP2's divide
  factor to 1): with global normalisers the sum is the whole batch's gradient, whatever N is.
- Work whose results every rank needs (the GRM's labelled items, its held-out judge metrics) is `spread`:
  each rank generates its part, seeded by global index, and the results are gathered.
- Metrics are reduced (`weighted_means`, `all_sum`, `all_gather_rows`) and written by rank 0 only;
  models and checkpoints are written once by rank 0 from a full state dict (FSDP2 gathers it), so a
  single process loads them as usual.

FSDP2 (`fully_shard` on each decoder layer, then the root) keeps 1/N of the parameters, gradients and
optimizer state per rank. Generation with the HF sampler needs the whole model on each rank:
`gathered` all-gathers the parameters for the duration of a rollout (a vLLM engine would hold its
own copy instead). FSDP2 trains full weights; LoRA runs use DDP (the trainable part is small).
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import re
import sys
from dataclasses import dataclass
from typing import Callable, Iterator, Literal, NoReturn, Sequence, TypeVar

import torch
import torch.distributed as tdist

from pluribus.errors import PluribusError

Mode = Literal["ddp", "fsdp2"]
T = TypeVar("T")
R = TypeVar("R")


@dataclass(frozen=True)
class World:
    """Where this process stands: rank in [0, size), and the device it trains on (as `init` resolved it; `world()`
    with one process does not know the stage's setting and says cpu: loops take devices from their tensors)."""

    rank: int = 0
    size: int = 1
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def per_rank(self, n: int, what: str) -> int:
        """`n` / the world size, where `n` (a global batch: `what`) divides evenly; else one line."""
        if n % self.size:
            raise PluribusError(f"{what} {n} does not split evenly over {self.size} processes: use a multiple "
                                f"of {self.size}")
        return n // self.size

    def shard(self, items: Sequence[T], what: str = "items") -> list[T]:
        """This rank's contiguous slice of `items`; their number must divide by the world size."""
        n = self.per_rank(len(items), what)
        return list(items[self.rank * n:(self.rank + 1) * n])


def init(device: str = "auto") -> World:
    """Join the torchrun process group (once per process); a one-process World when not under torchrun.

    device: the stage's setting (auto, cpu, cuda, cuda:N), which `World.device` resolves. Under torchrun each
    process trains on cuda:LOCAL_RANK over NCCL when CUDA is there and the setting allows it (auto, cuda), else
    on the CPU over gloo; cuda:N, which would put every process on one GPU, is refused."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size <= 1:
        return World(device=resolve_device(device))
    if device.startswith("cuda:"):
        raise PluribusError(f"device {device}: under torchrun each process trains on cuda:LOCAL_RANK; "
                            "set device to cuda or auto")
    resolve_device(device)  # a bad setting, or cuda without CUDA: one line
    if not tdist.is_initialized():
        on_gpu = device != "cpu" and torch.cuda.is_available()
        if on_gpu:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        tdist.init_process_group("nccl" if on_gpu else "gloo")
        atexit.register(_teardown)
    w = world()
    if device != "auto" and w.device.type != device:
        raise PluribusError(f"device {device}: this process already joined a torchrun group on {w.device.type}")
    return w


def resolve_device(setting: str = "auto") -> torch.device:
    """The device a setting names on this machine: auto is cuda (the current device) when CUDA is available,
    else cpu; cpu, cuda and cuda:N as named. A malformed setting, or a GPU this machine lacks, is one line."""
    if not re.fullmatch(r"auto|cpu|cuda(:\d+)?", setting):
        raise PluribusError(f"unknown device '{setting}' (use auto, cpu, cuda or cuda:N)")
    if setting == "cpu" or (setting == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise PluribusError(f"device {setting}: no CUDA device on this machine (torch {torch.__version__}); "
                            "use cpu or auto")
    index = torch.device(setting if setting != "auto" else "cuda").index
    index = torch.cuda.current_device() if index is None else index
    if index >= torch.cuda.device_count():
        raise PluribusError(f"device {setting}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return torch.device("cuda", index)


def _teardown() -> None:
    """At exit, a run that did not `finish` (it failed): leave the group without waiting for the other ranks."""
    if tdist.is_initialized():
        tdist.destroy_process_group()


def finish() -> bool:
    """End a run under torchrun: wait for every rank, then leave the process group. Entry points call it once
    their work is done, then `exit_process`; a failed run skips both (a barrier would wait for ranks that will
    never come). Whether there was a group to leave (False with one process: nothing to do)."""
    if not tdist.is_initialized():
        return False
    tdist.barrier()
    tdist.destroy_process_group()
    return True


def exit_process(code: int = 0) -> NoReturn:
    """End this torchrun worker now, after `finish`: output flushed, without the interpreter's and the C++
    runtime's exit-time clean-up. After DDP or FSDP2 ran, gloo's worker threads outlive
    `destroy_process_group` (held on the C++ side, no Python object left), and the normal exit tore them down
    badly about one run in 20 here: "terminate called without an active exception", exit code -6, after all
    the work was done and saved, which torchrun reports as a failed run."""
    sys.stdout.flush()
    sys.stderr.flush()
    logging.shutdown()
    os._exit(code)


def world() -> World:
    """The current World (one process when no group was joined)."""
    if not tdist.is_initialized():
        return World()
    device = torch.device("cuda", torch.cuda.current_device()) if tdist.get_backend() == "nccl" else torch.device("cpu")
    return World(tdist.get_rank(), tdist.get_world_size(), device)


def is_main() -> bool:
    return world().is_main


def barrier() -> None:
    if tdist.is_initialized():
        tdist.barrier()


# --- reductions -------------------------------------------------------------------------------------

def _comm_device() -> torch.device:
    return world().device


def all_sum(values: torch.Tensor) -> torch.Tensor:
    """Element-wise sum over ranks (a copy, float64 kept); the values themselves with one process."""
    if not tdist.is_initialized():
        return values
    out = values.detach().to(_comm_device(), copy=True)
    tdist.all_reduce(out)
    return out.to(values.device)


def all_true(flag: bool) -> bool:
    """Whether `flag` holds on every rank: a decision (skip a step, stop) that all ranks must take together."""
    return bool(all_sum(torch.tensor([0.0 if flag else 1.0], dtype=torch.float64, device="cpu")).item() == 0)


def weighted_means(values: dict[str, tuple[float, float]]) -> dict[str, float]:
    """name -> (local mean, local weight) to the global mean Σ mean·weight / Σ weight, in one all-reduce.

    One process: the local means unchanged."""
    if not tdist.is_initialized():
        return {k: v for k, (v, _) in values.items()}
    sums = all_sum(torch.tensor([[v * w, w] for v, w in values.values()], dtype=torch.float64, device="cpu"))
    return {k: float(s / w) if w > 0 else 0.0 for k, (s, w) in zip(values, sums.tolist())}


def all_gather_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `[n, ...]` rows (the same n on each), concatenated in rank order."""
    if not tdist.is_initialized():
        return tensor
    parts = [torch.empty_like(tensor, device=_comm_device()) for _ in range(tdist.get_world_size())]
    tdist.all_gather(parts, tensor.to(_comm_device()).contiguous())
    return torch.cat(parts).to(tensor.device)


def spread(items: Sequence[T], work: Callable[[list[T], int], list[R]]) -> list[R]:
    """Split work that yields one result per item (generation, judging) over the ranks: `work(part, start)` runs
    on this rank's contiguous part of `items` (`start`: the index of its first item; the parts differ in size by
    at most one), and every rank gets every rank's results, in order. When `work` seeds each item by its index
    (`start` + i), that is what one process computes with `work(items, 0)`. A collective: call on every rank."""
    w = world()
    if w.size == 1:
        return work(list(items), 0)
    start, stop = len(items) * w.rank // w.size, len(items) * (w.rank + 1) // w.size
    mine = work(list(items[start:stop]), start) if stop > start else []
    return [result for part in all_gather_objects(mine) for result in part]


def broadcast(tensor: torch.Tensor) -> torch.Tensor:
    """Rank 0's `tensor` on every rank (the same shape everywhere); unchanged with one process."""
    if not tdist.is_initialized():
        return tensor
    out = tensor.to(_comm_device()).contiguous()
    tdist.broadcast(out, 0)
    return out.to(tensor.device)


def all_gather_objects(obj):
    """Every rank's picklable `obj`, in rank order."""
    if not tdist.is_initialized():
        return [obj]
    out = [None] * tdist.get_world_size()
    tdist.all_gather_object(out, obj)
    return out


# --- wrapping ---------------------------------------------------------------------------------------

def _sum_hook(_state, bucket):
    """DDP comm hook: all-reduce SUM (DDP's default divides by the world size first)."""
    return tdist.all_reduce(bucket.buffer(), async_op=True).get_future().then(lambda fut: fut.value()[0])


def _causal_lm(model):
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def wrap(model, mode: Mode, *, trunk: bool = False, frozen: bool = False):
    """What the loop runs its training forwards through (the model itself with one process).

    ddp: `DistributedDataParallel` over the model (over its decoder when `trunk`: OPD runs the decoder
    and applies the output head itself); gradients summed over ranks.
    fsdp2: `fully_shard` on every decoder layer (the model's `_no_split_modules`) and then the root,
    in place: the returned object is the model, its parameters now DTensor shards. Rank 0's weights
    are broadcast first, so every rank shards the same tensors. The optimizer must be built after.
    frozen: a model that is only evaluated (GRPO's reference): sharded under fsdp2, left alone under ddp.
    """
    w = world()
    if w.size == 1:
        return model
    if mode == "fsdp2":
        if hasattr(model, "disable_adapter"):
            raise PluribusError("distributed: fsdp2 shards full-weight training; a LoRA run trains few "
                                "parameters: use distributed: ddp")
        from torch.distributed.fsdp import fully_shard

        model.to(w.device)
        with torch.no_grad():
            for tensor in list(model.parameters()) + list(model.buffers()):
                tdist.broadcast(tensor.data, 0)
        layers = set(getattr(model, "_no_split_modules", None) or ())
        for module in model.modules():
            if type(module).__name__ in layers:
                fully_shard(module)
        fully_shard(model)
        for module in model.modules():
            if is_fsdp(module):
                module.set_gradient_divide_factor(1.0)
                module.set_force_sum_reduction_for_comms(True)  # gloo has no PREMUL_SUM
        return model
    if frozen:
        return model
    from torch.nn.parallel import DistributedDataParallel

    target = _causal_lm(model).get_decoder() if trunk else model
    target.to(w.device)
    ddp = DistributedDataParallel(target, device_ids=[w.device] if w.device.type == "cuda" else None,
                                  broadcast_buffers=False)
    ddp.register_comm_hook(None, _sum_hook)
    return ddp


@contextlib.contextmanager
def no_sync(trainer, enabled: bool) -> Iterator[None]:
    """Backward passes inside accumulate gradients locally (gradient accumulation); the next one outside syncs."""
    if not enabled or world().size == 1:
        yield
        return
    if is_fsdp(trainer):
        trainer.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            trainer.set_requires_gradient_sync(True)
        return
    with trainer.no_sync():
        yield


def unshard(model) -> None:
    """FSDP2: all-gather every parameter and keep it so between forwards until `reshard` (HF generation runs a
    different number of forwards on each rank, which per-forward all-gathers could not follow). Call on
    every rank; in between, forwards do not communicate. A no-op otherwise."""
    for unit in _fsdp_units(model):
        unit.set_reshard_after_forward(False)
        unit.unshard()


def reshard(model) -> None:
    """Undo `unshard`: back to 1/N of the parameters per rank, and to FSDP2's defaults (the root keeps its
    parameters from forward to backward; OPD reads the output head between them)."""
    for unit in _fsdp_units(model):
        unit.reshard()
        unit.set_reshard_after_forward(unit is not model)


def _fsdp_units(model) -> list:
    return [m for m in model.modules() if is_fsdp(m)] if is_fsdp(model) else []


@contextlib.contextmanager
def gathered(model) -> Iterator[None]:
    """`unshard` for the block, then `reshard`."""
    unshard(model)
    try:
        yield
    finally:
        reshard(model)


def trunk_forward(trainer, model):
    """A function `(input_ids, attention_mask, position_ids) -> last hidden states [B, L, D]` (final norm
    applied) that runs through `trainer`'s hooks; None with one process (the model's decoder as usual)."""
    if world().size == 1:
        return None
    if is_fsdp(trainer):  # through the root, whose hooks gather the embeddings and the head; one logit row
        return lambda **kw: trainer(**kw, output_hidden_states=True, logits_to_keep=1, use_cache=False).hidden_states[-1]
    return lambda **kw: trainer(**kw, use_cache=False).last_hidden_state


def add_gradient(param: torch.Tensor | None, local_grad: torch.Tensor | None) -> None:
    """Sum `local_grad` (a full-shape gradient computed outside the wrapper's backward, e.g. OPD's output
    head) over ranks and add it to `param.grad`, this rank's shard of it under FSDP2."""
    if param is None or not param.requires_grad:
        return
    full = all_sum(local_grad if local_grad is not None else torch.zeros_like(_local(param)))
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        full = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
    param.grad = full if param.grad is None else param.grad + full


def _local(param: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor

    return param.full_tensor() if isinstance(param, DTensor) else param.detach()


def scalar(value) -> float:
    """A float from a tensor that may be a replicated DTensor (FSDP2's grad norm)."""
    from torch.distributed.tensor import DTensor

    return float(value.full_tensor() if isinstance(value, DTensor) else value)


# --- state, saved once ------------------------------------------------------------------------------

def model_state(model) -> dict | None:
    """The full state dict for saving: FSDP2 gathers it (a collective: call on every rank), rank 0 gets it,
    the others None; None too when the model's own `state_dict` will do."""
    if not is_fsdp(model):
        return None
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    seen: dict[int, str] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:  # a tied weight (the output head): saved once, as the model's own save does
            state.pop(name, None)
        seen.setdefault(id(param), name)
    return state if is_main() else None


def load_model_state(model, state: dict) -> None:
    """Put a full state dict (every rank holds it) into an FSDP2 model's shards."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    result = set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True, strict=False))
    missing = [k for k in result.missing_keys if not k.endswith("lm_head.weight")]  # tied to the embeddings
    if missing or result.unexpected_keys:
        raise PluribusError(f"saved weights do not fit the model (missing {missing[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})")


def optimizer_state(model, optimizer) -> dict:
    """The optimizer's state as one process would hold it (FSDP2: gathered, a collective)."""
    if not is_fsdp(model):
        return optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_optimizer_state(model, optimizer, state: dict) -> None:
    if not is_fsdp(model):
        optimizer.load_state_dict(state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))


def save(model, tokenizer, out, meta: dict | None = None):
    """`pluribus.models.save`, once: rank 0 writes the folder (FSDP2: from the gathered full weights),
    the others wait for it; every rank gets its path."""
    from pathlib import Path

    from pluribus.models import save as save_model

    state = model_state(model)
    path = Path(out)
    if is_main():
        path = save_model(model, tokenizer, out, meta, state_dict=state)
    barrier()
    return path


def one_process_only(what: str) -> None:
    """Refuse, in one line, a command that does not split over torchrun's processes."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise PluribusError(f"{what} runs in one process, not under torchrun; the stages that do are pretrain, "
                            "sft, grpo, opd and grm, launched one at a time (docs/scaling.md)")
