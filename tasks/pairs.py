"""Pairs task: filters, the alpha search, one chosen/rejected pair per prompt."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.pairs import build_pairs
from dice_core.store import StageRef
from tasks.common import TRANSIENT_RETRIES, RunContext, logger, markdown_table, publish, run_stage


@task(name="pairs", tags=["stage:pairs"], cache_policy=NO_CACHE, **TRANSIENT_RETRIES)
def pairs_task(ctx: RunContext, round_: int) -> dict:
    """Length-regularised pairs from the scored samples; saves the alpha curve."""
    rewards_key = f"{ctx.stage(round_, 'rewards').prefix}/rewards.jsonl"

    def body(ref: StageRef) -> dict:
        rows = ctx.store.read_jsonl(rewards_key)
        pairs, search, report = build_pairs(rows, ctx.recipe.pairs)
        ctx.store.write_jsonl(f"{ref.prefix}/pairs.jsonl", pairs)
        curve = [{"alpha": a, "gap": g} for a, g in search.curve]
        ctx.store.write_json(
            f"{ref.prefix}/alpha_curve.json",
            {"alpha": search.alpha, "gap": search.gap, "curve": curve},
        )
        summary = {
            "pairs": len(pairs),
            "identical_pairs": sum(p["identical"] for p in pairs),
            "alpha": search.alpha,
            "gap": search.gap,
            "alphas_scanned": len(search.curve),
            "filters": report.as_dict(),
        }
        logger().info(
            "pairs round %d | pairs: %d | alpha: %.3f | gap: %.1f",
            round_,
            len(pairs),
            search.alpha,
            search.gap,
        )
        publish(ctx, round_, "pairs", _markdown(round_, summary, pairs), _examples(pairs))
        return summary

    return run_stage(ctx, round_, "pairs", body, {"rewards": f"store:{rewards_key}"})


def _examples(pairs: list[dict], count: int = 5) -> list[dict]:
    return [
        {
            "prompt": p["prompt"][:100],
            "chosen": p["chosen"][:200],
            "chosen_reward": p["chosen_reward"],
            "chosen_chars": p["chosen_chars"],
            "rejected": p["rejected"][:200],
            "rejected_reward": p["rejected_reward"],
            "rejected_chars": p["rejected_chars"],
        }
        for p in pairs[:count]
    ]


def _markdown(round_: int, summary: dict, pairs: list[dict]) -> str:
    filters = [{"filter": k, "count": v} for k, v in summary["filters"].items()]
    head = {k: v for k, v in summary.items() if k != "filters"}
    return (
        f"# Pairs, round {round_}\n\n"
        + markdown_table([head])
        + "\n## Filters, in order\n\n"
        + markdown_table(filters)
        + "\n## Examples\n\n"
        + markdown_table(_examples(pairs))
    )
