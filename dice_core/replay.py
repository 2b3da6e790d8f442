"""Replay mixing: a share gamma of offline pairs joins the on-policy pairs.

Counts follow the authors' script, with Python's int truncation:
n_on = min(int(N_offline * (1 - gamma)), len(on_policy)) and
n_off = int(gamma * n_on / (1 - gamma)). The on-policy sample is drawn first; offline pairs
are drawn only among prompts that are not in it. Sampling is seeded here (it is not in the
official code), so a rerun builds the same training set.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

from dice_core.config import ReplayConfig


@dataclass(frozen=True)
class ReplayCounts:
    """Sizes of the mix."""

    on_policy_available: int
    offline_available: int
    offline_eligible: int
    on_policy: int
    offline: int


def replay_counts(n_offline: int, n_on_policy: int, gamma: float) -> tuple[int, int]:
    """Pairs taken from each source for a replay ratio gamma in [0, 1).

    Args:
        n_offline: Size of the offline pair set.
        n_on_policy: Number of on-policy pairs available.
        gamma: Fraction of offline pairs in the training set.

    Returns:
        (on-policy pairs, offline pairs).
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    n_on = min(int(n_offline * (1 - gamma)), n_on_policy)
    n_off = int(gamma * n_on / (1 - gamma))
    return n_on, n_off


def mix(
    on_policy: list[dict[str, Any]], offline: list[dict[str, Any]], config: ReplayConfig
) -> tuple[list[dict[str, Any]], ReplayCounts]:
    """Build the training set: sampled on-policy pairs first, then replayed offline pairs.

    Args:
        on_policy: Pairs built this round (each with `prompt`, `chosen`, `rejected`).
        offline: The offline pair set.
        config: gamma and the seed. gamma = 0 keeps every on-policy pair, unsampled.

    Returns:
        The training rows (each tagged with `source`) and the counts.
    """
    trainable = [p for p in on_policy if not p.get("identical", False)]
    if config.gamma == 0.0:
        rows = [{**p, "source": "on_policy"} for p in trainable]
        counts = ReplayCounts(len(trainable), len(offline), 0, len(rows), 0)
        return rows, counts
    rng = random.Random(config.seed)
    n_on, n_off = replay_counts(len(offline), len(trainable), config.gamma)
    picked = rng.sample(trainable, n_on)
    taken = {p["prompt"] for p in picked}
    eligible = [p for p in offline if p["prompt"] not in taken]
    # Fewer eligible offline pairs than asked for: take all of them.
    replayed = rng.sample(eligible, min(n_off, len(eligible)))
    rows = [{**p, "source": "on_policy"} for p in picked]
    rows += [{**_offline_row(p), "source": "offline"} for p in replayed]
    counts = ReplayCounts(len(trainable), len(offline), len(eligible), len(picked), len(replayed))
    return rows, counts


def _offline_row(pair: dict[str, Any]) -> dict[str, Any]:
    """An offline pair reduced to the training fields (its reference log-probs are unknown)."""
    return {"prompt": pair["prompt"], "chosen": pair["chosen"], "rejected": pair["rejected"]}
