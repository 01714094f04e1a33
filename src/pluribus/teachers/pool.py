"""The teacher pool: route samples to their domain's teacher, run each teacher once per batch, cache its hidden states.

DeepSeek-V4 §5.2.2 schedules ten-plus teachers so that memory does not grow with their number:
samples are ordered by teacher index, each teacher runs once per mini-batch, only its last-layer
hidden states are kept, and its logits are rebuilt through its output head at training time.

What is resident, and when:
- A *unit* is what must be in memory to run a teacher: a shared base with the LoRA adapters of
  every teacher over it (one peft model from `pluribus.models.attach_adapters`, `set_adapter` to
  switch), or one full-weight model. Twelve LoRA teachers over one base are one unit, about the
  memory of one teacher, that never reloads.
- Units stay resident, least recently used evicted first, while their parameters fit
  `resident_budget_bytes` (a unit's size is read from its files before it loads, and what must
  go is freed first). The default budget of 0 keeps one unit at a time, as V4 does with its
  large experts; small full-weight experts (the embedded world's) fit together and never reload.
- Resident units' teachers are visited first in a batch, so a pool that fits never reloads and
  each unit that does not fit loads once per batch.
- A unit's adapter teachers run in one forward (`pluribus.models.lean.predicting_hidden_states`): the
  base layers over all their samples at once, each adapter over its own samples, no adapter switched
  (each is switched to once, on first use, to check its head). Twelve small teachers then cost about
  one teacher's forward, not twelve forwards and eleven switches. Where the lean forward does not
  apply, or with `batch_adapters=False`, each teacher runs alone after `set_adapter`.
- Hidden states are cached per teacher group, `[N_e, D_e]`, on the pool's device; no logits.
- Heads: a LoRA teacher's head is the resident base's (held by reference, no copy). A full-weight
  teacher's model is freed when it leaves the budget; its head is read back from its safetensors file when
  the loss needs it, one teacher at a time (V4 loads offloaded heads on demand). Where the head
  cannot be found in the files, a reference to it is kept instead (its `[V, D]` stays in memory).

- Loading ahead (`prefetch=True`, V4's asynchronous loading): while a unit computes, a background
  thread reads the weight files of the next unit to load (the next in this batch's visit order,
  else the one the next batch will load first: the lowest-index unit of this batch that is not
  resident, since every batch visits its units in index order after the resident ones), so its
  load finds them in the page cache instead of on disk. The thread only reads files; the model is
  built in the caller's thread when its turn comes (building one sets torch's process-wide
  default dtype). It adds no resident weights, only page cache the system can reclaim.

Where this departs from V4: the pool runs on one device, and what loads ahead is a unit's files
(the disk read), not its weights on the device (the host-to-device copy stays in the load).
"""

from __future__ import annotations

import gc
import json
import weakref
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from pluribus.errors import PluribusError
from pluribus.models import attach_adapters, load_causal_lm, load_tokenizer
from pluribus.teachers.compat import check_compatible
from pluribus.models.lean import predicting_hidden_states
from pluribus.teachers.hidden import check_head_reproduces_logits, output_head, response_hidden_states


@dataclass(frozen=True)
class TeacherSpec:
    """One teacher.

    name: label in errors and metrics.
    path: a LoRA adapter folder (adapter_config.json; its base is `base_model_name_or_path`) or a
        full HF model folder (config.json).
    domains: the domains whose samples it scores.
    weight: w_i in `Σ_i w_i · KL_i`.
    """

    name: str
    path: Path
    domains: tuple[str, ...]
    weight: float = 1.0


@dataclass(frozen=True)
class TeacherHead:
    """A teacher's output head: in memory (`weight_V_D`), or a safetensors tensor read on each `load`."""

    weight_V_D: Tensor | None = None
    bias_V: Tensor | None = None
    weight_file: tuple[Path, str] | None = None
    bias_file: tuple[Path, str] | None = None
    dtype: torch.dtype = torch.float32
    device: torch.device | str = "cpu"

    def load(self) -> tuple[Tensor, Tensor | None]:
        """(weight `[V, D]`, bias `[V]` or None) on the device; a disk head is read now and lives while held."""
        if self.weight_file is None:
            return self.weight_V_D, self.bias_V
        return _read_tensor(*self.weight_file, self.dtype, self.device), \
            None if self.bias_file is None else _read_tensor(*self.bias_file, self.dtype, self.device)


