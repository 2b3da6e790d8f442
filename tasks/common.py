"""What every stage task shares: the run context, resumable stage execution, artifacts, logs."""

from __future__ import annotations

import functools
import logging
import os
import platform
import re
import resource
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
from dice_core.errors import StageError, StoreError
from dice_core.report import markdown_table  # noqa: F401  (re-exported for the tasks)
from dice_core.store import COMPLETE, ArtifactStore, StageRef, owner_marker

CACHE_DIR = Path(os.environ.get("DICE_CACHE_DIR") or Path.home() / ".cache" / "dice")
STORE_BLOCK_ENV = "DICE_STORE_BLOCK"


# Failures a later attempt can get past: the store or the judge endpoint unreachable, a reset
# connection, a timeout. Backend errors are matched by class name (botocore, aiohttp, httpx
# are not imported here); a StoreError keeps the backend error as its context.
_TRANSIENT_ERRORS = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ServerDisconnectedError",
        "ClientPayloadError",
        "TransportError",
    }
)
# The judge raises this once its own retries of transient answers (timeouts, 408, 409, 429,
# 5xx) are spent; every other JudgeError is a bad answer, a refused cost or a missing key.
_JUDGE_GAVE_UP = "the judge endpoint failed"


def is_transient(error: BaseException | None) -> bool:
    """Whether `error`, or an error it was raised from or while handling, is a connection
    failure or a timeout; bad input, bad recipes and failed stages never are."""
    seen: set[int] = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        names = {cls.__name__ for cls in type(error).__mro__}
        if isinstance(error, ConnectionError | TimeoutError) or names & _TRANSIENT_ERRORS:
            return True
        if "JudgeError" in names and str(error).startswith(_JUDGE_GAVE_UP):
            return True
        error = error.__cause__ or error.__context__
    return False


def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """A task's `retry_condition_fn`: retry a failure only when it is transient."""
    error = state.data if isinstance(state.data, BaseException) else None
    return is_transient(error)


# Stage tasks retry transient failures twice, after 30 s then 2 min (the store and the judge
# client have retried for seconds already); a deterministic failure fails at once.
TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 2,
    "retry_delay_seconds": [30, 120],
    "retry_condition_fn": retry_if_transient,
}


@dataclass
class RunContext:
    """Everything a stage needs to find its inputs and write its outputs."""

    run_id: str
    store_root: str
    recipe: Recipe
    cache_dir: Path = CACHE_DIR

    @property
    def store(self) -> ArtifactStore:
        return open_store(self.store_root)

    def stage(self, round_: int, name: str) -> StageRef:
        return StageRef(self.run_id, round_, name)

    def model_dir(self, model: str) -> Path:
        """A local folder for a model reference: `store:<prefix>` or a local path."""
        if model.startswith("store:"):
            prefix = model.removeprefix("store:")
            check_complete(self.store, prefix)
            return self.store.local_dir(prefix, self.cache_dir / "store")
        return Path(model)


def open_store(root: str) -> ArtifactStore:
    """The artifact store at `root`; on S3 with the options of the Prefect block named by
    DICE_STORE_BLOCK (`secret/NAME` or `aws-credentials/NAME`) when set, on top of those
    from the AWS environment."""
    block = os.environ.get(STORE_BLOCK_ENV, "").strip()
    if block and root.startswith(("s3://", "s3a://")):
        return ArtifactStore(root, block_options(block))
    return ArtifactStore(root)


@functools.lru_cache(maxsize=8)
def block_options(name: str) -> dict[str, Any]:
    """s3fs options from a saved Prefect block; values are never logged.

    A `secret` block holds the options as a JSON mapping (`{"key": ..., "secret": ...,
    "client_kwargs": {"endpoint_url": ...}}`); a prefect-aws `aws-credentials` block (when
    prefect-aws is installed) is translated field by field.

    Raises:
        StoreError: The block cannot be loaded or holds no mapping of options.
    """
    from prefect.blocks.core import Block

    try:
        block = Block.load(name)
    except Exception as error:  # missing block, unknown type, unreachable API
        raise StoreError(
            f"store block {name!r} cannot be loaded ({type(error).__name__}); save it first "
            "(Secret(value={...}).save(NAME)) or unset DICE_STORE_BLOCK"
        ) from None
    if hasattr(block, "aws_client_parameters"):
        return _aws_credentials_options(block)
    value = block.get() if hasattr(block, "get") else None
    if not isinstance(value, dict):
        raise StoreError(f"store block {name!r} must hold a JSON mapping of s3fs options")
    return value


