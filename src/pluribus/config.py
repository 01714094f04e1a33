"""Validated configuration: one pydantic model per stage, loaded from YAML.

Every field is read by the stage it belongs to; unknown fields are errors (a typo must not be
silently ignored). `load_yaml` turns any problem into one line naming the file, the field and the
problem (a `ConfigError`, exit code 2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar, Literal, TypeVar

import yaml
from pydantic import (BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_serializer,
                      model_validator)

from pluribus.errors import ConfigError


def known_domains(domains: list[str] | dict[str, str]) -> list[str] | dict[str, str]:
    """`domains` (names, or a mapping keyed by name) if every one is a world domain; else a ValueError."""
    from pluribus.world import DOMAINS

    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown domain(s) {unknown}; known: {list(DOMAINS)}")
    return domains


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)
    # Fields that hold another stage's fields (a dict, validated by `validate`): name -> (that stage's
    # config, the fields this config fills in, which the section may therefore not set).
    sections: ClassVar[dict[str, tuple[type[BaseModel], tuple[str, ...]]]] = {}


class DataConfig(Strict):
    """Where training prompts come from: world domains (generated) and/or users' JSONL files."""

    domains: list[str] = Field(default_factory=list, description="world domains to generate from")
    n_per_domain: int = Field(500, gt=0, description="generated train records per world domain")
    jsonl: list[str] = Field(default_factory=list, description="paths of JSONL files in the data contract")
    rewards: dict[str, str] = Field(default_factory=dict, exclude_if=lambda rewards: not rewards,
                                    description="reward kind per domain of the JSONL records: math, code, ifeval, "
                                                "grm, world:NAME (pluribus.rewards.router); world domains need none")
    seed: int = 0

    _known_domains = field_validator("domains")(known_domains)

    @field_validator("rewards")
    @classmethod
    def _reward_kinds(cls, rewards):
        for domain, kind in rewards.items():
            if kind.startswith("world:"):
                known_domains([kind.removeprefix("world:")])
            elif kind not in ("math", "code", "ifeval", "grm"):
                raise ValueError(f"domain '{domain}': unknown reward kind '{kind}' (known: math, code, ifeval, grm, "
                                 "world:NAME)")
        return rewards

    @field_validator("jsonl")
    @classmethod
    def _files_exist(cls, paths, info: ValidationInfo):
        # Checked where a user's config is loaded: now, not after the stages before this one have run.
        # A stage that records a file it is about to write validates without the check.
        missing = [p for p in paths if not Path(p).is_file()]
        if missing and (info.context or {}).get("check_files"):
            raise ValueError(f"data file not found: {', '.join(missing)}")
        return paths


