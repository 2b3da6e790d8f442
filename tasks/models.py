"""Model tasks: the SFT model in the store, and pi_0's implicit-reward accuracy."""

from __future__ import annotations

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.data import load_pairs, sample_pairs
from dice_core.models import GGUF_PACKAGE, resolve_model
from dice_core.rewards import pair_accuracy
from dice_core.store import StageRef
from tasks.common import TRANSIENT_RETRIES, RunContext, logger, markdown_table, publish, run_stage

SFT_PREFIX = "models/smollm2-135m-instruct"


# Copying the SFT model into the store is I/O alone: an hour covers a 7B model to S3.
@task(
    name="prepare-sft",
    tags=["stage:models"],
    cache_policy=NO_CACHE,
    timeout_seconds=3600,
    **TRANSIENT_RETRIES,
)
def prepare_sft_task(ctx: RunContext) -> str:
    """A model reference for the SFT model; the GGUF default is converted once per store."""
    source = ctx.recipe.models.sft
    if source != GGUF_PACKAGE:
        return str(resolve_model(source, ctx.cache_dir / "models"))
    store, marker = ctx.store, f"{SFT_PREFIX}/_COMPLETE.json"
    if not store.exists(marker):
        local = resolve_model(source, ctx.cache_dir / "models")
        logger().info(
            "models | storing the converted SFT model at %s/%s", store.root_url, SFT_PREFIX
        )
        # Every file is replaced whole and with the same bytes, so runs that start together
        # on one store may all copy: none deletes what another is writing.
        keys = store.put_dir(local, SFT_PREFIX)
        store.write_json(marker, {"source": source, "files": keys})
    return f"store:{SFT_PREFIX}"


@task(
    name="heldout-accuracy",
    tags=["gpu", "stage:rewards", "round:0"],
    cache_policy=NO_CACHE,
    **TRANSIENT_RETRIES,
)
def heldout_accuracy_task(ctx: RunContext, policy: str, reference: str) -> dict:
    """Implicit-reward accuracy of pi_0 against the SFT model on held-out pairs."""
    r0 = ctx.recipe.round0

    def body(ref: StageRef) -> dict:
        pool = load_pairs(ctx.recipe.data.heldout_pairs)
        pairs = sample_pairs(pool, r0.heldout_pairs, ctx.recipe.data.seed, r0.max_pair_chars)
        result = pair_accuracy(
            str(ctx.model_dir(policy)),
            str(ctx.model_dir(reference)),
            pairs,
            ctx.recipe.rewards,
            ctx.recipe.models.dtype,
        )
        ctx.store.write_json(f"{ref.prefix}/accuracy.json", result)
        logger().info(
            "heldout round 0 | pairs: %d | implicit-reward accuracy: %.3f",
            result["pairs"],
            result["accuracy"],
        )
        publish(
            ctx,
            0,
            "heldout",
            "# pi_0 implicit-reward accuracy on held-out pairs\n\n" + markdown_table([result]),
        )
        return result

    inputs = {
        "heldout_pairs": ctx.recipe.data.heldout_pairs,
        "policy": policy,
        "reference": reference,
    }
    return run_stage(ctx, 0, "heldout", body, inputs)
