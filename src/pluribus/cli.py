"""The `pluribus` command. User mistakes end with one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from pluribus.errors import ConfigError, PluribusError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="DeepSeek-V4 post-training: specialists, generative reward, multi-teacher OPD.")
world_app = typer.Typer(no_args_is_help=True, help="The embedded world's domains.")
app.add_typer(world_app, name="world")
data_app = typer.Typer(no_args_is_help=True, help="Users' data: public formats to the data contract.")
app.add_typer(data_app, name="data")
console = Console()


@world_app.command("list")
def world_list() -> None:
    """List the built-in domains."""
    from rich.table import Table

    from pluribus.world import DOMAINS, generate

    table = Table(title=f"{len(DOMAINS)} domains")
    for col in ("domain", "reward", "description", "example"):
        table.add_column(col)
    for d in DOMAINS.values():
        ex = generate(d.name, "train", 1)[0]
        table.add_row(d.name, "rubric (GRM)" if d.rubric_domain else "checker", d.description,
                      f"{ex.prompt} → {ex.answer}")
    console.print(table)


@world_app.command("export")
def world_export(domain: str = typer.Option(..., help="domain name (see `pluribus world list`)"),
                 split: str = typer.Option("train", help="train or test"),
                 n: int = typer.Option(100, min=1, help="number of records"),
                 seed: int = typer.Option(0),
                 out: Path = typer.Option(..., help="output JSONL path")) -> None:
    """Write records in the data contract (JSONL): id, domain, prompt, answer, tests, rubric, meta."""
    from pluribus.data import write_jsonl
    from pluribus.world import generate

    write_jsonl(generate(domain, split, n, seed), out)
    console.print(f"wrote {n} {domain}/{split} records to {out}")


@data_app.command("convert")
def data_convert(in_path: Path = typer.Argument(..., help="a JSONL file in FORMAT"),
                 out_path: Path = typer.Argument(..., help="where to write the records in the data contract"),
                 fmt: str = typer.Option(..., "--format", help="gsm8k, mbpp, humaneval, ifeval or pluribus"),
                 domain: Optional[str] = typer.Option(None, help="the records' domain (default: the format's name)")
                 ) -> None:
    """Convert GSM8K, MBPP, HumanEval or IFEval JSONL to the data contract (id, domain, prompt, answer, tests, meta)."""
    from pluribus.formats import convert

    n = convert(fmt, in_path, out_path, domain)
    console.print(f"wrote {n} records to {out_path}")


@app.command()
def pretrain(config: Path = typer.Argument(..., help="YAML with the pretrain fields")) -> None:
    """Train the tiny preset from scratch on world text (the weak base)."""
    from pluribus.config import PretrainConfig, load_yaml
    from pluribus.stages import pretrain as stage

    console.print(f"base model saved to {stage.run(load_yaml(config, PretrainConfig))}")


@app.command()
def sft(config: Path = typer.Argument(..., help="YAML with the sft fields")) -> None:
    """Supervised fine-tuning (full weights or LoRA)."""
    from pluribus.config import SFTConfig, load_yaml
    from pluribus.stages import sft as stage

    console.print(f"model saved to {stage.run(load_yaml(config, SFTConfig))}")


@app.command()
def grpo(config: Path = typer.Argument(..., help="YAML with the grpo fields")) -> None:
    """GRPO with the DeepSeek-V3.2 recipe on world domains or your JSONL."""
    from pluribus.config import GRPOConfig, load_yaml
    from pluribus.stages import grpo as stage

    console.print(f"model saved to {stage.run(load_yaml(config, GRPOConfig))}")


@app.command()
def grm(config: Path = typer.Argument(..., help="YAML with the grm fields")) -> None:
    """Joint RL of generating and judging: the actor judges its own rubric-domain rollouts, and learns to judge."""
    from pluribus.config import GRMConfig, load_yaml
    from pluribus.stages import grm as stage

    console.print(f"model saved to {stage.run(load_yaml(config, GRMConfig))}")


@app.command()
def experts(config: Path = typer.Argument(..., help="YAML with the experts fields")) -> None:
    """One specialist per domain: SFT on its demonstrations, then GRPO; prints the report table."""
    from pluribus import dist
    from pluribus.config import ExpertsConfig, load_yaml
    from pluribus.stages import experts as stage

    dist.one_process_only("pluribus experts")
    cfg = load_yaml(config, ExpertsConfig)
    stage.run(cfg)
    console.print(stage.report_table(stage.report(cfg)))


@app.command()
def opd(config: Path = typer.Argument(..., help="YAML with the opd fields")) -> None:
    """Multi-teacher on-policy distillation: merge the experts into one student."""
    from pluribus.config import OPDConfig, load_yaml
    from pluribus.stages import opd as stage

    console.print(f"student saved to {stage.run(load_yaml(config, OPDConfig))}")


@app.command()
def merge(config: Path = typer.Argument(..., help="YAML with the merge fields")) -> None:
    """Weight-merging baseline: the experts' task vectors merged into their base (linear, task arithmetic, TIES)."""
    from pluribus.config import MergeConfig, load_yaml
    from pluribus.stages import merge as stage

    console.print(f"merged model saved to {stage.run(load_yaml(config, MergeConfig))}")


