"""The `dice` command: run a whole job through Prefect, or one stage alone on files.

dice run recipes/cpu-smollm2.yaml            the whole job (round 0, then rounds 1..T)
dice validate recipes/zephyr-7b.yaml         check a recipe and print its launch plan
dice generate|score|pairs|replay|train|evaluate ...   one stage on files
dice runs list | dice runs show RUN_ID       what a store holds
dice bench all [--store DIR --run-id ID]     engines against plain baselines, in one run
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

# Prefect reads these at import: no telemetry, and our library logs go to Prefect's handlers.
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("DO_NOT_TRACK", "1")
os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "dice_core")
# Stage commands and benchmarks run outside any flow: their lines stay on the console.
os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from dice_core.errors import DiceError  # noqa: E402

log = logging.getLogger("dice")


def _overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs; values are read as YAML (numbers, booleans, null)."""
    import yaml

    found = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep:
            raise DiceError(
                f"--set {item!r}: expected KEY=VALUE, e.g. generation.max_new_tokens=64"
            )
        found[key.strip()] = yaml.safe_load(value)
    return found


def _recipe(args: argparse.Namespace):
    """The recipe named by --recipe (defaults when none), with --set overrides applied."""
    from dice_core.config import apply_override, load_recipe, parse_recipe
    from flows.common import recipe_path

    overrides = _overrides(getattr(args, "set", []))
    if getattr(args, "recipe", None):
        return load_recipe(recipe_path(args.recipe), overrides)
    data: dict[str, Any] = {}
    for key, value in overrides.items():
        apply_override(data, key, value)
    return parse_recipe(data, "--set")


def _write_json(path: str, value: Any) -> None:
    from dice_core.store import ArtifactStore

    file = Path(path).resolve()
    ArtifactStore(str(file.parent)).write_json(file.name, value)


def _write_jsonl(path: str, rows: list[dict[str, Any]]) -> None:
    from dice_core.store import ArtifactStore

    file = Path(path).resolve()
    ArtifactStore(str(file.parent)).write_jsonl(file.name, rows)


# ----------------------------------------------------------------- commands
def _store_block(args: argparse.Namespace) -> None:
    """--store-block NAME: the Prefect block with the store's s3fs options, for this
    process and the processes it starts."""
    if getattr(args, "store_block", None):
        from tasks.common import STORE_BLOCK_ENV

        os.environ[STORE_BLOCK_ENV] = args.store_block


@contextlib.contextmanager
def _stop_on_interrupt() -> Iterator[None]:
    """Ctrl-C (or SIGTERM) stops `dice run` at once, with everything it started.

    The run is safe to kill at any point (a stage counts only once its completion record is
    written, and a rerun with the same run id resumes), so an interrupt is a kill: Prefect
    would otherwise take the loss of its server for a network error and retry the task,
    and the training child, in a session of its own, would go on.
    """
    import signal

    def stop(signum: int, frame: Any) -> None:
        print(
            f"interrupted ({signal.Signals(signum).name}): the run stops here; rerun the same "
            "command with its --run-id to resume it",
            file=sys.stderr,
            flush=True,
        )
        for pid in _descendants(os.getpid()):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        os._exit(130)

    previous = {signum: signal.signal(signum, stop) for signum in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)