def _aws_credentials_options(block: Any) -> dict[str, Any]:
    """s3fs options from a prefect-aws AwsCredentials (or MinIOCredentials) block; role
    assumption is not translated."""
    params = getattr(block, "aws_client_parameters", None)
    client = {
        "region_name": getattr(block, "region_name", None),
        "endpoint_url": getattr(params, "endpoint_url", None),
        "verify": getattr(params, "verify", None),
    }
    options = {
        "key": getattr(block, "aws_access_key_id", None) or getattr(block, "minio_root_user", None),
        "secret": _reveal(
            getattr(block, "aws_secret_access_key", None)
            or getattr(block, "minio_root_password", None)
        ),
        "token": _reveal(getattr(block, "aws_session_token", None)),
        "profile": getattr(block, "profile_name", None),
        "client_kwargs": {k: v for k, v in client.items() if v is not None},
        "config_kwargs": getattr(params, "config", None) or {},
    }
    return {k: v for k, v in options.items() if v}


def _reveal(value: Any) -> Any:
    return value.get_secret_value() if hasattr(value, "get_secret_value") else value


def check_complete(store: ArtifactStore, key: str) -> None:
    """Refuse to read a stored input whose stage (or model folder) has not completed.

    Raises:
        StageError: The owning completion record is missing.
    """
    marker = owner_marker(key)
    if marker and not store.exists(marker):
        owner = marker.removesuffix(f"/{COMPLETE}")
        raise StageError(
            f"store {store.root_url}: {key} belongs to {owner}, which has not completed; "
            "run the stages before it first"
        )


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
        inputs: The input artifacts by role (`store:` keys or paths), kept for lineage; a
            `store:` input must belong to a completed stage or model folder.

    Returns:
        The completion record.

    Raises:
        StageError: A `store:` input whose stage has not completed.
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
    for value in (inputs or {}).values():
        if value.startswith("store:"):
            check_complete(store, value.removeprefix("store:"))
    store.begin_stage(ref)
    log.info("%s round %d | started", name, round_)
    started = time.monotonic()
    started_at = _now()
    summary = body(ref)
    record = {
        "stage": name,
        "round": round_,
        "run_id": ctx.run_id,
        "summary": summary,
        "inputs": _lineage(store, inputs or {}),
        "models": _models(ctx, inputs or {}),
        "seeds": stage_seeds(ctx.recipe, name, round_),
        "code_version": code_version(),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "started_at": started_at,
        "finished_at": _now(),
        "seconds": round(time.monotonic() - started, 3),
        "peak_rss_mb": peak_rss_mb(),
    }
    record = store.complete_stage(ref, record)
    log.info(
        "%s round %d | complete | seconds: %.1f | peak RSS so far: %.0f MB",
        name,
        round_,
        record["seconds"],
        record["peak_rss_mb"],
    )
    return record


def _lineage(store: ArtifactStore, inputs: dict[str, str]) -> dict[str, Any]:
    """Each input with the content digest of its completion record, where it has one."""
    found = {}
    for role, ref in inputs.items():
        entry: dict[str, Any] = {"ref": ref}
        marker = owner_marker(ref.removeprefix("store:")) if ref.startswith("store:") else None
        if marker and store.exists(marker):
            entry["stage_record_sha256"] = store.digest(marker)
        found[role] = entry
    return found


MODEL_ROLES = ("policy", "reference", "sft", "model", "judge_model")


def _models(ctx: RunContext, inputs: dict[str, str]) -> dict[str, str]:
    """The models a stage read, by role: a store reference or a local folder, with the
    recipe's name for the SFT model (its content digest is in `inputs`)."""
    models = {role: ref for role, ref in inputs.items() if role in MODEL_ROLES}
    if models:
        models["sft_source"] = ctx.recipe.models.sft
    return models


def stage_seeds(recipe: Recipe, stage: str, round_: int) -> dict[str, int]:
    """Every seed a stage's output depends on, as the stage derives it from the recipe."""
    data_seed = {"data": recipe.data.seed}
    seeds: dict[str, dict[str, int]] = {
        "generation": {**data_seed, "sampling": recipe.generation.seed + round_},
        "replay": {"replay": recipe.replay.seed + round_},
        "training": (
            {**data_seed, "training": recipe.round0.training.seed}
            if round_ == 0
            else {"training": recipe.training.seed}
        ),
        "heldout": data_seed,
        "evaluation": {
            "answers": recipe.evaluation.seed,
            "judge_order": recipe.evaluation.judge.seed,
        },
    }
    return seeds.get(stage, {})


def peak_rss_mb() -> float:
    """Peak resident memory of this process and of its finished children, in MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return round(max(own, children) / 1024, 1)


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
