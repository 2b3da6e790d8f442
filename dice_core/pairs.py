"""Length-regularised preference pairs from scored samples.

Rules (checked against the authors' scripts): drop samples that hit the length budget, keep
responses strictly between `min_chars` and `max_chars` characters, keep the first row of a
prompt repeated within one generation pass, keep prompts with enough valid samples; then scan
alpha = 0, step, 2 step, ... below `alpha_max` on r' = r - alpha * len(chars), stopping at the
first alpha whose |gap| is strictly above the smallest seen (that point is recorded), and
take the first alpha with the smallest |gap|. Where the official code relies on numpy's
unstable sort, ties here are broken by a stable sort: chosen = the latest tied maximum,
rejected = the earliest tied minimum.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dice_core.config import PairsConfig
from dice_core.errors import StageError

# The row fields the pairs stage reads; `sample_index` is the generation pass.
ROW_FIELDS = ("prompt_id", "prompt", "sample_index", "response", "finish_reason", "reward")


@dataclass
class FilterReport:
    """How many samples or prompts each filter removed, in the order the filters run."""

    samples_in: int = 0
    dropped_length_finish: int = 0
    dropped_char_bounds: int = 0
    dropped_duplicate_prompt: int = 0
    prompts_in: int = 0
    prompts_dropped_few_valid: int = 0
    samples_dropped_few_valid: int = 0
    prompts_kept: int = 0

    def as_dict(self) -> dict[str, int]:
        return dict(self.__dict__)


@dataclass
class AlphaSearch:
    """The alpha scan: every point visited, and the chosen alpha."""

    alpha: float
    gap: float
    curve: list[tuple[float, float]] = field(default_factory=list)


@dataclass
class PromptSamples:
    """The valid samples of one prompt, in pass order."""

    prompt_id: str
    prompt: str
    rows: list[dict[str, Any]]
    rewards: np.ndarray
    lengths: np.ndarray


def filter_samples(
    rows: list[dict[str, Any]], config: PairsConfig
) -> tuple[list[PromptSamples], FilterReport]:
    """Apply the four filters in order.

    Args:
        rows: Scored samples with `ROW_FIELDS`, in generation order (pass by pass).
        config: Bounds and the minimum number of valid samples.

    Returns:
        Prompts that keep enough samples, in order of first appearance, and the drop counts.
    """
    report = FilterReport(samples_in=len(rows))
    by_prompt: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
    seen_in_pass: set[tuple[int, str]] = set()
    for row in sorted(rows, key=lambda r: r["sample_index"]):
        if row["finish_reason"] == "length":
            report.dropped_length_finish += 1
            continue
        if not config.min_chars < len(row["response"]) < config.max_chars:
            report.dropped_char_bounds += 1
            continue
        key = (row["sample_index"], row["prompt"])
        if key in seen_in_pass:
            report.dropped_duplicate_prompt += 1
            continue
        seen_in_pass.add(key)
        by_prompt.setdefault(row["prompt"], []).append(row)
    report.prompts_in = len({row["prompt"] for row in rows})
    kept = []
    for prompt, samples in by_prompt.items():
        if len(samples) < config.min_valid_samples:
            report.samples_dropped_few_valid += len(samples)
            continue
        kept.append(_prompt_samples(prompt, samples))
    report.prompts_dropped_few_valid = report.prompts_in - len(kept)
    report.prompts_kept = len(kept)
    return kept, report


def _prompt_samples(prompt: str, samples: list[dict[str, Any]]) -> PromptSamples:
    return PromptSamples(
        prompt_id=str(samples[0]["prompt_id"]),
        prompt=prompt,
        rows=samples,
        rewards=np.array([float(s["reward"]) for s in samples], dtype=np.float64),
        lengths=np.array([len(s["response"]) for s in samples], dtype=np.float64),
    )


def sample_matrix(prompts: list[PromptSamples]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rewards, lengths and validity as prompt x sample matrices (invalid cells masked)."""
    width = max(len(p.rows) for p in prompts)
    rewards = np.zeros((len(prompts), width))
    lengths = np.zeros((len(prompts), width))
    valid = np.zeros((len(prompts), width), dtype=bool)
    for i, p in enumerate(prompts):
        n = len(p.rows)
        rewards[i, :n], lengths[i, :n], valid[i, :n] = p.rewards, p.lengths, True
    return rewards, lengths, valid


