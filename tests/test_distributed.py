"""torchrun data parallelism (pluribus.dist) on CPU: 2 gloo processes × half the batch against 1 × the whole.

One torchrun launch (tests/dist_worker.py) runs every 2-process scenario, DDP and FSDP2, and the same
scenario functions run here in one process for the reference. Checked: SFT (the stage itself), the
GRPO update, the OPD update and the GRM update (rewards from the same rollouts and judgements) give the
same losses and weights (1e-5; the GRM update's weights in float64); the GRM stage labels, warms up and
measures its judge as one process does; what a 2-process run saved loads in one process with the live
model's logits exactly; FSDP2's losses are DDP's. Tests that need NCCL are marked gpu and skipped without CUDA.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
import dist_worker  # noqa: E402

TOL = 1e-5
CRASH_ENV = "PLURIBUS_CRASH_AT"
WORKER = Path(__file__).parent / "dist_worker.py"


def _torchrun(jobs: list, tmp: Path, nproc: int = 2, crash_at: str | None = None) -> subprocess.CompletedProcess:
    spec = tmp / f"jobs-{len(list(tmp.glob('jobs-*.json')))}.json"
    spec.write_text(json.dumps(jobs))
    env = os.environ | {"OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    env.pop("PYTEST_CURRENT_TEST", None)
    env.pop(CRASH_ENV, None)
    if crash_at:
        env[CRASH_ENV] = crash_at
    proc = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc),
                             "--standalone", str(WORKER), str(spec)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, 9)  # torchrun and its workers: none may outlive the test
        raise
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_llama):
    """The student (tiny_llama) and two teachers of other seeds, one saved with a different init."""
    from pluribus.models import build_tiny

    root = tmp_path_factory.mktemp("dist-models")
    return {"student": str(tiny_llama),
            "teachers": [str(build_tiny(root / f"teacher{s}", size=1, seed=s)) for s in (1, 2)]}


def _rollout(model_path: str, domains: list[str], group: int, top_p: float):
    from pluribus.models import load, render_prompt
    from pluribus.rollout import SamplingParams, sample
    from pluribus.world import generate

    model, tokenizer = load(model_path)
    records = [r for d in domains for r in generate(d, "train", 2, seed=3)]
    prompts = [render_prompt(tokenizer, r.messages()) for r in records for _ in range(group)]
    with torch.no_grad():
        return sample(model, prompts, SamplingParams(6, 1.0, top_p), eos_id=tokenizer.eos_token_id,
                      pad_id=tokenizer.pad_token_id, request_seeds=list(range(len(prompts))), tokenizer=tokenizer)


def _grm_batch(model_path: str, group: int) -> dict:
    """One step's GRM episodes (4 rubric prompts; 2 annotated and 2 verifiable judged items) and a rollout of
    them; each judged item's first sample is rewritten to its label (+1, the others −1)."""
    from pluribus.models import load, render_prompt
    from pluribus.rewards.grm import WORLD_TEMPLATE
    from pluribus.rollout import SamplingParams, sample
    from pluribus.stages import grm
    from pluribus.world import generate

    labelled = generate("describe", "train", 2, seed=6)
    checkable = generate("sort", "train", 2, seed=7)
    episodes = grm.Episodes(generate("describe", "train", 4, seed=5),
                            grm.annotate(labelled, ["odd s1", "even"], 200, WORLD_TEMPLATE)
                            + grm.checker_items(checkable, [checkable[0].answer, "x"], WORLD_TEMPLATE))
    model, tokenizer = load(model_path)
    prompts = [render_prompt(tokenizer, c) for c in episodes.conversations(WORLD_TEMPLATE) for _ in range(group)]
    with torch.no_grad():
        rollout = sample(model, prompts, SamplingParams(6, 1.0), eos_id=tokenizer.eos_token_id,
                         pad_id=tokenizer.pad_token_id, request_seeds=list(range(len(prompts))), tokenizer=tokenizer)
    first_judged = len(episodes.generation) * group
    for q, item in enumerate(episodes.judging):
        rollout.texts[first_judged + q * group] = item.label.text
    return {"episodes": episodes, "n_annotated": 2, "rollout": rollout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory, models, one_thread):
    """Every scenario: 2 processes under DDP and under FSDP2 (one torchrun), and 1 process here."""
    tmp = tmp_path_factory.mktemp("dist")
    grpo_batch = _rollout(models["student"], ["add", "add"], group=4, top_p=0.9)  # 2 domains' records × G
    raw = [(len(t) * 7 % 5) / 4 for t in grpo_batch.texts]  # varied within groups
    raw[3] = None  # an invalid reward: masked out of its group
    torch.save({"rollout": grpo_batch, "raw": raw}, tmp / "grpo.pt")
    # Without a KL term, rows without an advantage are skipped: in the first step rank 0's groups have none (it runs
    # its masked stand-in row while rank 1 trains); in the second no row has one (a zero-gradient AdamW step).
    half = len(raw) // 2  # rank 0's rows: two groups
    torch.save({"rollout": grpo_batch, "raw_steps": [[1.0] * 4 + [0.0] * (half - 4) + raw[half:], [0.5] * len(raw),
                                                     [0.5] * len(raw)]}, tmp / "grpo-skip.pt")
    opd_batch = _rollout(models["student"], ["add", "reverse"], group=3, top_p=1.0)  # ordered by teacher
    torch.save({"rollout": opd_batch, "teacher_index": [0] * 6 + [1] * 6}, tmp / "opd.pt")
    torch.save(_grm_batch(models["student"], group=2), tmp / "grm.pt")

    def jobs(mode: str, where: str) -> list:
        return [["stage_runs", {"model": models["student"], "teachers": models["teachers"],
                                "out": f"{tmp}/{where}/stages", "mode": mode}]] * (where != "one") + [["sft_run", {"model": models["student"], "out": f"{tmp}/{where}/sft", "mode": mode}],
                ["grpo_update", {"model": models["student"], "rollout": f"{tmp}/grpo.pt",
                                 "out": f"{tmp}/{where}/grpo", "mode": mode}],
                ["grpo_update", {"model": models["student"], "rollout": f"{tmp}/grpo-skip.pt",
                                 "out": f"{tmp}/{where}/grpo-skip", "mode": mode, "steps": 3, "kl_coef": 0.0}],
                ["opd_update", {"model": models["student"], "teachers": models["teachers"],
                                "rollout": f"{tmp}/opd.pt", "out": f"{tmp}/{where}/opd", "mode": mode}],
                ["opd_update", {"model": models["student"], "teachers": models["teachers"], "rollout": f"{tmp}/opd.pt",
                                "out": f"{tmp}/{where}/opd-sequence-sum", "mode": mode, "aggregation": "sequence_sum"}],
                ["grm_update", {"model": models["student"], "batch": f"{tmp}/grm.pt", "out": f"{tmp}/{where}/grm",
                                "mode": mode}],
                ["grm_update", {"model": models["student"], "batch": f"{tmp}/grm.pt", "out": f"{tmp}/{where}/grm64",
                                "mode": mode, "dtype": "float64"}],
                ["grm_run", {"model": models["student"], "out": f"{tmp}/{where}/grm-stage", "mode": mode}]]

    (tmp / "sft.yaml").write_text(json.dumps({"model": models["student"], "out": f"{tmp}/cli/sft/model", "steps": 2,
                                               "data": {"domains": ["add"], "n_per_domain": 8}, "batch_size": 4,
                                               "distributed": "fsdp2"}))
    command = [["cli", {"args": ["sft", str(tmp / "sft.yaml")]}]]  # last: the command line ends the workers
    done = _torchrun([["backend", {"out": str(tmp)}]] + jobs("ddp", "ddp") + jobs("fsdp2", "fsdp2") + command, tmp)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (tmp / "torchrun.out").write_text(done.stdout)
    for name, kwargs in jobs("ddp", "one"):
        # Under torchrun SFT runs transformers' padded forward (the lean forwards step aside for DDP's wrapper); so
        # does its one-process reference, so that the two differ by the split batch and the reduction alone, not by
        # two forwards' rounding after three AdamW steps (tests/test_models_lean.py compares those forwards)
        lean_off = name == "sft_run"
        if lean_off:
            os.environ["PLURIBUS_LEAN"] = "0"
        try:
            getattr(dist_worker, name)(**kwargs)
        finally:
            if lean_off:
                os.environ.pop("PLURIBUS_LEAN", None)
    return tmp


