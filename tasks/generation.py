"""Generation task: K samples per prompt from the round's policy."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.data import draw_round_prompts, load_prompts
from dice_core.generation import make_engine, sample_rows
from dice_core.models import load_tokenizer
from dice_core.store import StageRef
from dice_core.tokens import render_prompt
from tasks.common import (
    TRANSIENT_RETRIES,
    Progress,
    RunContext,
    logger,
    markdown_table,
    publish,
    run_stage,
)


def round_prompts(ctx: RunContext, round_: int, policy_dir) -> list[dict[str, str]]:
    """This round's prompts: the pool, cut to the token limit, then the round's slice."""
    data = ctx.recipe.data
    pool = load_prompts(data.prompts)
    if data.max_prompt_tokens:
        tokenizer = load_tokenizer(policy_dir)
        pool = [
            p
            for p in pool
            if len(tokenizer(render_prompt(tokenizer, p["prompt"]))["input_ids"])
            <= data.max_prompt_tokens
        ]
    return draw_round_prompts(
        pool, round_, data.prompts_per_round, data.seed, data.fresh_prompts_each_round
    )


@task(
    name="generation",
    tags=["gpu", "stage:generation"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def generation_task(ctx: RunContext, round_: int, policy: str) -> dict:
    """Sample K responses per prompt from pi_{t-1}; keeps finish reasons and token counts."""
    config = ctx.recipe.generation

    def body(ref: StageRef) -> dict:
        policy_dir = ctx.model_dir(policy)
        prompts = round_prompts(ctx, round_, policy_dir)
        engine = make_engine(policy_dir, config, ctx.recipe.models.dtype)
        total = len(prompts) * config.samples_per_prompt
        progress = Progress("generation", round_, unit="samples")
        completions = engine.complete(
            [p["prompt"] for p in prompts],
            n=config.samples_per_prompt,
            max_new_tokens=config.max_new_tokens,
            temperature=config.temperature,
            top_p=config.top_p,
            seed=config.seed + round_,
            progress=lambda d, t: progress(d, t),
        )
        rows = sample_rows(prompts, completions)
        ctx.store.write_jsonl(f"{ref.prefix}/prompts.jsonl", prompts)
        ctx.store.write_jsonl(f"{ref.prefix}/samples.jsonl", rows)
        summary = _summary(rows, len(prompts), engine.name)
        logger().info(
            "generation round %d | samples: %d | stopped at length: %d",
            round_,
            total,
            summary["finished_by_length"],
        )
        publish(ctx, round_, "generation", _markdown(round_, summary, rows))
        return summary

    return run_stage(ctx, round_, "generation", body, {"policy": policy})


def _summary(rows: list[dict], n_prompts: int, engine: str) -> dict:
    tokens = [r["num_tokens"] for r in rows]
    return {
        "engine": engine,
        "prompts": n_prompts,
        "samples": len(rows),
        "finished_by_length": sum(r["finish_reason"] == "length" for r in rows),
        "tokens": sum(tokens),
        "mean_tokens": sum(tokens) / max(len(tokens), 1),
        "mean_chars": sum(len(r["response"]) for r in rows) / max(len(rows), 1),
    }


def _markdown(round_: int, summary: dict, rows: list[dict]) -> str:
    examples = [
        {
            "prompt": r["prompt"][:80],
            "sample": r["sample_index"],
            "finish": r["finish_reason"],
            "tokens": r["num_tokens"],
            "response": r["response"][:100],
        }
        for r in rows[:5]
    ]
    return (
        f"# Generation, round {round_}\n\n"
        + markdown_table([summary])
        + "\n## First samples\n\n"
        + markdown_table(examples)
    )
