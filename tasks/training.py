"""Training task: DPO of the round's policy against itself as reference."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.config import TrainingConfig
from dice_core.data import load_pairs, sample_pairs
from dice_core.store import StageRef
from dice_core.training import train_dpo
from tasks.common import TRANSIENT_RETRIES, Progress, RunContext, markdown_table, publish, run_stage

TRAIN_FIELDS = ("prompt", "chosen", "rejected", "ref_chosen_logps", "ref_rejected_logps")


def train_into_store(
    ctx: RunContext,
    ref: StageRef,
    round_: int,
    policy: str,
    rows: list[dict],
    config: TrainingConfig,
) -> dict:
    """Train, save the model under `<stage>/model` in the store, and return the summary."""
    progress = Progress("training", round_, unit="steps", every=0.0)
    total = config.max_steps

    def report(metrics: dict) -> None:
        progress(
            int(metrics["step"]),
            total,
            loss=metrics["loss"],
            margin=metrics.get("rewards/margins", float("nan")),
        )

    rows = [{k: r[k] for k in TRAIN_FIELDS if k in r} for r in rows]
    local = ctx.store.is_local
    out = (
        Path(ctx.store.path(f"{ref.prefix}/model"))
        if local
        else Path(tempfile.mkdtemp(prefix="dice-train-")) / "model"
    )
    try:
        policy_dir = ctx.model_dir(policy)
        result = train_dpo(policy_dir, rows, config, out, reference_dir=policy_dir, progress=report)
        if not local:
            ctx.store.put_dir(out, f"{ref.prefix}/model")
    finally:
        if not local:
            shutil.rmtree(out.parent, ignore_errors=True)
    ctx.store.write_jsonl(f"{ref.prefix}/metrics.jsonl", result.metrics)
    return {
        "model": f"store:{ref.prefix}/model",
        "pairs": len(rows),
        "steps": result.steps,
        "final_loss": result.final_loss,
        "global_batch": result.global_batch,
        "dropped_truncated": result.dropped_truncated,
        "train_seconds": result.seconds,
    }


def _publish(ctx: RunContext, round_: int, summary: dict) -> None:
    metrics = ctx.store.read_jsonl(f"{ctx.stage(round_, 'training').prefix}/metrics.jsonl")
    table = [
        {
            k: m.get(k)
            for k in (
                "step",
                "loss",
                "rewards/margins",
                "rewards/accuracies",
                "learning_rate",
                "grad_norm",
            )
        }
        for m in metrics
    ]
    publish(
        ctx,
        round_,
        "training",
        f"# DPO training, round {round_}\n\n"
        + markdown_table([summary])
        + "\n## Steps\n\n"
        + markdown_table(table),
    )


@task(
    name="training",
    tags=["gpu", "stage:training"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def training_task(ctx: RunContext, round_: int, policy: str) -> dict:
    """DPO on the replay mix; the reference is the round's start policy pi_{t-1}."""
    train_key = f"{ctx.stage(round_, 'replay').prefix}/train.jsonl"

    def body(ref: StageRef) -> dict:
        rows = ctx.store.read_jsonl(train_key)
        summary = train_into_store(ctx, ref, round_, policy, rows, ctx.recipe.training)
        _publish(ctx, round_, summary)
        return summary

    return run_stage(
        ctx, round_, "training", body, {"train": f"store:{train_key}", "policy": policy}
    )


@task(
    name="round0-training",
    tags=["gpu", "stage:training", "round:0"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def round0_training_task(ctx: RunContext, sft: str) -> dict:
    """pi_0: DPO of the SFT model on offline pairs (the DPO model the paper starts from)."""
    r0 = ctx.recipe.round0

    def body(ref: StageRef) -> dict:
        pool = load_pairs(ctx.recipe.data.offline_pairs)
        rows = sample_pairs(pool, r0.num_pairs, ctx.recipe.data.seed, r0.max_pair_chars)
        ctx.store.write_jsonl(f"{ref.prefix}/train.jsonl", rows)
        summary = train_into_store(ctx, ref, 0, sft, rows, r0.training)
        _publish(ctx, 0, summary)
        return summary

    return run_stage(
        ctx, 0, "training", body, {"offline_pairs": ctx.recipe.data.offline_pairs, "sft": sft}
    )