class OptimConfig(Strict):
    lr: float = Field(1e-3, gt=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1, description="cosine decays to lr·min_lr_ratio")
    warmup_steps: int = Field(20, ge=0)
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    weight_decay: float = Field(0.0, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    betas: tuple[float, float] = (0.9, 0.95)


class LoraConfig(Strict):
    rank: int = Field(16, gt=0)
    alpha: int = Field(32, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)


def check_device(device: str) -> str:
    """`device` if it names one this machine has (auto, cpu, cuda, cuda:N; `pluribus.dist.resolve_device`), else a
    ValueError: a GPU run on a machine without one fails as its config loads, in one line."""
    from pluribus import dist
    from pluribus.errors import PluribusError

    try:
        dist.resolve_device(device)
    except PluribusError as e:
        raise ValueError(str(e)) from None
    return device


def device_field():
    """A stage's `device` field: left out of dumps when default, so the stage and checkpoint keys of runs from
    before it existed stay the same."""
    return Field("auto", exclude_if=lambda device: device == "auto",
                 description="where the model runs: auto (under torchrun, this process's device; else cuda when "
                             "available, else cpu), cpu, cuda or cuda:N")


class Distributed(Strict):
    """Where a training stage runs: its device, and how it spreads over the processes of `torchrun` (see
    pluribus.dist; one process ignores `distributed`)."""

    device: str = device_field()
    distributed: Literal["ddp", "fsdp2"] = Field(
        "ddp", exclude_if=lambda mode: mode == "ddp",  # left out of dumps when default: earlier stage keys hold
        description="under torchrun: ddp keeps the whole model on every process; fsdp2 shards parameters, "
                    "gradients and optimizer state (full weights only)")

    _device = field_validator("device")(check_device)


class PretrainConfig(Distributed):
    """Train the tiny preset from scratch on world text whose answers are mostly wrong."""

    out: str
    size: int = Field(2, ge=1, description="the one size dial: hidden = 64·size")
    arch: Literal["llama", "qwen2"] = "llama"
    domains: list[str] = Field(default_factory=list, description="empty: all world domains")
    steps: int = Field(1500, gt=0)
    batch_size: int = Field(64, gt=0)
    optim: OptimConfig = OptimConfig(lr=3e-3, warmup_steps=50)
    p_correct: float = Field(0.3, ge=0, le=1, description="share of corpus answers that are right")
    p_mistake: float = Field(0.5, ge=0, le=1, description="share that follow the domain's systematic mistake")
    shares_by_domain: dict[str, tuple[float, float]] = Field(
        default_factory=dict, description="domain -> (p_correct, p_mistake), for domains whose answers are long")
    p_find: float = Field(0.0, ge=0, lt=1, exclude_if=lambda p: p == 0,  # left out at 0: earlier stage keys hold
                          description="share of the corpus that practises a general skill, word membership "
                                      "(pluribus.world.skills.find_example), instead of a world task")
    init_std: float | None = Field(None, gt=0, exclude_if=lambda std: std is None,  # left out when None: earlier
                                   # stage keys hold
                                   description="standard deviation of the random init's weights (None: "
                                               "transformers' initializer_range, 0.02)")
    checkpoint_every: int = Field(250, gt=0, description="steps between checkpoints (one more after the last)")
    seed: int = 0

    def shares(self, domain: str) -> tuple[float, float]:
        return self.shares_by_domain.get(domain, (self.p_correct, self.p_mistake))

    @model_validator(mode="after")
    def _shares(self):
        from pluribus.world import DOMAINS

        for name, (correct, mistake) in [("default", (self.p_correct, self.p_mistake)), *self.shares_by_domain.items()]:
            if name != "default" and name not in DOMAINS:
                raise ValueError(f"unknown domain '{name}'")
            if not (0 <= correct and 0 <= mistake and correct + mistake <= 1):
                raise ValueError(f"{name}: p_correct + p_mistake must be in [0, 1] (the rest is noise)")
        return self


class SFTConfig(Distributed):
    """Prompt-masked cross-entropy on chat-formatted demonstrations."""

    model: str
    out: str
    data: DataConfig
    steps: int = Field(300, gt=0)
    batch_size: int = Field(32, gt=0)
    grad_accum: int = Field(1, gt=0)
    optim: OptimConfig = OptimConfig()
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter instead of full weights")
    checkpoint_every: int = Field(100, gt=0, description="steps between checkpoints (one more after the last)")
    seed: int = 0


class EvalConfig(Strict):
    model: str
    domains: list[str] = Field(default_factory=list, description="empty: all world domains")
    n: int = Field(200, gt=0, description="test prompts per domain")
    samples: int = Field(8, ge=0, description="sampled responses per prompt (mean reward, pass@k); 0: greedy only")
    temperature: float = Field(1.0, gt=0)
    max_new_tokens: int = Field(32, gt=0)
    batch_size: int = Field(256, gt=0)
    device: str = device_field()
    seed: int = 0

    _device = field_validator("device")(check_device)


C = TypeVar("C", bound=BaseModel)


def config_error(where: str, field: str, problem: str) -> ConfigError:
    """The one line: `<where>: <field.path>: <problem>`."""
    return ConfigError(f"{where}: {field or '(top level)'}: {problem}", field=field, problem=problem)


def validate(cls: type[C], data: dict, where: str, prefix: str = "", check_files: bool = False) -> C:
    """Build a config, or raise one line: `<where>: <prefix.field.path>: <problem>`.

    `prefix` is the dotted path of `data` inside the file (a section of a larger config). The
    sections the config declares are validated too, so a mistake deep inside is found now.
    `check_files`: the data files it names must exist (a user's config, as it is loaded)."""
    try:
        cfg = cls.model_validate(data, context={"check_files": check_files})
    except ValidationError as e:
        err = e.errors()[0]
        field = ".".join(p for p in (prefix, *map(str, err["loc"])) if p)
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        raise config_error(where, field, msg) from None
    for name, (section_cls, filled) in getattr(cls, "sections", {}).items():
        validate_section(section_cls, getattr(cfg, name), where, f"{prefix}.{name}".lstrip("."),
                         filled={k: _placeholder(k) for k in filled}, check_files=check_files)
    return cfg


# Stand-ins for the fields a config fills into its sections when it runs (paths, its own LoRA).
_PLACEHOLDERS: dict[str, Any] = {"model": "-", "out": "-", "data": {}, "lora": None}


def _placeholder(field: str) -> Any:
    if field == "domains":  # a rubric domain: what an experts stage fills into its grm section
        from pluribus.world import DOMAINS

        return [next(d for d in DOMAINS if DOMAINS[d].rubric_domain)]
    return _PLACEHOLDERS[field]


def validate_section(cls: type[C], fields: dict[str, Any], where: str, name: str, defaults: dict | None = None,
                     filled: dict | None = None, check_files: bool = True) -> C:
    """A stage's config from the section `name` of a larger config: `defaults` deep-merged under the
    section's fields, then `filled` (what the larger config decides, such as paths), which the section
    may not set: it would be silently overridden."""
    filled = filled or {}
    taken = [k for k in fields if k in filled]
    if taken:
        raise config_error(where, f"{name}.{taken[0]}", "filled in by pluribus; remove it")
    return validate(cls, deep_merge(defaults or {}, fields) | filled, where, name, check_files)


def deep_merge(base: dict, over: dict) -> dict:
    """`over` on top of `base`, merging nested mappings key by key."""
    out = dict(base)
    for k, v in over.items():
        out[k] = deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def read_yaml(path: str | Path) -> dict:
    """The mapping in a YAML file, or one line naming the file (and line) and what is wrong."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise ConfigError(f"{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of fields")
    return data


def load_yaml(path: str | Path, cls: type[C], section: str | None = None) -> C:
    """Load and validate `cls` from a YAML file (or one top-level section of it)."""
    data = read_yaml(path)
    if section is not None:
        if section not in data:
            raise ConfigError(f"{path}: {section}: missing section")
        data = data[section]
        return validate(cls, data or {}, str(path), section, check_files=True)
    return validate(cls, data, str(path), check_files=True)


class SamplingConfig(Strict):
    max_new_tokens: int = Field(32, gt=0)
    temperature: float = Field(1.0, gt=0)
    top_p: float = Field(1.0, gt=0, le=1)
    top_k: int = Field(0, ge=0, description="0: no top-k truncation")


class RolloutConfig(Strict):
    """Which engine generates an RL loop's rollouts (pluribus.rollout.engine): the trainer's own model (hf) or a
    vLLM engine synced with the trainer's weights before every rollout (vllm, extra `pluribus[vllm]`)."""

    engine: Literal["hf", "vllm"] = "hf"
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="vllm: the engine's weights; float32 matches the trainer's log-probs to ~1e-6")
    gpu_memory_utilization: float = Field(0.5, gt=0, le=1, description="vllm on a GPU: its share of the GPU's "
                                                                      "memory (the trainer needs the rest)")
    kv_cache_mb: int | None = Field(None, gt=0, description="vllm: KV cache size; None: vLLM's default")
    max_model_len: int | None = Field(None, gt=0, description="vllm: longest prompt + response; None: the model's")

    @field_validator("engine")
    @classmethod
    def _installed(cls, engine):
        if engine == "vllm":  # a missing vllm fails as the config loads, in one line
            from pluribus.rollout.vllm_engine import MISSING, vllm_installed

            if not vllm_installed():
                raise ValueError(MISSING)
        return engine

    def vllm_options(self) -> dict[str, Any]:
        return self.model_dump(exclude={"engine"})


