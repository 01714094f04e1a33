"""OPD: the scheduled loss equals the naive one (value and gradient), NaN guard, and short runs that learn."""

import json
import shutil

import pytest
import torch
from test_teachers import batch, make_adapter, make_full, spec

from pluribus.config import DataConfig, OptimConfig, OPDConfig, SamplingConfig, TeacherConfig, validate
from pluribus.core import reverse_kl, reverse_kl_chunked, weighted_teacher_loss
from pluribus.errors import ConfigError, PluribusError
from pluribus.models import load, response_logits
from pluribus.stages import opd
from pluribus.teachers import loss as loss_module
from pluribus.teachers import (TeacherGroup, TeacherHead, TeacherPool, TeacherStates, distill_backward, output_head,
                               response_hidden_states)
from pluribus.world import generate


@pytest.fixture(autouse=True, scope="module")
def _threads(one_thread):
    yield


@pytest.fixture(scope="module")
def teachers(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("opd-teachers")
    return {"add": make_adapter(tiny_llama, root / "lora-add", seed=1),
            "max": make_full(tiny_llama, root / "full-max", seed=2),
            "sort": make_adapter(tiny_llama, root / "lora-sort", seed=3)}


def perturbed_student(path, seed=7):
    student, tok = load(path)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=gen))
    return student.train(), tok


@pytest.mark.parametrize("names,passes,forward_weight", [(("add", "max", "sort"), 3, 0.0), (("add", "sort", "max"), 2, 0.0),
                                                         (("add", "max", "sort"), 3, 0.75)])