@app.command()
def offpolicy(config: Path = typer.Argument(..., help="YAML with the offpolicy fields")) -> None:
    """Off-policy distillation baseline: multi-task SFT of the student on the experts' sampled answers."""
    from pluribus.config import OffPolicyConfig, load_yaml
    from pluribus.stages import offpolicy as stage

    console.print(f"student saved to {stage.run(load_yaml(config, OffPolicyConfig))}")


@app.command("eval")
def eval_(model: Path = typer.Option(..., help="HF model folder"),
          domains: Optional[list[str]] = typer.Option(None, "--domains", help="domains (repeat or comma-separate)"),
          n: int = typer.Option(200, min=1, help="test prompts per domain"),
          samples: int = typer.Option(8, min=0, help="sampled responses per prompt (0: greedy only)"),
          temperature: float = typer.Option(1.0, help="sampling temperature (> 0)"),
          seed: int = typer.Option(0),
          as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Per-domain greedy pass@1, mean sampled reward, pass@k and trivial floor."""
    from pluribus.config import EvalConfig, validate
    from pluribus.stages import evaluate

    names = [d for item in domains or [] for d in item.split(",") if d]
    cfg = validate(EvalConfig, {"model": str(model), "domains": names, "n": n, "samples": samples, "seed": seed,
                                 "temperature": temperature},
                   "eval")
    from pluribus.world import domain as check_domain

    for d in names:
        check_domain(d)
    scores = evaluate.run(cfg)
    if as_json:
        print(json.dumps(evaluate.as_json(scores), indent=2))
    else:
        console.print(evaluate.table(scores, title=f"{model}"))


@app.command()
def run(config: Path = typer.Argument(..., help="pipeline YAML, e.g. examples/quickstart.yaml"),
        smoke: bool = typer.Option(False, "--smoke", help="few steps on 3 domains: seconds, not minutes")) -> None:
    """Run the whole recipe, stage by stage, resuming where a previous run stopped (a config with `datasets`:
    the recipe on a real model and your data, pluribus.real)."""
    from pluribus import dist
    from pluribus.real import is_real_recipe, run_real

    dist.one_process_only("pluribus run (the pipeline)")  # its stages share folders: one stage at a time instead
    if is_real_recipe(config):
        console.print(f"run written to {run_real(config, smoke=smoke)}")
        return
    from pluribus.pipeline import run_pipeline

    run_pipeline(config, smoke=smoke)


@app.command()
def report(run_dir: Path = typer.Argument(..., help="a run folder, e.g. runs/quickstart")) -> None:
    """Write RUN_DIR/report.md and its figures in RUN_DIR/report/: headline, experts, training curves."""
    from pluribus.report import write_report

    console.print(f"report written to {write_report(run_dir)}")


@app.command()
def bench(json_path: Optional[Path] = typer.Option(None, "--json", help="also write the results here as JSON"),
          smoke: bool = typer.Option(False, "--smoke", help="a toy model, 1-2 steps, in this process: seconds"),
          no_trl: bool = typer.Option(False, "--no-trl", help="leave TRL out even when it is installed"),
          rounds: Optional[int] = typer.Option(None, min=1, help="processes per side (default 3)"),
          steps: Optional[int] = typer.Option(None, min=1, help="timed steps per process (default 5)")) -> None:
    """pluribus side by side with TRL on one tiny model: GRPO and OPD steps, rollout tokens/s, OPD with 1/4/12
    teachers, chunked KL memory (docs/performance.md)."""
    import dataclasses

    from rich.markup import escape
    from rich.table import Table

    from pluribus.bench import SMOKE, BenchSettings, run as run_bench, table_rows

    settings = SMOKE if smoke else BenchSettings()
    settings = dataclasses.replace(settings, **{k: v for k, v in (("rounds", rounds), ("steps", steps)) if v})
    results = run_bench(settings, with_trl=False if no_trl else None, in_process=smoke,
                        echo=lambda line: console.print(f"[dim]{line}[/dim]"))
    m = results["machine"]
    table = Table(title=f"medians; {m['cpu']}, {m['cores']} cores, {m['torch_threads']} torch thread(s)")
    for col in ("measure", "pluribus", "reference", "ratio", "ratio, CPU time", "target"):
        table.add_column(col)
    for row in table_rows(results):
        table.add_row(*row)
    console.print(table)
    for note in results["notes"]:
        console.print(f"note: {escape(note)}")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        json_path.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"results written to {json_path}")


def main() -> None:
    from pluribus.parallel import keep_freed_memory

    keep_freed_memory()
    console.quiet = int(os.environ.get("RANK", "0")) > 0  # under torchrun, rank 0 says what was done
    try:
        app()
    except SystemExit as done:  # typer ends every command so
        if not done.code and "pluribus.dist" in sys.modules:  # a stage may have run under torchrun
            from pluribus import dist

            if dist.finish():  # every rank done, the group left: end the worker without exit-time teardown
                dist.exit_process(0)
        raise
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except PluribusError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    main()