def rollout_field():
    """A stage's `rollout` field: left out of dumps when default, so the stage and checkpoint keys of runs from
    before it existed stay the same."""
    return Field(default_factory=RolloutConfig, exclude_if=lambda rollout: rollout == RolloutConfig(),
                 description="the rollout engine: hf (default) or vllm")


class PolicyUpdateConfig(Distributed):
    """How one batch of rollouts updates the policy: the fields `pluribus.stages.grpo.policy_step` reads,
    shared by GRPO and the joint generate-and-judge loop (pluribus.core.grpo has the maths)."""

    group_size: int = Field(8, ge=2, description="G samples per prompt")
    inner_updates: int = Field(1, ge=1, description="μ: optimizer passes over each rollout batch")
    minibatches: int = Field(1, ge=1, description="optimizer steps per pass (rollouts split evenly)")
    sampling: SamplingConfig = SamplingConfig()
    rollout: RolloutConfig = rollout_field()
    advantage_scale: Literal["none", "std"] = "none"
    eps_low: float = Field(0.2, gt=0, lt=1)
    eps_high: float = Field(0.28, gt=0)
    kl_coef: float = Field(0.0, ge=0, description="KL to the reference in the loss; 0 skips the reference")
    kl_estimator: Literal["k3", "k3_unbiased"] = "k3_unbiased"
    off_policy_delta: float | None = Field(None, gt=0, description="V3.2 off-policy sequence masking threshold δ")
    aggregation: Literal["token_mean", "seq_mean_token_mean"] = "token_mean"
    skip_zero_advantage: bool = Field(True, description="with kl_coef 0, rows whose advantage is 0 (a group's "
                                      "rewards all equal) carry no gradient: no forward or backward for them, "
                                      "the same update")
    optim: OptimConfig = OptimConfig(lr=2e-4, warmup_steps=5, schedule="constant")