def _result(root: Path, where: str, scenario: str) -> dict:
    return torch.load(root / where / scenario / "result.pt", weights_only=False)


def _max_param_diff(a: dict, b: dict) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].float() - b[k].float()).abs().max()) for k in a)


def _sft_losses(root: Path, where: str) -> list[float]:
    lines = (root / where / "sft" / "model.metrics.jsonl").read_text().splitlines()
    return [json.loads(line)["loss"] for line in lines]


def test_sft_two_processes_half_batch_each_equal_one_process(runs, models):
    from pluribus.models import saved_weights

    one, two = _sft_losses(runs, "one"), _sft_losses(runs, "ddp")
    assert len(one) == 2 and one[1] < one[0]  # steps 0 and 2 are logged, and it learns
    assert max(abs(a - b) for a, b in zip(one, two)) < TOL
    trained = saved_weights(runs / "one/sft/model")
    assert _max_param_diff(trained, saved_weights(models["student"])) > 1e-3  # the steps moved the weights
    assert _max_param_diff(trained, saved_weights(runs / "ddp/sft/model")) < TOL


@pytest.mark.parametrize("scenario", ["grpo", "opd", "opd-sequence-sum"])
def test_rl_updates_on_the_same_rollouts_equal_one_process(runs, models, scenario):
    from pluribus.models import saved_weights

    one, two = _result(runs, "one", scenario), _result(runs, "ddp", scenario)
    assert len(one["losses"]) == 2 and all(torch.isfinite(torch.tensor(one["losses"])))
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < TOL
    start = saved_weights(models["student"])
    assert max(float((one["params"][k] - v).abs().max()) for k, v in start.items()) > 1e-4  # the steps moved it
    assert _max_param_diff(one["params"], two["params"]) < TOL
    if scenario == "grpo":
        for k in ("clip_frac", "kl", "masked_seq_frac", "entropy"):
            assert abs(one["stats"][k] - two["stats"][k]) < TOL, k
        assert one["stats"]["kl"] > 0  # the reference and the KL term are exercised
    else:
        assert one["tokens_E"] == two["tokens_E"] and min(one["tokens_E"]) > 0  # both teachers scored
        if scenario != "opd":  # another objective on the same rollouts: another loss
            assert abs(one["losses"][0] - _result(runs, "one", "opd")["losses"][0]) > 1e-3
        assert max(abs(a - b) for x, y in zip(one["kl_E"], two["kl_E"]) for a, b in zip(x, y)) < TOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_skipping_rows_without_an_advantage_gives_one_process_update(runs, models, mode):
    """A rank with no row to train runs its masked stand-in, and a step with none anywhere is AdamW on a zero
    gradient on every rank: the same losses and weights as one process."""
    from pluribus.models import saved_weights

    one, two = _result(runs, "one", "grpo-skip"), _result(runs, mode, "grpo-skip")
    assert one["losses"][1:] == [0.0, 0.0] and max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < TOL
    assert one["stats"]["zero_adv_frac"] == two["stats"]["zero_adv_frac"] == 1.0
    start = saved_weights(models["student"])
    assert max(float((one["params"][k] - v).abs().max()) for k, v in start.items()) > 1e-4
    assert _max_param_diff(one["params"], two["params"]) < TOL


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
def test_the_grm_update_on_the_same_rollouts_and_judgements_equals_one_process(runs, models, mode):
    """Each rank judges its own generation rows (request seeds of one process) and rewards its own judged items;
    the update is the global one: same rewards, judge metrics, losses and weights.

    The weights are compared after the same update in float64. In float32 the two sides round their gradients
    differently (the ranks' sums are added in another order), and AdamW turns a rounding difference in a gradient
    entry near its eps into a step difference of up to lr: on this batch one embedding entry of 6,592 (a token the
    batch barely uses) ends 1.4e-5 apart while every other weight is within 2.4e-6. In float64 that entry agrees
    and every weight is within 3e-7 (RMSNorm still takes float32 statistics, as in transformers)."""
    from pluribus.models import saved_weights

    one, two = _result(runs, "one", "grm"), _result(runs, mode, "grm")
    assert max(abs(a - b) for a, b in zip(one["losses"], two["losses"])) < TOL
    one64, two64 = _result(runs, "one", "grm64"), _result(runs, mode, "grm64")
    assert one64["params"]["model.embed_tokens.weight"].dtype == torch.float64
    assert max(abs(a - b) for a, b in zip(one64["losses"], two64["losses"])) < TOL / 100
    assert _max_param_diff(one64["params"], two64["params"]) < TOL / 10
    start = saved_weights(models["student"])
    assert max(float((one["params"][k] - v).abs().max()) for k, v in start.items()) > 1e-4  # the steps moved it
    keys = ("gen_reward", "gen_invalid_frac", "gen_hidden_score", "judging_reward", "judging_reward_annotated",
            "judging_reward_verifiable", "clip_frac", "kl", "masked_seq_frac", "entropy")
    for a, b in zip(one["metrics"], two["metrics"]):
        assert all(abs(a[k] - b[k]) < TOL for k in keys), (a, b)
    first = one["metrics"][0]  # rewards that vary: +1 and -1 in every judged group, judge values and invalid ones
    assert first["judging_reward"] == first["judging_reward_annotated"] == first["judging_reward_verifiable"] == 0.0
    assert 0 < first["gen_invalid_frac"] < 1 and 0 < first["gen_reward"] < 1
    assert one["metrics"][0]["gen_reward"] != one["metrics"][1]["gen_reward"]  # fresh judgements each step
    assert one["metrics"][1]["kl"] > 0