@dataclass
class TeacherGroup:
    """The cached view of one teacher on one batch.

    teacher: index into the pool's teachers.
    rows: its positions among the batch's N response positions (contiguous: samples are ordered by teacher).
    hidden_N_D: the teacher's final-norm hidden states at those positions, no grad.
    head: where its output head is.
    """

    teacher: int
    rows: slice
    hidden_N_D: Tensor
    head: TeacherHead


@dataclass
class TeacherStates:
    """Everything the OPD loss needs from the teachers for one batch, groups in row order.

    teacher_index_N: the teacher of each of the N response positions (on the CPU: counts and routing, no maths).
    """

    teacher_index_N: Tensor
    groups: list[TeacherGroup]


@dataclass(frozen=True)
class _Unit:
    """What is loaded together: a full model (`adapters` empty), or a base with adapters (teacher → folder)."""

    path: Path
    adapters: tuple[tuple[int, Path], ...] = ()


def _load_model(path: Path, dtype: torch.dtype):
    """A causal LM from a local folder (module-level so tests can watch every load)."""
    return load_causal_lm(path, dtype)


READ_CHUNK = 16 * 2**20


def _unit_files(unit: _Unit) -> list[Path]:
    """The weight files of a unit's folders: its model's, then each adapter's."""
    folders = [unit.path, *(path for _, path in unit.adapters)]
    return [f for folder in folders for pattern in ("*.safetensors", "*.bin") for f in sorted(folder.glob(pattern))]


def _read_files(files: Sequence[Path]) -> int:
    """Read `files` once, through the operating system's page cache, so that loading them next finds them in memory;
    bytes read. The loader thread's whole work: file reads release the GIL and touch none of torch's process-wide
    state (building a model sets the default dtype, so that stays with the caller)."""
    buffer = bytearray(READ_CHUNK)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as stream:
            while n := stream.readinto(buffer):
                total += n
    return total


def _unit_file_bytes(unit: _Unit) -> int:
    """A unit's size before it loads: its weight files on disk (float32 on disk loads as float32)."""
    return sum(f.stat().st_size for f in _unit_files(unit))


def _adapter_base(path: Path) -> Path:
    base = Path(json.loads((path / "adapter_config.json").read_text())["base_model_name_or_path"])
    if not base.is_absolute() and not base.is_dir() and (path / base).is_dir():
        base = path / base
    if not (base / "config.json").is_file():
        raise PluribusError(f"{path}: the adapter's base model folder {base} was not found")
    return base.resolve()


