"""AlpacaEval 2 alone, as a Prefect flow: a checkpoint answers, or an outputs file is judged.

prefect deployment run dice-evaluate/dice-evaluate -p model=/models/my-checkpoint
python -m flows.dice_evaluate --outputs outputs.json
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.artifacts import create_markdown_artifact
from prefect.cache_policies import NO_CACHE

from dice_core.config import load_recipe
from dice_core.data import load_model_outputs
from dice_core.errors import DataError
from dice_core.evaluation import (
    align_outputs,
    answer_instructions,
    instruction_subset,
    judge_and_score,
)
from dice_core.models import resolve_model
from dice_core.store import ArtifactStore, check_run_id
from flows.common import DEFAULT_STORE, RecipeChoice, recipe_path
from tasks.common import CACHE_DIR, TRANSIENT_RETRIES, logger, markdown_table


@task(
    name="evaluate",
    tags=["gpu", "stage:evaluation"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def evaluate_task(
    recipe: str, model: str | None, outputs: str | None, name: str, store: str
) -> dict[str, Any]:
    """Answer (or read) the outputs, judge them, score them, and store all three files."""
    config = load_recipe(recipe_path(recipe))
    subset = instruction_subset(config.evaluation)
    if outputs:
        answers = align_outputs(load_model_outputs(outputs), subset, outputs)
    else:
        model_dir = resolve_model(model, CACHE_DIR / "models")
        answers = answer_instructions(
            model_dir, subset, config.evaluation, config.generation, name, config.models.dtype
        )
    sft = None
    if config.evaluation.judge.kind == "local":
        sft = resolve_model(config.models.sft, CACHE_DIR / "models")
    annotations, scores = judge_and_score(
        answers, subset, config.evaluation, sft, CACHE_DIR / "judge"
    )
    artifacts = ArtifactStore(store)
    prefix = f"evaluations/{name}"
    artifacts.write_json(f"{prefix}/model_outputs.json", answers)
    artifacts.write_json(f"{prefix}/annotations.json", annotations)
    artifacts.write_json(f"{prefix}/scores.json", scores)
    logger().info(
        "evaluate %s | WR: %.2f | LC: %.2f | stored at %s/%s",
        name,
        scores["win_rate"],
        scores["length_controlled_winrate"],
        store,
        prefix,
    )
    create_markdown_artifact(
        f"# AlpacaEval 2 of {name}\n\n" + markdown_table([scores]),
        key=f"evaluate-{name}".lower().replace("_", "-").replace(".", "-"),
    )
    return scores


@flow(name="dice-evaluate", flow_run_name="evaluate {name}")
def dice_evaluate(
    model: str | None = None,
    outputs: str | None = None,
    recipe: RecipeChoice = "cpu-smollm2",
    name: str = "model",
    store: str | None = None,
) -> dict[str, Any]:
    """AlpacaEval 2 of a checkpoint (`model`) or of an outputs file (`outputs`).

    Args:
        model: A model folder (or hub id) that answers the instructions.
        outputs: An alpaca_eval outputs JSON to judge as it is.
        recipe: Recipe whose evaluation settings (instructions, judge) apply: a name from
            recipes/ or the path of a recipe file.
        name: Name of this evaluation; results go to `evaluations/<name>` in the store.
        store: Store root (default: DICE_STORE or ./dice-store).

    Returns:
        The scores: win_rate, length_controlled_winrate, n_total, avg_length, judge.
    """
    if (model is None) == (outputs is None):
        raise DataError("give exactly one of `model` or `outputs`")
    check_run_id(name)
    return evaluate_task(recipe, model, outputs, name, store or DEFAULT_STORE)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model")
    parser.add_argument("--outputs")
    parser.add_argument("--recipe", default="cpu-smollm2")
    parser.add_argument("--name", default=Path(sys.argv[0]).stem)
    parser.add_argument("--store")
    args = parser.parse_args()
    print(dice_evaluate(args.model, args.outputs, args.recipe, args.name, args.store))