class GRPOConfig(PolicyUpdateConfig):
    """GRPO with the DeepSeek-V3.2 changes (see pluribus.core.grpo for the maths and its departures)."""

    model: str
    out: str
    data: DataConfig
    steps: int = Field(100, gt=0)
    prompts_per_step: int = Field(16, gt=0)
    lora: LoraConfig | None = LoraConfig()
    max_len_penalty_tokens: int | None = Field(None, gt=0, description="DAPO overlong penalty: max tokens")
    len_penalty_cache_tokens: int = Field(8, ge=0)
    eval_every: int = Field(0, ge=0, description="greedy pass@1 on held-out prompts every N steps; 0 never")
    eval_n: int = Field(100, gt=0)
    checkpoint_every: int = Field(25, gt=0, description="steps between checkpoints (one more after the last)")
    seed: int = 0

    @model_validator(mode="after")
    def _batches(self):
        rollouts = self.prompts_per_step * self.group_size
        if rollouts % self.minibatches:
            raise ValueError(f"prompts_per_step × group_size ({rollouts}) must divide into {self.minibatches} minibatches")
        return self


class GRMConfig(PolicyUpdateConfig):
    """Joint RL of generating and judging, the actor as its own generative judge; see pluribus.stages.grm.

    group_size is G for generation prompts and judged items alike."""

    model: str
    out: str
    data: DataConfig | None = Field(None, exclude_if=lambda data: data is None,
                                    description="users' records (JSONL) for the domains below, checked by their "
                                                "`rewards`; rubric records may carry labelled judgements "
                                                "(meta.labels); None: the world's domains")
    domains: list[str] = Field(default_factory=lambda: ["describe"],
                               description="rubric domains: generation episodes, rewarded by the actor's own judgement")
    judge_domains: list[str] = Field(default_factory=lambda: ["sort", "max", "linear", "count", "case", "base"],
                                     description="verifiable domains whose rollouts, labelled by their checker, are "
                                                 "judged in judging episodes")
    template: Literal["world", "world_restate", "grm"] = Field(
        "world", description="judge template: world (character models), world_restate (the same, each verdict "
                             "restating its criterion) or grm (DeepSeek-GRM form, for real models)")
    judge_max_new_tokens: int | None = Field(None, gt=0, exclude_if=lambda n: n is None,
                                             description="room for one judgement; None: the template's")
    n_train: int = Field(2000, gt=0, description="train prompts per domain")
    steps: int = Field(100, gt=0)
    gen_prompts: int = Field(8, gt=0, description="rubric prompts per step: generation episodes, G rollouts each")
    judge_items: int = Field(8, gt=0, description="items judged per step: judging episodes, G judgements each")
    annotated_share: float = Field(0.5, ge=0, le=1, description="share of judge_items drawn from the annotated "
                                   "set; the rest are the actor's fresh rollouts on judge_domains")
    judge_k: int = Field(4, ge=1, description="judgements sampled per generation rollout (mean of the valid ones)")
    judge_temperature: float = Field(1.0, gt=0, description="sampling temperature of the reward's judgements")
    score_tolerance: int = Field(1, ge=0, description="a judgement agrees with its label when every verdict "
                                 "matches and the score is within this many points of the label's")
    max_rubric_labels: int = Field(200, ge=0, description="the cap on rubric_labels: the minimal human annotations")
    rubric_labels: int = Field(200, ge=0, description="labelled judgements of rubric-domain items (the annotated set)")
    online_labels: int = Field(0, ge=0, exclude_if=lambda n: n == 0,
                               description="of rubric_labels, how many are spent during RL instead of up front: every "
                                           "online_every steps, online_per_round of the policy's current responses to "
                                           "rubric prompts are labelled (the world's hidden checker stands in for the "
                                           "annotator), so the judge is corrected where the policy has moved to")
    online_every: int = Field(10, gt=0, exclude_if=lambda n: n == 10, description="steps between online labelling rounds")
    online_per_round: int = Field(8, gt=0, exclude_if=lambda n: n == 8, description="responses labelled per round")
    label_edits: float = Field(0.0, ge=0, le=1, description="share of the annotated set's second responses that "
                               "are the first with one digit changed (near misses in a number; see "
                               "grm.candidate_responses)")
    warmup_steps: int = Field(300, ge=0, description="judge warm-up: SFT steps on labelled judgements before RL "
                              "(a model that never wrote one samples no valid judgement for RL to reward)")
    warmup_batch_size: int = Field(32, gt=0)
    warmup_optim: OptimConfig = OptimConfig(lr=1e-3, warmup_steps=10, schedule="cosine")
    warmup_verifiable: int = Field(1000, ge=0, description="verifiable-domain prompts labelled for the warm-up "
                                   "(the actor's own rollouts, two per prompt)")
    word_rubrics: bool = Field(False, description="the warm-up also judges each verifiable rollout against a rubric "
                               "of the rubric domain's shape whose verdicts are rules' (grm.word_rubric_item)")
    warmup_replay: float = Field(0.25, ge=0, lt=1, description="share of each warm-up batch that replays the starting "
                                 "policy's own responses to rubric prompts, so learning to judge does not erase them")
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter; None: full weights (a saved adapter "
                                                      "keeps training either way)")
    eval_every: int = Field(20, ge=0, description="judge and policy metrics every N steps (and at the start and "
                                                  "the end); 0: start and end only")
    eval_n: int = Field(200, gt=0, description="held-out test prompts per rubric domain, two responses each")
    eval_pairs: int = Field(100, ge=0, description="of those prompts, how many are also judged pairwise, both orders")
    seed: int = 0

    @field_validator("domains")
    @classmethod
    def _rubric_domains(cls, domains, info: ValidationInfo):
        from pluribus.world import DOMAINS

        if info.data.get("data") is not None:  # users' domains: checked against their records as the stage starts
            return domains
        checkable = [d for d in known_domains(domains) if not DOMAINS[d].rubric_domain]
        if checkable or not domains:
            raise ValueError(f"list rubric domains only, at least one (these have a checker: {checkable})")
        return domains

    @field_validator("judge_domains")
    @classmethod
    def _checkable_domains(cls, domains, info: ValidationInfo):
        from pluribus.world import DOMAINS

        if info.data.get("data") is not None:
            return domains
        rubric = [d for d in known_domains(domains) if DOMAINS[d].rubric_domain]
        if rubric:
            raise ValueError(f"{rubric} have no checker to label a judgement")
        return domains

    @field_validator("rubric_labels")
    @classmethod
    def _label_cap(cls, n, info: ValidationInfo):
        cap = info.data.get("max_rubric_labels")
        if cap is not None and n > cap:
            raise ValueError(f"{n} labelled rubric judgements exceed the cap max_rubric_labels={cap}")
        return n

    @field_validator("online_labels")
    @classmethod
    def _online_budget(cls, n, info: ValidationInfo):
        total = info.data.get("rubric_labels")
        if total is not None and n > total:
            raise ValueError(f"{n} exceeds rubric_labels {total} (the labels spent during RL are part of the "
                             "annotated set's budget)")
        if n and info.data.get("data") is not None:
            raise ValueError("needs the world's hidden checker to label the policy's responses; with users' data, "
                             "label them and add them to meta.labels")
        return n

    @model_validator(mode="after")
    def _batches(self):
        rollouts = (self.gen_prompts + self.judge_items) * self.group_size
        if rollouts % self.minibatches:
            raise ValueError(f"(gen_prompts + judge_items) × group_size ({rollouts}) must divide into "
                             f"{self.minibatches} minibatches")
        if not self.judge_domains and self.rubric_labels - self.online_labels < self.judge_items:
            raise ValueError(f"with no judge_domains, the annotated set (rubric_labels {self.rubric_labels} less "
                             f"online_labels {self.online_labels}) must hold judge_items ({self.judge_items}) items")
        if self.n_train < self.gen_prompts:
            raise ValueError(f"n_train {self.n_train} is fewer than gen_prompts {self.gen_prompts}")
        if self.eval_pairs > self.eval_n:
            raise ValueError(f"eval_pairs {self.eval_pairs} exceeds eval_n {self.eval_n}")
        return self


