"""Off-policy distillation baseline: multi-task SFT of the student on answers the experts wrote.

What the OPD merge is measured against on the training-signal side. Same experts, same student
start, same prompts; the difference is whose samples the student learns from. OPD (V4 Eq. 29)
samples from the student and minimises the reverse KL to the teacher over the full vocabulary;
here each domain's expert answers `n_per_domain` world train prompts once, up front, and the
student imitates those answers with prompt-masked cross-entropy (`pluribus.stages.sft`). This is
sequence-level knowledge distillation: a Monte-Carlo estimate of the forward KL(π_E ‖ π_θ) on
the expert's own trajectories, which the student never visits itself.

Sampling: temperature 1 (the `SamplingConfig` default) by default, so the answers are draws from
the expert's own distribution and the loss above is the forward KL to that distribution. A lower
temperature sharpens the targets towards the expert's mode (closer to greedy "hard-label"
distillation); that is a choice to make in the config, not here.

Departure from rejection sampling: answers are NOT filtered by the domain's checker. Keeping only
the answers that pass would be rejection-sampling fine-tuning (RFT), a different baseline that
also uses the reward; this one uses the experts and nothing else, as OPD does.

Memory: one expert is loaded at a time and dropped before the next.

Resuming: the answers are written with a key file beside them (`save_data`, the default), under the experts'
identities and the sampling arguments; a rerun that finds that key reads them back instead of sampling again
(at 40x the quickstart's budget that is ~15 minutes of one core), and the SFT resumes from its checkpoint.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from pluribus.config import OffPolicyConfig, SamplingConfig, SFTConfig, validate
from pluribus.data import Record, read_jsonl, write_jsonl
from pluribus.durable import fingerprint, fingerprint_dir, fsync_tree, kept
from pluribus.models import load
from pluribus.rollout import SamplingParams
from pluribus.stages import sft
from pluribus.stages.evaluate import generate_texts
from pluribus.world import generate


def expert_records(experts: dict[str, str], n_per_domain: int, sampling: SamplingConfig, seed: int,
                   batch_size: int) -> list[Record]:
    """World train records of each domain, their `answer` replaced by that domain's expert's response.

    Domains in the order of `experts`; one response per prompt, seeded per request, so the same
    arguments give the same records.
    """
    params = SamplingParams(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k)
    records: list[Record] = []
    for domain, path in experts.items():
        model, tokenizer = load(path, trainable=False)
        prompts = generate(domain, "train", n_per_domain, seed)
        texts = generate_texts(model, tokenizer, prompts, params, seed, batch_size)
        records += [replace(r, answer=t[0], meta={**r.meta, "expert": str(path)}) for r, t in zip(prompts, texts)]
        del model
    return records


def data_path(out: str | Path) -> Path:
    """Where the distillation set is written: beside the student folder."""
    out = Path(out)
    return out.with_name(out.name + ".data.jsonl")


def _write_durably(records: list[Record], path: Path) -> None:
    write_jsonl(records, path)
    fsync_tree(path)  # on disk before the key that vouches for it, power loss included


def data_key(cfg: OffPolicyConfig) -> str:
    """What the written answers depend on: each expert's identity, the prompts drawn and the sampling (not the
    batch size: each response is seeded on its own)."""
    return fingerprint({"experts": {d: fingerprint_dir(p) for d, p in cfg.experts.items()},
                        "n_per_domain": cfg.n_per_domain, "sampling": cfg.sampling.model_dump(), "seed": cfg.seed})


def run(cfg: OffPolicyConfig) -> Path:
    jsonl = data_path(cfg.out)
    data = {"jsonl": [str(jsonl)] if cfg.save_data else []}  # what the student is trained on, for the record
    # Validated before any generation: a typo in `sft` must not cost the experts' sampling time.
    sft_cfg = validate(SFTConfig, {"seed": cfg.seed, **cfg.sft, "model": cfg.model, "out": cfg.out, "data": data},
                       "offpolicy.sft")

    def sample() -> list[Record]:
        return expert_records(cfg.experts, cfg.n_per_domain, cfg.sampling, cfg.seed, cfg.generate_batch_size)

    # A resumed run reads the same answers back instead of sampling them again.
    records = kept(jsonl, data_key(cfg), sample, _write_durably, read_jsonl) if cfg.save_data else sample()
    return sft.run(sft_cfg, records=records, meta={"stage": "offpolicy", "experts": cfg.experts})
