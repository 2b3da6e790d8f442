"""Scoring task: the implicit reward of every sample under pi_{t-1} and ref_{t-1}."""

from __future__ import annotations

import statistics

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.rewards import score_samples
from dice_core.store import StageRef
from tasks.common import TRANSIENT_RETRIES, Progress, RunContext, markdown_table, publish, run_stage


@task(
    name="rewards",
    tags=["gpu", "stage:rewards"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def rewards_task(ctx: RunContext, round_: int, policy: str, reference: str) -> dict:
    """r(x, y) = log pi(y|x) - log ref(y|x), fp32 sums over response tokens with EOS."""
    samples_key = f"{ctx.stage(round_, 'generation').prefix}/samples.jsonl"

    def body(ref: StageRef) -> dict:
        rows = ctx.store.read_jsonl(samples_key)
        bars = {
            role: Progress(f"rewards/{role}", round_, unit="samples")
            for role in ("policy", "reference")
        }
        scores = score_samples(
            str(ctx.model_dir(policy)),
            str(ctx.model_dir(reference)),
            rows,
            ctx.recipe.rewards,
            ctx.recipe.models.dtype,
            progress=lambda role, d, t: bars[role](d, t),
        )
        scored = [{**row, **score} for row, score in zip(rows, scores, strict=True)]
        ctx.store.write_jsonl(f"{ref.prefix}/rewards.jsonl", scored)
        summary = _summary(scored)
        publish(
            ctx,
            round_,
            "rewards",
            f"# Implicit rewards, round {round_}\n\n" + markdown_table([summary]),
        )
        return summary

    inputs = {"samples": f"store:{samples_key}", "policy": policy, "reference": reference}
    return run_stage(ctx, round_, "rewards", body, inputs)


def _summary(rows: list[dict]) -> dict:
    rewards = [r["reward"] for r in rows]
    return {
        "samples": len(rows),
        "reward_mean": statistics.fmean(rewards),
        "reward_std": statistics.pstdev(rewards),
        "reward_min": min(rewards),
        "reward_max": max(rewards),
        "response_tokens": sum(r["response_tokens"] for r in rows),
    }
