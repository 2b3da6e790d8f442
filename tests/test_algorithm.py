"""Exact checks of the algorithm's rules: filters, alpha search, pair choice, replay counts."""

from __future__ import annotations

import random

import numpy as np
import pytest

from dice_core.config import PairsConfig, ReplayConfig
from dice_core.errors import StageError
from dice_core.pairs import build_pairs, filter_samples, search_alpha, select_pairs
from dice_core.replay import mix, replay_counts


def row(prompt: str, k: int, response: str, reward: float = 0.0, finish: str = "stop") -> dict:
    return {
        "prompt_id": prompt,
        "prompt": prompt,
        "sample_index": k,
        "response": response,
        "finish_reason": finish,
        "reward": reward,
    }


# ---------------------------------------------------------------- filters
def test_char_bounds_are_strict_and_count_code_points():
    config = PairsConfig(min_valid_samples=2)
    rows = [
        row("p", 0, "x" * 3),  # dropped: not > 3
        row("p", 1, "x" * 4),  # kept
        row("p", 2, "x" * 6699),  # kept
        row("p", 3, "x" * 6700),  # dropped: not < 6700
        row("p", 4, "é" * 4),  # 4 code points (8 bytes): kept
    ]
    kept, report = filter_samples(rows, config)
    assert [len(r["response"]) for r in kept[0].rows] == [4, 6699, 4]
    assert report.dropped_char_bounds == 2


def test_no_strip_before_length_check():
    kept, report = filter_samples(
        [row("p", 0, "  ab"), row("p", 1, "abcd")], PairsConfig(min_valid_samples=2)
    )
    assert report.dropped_char_bounds == 0 and len(kept[0].rows) == 2


def test_length_finish_is_dropped_first():
    rows = [row("p", k, "valid text", finish="length" if k == 0 else "stop") for k in range(3)]
    rows.append(row("p", 3, "ab", finish="length"))  # counted by the first filter, not the second
    kept, report = filter_samples(rows, PairsConfig(min_valid_samples=2))
    assert report.dropped_length_finish == 2 and report.dropped_char_bounds == 0
    assert [r["sample_index"] for r in kept[0].rows] == [1, 2]


def test_seven_valid_samples_drop_a_prompt_eight_keep_it():
    rows = [row("seven", k, f"answer {k}") for k in range(7)]
    rows += [row("eight", k, f"answer {k}") for k in range(8)]
    kept, report = filter_samples(rows, PairsConfig(min_valid_samples=8))
    assert [p.prompt for p in kept] == ["eight"]
    assert report.prompts_dropped_few_valid == 1 and report.samples_dropped_few_valid == 7


def test_repeated_prompt_keeps_first_surviving_row_of_each_pass():
    rows = [
        row("p", 0, "ab", reward=9.0),  # too short: the next row is the first survivor
        row("p", 0, "first", reward=1.0),
        row("p", 0, "second", reward=2.0),  # duplicate within pass 0
        row("p", 1, "other pass", reward=3.0),
    ]
    kept, report = filter_samples(rows, PairsConfig(min_valid_samples=2))
    assert [r["response"] for r in kept[0].rows] == ["first", "other pass"]
    assert report.dropped_duplicate_prompt == 1


def test_no_prompt_left_names_every_count():
    rows = [row("p", 0, "ab"), row("p", 1, "long enough", finish="length")]
    with pytest.raises(StageError) as error:
        build_pairs(rows, PairsConfig(min_valid_samples=2))
    message = str(error.value)
    assert "dropped_length_finish=1" in message and "dropped_char_bounds=1" in message


# ---------------------------------------------------------- alpha search
def hand_case() -> list[dict]:
    """Prompt A flips to its short sample at alpha 0.002, prompt B at 0.006."""
    return [
        row("A", 0, "a" * 1000, reward=1.0),
        row("A", 1, "a" * 100, reward=0.0),
        row("B", 0, "b" * 100, reward=0.0),
        row("B", 1, "b" * 400, reward=1.5),
    ]


def test_alpha_search_hand_computed_with_early_stop():
    config = PairsConfig(min_valid_samples=2)
    prompts, _ = filter_samples(hand_case(), config)
    search = search_alpha(prompts, config)
    # gaps: 0 and 0.001 -> (900 + 300) / 2; 0.002..0.005 -> (-900 + 300) / 2;
    # 0.006 -> (-900 - 300) / 2 is strictly above the best |gap| so the scan stops there.
    expected = [600.0, 600.0, -300.0, -300.0, -300.0, -300.0, -600.0]
    assert [round(a, 6) for a, _ in search.curve] == [0.0, 0.001, 0.002, 0.003, 0.004, 0.005, 0.006]
    assert [g for _, g in search.curve] == expected
    assert search.alpha == pytest.approx(0.002) and search.gap == -300.0