class TeacherPool:
    """Teachers by domain; `teacher_states` runs each teacher of a batch once, at most one unit resident.

    Tokenizers are checked against the student's when the pool is built (nothing loads then); models
    load on first use. `loads` and `adapter_switches` count unit loads and `set_adapter` calls;
    `loads_ahead` counts the loads whose files were read ahead.
    batch_adapters: run a unit's adapter teachers in one forward where the lean forward applies.
    prefetch: read the next unit's weight files in a background thread while the current one computes.
    """

    def __init__(self, teachers: Sequence[TeacherSpec], student_tokenizer, *, vocab_size: int | None = None,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 allow_eos_mismatch: bool = False,
                 resident_budget_bytes: int = 0, batch_adapters: bool = True, prefetch: bool = False):
        if not teachers:
            raise PluribusError("OPD needs at least one teacher")
        self.teachers = list(teachers)
        self.vocab_size = vocab_size
        self.dtype = dtype
        self.device = device
        self.resident_budget_bytes = resident_budget_bytes
        self.batch_adapters = batch_adapters
        self._teacher_of: dict[str, int] = {}
        for e, spec in enumerate(self.teachers):
            if spec.weight <= 0:
                raise PluribusError(f"teacher '{spec.name}': weight must be > 0, got {spec.weight}")
            for domain in spec.domains:
                if domain in self._teacher_of:
                    raise PluribusError(f"domain '{domain}' has two teachers: "
                                        f"'{self.teachers[self._teacher_of[domain]].name}' and '{spec.name}'")
                self._teacher_of[domain] = e
        if len({spec.name for spec in self.teachers}) != len(self.teachers):
            raise PluribusError("teacher names must be unique")
        self._units, self._unit_of = self._plan_units()
        for spec in self.teachers:
            check_compatible(student_tokenizer, load_tokenizer(spec.path), allow_eos_mismatch,
                             teacher=f"teacher '{spec.name}' ({spec.path})")
        self._resident: OrderedDict[int, object] = OrderedDict()  # unit → model, least recently used first
        self._active_adapter: dict[int, str] = {}  # unit → its active adapter
        self._checked: set[int] = set()
        self._disk_heads: dict[int, TeacherHead] = {}
        self.loads = 0
        self.adapter_switches = 0
        self.prefetch = prefetch
        self.loads_ahead = 0
        self._loader: ThreadPoolExecutor | None = None  # one background thread, made on first use
        self._reading: tuple[int, Future] | None = None  # (unit, the read of its weight files)
        self._upcoming: list[int] = []  # the units this batch visits after the current one
        self._used: list[int] = []  # the units this batch visits, in index order

    # --- routing -----------------------------------------------------------------------------------

    @property
    def weights_E(self) -> Tensor:
        """`[E]` teacher weights w_i, in teacher-index order."""
        return torch.tensor([spec.weight for spec in self.teachers], dtype=torch.float32, device="cpu")

    @property
    def domains(self) -> dict[str, int]:
        """domain → teacher index."""
        return dict(self._teacher_of)

    def route(self, domains: Sequence[str]) -> list[int]:
        """The teacher index of each sample's domain; a domain with no teacher is an error."""
        missing = sorted({d for d in domains if d not in self._teacher_of})
        if missing:
            raise PluribusError(f"domain(s) {missing} have no teacher: every domain in the prompt stream needs "
                                "one (a domain left out is forgotten)")
        return [self._teacher_of[d] for d in domains]

    @staticmethod
    def order(teacher_index: Sequence[int]) -> list[int]:
        """The permutation that sorts samples by teacher index (stable): each teacher's samples contiguous."""
        return sorted(range(len(teacher_index)), key=lambda i: teacher_index[i])

    # --- hidden states -----------------------------------------------------------------------------

    @torch.no_grad()
    def teacher_states(self, prompt_ids: list[list[int]], response_ids_B_T: Tensor, response_mask_B_T: Tensor,
                       teacher_index_B: Sequence[int], pad_id: int) -> TeacherStates:
        """Each teacher's final-norm hidden states at its samples' response positions; one forward per teacher.

        The samples must already be ordered by teacher (`order`).
        """
        index_B = [int(e) for e in teacher_index_B]
        if len(index_B) != len(prompt_ids) or len(index_B) != response_ids_B_T.shape[0]:
            raise PluribusError(f"teacher_states: {len(index_B)} teacher indices for {len(prompt_ids)} prompts "
                                f"and {response_ids_B_T.shape[0]} responses")
        if index_B != sorted(index_B):
            raise PluribusError("teacher_states: samples must be ordered by teacher index (use TeacherPool.order)")
        if index_B and not 0 <= index_B[0] <= index_B[-1] < len(self.teachers):
            raise PluribusError(f"teacher_states: teacher index out of range [0, {len(self.teachers)})")
        mask_B_T = response_mask_B_T.bool()
        lengths_B = mask_B_T.sum(-1).tolist()
        spans: dict[int, tuple[slice, slice]] = {}  # teacher → (its samples, its rows among the N positions)
        row = 0
        for b, (e, n) in enumerate(zip(index_B, lengths_B)):
            samples, rows = spans.get(e, (slice(b, b), slice(row, row)))
            spans[e] = (slice(samples.start, b + 1), slice(rows.start, row + n))
            row += n
        cached: dict[int, TeacherGroup] = {}
        visit = self._visit_order(list(spans))
        self._upcoming = list(dict.fromkeys(self._unit_of[e] for e in visit))
        self._used = sorted(self._upcoming)
        for e in visit:
            if e in cached:
                continue
            unit_id = self._unit_of[e]
            together = sorted(t for t in visit if self._unit_of[t] == unit_id)
            if self.batch_adapters and len(together) > 1:
                cached.update(self._adapters_together(unit_id, together, spans, prompt_ids, response_ids_B_T,
                                                      mask_B_T))
                if e in cached:
                    continue
            samples, rows = spans[e]
            model = self._activate(e)
            hidden_N_D = response_hidden_states(model, prompt_ids[samples], response_ids_B_T[samples],
                                                mask_B_T[samples], pad_id)
            cached[e] = TeacherGroup(e, rows, hidden_N_D, self._head(e, model))
            del model
        teacher_index_N = torch.repeat_interleave(torch.tensor(index_B, dtype=torch.long, device="cpu"),
                                                  torch.tensor(lengths_B, dtype=torch.long, device="cpu"))
        return TeacherStates(teacher_index_N, [cached[e] for e in sorted(cached)])

    @property
    def resident_bytes(self) -> int:
        """Parameter bytes of the resident units (bases and adapters, full models); 0 when none."""
        return sum(p.numel() * p.element_size() for m in self._resident.values() for p in m.parameters())

    def release(self, keep: int = 0) -> None:
        """Free resident units, least recently used first, until `keep` remain (memory returns before any next load);
        `keep=0` also drops a read ahead and stops the loader thread."""
        if keep == 0:
            self._stop_reading()
        self._evict(keep)

    def _evict(self, keep: int) -> None:
        if len(self._resident) <= keep:
            return
        freed = []
        while len(self._resident) > keep:
            unit_id, model = self._resident.popitem(last=False)
            self._active_adapter.pop(unit_id, None)
            freed.append(weakref.ref(model))
            del model
        # A plain model goes with its last reference. peft wrappers can hold reference cycles: those are freed by a
        # full collection now, not at some later one; only then, since one costs ~0.2 s with transformers loaded.
        if any(ref() is not None for ref in freed):
            gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    # --- scheduling --------------------------------------------------------------------------------

    def _plan_units(self) -> tuple[list[_Unit], list[int]]:
        bases: dict[Path, list[tuple[int, Path]]] = {}
        units: list[_Unit] = []
        unit_of = [0] * len(self.teachers)
        for e, spec in enumerate(self.teachers):
            path = Path(spec.path)
            if (path / "adapter_config.json").is_file():
                bases.setdefault(_adapter_base(path), []).append((e, path))
            elif (path / "config.json").is_file():
                unit_of[e] = len(units)
                units.append(_Unit(path.resolve()))
            else:
                raise PluribusError(f"teacher '{spec.name}': {path} is not a model folder "
                                    "(no adapter_config.json or config.json)")
        for base, adapters in bases.items():
            for e, _ in adapters:
                unit_of[e] = len(units)
            units.append(_Unit(base, tuple(adapters)))
        return units, unit_of

    def _visit_order(self, teachers: list[int]) -> list[int]:
        """The resident unit's teachers first (its active adapter first of all), then unit by unit, by index.

        So a batch costs one load per unit not already resident and one switch per other adapter.
        """
        return sorted(teachers, key=lambda e: (self._unit_of[e] not in self._resident, self._unit_of[e],
                                               f"t{e}" != self._active_adapter.get(self._unit_of[e]), e))

    def _adapters_together(self, unit_id: int, teachers: list[int], spans: dict[int, tuple[slice, slice]],
                           prompt_ids: list[list[int]], response_ids_B_T: Tensor,
                           mask_B_T: Tensor) -> dict[int, TeacherGroup]:
        """The states of several adapter teachers of one unit from one forward (`predicting_hidden_states` with
        each sample's adapter); {} where the lean forward does not apply. A teacher seen for the first time is
        switched to once, to check its head."""
        for e in teachers:
            if e not in self._checked:
                self._activate(e)
        model = self._resident_unit(unit_id)
        samples = [b for e in teachers for b in range(spans[e][0].start, spans[e][0].stop)]
        adapters = [f"t{e}" for e in teachers for _ in range(spans[e][0].stop - spans[e][0].start)]
        hidden_M_D = predicting_hidden_states(model, [prompt_ids[b] for b in samples], response_ids_B_T[samples],
                                              mask_B_T[samples], adapters)
        if hidden_M_D is None:
            return {}
        counts = [spans[e][1].stop - spans[e][1].start for e in teachers]
        return {e: TeacherGroup(e, spans[e][1], hidden_N_D, self._head(e, model))
                for e, hidden_N_D in zip(teachers, hidden_M_D.split(counts))}

    def _resident_unit(self, unit_id: int):
        """The unit's model, loaded if it is not resident (least recently used units freed first to make room);
        then, with `prefetch`, the next unit's files start loading."""
        if unit_id in self._resident:
            self._resident.move_to_end(unit_id)
        else:
            ahead = self._read_ahead(unit_id)
            self._make_room(self._units[unit_id])
            self._resident[unit_id] = self._load_unit(unit_id)
            self.loads += 1
            self.loads_ahead += ahead
        if unit_id in self._upcoming:  # the visit order is the plan: what follows this unit in it
            del self._upcoming[:self._upcoming.index(unit_id) + 1]
        self._start_reading()
        return self._resident[unit_id]

    def _start_reading(self) -> None:
        """Read ahead the files of the next unit to load: the next non-resident unit this batch visits, else the one
        the next batch will load first. At most one read is in flight."""
        if not self.prefetch or self._reading is not None:
            return
        following = [u for u in self._upcoming + self._used if u not in self._resident]
        if not following:
            return
        if self._loader is None:
            self._loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pluribus-teacher-files")
        unit_id = following[0]
        self._reading = (unit_id, self._loader.submit(_read_files, _unit_files(self._units[unit_id])))

    def _read_ahead(self, unit_id: int) -> bool:
        """Whether the unit's files were read ahead, once that read is done (an error in it is raised here); a read
        of another unit is let go: the plan changed."""
        if self._reading is None:
            return False
        ahead, future = self._reading
        self._reading = None
        if ahead != unit_id:
            future.cancel()
            return False
        future.result()
        return True

    def _stop_reading(self) -> None:
        if self._reading is not None:
            self._reading[1].cancel()
            self._reading = None
        if self._loader is not None:
            self._loader.shutdown(wait=True)
            self._loader = None

    def _activate(self, e: int):
        """The model that computes teacher e: its unit loaded (the previous one freed first), its adapter set."""
        unit_id = self._unit_of[e]
        model = self._resident_unit(unit_id)
        adapter = f"t{e}"
        if self._units[unit_id].adapters and self._active_adapter.get(unit_id) != adapter:
            model.set_adapter(adapter, inference_mode=True)
            self._active_adapter[unit_id] = adapter
            self.adapter_switches += 1
        if e not in self._checked:
            check_head_reproduces_logits(model, f"teacher '{self.teachers[e].name}'", self.vocab_size)
            self._checked.add(e)
        return model

    def _make_room(self, unit: _Unit) -> None:
        """Evict least recently used units until `unit` fits the budget beside the rest (all, if it cannot)."""
        need = _unit_file_bytes(unit)
        while self._resident and self.resident_bytes + need > self.resident_budget_bytes:
            self._evict(keep=len(self._resident) - 1)

    def _load_unit(self, unit_id: int):
        unit = self._units[unit_id]
        model = _load_model(unit.path, self.dtype)
        if unit.adapters:
            model = attach_adapters(model, [(f"t{e}", path) for e, path in unit.adapters])
            self._active_adapter[unit_id] = f"t{unit.adapters[0][0]}"
        model.requires_grad_(False)
        return model.to(self.device).eval()

    def _head(self, e: int, model) -> TeacherHead:
        if self._units[self._unit_of[e]].adapters:
            weight_V_D, bias_V = output_head(model)  # the resident base's (or the adapter's own), no copy
            return TeacherHead(weight_V_D.detach(), None if bias_V is None else bias_V.detach())
        if e in self._disk_heads:
            return self._disk_heads[e]
        head = _head_on_disk(model, self._units[self._unit_of[e]].path, self.dtype, self.device)
        if head.weight_file is not None:  # an in-memory fallback must not outlive this batch
            self._disk_heads[e] = head
        return head


