"""Specialists: from the general SFT model, one expert per domain, SFT on its demonstrations then GRPO.

Each expert is saved as an HF folder (a LoRA adapter over the general SFT model by default, so
twelve experts cost twelve small adapters) with its domain recorded in `pluribus.json`; the
teacher pool of the OPD stage reads that record. Its SFT checkpoint is kept beside it, so the
effect of RL can be measured against it: `report` scores both on every domain.

`demo_mistakes` makes the demonstrations imperfect: that share shows the domain's systematic
mistake instead of the answer, so SFT learns both and RL has a real choice to sharpen (on clean
demonstrations a tiny model reaches ~100% from SFT alone on easy domains, leaving RL nothing).

A rubric domain has no rule to check it: its RL needs the generative judge. `rubric_rl: grm` trains
its expert with the joint loop of `pluribus.stages.grm` (the actor judges its own rollouts, and its
judging is trained too); with `rubric_rl: none` its expert is its SFT checkpoint; `rubric_rl:
hidden_checker` runs GRPO on the world's hidden rubric checker instead, an upper bound for
ablations, since that checker is meant for evaluation only.

A finished domain writes `<domain>/DONE` (the key of its config); a re-run skips it, and resumes an
interrupted one from its loops' checkpoints.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pluribus.config import EvalConfig, ExpertsConfig, GRMConfig, GRPOConfig, SFTConfig, validate
from pluribus.dist import resolve_device
from pluribus.durable import fingerprint, fingerprint_dir, holds, kept_json, publish_dir, write_text
from pluribus.models import load
from pluribus.parallel import call, run_all
from pluribus.stages import evaluate, grm, grpo, sft
from pluribus.world import DOMAINS, generate, with_mistakes


def expert_paths(out_dir: str | Path, domain: str) -> tuple[Path, Path]:
    """(SFT checkpoint, final expert) folders of one domain's expert."""
    return Path(out_dir) / domain / "sft", Path(out_dir) / domain / "expert"


def domain_key(cfg: ExpertsConfig, domain: str) -> str:
    """What one domain's expert is trained from: the config as that domain sees it (another domain's
    per_domain changes, the domain list, the report and the workers do not count)."""
    own = {"changes": cfg.per_domain[domain]} if domain in cfg.per_domain else {}
    return fingerprint(cfg.model_dump(exclude={"domains", "report_n", "workers", "per_domain"}) | {"domain": domain} | own)


def run_one(cfg: ExpertsConfig, domain: str, reward_fn=None) -> Path:
    """Train one domain's expert, unless its DONE marker says this config finished it already.

    An interrupted domain resumes: its SFT and GRPO loops restart from their checkpoints."""
    sft_out, expert_out = expert_paths(cfg.out_dir, domain)
    done = sft_out.parent / "DONE"
    key = domain_key(cfg, domain)
    if holds(done, key):
        print(f"[experts] {domain} done earlier, skipped")
        return expert_out
    done.unlink(missing_ok=True)
    expert = _train(cfg, domain, sft_out, expert_out, reward_fn)
    write_text(done, key)
    return expert


def has_rl(cfg: ExpertsConfig, domain: str, reward_fn=None) -> bool:
    """Whether the domain's expert gets RL after its SFT: a rubric domain without a reward function gets it only
    through `rubric_rl` (grm or hidden_checker); with `none` its expert is its SFT checkpoint."""
    return not (DOMAINS[domain].rubric_domain and reward_fn is None and cfg.rubric_rl == "none")