def test_scheduled_loss_equals_naive_loss_in_value_and_gradient(tiny_llama, teachers, names, passes, forward_weight,
                                                                monkeypatch):
    """Two LoRA teachers over one base and a full one; in the second order the LoRA teachers are neighbours,
    share their base's head, and are scored in one chunked pass. forward_weight α: each position's divergence is
    (1 − α)·KL(s ‖ t) + α·KL(t ‖ s), the forward KL taken here in an independent form."""
    student, tok = perturbed_student(tiny_llama)
    weights = {"add": 1.0, "max": 0.5, "sort": 2.0}
    teachers = {d: teachers[d] for d in names}
    pool = TeacherPool([spec(d, teachers[d], [d], weights[d]) for d in teachers], tok, vocab_size=len(tok))
    chunked_passes = []
    monkeypatch.setattr(loss_module, "reverse_kl_chunked",
                        lambda *a, **k: chunked_passes.append(1) or reverse_kl_chunked(*a, **k))
    domains = ["sort", "add", "max", "sort", "add", "max", "add"]
    index = pool.route(domains)
    order = pool.order(index)
    index = [index[i] for i in order]
    prompts, ids, mask = batch(tok, [domains[i] for i in order], seed=5)

    # Naive: full [B, T, V] logits from each sample's own teacher, exact KL, weighted per-teacher means.
    teacher_logits = torch.zeros(len(index), ids.shape[1], len(tok))
    for e, d in enumerate(teachers):
        rows = [b for b, i in enumerate(index) if i == e]
        model, _ = load(teachers[d], trainable=False)
        with torch.no_grad():
            teacher_logits[rows] = response_logits(model.eval(), [prompts[b] for b in rows], ids[rows], mask[rows],
                                                   tok.pad_token_id)
    student_logits = response_logits(student, prompts, ids, mask, tok.pad_token_id)
    kl_B_T = reverse_kl(student_logits, teacher_logits)
    if forward_weight:
        log_s, log_t = student_logits.log_softmax(-1), teacher_logits.log_softmax(-1)
        forward_B_T = (log_t.exp() * (log_t - log_s)).sum(-1)
        assert float((forward_B_T - kl_B_T)[mask].abs().max()) > 1e-3  # 100× the tolerance: two divergences
        kl_B_T = (1 - forward_weight) * kl_B_T + forward_weight * forward_B_T
    index_B_T = torch.tensor(index)[:, None].expand_as(mask)
    naive_loss, naive_means = weighted_teacher_loss(kl_B_T[mask], torch.ones(int(mask.sum()), dtype=torch.bool),
                                                    index_B_T[mask], pool.weights_E)
    naive_loss.backward()
    naive_grads = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)

    states = pool.teacher_states(prompts, ids, mask, index, tok.pad_token_id)
    hidden = response_hidden_states(student, prompts, ids, mask, tok.pad_token_id)
    head, bias = output_head(student)
    loss, means, tokens = distill_backward(hidden, head, states, pool.weights_E, chunk_size=5, student_bias_V=bias,
                                           forward_weight=forward_weight)

    assert float(naive_loss) > 0.01  # the teachers differ from the student: a real comparison
    torch.testing.assert_close(loss.float(), naive_loss.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(means.float(), naive_means, rtol=1e-5, atol=1e-5)
    assert tokens.tolist() == [int(mask[[i == e for i in index]].sum()) for e in range(3)]
    assert len(chunked_passes) == passes
    for name, p in student.named_parameters():
        torch.testing.assert_close(p.grad, naive_grads[name], rtol=1e-5, atol=1e-5, msg=name)


def test_non_finite_teacher_term_reaches_no_student_weight(tiny_llama):
    student, tok = perturbed_student(tiny_llama)
    prompts, ids, mask = batch(tok, ["add", "max"], seed=2)
    hidden = response_hidden_states(student, prompts, ids, mask, tok.pad_token_id)
    head, _ = output_head(student)
    N, D = hidden.shape
    bad = torch.full((N, D), float("nan"))
    states = TeacherStates(torch.zeros(N, dtype=torch.long),
                           [TeacherGroup(0, slice(0, N), bad, TeacherHead(head.detach().clone()))])
    loss, _, _ = distill_backward(hidden, head, states, torch.ones(1))
    assert not torch.isfinite(loss)
    trunk = [p for n, p in student.named_parameters() if "layers" in n]
    assert all(p.grad is None for p in trunk)


def _config(tmp_path, student, teachers, **overrides):
    base = dict(model=str(student), out=str(tmp_path / "opd"), data=DataConfig(domains=["add", "max"], n_per_domain=30),
                teachers=teachers, steps=8, prompts_per_step=8, sampling=SamplingConfig(max_new_tokens=10),
                optim=OptimConfig(lr=3e-3, warmup_steps=1, min_lr_ratio=0.3), chunk_size=16, reward_every=4)
    return OPDConfig(**{**base, **overrides})


def test_opd_run_reduces_kl_to_each_teacher_and_logs(tiny_llama, teachers, tmp_path, monkeypatch):
    from pluribus.models import lean
    from pluribus.models.lean import LeanDecoder

    prompts_run = []  # by the sampler's prefill: the student's training forward of the prompts fills its cache
    monkeypatch.setattr(LeanDecoder, "_native_prefill",
                        lambda self, *args, _real=LeanDecoder._native_prefill: (prompts_run.append(1),
                                                                                _real(self, *args))[1])
    known = []  # the update's forward takes the decode's projections of the responses
    monkeypatch.setattr(lean._KnownLinear, "apply", lambda *args, _real=lean._KnownLinear.apply: (known.append(1),
                                                                                                 _real(*args))[1])
    cfg = _config(tmp_path, tiny_llama, [TeacherConfig(path=str(teachers["add"]), domains=["add"]),
                                         TeacherConfig(path=str(teachers["max"]), domains=["max"], weight=0.5)])
    out = opd.run(cfg)
    assert not prompts_run or shutil.which("c++") is None
    assert bool(known) == (shutil.which("c++") is not None)
    rows = [json.loads(line) for line in (tmp_path / "opd.metrics.jsonl").read_text().splitlines()]
    assert len(rows) == cfg.steps and sum(r["skipped"] for r in rows) == 0
    for name in ("add", "max"):
        kl = [r[f"kl_{name}"] for r in rows if f"kl_{name}" in r]
        assert len(kl) >= 6 and sum(kl[-2:]) < 0.8 * sum(kl[:2]), (name, kl)
    first = rows[0]
    assert first["rollouts_add"] + first["rollouts_max"] == cfg.prompts_per_step
    assert {"reward_add", "reward_max", "tokens_per_s", "step_s", "teacher_s", "lr"} <= set(first)
    assert "reward_add" not in rows[1]  # reward_every=4
    assert rows[-1]["lr"] < rows[2]["lr"]  # cosine decay after warmup
    model, _ = load(out)
    assert not hasattr(model, "disable_adapter")


def test_lora_student_is_saved_merged(tiny_llama, teachers, tmp_path):
    from pluribus.config import LoraConfig

    cfg = _config(tmp_path, tiny_llama, [TeacherConfig(path=str(teachers["sort"]), domains=["add", "max"])],
                  steps=2, prompts_per_step=4, lora=LoraConfig(rank=4, alpha=8), reward_every=0)
    out = opd.run(cfg)
    assert (out / "config.json").is_file() and not (out / "adapter_config.json").exists()
    assert json.loads((out / "pluribus.json").read_text())["lora_merged"] is True


def test_grown_student_starts_from_the_same_logits_and_is_saved_grown(tiny_llama, teachers, tmp_path):
    """expand_depth: the first step's samples and KL are the ungrown student's (same logits, same seeds); the
    saved student has twice the layers, and the copies were trained (their zeroed projections moved)."""
    first = {}
    for copies in (0, 1):
        cfg = _config(tmp_path / str(copies), tiny_llama, [TeacherConfig(path=str(teachers["add"]), domains=["add", "max"])],
                      steps=2, prompts_per_step=4, reward_every=0, expand_depth=copies)
        out = opd.run(cfg)
        rows = [json.loads(line) for line in (tmp_path / str(copies) / "opd.metrics.jsonl").read_text().splitlines()]
        first[copies] = rows[0]
        model, _ = load(out)
        layers = model.model.layers
        assert len(layers) == model.config.num_hidden_layers == (1 + copies) * len(load(tiny_llama)[0].model.layers)
    assert first[1]["tokens"] == first[0]["tokens"]
    assert first[1]["kl"] == pytest.approx(first[0]["kl"], rel=1e-5)
    assert layers[1].self_attn.o_proj.weight.abs().max() > 0 and layers[1].mlp.down_proj.weight.abs().max() > 0


def test_forward_kl_weight_reaches_the_loss_and_leaves_the_default_key_alone(tiny_llama, teachers, tmp_path):
    """The same first rollout (sampled before any update) scored by the reverse KL and by the forward KL: the
    tokens agree and the logged divergences differ; α = 0 is left out of the stage's config dump."""
    first = {}
    for alpha in (0.0, 1.0):
        cfg = _config(tmp_path / str(alpha), tiny_llama, [TeacherConfig(path=str(teachers["add"]), domains=["add", "max"])],
                      steps=1, prompts_per_step=4, reward_every=0, forward_kl_weight=alpha)
        opd.run(cfg)
        first[alpha] = json.loads((tmp_path / str(alpha) / "opd.metrics.jsonl").read_text().splitlines()[0])
        assert ("forward_kl_weight" in cfg.model_dump()) == bool(alpha)
    assert first[1.0]["tokens"] == first[0.0]["tokens"] > 0
    assert abs(first[1.0]["kl"] - first[0.0]["kl"]) > 1e-3 * first[0.0]["kl"] > 0
    with pytest.raises(ConfigError, match="forward_kl_weight"):
        validate(OPDConfig, dict(model="m", out="o", data={"domains": ["add"]}, teachers=[{"path": "a", "domains": ["add"]}],
                                 forward_kl_weight=1.5), "opd.yaml")


def test_config_offers_the_aggregations_the_maths_knows():
    from typing import get_args

    from pluribus.core.distill import AGGREGATIONS

    assert get_args(OPDConfig.model_fields["aggregation"].annotation) == AGGREGATIONS


def test_config_refuses_a_grown_student_for_a_vllm_engine(tmp_path, monkeypatch):
    monkeypatch.setattr("pluribus.rollout.vllm_engine.vllm_installed", lambda: True)
    data = dict(model="m", out="o", data={"domains": ["add"]}, teachers=[{"path": "a", "domains": ["add"]}],
                expand_depth=1, rollout={"engine": "vllm"})
    with pytest.raises(ConfigError, match="expand_depth needs rollout.engine 'hf'"):
        validate(OPDConfig, data, "opd.yaml")


def test_every_streamed_domain_needs_a_teacher(tiny_llama, teachers, tmp_path):
    cfg = _config(tmp_path, tiny_llama, [TeacherConfig(path=str(teachers["add"]), domains=["add"])])
    with pytest.raises(PluribusError, match=r"\['max'\] have no teacher.*forgotten"):
        opd.run(cfg)
    # A domain weighted 0 is not in the stream, so it needs no teacher.
    records = generate("add", "train", 5) + generate("max", "train", 5)
    stream = opd.DomainStream(records, {"add": 1.0, "max": 0.0}, seed=0)
    assert stream.domains == ["add"] and {r.domain for r in stream.draw(20)} == {"add"}


def test_config_refuses_a_domain_with_two_teachers(tmp_path):
    data = dict(model="m", out="o", data={"domains": ["add"]},
                teachers=[{"path": "a", "domains": ["add"]}, {"path": "b", "domains": ["add", "max"]}])
    with pytest.raises(ConfigError, match="domain 'add' has two teachers"):
        validate(OPDConfig, data, "opd.yaml")
