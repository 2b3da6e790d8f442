"""AlpacaEval 2: the model answers the instructions, a judge compares each answer with GPT-4
Turbo's, and WR / LC are computed as the leaderboard does.

Files use alpaca_eval's formats: outputs are a JSON list of `{instruction, output, generator,
dataset}`, annotations carry `output_1` (baseline), `output_2` (model) and `preference`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dice_core.alpaca_metrics import length_controlled_win_rate, win_rate
from dice_core.config import EvaluationConfig, GenerationConfig
from dice_core.data import baseline_outputs, load_alpaca_instructions
from dice_core.errors import DataError
from dice_core.generation import make_engine
from dice_core.judge import annotate, make_judge

BASELINE = "gpt4_1106_preview"


def instruction_subset(config: EvaluationConfig) -> list[dict[str, Any]]:
    """The first N AlpacaEval instructions with their position and the baseline's output."""
    instructions = load_alpaca_instructions()
    baseline = baseline_outputs()
    count = config.num_instructions or len(instructions)
    return [
        {"position": i, **instructions[i], "baseline": baseline[i]["output"]}
        for i in range(min(count, len(instructions)))
    ]


def answer_instructions(
    model_dir: Path,
    subset: list[dict[str, Any]],
    config: EvaluationConfig,
    generation: GenerationConfig,
    generator: str,
    dtype: str = "float32",
    progress: Callable[[int, int], None] | None = None,
) -> list[dict[str, Any]]:
    """The model's outputs, one per instruction, in alpaca_eval's outputs format."""
    engine = make_engine(model_dir, generation, dtype)
    completions = engine.complete(
        [item["instruction"] for item in subset],
        n=1,
        max_new_tokens=config.max_new_tokens,
        temperature=config.temperature,
        top_p=config.top_p,
        seed=config.seed,
        progress=progress,
    )
    return [
        {
            "instruction": item["instruction"],
            "output": samples[0].text,
            "generator": generator,
            "dataset": item["dataset"],
            "finish_reason": samples[0].finish_reason,
        }
        for item, samples in zip(subset, completions, strict=True)
    ]


def align_outputs(
    outputs: list[dict[str, Any]], subset: list[dict[str, Any]], source: str = "outputs"
) -> list[dict[str, Any]]:
    """The records of an outputs file that answer the evaluated instructions, in their order.

    Records are matched by instruction (whitespace at the ends ignored), as alpaca_eval
    matches them, so a file in another order, or with more instructions, is fine; an
    instruction asked twice takes the file's records for it in turn.

    Raises:
        DataError: An evaluated instruction has no record in the file.
    """
    by_instruction: dict[str, list[dict[str, Any]]] = {}
    for record in outputs:
        by_instruction.setdefault(record["instruction"].strip(), []).append(record)
    aligned = []
    for item in subset:
        records = by_instruction.get(item["instruction"].strip())
        if not records:
            raise DataError(
                f"{source}: no record answers AlpacaEval instruction {item['position']} "
                f"({item['instruction'][:60]!r}); the evaluation needs the first "
                f"{len(subset)} instructions"
            )
        aligned.append(records.pop(0))
    return aligned


def judge_and_score(
    outputs: list[dict[str, Any]],
    subset: list[dict[str, Any]],
    config: EvaluationConfig,
    sft_model_dir: Path | None,
    cache_dir: Path | None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Judge each output against the baseline and compute the leaderboard's metrics.

    Returns:
        The annotations (alpaca_eval format) and the scores.
    """
    outputs = align_outputs(outputs, subset)
    judge = make_judge(config.judge, sft_model_dir, cache_dir)
    generator = outputs[0].get("generator", "model")
    annotations = annotate(
        [item["instruction"] for item in subset],
        [o["output"] for o in outputs],
        [item["baseline"] for item in subset],
        judge,
        seed=config.judge.seed,
        generator=generator,
        baseline_generator=BASELINE,
    )
    return annotations, scores(annotations, subset, config)


def scores(
    annotations: list[dict[str, Any]], subset: list[dict[str, Any]], config: EvaluationConfig
) -> dict[str, Any]:
    """WR and LC as the leaderboard computes them, with what they were computed on."""
    preferences = [a["preference"] for a in annotations]
    model_lengths = [len(a["output_2"]) for a in annotations]
    baseline_lengths = [len(a["output_1"]) for a in annotations]
    positions = [item["position"] for item in subset]
    judge = config.judge
    return {
        "win_rate": win_rate(preferences),
        "length_controlled_winrate": length_controlled_win_rate(
            preferences, model_lengths, baseline_lengths, positions
        ),
        "n_total": len(annotations),
        "avg_length": sum(model_lengths) / max(len(model_lengths), 1),
        "judge": f"{judge.kind}:{judge.model}",
        "comparable_to_leaderboard": judge.kind == "openai"
        and judge.model == "gpt-4-1106-preview"
        and len(annotations) == 805,
    }
