"""AlpacaEval 2 WR and LC: against the official leaderboard, against alpaca_eval's own LC code,
and on the inputs a small local evaluation produces."""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import sklearn

from dice_core import alpaca_metrics as am
from dice_core.errors import DataError

ANNOTATION_FILES = sorted((am.DATA_DIR / "annotations").glob("*.annotations.json"))


@pytest.fixture(scope="module")
def inputs() -> am.OfflineInputs:
    return am.load_offline_inputs()


@pytest.fixture(scope="module")
def leaderboard() -> pd.DataFrame:
    path = am.DATA_DIR / "leaderboard" / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv"
    return pd.read_csv(path, index_col=0)


@pytest.fixture(scope="module")
def check(inputs: am.OfflineInputs) -> pd.DataFrame:
    """Refit WR and LC for every shipped model with a leaderboard row (about 15 s)."""
    return am.leaderboard_check(inputs)


@pytest.fixture(scope="module")
def alpaca_7b() -> list[dict]:
    path = next(p for p in ANNOTATION_FILES if p.name.startswith("alpaca-7b"))
    return json.loads(path.read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Against the leaderboard
# ---------------------------------------------------------------------------------------------


def test_check_covers_every_shipped_model_with_a_leaderboard_row(check: pd.DataFrame) -> None:
    assert len(check) == 53
    assert {"alpaca-7b", "OpenHermes-2.5-Mistral-7B", "gpt4_gamed"} <= set(check.index)


def test_win_rate_matches_leaderboard(check: pd.DataFrame) -> None:
    assert check["win_rate_error"].abs().max() < 0.01


def test_length_controlled_win_rate_matches_leaderboard(check: pd.DataFrame) -> None:
    error = check["lc_error"].abs()
    assert error.max() <= 1.1, f"{error.idxmax()}: {error.max():.3f}"
    assert error.mean() <= 0.3


@pytest.mark.parametrize("path", ANNOTATION_FILES, ids=lambda p: p.name.split(".")[0])
def test_score_annotations_matches_leaderboard_row(
    path: Path, inputs: am.OfflineInputs, leaderboard: pd.DataFrame
) -> None:
    records = json.loads(path.read_text(encoding="utf-8"))
    scores = am.score_annotations(records, inputs=inputs)
    row = leaderboard.loc[records[0]["generator_2"]]
    for key in ("win_rate", "standard_error", "discrete_win_rate"):
        assert scores[key] == pytest.approx(row[key], abs=0.01), key
    for key in ("n_wins", "n_wins_base", "n_draws", "n_total", "avg_length"):
        assert scores[key] == row[key], key
    assert abs(scores["length_controlled_winrate"] - row["length_controlled_winrate"]) <= 1.1
    assert set(scores) >= {
        "win_rate",
        "standard_error",
        "length_controlled_winrate",
        "n_total",
        "n_wins",
        "n_draws",
        "avg_length",
    }


def test_lc_equals_alpaca_eval_given_the_same_inputs(
    alpaca_7b: list[dict], inputs: am.OfflineInputs, tmp_path: Path, monkeypatch
) -> None:
    """alpaca_eval's own LC code, fed our fitted inputs in place of its download, agrees."""
    from alpaca_eval.metrics import glm_winrate

    gamed = inputs.gamed_judgements
    delta = (gamed["len_output_1"] - gamed["len_output_2"]).astype(float)
    df_gamed = pd.DataFrame(
        {
            "index": gamed["index"],
            "instruction_difficulty": inputs.instruction_difficulty[gamed["index"]],
            "std_delta_len": delta / delta.groupby(gamed["generator_2"]).transform("std"),
            "preference": gamed["preference"] - 1,
            "not_gamed_baseline": False,
            "model": gamed["generator_2"],
        }
    )
    df_gamed.to_csv(tmp_path / "df_gamed.csv", index=False)
    monkeypatch.setattr(glm_winrate, "hf_hub_download", lambda **_: str(tmp_path / "df_gamed.csv"))
    with sklearn.config_context(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        upstream = glm_winrate.get_length_controlled_winrate(alpaca_7b, save_weights_dir=None)
    ours = am.score_annotations(alpaca_7b, inputs=inputs)
    assert ours["length_controlled_winrate"] == pytest.approx(
        upstream["length_controlled_winrate"], abs=1e-6
    )
    assert ours["lc_standard_error"] == pytest.approx(upstream["lc_standard_error"], abs=1e-6)


# ---------------------------------------------------------------------------------------------
# Win rate rules
# ---------------------------------------------------------------------------------------------


def test_win_rate_counts_zero_as_draw_and_drops_invalid() -> None:
    assert am.win_rate([0, 2]) == pytest.approx(75.0)
    assert am.win_rate([1.0, 2.0, float("nan"), 3.0, -1.0, None]) == pytest.approx(50.0)
    assert math.isnan(am.win_rate([]))
    assert math.isnan(am.win_rate([float("nan")]))


# ---------------------------------------------------------------------------------------------
# LC on subsets and odd inputs
# ---------------------------------------------------------------------------------------------


def _columns(records: list[dict]) -> tuple[list[float], list[int], list[int]]:
    return (
        [r["preference"] for r in records],
        [len(r["output_2"]) for r in records],
        [len(r["output_1"]) for r in records],
    )


def test_lc_function_equals_score_annotations(
    alpaca_7b: list[dict], inputs: am.OfflineInputs
) -> None:
    preferences, model, baseline = _columns(alpaca_7b)
    lc = am.length_controlled_win_rate(preferences, model, baseline, range(805), inputs)
    expected = am.score_annotations(alpaca_7b, inputs=inputs)["length_controlled_winrate"]
    assert lc == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize("count", [1, 2, 16, 100])
def test_lc_on_small_subsets_is_a_percentage(
    count: int, alpaca_7b: list[dict], inputs: am.OfflineInputs
) -> None:
    rows = alpaca_7b[:count]
    lc = am.length_controlled_win_rate(*_columns(rows), range(count), inputs)
    assert 0.0 <= lc <= 100.0


def test_lc_with_equal_length_differences_and_draws(inputs: am.OfflineInputs) -> None:
    lc = am.length_controlled_win_rate([0, 1.5, 1.5], [10, 10, 10], [20, 20, 20], [3, 4, 5], inputs)
    assert 0.0 <= lc <= 100.0


def test_lc_without_a_valid_preference_is_nan(inputs: am.OfflineInputs) -> None:
    assert math.isnan(
        am.length_controlled_win_rate([float("nan"), 7.0], [1, 2], [3, 4], [0, 1], inputs)
    )


def test_lc_missing_preferences_are_left_out_of_the_fit_but_averaged(
    alpaca_7b: list[dict], inputs: am.OfflineInputs
) -> None:
    preferences, model, baseline = _columns(alpaca_7b[:50])
    holes = [float("nan") if i % 10 == 0 else p for i, p in enumerate(preferences)]
    lc = am.length_controlled_win_rate(holes, model, baseline, range(50), inputs)
    assert 0.0 <= lc <= 100.0


def test_lc_rejects_bad_inputs(inputs: am.OfflineInputs) -> None:
    with pytest.raises(ValueError, match="equal lengths"):
        am.length_controlled_win_rate([1.5, 1.5], [1], [1, 2], [0, 1], inputs)
    with pytest.raises(ValueError, match="0..804"):
        am.length_controlled_win_rate([1.5], [1], [2], [805], inputs)
    with pytest.raises(ValueError, match="0..804"):
        am.length_controlled_win_rate([1.5], [1], [2], [-1], inputs)


def test_lc_leaves_sklearn_configuration_alone(
    alpaca_7b: list[dict], inputs: am.OfflineInputs
) -> None:
    am.length_controlled_win_rate(*_columns(alpaca_7b[:20]), range(20), inputs)
    assert sklearn.get_config()["enable_metadata_routing"] is False


# ---------------------------------------------------------------------------------------------
# score_annotations
# ---------------------------------------------------------------------------------------------


def test_score_annotations_by_instruction_uses_instruction_ids(
    alpaca_7b: list[dict], inputs: am.OfflineInputs
) -> None:
    subset = alpaca_7b[100:116][::-1]
    scores = am.score_annotations(subset, difficulty_by="instruction", inputs=inputs)
    expected = am.length_controlled_win_rate(*_columns(subset), list(range(115, 99, -1)), inputs)
    assert scores["length_controlled_winrate"] == pytest.approx(expected, abs=1e-9)
    assert scores["n_total"] == 16


def test_score_annotations_of_the_baseline_against_itself_is_fifty(
    inputs: am.OfflineInputs,
) -> None:
    records = [
        {
            "output_1": "a",
            "output_2": "a",
            "preference": 1.5,
            "generator_1": "b",
            "generator_2": "b",
        }
    ] * 3
    assert am.score_annotations(records, inputs=inputs)["length_controlled_winrate"] == 50.0


def test_score_annotations_without_a_valid_preference_is_nan(inputs: am.OfflineInputs) -> None:
    records = [{"output_1": "abc", "output_2": "ab", "preference": p} for p in (None, np.nan)]
    scores = am.score_annotations(records, inputs=inputs)
    assert math.isnan(scores["win_rate"]) and math.isnan(scores["length_controlled_winrate"])
    assert scores["n_total"] == 0 and scores["avg_length"] == 2


def test_score_annotations_rejects_bad_records(alpaca_7b: list[dict]) -> None:
    with pytest.raises(ValueError, match="at least one"):
        am.score_annotations([])
    with pytest.raises(ValueError, match="record 1: missing field"):
        am.score_annotations([alpaca_7b[0], {"output_1": "x", "output_2": "y"}])
    with pytest.raises(ValueError, match="one generator_2"):
        am.score_annotations([alpaca_7b[0], {**alpaca_7b[1], "generator_2": "other"}])
    with pytest.raises(ValueError, match="difficulty_by"):
        am.score_annotations(alpaca_7b[:2], difficulty_by="id")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="not in the AlpacaEval set"):
        am.score_annotations([{**alpaca_7b[0], "instruction": "?"}], difficulty_by="instruction")


# ---------------------------------------------------------------------------------------------
# Fitted inputs
# ---------------------------------------------------------------------------------------------


def test_fitted_inputs_are_complete(inputs: am.OfflineInputs) -> None:
    assert inputs.instruction_difficulty.shape == (805,)
    assert np.isfinite(inputs.instruction_difficulty).all()
    gamed = inputs.gamed_judgements
    assert gamed.groupby("generator_2").size().to_dict() == dict.fromkeys(am.GAMED_BASELINES, 805)
    assert gamed["preference"].between(1, 2).all()
    for name in am.GAMED_BASELINES:
        outputs = json.loads((am.DATA_DIR / "model_outputs" / f"{name}.json").read_text())
        lengths = gamed.loc[gamed["generator_2"] == name, "len_output_2"]
        assert lengths.tolist() == [len(o["output"]) for o in outputs]


def test_missing_fitted_inputs_name_the_fix(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="alpaca_metrics fit"):
        am.load_offline_inputs(tmp_path)


@pytest.mark.slow
def test_fit_offline_inputs_reproduces_the_shipped_files(
    inputs: am.OfflineInputs, tmp_path: Path
) -> None:
    """The full estimate (about 3 minutes on 2 cores) gives the shipped CSVs back."""
    am.save_offline_inputs(am.fit_offline_inputs(log=None), tmp_path)
    refit = am.load_offline_inputs(tmp_path)
    np.testing.assert_allclose(
        refit.instruction_difficulty, inputs.instruction_difficulty, atol=1e-3
    )
    np.testing.assert_allclose(
        refit.gamed_judgements["preference"], inputs.gamed_judgements["preference"], atol=1e-3
    )
