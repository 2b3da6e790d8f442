"""Report task: `report.md` and plots for a round, from what the store holds."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.report import RoundData, write_report
from dice_core.store import COMPLETE, ArtifactStore
from tasks.common import RunContext, publish

STAGE_FILES = {
    "rewards": "rewards.jsonl",
    "pairs": "pairs.jsonl",
    "training": "metrics.jsonl",
}


def round_data(store: ArtifactStore, run_id: str, round_: int) -> RoundData:
    """Everything a round's report draws, read from the completed stages only."""
    data = RoundData(round=round_)
    base = f"runs/{run_id}/round-{round_}"
    done = lambda stage: store.exists(f"{base}/{stage}/{COMPLETE}")  # noqa: E731
    for stage in ("generation", "rewards", "pairs", "replay", "training", "heldout", "evaluation"):
        if done(stage):
            data.summaries[stage] = store.read_json(f"{base}/{stage}/{COMPLETE}")["summary"]
    if done("rewards"):
        data.scored = store.read_jsonl(f"{base}/rewards/rewards.jsonl")
    if done("pairs"):
        data.pairs = store.read_jsonl(f"{base}/pairs/pairs.jsonl")
        data.alpha_curve = store.read_json(f"{base}/pairs/alpha_curve.json")
    if done("training"):
        data.metrics = store.read_jsonl(f"{base}/training/metrics.jsonl")
    if done("evaluation"):
        data.scores = store.read_json(f"{base}/evaluation/scores.json")
    return data


def build_report(ctx: RunContext, round_: int) -> str:
    """Write the round's report into the store (replacing an older one); returns its key."""
    store = ctx.store
    rounds = [round_data(store, ctx.run_id, r) for r in range(round_ + 1)]
    local = Path(tempfile.mkdtemp(prefix="dice-report-"))
    try:
        path = write_report(rounds, ctx.recipe.pairs, ctx.recipe.run.base_model, ctx.run_id, local)
        prefix = f"runs/{ctx.run_id}/round-{round_}/report"
        for file in sorted(local.iterdir()):
            store.put_file(file, f"{prefix}/{file.name}")
        text = path.read_text()
    finally:
        shutil.rmtree(local, ignore_errors=True)
    note = f"\n\nFiles: `{store.root_url}/{prefix}/` (report.md and the PNG plots)."
    publish(ctx, round_, "report", text + note)
    return f"{prefix}/report.md"


@task(name="report", tags=["stage:report"], cache_policy=NO_CACHE)
def report_task(ctx: RunContext, round_: int) -> str:
    """The round's report and plots, rebuilt from the store each time it runs."""
    return build_report(ctx, round_)