class TeacherConfig(Strict):
    """One OPD teacher: a model folder, the domains it teaches, its weight w_i in Eq. 29."""

    path: str = Field(description="a LoRA adapter saved by pluribus.models.save (over a shared base) or a full HF model folder")
    domains: list[str] = Field(min_length=1, description="domains whose samples this teacher scores")
    weight: float = Field(1.0, gt=0, description="w_i: the teacher's weight in Σ_i w_i · KL_i")
    name: str | None = Field(None, description="label in metrics (default: the domains joined by '+')")


class OPDConfig(Distributed):
    """Multi-teacher on-policy distillation (DeepSeek-V4 Eq. 29); see pluribus.stages.opd."""

    model: str = Field(description="the student's starting point (the general SFT model): full weights or a LoRA adapter")
    out: str
    data: DataConfig
    teachers: list[TeacherConfig] = Field(min_length=1)
    domain_weights: dict[str, float] = Field(default_factory=dict,
                                             description="prompt sampling weight per domain; empty: uniform over the data's domains")
    steps: int = Field(200, gt=0)
    prompts_per_step: int = Field(32, gt=0, description="student rollouts per step (one per prompt)")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig,
                                     description="full-vocabulary KL needs no top-p/top-k: leave them off")
    rollout: RolloutConfig = rollout_field()
    chunk_size: int = Field(1024, gt=0, description="positions per chunk when teacher logits are rebuilt from hidden states")
    aggregation: Literal["teacher_mean", "sequence_sum", "token_mean"] = Field(
        "teacher_mean", exclude_if=lambda a: a == "teacher_mean",  # left out when default: earlier stage keys hold
        description="how the per-token KLs make the loss (pluribus.core.teacher_weights): teacher_mean is Eq. 29 "
                    "(each teacher's mean KL, weighted); sequence_sum is the KL over whole responses (a long "
                    "response weighs its length); token_mean weighs every token alike")
    forward_kl_weight: float = Field(
        0.0, ge=0, le=1, exclude_if=lambda w: not w,  # left out when 0: earlier stage keys hold
        description="α: each position's divergence is (1 − α)·KL(student ‖ teacher) + α·KL(teacher ‖ student), both "
                    "exact over the vocabulary on the student's samples (pluribus.core.reverse_kl_chunked); 0 is "
                    "Eq. 29, 1 GKD's on-policy forward KL (β = 0)")
    optim: OptimConfig = OptimConfig(lr=3e-4, warmup_steps=10, schedule="cosine")
    lora: LoraConfig | None = Field(None, description="train a LoRA adapter on the student; None: full weights")
    expand_depth: int = Field(0, ge=0, exclude_if=lambda n: not n,  # left out when 0: earlier stage keys hold
                              description="grow the student before training (LLaMA Pro block expansion, "
                                          "pluribus.models.expand_depth): each decoder layer followed by N copies "
                                          "that add nothing until trained, so it starts from the same logits; "
                                          "0: the student as loaded")
    save_merged: bool = Field(True, description="with a LoRA student, save its adapter merged into full weights")
    allow_eos_mismatch: bool = Field(False, description="accept a teacher whose EOS differs from the student's")
    teacher_memory_mb: float = Field(0.0, ge=0, description="teachers kept loaded while their weights fit (LRU); "
                                                            "0: one at a time, as V4 does with large experts")
    teacher_prefetch: bool = Field(False, exclude_if=lambda on: not on,  # left out when off: earlier stage keys hold
                                   description="read the next teacher's weight files in a background thread "
                                               "while the current one computes (V4's asynchronous loading), so "
                                               "its load finds them in the page cache; no second model is held")
    reward_every: int = Field(1, ge=0, description="log per-domain checker rewards every N steps (watching only); 0 never")
    checkpoint_every: int = Field(50, gt=0, description="steps between checkpoints (one more after the last)")
    seed: int = 0

    @model_validator(mode="after")
    def _teachers(self):
        seen: dict[str, int] = {}
        for i, teacher in enumerate(self.teachers):
            for domain in teacher.domains:
                if domain in seen:
                    raise ValueError(f"domain '{domain}' has two teachers (teachers[{seen[domain]}] and teachers[{i}])")
                seen[domain] = i
        if self.expand_depth and self.rollout.engine != "hf":
            raise ValueError(f"expand_depth needs rollout.engine 'hf': a {self.rollout.engine} engine loads the "
                             "student from its path, without the grown layers")
        bad = {d: w for d, w in self.domain_weights.items() if w < 0}
        if bad:
            raise ValueError(f"domain_weights must be ≥ 0, got {bad}")
        return self