def test_the_grm_stage_labels_and_warms_up_as_one_process_and_fsdp2_logs_what_ddp_logs(runs):
    """The stage loop itself: every rank samples its part of the labelled and held-out sets, so the judge metrics
    before and after the warm-up and the warm-up's loss are those of one process; FSDP2's RL rows are DDP's."""
    from pluribus.models import load

    def rows(where, name):
        path = runs / where / "grm-stage" / f"model.{name}metrics.jsonl"
        return [json.loads(line) for line in path.read_text().splitlines()]

    warm = {where: rows(where, "warmup.") for where in ("one", "ddp", "fsdp2")}
    assert [r["step"] for r in warm["one"]] == [0, 0, 2] and "judge_acc" in warm["one"][0]
    for where in ("ddp", "fsdp2"):
        for a, b in zip(warm["one"], warm[where]):
            assert sorted(a) == sorted(b)
            assert all(a[k] == b[k] if not isinstance(a[k], float) else abs(a[k] - b[k]) < TOL for k in a), (a, b)
    ddp, fsdp = rows("ddp", ""), rows("fsdp2", "")
    assert [r["step"] for r in ddp] == [0, 1, 2] == [r["step"] for r in fsdp]
    for a, b in zip(ddp, fsdp):
        assert all(abs(a[k] - b[k]) < TOL for k in a if isinstance(a[k], float) and k != "step_s"), (a, b)
    model, _ = load(runs / "fsdp2" / "grm-stage" / "model")  # written once, loadable by one process
    assert (runs / "fsdp2" / "grm-stage" / "model.warmup" / "config.json").is_file()
    assert sum(p.numel() for p in model.parameters()) > 0