def test_pairs_at_alpha_star_carry_regularised_scores_and_sort_by_prompt():
    pairs, search, _ = build_pairs(list(reversed(hand_case())), PairsConfig(min_valid_samples=2))
    assert [p["prompt"] for p in pairs] == ["A", "B"]
    a, b = pairs
    assert (a["chosen_chars"], a["rejected_chars"]) == (100, 1000)
    assert a["chosen_score"] == pytest.approx(0.0 - search.alpha * 100)
    assert (b["chosen_chars"], b["rejected_chars"]) == (400, 100)
    assert b["chosen_score"] == pytest.approx(1.5 - search.alpha * 400)


def test_ties_choose_latest_maximum_and_earliest_minimum():
    rewards = np.array([[1.0, 3.0, 3.0, 1.0]])
    lengths = np.zeros_like(rewards)
    chosen, rejected, _ = select_pairs(rewards, lengths, np.ones_like(rewards, dtype=bool), 0.0)
    assert (chosen[0], rejected[0]) == (2, 0)


def test_identical_pair_is_kept_in_search_and_flagged():
    rows = [row("p", 0, "same"), row("p", 1, "same")]
    pairs, search, _ = build_pairs(rows, PairsConfig(min_valid_samples=2))
    assert pairs[0]["identical"] and search.curve[0][1] == 0.0


def grid_loop(rows: list[dict], config: PairsConfig):
    """The straightforward reference: per prompt, a stable sort of Python floats."""
    prompts, _ = filter_samples(rows, config)
    curve, best = [], float("inf")
    for alpha in np.arange(0.0, config.alpha_max, config.alpha_step):
        diffs = []
        for p in prompts:
            scored = sorted(p.rows, key=lambda r: r["reward"] - alpha * len(r["response"]))
            diffs.append(len(scored[-1]["response"]) - len(scored[0]["response"]))
        gap = float(np.mean(diffs))
        curve.append((float(alpha), gap))
        if abs(gap) > best:
            break
        best = min(best, abs(gap))
    return curve


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_vectorised_search_equals_grid_loop(seed):
    rng = random.Random(seed)
    rows = []
    for k in range(6):
        for p in range(40):
            # Rounded rewards create ties that the stable rule must break the same way.
            reward = round(rng.gauss(0.0, 2.0), 1)
            rows.append(row(f"p{p}", k, "x" * rng.randint(4, 800), reward=reward))
    config = PairsConfig(min_valid_samples=4)
    prompts, _ = filter_samples(rows, config)
    assert search_alpha(prompts, config).curve == grid_loop(rows, config)


# ------------------------------------------------------------------ replay
@pytest.mark.parametrize(
    ("gamma", "n_off", "n_on", "expected"),
    [(0.25, 10, 8, (7, 2)), (0.5, 10, 8, (5, 5)), (0.5, 10, 3, (3, 3)), (0.7, 10, 9, (3, 6))],
)
def test_replay_counts(gamma, n_off, n_on, expected):
    assert replay_counts(n_off, n_on, gamma) == expected


def pair(prompt: str) -> dict:
    return {"prompt": prompt, "chosen": f"good {prompt}", "rejected": f"bad {prompt}"}


def test_gamma_zero_keeps_every_on_policy_pair_but_identical_ones():
    on = [pair(f"q{i}") for i in range(5)] + [{**pair("same"), "identical": True}]
    rows, counts = mix(on, [pair("o1")], ReplayConfig(gamma=0.0))
    assert [r["prompt"] for r in rows] == [f"q{i}" for i in range(5)]
    assert counts.offline == 0


def test_replay_excludes_on_policy_prompts_and_is_seeded():
    on = [pair(f"q{i}") for i in range(8)]
    offline = [pair(f"q{i}") for i in range(8)] + [pair(f"o{i}") for i in range(4)]
    rows, counts = mix(on, offline, ReplayConfig(gamma=0.5, seed=7))
    on_rows = [r for r in rows if r["source"] == "on_policy"]
    off_rows = [r for r in rows if r["source"] == "offline"]
    assert rows[: len(on_rows)] == on_rows  # on-policy block first
    assert (counts.on_policy, counts.offline) == replay_counts(12, 8, 0.5)
    assert not {r["prompt"] for r in off_rows} & {r["prompt"] for r in on_rows}
    again, _ = mix(on, offline, ReplayConfig(gamma=0.5, seed=7))
    assert again == rows
