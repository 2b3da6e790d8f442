"""A whole tiny run through Prefect with the real SmolLM2 model: every artifact exists, parses,
and is consistent; a rerun of the same run recomputes nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dice_core.store import ArtifactStore

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def prefect_server():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


@pytest.fixture(scope="module")
def tiny_run(prefect_server, tmp_path_factory, sft_model_dir):
    from flows.dice_run import dice_run

    store = tmp_path_factory.mktemp("store")
    state = dice_run(recipe="tiny", run_id="tiny-e2e", store=str(store), return_state=True)
    assert state.is_completed(), state
    return store, state.result()


def rows(store: Path, key: str) -> list[dict]:
    return ArtifactStore(str(store)).read_jsonl(key)


def record(store: Path, prefix: str) -> dict:
    return json.loads((store / prefix / "_COMPLETE.json").read_text())


def test_summary_rows(tiny_run):
    _, summary = tiny_run
    assert [r["round"] for r in summary] == [0, 1]
    for row in summary:
        assert 0.0 <= row["wr"] <= 100.0 and 0.0 <= row["lc"] <= 100.0
    assert summary[1]["pairs"] >= 1 and summary[1]["alpha"] >= 0.0


def test_every_stage_completed_with_lineage(tiny_run):
    store, _ = tiny_run
    run = store / "runs" / "tiny-e2e"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["recipe"]["run"]["name"] == "tiny" and manifest["recipe_digest"]
    for stage in ("training", "heldout", "evaluation"):
        assert record(run, f"round-0/{stage}")["finished_at"]
    for stage in ("generation", "rewards", "pairs", "replay", "training", "evaluation"):
        rec = record(run, f"round-1/{stage}")
        assert rec["code_version"] and rec["host"] and rec["files"]
        for name, meta in rec["files"].items():
            assert (run / "round-1" / stage / name).stat().st_size == meta["bytes"]


def test_pairs_come_from_scored_samples(tiny_run):
    store, _ = tiny_run
    base = "runs/tiny-e2e/round-1"
    samples = rows(store, f"{base}/generation/samples.jsonl")
    scored = rows(store, f"{base}/rewards/rewards.jsonl")
    pairs = rows(store, f"{base}/pairs/pairs.jsonl")
    assert len(samples) == len(scored) == 3 * 4
    for sample, score in zip(samples, scored, strict=True):
        assert score["response"] == sample["response"]
        assert score["reward"] == pytest.approx(score["policy_logp"] - score["reference_logp"])
        assert sample["finish_reason"] in {"stop", "length"}
    by_key = {(s["prompt"], s["sample_index"]): s for s in scored}
    curve = json.loads((store / base / "pairs" / "alpha_curve.json").read_text())
    for pair in pairs:
        chosen = by_key[(pair["prompt"], pair["chosen_sample"])]
        rejected = by_key[(pair["prompt"], pair["rejected_sample"])]
        assert chosen["response"] == pair["chosen"] and rejected["response"] == pair["rejected"]
        assert chosen["finish_reason"] == rejected["finish_reason"] == "stop"
        alpha = curve["alpha"]
        expected = chosen["reward"] - alpha * len(chosen["response"])
        assert pair["chosen_score"] == pytest.approx(expected)
        assert pair["chosen_score"] >= pair["rejected_score"]
        # The policy's log-probs become the training reference of on-policy pairs.
        assert pair["ref_chosen_logps"] == pytest.approx(chosen["policy_logp"])
    train = rows(store, f"{base}/replay/train.jsonl")
    assert {r["source"] for r in train} <= {"on_policy", "offline"}


def test_checkpoint_loads_and_differs_from_start_model(tiny_run):
    from transformers import AutoModelForCausalLM

    store, _ = tiny_run
    run = store / "runs" / "tiny-e2e"
    start = load_file(run / "round-0" / "training" / "model" / "model.safetensors")
    trained_dir = run / "round-1" / "training" / "model"
    trained = load_file(trained_dir / "model.safetensors")
    assert start.keys() == trained.keys()
    assert any(not torch.equal(start[k], trained[k]) for k in start)
    model = AutoModelForCausalLM.from_pretrained(trained_dir)
    assert model.config.model_type == "llama"
    assert (trained_dir / "tokenizer.json").is_file()
    metrics = rows(store, "runs/tiny-e2e/round-1/training/metrics.jsonl")
    assert metrics and all("loss" in m for m in metrics)


def test_evaluation_files_use_alpaca_eval_formats(tiny_run):
    store, _ = tiny_run
    evaluation = store / "runs" / "tiny-e2e" / "round-1" / "evaluation"
    outputs = json.loads((evaluation / "model_outputs.json").read_text())
    annotations = json.loads((evaluation / "annotations.json").read_text())
    scores = json.loads((evaluation / "scores.json").read_text())
    assert len(outputs) == len(annotations) == scores["n_total"] == 2
    assert {"instruction", "output", "generator"} <= outputs[0].keys()
    for a in annotations:
        assert {"instruction", "output_1", "output_2", "preference"} <= a.keys()
        assert 1.0 <= a["preference"] <= 2.0
    assert scores["comparable_to_leaderboard"] is False


def test_rerun_recomputes_nothing(tiny_run):
    from flows.dice_run import dice_run

    store, summary = tiny_run
    run = store / "runs" / "tiny-e2e"
    before = {p: record(run, p)["finished_at"] for p in ("round-0/training", "round-1/pairs")}
    again = dice_run(recipe="tiny", run_id="tiny-e2e", store=str(store))
    assert again == summary
    assert {p: record(run, p)["finished_at"] for p in before} == before


def test_prefect_artifacts_were_published(tiny_run):
    import asyncio

    from prefect.client.orchestration import get_client

    async def keys() -> set[str]:
        async with get_client() as client:
            return {a.key for a in await client.read_artifacts() if a.key}

    found = asyncio.run(keys())
    for stage in ("generation", "rewards", "pairs", "replay", "training", "evaluation"):
        assert f"tiny-e2e-round-1-{stage}" in found
    assert "tiny-e2e-round-0-heldout" in found
