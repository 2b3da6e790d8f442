"""Input files: prompts, offline pairs and the AlpacaEval set, read with checked records.

A `builtin:` path names a file shipped in `dice_core/data` (UltraFeedback pairs, AlpacaEval).
Every reader names the file, the line and the field when a record is malformed.
"""

from __future__ import annotations

import hashlib
import json
import random
from pathlib import Path
from typing import Any

from dice_core.errors import DataError

DATA_DIR = Path(__file__).parent / "data"
ALPACA_DIR = DATA_DIR / "alpaca_eval"
BUILTIN = "builtin:"


def resolve_path(path: str) -> Path:
    """A filesystem path for a data reference (`builtin:NAME` or a plain path)."""
    if path.startswith(BUILTIN):
        return DATA_DIR / path.removeprefix(BUILTIN)
    return Path(path).expanduser()


def read_jsonl(
    path: str | Path, fields: dict[str, type | tuple[type, ...]]
) -> list[dict[str, Any]]:
    """Read a JSONL file whose records must carry `fields` with the given types.

    Args:
        path: The file (or `builtin:NAME`).
        fields: Required field names and their expected types.

    Returns:
        The records, in file order.

    Raises:
        DataError: Missing file, bytes that are not UTF-8, invalid JSON, a record that is not
            an object, a missing or mistyped field, or no record at all; the message names
            file, line and field.
    """
    return [record for _, record in numbered_records(path, fields)]


def numbered_records(path: str | Path, fields: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """(line number, record) for every non-blank line of a JSONL file, each record checked.

    Raises:
        DataError: As `read_jsonl`.
    """
    file = resolve_path(str(path))
    if not file.is_file():
        raise DataError(f"{path}: file not found")
    records = []
    with file.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as error:
                raise DataError(
                    f"{file}: line {number}: not UTF-8 text (byte {error.start + 1})"
                ) from None
            if line.strip():
                records.append((number, _parse_line(file, number, line, fields)))
    if not records:
        raise DataError(f"{path}: no records (expected JSON lines with {', '.join(fields)})")
    return records


def _parse_line(file: Path, number: int, line: str, fields: dict[str, Any]) -> dict[str, Any]:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as error:
        raise DataError(f"{file}: line {number}: invalid JSON ({error.msg})") from None
    if not isinstance(record, dict):
        raise DataError(
            f"{file}: line {number}: expected a JSON object, got {type(record).__name__}"
        )
    for name, kind in fields.items():
        if name not in record:
            raise DataError(f"{file}: line {number}: missing field `{name}`")
        if not isinstance(record[name], kind):
            expected = (
                kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            )
            raise DataError(
                f"{file}: line {number}: field `{name}` must be {expected}, "
                f"got {type(record[name]).__name__}"
            )
    return record


def prompt_id(prompt: str) -> str:
    """A stable id for a prompt without one: the first 12 hex digits of its SHA-256."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def load_prompts(path: str) -> list[dict[str, str]]:
    """Prompt records `{prompt_id, prompt}`; an empty prompt text is an error.

    Raises:
        DataError: As `read_jsonl`, or a prompt that is blank.
    """
    prompts = []
    for number, record in numbered_records(path, {"prompt": str}):
        if not record["prompt"].strip():
            raise DataError(f"{path}: line {number}: field `prompt` is empty")
        pid = str(record.get("prompt_id") or prompt_id(record["prompt"]))
        prompts.append({"prompt_id": pid, "prompt": record["prompt"]})
    return prompts


def load_pairs(path: str) -> list[dict[str, Any]]:
    """Offline preference pairs `{prompt, chosen, rejected}`.

    Raises:
        DataError: As `read_jsonl`.
    """
    records = read_jsonl(path, {"prompt": str, "chosen": str, "rejected": str})
    return [
        {"prompt": r["prompt"], "chosen": r["chosen"], "rejected": r["rejected"]} for r in records
    ]


def load_alpaca_instructions() -> list[dict[str, str]]:
    """The 805 AlpacaEval instructions in the official order."""
    return read_jsonl(ALPACA_DIR / "instructions.jsonl", {"instruction": str, "dataset": str})


def load_model_outputs(path: str | Path) -> list[dict[str, Any]]:
    """An alpaca_eval outputs file: a JSON list of `{instruction, output, generator}`.

    Raises:
        DataError: Not a JSON list, or a record without `instruction` / `output` strings.
    """
    file = Path(path)
    if not file.is_file():
        raise DataError(f"{path}: file not found")
    try:
        records = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise DataError(f"{path}: invalid JSON at line {error.lineno} ({error.msg})") from None
    except UnicodeDecodeError as error:
        raise DataError(f"{path}: not UTF-8 text (byte {error.start})") from None
    if not isinstance(records, list) or not records:
        raise DataError(f"{path}: expected a non-empty JSON list of outputs")
    for number, record in enumerate(records):
        for name in ("instruction", "output"):
            if not isinstance(record, dict) or not isinstance(record.get(name), str):
                raise DataError(f"{path}: record {number}: field `{name}` must be a string")
    return records


def baseline_outputs() -> list[dict[str, Any]]:
    """GPT-4 Turbo's outputs, the AlpacaEval 2 baseline, in instruction order."""
    return load_model_outputs(ALPACA_DIR / "model_outputs" / "gpt4_1106_preview.json")


def draw_round_prompts(
    pool: list[dict[str, str]], round_: int, per_round: int, seed: int, fresh: bool = False
) -> list[dict[str, str]]:
    """The prompts of round `round_` (1-based): one seeded shuffle of the pool, cut into
    consecutive slices. With `fresh`, round t takes slice t, so no prompt serves two rounds;
    otherwise every round takes the first slice.

    Raises:
        DataError: The pool has fewer prompts than the rounds up to this one need.
    """
    order = list(range(len(pool)))
    random.Random(seed).shuffle(order)
    slot = round_ - 1 if fresh else 0
    start, stop = slot * per_round, (slot + 1) * per_round
    if stop > len(pool):
        raise DataError(
            f"round {round_} needs prompts {start + 1}..{stop} of the pool, which holds "
            f"{len(pool)} usable prompts; lower data.prompts_per_round or add prompts"
        )
    return [pool[i] for i in order[start:stop]]


def sample_pairs(
    pairs: list[dict[str, Any]], count: int, seed: int, max_chars: int | None = None
) -> list[dict[str, Any]]:
    """A seeded sample of `count` pairs, optionally among those whose prompt, chosen and
    rejected together are at most `max_chars` characters.

    Raises:
        DataError: Fewer eligible pairs than asked for.
    """
    eligible = [
        p
        for p in pairs
        if max_chars is None
        or len(p["prompt"]) + len(p["chosen"]) + len(p["rejected"]) <= max_chars
    ]
    if len(eligible) < count:
        raise DataError(
            f"asked for {count} pairs but only {len(eligible)} are eligible"
            + (f" under {max_chars} characters" if max_chars else "")
        )
    return random.Random(seed).sample(eligible, count)