def select_pairs(
    rewards: np.ndarray, lengths: np.ndarray, valid: np.ndarray, alpha: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Chosen and rejected sample indices per prompt under penalty alpha.

    Returns:
        (chosen index, rejected index, regularised scores r') for every prompt.
    """
    scores = rewards - alpha * lengths
    width = scores.shape[1]
    high = np.where(valid, scores, -np.inf)
    low = np.where(valid, scores, np.inf)
    # argmax returns the first maximum; on the reversed row that is the latest one.
    chosen = width - 1 - np.argmax(high[:, ::-1], axis=1)
    rejected = np.argmin(low, axis=1)
    return chosen, rejected, scores


def length_gap(lengths: np.ndarray, chosen: np.ndarray, rejected: np.ndarray) -> float:
    """Mean over prompts of len(chosen) - len(rejected), signed."""
    rows = np.arange(lengths.shape[0])
    return float(np.mean(lengths[rows, chosen] - lengths[rows, rejected]))


def search_alpha(prompts: list[PromptSamples], config: PairsConfig) -> AlphaSearch:
    """Scan alpha on the grid with the official early stop.

    Args:
        prompts: Output of `filter_samples` (non-empty).
        config: Grid step and end.

    Returns:
        The first alpha with the smallest |gap|, its gap and every visited point.
    """
    return scan_alpha(*sample_matrix(prompts), config)


def scan_alpha(
    rewards: np.ndarray, lengths: np.ndarray, valid: np.ndarray, config: PairsConfig
) -> AlphaSearch:
    """`search_alpha` on prompt x sample matrices (as `sample_matrix` builds them)."""
    curve: list[tuple[float, float]] = []
    best = np.inf
    for alpha in np.arange(0.0, config.alpha_max, config.alpha_step):
        chosen, rejected, _ = select_pairs(rewards, lengths, valid, float(alpha))
        gap = length_gap(lengths, chosen, rejected)
        curve.append((float(alpha), gap))
        if abs(gap) > best:
            break
        best = min(best, abs(gap))
    index = int(np.argmin([abs(g) for _, g in curve]))
    return AlphaSearch(alpha=curve[index][0], gap=curve[index][1], curve=curve)


def build_pairs(
    rows: list[dict[str, Any]], config: PairsConfig
) -> tuple[list[dict[str, Any]], AlphaSearch, FilterReport]:
    """Filter scored samples, search alpha, and pick one pair per prompt.

    Args:
        rows: Scored samples with `ROW_FIELDS` (plus optional log-prob fields, carried along).
        config: The pairs settings.

    Returns:
        Pairs sorted by prompt text (each with chosen/rejected text, scores r' at alpha*,
        rewards, lengths, sample indices, log-probs and an `identical` flag), the alpha
        search and the filter report.

    Raises:
        StageError: No prompt keeps enough valid samples; the message gives every count.
    """
    prompts, report = filter_samples(rows, config)
    if not prompts:
        counts = ", ".join(f"{k}={v}" for k, v in report.as_dict().items())
        raise StageError(
            f"no prompt kept at least {config.min_valid_samples} valid samples, so no pair "
            f"can be built ({counts}); raise the generation budget or lower "
            "pairs.min_valid_samples"
        )
    search = search_alpha(prompts, config)
    rewards, lengths, valid = sample_matrix(prompts)
    chosen, rejected, scores = select_pairs(rewards, lengths, valid, search.alpha)
    pairs = [
        _pair(p, int(c), int(r), scores[i])
        for i, (p, c, r) in enumerate(zip(prompts, chosen, rejected, strict=True))
    ]
    pairs.sort(key=lambda pair: pair["prompt"])
    return pairs, search, report


def _pair(p: PromptSamples, c: int, r: int, scores: np.ndarray) -> dict[str, Any]:
    best, worst = p.rows[c], p.rows[r]
    pair = {
        "prompt_id": p.prompt_id,
        "prompt": p.prompt,
        "chosen": best["response"],
        "rejected": worst["response"],
        "chosen_score": float(scores[c]),
        "rejected_score": float(scores[r]),
        "chosen_reward": float(best["reward"]),
        "rejected_reward": float(worst["reward"]),
        "chosen_chars": len(best["response"]),
        "rejected_chars": len(worst["response"]),
        "chosen_sample": int(best["sample_index"]),
        "rejected_sample": int(worst["sample_index"]),
        "num_valid_samples": len(p.rows),
        "identical": best["response"] == worst["response"],
    }
    # The policy's log-probs are the DPO reference of this round's training.
    if "policy_logp" in best and "policy_logp" in worst:
        pair["ref_chosen_logps"] = float(best["policy_logp"])
        pair["ref_rejected_logps"] = float(worst["policy_logp"])
    return pair


# ---------------------------------------------------------------------------------------------
# Benchmark


def synthetic_scores(
    prompts: int, samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Seeded rewards, lengths and validity shaped like a round's scored samples.

    Lengths are whole characters (20 to 1,999). Rewards grow with length (0.01 a character,
    as implicit rewards tend to) plus noise, rounded to 0.1 so that ties occur. One prompt in
    ten lost a few samples to the filters: its last cells are invalid (zero, as in
    `sample_matrix`).

    Returns:
        Rewards, lengths and validity, prompts x samples.
    """
    rng = np.random.default_rng(seed)
    lengths = rng.integers(20, 2000, size=(prompts, samples)).astype(np.float64)
    rewards = np.round(0.01 * lengths + rng.normal(0.0, 3.0, size=lengths.shape), 1)
    lost = np.where(rng.random(prompts) < 0.1, rng.integers(1, samples // 4 + 1, prompts), 0)
    valid = np.arange(samples)[None, :] < (samples - lost)[:, None]
    rewards[~valid], lengths[~valid] = 0.0, 0.0
    return rewards, lengths, valid


def grid_loop_search(
    samples: list[list[tuple[float, float]]], config: PairsConfig
) -> tuple[AlphaSearch, list[int], list[int]]:
    """The straightforward alpha search: at each grid point, a Python stable sort of every
    prompt's (reward, length) samples by r - alpha * len, with the same early stop.

    Returns:
        The search, and the chosen and rejected sample of every prompt at alpha*.
    """
    curve: list[tuple[float, float]] = []
    best = float("inf")
    for alpha in np.arange(0.0, config.alpha_max, config.alpha_step):
        picks = [_grid_pick(row, float(alpha)) for row in samples]
        diffs = [row[c][1] - row[r][1] for row, (c, r) in zip(samples, picks, strict=True)]
        gap = float(np.mean(diffs))
        curve.append((float(alpha), gap))
        if abs(gap) > best:
            break
        best = min(best, abs(gap))
    index = min(range(len(curve)), key=lambda i: abs(curve[i][1]))
    alpha, gap = curve[index]
    picks = [_grid_pick(row, alpha) for row in samples]
    search = AlphaSearch(alpha=alpha, gap=gap, curve=curve)
    return search, [c for c, _ in picks], [r for _, r in picks]


def _grid_pick(row: list[tuple[float, float]], alpha: float) -> tuple[int, int]:
    """(chosen, rejected): the latest tied maximum and the earliest tied minimum of r'."""
    order = sorted(range(len(row)), key=lambda k: row[k][0] - alpha * row[k][1])
    return order[-1], order[0]


def benchmark_alpha_search(
    prompts: int, samples: int, seed: int, config: PairsConfig
) -> dict[str, float | int | bool]:
    """Time the vectorised alpha search and pair choice against `grid_loop_search`, on the
    same seeded synthetic scores, and check that both give the same result.

    Neither timing includes laying the scores out (matrices for one, Python lists for the
    other).

    Args:
        prompts: Prompts of the synthetic round.
        samples: Samples per prompt.
        seed: Seed of `synthetic_scores`.
        config: Grid step, end.

    Returns:
        Seconds of each, their ratio, the grid points visited, alpha*, and whether alpha*,
        the curve, and the chosen and rejected samples are identical.
    """
    rewards, lengths, valid = synthetic_scores(prompts, samples, seed)
    rows = [
        [(float(r), float(n)) for r, n, ok in zip(*cells, strict=True) if ok]
        for cells in zip(rewards, lengths, valid, strict=True)
    ]
    started = time.perf_counter()
    search = scan_alpha(rewards, lengths, valid, config)
    chosen, rejected, _ = select_pairs(rewards, lengths, valid, search.alpha)
    vectorised = time.perf_counter() - started
    started = time.perf_counter()
    loop, loop_chosen, loop_rejected = grid_loop_search(rows, config)
    looped = time.perf_counter() - started
    return {
        "prompts": prompts,
        "samples": samples,
        "grid_points": len(search.curve),
        "alpha": search.alpha,
        "gap": search.gap,
        "vectorised_seconds": vectorised,
        "loop_seconds": looped,
        "ratio_loop_over_vectorised": looped / vectorised,
        **same_search(search, chosen, rejected, loop, loop_chosen, loop_rejected),
    }


def same_search(
    search: AlphaSearch,
    chosen: np.ndarray,
    rejected: np.ndarray,
    other: AlphaSearch,
    other_chosen: list[int],
    other_rejected: list[int],
) -> dict[str, bool]:
    """Whether two alpha searches agree exactly: alpha*, the visited curve, and the chosen
    and rejected sample of every prompt."""
    return {
        "identical_alpha": search.alpha == other.alpha and search.gap == other.gap,
        "identical_curve": search.curve == other.curve,
        "identical_pairs": chosen.tolist() == list(other_chosen)
        and rejected.tolist() == list(other_rejected),
    }
