"""Evaluation task: AlpacaEval 2 answers, judgements and WR / LC for one round's model."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.evaluation import answer_instructions, instruction_subset, judge_and_score
from dice_core.store import StageRef
from tasks.common import (
    TRANSIENT_RETRIES,
    Progress,
    RunContext,
    logger,
    markdown_table,
    publish,
    run_stage,
)


@task(
    name="evaluation",
    tags=["gpu", "stage:evaluation"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def evaluation_task(ctx: RunContext, round_: int, model: str, sft: str) -> dict:
    """Answer the AlpacaEval instructions with the round's model, judge, and score."""
    config = ctx.recipe.evaluation

    def body(ref: StageRef) -> dict:
        subset = instruction_subset(config)
        generator = f"{ctx.run_id}-round-{round_}"
        outputs = answer_instructions(
            ctx.model_dir(model),
            subset,
            config,
            ctx.recipe.generation,
            generator,
            ctx.recipe.models.dtype,
            progress=Progress("evaluation/answers", round_),
        )
        ctx.store.write_json(f"{ref.prefix}/model_outputs.json", outputs)
        annotations, result = judge_and_score(
            outputs, subset, config, ctx.model_dir(sft), ctx.cache_dir / "judge"
        )
        ctx.store.write_json(f"{ref.prefix}/annotations.json", annotations)
        ctx.store.write_json(f"{ref.prefix}/scores.json", result)
        logger().info(
            "evaluation round %d | instructions: %d | WR: %.2f | LC: %.2f | judge: %s",
            round_,
            result["n_total"],
            result["win_rate"],
            result["length_controlled_winrate"],
            result["judge"],
        )
        publish(ctx, round_, "evaluation", _markdown(round_, result))
        return result

    return run_stage(ctx, round_, "evaluation", body, {"model": model, "judge_model": sft})


def _markdown(round_: int, result: dict) -> str:
    note = (
        ""
        if result["comparable_to_leaderboard"]
        else (
            "\n**Not comparable to the AlpacaEval 2 leaderboard**: judged by "
            f"`{result['judge']}` on {result['n_total']} of 805 instructions.\n"
        )
    )
    return f"# AlpacaEval 2, round {round_}\n\n" + markdown_table([result]) + note