def _descendants(root: int) -> list[int]:
    """Every process below `root`, read from /proc (children before their own children)."""
    parents: dict[int, int] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(") ", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = [], [root]
    while frontier:
        children = [pid for pid, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


def cmd_run(args: argparse.Namespace) -> None:
    from flows.dice_run import dice_run, summary_table

    overrides = _overrides(args.set)
    if args.rounds is not None:
        overrides["run.rounds"] = args.rounds
    _store_block(args)
    from dice_core.config import load_recipe
    from flows.common import check_inputs, recipe_path, start_run
    from flows.prefect_api import prefect_api

    # A recipe typo, a missing model or a bad data file costs nothing: all are checked
    # before any server starts. Then the run id and the store (and the fork), before the
    # flow opens the run.
    check_inputs(load_recipe(recipe_path(args.recipe), overrides))
    with _stop_on_interrupt(), prefect_api():
        ctx = start_run(args.recipe, args.run_id, args.store, overrides, args.fork_from)
        rows = dice_run(
            recipe=args.recipe, run_id=ctx.run_id, store=ctx.store_root, overrides=overrides or None
        )
    print(summary_table(rows))


def cmd_validate(args: argparse.Namespace) -> None:
    from dice_core.training import build_launch_plan

    recipe = _recipe(args)
    plan = build_launch_plan(recipe.training)
    print(f"recipe {args.recipe}: valid (digest {recipe.digest()})")
    print(f"  models: sft={recipe.models.sft} dpo={recipe.models.dpo or '(round 0 trains it)'}")
    print(
        f"  rounds: {recipe.run.rounds} | prompts per round: {recipe.data.prompts_per_round} "
        f"| samples per prompt: {recipe.generation.samples_per_prompt}"
    )
    print(
        f"  generation: engine={recipe.generation.engine} max_new_tokens="
        f"{recipe.generation.max_new_tokens} T={recipe.generation.temperature} "
        f"top_p={recipe.generation.top_p}"
    )
    print(f"  replay: gamma={recipe.replay.gamma} | DPO beta={recipe.training.beta}")
    print("  training launch plan:")
    for key, value in plan.as_dict().items():
        print(f"    {key}: {value}")


def cmd_generate(args: argparse.Namespace) -> None:
    from dice_core.data import load_prompts
    from dice_core.generation import make_engine, sample_rows
    from dice_core.models import resolve_model

    recipe = _recipe(args)
    config = recipe.generation
    if args.samples is not None:
        config = config.model_validate({**config.model_dump(), "samples_per_prompt": args.samples})
    prompts = load_prompts(args.prompts)[: args.limit]
    model = resolve_model(args.model, Path.home() / ".cache" / "dice" / "models")
    engine = make_engine(model, config, recipe.models.dtype)
    completions = engine.complete(
        [p["prompt"] for p in prompts],
        n=config.samples_per_prompt,
        max_new_tokens=args.max_new_tokens or config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
    )
    rows = sample_rows(prompts, completions)
    _write_jsonl(args.out, rows)
    print(f"wrote {len(rows)} samples to {args.out}")


def cmd_score(args: argparse.Namespace) -> None:
    from dice_core.data import read_jsonl
    from dice_core.models import resolve_model
    from dice_core.rewards import score_samples

    recipe = _recipe(args)
    rows = read_jsonl(args.samples, {"prompt": str, "response": str})
    cache = Path.home() / ".cache" / "dice" / "models"
    policy, reference = resolve_model(args.policy, cache), resolve_model(args.reference, cache)
    scores = score_samples(str(policy), str(reference), rows, recipe.rewards, recipe.models.dtype)
    _write_jsonl(args.out, [{**r, **s} for r, s in zip(rows, scores, strict=True)])
    print(f"wrote {len(rows)} scored samples to {args.out}")


def cmd_pairs(args: argparse.Namespace) -> None:
    import math

    from dice_core.data import read_jsonl
    from dice_core.errors import DataError
    from dice_core.pairs import build_pairs

    recipe = _recipe(args)
    fields = {
        "prompt": str,
        "sample_index": int,
        "response": str,
        "finish_reason": str,
        "reward": (int, float),
    }
    rows = read_jsonl(args.rewards, fields)
    for number, row in enumerate(rows, 1):
        reward = row["reward"]
        if isinstance(reward, bool) or not math.isfinite(reward):
            raise DataError(
                f"{args.rewards}: record {number}: field `reward` must be a finite number "
                f"(got {reward!r})"
            )
        row.setdefault("prompt_id", row["prompt"])
    pairs, search, report = build_pairs(rows, recipe.pairs)
    _write_jsonl(args.out, pairs)
    if args.curve:
        _write_json(
            args.curve,
            {
                "alpha": search.alpha,
                "gap": search.gap,
                "curve": [{"alpha": a, "gap": g} for a, g in search.curve],
            },
        )
    print(
        f"wrote {len(pairs)} pairs to {args.out} | alpha: {search.alpha:.3f} | "
        f"gap: {search.gap:.1f} | filters: {json.dumps(report.as_dict())}"
    )


def cmd_replay(args: argparse.Namespace) -> None:
    from dice_core.config import parse_recipe
    from dice_core.data import load_pairs
    from dice_core.replay import mix

    config = parse_recipe({"replay": {"gamma": args.gamma, "seed": args.seed}}, "--gamma/--seed")
    config = config.replay
    on_policy = load_pairs(args.pairs)
    offline = load_pairs(args.offline) if config.gamma else []
    rows, counts = mix(on_policy, offline, config)
    _write_jsonl(args.out, rows)
    print(
        f"wrote {len(rows)} rows to {args.out} | on-policy: {counts.on_policy} | "
        f"offline: {counts.offline}"
    )


def cmd_train(args: argparse.Namespace) -> None:
    from dice_core.data import read_jsonl
    from dice_core.models import resolve_model
    from dice_core.training import train_dpo

    recipe = _recipe(args)
    model = resolve_model(args.model, Path.home() / ".cache" / "dice" / "models")
    rows = read_jsonl(args.pairs, {"prompt": str, "chosen": str, "rejected": str})
    keep = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")
    rows = [{k: r[k] for k in keep if k in r} for r in rows]
    if Path(args.out).exists():
        raise DiceError(f"{args.out} already exists; choose a new output folder")
    result = train_dpo(model, rows, recipe.training, Path(args.out))
    print(f"saved {args.out} | steps: {result.steps} | final loss: {result.final_loss:.4f}")


def cmd_evaluate(args: argparse.Namespace) -> None:
    from dice_core.data import load_model_outputs
    from dice_core.evaluation import (
        align_outputs,
        answer_instructions,
        instruction_subset,
        judge_and_score,
    )
    from dice_core.models import resolve_model

    recipe = _recipe(args)
    config = recipe.evaluation
    if args.limit:
        config = config.model_validate({**config.model_dump(), "num_instructions": args.limit})
    subset = instruction_subset(config)
    cache = Path.home() / ".cache" / "dice"
    if args.outputs:
        outputs = align_outputs(load_model_outputs(args.outputs), subset, args.outputs)
    else:
        model = resolve_model(args.model, cache / "models")
        outputs = answer_instructions(
            model,
            subset,
            config,
            recipe.generation,
            args.generator or Path(args.model).name,
            recipe.models.dtype,
        )
    sft = (
        resolve_model(recipe.models.sft, cache / "models") if config.judge.kind == "local" else None
    )
    annotations, scores = judge_and_score(outputs, subset, config, sft, cache / "judge")
    out = Path(args.out)
    _write_json(str(out / "model_outputs.json"), outputs)
    _write_json(str(out / "annotations.json"), annotations)
    _write_json(str(out / "scores.json"), scores)
    print(json.dumps(scores, indent=2))


def cmd_runs(args: argparse.Namespace) -> None:
    from dice_core.manifest import load_run, stage_states
    from flows.common import DEFAULT_STORE
    from tasks.common import markdown_table, open_store

    _store_block(args)
    store = open_store(args.store or DEFAULT_STORE)
    if args.action == "list":
        run_ids = list(store.runs())
        if not run_ids:
            print(f"no runs in {store.root_url}")
        for run_id in run_ids:
            manifest, recipe = load_run(store, run_id)
            print(
                f"{run_id}  recipe={recipe.run.name}  rounds={recipe.run.rounds}  "
                f"created={manifest['created_at']}  code={manifest['code_version']}"
                + _parent_note(manifest, "  forked-from=")
            )
        return
    if not args.run_id:
        raise DiceError("dice runs show needs a RUN_ID")
    manifest, recipe = load_run(store, args.run_id)
    print(
        f"run {args.run_id} | recipe {recipe.run.name} (digest {manifest['recipe_digest']}) | "
        f"code {manifest['code_version']} | created {manifest['created_at']}"
        + _parent_note(manifest, " | forked from ")
    )
    print(markdown_table(stage_states(store, args.run_id, recipe.run.rounds)))


def _parent_note(manifest: dict[str, Any], lead: str) -> str:
    parent = manifest.get("parent")
    return f"{lead}{parent['run_id']}:{parent['round']}" if parent else ""


def cmd_report(args: argparse.Namespace) -> None:
    from flows.common import reopen_run
    from tasks.report import build_report

    ctx = reopen_run(args.run_id, args.store)
    key = None
    for round_ in range(ctx.recipe.run.rounds + 1):
        if not ctx.store.list(f"runs/{ctx.run_id}/round-{round_}"):
            break
        key = build_report(ctx, round_)
        print(f"round {round_}: {ctx.store.root_url}/{key}")
    if key is None:
        raise DiceError(f"run {ctx.run_id} has no round yet: nothing to report")
    print(ctx.store.read_text(key))


def cmd_bench(args: argparse.Namespace) -> None:
    from flows.bench import run_bench

    run_bench(args, _recipe(args))


# ------------------------------------------------------------------- parser
def _parser() -> argparse.ArgumentParser:
    from flows.bench import PARTS as BENCH_PARTS

    parser = argparse.ArgumentParser(prog="dice", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    def command(name: str, func, help_: str, recipe: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_)
        p.set_defaults(func=func)
        if recipe:
            p.add_argument("--recipe", help="recipe name or file for stage settings")
            p.add_argument(
                "--set",
                action="append",
                default=[],
                metavar="KEY=VALUE",
                help="override a recipe value, e.g. generation.max_new_tokens=64",
            )
        return p

    p = command(
        "run", cmd_run, "run DICE end to end through Prefect (resumes a given run id)", recipe=False
    )
    p.add_argument("recipe", help="recipe name (cpu-smollm2) or YAML file")
    p.add_argument("--run-id", help="run id; reuse one to resume that run")
    p.add_argument("--store", help="store root: a folder or s3://bucket/prefix")
    p.add_argument(
        "--store-block",
        help="Prefect block with the store's s3fs options: secret/NAME (a JSON mapping) or "
        "aws-credentials/NAME (default: DICE_STORE_BLOCK, else the AWS environment alone)",
    )
    p.add_argument(
        "--fork-from",
        metavar="RUN_ID:ROUND",
        help="start this new run from a copy of RUN_ID's completed rounds before ROUND",
    )
    p.add_argument("--rounds", type=int, help="override run.rounds")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    p = command("validate", cmd_validate, "validate a recipe and print its launch plan", False)
    p.add_argument("recipe")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")

    p = command("generate", cmd_generate, "sample K responses per prompt from a model")
    p.add_argument("--model", required=True)
    p.add_argument("--prompts", required=True, help="JSONL with `prompt` per line")
    p.add_argument("--out", required=True)
    p.add_argument("--samples", type=int, help="K, samples per prompt")
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--limit", type=int, help="first N prompts only")

    p = command("score", cmd_score, "implicit rewards of samples: policy vs reference")
    p.add_argument("--policy", required=True)
    p.add_argument("--reference", required=True)
    p.add_argument("--samples", required=True, help="JSONL with `prompt` and `response`")
    p.add_argument("--out", required=True)

    p = command("pairs", cmd_pairs, "filters, alpha search and pairs from scored samples")
    p.add_argument("--rewards", required=True, help="output of `dice score`")
    p.add_argument("--out", required=True)
    p.add_argument("--curve", help="also write the alpha search curve here")

    p = command("replay", cmd_replay, "mix on-policy pairs with offline pairs", recipe=False)
    p.add_argument("--pairs", required=True)
    p.add_argument("--offline", default="builtin:ultrafeedback/train1000.jsonl")
    p.add_argument("--gamma", type=float, default=0.5)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True)

    p = command("train", cmd_train, "DPO-train a model on pairs")
    p.add_argument("--model", required=True)
    p.add_argument("--pairs", required=True)
    p.add_argument("--out", required=True, help="new folder for the trained model")

    p = command("evaluate", cmd_evaluate, "AlpacaEval 2 of a model or of an outputs file")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--model", help="model folder to answer the instructions")
    src.add_argument("--outputs", help="alpaca_eval outputs JSON to judge as is")
    p.add_argument("--generator", help="name recorded for the model")
    p.add_argument("--limit", type=int, help="first N instructions only")
    p.add_argument("--out", required=True, help="folder for outputs, annotations, scores")

    p = command("report", cmd_report, "rebuild the reports and plots of a run", recipe=False)
    p.add_argument("run_id")
    p.add_argument("--store")

    p = command("bench", cmd_bench, "measure each engine against its plain baseline, in one run")
    p.set_defaults(recipe="cpu-smollm2")
    p.add_argument("part", choices=[*BENCH_PARTS, "all"])
    p.add_argument(
        "--count",
        type=int,
        help="prompts (generation, default: enough to fill the recipe's batch) or pairs "
        "(training, default 4; dpo, default one global batch)",
    )
    p.add_argument("--steps", type=int, help="DPO steps (training, default 2; dpo, default 3)")
    p.add_argument(
        "--samples", type=int, default=24, help="scoring: UltraFeedback responses to score"
    )
    p.add_argument(
        "--max-chars",
        type=int,
        default=1500,
        help="scoring: longest pair (prompt, chosen and rejected, in characters) to take",
    )
    p.add_argument(
        "--stretch", type=int, default=2, help="scoring: response repeats of the memory check"
    )
    p.add_argument("--prompts", type=int, default=60000, help="alpha: synthetic prompts")
    p.add_argument("--k", type=int, default=16, help="alpha: samples per prompt")
    p.add_argument("--seed", type=int, default=0, help="alpha: seed of the synthetic scores")
    p.add_argument(
        "--round-seconds",
        type=float,
        help="alpha: a round's wall time for its share (default: from --run-id, else 3600)",
    )
    p.add_argument("--store", help="store root of --run-id (overhead; alpha's round time)")
    p.add_argument("--run-id", help="a finished run (overhead; alpha's round time)")

    p = command("runs", cmd_runs, "list runs or show one run's stages", recipe=False)
    p.add_argument("action", choices=["list", "show"])
    p.add_argument("run_id", nargs="?")
    p.add_argument("--store", help="store root: a folder or s3://bucket/prefix")
    p.add_argument("--store-block", help="Prefect block with the store's s3fs options")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `dice` console command."""
    args = _parser().parse_args(argv)
    # Libraries speak at WARNING; this project's own progress lines at INFO.
    logging.basicConfig(
        level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S"
    )
    for name in ("dice", "dice_core"):
        logging.getLogger(name).setLevel(logging.INFO)
    # Every request to the Prefect API would otherwise be one INFO line.
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        args.func(args)
    except DiceError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
