"""A whole DICE run as a Prefect flow: round 0 (pi_0 and its evaluation), then rounds 1..T.

dice run recipes/cpu-smollm2.yaml
prefect deployment run dice-run/dice-run -p recipe=cpu-smollm2
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run

from flows.common import (
    RecipeChoice,
    name_flow_run,
    policy_model,
    round_clock,
    start_run,
    write_round_record,
)
from flows.dice_round import dice_round
from tasks.common import RunContext, artifact_key, logger, markdown_table
from tasks.evaluation import evaluation_task
from tasks.models import heldout_accuracy_task, prepare_sft_task
from tasks.report import report_task
from tasks.training import round0_training_task


def run_round_zero(ctx: RunContext, sft: str) -> dict[str, Any]:
    """pi_0 from the SFT model (unless the recipe names one), its held-out implicit-reward
    accuracy, and its AlpacaEval scores."""
    row: dict[str, Any] = {"round": 0}
    if not ctx.recipe.models.dpo:
        summary = round0_training_task(ctx, sft)["summary"]
        row.update(pairs=summary["pairs"], dpo_loss=summary["final_loss"])
    pi0 = policy_model(ctx, 0)
    accuracy = heldout_accuracy_task(ctx, pi0, sft)["summary"]
    row["heldout_accuracy"] = accuracy["accuracy"]
    if ctx.recipe.evaluation.enabled:
        scores = evaluation_task(ctx, 0, pi0, sft)["summary"]
        row.update(wr=scores["win_rate"], lc=scores["length_controlled_winrate"])
    report_task(ctx, 0)
    return row


def summary_table(rows: list[dict[str, Any]]) -> str:
    """The run's closing table: round, pairs, alpha, DPO loss, WR, LC."""
    header = f"{'round':>5} | {'pairs':>5} | {'alpha':>6} | {'DPO loss':>8} | {'WR':>6} | {'LC':>6}"
    lines = [header, "-" * len(header)]
    for row in rows:
        lines.append(
            f"{row['round']:>5} | {_fmt(row.get('pairs'), 'd'):>5} | "
            f"{_fmt(row.get('alpha'), '.3f'):>6} | {_fmt(row.get('dpo_loss'), '.4f'):>8} | "
            f"{_fmt(row.get('wr'), '.2f'):>6} | {_fmt(row.get('lc'), '.2f'):>6}"
        )
    return "\n".join(lines)


def _fmt(value: Any, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def _run_name() -> str:
    """The flow run's first name: the run id, or the recipe until the flow picks one."""
    parameters = flow_run.parameters
    recipe = Path(str(parameters.get("recipe", "dice"))).stem
    return parameters.get("run_id") or f"new {recipe} run"


@flow(name="dice-run", flow_run_name=_run_name)
def dice_run(
    recipe: RecipeChoice = "cpu-smollm2",
    run_id: str | None = None,
    store: str | None = None,
    rounds: int | None = None,
    overrides: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Run DICE end to end, or resume a run: finished stages are skipped.

    Args:
        recipe: A recipe shipped in recipes/, by name, or the path of a recipe file.
        run_id: The run id; reuse one to resume it (default: recipe name and UTC time).
        store: Artifact store root, a folder or s3://bucket/prefix (default: ./dice-store).
        rounds: Override the recipe's number of DICE rounds.
        overrides: Recipe values to override, by dotted key (`generation.max_new_tokens`).

    Returns:
        One summary row per round, round 0 first.
    """
    overrides = dict(overrides or {})
    if rounds is not None:
        overrides["run.rounds"] = rounds
    ctx = start_run(recipe, run_id, store, overrides)
    name_flow_run(ctx.run_id)
    log = logger()
    log.info(
        "run %s | recipe: %s | store: %s | rounds: %d",
        ctx.run_id,
        ctx.recipe.run.name,
        ctx.store_root,
        ctx.recipe.run.rounds,
    )
    sft = prepare_sft_task(ctx)
    started = round_clock()
    rows = [run_round_zero(ctx, sft)]
    write_round_record(ctx, 0, started)
    for round_ in range(1, ctx.recipe.run.rounds + 1):
        rows.append(dice_round(ctx.run_id, round_, ctx.store_root))
    ctx.store.write_json(f"runs/{ctx.run_id}/summary.json", rows)
    create_markdown_artifact(
        f"# DICE run {ctx.run_id}\n\n" + markdown_table(rows),
        key=artifact_key(ctx, ctx.recipe.run.rounds, "summary"),
        description="per-round summary",
    )
    # The table is the run's summary artifact; `dice run` prints it once, at the end.
    log.info("run %s | done | summary: runs/%s/summary.json", ctx.run_id, ctx.run_id)
    return rows
