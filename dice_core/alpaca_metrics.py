"""AlpacaEval 2 win rate (WR) and length-controlled win rate (LC), as the leaderboard computes
them, offline.

WR is alpaca_eval's own head-to-head count: mean(preference - 1) x 100, where a preference of
0 is a draw (1.5) and NaN or out-of-range values are dropped.

LC follows alpaca_eval's `length_controlled_v1` GLM (`metrics/glm_winrate.py`) and fits it with
alpaca_eval's own `fit_LogisticRegressionCV`: one logistic model per evaluated model, no
intercept, three features: tanh(delta / std(delta)) with delta = len(baseline) - len(model) in
characters (pandas ddof-1 std, not centred), the instruction's difficulty (looked up by the
row's position, as alpaca_eval does) and a not-gamed-baseline indicator. Soft labels
(preference - 1); 2 x 805 rows of the length-gamed baselines (gpt4_1106_preview concise and
verbose, indicator 0, weight 0.1 each) regularise the fit; L1 strength by 5-fold grouped CV
over alpaca_eval's log grid, then a refit. LC = 100 x mean predicted win probability with the
length term at zero, over every row (rows whose preference is missing included, as upstream).

alpaca_eval downloads two inputs of that fit at run time: the instruction difficulties and the
judgements of the two gamed baselines. Neither ships, so `fit_offline_inputs` estimates both
from what does ship (55 models' judgements in `annotations/compact_55_models.csv`, the
leaderboard, and every model's published GLM weights in `leaderboard/lc_glm_weights.csv`) and
writes them to `data/alpaca_eval/fitted/`:

1. Joint fit, as alpaca_eval's instruction-difficulty notebook does: one L1 logistic model
   over all 55 models' judgements with a length slope and a bias per model and one term per
   instruction position (position 0 is the reference, 0). Its L1 strength is picked from a
   grid by step 2's check.
2. Affine map: scale and offset of those terms chosen so that each leaderboard model's
   published weights reproduce its published LC (LC = 100 x mean sigmoid(bias + slope x
   difficulty) over the model's first n_total positions: 197 equations).
3. Calibration, by nonlinear least squares over the 805 difficulties and one logistic model
   per gamed baseline (its modelled judgements: sigmoid of a length, difficulty and bias
   term). Residuals: the 197 LC equations; the gamed baselines' published WR; for every
   shipped model with a leaderboard row and for the two gamed baselines themselves, the
   Newton step from the published weights to the refit's L1 optimum (x 10; C as the refit's
   cross-validation picks it) and the LC change that step makes; a weak prior (sd 30) tying
   the difficulties to step 2's. When the refit's optimum is at the published weights, the
   refit reproduces the leaderboard.

Measured on a 2-core machine shared with other jobs: the fit takes about 3 minutes. Over the
53 shipped models with a leaderboard row, refit LC minus leaderboard LC has mean |error| 0.03
and max 0.15 (WR matches to 1e-9), but these models also served to calibrate. In a 5-fold
split (`fit --exclude` a fifth of them, score that fifth) the held-out models scored mean
|error| 0.19, max 1.07, LC too high by 0.15 on average: expect that on a new model. The four
FuseChat models, which the leaderboard's own difficulties did not see either, held out
scored mean |error| 0.07. A prior of sd 1 instead gave 0.29 held out.

Commands:
    python -m dice_core.alpaca_metrics fit    # refit, rewrite fitted/*.csv, print the check
    python -m dice_core.alpaca_metrics check  # WR and LC against the leaderboard, per model
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sparse
import sklearn
from scipy.optimize import least_squares
from scipy.special import expit
from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

from dice_core.errors import DataError

# alpaca_eval imports pkg_resources, which warns on import.
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    from alpaca_eval.metrics.glm_winrate import fit_LogisticRegressionCV
    from alpaca_eval.metrics.winrate import get_winrate

DATA_DIR = Path(__file__).parent / "data" / "alpaca_eval"
FITTED_DIR = DATA_DIR / "fitted"
DIFFICULTY_FILE = "instruction_difficulty.csv"
GAMED_FILE = "gamed_judgements.csv"
N_INSTRUCTIONS = 805
BASELINE = "gpt4_1106_preview"
GAMED_BASELINES = ("gpt4_1106_preview_concise", "gpt4_1106_preview_verbose")
# alpaca_eval's regularize_to_baseline_lambda (0.2), split over the two gamed baselines.
GAMED_WEIGHT = 0.1
FEATURES = ("length", "difficulty", "not_gamed_baseline")
_WEIGHT_COLUMNS = {
    "np.tanh(std_delta_len)": "length",
    "instruction_difficulty": "difficulty",
    "not_gamed_baseline.astype(float)": "not_gamed_baseline",
}
# Step 1's L1 strengths; step 3's weights (see the module docstring).
JOINT_C_GRID = (2.0, 4.0, 8.0, 16.0, 32.0)
COEFFICIENT_SCALE = 10.0
PRIOR_SD = 30.0
CALIBRATION_ROUNDS = 2


@dataclass(frozen=True)
class OfflineInputs:
    """The two inputs of the LC fit that alpaca_eval downloads at run time, estimated offline.

    Attributes:
        instruction_difficulty: One value per AlpacaEval instruction position (805).
        gamed_judgements: The gamed baselines' judgements against gpt4_1106_preview, one row
            per instruction: generator_2, index, preference (in [1, 2]), len_output_1,
            len_output_2.
    """

    instruction_difficulty: np.ndarray
    gamed_judgements: pd.DataFrame


# ---------------------------------------------------------------------------------------------
# Win rate and length-controlled win rate
# ---------------------------------------------------------------------------------------------


def win_rate(preferences: Sequence[float | None]) -> float:
    """AlpacaEval's win rate of the model over the baseline, in percent.

    Args:
        preferences: Judge preferences in [1, 2] (2: the model wins); 0 is a draw (1.5);
            None, NaN and values outside [1, 2] are dropped.

    Returns:
        mean(preference - 1) x 100 over the valid preferences; NaN when none is valid.
    """
    return float(_head_to_head(preferences)["win_rate"])


def length_controlled_win_rate(
    preferences: Sequence[float | None],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    instruction_positions: Sequence[int],
    inputs: OfflineInputs | None = None,
) -> float:
    """AlpacaEval 2's length-controlled win rate, in percent, fitted as the leaderboard does.

    Works on any subset of the 805 instructions. With few rows the fit still runs (the gamed
    baselines' 1,610 rows keep it defined), but the model's own bias rests on those rows and
    L1 shrinks it toward the gamed baselines' level, which pulls weak models up. On random
    subsets of four shipped models, LC strayed from the full-set LC by 12 points on average
    with 16 rows (WR: 7; weak models up to +15), by 4 with 64 rows and by 1.4 with 200.
    Fewer than two rows, or identical length differences, leave std(delta) undefined: the
    length feature is then 0 for every row. Out-of-range preferences are treated as missing:
    left out of the fit, but still averaged over, as upstream does with NaN.

    Args:
        preferences: Judge preferences in [1, 2]; 0 is a draw; NaN or out of range: missing.
        model_lengths: Characters in each model output.
        baseline_lengths: Characters in each baseline (gpt4_1106_preview) output.
        instruction_positions: Each row's position in the 805-instruction set, used to look
            up the instruction difficulty. The leaderboard uses the row's position in the
            model's file (0, 1, ...), which equals the instruction id only for full files.
        inputs: Difficulties and gamed judgements; the shipped fitted values by default.

    Returns:
        The LC in percent; NaN when no preference is valid.

    Raises:
        ValueError: Sequences of different lengths, or a position outside 0..804.
    """
    predictions = _lc_predictions(
        preferences, model_lengths, baseline_lengths, instruction_positions, inputs
    )
    return _percent_mean(predictions)


def score_annotations(
    annotations: list[dict[str, Any]],
    difficulty_by: Literal["position", "instruction"] = "position",
    inputs: OfflineInputs | None = None,
) -> dict[str, Any]:
    """The leaderboard's columns for one model's annotations (alpaca_eval's format).

    Args:
        annotations: Records with output_1 (baseline), output_2 (model) and preference; also
            instruction, generator_1 and generator_2 where available.
        difficulty_by: "position" looks difficulties up by the record's position in the list,
            as the leaderboard does; "instruction" by the instruction's id in the AlpacaEval
            set, the right lookup for a subset of the instructions.
        inputs: Difficulties and gamed judgements; the shipped fitted values by default.

    Returns:
        win_rate, standard_error, length_controlled_winrate, lc_standard_error, n_total,
        n_wins, n_wins_base, n_draws, discrete_win_rate, avg_length.

    Raises:
        ValueError: No records, a record without a required field, several models, an
            unknown difficulty_by, or (with difficulty_by="instruction") an instruction that is
            not in the AlpacaEval set.
    """
    if difficulty_by not in ("position", "instruction"):
        raise ValueError(
            f"difficulty_by: expected 'position' or 'instruction', got {difficulty_by!r}"
        )
    _check_annotations(annotations)
    model_lengths = [len(a["output_2"] or "") for a in annotations]
    baseline_lengths = [len(a["output_1"] or "") for a in annotations]
    preferences = [a["preference"] for a in annotations]
    if difficulty_by == "instruction":
        positions = _instruction_ids([a.get("instruction", "") for a in annotations])
    else:
        positions = list(range(len(annotations)))
    if annotations[0].get("generator_1", BASELINE) == annotations[0].get("generator_2"):
        lc_predictions = np.full(len(annotations), 0.5)
    else:
        lc_predictions = _lc_predictions(
            preferences, model_lengths, baseline_lengths, positions, inputs
        )
    return {
        **_head_to_head(preferences),
        "length_controlled_winrate": _percent_mean(lc_predictions),
        "lc_standard_error": float(pd.Series(lc_predictions).sem() * 100),
        "avg_length": int(np.mean(model_lengths)),
    }


def _head_to_head(preferences: Sequence[float | None]) -> dict[str, Any]:
    """alpaca_eval's head-to-head counts, as plain Python numbers."""
    records = [{"preference": p} for p in _as_floats(preferences)]
    if not records:
        return {
            **dict.fromkeys(("win_rate", "standard_error", "discrete_win_rate"), float("nan")),
            **dict.fromkeys(("n_wins", "n_wins_base", "n_draws", "n_total"), 0),
        }
    out = get_winrate(records)
    counts = ("n_wins", "n_wins_base", "n_draws", "n_total")
    return {k: int(v) if k in counts else float(v) for k, v in out.items()}


def _percent_mean(values: np.ndarray) -> float:
    """100 x the mean; NaN for no values."""
    return float(100 * values.mean()) if values.size else float("nan")


def _check_annotations(annotations: list[dict[str, Any]]) -> None:
    """Raise ValueError for an empty list, a missing field or several evaluated models."""
    if not annotations:
        raise ValueError("annotations: expected at least one record, got none")
    for i, record in enumerate(annotations):
        missing = [k for k in ("output_1", "output_2", "preference") if k not in record]
        if missing:
            raise ValueError(f"annotations record {i}: missing field(s) {', '.join(missing)}")
    generators = {a.get("generator_2") for a in annotations}
    if len(generators) > 1:
        raise ValueError(
            f"annotations: expected one generator_2, got {sorted(map(str, generators))}"
        )


def _instruction_ids(instructions: list[str]) -> list[int]:
    """Each instruction's id in the AlpacaEval set."""
    lines = (DATA_DIR / "instructions.jsonl").read_text(encoding="utf-8").splitlines()
    ids = {json.loads(line)["instruction"].strip(): i for i, line in enumerate(lines)}
    missing = [i for i, text in enumerate(instructions) if text.strip() not in ids]
    if missing:
        raise ValueError(
            f"annotations record {missing[0]}: instruction {instructions[missing[0]][:60]!r} "
            "is not in the AlpacaEval set"
        )
    return [ids[text.strip()] for text in instructions]


def _as_floats(preferences: Sequence[float | None]) -> list[float]:
    """Preferences as floats, None as NaN."""
    return [float("nan") if p is None else float(p) for p in preferences]


def _soft_labels(preferences: Sequence[float | None]) -> np.ndarray:
    """P(model wins) in [0, 1]: 0 becomes a draw, NaN and out-of-range values NaN."""
    p = np.array(_as_floats(preferences))
    p = np.where(p == 0.0, 1.5, p)
    return np.where((p >= 1.0) & (p <= 2.0), p, np.nan) - 1.0


def _length_feature(baseline_lengths: np.ndarray, model_lengths: np.ndarray) -> np.ndarray:
    """tanh(delta / std(delta)), delta = baseline - model characters; 0 where std is undefined."""
    delta = pd.Series(np.asarray(baseline_lengths, float) - np.asarray(model_lengths, float))
    std = delta.std()
    if not np.isfinite(std) or std == 0:
        return np.zeros(len(delta))
    return np.tanh(delta / std).to_numpy()


def _lc_predictions(
    preferences: Sequence[float | None],
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    positions: Sequence[int],
    inputs: OfflineInputs | None,
) -> np.ndarray:
    """Each row's predicted win probability with the length term at zero (empty: no fit)."""
    labels = _soft_labels(preferences)
    positions = _checked_positions(labels, model_lengths, baseline_lengths, positions)
    if not np.isfinite(labels).any():
        return np.array([])
    inputs = inputs or load_offline_inputs()
    difficulty = inputs.instruction_difficulty[positions]
    model = pd.DataFrame(
        {
            "length": _length_feature(np.asarray(baseline_lengths), np.asarray(model_lengths)),
            "difficulty": difficulty,
            "not_gamed_baseline": 1.0,
            "preference": labels,
        }
    )[np.isfinite(labels)]
    gamed = _gamed_rows(inputs)
    weights = np.r_[np.full(len(gamed), GAMED_WEIGHT), np.ones(len(model))]
    coef = _fit_glm(pd.concat([gamed, model], ignore_index=True), weights).coef_[0]
    return expit(coef[1] * difficulty + coef[2])


def _checked_positions(
    labels: np.ndarray,
    model_lengths: Sequence[int],
    baseline_lengths: Sequence[int],
    positions: Sequence[int],
) -> np.ndarray:
    """Positions as an int array, after checking the inputs line up and are in range."""
    sizes = {len(labels), len(model_lengths), len(baseline_lengths), len(positions)}
    if len(sizes) != 1:
        raise ValueError(
            "preferences, model_lengths, baseline_lengths and instruction_positions: expected "
            f"equal lengths, got {len(labels)}, {len(model_lengths)}, "
            f"{len(baseline_lengths)}, {len(positions)}"
        )
    out = np.asarray(positions, dtype=int).reshape(-1)
    bad = out[(out < 0) | (out >= N_INSTRUCTIONS)]
    if bad.size:
        raise ValueError(f"instruction_positions: expected 0..{N_INSTRUCTIONS - 1}, got {bad[0]}")
    return out


def _gamed_rows(inputs: OfflineInputs) -> pd.DataFrame:
    """The gamed baselines' rows of the GLM (indicator 0), in the fit's column order."""
    frames = []
    for _, rows in inputs.gamed_judgements.groupby("generator_2", sort=False):
        frames.append(
            pd.DataFrame(
                {
                    "length": _length_feature(rows["len_output_1"], rows["len_output_2"]),
                    "difficulty": inputs.instruction_difficulty[rows["index"].to_numpy()],
                    "not_gamed_baseline": 0.0,
                    "preference": rows["preference"].to_numpy() - 1.0,
                }
            )
        )
    return pd.concat(frames, ignore_index=True)


def _fit_glm(train: pd.DataFrame, sample_weight: np.ndarray) -> LogisticRegressionCV:
    """alpaca_eval's CV-tuned L1 logistic fit on soft labels (coefficients in FEATURES order)."""
    # alpaca_eval turns sklearn's metadata routing on globally: keep that inside this call.
    with sklearn.config_context(), warnings.catch_warnings():
        # scikit-learn 1.8-1.9 warn that `penalty` goes in 1.10; alpaca_eval 0.6.6 passes it.
        warnings.simplefilter("ignore", FutureWarning)
        return fit_LogisticRegressionCV(
            train, "preference", is_ytrue_proba=True, sample_weight=sample_weight, n_splits=5
        )


# ---------------------------------------------------------------------------------------------
# Fitted inputs: load, save
# ---------------------------------------------------------------------------------------------


def load_offline_inputs(fitted_dir: Path = FITTED_DIR) -> OfflineInputs:
    """Read the fitted difficulties and gamed judgements.

    Args:
        fitted_dir: Folder holding instruction_difficulty.csv and gamed_judgements.csv.

    Returns:
        The inputs the LC fit needs besides the model's own judgements.

    Raises:
        DataError: A file is missing or does not hold one row per instruction.
    """
    try:
        difficulty = pd.read_csv(fitted_dir / DIFFICULTY_FILE)
        gamed = pd.read_csv(fitted_dir / GAMED_FILE)
    except FileNotFoundError as err:
        raise DataError(f"{err.filename}: missing; run `python -m {__name__} fit`") from err
    if difficulty["index"].tolist() != list(range(N_INSTRUCTIONS)):
        raise DataError(f"{fitted_dir / DIFFICULTY_FILE}: expected index 0..804 in order")
    for name in GAMED_BASELINES:
        if gamed.loc[gamed["generator_2"] == name, "index"].tolist() != list(range(805)):
            raise DataError(f"{fitted_dir / GAMED_FILE}: expected 805 rows for {name}")
    return OfflineInputs(difficulty["instruction_difficulty"].to_numpy(float), gamed)


def save_offline_inputs(inputs: OfflineInputs, fitted_dir: Path = FITTED_DIR) -> None:
    """Write the fitted inputs as CSV, each file replaced atomically.

    Args:
        inputs: What `fit_offline_inputs` returned.
        fitted_dir: Destination folder (created if needed).
    """
    fitted_dir.mkdir(parents=True, exist_ok=True)
    difficulty = pd.DataFrame(
        {"index": range(N_INSTRUCTIONS), "instruction_difficulty": inputs.instruction_difficulty}
    )
    _write_csv(difficulty, fitted_dir / DIFFICULTY_FILE)
    _write_csv(inputs.gamed_judgements, fitted_dir / GAMED_FILE)


def _write_csv(frame: pd.DataFrame, path: Path) -> None:
    """Write a CSV through a temporary file in the same folder, then rename it."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    os.close(fd)
    try:
        frame.to_csv(tmp, index=False, float_format="%.10f")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# ---------------------------------------------------------------------------------------------
# Fitted inputs: estimate from the shipped data
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Shipped:
    """The shipped data the offline fit reads.

    compact: one row per judgement of 55 models, with each row's position in its model's file.
    published: leaderboard rows joined with the published GLM weights (FEATURES columns).
    gamed_lengths: output lengths of the gamed baselines and of gpt4_1106_preview.
    """

    compact: pd.DataFrame
    published: pd.DataFrame
    gamed_lengths: pd.DataFrame


def _load_shipped(data_dir: Path, exclude: Sequence[str] = ()) -> _Shipped:
    """Read the judgements, the leaderboard, the published weights and the output lengths."""
    compact = pd.read_csv(data_dir / "annotations" / "compact_55_models.csv")
    compact["position"] = compact.groupby("generator_2").cumcount()
    compact = compact[~compact["generator_2"].isin(exclude)]
    board = pd.read_csv(
        data_dir / "leaderboard" / "weighted_alpaca_eval_gpt4_turbo_leaderboard.csv", index_col=0
    )
    weights = pd.read_csv(data_dir / "leaderboard" / "lc_glm_weights.csv", index_col=0)
    published = board.join(weights.rename(columns=_WEIGHT_COLUMNS), how="inner")
    published = published.drop(index=[BASELINE, *exclude], errors="ignore")
    return _Shipped(compact, published, _gamed_lengths(data_dir))


def _gamed_lengths(data_dir: Path) -> pd.DataFrame:
    """generator_2, index, len_output_1 (baseline) and len_output_2 for each gamed baseline."""

    def lengths(name: str) -> list[int]:
        text = (data_dir / "model_outputs" / f"{name}.json").read_text(encoding="utf-8")
        return [len(record["output"]) for record in json.loads(text)]

    baseline = lengths(BASELINE)
    frames = [
        pd.DataFrame(
            {
                "generator_2": name,
                "index": range(N_INSTRUCTIONS),
                "len_output_1": baseline,
                "len_output_2": lengths(name),
            }
        )
        for name in GAMED_BASELINES
    ]
    return pd.concat(frames, ignore_index=True)


def fit_offline_inputs(
    data_dir: Path = DATA_DIR,
    exclude: Sequence[str] = (),
    log: Callable[[str], None] | None = print,
) -> OfflineInputs:
    """Estimate the instruction difficulties and the gamed baselines' judgements.

    The method is in the module docstring. Deterministic; about a minute on 2 cores.

    Args:
        data_dir: The shipped AlpacaEval data (annotations/, leaderboard/, model_outputs/).
        exclude: Models whose judgements and leaderboard rows the fit leaves out, to measure
            how it does on models it has not seen.
        log: Where progress lines go; None for silence.

    Returns:
        The fitted inputs (not written; see `save_offline_inputs`).
    """
    say = log or (lambda _: None)
    shipped = _load_shipped(data_dir, exclude)
    start = _initial_difficulty(shipped, say)
    difficulty, gamma = _calibrate(start, shipped, say)
    gamed = shipped.gamed_lengths.copy()
    gamed.insert(2, "preference", 1.0 + _gamed_probabilities(difficulty, gamma, shipped))
    return OfflineInputs(difficulty, gamed)


# Step 1 and 2: joint fit and affine map --------------------------------------------------------


def _initial_difficulty(shipped: _Shipped, say: Callable[[str], None]) -> np.ndarray:
    """Step 1 and 2: the joint fit whose affine-mapped terms best reproduce published LCs."""
    best: tuple[float, np.ndarray] | None = None
    for c in JOINT_C_GRID:
        terms = _joint_difficulty(shipped.compact, c)
        scale, offset = _affine_map(terms, shipped.published)
        mapped = scale * terms + offset
        error = np.abs(_published_lc_errors(mapped, shipped.published)).mean()
        say(
            f"fit steps 1-2 | joint C: {c:.1f} | scale: {scale:.3f} | offset: {offset:.3f} "
            f"| mean LC error: {error:.3f}"
        )
        if best is None or error < best[0]:
            best = (error, mapped)
    assert best is not None
    return best[1]


def _joint_difficulty(compact: pd.DataFrame, c: float) -> np.ndarray:
    """Step 1: per-position terms of one L1 logistic fit over all models' judgements."""
    rows = compact[compact["len_output_2"] != 0]
    codes, _ = pd.factorize(rows["generator_2"])
    n, m = len(rows), codes.max() + 1
    delta = (rows["len_output_1"] - rows["len_output_2"]).astype(float)
    length = np.tanh(delta / delta.groupby(rows["generator_2"]).transform("std")).to_numpy()
    position = rows["position"].to_numpy()
    at = np.arange(n)
    keep = position > 0
    design = sparse.hstack(
        [
            sparse.csr_matrix((length, (at, codes)), shape=(n, m)),
            sparse.csr_matrix((np.ones(n), (at, codes)), shape=(n, m)),
            sparse.csr_matrix(
                (np.ones(keep.sum()), (at[keep], position[keep] - 1)),
                shape=(n, N_INSTRUCTIONS - 1),
            ),
        ]
    ).tocsr()
    labels = rows["preference"].to_numpy() - 1.0
    model = _l1_logistic(c)
    model.fit(
        sparse.vstack([design, design]).tocsr(),
        np.r_[np.ones(n), np.zeros(n)],
        sample_weight=np.r_[labels, 1.0 - labels],
    )
    return np.r_[0.0, model.coef_[0][2 * m :]]


def _l1_logistic(c: float) -> LogisticRegression:
    """alpaca_eval's solver settings (liblinear, L1, no intercept) at a fixed strength."""
    # scikit-learn 1.8 deprecated `penalty`; `l1_ratio=1` is its L1 spelling from then on.
    if LogisticRegression().penalty == "deprecated":
        l1: dict[str, Any] = {"l1_ratio": 1.0}
    else:
        l1 = {"penalty": "l1"}
    return LogisticRegression(C=c, solver="liblinear", fit_intercept=False, random_state=123, **l1)


def _affine_map(terms: np.ndarray, published: pd.DataFrame) -> tuple[float, float]:
    """Step 2: scale and offset that best reproduce the published LCs (least squares)."""
    fit = least_squares(
        lambda so: _published_lc_errors(so[0] * terms + so[1], published), x0=[1.0, 0.0]
    )
    return float(fit.x[0]), float(fit.x[1])


def _published_lc_errors(difficulty: np.ndarray, published: pd.DataFrame) -> np.ndarray:
    """LC from each published GLM with these difficulties, minus the published LC."""
    return _lc_equations(difficulty, published)[0]


def _lc_equations(difficulty: np.ndarray, published: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Published-GLM LC minus published LC per model, and its Jacobian in the difficulties."""
    n = published["n_total"].to_numpy(int)
    slope = published["difficulty"].to_numpy()[:, None]
    rows = np.arange(N_INSTRUCTIONS)[None, :] < n[:, None]
    prob = expit(published["not_gamed_baseline"].to_numpy()[:, None] + slope * difficulty)
    values = 100 * (prob * rows).sum(1) / n - published["length_controlled_winrate"].to_numpy()
    jac = 100 * slope * prob * (1 - prob) * rows / n[:, None]
    return values, jac


# Step 3: calibration ----------------------------------------------------------------------------

_N_PARAMS = N_INSTRUCTIONS + 2 * len(FEATURES)


@dataclass(frozen=True)
class _Block:
    """One generator's rows in a published GLM fit.

    labels: soft labels; None where the rows are a gamed baseline's modelled judgements
    (`gamed` says which).
    """

    length: np.ndarray
    indicator: float
    weight: float
    labels: np.ndarray | None = None
    gamed: int = -1


@dataclass(frozen=True)
class _Term:
    """A model whose published GLM the refit should reproduce; its own rows come last."""

    name: str
    beta: np.ndarray
    lc: float
    blocks: tuple[_Block, ...]


def _gamed_length_features(gamed_lengths: pd.DataFrame) -> list[np.ndarray]:
    """The length feature of each gamed baseline, in GAMED_BASELINES order."""
    return [
        _length_feature(rows["len_output_1"], rows["len_output_2"])
        for name in GAMED_BASELINES
        for rows in [gamed_lengths[gamed_lengths["generator_2"] == name]]
    ]


def _published_terms(shipped: _Shipped) -> list[_Term]:
    """One term per shipped model with a leaderboard row, and one per gamed baseline."""
    lengths = _gamed_length_features(shipped.gamed_lengths)
    regularisers = tuple(_Block(t, 0.0, GAMED_WEIGHT, gamed=g) for g, t in enumerate(lengths))
    owners: list[tuple[str, _Block]] = [
        (name, _Block(t, 1.0, 1.0, gamed=g))
        for g, (name, t) in enumerate(zip(GAMED_BASELINES, lengths, strict=True))
    ]
    for name, rows in shipped.compact.groupby("generator_2", sort=False):
        labels = rows["preference"].to_numpy() - 1.0
        length = _length_feature(rows["len_output_1"], rows["len_output_2"])
        owners.append((str(name), _Block(length, 1.0, 1.0, labels=labels)))
    table = shipped.published
    return [
        _Term(
            name,
            table.loc[name, list(FEATURES)].to_numpy(float),
            float(table.loc[name, "length_controlled_winrate"]),
            (*regularisers, own),
        )
        for name, own in owners
        if name in table.index
    ]


def _block_gradient(
    beta: np.ndarray, block: _Block, theta: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A block's part of the log-likelihood gradient at beta, its Jacobian in theta, Hessian."""
    n = len(block.length)
    x = np.column_stack([block.length, theta[:n], np.full(n, block.indicator)])
    q = expit(x @ beta)
    jac = np.zeros((len(FEATURES), _N_PARAMS))
    slope = -beta[1] * q * (1 - q)
    labels = block.labels
    if labels is None:
        at = N_INSTRUCTIONS + 3 * block.gamed
        own = np.column_stack([x[:, :2], np.ones(n)])
        labels = expit(own @ theta[at : at + 3])
        spread = labels * (1 - labels)
        slope = slope + theta[at + 1] * spread
        jac[:, at : at + 3] = block.weight * (x * spread[:, None]).T @ own
    residual = labels - q
    jac[:, :n] = block.weight * x.T * slope
    jac[1, :n] += block.weight * residual
    hessian = block.weight * (x * (q * (1 - q))[:, None]).T @ x
    return block.weight * x.T @ residual, jac, hessian


def _term_hessian(term: _Term, theta: np.ndarray) -> np.ndarray:
    """The Hessian of the term's weighted log-loss at its published weights."""
    return sum(_block_gradient(term.beta, block, theta)[2] for block in term.blocks)


def _term_strength(term: _Term, theta: np.ndarray) -> float:
    """The L1 strength C that the refit's cross-validation picks for this term's rows."""
    frames, weights = [], []
    for block in term.blocks:
        n = len(block.length)
        labels = block.labels
        if labels is None:
            at = N_INSTRUCTIONS + 3 * block.gamed
            x = np.column_stack([block.length, theta[:n], np.ones(n)])
            labels = expit(x @ theta[at : at + 3])
        columns = (block.length, theta[:n], np.full(n, block.indicator), labels)
        frames.append(pd.DataFrame(dict(zip((*FEATURES, "preference"), columns, strict=True))))
        weights.append(np.full(n, block.weight))
    return float(_fit_glm(pd.concat(frames, ignore_index=True), np.concatenate(weights)).C_[0])


def _term_residuals(
    term: _Term, theta: np.ndarray, hessian_inv: np.ndarray, strength: float
) -> tuple[np.ndarray, np.ndarray]:
    """Newton step from the published weights to the refit's L1 optimum, and its LC error."""
    parts = [_block_gradient(term.beta, block, theta) for block in term.blocks]
    # liblinear's optimum: gradient of the weighted log-likelihood = sign(weights) / C.
    gradient = sum(p[0] for p in parts) - np.sign(term.beta) / strength
    step = hessian_inv @ gradient
    step_jac = hessian_inv @ sum(p[1] for p in parts)
    n = len(term.blocks[-1].length)
    prob = expit(term.beta[2] + term.beta[1] * theta[:n])
    spread = prob * (1 - prob)
    lc_grad = 100 * np.array([0.0, (spread * theta[:n]).mean(), spread.mean()])
    lc_value = 100 * prob.mean() - term.lc + lc_grad @ step
    lc_jac = lc_grad @ step_jac
    lc_jac[:n] += 100 * term.beta[1] * spread / n
    values = np.r_[COEFFICIENT_SCALE * step, lc_value]
    return values, np.vstack([COEFFICIENT_SCALE * step_jac, lc_jac])


def _gamed_win_rate_residuals(
    theta: np.ndarray, lengths: list[np.ndarray], win_rates: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Modelled minus published WR of each gamed baseline, with its Jacobian."""
    values, jac = np.zeros(len(lengths)), np.zeros((len(lengths), _N_PARAMS))
    for g, length in enumerate(lengths):
        at = N_INSTRUCTIONS + 3 * g
        x = np.column_stack([length, theta[:N_INSTRUCTIONS], np.ones(N_INSTRUCTIONS)])
        prob = expit(x @ theta[at : at + 3])
        spread = prob * (1 - prob)
        values[g] = 100 * prob.mean() - win_rates[g]
        jac[g, :N_INSTRUCTIONS] = 100 * theta[at + 1] * spread / N_INSTRUCTIONS
        jac[g, at : at + 3] = 100 * (x * spread[:, None]).mean(0)
    return values, jac


def _calibration_residuals(
    theta: np.ndarray,
    start: np.ndarray,
    shipped: _Shipped,
    terms: list[_Term],
    hessians_inv: list[np.ndarray],
    strengths: list[float],
) -> tuple[np.ndarray, np.ndarray]:
    """All of step 3's residuals and their Jacobian."""
    lc_values, lc_jac = _lc_equations(theta[:N_INSTRUCTIONS], shipped.published)
    parts = [(lc_values, np.hstack([lc_jac, np.zeros((len(lc_values), 6))]))]
    win_rates = shipped.published.loc[list(GAMED_BASELINES), "win_rate"].to_numpy()
    lengths = _gamed_length_features(shipped.gamed_lengths)
    parts.append(_gamed_win_rate_residuals(theta, lengths, win_rates))
    parts += [
        _term_residuals(*args, strength)
        for *args, strength in zip(
            terms, [theta] * len(terms), hessians_inv, strengths, strict=True
        )
    ]
    prior_jac = np.hstack([np.eye(N_INSTRUCTIONS), np.zeros((N_INSTRUCTIONS, 6))]) / PRIOR_SD
    parts.append(((theta[:N_INSTRUCTIONS] - start) / PRIOR_SD, prior_jac))
    return np.concatenate([p[0] for p in parts]), np.vstack([p[1] for p in parts])


def _calibrate(
    start: np.ndarray, shipped: _Shipped, say: Callable[[str], None]
) -> tuple[np.ndarray, np.ndarray]:
    """Step 3: difficulties and gamed-baseline models that make refits match the leaderboard."""
    terms = _published_terms(shipped)
    gamma = shipped.published.loc[list(GAMED_BASELINES), list(FEATURES)].to_numpy(float)
    theta = np.r_[start, gamma.ravel()]
    for done in range(1, CALIBRATION_ROUNDS + 1):
        hessians_inv = [np.linalg.inv(_term_hessian(t, theta)) for t in terms]
        strengths = [_term_strength(t, theta) for t in terms]
        values, jacobian = _memoised(
            lambda th, h=hessians_inv, c=strengths: _calibration_residuals(
                th, start, shipped, terms, h, c
            )
        )
        fit = least_squares(values, theta, jac=jacobian, xtol=1e-10, ftol=1e-10, max_nfev=100)
        theta = fit.x
        say(
            f"fit step 3 round {done}/{CALIBRATION_ROUNDS} | cost: {2 * fit.cost:.2f} "
            f"| evaluations: {fit.nfev} | difficulty moved (sd): "
            f"{np.std(theta[:N_INSTRUCTIONS] - start):.3f}"
        )
    return theta[:N_INSTRUCTIONS], theta[N_INSTRUCTIONS:].reshape(2, 3)


def _memoised(
    fn: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
) -> tuple[Callable[[np.ndarray], np.ndarray], Callable[[np.ndarray], np.ndarray]]:
    """Split a (values, jacobian) function in two that share one evaluation per point."""
    cache: dict[bytes, tuple[np.ndarray, np.ndarray]] = {}

    def both(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        key = theta.tobytes()
        if key not in cache:
            cache.clear()
            cache[key] = fn(theta)
        return cache[key]

    return (lambda th: both(th)[0]), (lambda th: both(th)[1])


def _gamed_probabilities(
    difficulty: np.ndarray, gamma: np.ndarray, shipped: _Shipped
) -> np.ndarray:
    """The gamed baselines' modelled P(win), in gamed_lengths row order."""
    lengths = _gamed_length_features(shipped.gamed_lengths)
    return np.concatenate(
        [
            expit(np.column_stack([t, difficulty, np.ones(N_INSTRUCTIONS)]) @ gamma[g])
            for g, t in enumerate(lengths)
        ]
    )


# ---------------------------------------------------------------------------------------------
# Check against the leaderboard, and the command line
# ---------------------------------------------------------------------------------------------


def leaderboard_check(
    inputs: OfflineInputs | None = None, data_dir: Path = DATA_DIR
) -> pd.DataFrame:
    """WR and LC of every shipped model that has a leaderboard row, next to the leaderboard's.

    Args:
        inputs: Difficulties and gamed judgements; the shipped fitted values by default.
        data_dir: The shipped AlpacaEval data.

    Returns:
        One row per model: n, win_rate, win_rate_leaderboard, win_rate_error, lc,
        lc_leaderboard, lc_error.
    """
    inputs = inputs or load_offline_inputs()
    shipped = _load_shipped(data_dir)
    rows = []
    for name, group in shipped.compact.groupby("generator_2", sort=False):
        if name not in shipped.published.index:
            continue
        preferences = group["preference"].tolist()
        lc = length_controlled_win_rate(
            preferences, group["len_output_2"], group["len_output_1"], range(len(group)), inputs
        )
        board = shipped.published.loc[name]
        rows.append(
            {
                "model": name,
                "n": len(group),
                "win_rate": win_rate(preferences),
                "win_rate_leaderboard": board["win_rate"],
                "lc": lc,
                "lc_leaderboard": board["length_controlled_winrate"],
            }
        )
    frame = pd.DataFrame(rows).set_index("model")
    frame["win_rate_error"] = frame["win_rate"] - frame["win_rate_leaderboard"]
    frame["lc_error"] = frame["lc"] - frame["lc_leaderboard"]
    return frame


def _print_check(check: pd.DataFrame) -> None:
    """The per-model table, then one summary line."""
    print(check.round(3).to_string())
    lc_error = check["lc_error"].abs()
    print(
        f"check | models: {len(check)} | WR max |error|: {check['win_rate_error'].abs().max():.2e} "
        f"| LC mean |error|: {lc_error.mean():.3f} | LC max |error|: {lc_error.max():.3f} "
        f"({lc_error.idxmax()})"
    )


def main(argv: Sequence[str] | None = None) -> None:
    """`fit`: re-estimate and rewrite the fitted inputs, then check; `check`: check only."""
    parser = argparse.ArgumentParser(
        prog="python -m dice_core.alpaca_metrics",
        description="AlpacaEval 2 WR and LC offline: fit the missing inputs, check them.",
    )
    parser.add_argument("command", choices=("fit", "check"))
    parser.add_argument("--data-dir", type=Path, default=DATA_DIR, help="shipped AlpacaEval data")
    parser.add_argument("--fitted-dir", type=Path, default=FITTED_DIR, help="fitted CSV folder")
    parser.add_argument(
        "--exclude", default="", help="fit: comma-separated models to leave out (a hold-out)"
    )
    args = parser.parse_args(argv)
    if args.command == "fit":
        exclude = [name for name in args.exclude.split(",") if name]
        save_offline_inputs(fit_offline_inputs(args.data_dir, exclude), args.fitted_dir)
        print(f"wrote {args.fitted_dir / DIFFICULTY_FILE} and {args.fitted_dir / GAMED_FILE}")
    _print_check(leaderboard_check(load_offline_inputs(args.fitted_dir), args.data_dir))


if __name__ == "__main__":
    main()
