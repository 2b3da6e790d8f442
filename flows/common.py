"""Shared by the flows: recipes by name, run contexts, and which models a round uses."""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field

from dice_core.config import Recipe, load_recipe
from dice_core.errors import RecipeError
from dice_core.manifest import (
    completed_stage_records,
    fork_run,
    load_run,
    open_run,
    parse_fork,
    round_overhead,
    round_record_key,
)
from dice_core.models import GGUF_PACKAGE, gguf_path, resolve_model
from dice_core.store import check_run_id
from tasks.common import CACHE_DIR, RunContext, code_version, logger, open_store

PROJECT_ROOT = Path(__file__).resolve().parent.parent
RECIPES_DIR = PROJECT_ROOT / "recipes"
DEFAULT_STORE = os.environ.get("DICE_STORE", "./dice-store")

# The recipes in recipes/. A flow's `recipe` is one of them by name (a list in the run form of
# a deployment) or the path of any recipe file (a text field).
RecipeName = Literal["cpu-smollm2", "tiny", "zephyr-7b", "llama3-8b"]
RecipeChoice = (
    Annotated[RecipeName, Field(title="shipped recipe")]
    | Annotated[str, Field(title="recipe file")]
)


def recipe_path(recipe: str) -> Path:
    """A recipe file from a path or a name in `recipes/` (`cpu-smollm2`)."""
    path = Path(recipe).expanduser()
    if path.is_file():
        return path
    named = RECIPES_DIR / (recipe if recipe.endswith(".yaml") else f"{recipe}.yaml")
    if named.is_file():
        return named
    known = ", ".join(sorted(p.stem for p in RECIPES_DIR.glob("*.yaml")))
    raise RecipeError(f"{recipe}: no such recipe file or recipe name (known names: {known})")


def start_run(
    recipe: str,
    run_id: str | None,
    store: str | None,
    overrides: dict | None = None,
    fork_from: str | None = None,
) -> RunContext:
    """Validate the recipe and the store, then create or reopen the run's manifest; with
    `fork_from` (`RUN_ID:ROUND`), first copy that run's completed rounds below ROUND."""
    config = load_recipe(recipe_path(recipe), overrides)
    check_inputs(config)
    run_id = check_run_id(default_run_id(config) if run_id is None else run_id)
    artifact_store = open_store(store or DEFAULT_STORE)
    artifact_store.check_writable()
    if fork_from:
        parent, before = parse_fork(fork_from)
        manifest = fork_run(artifact_store, parent, before, run_id, config, code_version())
        copied = manifest.get("parent", {}).get("stages", {})
        changed = manifest.get("parent", {}).get("changed", [])
        logger().info(
            "run %s | forked from %s before round %d | stages copied: %d | recipe changes: %s",
            run_id,
            parent,
            before,
            len(copied),
            ", ".join(changed) or "none",
        )
    else:
        open_run(artifact_store, run_id, config, code_version())
    return RunContext(run_id=run_id, store_root=artifact_store.root_url, recipe=config)


def check_inputs(config: Recipe) -> None:
    """Fail before any work on what a run would otherwise meet late: a model path that does
    not exist, a bad line in a prompts or pairs file, too few prompts for the rounds, a
    training batch that contradicts itself."""
    from dice_core.data import draw_round_prompts, load_pairs, load_prompts
    from dice_core.training import build_launch_plan

    check_models(config)
    data = config.data
    pool = load_prompts(data.prompts)
    if config.run.rounds >= 1:
        draw_round_prompts(
            pool,
            config.run.rounds,
            data.prompts_per_round,
            data.seed,
            data.fresh_prompts_each_round,
        )
    load_pairs(data.offline_pairs)
    load_pairs(data.heldout_pairs)
    build_launch_plan(config.training)
    build_launch_plan(config.round0.training)


def check_models(config: Recipe) -> None:
    """Fail early on a model path that does not exist (the GGUF default is checked too)."""
    cache = CACHE_DIR / "models"
    if config.models.sft == GGUF_PACKAGE:
        gguf_path()
    else:
        resolve_model(config.models.sft, cache)
    if config.models.dpo:
        resolve_model(config.models.dpo, cache)


def reopen_run(run_id: str, store: str | None) -> RunContext:
    """The context of an existing run, its recipe read back from the manifest."""
    artifact_store = open_store(store or DEFAULT_STORE)
    _, config = load_run(artifact_store, check_run_id(run_id))
    return RunContext(run_id=run_id, store_root=artifact_store.root_url, recipe=config)


def default_run_id(config: Recipe) -> str:
    return f"{config.run.name}-{datetime.now(UTC).strftime('%Y%m%d-%H%M%S')}"


def next_round(ctx: RunContext) -> int:
    """The first round t >= 1 whose training (or evaluation, when enabled) is not complete."""
    last = "evaluation" if ctx.recipe.evaluation.enabled else "training"
    round_ = 1
    while ctx.store.is_complete(ctx.stage(round_, last)):
        round_ += 1
    return round_


def name_flow_run(name: str) -> None:
    """Rename the flow run this code runs in (to a run id or round chosen inside the flow);
    outside a flow run, or when the API cannot be reached, the old name stays."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    if not flow_run.id or flow_run.name == name:
        return
    try:
        with get_client(sync_client=True) as client:
            client.update_flow_run(flow_run.id, name=name)
    except Exception as error:  # a cosmetic step: never fail a run over it
        logger().warning("flow run %s keeps its name (%s)", flow_run.name, error)


def policy_model(ctx: RunContext, round_: int) -> str:
    """pi_t: the model trained in round t (round 0: the given DPO model, or round 0's)."""
    if round_ == 0 and ctx.recipe.models.dpo:
        return ctx.recipe.models.dpo
    return f"store:{ctx.stage(round_, 'training').prefix}/model"


def reference_model(ctx: RunContext, round_: int, sft: str) -> str:
    """ref_{t-1} for round t: the SFT model in round 1, pi_{t-2} afterwards."""
    return sft if round_ == 1 else policy_model(ctx, round_ - 2)


def round_clock() -> tuple[datetime, float]:
    """The start of a round's flow, for `write_round_record`: UTC time and a monotonic reading."""
    return datetime.now(UTC), time.monotonic()


def write_round_record(ctx: RunContext, round_: int, started: tuple[datetime, float]) -> None:
    """Record the wall time of a round's flow, from `round_clock` to now, in the store.

    A flow that found every stage of the round complete (a resumed run passing through)
    keeps the record of the flow that ran them.
    """
    from prefect.runtime import flow_run

    started_at, start = started
    record = {
        "run_id": ctx.run_id,
        "round": round_,
        "flow_run_id": str(flow_run.id) if flow_run.id else None,
        "started_at": started_at.isoformat(timespec="milliseconds"),
        "finished_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        "seconds": round(time.monotonic() - start, 3),
    }
    store, key = ctx.store, round_record_key(ctx.run_id, round_)
    if store.exists(key):
        stages = completed_stage_records(store, ctx.run_id, round_)
        if not round_overhead(record, stages)["stages_run"]:
            return
    store.write_json(key, record)