@pytest.mark.parametrize("mode", ["ddp", "fsdp2"])
@pytest.mark.parametrize("scenario", ["grpo", "opd", "grm"])
def test_a_two_process_save_loads_in_one_process_with_identical_logits(runs, mode, scenario):
    from pluribus.models import load

    live = _result(runs, mode, scenario)["logits"]
    model, _ = load(runs / mode / scenario / "model")
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([dist_worker.PROBE])).logits
    assert torch.equal(logits, live)


def test_a_two_process_checkpoint_resumes_in_one_process(runs, models):
    from pluribus.models import load, load_weights, saved_weights

    ckpt = runs / "ddp/sft/model.ckpt"
    assert not list(ckpt.glob("rollout-*")) and (ckpt / "step-00000003/state.pt").is_file()
    state = torch.load(ckpt / "step-00000003/state.pt", weights_only=False)
    assert len(state["rank_rngs"]) == 2 and state["step"] == 3
    model, _ = load(models["student"])
    load_weights(model, ckpt / "step-00000003/model")
    final = saved_weights(runs / "ddp/sft/model")
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in final.items())


def test_fsdp2_gives_the_losses_and_weights_of_ddp(runs):
    from pluribus.models import saved_weights

    assert max(abs(a - b) for a, b in zip(_sft_losses(runs, "ddp"), _sft_losses(runs, "fsdp2"))) < TOL
    assert _max_param_diff(saved_weights(runs / "ddp/sft/model"), saved_weights(runs / "fsdp2/sft/model")) < TOL
    for scenario in ("grpo", "opd"):
        ddp, fsdp = _result(runs, "ddp", scenario), _result(runs, "fsdp2", scenario)
        assert max(abs(a - b) for a, b in zip(ddp["losses"], fsdp["losses"])) < TOL
        assert _max_param_diff(ddp["params"], fsdp["params"]) < TOL


@pytest.mark.parametrize("stage", ["grpo", "opd"])
def test_stage_loops_under_fsdp2_log_what_ddp_logs(runs, stage):
    def rows(mode):
        return [json.loads(line) for line in (runs / mode / "stages" / f"{stage}.metrics.jsonl").read_text().splitlines()]

    ddp, fsdp = rows("ddp"), rows("fsdp2")
    assert [r["step"] for r in ddp] == [0, 1] == [r["step"] for r in fsdp]
    for key in ("loss", "grad_norm", "response_len", "kl") + (("reward_mean", "eval_pass1") if stage == "grpo" else ()):
        assert all(abs(a[key] - b[key]) < TOL for a, b in zip(ddp, fsdp)), key
    if stage == "opd":  # the global batch: 4 prompts, 2 per rank
        assert all(r["rollouts_add"] + r.get("rollouts_reverse", 0) == 4 for r in ddp)
    assert (runs / "fsdp2" / "stages" / stage / "config.json").is_file()