# --- heads on disk -----------------------------------------------------------------------------------

def _head_on_disk(model, folder: Path, dtype: torch.dtype, device: torch.device | str) -> TeacherHead:
    """Where the model's head lives in its safetensors files; failing that, a reference to it in memory."""
    weight_V_D, bias_V = output_head(model)
    weight_map = _safetensors_map(folder)

    def locate(tensor: Tensor | None) -> tuple[Path, str] | None:
        if tensor is None:
            return None
        for name, param in model.named_parameters(remove_duplicate=False):
            if param is tensor and name in weight_map:
                return folder / weight_map[name], name
        return None

    weight_file, bias_file = locate(weight_V_D), locate(bias_V)
    found = weight_file is not None and (bias_V is None or bias_file is not None)
    if found and _read_tensor(*weight_file, dtype, "cpu", meta_only=True) == tuple(weight_V_D.shape):
        return TeacherHead(weight_file=weight_file, bias_file=bias_file, dtype=dtype, device=device)
    return TeacherHead(weight_V_D.detach(), None if bias_V is None else bias_V.detach())


def _safetensors_map(folder: Path) -> dict[str, str]:
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return dict(json.loads(index.read_text())["weight_map"])
    single = folder / "model.safetensors"
    if not single.is_file():
        return {}
    from safetensors import safe_open

    with safe_open(str(single), framework="pt") as f:
        return {name: single.name for name in f.keys()}


def _read_tensor(file: Path, name: str, dtype: torch.dtype, device: torch.device | str, meta_only: bool = False):
    from safetensors import safe_open

    with safe_open(str(file), framework="pt", device=str(device)) as f:
        if meta_only:
            return tuple(f.get_slice(name).get_shape())
        return f.get_tensor(name).to(dtype)