def _train(cfg: ExpertsConfig, domain: str, sft_out: Path, expert_out: Path, reward_fn) -> Path:
    lora = None if cfg.lora is None else cfg.lora.model_dump()
    data = {"domains": [domain], "n_per_domain": cfg.n_demos, "seed": cfg.seed}
    sft_cfg = validate(SFTConfig, {"seed": cfg.seed, **cfg.section("sft", domain), "model": cfg.model,
                                   "out": str(sft_out), "data": data, "lora": lora}, f"experts.sft ({domain})")
    rl = has_rl(cfg, domain, reward_fn)
    mistakes = cfg.demo_mistakes if rl else 0.0  # imperfect demonstrations only where RL follows to fix them
    demos = with_mistakes(generate(domain, "train", cfg.n_demos, seed=cfg.seed), mistakes, cfg.seed)
    sft.run(sft_cfg, records=demos, meta={"domain": domain, "expert_stage": "sft"})
    if not rl:  # no judge: the SFT checkpoint is the expert
        tmp = expert_out.with_name(expert_out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(sft_out, tmp)
        return publish_dir(tmp, expert_out)
    if DOMAINS[domain].rubric_domain and reward_fn is None and cfg.rubric_rl == "grm":
        grm_cfg = validate(GRMConfig, {"seed": cfg.seed, **cfg.section("grm", domain), "model": str(sft_out),
                                       "out": str(expert_out), "domains": [domain], "lora": lora},
                           f"experts.grm ({domain})")
        return grm.run(grm_cfg, meta={"domain": domain, "expert_stage": "grm"})
    grpo_cfg = validate(GRPOConfig, {"seed": cfg.seed, **cfg.section("grpo", domain), "model": str(sft_out),
                                     "out": str(expert_out), "data": {**data, "n_per_domain": cfg.n_train},
                                     "lora": lora},
                        f"experts.grpo ({domain})")
    records = generate(domain, "train", cfg.n_train, seed=cfg.seed + 1)
    return grpo.run(grpo_cfg, records=records, reward_fn=reward_fn, meta={"domain": domain, "expert_stage": "grpo"})


def run(cfg: ExpertsConfig, base: str | None = None) -> dict[str, Path]:
    """Every domain's expert; with `workers` > 1, that many at once in spawned processes, the longest first
    (`expected_cost`), so no worker is left with a long one at the end while the others idle. Results do not
    depend on the order (each expert seeds itself); a failed one fails the stage. Each expert is scored for the
    report as it ends, and the models the report compares them with (the general SFT model, and `base` if given)
    are scored last, in the same pool: short jobs where a worker would otherwise idle until the last expert ends."""
    domains = cfg.domains or list(DOMAINS)
    order = sorted(domains, key=lambda d: -expected_cost(cfg, d))
    jobs = [(_train_and_score, cfg, d) for d in order]
    jobs += [(_reference_scores, cfg, label, model) for label, model in _references(cfg, base).items()]
    experts = dict(zip(order, run_all(call, jobs, cfg.workers)[:len(order)]))  # the references' scores are kept
    return {d: experts[d] for d in domains}


def _train_and_score(cfg: ExpertsConfig, domain: str) -> Path:
    """`run_one`, then the expert's scores for the report, in the same worker: scored as each expert ends, they
    fill the time a worker would idle at the end of the stage, instead of a round of their own after it (the
    quickstart: ~40 s on both cores)."""
    expert = run_one(cfg, domain)
    _expert_scores(cfg, domain)
    return expert


def _report_key(cfg: ExpertsConfig, **model: str) -> str:
    """The key of a model's kept report scores: what names the model (an expert's key; a folder's path and identity),
    the report's n, seed and domains."""
    return fingerprint(model | {"n": cfg.report_n, "seed": cfg.seed, "domains": list(DOMAINS)})


def _expert_scores(cfg: ExpertsConfig, domain: str, compute: bool = True) -> dict | None:
    """The final expert's greedy pass@1 on every domain and, where RL followed, its SFT checkpoint's on its own
    (`report`'s), kept as `<domain>/scores.json` under a key (the expert's, the report's n and seed); computed
    when missing or stale (None instead with compute=False)."""
    sft_path, final_path = expert_paths(cfg.out_dir, domain)

    def scores() -> dict:
        out = {"final": pass1(final_path, list(DOMAINS), cfg.report_n, cfg.seed)}
        return out | ({"sft": pass1(sft_path, [domain], cfg.report_n, cfg.seed)} if has_rl(cfg, domain) else {})

    return kept_json(sft_path.parent / "scores.json", _report_key(cfg, expert=domain_key(cfg, domain)), scores, compute)


def _references(cfg: ExpertsConfig, base: str | None) -> dict[str, str]:
    """The models the report compares the experts with: the general SFT model they start from, and the base."""
    return {"general": cfg.model} | ({"base": base} if base else {})


def _reference_scores(cfg: ExpertsConfig, label: str, model: str, compute: bool = True) -> dict | None:
    """Greedy pass@1 of a model the report compares the experts with (`_references`) on every domain, kept as
    `scores.<label>.json` in the stage folder under a key (the model's path and identity, the report's n and seed;
    the path too, because a model that is no local folder, a hub id, has no identity of its own)."""
    key = _report_key(cfg, model=fingerprint_dir(model), path=str(model))
    return kept_json(Path(cfg.out_dir) / f"scores.{label}.json", key,
                     lambda: pass1(model, list(DOMAINS), cfg.report_n, cfg.seed), compute)


def expected_cost(cfg: ExpertsConfig, domain: str, sample: int = 64) -> float:
    """A relative estimate of the time one domain's expert takes to train: positions processed, from the mean
    prompt and answer length (characters) of `sample` train records. SFT runs steps × batch demonstrations;
    GRPO steps × prompts × group rollouts, each generated answer position counted three times (a decode step
    costs more than a training position). Only the order matters; on the quickstart's twelve it matches the
    measured order of the long ones (code, ifeval, sort, reverse)."""
    records = generate(domain, "train", sample, seed=cfg.seed)
    prompt = sum(len(m["content"]) for r in records for m in r.messages()) / len(records)
    answer = sum(len(r.answer or "") for r in records) / len(records)
    sft_section, rl_section = cfg.section("sft", domain), cfg.section("grpo", domain)

    def field(section: dict, config, name: str):
        return section.get(name, config.model_fields[name].default)

    cost = field(sft_section, SFTConfig, "steps") * field(sft_section, SFTConfig, "batch_size") * (prompt + answer)
    if has_rl(cfg, domain):
        rollouts = field(rl_section, GRPOConfig, "steps") * field(rl_section, GRPOConfig, "prompts_per_step") * \
            field(rl_section, GRPOConfig, "group_size")
        cost += rollouts * (prompt + 3 * answer)
    return cost


def pass1(model_path: Path | str, domains: list[str], n: int, seed: int) -> dict[str, float]:
    """Greedy pass@1 of a model folder on `n` test prompts of each domain."""
    ecfg = EvalConfig(model=str(model_path), domains=domains, n=n, samples=0, seed=seed)
    model, tokenizer = load(model_path, trainable=False, device=resolve_device(ecfg.device))
    return {s.domain: s.pass1_greedy for s in evaluate.evaluate_model(model, tokenizer, ecfg)}


def report(cfg: ExpertsConfig, base: str | None = None) -> dict:
    """Greedy pass@1 on `report_n` test prompts: the base (if given), the general SFT model and each final
    expert on every world domain (the final experts' other domains show what specialising cost them); each
    expert's SFT checkpoint on its own domain only, all the table reads from it (evaluating it everywhere was
    ~40% of the report's time). An expert without RL has one model: its SFT score is its final one. Each expert's
    scores come from `<domain>/scores.json` where `run` kept them, else are computed here. Written to
    out_dir/report.json."""
    every, domains = list(DOMAINS), cfg.domains or list(DOMAINS)
    paths = {d: expert_paths(cfg.out_dir, d) for d in domains}
    saved = {d: _expert_scores(cfg, d, compute=False) for d in domains}  # scored by `run` as each expert ended
    references = _references(cfg, base)
    scores = {label: _reference_scores(cfg, label, model, compute=False) for label, model in references.items()}
    jobs = {label: (model, every) for label, model in references.items() if scores[label] is None}
    jobs |= {f"{d}/final": (str(paths[d][1]), every) for d in domains if saved[d] is None}  # the long jobs first
    jobs |= {f"{d}/sft": (str(paths[d][0]), [d]) for d in domains if saved[d] is None and has_rl(cfg, d)}
    scores |= dict(zip(jobs, run_all(pass1, [(m, ds, cfg.report_n, cfg.seed) for m, ds in jobs.values()],
                                     cfg.workers)))
    for d, kept in saved.items():
        scores |= {} if kept is None else {f"{d}/{stage}": value for stage, value in kept.items()}
    out: dict = {"n": cfg.report_n, "general": scores["general"], "experts": {}}
    if base:
        out["base"] = scores["base"]
    for d in domains:
        final = scores[f"{d}/final"]
        out["experts"][d] = {"sft": scores.get(f"{d}/sft", {d: final[d]}), "final": final, "rl": has_rl(cfg, d)}
    path = Path(cfg.out_dir) / "report.json"
    path.write_text(json.dumps(out, indent=2))
    return out


def report_table(rep: dict):
    """Own-domain greedy pass@1: base, general SFT, expert SFT, expert after GRPO, the gains; and the
    final expert's mean on the other domains."""
    from rich.table import Table

    t = Table(title=f"experts: greedy pass@1 (%), {rep['n']} test prompts per domain")
    cols = ["domain", "base", "general SFT", "expert SFT", "expert GRPO", "GRPO gain", "gain over general",
            "other domains"]
    for c in cols:
        t.add_column(c, justify="left" if c == "domain" else "right")
    pct = lambda x: "-" if x is None else f"{100 * x:.1f}"  # noqa: E731
    rows = []
    for d, e in rep["experts"].items():
        others = [v for k, v in e["final"].items() if k != d]
        row = (rep.get("base", {}).get(d), rep["general"][d], e["sft"][d], e["final"][d] if e["rl"] else None,
               e["final"][d] - e["sft"][d] if e["rl"] else None, e["final"][d] - rep["general"][d],
               sum(others) / len(others))
        rows.append(row)
        t.add_row(d, *map(pct, row))
    if rows:
        def mean(i):
            values = [r[i] for r in rows if r[i] is not None]
            return sum(values) / len(values) if values else None

        t.add_row("mean", *(pct(mean(i)) for i in range(len(cols) - 1)), style="bold")
    return t
