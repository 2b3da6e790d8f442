"""A round's report: `report.md` and PNG plots of what the round did.

Plots: implicit rewards of chosen vs rejected, the alpha search curve with the chosen alpha,
lengths of chosen vs rejected before (alpha = 0) and after length regularisation, DPO loss
and reward margins per step, and WR / LC by round with the paper's numbers for the matching
base model as reference lines.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from dice_core.config import PairsConfig  # noqa: E402
from dice_core.pairs import filter_samples, sample_matrix, select_pairs  # noqa: E402

# AlpacaEval 2 (LC, WR) by round, from the paper's Table 1.
PAPER_SCORES = {
    "zephyr-7b": {0: (12.69, 10.71), 1: (19.03, 17.67), 2: (20.71, 20.16)},
    "llama3-8b": {0: (18.20, 15.50), 1: (25.08, 25.77), 2: (27.55, 30.99)},
}


@dataclass
class RoundData:
    """What one round left in the store, as plain Python values."""

    round: int
    scored: list[dict[str, Any]] = field(default_factory=list)
    pairs: list[dict[str, Any]] = field(default_factory=list)
    alpha_curve: dict[str, Any] | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)
    scores: dict[str, Any] | None = None
    summaries: dict[str, dict[str, Any]] = field(default_factory=dict)


def _save(fig, path: Path) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.name


def plot_rewards(data: RoundData, out: Path) -> str | None:
    if not data.pairs:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    chosen = [p["chosen_reward"] for p in data.pairs]
    rejected = [p["rejected_reward"] for p in data.pairs]
    bins = min(30, max(5, len(chosen)))
    ax.hist(chosen, bins=bins, alpha=0.6, label="chosen")
    ax.hist(rejected, bins=bins, alpha=0.6, label="rejected")
    ax.set(title=f"Implicit rewards, round {data.round}", xlabel="r(x, y)", ylabel="pairs")
    ax.legend()
    return _save(fig, out / "rewards.png")


def plot_alpha(data: RoundData, out: Path) -> str | None:
    if not data.alpha_curve:
        return None
    curve = data.alpha_curve["curve"]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot([c["alpha"] for c in curve], [c["gap"] for c in curve], marker="o", ms=3)
    ax.axvline(
        data.alpha_curve["alpha"],
        color="C3",
        ls="--",
        label=f"alpha* = {data.alpha_curve['alpha']:.3f}",
    )
    ax.axhline(0.0, color="grey", lw=0.8)
    ax.set(
        title=f"Alpha search, round {data.round}",
        xlabel="alpha",
        ylabel="mean len(chosen) - len(rejected)",
    )
    ax.legend()
    return _save(fig, out / "alpha_search.png")


def lengths_at(scored: list[dict[str, Any]], config: PairsConfig, alpha: float):
    """Chosen and rejected lengths per prompt when pairs are picked at `alpha`."""
    prompts, _ = filter_samples(scored, config)
    if not prompts:
        return [], []
    rewards, lengths, valid = sample_matrix(prompts)
    chosen, rejected, _ = select_pairs(rewards, lengths, valid, alpha)
    rows = range(len(prompts))
    return [lengths[i, chosen[i]] for i in rows], [lengths[i, rejected[i]] for i in rows]


def plot_lengths(data: RoundData, config: PairsConfig, out: Path) -> str | None:
    if not data.scored or not data.alpha_curve:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), sharey=True)
    for ax, alpha, title in (
        (axes[0], 0.0, "before (alpha = 0)"),
        (axes[1], data.alpha_curve["alpha"], f"after (alpha* = {data.alpha_curve['alpha']:.3f})"),
    ):
        chosen, rejected = lengths_at(data.scored, config, alpha)
        ax.hist(chosen, bins=20, alpha=0.6, label="chosen")
        ax.hist(rejected, bins=20, alpha=0.6, label="rejected")
        ax.set(title=title, xlabel="characters")
    axes[0].set_ylabel("pairs")
    axes[0].legend()
    fig.suptitle(f"Response lengths, round {data.round}")
    return _save(fig, out / "lengths.png")


def plot_training(data: RoundData, out: Path) -> str | None:
    if not data.metrics:
        return None
    steps = [m["step"] for m in data.metrics]
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.plot(steps, [m["loss"] for m in data.metrics], marker="o", ms=3, label="DPO loss")
    ax.set(title=f"DPO training, round {data.round}", xlabel="step", ylabel="loss")
    if any("rewards/margins" in m for m in data.metrics):
        twin = ax.twinx()
        twin.plot(
            steps,
            [m.get("rewards/margins", float("nan")) for m in data.metrics],
            color="C1",
            marker="s",
            ms=3,
            label="reward margin",
        )
        twin.set_ylabel("margin")
        twin.legend(loc="upper right")
    ax.legend(loc="upper left")
    return _save(fig, out / "training.png")


def plot_scores(rounds: list[RoundData], base_model: str, out: Path) -> str | None:
    scored = [r for r in rounds if r.scores]
    if not scored:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.6))
    xs = [r.round for r in scored]
    ax.plot(xs, [r.scores["length_controlled_winrate"] for r in scored], marker="o", label="LC")
    ax.plot(xs, [r.scores["win_rate"] for r in scored], marker="s", label="WR")
    for round_, (lc, wr) in PAPER_SCORES.get(base_model, {}).items():
        ax.axhline(lc, color="C0", ls=":", lw=0.8)
        ax.axhline(wr, color="C1", ls=":", lw=0.8)
        ax.annotate(f"paper r{round_}", (xs[-1], lc), fontsize=7, color="C0")
    ax.set(title="AlpacaEval 2 by round", xlabel="round", ylabel="%")
    ax.set_xticks(xs)
    ax.legend()
    return _save(fig, out / "scores.png")


def write_report(
    rounds: list[RoundData], config: PairsConfig, base_model: str, run_id: str, out: Path
) -> Path:
    """Write `report.md` and the plots of the last round in `rounds` into `out`.

    Args:
        rounds: Every round up to and including the one reported, in order.
        config: The run's pairs settings (to redo the alpha = 0 pairs).
        base_model: Which paper results to draw (`zephyr-7b`, `llama3-8b` or `none`).
        run_id: Named in the title.
        out: A local folder.

    Returns:
        The path of `report.md`.
    """
    out.mkdir(parents=True, exist_ok=True)
    data = rounds[-1]
    plots = [
        plot_rewards(data, out),
        plot_alpha(data, out),
        plot_lengths(data, config, out),
        plot_training(data, out),
        plot_scores(rounds, base_model, out),
    ]
    lines = [f"# DICE run {run_id}: round {data.round}", "", "## Rounds", "", _round_table(rounds)]
    for name, summary in data.summaries.items():
        flat = {k: v for k, v in summary.items() if not isinstance(v, dict | list)}
        lines += [f"## {name}", "", markdown_table([flat])]
    if data.scores and not data.scores.get("comparable_to_leaderboard", False):
        lines += [
            "Scores judged by `" + str(data.scores.get("judge")) + "` on "
            f"{data.scores.get('n_total')} instructions: not comparable to the "
            "AlpacaEval 2 leaderboard.",
            "",
        ]
    lines += [f"![{p}]({p})" for p in plots if p]
    path = out / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def _round_table(rounds: list[RoundData]) -> str:
    rows = []
    for r in rounds:
        pairs = r.summaries.get("pairs", {})
        training = r.summaries.get("training", {})
        rows.append(
            {
                "round": r.round,
                "pairs": pairs.get("pairs", training.get("pairs", "-")),
                "alpha": pairs.get("alpha", "-"),
                "dpo_loss": training.get("final_loss", "-"),
                "WR": (r.scores or {}).get("win_rate", "-"),
                "LC": (r.scores or {}).get("length_controlled_winrate", "-"),
            }
        )
    return markdown_table(rows)


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A markdown table from dicts sharing keys; floats with 4 decimals, cells cut at 120."""
    if not rows:
        return "_empty_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:120]