def test_a_stage_command_under_torchrun_ends_cleanly_and_speaks_once(runs):
    """`torchrun -m pluribus.cli sft` with FSDP2: both workers exit 0 (the fixture asserts torchrun's code) after
    leaving the group, and only rank 0 prints."""
    assert (runs / "cli/sft/model/config.json").is_file()
    assert (runs / "torchrun.out").read_text().count("model saved to") == 1


def test_a_two_process_run_killed_mid_way_resumes_to_the_uninterrupted_result(tmp_path, models):
    """SIGKILL both workers of a 2-process DDP SFT run after step 4 (its last checkpoint was after step 3), launch it
    again: it resumes from that checkpoint (each rank's RNG state too) and ends with the weights and metrics of a
    run never interrupted, bit for bit."""
    from pluribus.models import saved_weights

    def launch(where: str, crash_at: str | None = None) -> subprocess.CompletedProcess:
        config = tmp_path / f"{where}.yaml"
        config.write_text(json.dumps({"model": models["student"], "out": f"{tmp_path}/{where}/sft/model", "steps": 6,
                                      "data": {"domains": ["add", "sort"], "n_per_domain": 24}, "batch_size": 4,
                                      "checkpoint_every": 2, "distributed": "ddp"}))
        return _torchrun([["cli", {"args": ["sft", str(config)]}]], tmp_path, crash_at=crash_at)

    def logged(where: str) -> list[dict]:  # SFT logs steps 0, 10, 20, ... and the last
        lines = (tmp_path / f"{where}/sft/model.metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "elapsed_s"} for line in lines]

    whole = launch("whole")
    assert whole.returncode == 0, whole.stderr[-3000:]
    killed = launch("killed", crash_at=f"{tmp_path}/killed/sft/model:4")
    assert killed.returncode != 0 and not (tmp_path / "killed/sft/model/config.json").exists()
    assert (tmp_path / "killed/sft/model.ckpt/step-00000004/state.pt").is_file()  # 4 steps done: 0-3
    assert [row["step"] for row in logged("killed")] == [0] and [row["step"] for row in logged("whole")] == [0, 5]
    resumed = launch("killed")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed after step 3 of 6" in resumed.stdout  # not a fresh start, which would also end alike
    final, reference = saved_weights(tmp_path / "killed/sft/model"), saved_weights(tmp_path / "whole/sft/model")
    assert sorted(final) == sorted(reference) and all(torch.equal(final[k], reference[k]) for k in reference)
    assert logged("killed") == logged("whole")


def test_one_process_needs_no_process_group_and_shards_nothing():
    from pluribus import dist

    world = dist.init()
    assert (world.size, world.rank, world.is_main) == (1, 0, True)
    assert world.shard([1, 2, 3]) == [1, 2, 3] and dist.all_true(True) and not dist.all_true(False)
    assert dist.weighted_means({"x": (0.25, 3.0)}) == {"x": 0.25}


def test_a_batch_that_does_not_split_over_the_ranks_is_one_clear_line():
    from pluribus import dist
    from pluribus.errors import PluribusError

    with pytest.raises(PluribusError, match="sft batch_size 5 does not split evenly over 2 processes"):
        dist.World(rank=1, size=2).per_rank(5, "sft batch_size")
    assert dist.World(rank=1, size=2).shard([1, 2, 3, 4]) == [3, 4]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices (NCCL); CPU runs use gloo")
def test_two_gpus_join_with_nccl(tmp_path):
    done = _torchrun([["backend", {"out": str(tmp_path)}]], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (tmp_path / "backend.txt").read_text() == "nccl 2"


def test_cpu_processes_join_with_gloo(runs):
    assert (runs / "backend.txt").read_text() == "gloo 2"


def test_commands_that_do_not_split_refuse_torchrun_in_one_line(monkeypatch, tmp_path):
    from typer.testing import CliRunner

    from pluribus.cli import app
    from pluribus.errors import PluribusError

    monkeypatch.setenv("WORLD_SIZE", "2")
    for command in ("run", "experts"):
        done = CliRunner().invoke(app, [command, str(tmp_path / "x.yaml")])
        assert isinstance(done.exception, PluribusError), done.output
        assert str(done.exception).startswith(f"pluribus {command}") and "not under torchrun" in str(done.exception)
        assert "grm" in str(done.exception)  # the stages that do split are named
