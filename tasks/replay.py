"""Replay task: mix on-policy pairs with offline pairs at ratio gamma."""

from __future__ import annotations

from dataclasses import asdict

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.data import load_pairs
from dice_core.replay import mix
from dice_core.store import StageRef
from tasks.common import TRANSIENT_RETRIES, RunContext, markdown_table, publish, run_stage


@task(name="replay", tags=["stage:replay"], cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def replay_task(ctx: RunContext, round_: int) -> dict:
    """The round's training set: sampled on-policy pairs first, then replayed offline pairs."""
    pairs_key = f"{ctx.stage(round_, 'pairs').prefix}/pairs.jsonl"

    def body(ref: StageRef) -> dict:
        on_policy = ctx.store.read_jsonl(pairs_key)
        offline = load_pairs(ctx.recipe.data.offline_pairs) if ctx.recipe.replay.gamma else []
        rows, counts = mix(
            on_policy,
            offline,
            ctx.recipe.replay.model_copy(update={"seed": ctx.recipe.replay.seed + round_}),
        )
        ctx.store.write_jsonl(f"{ref.prefix}/train.jsonl", rows)
        summary = {"gamma": ctx.recipe.replay.gamma, "rows": len(rows), **asdict(counts)}
        publish(
            ctx, round_, "replay", f"# Training set, round {round_}\n\n" + markdown_table([summary])
        )
        return summary

    inputs = {"pairs": f"store:{pairs_key}", "offline": ctx.recipe.data.offline_pairs}
    return run_stage(ctx, round_, "replay", body, inputs)
