"""What every stage task shares: the run context, resumable stage execution, artifacts, logs."""

from __future__ import annotations

import logging
import platform
import re
import socket
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.exceptions import MissingContextError

import dice_core
from dice_core.config import Recipe
from dice_core.store import ArtifactStore, StageRef

CACHE_DIR = Path.home() / ".cache" / "dice"


@dataclass
class RunContext:
    """Everything a stage needs to find its inputs and write its outputs."""

    run_id: str
    store_root: str
    recipe: Recipe
    cache_dir: Path = CACHE_DIR

    @property
    def store(self) -> ArtifactStore:
        return ArtifactStore(self.store_root)

    def stage(self, round_: int, name: str) -> StageRef:
        return StageRef(self.run_id, round_, name)

    def model_dir(self, model: str) -> Path:
        """A local folder for a model reference: `store:<prefix>` or a local path."""
        if model.startswith("store:"):
            return self.store.local_dir(model.removeprefix("store:"), self.cache_dir / "store")
        return Path(model)


def logger() -> logging.Logger | logging.LoggerAdapter:
    """Prefect's run logger inside a flow or task, a plain logger elsewhere."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger("dice")


def code_version() -> str:
    """The package version, with the git commit when the code runs from a checkout."""
    root = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            check=True,
        ).stdout.strip()
        return f"{dice_core.__version__}+g{sha}{'.dirty' if dirty else ''}"
    except (OSError, subprocess.SubprocessError):
        return dice_core.__version__


def run_stage(
    ctx: RunContext,
    round_: int,
    name: str,
    body: Callable[[StageRef], dict[str, Any]],
    inputs: dict[str, str] | None = None,
) -> dict[str, Any]:
    """Run a stage body once: skip it when its completion record exists, else clear what an
    interrupted attempt left, run it, and publish its record (written last).

    Args:
        ctx: The run.
        round_: Round number (0 for the round that makes pi_0).
        name: Stage name, the folder under the round.
        body: Writes the stage's files under `ref.prefix` and returns the record's summary.
        inputs: Names of the input artifacts (store keys or paths), kept for lineage.

    Returns:
        The completion record.
    """
    store, ref, log = ctx.store, ctx.stage(round_, name), logger()
    if store.is_complete(ref):
        record = store.stage_record(ref)
        log.info(
            "%s round %d | already complete (finished %s) | skipped",
            name,
            round_,
            record.get("finished_at"),
        )
        return record
    store.begin_stage(ref)
    started = time.monotonic()
    started_at = _now()
    summary = body(ref)
    record = {
        "stage": name,
        "round": round_,
        "run_id": ctx.run_id,
        "summary": summary,
        "inputs": _lineage(store, inputs or {}),
        "code_version": code_version(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(time.monotonic() - started, 3),
    }
    record = store.complete_stage(ref, record)
    log.info("%s round %d | complete | seconds: %.1f", name, round_, record["seconds"])
    return record


def _lineage(store: ArtifactStore, inputs: dict[str, str]) -> dict[str, Any]:
    """Each input with the content digest of its completion record or file, where it has one."""
    found = {}
    for role, ref in inputs.items():
        entry: dict[str, Any] = {"ref": ref}
        key = ref.removeprefix("store:")
        marker = f"{key.rsplit('/', 1)[0]}/_COMPLETE.json" if ref.startswith("store:") else None
        if marker and store.exists(marker):
            entry["stage_record_sha256"] = store.digest(marker)
        found[role] = entry
    return found


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def artifact_key(ctx: RunContext, round_: int, stage: str) -> str:
    """A Prefect artifact key (lowercase letters, digits and dashes only)."""
    raw = f"{ctx.run_id}-round-{round_}-{stage}".lower()
    return re.sub(r"[^a-z0-9-]+", "-", raw).strip("-")


def publish(
    ctx: RunContext,
    round_: int,
    stage: str,
    markdown: str,
    table: list[dict[str, Any]] | None = None,
) -> None:
    """Publish a stage's summary (and an optional table) as Prefect artifacts; outside a
    Prefect run this does nothing."""
    try:
        get_run_logger()
    except MissingContextError:
        return
    key = artifact_key(ctx, round_, stage)
    create_markdown_artifact(markdown, key=key, description=f"{stage}, round {round_}")
    if table:
        create_table_artifact(
            table, key=f"{key}-table", description=f"{stage} table, round {round_}"
        )


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """A small markdown table from dicts sharing keys."""
    if not rows:
        return "_empty_\n"
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k)) for k in keys) + " |")
    return "\n".join(lines) + "\n"


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value).replace("|", "\\|").replace("\n", " ")[:120]


class Progress:
    """One progress-line shape for a stage: `stage round t | done/total | name: value | rate | eta`.

    Logs at most every `every` seconds, plus the last call.
    """

    def __init__(self, stage: str, round_: int, unit: str = "items", every: float = 10.0):
        self.stage, self.round, self.unit, self.every = stage, round_, unit, every
        self.started = self.last = time.monotonic()

    def __call__(self, done: int, total: int, **values: float) -> None:
        now = time.monotonic()
        if now - self.last < self.every and done < total:
            return
        self.last = now
        elapsed = max(now - self.started, 1e-9)
        rate = done / elapsed
        eta = (total - done) / rate if rate > 0 else float("nan")
        pairs = "".join(f" | {k}: {v:.3f}" for k, v in values.items())
        logger().info(
            "%s round %d | %d/%d%s | %s/s: %.2f | eta: %s",
            self.stage,
            self.round,
            done,
            total,
            pairs,
            self.unit,
            rate,
            _clock(eta),
        )


def _clock(seconds: float) -> str:
    if seconds != seconds:  # NaN
        return "?"
    minutes, secs = divmod(int(seconds), 60)
    return f"{minutes}m{secs:02d}s"
