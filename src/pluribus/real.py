"""The recipe on a real model and users' data: `pluribus run CONFIG` with a `datasets:` section.

Where the world pipeline (`pluribus.pipeline`) generates its domains, this one takes one JSONL file per
domain, in a public format or the data contract (`pluribus.formats`), from a Hugging Face instruct model:

1. data: each data set converted to the contract under `runs/NAME/data/<domain>.jsonl`, its records'
   domain set to the data set's name (which routes its reward and its teacher).
2. sft: the general SFT model, on every record with an answer to imitate (GSM8K solutions, MBPP and
   HumanEval solutions, reference answers of the rubric set; IFEval brings none).
3. experts: per domain, SFT on its own demonstrations (where it has any), then RL on its reward:
   GRPO with the domain's checker (math: math-verify, code: the sandbox, ifeval: the constraint
   checkers), or, for a rubric domain (`reward: grm`), the joint generate-and-judge loop of
   `pluribus.stages.grm`, whose annotated set is the rubric records' labelled judgements and whose
   verifiable judging items come from the checkable domains.
4. opd: the experts merged into the general SFT model by multi-teacher on-policy distillation.
5. compare: where data sets name `test` records, greedy pass@1 and mean reward of the base, the general
   SFT model, each domain's expert and the student on them (`compare/scores.json`, `compare/scores.md`).
   Rubric domains have no checker and are not scored.

Each stage is skipped when its DONE marker matches its config and inputs (`pluribus.pipeline`), and
resumes from its checkpoints when interrupted. Stage sections hold the stage configs' own fields; the
paths, data and teachers are filled in here. With `--smoke`, the `smoke` section is merged over the file.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, ValidationInfo, field_validator, model_validator

from pluribus import durable
from pluribus.config import (GRMConfig, GRPOConfig, LoraConfig, OPDConfig, SFTConfig, Strict, deep_merge, read_yaml,
                             validate, validate_section)

CHECKED = ("math", "code", "ifeval")


class DatasetConfig(Strict):
    """One domain's data: a JSONL file, its format and the reward that checks it."""

    path: str
    test: str | None = Field(None, description="held-out records in the same format, scored by the compare stage")
    format: Literal["gsm8k", "mbpp", "humaneval", "ifeval", "pluribus"] = "pluribus"
    reward: Literal["math", "code", "ifeval", "grm"] = Field(
        description="math, code, ifeval, or grm (a rubric set for the generative judge); default: the format's")

    @model_validator(mode="before")
    @classmethod
    def _format_reward(cls, data):
        from pluribus.formats import REWARDS

        if isinstance(data, dict) and data.get("reward") is None and data.get("format") in REWARDS:
            data = {**data, "reward": REWARDS[data["format"]]}
        return data

    @field_validator("path", "test")
    @classmethod
    def _exists(cls, path, info: ValidationInfo):
        if path is not None and (info.context or {}).get("check_files") and not Path(path).is_file():
            raise ValueError(f"data file not found: {path}")
        return path


class RealExpertsConfig(Strict):
    """How every domain's expert is trained: SFT, then GRPO (checked domains) or GRM (rubric domains)."""

    lora: LoraConfig | None = Field(LoraConfig(), description="experts as LoRA adapters over the general SFT model")
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields (model/out/data/lora filled in)")
    grpo: dict[str, Any] = Field(default_factory=dict, description="GRPOConfig fields (model/out/data/lora filled in)")
    grm: dict[str, Any] = Field(default_factory=dict, description="GRMConfig fields (model/out/data/domains/"
                                                                  "judge_domains/lora filled in)")


class CompareConfig(Strict):
    """The last stage: greedy pass@1 and mean reward on each checked domain's `test` records, for the base, the
    general SFT model, the domain's expert and the OPD student."""

    n: int = Field(200, gt=0, description="test records per domain, at most")
    max_new_tokens: int = Field(512, gt=0)
    batch_size: int = Field(16, gt=0)


class RealRecipeConfig(Strict):
    """The recipe on a real model and users' data; see the module docstring."""

    name: str = Field(..., min_length=1, pattern=r"^[\w.-]+$")
    out_dir: str = "runs"
    base_model: str = Field(description="a local Hugging Face model folder (an instruct model)")
    datasets: dict[str, DatasetConfig] = Field(min_length=1, description="domain name -> its data")
    seed: int = 0
    sft: dict[str, Any] = Field(default_factory=dict, description="SFTConfig fields (model/out/data filled in)")
    experts: RealExpertsConfig = Field(default_factory=RealExpertsConfig)
    opd: dict[str, Any] = Field(default_factory=dict, description="OPDConfig fields (model/out/data/teachers filled in)")
    compare: CompareConfig = Field(default_factory=CompareConfig)
    smoke: dict[str, Any] = Field(default_factory=dict, description="overrides applied with --smoke")

    @field_validator("base_model")
    @classmethod
    def _model_folder(cls, path, info: ValidationInfo):
        if (info.context or {}).get("check_files") and not (Path(path) / "config.json").is_file():
            raise ValueError(f"{path}: no model folder there (download the model first; nothing is fetched at run time)")
        return path


