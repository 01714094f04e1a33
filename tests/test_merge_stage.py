"""Weight-merging baseline stage: tiny LoRA and full-weight experts merged, checked against their merged weights."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

from pluribus.config import MergeConfig, load_yaml, validate
from pluribus.core import ties_merge
from pluribus.errors import ConfigError, PluribusError
from pluribus.models import build_tiny, load, merge_lora, read_meta, render_prompt
from pluribus.stages import merge as stage
from test_teachers import make_adapter, make_full

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def experts(tiny_llama, tmp_path_factory):
    root = tmp_path_factory.mktemp("merge-experts")
    loras = [make_adapter(tiny_llama, root / f"lora-{i}", seed=i) for i in range(2)]
    return loras + [make_full(tiny_llama, root / "full", seed=7)]


def weights_of(path) -> dict[str, torch.Tensor]:
    """Every parameter of a model folder, a LoRA adapter folded into its base (independently of the stage)."""
    model, _ = load(path, trainable=False)
    return {name: p.detach().clone() for name, p in merge_lora(model).named_parameters()}


def logits_of(model, tok):
    ids = torch.tensor([render_prompt(tok, [{"role": "user", "content": "add 12 34"}])])
    with torch.no_grad():
        return model.eval()(input_ids=ids).logits


def merge(tmp_path, base, experts, method, name="merged", **fields):
    cfg = MergeConfig(model=str(base), experts=[str(e) for e in experts], method=method, out=str(tmp_path / name),
                      **fields)
    return stage.run(cfg)


def assert_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], atol=1e-6):
    assert actual.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], atol=atol, rtol=0, msg=name)


def test_linear_merge_of_one_lora_expert_is_that_expert(tiny_llama, experts, tmp_path):
    out = merge(tmp_path, tiny_llama, experts[:1], "linear")
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()  # a full model
    merged, tok = load(out, trainable=False)
    expert, _ = load(experts[0], trainable=False)
    base, _ = load(tiny_llama, trainable=False)
    torch.testing.assert_close(logits_of(merged, tok), logits_of(expert, tok), atol=1e-5, rtol=0)
    assert (logits_of(merged, tok) - logits_of(base, tok)).abs().max() > 1e-2  # the expert does change the base
    meta = read_meta(out)
    assert meta["stage"] == "merge" and meta["method"] == "linear" and meta["experts"] == [str(experts[0])]


def test_linear_merge_of_two_is_the_mean_and_weights_apply(tiny_llama, experts, tmp_path):
    a, b = weights_of(experts[0]), weights_of(experts[1])
    out = merge(tmp_path, tiny_llama, experts[:2], "linear")
    assert_weights(weights_of(out), {n: (a[n] + b[n]) / 2 for n in a})
    out = merge(tmp_path, tiny_llama, experts[:2], "linear", name="weighted", weights=[3.0, 1.0])
    assert_weights(weights_of(out), {n: 0.75 * a[n] + 0.25 * b[n] for n in a})


def test_lora_and_full_experts_mix(tiny_llama, experts, tmp_path):
    lora, full = weights_of(experts[0]), weights_of(experts[2])
    out = merge(tmp_path, tiny_llama, [experts[0], experts[2]], "linear")
    assert_weights(weights_of(out), {n: (lora[n] + full[n]) / 2 for n in lora})


def test_task_arithmetic_adds_scaled_task_vectors(tiny_llama, experts, tmp_path):
    base, a, b, c = weights_of(tiny_llama), *(weights_of(e) for e in experts)
    out = merge(tmp_path, tiny_llama, experts, "task_arithmetic", scale=0.4)
    expected = {n: base[n] + 0.4 * ((a[n] - base[n]) + (b[n] - base[n]) + (c[n] - base[n])) for n in base}
    assert_weights(weights_of(out), expected)


def test_ties_trims_and_matches_core_on_task_vectors(tiny_llama, experts, tmp_path):
    base, a, b = weights_of(tiny_llama), weights_of(experts[0]), weights_of(experts[1])
    out = merge(tmp_path, tiny_llama, experts[:2], "ties", density=0.2, scale=1.5)
    merged = weights_of(out)
    expected = {n: base[n] + ties_merge([a[n] - base[n], b[n] - base[n]], 0.2, 1.5) for n in base}
    assert_weights(merged, expected)
    q = "model.layers.0.self_attn.q_proj.weight"
    changed = (merged[q] != base[q]).float().mean().item()
    assert 0.2 <= changed <= 0.4 + 1e-6  # each expert keeps 20% of entries; the union is 20–40%
    norm = "model.norm.weight"  # no LoRA there: untouched
    assert torch.equal(merged[norm], base[norm])


def test_merged_folder_loads_with_transformers(tiny_llama, experts, tmp_path):
    out = merge(tmp_path, tiny_llama, experts, "ties", density=0.5)
    ours, tok = load(out, trainable=False)
    plain = AutoModelForCausalLM.from_pretrained(out, local_files_only=True)
    assert torch.equal(logits_of(ours, tok), logits_of(plain, tok))
    assert json.loads((out / "pluribus.json").read_text())["config"]["density"] == 0.5


def test_cli_merge(tiny_llama, experts, tmp_path):
    from pluribus.cli import app

    config = tmp_path / "merge.yaml"
    config.write_text(f"model: {tiny_llama}\nexperts: [{experts[0]}, {experts[1]}]\nmethod: linear\n"
                      f"out: {tmp_path / 'cli-merged'}\n")
    result = CliRunner().invoke(app, ["merge", str(config)])
    assert result.exit_code == 0, result.output
    assert "merged model saved to" in result.output
    a, b = weights_of(experts[0]), weights_of(experts[1])
    assert_weights(weights_of(tmp_path / "cli-merged"), {n: (a[n] + b[n]) / 2 for n in a})


# --- refusals ---------------------------------------------------------------------------------------

def test_adapter_over_another_base_is_refused(tiny_llama, tmp_path):
    other = build_tiny(tmp_path / "other-base", size=1, seed=1)
    adapter = make_adapter(other, tmp_path / "foreign", seed=3)
    with pytest.raises(PluribusError, match=r"foreign is a LoRA adapter over .*other-base, not over the merge base"):
        merge(tmp_path, tiny_llama, [adapter], "linear")


def test_expert_of_another_shape_is_refused(tiny_llama, tmp_path):
    bigger = build_tiny(tmp_path / "bigger", size=2, seed=0)
    with pytest.raises(PluribusError, match=r"bigger: model\.embed_tokens\.weight is \(\d+, 128\), the base's is \(\d+, 64\)"):
        merge(tmp_path, tiny_llama, [bigger], "linear")


def test_out_over_an_input_is_refused(tiny_llama, experts, tmp_path):
    cfg = MergeConfig(model=str(tiny_llama), experts=[str(experts[0])], method="linear", out=str(experts[0]))
    with pytest.raises(PluribusError, match="would overwrite the base or an expert"):
        stage.run(cfg)
    assert (experts[0] / "adapter_config.json").is_file()


@pytest.mark.parametrize("fields, field, problem", [
    ({"method": "linear", "weights": [1.0]}, "weights", "1 weights for 2 experts"),
    ({"method": "linear", "weights": [1.0, -1.0]}, "weights", "must be finite, ≥ 0 and not all 0"),
    ({"method": "ties", "weights": [1.0, 1.0]}, "weights", "applies to method linear only"),
    ({"method": "linear", "density": 0.5}, "density", "applies to method ties only"),
    ({"method": "linear", "scale": 2.0}, "scale", "applies to methods task_arithmetic and ties"),
    ({"method": "ties", "density": 0.0}, "density", "greater than 0"),
    ({"method": "ties", "density": 1.5}, "density", "less than or equal to 1"),
    ({"method": "dare"}, "method", "'linear', 'task_arithmetic' or 'ties'"),
    ({"method": "ties", "experts": []}, "experts", "at least 1 item"),
])
def test_invalid_merge_config_is_one_line(fields, field, problem):
    data = {"model": "m", "experts": ["a", "b"], "out": "o", **fields}
    with pytest.raises(ConfigError) as info:
        validate(MergeConfig, data, "merge.yaml")
    message = str(info.value)
    assert message.startswith(f"merge.yaml: {field}: ") and problem in message and "\n" not in message


def test_merge_config_from_yaml_with_defaults(tmp_path):
    path = tmp_path / "merge.yaml"
    path.write_text("model: base\nexperts: [a, b, c]\nmethod: ties\nout: o\n")
    cfg = load_yaml(path, MergeConfig)
    assert (cfg.density, cfg.scale, cfg.weights) == (0.2, 1.0, None)