class ExpertsConfig(Strict):
    """One specialist per domain from the general SFT model: SFT on its domain, then GRPO (V4 §5.1)."""

    model: str
    out_dir: str
    domains: list[str] = Field(default_factory=list, description="empty: all world domains")
    sft: dict = Field(default_factory=dict, description="SFTConfig fields (model/out/data/lora are filled in)")
    grpo: dict = Field(default_factory=dict, description="GRPOConfig fields (model/out/data/lora are filled in)")
    sections: ClassVar = {"sft": (SFTConfig, ("model", "out", "data", "lora")),
                          "grpo": (GRPOConfig, ("model", "out", "data", "lora")),
                          "grm": (GRMConfig, ("model", "out", "domains", "lora"))}
    n_train: int = Field(2000, gt=0, description="train prompts per domain for GRPO")
    n_demos: int = Field(200, gt=0, description="demonstrations per domain for the expert's SFT")
    demo_mistakes: float = Field(0.0, ge=0, lt=1, description="share of demonstrations that show the domain's "
                                 "systematic mistake instead (imperfect demonstrations: headroom for RL)")
    lora: LoraConfig | None = LoraConfig()
    rubric_rl: Literal["none", "hidden_checker", "grm"] = Field(
        "none", description="RL for rubric domains: none (SFT only), grm (joint RL with the actor as its own judge, "
                            "the `grm` section) or GRPO on the hidden checker (an upper bound: that checker is meant "
                            "for evaluation only)")
    grm: dict = Field(default_factory=dict, description="GRMConfig fields for rubric_rl grm "
                                                        "(model/out/domains/lora are filled in)")
    per_domain: dict[str, dict[Literal["sft", "grpo", "grm"], dict]] = Field(
        default_factory=dict, description="one domain's changes to the sft/grpo/grm sections, merged over them: "
                                          "{arith: {grpo: {optim: {lr: 1.0e-4}}}}")
    report_n: int = Field(200, gt=0, description="test prompts per domain in the report")
    workers: int = Field(1, ge=1, description="experts trained at once, each in its own process with cores/workers "
                                              "threads (tiny models use one core poorly)")
    seed: int = 0

    _known_domains = field_validator("domains")(known_domains)

    @field_validator("per_domain")
    @classmethod
    def _per_domain_changes_validate(cls, v: dict, info: ValidationInfo) -> dict:
        known_domains(list(v))
        for domain, changes in v.items():
            for name, fields in changes.items():
                section_cls, filled = cls.sections[name]
                merged = deep_merge(info.data.get(name) or {}, fields)
                try:
                    validate_section(section_cls, merged, "", name, check_files=False,
                                     filled={k: _placeholder(k) for k in filled})
                except ConfigError as e:
                    raise ValueError(f"{domain}.{e.field}: {e.problem}") from None
        return v

    def section(self, name: str, domain: str) -> dict:
        """The `name` section (sft, grpo or grm) as `domain`'s expert runs it: per_domain merged over it."""
        return deep_merge(getattr(self, name), self.per_domain.get(domain, {}).get(name, {}))

    @model_serializer(mode="wrap")
    def _without_unused_sections(self, handler):
        # empty grm and per_domain are left out, so configs written before they existed keep their stage keys
        data = handler(self)
        for name in ("grm", "per_domain"):
            if isinstance(data, dict) and not data.get(name):
                data.pop(name, None)
        return data