def is_real_recipe(path: str | Path) -> bool:
    """Whether a run config is this recipe's (it names `datasets`) rather than the world pipeline's."""
    return "datasets" in read_yaml(path)


def plan(path: str | Path, smoke: bool = False) -> dict[str, Any]:
    """Every stage's validated config, before anything runs: a mistake anywhere fails at once, by its path."""
    raw, where = read_yaml(path), str(path)
    if smoke:
        raw, where = deep_merge(raw, raw.get("smoke") or {}), f"{path} (smoke)"
    cfg = validate(RealRecipeConfig, raw, where, check_files=True)
    run_dir = Path(cfg.out_dir) / cfg.name
    files = {d: str(run_dir / "data" / f"{d}.jsonl") for d in cfg.datasets}
    checked = {d: ds.reward for d, ds in cfg.datasets.items() if ds.reward in CHECKED}
    rubric = [d for d, ds in cfg.datasets.items() if ds.reward == "grm"]
    lora = None if cfg.experts.lora is None else cfg.experts.lora.model_dump()
    seed = {"seed": cfg.seed}
    general = str(run_dir / "sft" / "model")
    stages: dict[str, Any] = {"sft": validate_section(
        SFTConfig, cfg.sft, where, "sft", seed, {"model": cfg.base_model, "out": general,
                                                 "data": {"jsonl": list(files.values())}}, check_files=False)}
    experts = {}
    for d, ds in cfg.datasets.items():
        folder = run_dir / "experts" / d
        experts[d] = {"sft": validate_section(SFTConfig, cfg.experts.sft, where, "experts.sft", seed,
                                              {"model": general, "out": str(folder / "sft"),
                                               "data": {"jsonl": [files[d]]}, "lora": lora}, check_files=False)}
        if ds.reward == "grm":
            judge_files = [files[c] for c in checked]
            experts[d]["grm"] = validate_section(
                GRMConfig, cfg.experts.grm, where, "experts.grm", {**seed, "template": "grm"},
                {"model": "-", "out": str(folder / "expert"), "lora": lora, "domains": [d],
                 "judge_domains": list(checked), "data": {"jsonl": [files[d], *judge_files], "rewards": checked}},
                check_files=False)
        else:
            experts[d]["grpo"] = validate_section(
                GRPOConfig, cfg.experts.grpo, where, "experts.grpo", seed,
                {"model": "-", "out": str(folder / "expert"), "lora": lora,
                 "data": {"jsonl": [files[d]], "rewards": {d: ds.reward}}}, check_files=False)
    stages["experts"] = experts
    stages["opd"] = validate_section(
        OPDConfig, cfg.opd, where, "opd", seed,
        {"model": general, "out": str(run_dir / "opd" / "model"),
         "data": {"jsonl": list(files.values()), "rewards": checked},
         "teachers": [{"path": str(run_dir / "experts" / d / "expert"), "domains": [d]} for d in cfg.datasets]},
        check_files=False)
    return {"config": cfg, "run_dir": run_dir, "files": files, "rubric": rubric, "stages": stages}


