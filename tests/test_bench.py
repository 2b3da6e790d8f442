"""The pure parts of `dice bench`: the alpha search's identity check, the round overhead read
from a run's records, the scorers' agreement check, TRL's defaults as the bench reports them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from dice_core.config import PairsConfig, RewardsConfig, load_recipe
from dice_core.manifest import (
    open_run,
    round_overhead,
    round_record_key,
    run_overheads,
)
from dice_core.pairs import (
    AlphaSearch,
    benchmark_alpha_search,
    grid_loop_search,
    same_search,
    scan_alpha,
    select_pairs,
    synthetic_scores,
)
from dice_core.rewards import compare_sums
from dice_core.store import COMPLETE, ArtifactStore


# ------------------------------------------------------------------ alpha search
def as_rows(rewards: np.ndarray, lengths: np.ndarray, valid: np.ndarray) -> list[list[tuple]]:
    return [
        [(float(r), float(n)) for r, n, ok in zip(*cells, strict=True) if ok]
        for cells in zip(rewards, lengths, valid, strict=True)
    ]


def test_synthetic_scores_are_seeded_with_invalid_cells_zeroed():
    rewards, lengths, valid = synthetic_scores(500, 16, seed=3)
    again = synthetic_scores(500, 16, seed=3)
    for a, b in zip((rewards, lengths, valid), again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert rewards.shape == lengths.shape == valid.shape == (500, 16)
    assert 0 < (~valid).any(axis=1).sum() < 500
    assert (rewards[~valid] == 0).all() and (lengths[~valid] == 0).all()
    # Valid cells come first in each row, as `sample_matrix` lays them out.
    assert (np.diff(valid.astype(int), axis=1) <= 0).all()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grid_loop_and_vectorised_search_agree_exactly(seed):
    config = PairsConfig()
    rewards, lengths, valid = synthetic_scores(300, 16, seed)
    search = scan_alpha(rewards, lengths, valid, config)
    chosen, rejected, _ = select_pairs(rewards, lengths, valid, search.alpha)
    loop, loop_chosen, loop_rejected = grid_loop_search(as_rows(rewards, lengths, valid), config)
    assert same_search(search, chosen, rejected, loop, loop_chosen, loop_rejected) == {
        "identical_alpha": True,
        "identical_curve": True,
        "identical_pairs": True,
    }
    assert len(search.curve) > 2  # the scan went past alpha = 0 before stopping


def test_grid_loop_breaks_ties_like_the_stage():
    """Latest tied maximum is chosen, earliest tied minimum rejected."""
    rows = [[(1.0, 10.0), (3.0, 10.0), (3.0, 10.0), (1.0, 10.0)]]
    _, chosen, rejected = grid_loop_search(rows, PairsConfig())
    assert (chosen, rejected) == ([2], [0])


def test_same_search_names_each_difference():
    search = AlphaSearch(alpha=0.002, gap=-3.0, curve=[(0.0, 5.0), (0.001, 4.0), (0.002, -3.0)])
    chosen, rejected = np.array([1, 0]), np.array([0, 1])
    other_curve = AlphaSearch(
        alpha=0.002, gap=-3.0, curve=[(0.0, 5.0), (0.001, 4.5), (0.002, -3.0)]
    )
    other_alpha = AlphaSearch(alpha=0.001, gap=-3.0, curve=search.curve)
    assert same_search(search, chosen, rejected, other_curve, [1, 0], [0, 1]) == {
        "identical_alpha": True,
        "identical_curve": False,
        "identical_pairs": True,
    }
    assert not same_search(search, chosen, rejected, other_alpha, [1, 0], [0, 1])["identical_alpha"]
    assert not same_search(search, chosen, rejected, search, [1, 1], [0, 1])["identical_pairs"]


def test_alpha_benchmark_reports_identity_and_positive_times():
    result = benchmark_alpha_search(200, 8, seed=5, config=PairsConfig())
    assert result["identical_alpha"] and result["identical_curve"] and result["identical_pairs"]
    assert result["grid_points"] >= 2 and result["prompts"] == 200 and result["samples"] == 8
    assert result["vectorised_seconds"] > 0 and result["loop_seconds"] > 0


# ------------------------------------------------------------------ round overhead
ROUND = {
    "round": 1,
    "started_at": "2026-01-01T10:00:00.700+00:00",
    "finished_at": "2026-01-01T10:05:00.200+00:00",
    "seconds": 300.0,
}


def stage(started: str, finished: str, seconds: float) -> dict:
    return {
        "started_at": f"2026-01-01T{started}+00:00",
        "finished_at": f"2026-01-01T{finished}+00:00",
        "seconds": seconds,
    }


def test_round_overhead_is_flow_time_minus_the_stage_bodies_that_ran_in_it():
    records = {
        # started within the round's first second: stage times keep whole seconds only
        "generation": stage("10:00:00", "10:02:00", 119.5),
        "rewards": stage("10:02:01", "10:03:00", 58.5),
        # finished by an earlier attempt, skipped by this one
        "pairs": stage("09:50:00", "09:50:01", 0.5),
        "training": stage("10:03:01", "10:05:00", 110.0),
    }
    row = round_overhead(ROUND, records)
    assert row["stages_run"] == ["generation", "rewards", "training"]
    assert row["stages_skipped"] == ["pairs"]
    assert row["flow_seconds"] == 300.0
    assert row["stage_seconds"] == pytest.approx(288.0)
    assert row["overhead_seconds"] == pytest.approx(12.0)
    assert row["overhead_share"] == pytest.approx(0.04)
    assert row["round"] == 1


def test_round_overhead_of_a_flow_that_ran_nothing_is_all_overhead():
    row = round_overhead(ROUND, {"generation": stage("09:00:00", "09:10:00", 600.0)})
    assert row["stages_run"] == [] and row["stage_seconds"] == 0
    assert row["overhead_share"] == 1.0


def test_run_overheads_reads_round_records_and_stage_records(tmp_path):
    from flows.common import recipe_path

    store = ArtifactStore(str(tmp_path))
    recipe = load_recipe(recipe_path("tiny"))
    open_run(store, "r1", recipe, "test")
    store.write_json(round_record_key("r1", 1), ROUND)
    store.write_json(f"runs/r1/round-1/generation/{COMPLETE}", stage("10:00:01", "10:01:00", 59.0))
    store.write_json(f"runs/r1/round-1/rewards/{COMPLETE}", stage("10:01:01", "10:02:00", 59.0))
    store.write_text("runs/r1/round-1/pairs/partial.jsonl", "{}\n")  # not complete: not read
    rows = run_overheads(store, "r1")
    assert [r["round"] for r in rows] == [1]  # round 0 has no round record
    assert rows[0]["stages_run"] == ["generation", "rewards"]
    assert rows[0]["overhead_seconds"] == pytest.approx(182.0)


def test_round_record_is_kept_when_a_resumed_flow_ran_no_stage(tmp_path):
    from datetime import UTC, datetime, timedelta

    from flows.common import recipe_path, round_clock, write_round_record
    from tasks.common import RunContext

    store = ArtifactStore(str(tmp_path))
    ctx = RunContext("r2", str(tmp_path), load_recipe(recipe_path("tiny")))
    open_run(store, "r2", ctx.recipe, "test")
    write_round_record(ctx, 1, round_clock())
    first = store.read_json(round_record_key("r2", 1))
    assert first["round"] == 1 and first["seconds"] >= 0 and first["flow_run_id"] is None
    # A stage finished an hour ago; a later flow that runs nothing keeps the first record.
    hour_ago = (datetime.now(UTC) - timedelta(hours=1)).isoformat(timespec="seconds")
    done = {"started_at": hour_ago, "finished_at": hour_ago, "seconds": 1.0}
    store.write_json(f"runs/r2/round-1/generation/{COMPLETE}", done)
    write_round_record(ctx, 1, round_clock())
    assert store.read_json(round_record_key("r2", 1)) == first
    # A flow in which a stage ran replaces it (started a moment later: the records keep
    # milliseconds, and on a fast machine all of the above fits in one).
    time.sleep(0.01)
    started = round_clock()
    now = datetime.now(UTC).isoformat(timespec="seconds")
    store.write_json(
        f"runs/r2/round-1/rewards/{COMPLETE}", {"started_at": now, "finished_at": now, "seconds": 0}
    )
    write_round_record(ctx, 1, started)
    assert store.read_json(round_record_key("r2", 1))["started_at"] != first["started_at"]


# ------------------------------------------------------------------ scoring, DPO
def test_compare_sums_uses_the_stated_tolerance():
    slow = [-100.0, -250.0]
    assert compare_sums([-100.0001, -250.0], slow)["sums_match"]
    result = compare_sums([-100.01, -250.0], slow)
    assert not result["sums_match"]
    assert result["max_abs_diff"] == pytest.approx(0.01)
    assert result["max_rel_diff"] == pytest.approx(1e-4)


def test_plain_and_batched_scorers_agree_on_a_tiny_model(tiny_model_dir):
    from dice_core.models import load_causal_lm, load_tokenizer
    from dice_core.rewards import encode_rows, one_per_forward_logprobs, sequence_logprobs

    rows = [
        {"prompt": "What is 2+2?", "response": "4"},
        {"prompt": "hi", "response": "Hello! How can I help you today?"},
    ]
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    items = encode_rows(tokenizer, rows)
    config = RewardsConfig(batch_tokens=64, vocab_chunk=1024)
    fast = sequence_logprobs(model, items, tokenizer.pad_token_id, config)
    assert compare_sums(fast, one_per_forward_logprobs(model, items))["sums_match"]


def test_scoring_measurement_reports_time_memory_and_tokens(tiny_model_dir):
    from dice_core.rewards import _measure_scoring

    rows = [{"prompt": "hi", "response": "Hello there, friend."}] * 3
    config = RewardsConfig(batch_tokens=64, vocab_chunk=1024).model_dump()
    batched = _measure_scoring(str(tiny_model_dir), rows, "batched", config)
    plain = _measure_scoring(str(tiny_model_dir), rows, "one_per_forward", config)
    assert batched["tokens"] == plain["tokens"] > 0
    assert batched["padded_tokens"] == batched["tokens"]  # equal lengths: no padding
    assert batched["seconds"] > 0 and batched["peak_mb"] >= 0
    assert compare_sums(batched["sums"], plain["sums"])["sums_match"]


def test_trl_defaults_as_the_bench_reports_them(tmp_path):
    from dice_core.training import trl_defaults

    found = trl_defaults(tmp_path)
    assert found["trl_version"].startswith("1.16.")
    assert found["bf16"] is True
    assert found["activation_checkpointing"] is True
    assert found["padding_free"] is False
    assert found["precompute_ref_log_probs"] is False
    assert found["learning_rate"] == 1e-6 and found["max_length"] == 1024
    assert found["lr_scheduler_type"] == "linear" and type(found["lr_scheduler_type"]) is str
    assert found["logging_steps"] == 10


def test_summary_table_aligns_columns():
    from flows.bench import summary_table

    table = summary_table(
        [("alpha", "seconds", "0.1", "1.2", "12.0x"), ("dpo", "tokens/s", "90", "45", "2x")]
    )
    lines = table.splitlines()
    assert lines[0].startswith("part  | measured") and set(lines[1]) <= {"-", "+"}
    assert [line.index("|") for line in (lines[0], *lines[2:])] == [6, 6, 6]
    assert all(line == line.rstrip() for line in lines)