class MergeConfig(Strict):
    """Weight-merging baseline: the experts' task vectors merged into their base; see pluribus.stages.merge."""

    model: str = Field(description="the base every expert's task vector is taken against (the general SFT model)")
    experts: list[str] = Field(min_length=1, description="expert folders: LoRA adapters over `model` or full HF models")
    method: Literal["linear", "task_arithmetic", "ties"]
    weights: list[float] | None = Field(None, description="linear only: one weight ≥ 0 per expert, normalised; None: uniform")
    density: float = Field(0.2, gt=0, le=1, description="ties only: share of each task vector's entries kept, per tensor")
    scale: float = Field(1.0, allow_inf_nan=False, description="task_arithmetic and ties: λ multiplying the merged task vector")
    out: str

    @field_validator("weights")
    @classmethod
    def _weights(cls, weights, info):
        if weights is None:
            return weights
        if info.data.get("method") != "linear":
            raise ValueError("applies to method linear only")
        experts = info.data.get("experts", [])
        if len(weights) != len(experts):
            raise ValueError(f"{len(weights)} weights for {len(experts)} experts")
        if not all(0 <= w < float("inf") for w in weights) or sum(weights) == 0:
            raise ValueError(f"must be finite, ≥ 0 and not all 0, got {weights}")
        return weights

    @field_validator("density")
    @classmethod
    def _density(cls, density, info):
        if info.data.get("method") != "ties":
            raise ValueError("applies to method ties only")
        return density

    @field_validator("scale")
    @classmethod
    def _scale(cls, scale, info):
        if info.data.get("method") == "linear":
            raise ValueError("applies to methods task_arithmetic and ties, not linear")
        return scale


class OffPolicyConfig(Strict):
    """Off-policy distillation baseline: multi-task SFT on the experts' own answers; see pluribus.stages.offpolicy."""

    model: str = Field(description="the student's starting point (the general SFT model)")
    out: str
    experts: dict[str, str] = Field(min_length=1, description="domain -> expert folder (LoRA adapter or full HF model)")
    n_per_domain: int = Field(500, gt=0, description="world train prompts per domain, one expert answer each")
    sampling: SamplingConfig = Field(default_factory=SamplingConfig,
                                     description="how the experts answer; temperature 1 samples their own distribution")
    generate_batch_size: int = Field(256, gt=0, description="prompts per generation batch")
    save_data: bool = Field(True, description="write the distillation set to <out>.data.jsonl for inspection")
    sft: dict = Field(default_factory=dict, description="SFTConfig fields (model/out/data are filled in)")
    sections: ClassVar = {"sft": (SFTConfig, ("model", "out", "data"))}
    seed: int = 0

    _known_domains = field_validator("experts")(known_domains)