def run_real(path: str | Path, smoke: bool = False) -> Path:
    """Data → general SFT → experts (SFT, then GRPO or GRM) → OPD, under `out_dir/name/`."""
    from pluribus.data import write_jsonl
    from pluribus.formats import read_dataset
    from pluribus.pipeline import _stage
    from pluribus.stages import opd, sft

    p = plan(path, smoke)
    cfg, run_dir, files, stages = p["config"], p["run_dir"], p["files"], p["stages"]
    keys = {}
    for d, ds in cfg.datasets.items():
        records = read_dataset(ds.path, ds.format, domain=d)
        write_jsonl(records, files[d])
        keys[d] = durable.fingerprint([r.to_json() for r in records])
        print(f"[data] {d}: {len(records)} {ds.format} records, reward {ds.reward}")
    data_key = durable.fingerprint(keys)
    general = stages["sft"]
    _stage(run_dir, "sft", general.model_dump() | {"input": cfg.base_model, "data": data_key},
           lambda _: sft.run(general))
    general_key = (run_dir / "sft" / "DONE").read_text().strip()
    for d, expert in stages["experts"].items():
        _stage(run_dir, f"experts/{d}", {k: v.model_dump() for k, v in expert.items()} | {"input": general_key,
                                                                                          "data": keys[d]},
               lambda _, d=d, expert=expert: _train_expert(d, expert))
    experts_key = durable.fingerprint([(run_dir / "experts" / d / "DONE").read_text().strip() for d in cfg.datasets])
    _stage(run_dir, "opd", stages["opd"].model_dump() | {"input": experts_key, "data": data_key},
           lambda _: opd.run(stages["opd"]))
    tests = {d: read_dataset(ds.test, ds.format, domain=d)[:cfg.compare.n] for d, ds in cfg.datasets.items()
             if ds.test and ds.reward in CHECKED}
    if tests:
        models = {"base": cfg.base_model, "sft": general.out, "opd": stages["opd"].out}
        _stage(run_dir, "compare", cfg.compare.model_dump() | {
            "tests": durable.fingerprint({d: [r.to_json() for r in rs] for d, rs in tests.items()}),
            "input": (run_dir / "opd" / "DONE").read_text().strip()},
            lambda stage_dir: compare(stage_dir, models, run_dir / "experts", tests, cfg))
    summary = {"run_dir": str(run_dir), "experts": {d: str(run_dir / "experts" / d / "expert") for d in cfg.datasets},
               "student": stages["opd"].out}
    durable.write_text(run_dir / "summary.json", json.dumps(summary, indent=2))
    return run_dir


def compare(stage_dir: Path, models: dict[str, str], experts_dir: Path, tests: dict[str, list],
            cfg: RealRecipeConfig) -> dict:
    """Greedy pass@1 and mean reward per domain of the base, sft and opd `models` and of each domain's expert
    (on its own domain); written to scores.json and, as a table, scores.md."""
    from pluribus.dist import resolve_device
    from pluribus.models import load
    from pluribus.rewards.router import RewardRouter
    from pluribus.rollout import SamplingParams
    from pluribus.stages.evaluate import generate_texts

    router = RewardRouter({d: cfg.datasets[d].reward for d in tests})
    params = SamplingParams(cfg.compare.max_new_tokens, temperature=0)

    def score(model, tokenizer, domain: str) -> dict[str, float]:
        texts = generate_texts(model, tokenizer, tests[domain], params, cfg.seed, cfg.compare.batch_size)
        rewards = router.score(tests[domain], [t[0] for t in texts])
        return {"pass1": sum(r >= 1.0 for r in rewards) / len(rewards), "reward": sum(rewards) / len(rewards)}

    scores: dict[str, dict[str, dict[str, float]]] = {}
    device = resolve_device()  # a GPU when there is one
    for label, path in [("base", models["base"]), ("sft", models["sft"]), ("expert", None), ("opd", models["opd"])]:
        if path is None:  # each domain's own expert
            scores[label] = {d: score(*load(experts_dir / d / "expert", trainable=False, device=device), d)
                             for d in tests}
        else:
            model, tokenizer = load(path, trainable=False, device=device)
            scores[label] = {d: score(model, tokenizer, d) for d in tests}
    rows = ["| domain | n | " + " | ".join(scores) + " |", "| --- | --- |" + " --- |" * len(scores)]
    rows += [f"| {d} | {len(tests[d])} | " + " | ".join(f"{100 * scores[m][d]['pass1']:.1f}" for m in scores) + " |"
             for d in tests]
    table = "greedy pass@1 (%) on each domain's test records\n\n" + "\n".join(rows) + "\n"
    durable.write_text(stage_dir / "scores.json", json.dumps(scores, indent=2))
    durable.write_text(stage_dir / "scores.md", table)
    print(table)
    return scores


def _train_expert(domain: str, expert: dict[str, Any]) -> Path:
    """The expert's SFT on its domain's demonstrations where it has any, then its RL from there."""
    from pluribus.data import read_jsonl
    from pluribus.stages import grm, grpo, sft

    sft_cfg = expert["sft"]
    start = sft_cfg.model
    if any(r.answer is not None for r in read_jsonl(sft_cfg.data.jsonl[0])):
        start = str(sft.run(sft_cfg, meta={"domain": domain, "expert_stage": "sft"}))
    else:
        print(f"[experts/{domain}] no demonstrations: RL starts from the general SFT model")
    if "grm" in expert:
        return grm.run(expert["grm"].model_copy(update={"model": start}), meta={"domain": domain, "expert_stage": "grm"})
    return grpo.run(expert["grpo"].model_copy(update={"model": start}), meta={"domain": domain, "expert_stage": "grpo"})
