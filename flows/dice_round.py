"""One DICE round as a Prefect flow: generation, rewards, pairs, replay, training, evaluation.

prefect deployment run dice-round/dice-round -p run_id=RUN -p round=2
python -m flows.dice_round RUN 2 [STORE]
"""

from __future__ import annotations

import sys

from prefect import flow
from prefect.runtime import flow_run

from flows.common import (
    name_flow_run,
    next_round,
    policy_model,
    reference_model,
    reopen_run,
    round_clock,
    write_round_record,
)
from tasks.common import RunContext
from tasks.evaluation import evaluation_task
from tasks.generation import generation_task
from tasks.models import prepare_sft_task
from tasks.pairs import pairs_task
from tasks.replay import replay_task
from tasks.report import report_task
from tasks.rewards import rewards_task
from tasks.training import training_task

ROUND_NAME = "{run_id} · round {round}"


def run_round(ctx: RunContext, round_: int, sft: str) -> dict:
    """The six stages of round t >= 1; each is skipped when already complete in the store."""
    policy, reference = policy_model(ctx, round_ - 1), reference_model(ctx, round_, sft)
    generation_task(ctx, round_, policy)
    rewards_task(ctx, round_, policy, reference)
    pairs = pairs_task(ctx, round_)
    replay_task(ctx, round_)
    training = training_task(ctx, round_, policy)
    row = {
        "round": round_,
        "pairs": pairs["summary"]["pairs"],
        "alpha": pairs["summary"]["alpha"],
        "dpo_loss": training["summary"]["final_loss"],
    }
    if ctx.recipe.evaluation.enabled:
        scores = evaluation_task(ctx, round_, policy_model(ctx, round_), sft)["summary"]
        row.update(wr=scores["win_rate"], lc=scores["length_controlled_winrate"])
    report_task(ctx, round_)
    return row


def _round_name() -> str:
    """The flow run's first name: run id and round (`next` until the flow finds it)."""
    parameters = flow_run.parameters
    return ROUND_NAME.format(
        run_id=parameters.get("run_id"), round=parameters.get("round") or "next"
    )


@flow(name="dice-round", flow_run_name=_round_name)
def dice_round(
    run_id: str,
    round: int | None = None,  # noqa: A002
    store: str | None = None,
) -> dict:
    """Run (or resume) round `round` of an existing run; its recipe comes from the run's
    manifest, pi_{t-1} and ref_{t-1} from the store.

    Args:
        run_id: The run, as created by `dice run` or the dice-run deployment.
        round: The round, 1 or more; the rounds before it must be complete. Empty: the next
            round, the first whose stages are not all complete (a nightly continuation).
        store: The run's store root (default: DICE_STORE or ./dice-store).

    Returns:
        The round's summary row: pairs, alpha, DPO loss, WR, LC.
    """
    started = round_clock()
    if round is not None and round < 1:
        raise ValueError(f"round must be 1 or more (got {round}); round 0 belongs to dice-run")
    ctx = reopen_run(run_id, store)
    if round is None:
        round = next_round(ctx)  # noqa: A001
        name_flow_run(ROUND_NAME.format(run_id=run_id, round=round))
    row = run_round(ctx, round, prepare_sft_task(ctx))
    write_round_record(ctx, round, started)
    return row


if __name__ == "__main__":
    dice_round(sys.argv[1], int(sys.argv[2]), *(sys.argv[3:4]))
