"""`dice bench`: each engine against its plain baseline, measured in one run on the same inputs.

dice bench generation|scoring|alpha|training|dpo      one part (recipe: cpu-smollm2)
dice bench overhead --store DIR --run-id ID           a finished run's rounds: time outside stages
dice bench all [--store DIR --run-id ID]              every part, then one table of ratios
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dice_core.config import Recipe
from dice_core.errors import DiceError

PARTS = ("generation", "scoring", "alpha", "training", "dpo", "overhead")
# Without a finished run to read a round's wall time from, the alpha search's share of a
# round is given against this many seconds.
ASSUMED_ROUND_SECONDS = 3600.0
# One row of the closing table: part, what is compared, ours, the baseline, ours vs baseline.
Row = tuple[str, str, str, str, str]


def run_bench(args: argparse.Namespace, recipe: Recipe) -> None:
    """Run the part named by `args.part` (or every part) and print its figures."""
    parts = [args.part] if args.part != "all" else [p for p in PARTS if p != "overhead"]
    if args.part == "all" and args.run_id:
        parts.append("overhead")
    if "overhead" in parts and not args.run_id:
        raise DiceError("dice bench overhead needs --run-id (and --store unless the default)")
    rows: list[Row] = []
    for part in parts:
        print(f"\n=== {part}")
        rows += BENCHES[part](args, recipe)
    if args.part == "all":
        print("\n=== summary (all parts measured in this run)")
        print(summary_table(rows))


# ---------------------------------------------------------------------------------- parts
def _generation(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    from dice_core.data import load_prompts
    from dice_core.generation import benchmark_generation

    prompts = sorted((p["prompt"] for p in load_prompts(recipe.data.prompts)), key=len)
    # By default as many prompts as fill the engine's batch with their samples, as in a round.
    config = recipe.generation
    count = args.count or -(-config.batch_size // config.samples_per_prompt)
    result = benchmark_generation(_model(recipe), prompts[:count], config)
    _print_values(result)
    return [
        (
            "generation",
            "new tokens/s: engine vs one-prompt generate",
            f"{result['engine_tokens_per_s']:.1f}",
            f"{result['generate_tokens_per_s']:.1f}",
            f"{result['speedup_vs_generate']:.2f}x",
        )
    ]


def _scoring(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    from dice_core.rewards import SUMS_ATOL, SUMS_RTOL, benchmark_scoring

    pairs = _offline_pairs(recipe, max(1, args.samples // 2), args.max_chars)
    rows = [{"prompt": p["prompt"], "response": p[side]} for p in pairs for side in SIDES]
    r = benchmark_scoring(_model(recipe), rows, recipe.rewards, args.stretch)
    long = f"x{r['stretch']}"
    print(
        f"{r['samples']} UltraFeedback responses | real tokens: {r['real_tokens_x1']} "
        f"(batched pads to {r['padded_tokens_x1']}) | x{r['stretch']} responses: "
        f"{r[f'real_tokens_{long}']} | batch_tokens: {recipe.rewards.batch_tokens} | "
        f"vocab_chunk: {recipe.rewards.vocab_chunk}"
    )
    print(
        "peak memory: each scorer runs in a fresh process that loads the model, warms up on one "
        "sample, resets the kernel's peak RSS (/proc/self/clear_refs) and reads VmHWM after "
        "scoring: MB above the loaded model"
    )
    header = (
        f"{'scorer':<16} {'seconds':>8} {'samples/s':>9} {'tokens/s':>9} "
        f"{'peak MB':>8} {'logits MB':>9} | {long} {'tokens/s':>9} {'peak MB':>8} {'logits MB':>9}"
    )
    print(header)
    for scorer in ("batched", "one_per_forward"):
        x1, xn = f"{scorer}_x1", f"{scorer}_{long}"
        print(
            f"{scorer:<16} {r[x1 + '_seconds']:>8.1f} {r[x1 + '_samples_per_s']:>9.2f} "
            f"{_memory_cells(r, x1)} | {' ' * len(long)} {_memory_cells(r, xn)}"
        )
    print(
        "(logits MB: the largest fp32 logits block each scorer holds by construction: at most "
        "4,096 tokens x vocab_chunk for the batched one, 2 x sequence x vocabulary for the plain)"
    )
    verdict = "yes" if r["sums_match"] else "NO"
    print(
        f"same sums: max |diff| {r['max_abs_diff']:.2e}, max relative {r['max_rel_diff']:.2e}; "
        f"within {SUMS_ATOL:g} + {SUMS_RTOL:g} x |sum|: {verdict}"
    )
    return [
        (
            "scoring",
            "real tokens/s: batched vs one per forward",
            f"{r['batched_x1_tokens_per_s']:.1f}",
            f"{r['one_per_forward_x1_tokens_per_s']:.1f}",
            f"{r['speedup_batched_over_one_per_forward']:.2f}x",
        ),
        (
            "scoring",
            f"peak MB x1 -> {long} length: batched vs plain",
            f"{r['batched_x1_peak_mb']:.0f} -> {r[f'batched_{long}_peak_mb']:.0f}",
            f"{r['one_per_forward_x1_peak_mb']:.0f} -> {r[f'one_per_forward_{long}_peak_mb']:.0f}",
            f"sums match: {verdict}",
        ),
    ]


def _alpha(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    from dice_core.pairs import benchmark_alpha_search

    r = benchmark_alpha_search(args.prompts, args.k, args.seed, recipe.pairs)
    round_seconds, source = _round_seconds(args)
    identical = r["identical_alpha"] and r["identical_curve"] and r["identical_pairs"]
    print(
        f"{r['prompts']} prompts x {r['samples']} samples (synthetic, seed {args.seed}) | "
        f"grid points visited: {r['grid_points']} | alpha*: {r['alpha']:.3f} | "
        f"gap: {r['gap']:.2f}"
    )
    print(
        f"vectorised: {r['vectorised_seconds']:.3f} s | grid loop: {r['loop_seconds']:.3f} s | "
        f"loop / vectorised: {r['ratio_loop_over_vectorised']:.1f}"
    )
    print(
        f"identical alpha*: {r['identical_alpha']} | curve: {r['identical_curve']} | "
        f"chosen and rejected: {r['identical_pairs']}"
    )
    share = r["vectorised_seconds"] / round_seconds
    print(
        f"share of a round ({round_seconds:.0f} s, {source}): vectorised {share:.2e}, "
        f"grid loop {r['loop_seconds'] / round_seconds:.2e}"
    )
    return [
        (
            "alpha",
            f"seconds, {r['prompts']} x {r['samples']}: vectorised vs grid loop",
            f"{r['vectorised_seconds']:.3f}",
            f"{r['loop_seconds']:.3f}",
            f"{r['ratio_loop_over_vectorised']:.1f}x",
        ),
        (
            "alpha",
            f"identical; share of a round ({source})",
            f"{share:.2e}",
            f"{r['loop_seconds'] / round_seconds:.2e}",
            "identical" if identical else "DIFFERENT",
        ),
    ]


def _training(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    from dice_core.training import benchmark_reference_reuse

    pairs = _offline_pairs(recipe, args.count or 4, recipe.round0.max_pair_chars)
    config = recipe.training.model_copy(update={"max_steps": args.steps or 2})
    with tempfile.TemporaryDirectory(prefix="dice-bench-") as scratch:
        result = benchmark_reference_reuse(_model(recipe), pairs, config, Path(scratch))
    _print_values(result)
    return [
        (
            "training",
            "DPO seconds: supplied vs computed reference",
            f"{result['supplied_seconds']:.1f}",
            f"{result['computed_seconds']:.1f}",
            f"{result['ratio_computed_over_supplied']:.2f}x",
        )
    ]


def _dpo(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    from dice_core.training import benchmark_against_trl, build_launch_plan

    config = recipe.training.model_copy(update={"max_steps": args.steps or 3})
    count = args.count or build_launch_plan(config).global_batch
    pairs = _offline_pairs(recipe, count, recipe.round0.max_pair_chars)
    with tempfile.TemporaryDirectory(prefix="dice-bench-") as scratch:
        r = benchmark_against_trl(_model(recipe), pairs, config, Path(scratch))
    print("TRL DPOConfig defaults, read from the installed package:")
    for key, value in r["trl_defaults"].items():
        print(f"  {key}: {value}")
    print(
        f"pairs: {r['pairs']} | global batch: {r['global_batch']} | steps: {config.max_steps} | "
        f"max_length: {config.max_length} | lr: {config.learning_rate:g} (linear decay, as TRL's) "
        f"| ours: fp32, supplied reference, gradient checkpointing "
        f"{'on' if config.gradient_checkpointing else 'off'}"
    )
    names = {"ours": "ours", "trl": "TRL defaults", "trl_fp32": "TRL, bf16 off"}
    print(f"{'':<14} {'tokens':>7} {'seconds':>8} {'tokens/s':>9}")
    for key, name in names.items():
        print(
            f"{name:<14} {r[key + '_tokens']:>7} {r[key + '_seconds']:>8.1f} "
            f"{r[key + '_tokens_per_s']:>9.1f}"
        )
    print(
        f"ours / TRL defaults tokens/s: {r['ratio_ours_over_trl']:.2f} | ours / TRL with bf16 "
        f"off: {r['ratio_ours_over_trl_fp32']:.2f}"
    )
    print(f"{'step':>4} {'ours':>10} {'TRL, bf16 off':>14} {'diff':>9} {'TRL defaults':>13}")
    losses = zip(r["ours_losses"], r["trl_fp32_losses"], r["trl_losses"], strict=True)
    for step, (ours, fp32, default) in enumerate(losses, 1):
        print(f"{step:>4} {ours:>10.5f} {fp32:>14.5f} {ours - fp32:>9.2e} {default:>13.5f}")
    verdict = "within" if r["max_loss_diff_trl_fp32"] <= DPO_LOSS_TOLERANCE else "OUTSIDE"
    print(
        f"max |loss diff| against TRL with bf16 off: {r['max_loss_diff_trl_fp32']:.2e} "
        f"({verdict} tolerance {DPO_LOSS_TOLERANCE:g}); against TRL's defaults (bf16 "
        f"autocast): {r['max_loss_diff_trl']:.2e}"
    )
    return [
        (
            "dpo",
            "train tokens/s: ours vs TRL DPOConfig defaults",
            f"{r['ours_tokens_per_s']:.1f}",
            f"{r['trl_tokens_per_s']:.1f}",
            f"{r['ratio_ours_over_trl']:.2f}x",
        ),
        (
            "dpo",
            f"max |loss diff| over {config.max_steps} steps vs TRL, bf16 off",
            f"{r['max_loss_diff_trl_fp32']:.2e}",
            f"tol {DPO_LOSS_TOLERANCE:g}",
            verdict,
        ),
    ]


def _overhead(args: argparse.Namespace, recipe: Recipe) -> list[Row]:
    rounds = _run_rounds(args)
    print(
        "per round: the flow's wall time (recorded by the round flow itself, first line to last) "
        "minus the stage bodies that ran in it (their records' seconds); the rest is Prefect's "
        "task runs, store checks and bookkeeping (clearing, hashing files), and the report"
    )
    print(f"{'round':>5} {'flow s':>8} {'stages s':>9} {'other s':>8} {'share':>7}  stages")
    rows: list[Row] = []
    for r in rounds:
        skipped = f" (skipped: {', '.join(r['stages_skipped'])})" if r["stages_skipped"] else ""
        print(
            f"{r['round']:>5} {r['flow_seconds']:>8.1f} {r['stage_seconds']:>9.1f} "
            f"{r['overhead_seconds']:>8.1f} {r['overhead_share']:>7.1%}  "
            f"{', '.join(r['stages_run'])}{skipped}"
        )
        rows.append(
            (
                "overhead",
                f"round {r['round']}: outside stage bodies vs flow wall",
                f"{r['overhead_seconds']:.1f} s",
                f"{r['flow_seconds']:.1f} s",
                f"{r['overhead_share']:.1%}",
            )
        )
    return rows


BENCHES: dict[str, Callable[[argparse.Namespace, Recipe], list[Row]]] = {
    "generation": _generation,
    "scoring": _scoring,
    "alpha": _alpha,
    "training": _training,
    "dpo": _dpo,
    "overhead": _overhead,
}
SIDES = ("chosen", "rejected")
# Largest step-by-step difference accepted between our DPO losses and TRL's at the same
# precision (fp32): the same forward passes in another order of summation, measured at 2e-6
# after one update. TRL's defaults autocast to bf16, whose rounding changes the updates
# themselves: after one step their loss differs from any fp32 run's by about 0.2, so that
# curve is printed beside ours but not held to a tolerance.
DPO_LOSS_TOLERANCE = 1e-4


# ------------------------------------------------------------------------------- helpers
def _model(recipe: Recipe) -> Path:
    from dice_core.models import resolve_model

    return resolve_model(recipe.models.sft, Path.home() / ".cache" / "dice" / "models")


def _offline_pairs(recipe: Recipe, count: int, max_chars: int | None) -> list[dict]:
    from dice_core.data import load_pairs, sample_pairs

    return sample_pairs(load_pairs(recipe.data.offline_pairs), count, recipe.data.seed, max_chars)


def _run_rounds(args: argparse.Namespace) -> list[dict[str, Any]]:
    """`run_overheads` of the run named by --store and --run-id."""
    from dice_core.manifest import run_overheads
    from flows.common import DEFAULT_STORE
    from tasks.common import open_store

    rounds = run_overheads(open_store(args.store or DEFAULT_STORE), args.run_id)
    if not rounds:
        raise DiceError(
            f"run {args.run_id} has no round records (runs record their rounds' wall time "
            "since the round flow writes round.json): nothing to measure"
        )
    return rounds


def _round_seconds(args: argparse.Namespace) -> tuple[float, str]:
    """A round's wall time: the mean of the DICE rounds of the given run, else the assumption."""
    if args.round_seconds:
        return args.round_seconds, "given by --round-seconds"
    if not args.run_id:
        return ASSUMED_ROUND_SECONDS, "assumed: no run given"
    rounds = _run_rounds(args)
    dice_rounds = [r for r in rounds if r["round"] >= 1] or rounds
    seconds = sum(r["flow_seconds"] for r in dice_rounds) / len(dice_rounds)
    names = ", ".join(str(r["round"]) for r in dice_rounds)
    return seconds, f"mean of round {names} of run {args.run_id}"


def _memory_cells(result: dict[str, Any], prefix: str) -> str:
    """Tokens/s, peak MB and logits MB of one scorer at one length."""
    return (
        f"{result[prefix + '_tokens_per_s']:>9.1f} {result[prefix + '_peak_mb']:>8.0f} "
        f"{result[prefix + '_logits_mb']:>9.0f}"
    )


def _print_values(result: dict[str, Any]) -> None:
    for key, value in result.items():
        print(f"{key}: {value:.4f}" if isinstance(value, float) else f"{key}: {value}")


def summary_table(rows: list[Row]) -> str:
    """The closing table: part, what is compared, ours, the baseline, ours vs baseline."""
    header: Row = ("part", "measured", "ours", "baseline", "ours vs baseline")
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        " | ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)
