"""Report task: `report.md` and plots for a round, from what the store holds."""

from __future__ import annotations

import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.cache_policies import NO_CACHE

from dice_core.report import RoundData, write_report
from dice_core.store import COMPLETE, ArtifactStore
from tasks.common import TRANSIENT_RETRIES, RunContext, markdown_table, publish

PLOT_LINK = re.compile(r"!\[[^\]]*\]\(([^)]+)\)")
ROUND_STAGES = ("generation", "rewards", "pairs", "replay", "training", "heldout", "evaluation")
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
    for stage in ROUND_STAGES:
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
    # The UI cannot show the plots' relative links: the artifact names their store keys.
    text = PLOT_LINK.sub(lambda m: f"- plot: `{prefix}/{m.group(1)}`", text)
    publish(ctx, round_, "report", text + note)
    publish(ctx, round_, "overview", overview_markdown(store, ctx.run_id, rounds[-1]))
    return f"{prefix}/report.md"


def overview_markdown(store: ArtifactStore, run_id: str, data: RoundData) -> str:
    """A round at a glance: its key numbers, the drops by filter, a few chosen / rejected
    pairs, and the store key of every file its stages wrote."""
    numbers = [{"quantity": name, "value": value} for name, value in key_numbers(data).items()]
    lines = [f"# Round {data.round} of run {run_id}", "", markdown_table(numbers)]
    filters = data.summaries.get("pairs", {}).get("filters", {})
    if filters:
        rows = [{"filter": name, "count": count} for name, count in filters.items()]
        lines += ["## Pairs: samples and prompts through the filters, in order", ""]
        lines += [markdown_table(rows)]
    if data.pairs:
        lines += ["## Chosen and rejected, first pairs", "", markdown_table(pair_examples(data))]
    files = stage_files(store, run_id, data.round)
    lines += [f"## Files in the store `{store.root_url}`", "", markdown_table(files)]
    return "\n".join(lines)


def key_numbers(data: RoundData) -> dict[str, Any]:
    """Counts, alpha, reward statistics, DPO loss, held-out accuracy, WR and LC, for the
    stages the round has completed."""
    summaries = data.summaries
    picks = {
        "prompts": ("generation", "prompts"),
        "samples": ("generation", "samples"),
        "cut_at_max_tokens": ("generation", "finished_by_length"),
        "reward_mean": ("rewards", "reward_mean"),
        "reward_std": ("rewards", "reward_std"),
        "pairs": ("pairs", "pairs"),
        "alpha": ("pairs", "alpha"),
        "length_gap": ("pairs", "gap"),
        "train_on_policy": ("replay", "on_policy"),
        "train_offline": ("replay", "offline"),
        "train_pairs": ("training", "pairs"),
        "dpo_steps": ("training", "steps"),
        "dpo_loss": ("training", "final_loss"),
        "heldout_accuracy": ("heldout", "accuracy"),
        "WR": ("evaluation", "win_rate"),
        "LC": ("evaluation", "length_controlled_winrate"),
    }
    return {
        name: summaries[stage][field]
        for name, (stage, field) in picks.items()
        if field in summaries.get(stage, {})
    }


def pair_examples(data: RoundData, count: int = 3) -> list[dict[str, Any]]:
    """The first pairs, a row for the chosen and one for the rejected response, with their
    implicit rewards and lengths in characters."""
    rows = []
    for pair in data.pairs[:count]:
        for side in ("chosen", "rejected"):
            rows.append(
                {
                    "prompt": pair["prompt"][:48] if side == "chosen" else "",
                    "side": side,
                    "response": pair[side][:64],
                    "reward": pair[f"{side}_reward"],
                    "chars": pair[f"{side}_chars"],
                }
            )
    return rows


def stage_files(store: ArtifactStore, run_id: str, round_: int) -> list[dict[str, Any]]:
    """Every file of the round's completed stages, by store key, from their records."""
    rows = []
    for stage in ROUND_STAGES:
        base = f"runs/{run_id}/round-{round_}/{stage}"
        if not store.exists(f"{base}/{COMPLETE}"):
            continue
        files = store.read_json(f"{base}/{COMPLETE}").get("files", {})
        rows += [
            {"stage": stage, "key": f"{base}/{name}", "bytes": meta.get("bytes")}
            for name, meta in sorted(files.items())
        ]
    return rows


# Reading a round back and drawing its plots takes seconds; 15 minutes means a stuck store.
@task(
    name="report",
    tags=["stage:report"],
    cache_policy=NO_CACHE,
    timeout_seconds=900,
    **TRANSIENT_RETRIES,
)
def report_task(ctx: RunContext, round_: int) -> str:
    """The round's report and plots, rebuilt from the store each time it runs."""
    return build_report(ctx, round_)
