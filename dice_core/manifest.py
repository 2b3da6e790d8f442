"""Run manifests: what a run is (recipe, digest, code version) and where its stages stand."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

from dice_core.config import Recipe, parse_recipe
from dice_core.errors import RecipeError
from dice_core.store import COMPLETE, ArtifactStore, StageRef, check_run_id

STAGES = ("generation", "rewards", "pairs", "replay", "training", "evaluation")
ROUND0_STAGES = ("training", "heldout", "evaluation")


def manifest_key(run_id: str) -> str:
    return f"runs/{check_run_id(run_id)}/manifest.json"


def changed_keys(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested mappings."""
    keys = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            keys += changed_keys(a, b, f"{name}.")
        elif a != b:
            keys.append(name)
    return keys


def stages_of(round_: int) -> tuple[str, ...]:
    """The stages of a round, in order."""
    return ROUND0_STAGES if round_ == 0 else STAGES


def parse_fork(spec: str) -> tuple[str, int]:
    """`RUN_ID:ROUND` from --fork-from.

    Raises:
        RecipeError: Not of that form, or a round below 1.
    """
    run_id, sep, round_ = spec.rpartition(":")
    if not sep or not round_.isdigit() or int(round_) < 1:
        raise RecipeError(
            f"--fork-from {spec!r}: expected RUN_ID:ROUND with ROUND 1 or more "
            "(the rounds before ROUND are copied)"
        )
    return check_run_id(run_id), int(round_)


def fork_run(
    store: ArtifactStore,
    parent_id: str,
    before_round: int,
    run_id: str,
    recipe: Recipe,
    code_version: str,
) -> dict:
    """Start a run from another: copy the parent's completed stages of rounds below
    `before_round` (server-side on object stores), then write the manifest, last, with the
    parent named. Repeating the call after a crash finishes the copy; a run that exists is
    opened as by `open_run` when it was forked from the same parent and round.

    Args:
        store: The artifact store holding both runs.
        parent_id: The run to copy from.
        before_round: The first round the new run computes itself (1 or more).
        run_id: The new run.
        recipe: The new run's recipe; it may differ from the parent's.
        code_version: Recorded for lineage.

    Returns:
        The new run's manifest.

    Raises:
        RecipeError: No such parent, a round beyond the recipe's, the new run exists with
            another parent, or the parent is the new run.
    """
    check_run_id(run_id)
    if parent_id == run_id:
        raise RecipeError(f"--fork-from: run {run_id} cannot be forked from itself")
    if before_round > recipe.run.rounds:
        raise RecipeError(
            f"--fork-from {parent_id}:{before_round}: the recipe has {recipe.run.rounds} "
            "round(s); fork from a round it runs"
        )
    parent_manifest, _ = load_run(store, parent_id)
    parent = {"run_id": parent_id, "round": before_round}
    if store.exists(manifest_key(run_id)):
        found = store.read_json(manifest_key(run_id)).get("parent") or {}
        if {k: found.get(k) for k in parent} != parent:
            raise RecipeError(
                f"run {run_id} already exists in {store.root_url} and was not forked from "
                f"{parent_id}:{before_round}; choose another --run-id"
            )
        return open_run(store, run_id, recipe, code_version)
    copied = _copy_rounds(store, parent_id, run_id, before_round)
    parent.update(
        recipe_digest=parent_manifest["recipe_digest"],
        changed=changed_keys(parent_manifest["recipe"], recipe.model_dump(mode="json")),
        stages=copied,
    )
    return open_run(store, run_id, recipe, code_version, parent=parent)


def _copy_rounds(store: ArtifactStore, parent_id: str, run_id: str, before: int) -> dict:
    """Copy the completed stages of rounds < `before`; returns `round-t/stage` -> the
    sha256 of the copied completion record."""
    copied = {}
    for round_ in range(before):
        for stage in stages_of(round_):
            source, target = StageRef(parent_id, round_, stage), StageRef(run_id, round_, stage)
            if store.copy_stage(source, target):
                copied[f"round-{round_}/{stage}"] = store.digest(f"{target.prefix}/{COMPLETE}")
    return copied


def open_run(
    store: ArtifactStore,
    run_id: str,
    recipe: Recipe,
    code_version: str,
    parent: dict[str, Any] | None = None,
) -> dict:
    """Create a run's manifest, or check that an existing run has the same recipe.

    Args:
        store: The artifact store.
        run_id: The run (checked: nothing may escape the store root).
        recipe: The validated recipe.
        code_version: Recorded for lineage.
        parent: For a forked run, the parent run, round and copied stages (kept as given).

    Returns:
        The manifest.

    Raises:
        RecipeError: The run exists with another recipe; names the changed keys.
    """
    key = manifest_key(run_id)
    if store.exists(key):
        manifest = store.read_json(key)
        if manifest["recipe_digest"] != recipe.digest():
            changed = changed_keys(manifest["recipe"], recipe.model_dump(mode="json"))
            raise RecipeError(
                f"run {run_id} in {store.root_url} was started with another recipe "
                f"(changed: {', '.join(changed)}); use another --run-id, or fork the run "
                "from a round with --fork-from"
            )
        return manifest
    manifest = {
        "run_id": run_id,
        "recipe": recipe.model_dump(mode="json"),
        "recipe_digest": recipe.digest(),
        "code_version": code_version,
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "host": socket.gethostname(),
        "user": getpass.getuser(),
    }
    if parent:
        manifest["parent"] = parent
    store.write_json(key, manifest)
    return manifest


def load_run(store: ArtifactStore, run_id: str) -> tuple[dict, Recipe]:
    """The manifest and recipe of an existing run.

    Raises:
        RecipeError: No such run in this store.
    """
    key = manifest_key(run_id)
    if not store.exists(key):
        raise RecipeError(f"no run {run_id!r} in store {store.root_url}")
    manifest = store.read_json(key)
    return manifest, parse_recipe(manifest["recipe"], f"{store.root_url}/{key}")


def stage_states(store: ArtifactStore, run_id: str, rounds: int) -> list[dict[str, Any]]:
    """One row per round, one column per stage of any round: `done` (with seconds),
    `partial`, `pending`, or `-` where the round has no such stage."""
    columns = [*STAGES[:-1], *(s for s in ROUND0_STAGES if s not in STAGES), STAGES[-1]]
    rows = []
    for round_ in range(rounds + 1):
        row: dict[str, Any] = {"round": round_}
        for stage in columns:
            prefix = f"runs/{run_id}/round-{round_}/{stage}"
            if stage not in stages_of(round_):
                row[stage] = "-"
            elif store.exists(f"{prefix}/{COMPLETE}"):
                record = store.read_json(f"{prefix}/{COMPLETE}")
                row[stage] = f"done ({record.get('seconds', 0):.0f}s)"
            elif store.list(prefix):
                row[stage] = "partial"
            else:
                row[stage] = "pending"
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Round records: the wall time of a round's flow, and how much of it no stage body accounts for

ROUND_RECORD = "round.json"


def round_record_key(run_id: str, round_: int) -> str:
    """Where a round's flow records its wall time (written when the round returns)."""
    return f"runs/{check_run_id(run_id)}/round-{round_}/{ROUND_RECORD}"


def round_overhead(round_record: dict[str, Any], stage_records: dict[str, dict]) -> dict[str, Any]:
    """A round's wall time against the stage bodies that ran in it.

    A stage counts when its record's start and finish fall within the round's (stage times
    are kept to the second, so the round's start is rounded down to its second); a stage
    finished by an earlier attempt and skipped by this one does not.

    Args:
        round_record: The round's record (`started_at`, `finished_at`, `seconds`).
        stage_records: Completion records by stage name (`started_at`, `finished_at`,
            `seconds`).

    Returns:
        `round`, `flow_seconds`, `stage_seconds` (the bodies that ran), `overhead_seconds`
        (the rest), `overhead_share` of the flow's time, and the stages run and skipped.
    """
    start = datetime.fromisoformat(round_record["started_at"]).replace(microsecond=0)
    end = datetime.fromisoformat(round_record["finished_at"])
    ran, skipped = [], []
    for name, record in stage_records.items():
        inside = (
            start <= datetime.fromisoformat(record["started_at"])
            and datetime.fromisoformat(record["finished_at"]) <= end
        )
        (ran if inside else skipped).append(name)
    flow = float(round_record["seconds"])
    stages = sum(float(stage_records[name]["seconds"]) for name in ran)
    return {
        "round": round_record["round"],
        "flow_seconds": flow,
        "stage_seconds": stages,
        "overhead_seconds": flow - stages,
        "overhead_share": (flow - stages) / flow if flow > 0 else float("nan"),
        "stages_run": ran,
        "stages_skipped": skipped,
    }


def run_overheads(store: ArtifactStore, run_id: str) -> list[dict[str, Any]]:
    """`round_overhead` of every round of a run that has a round record, round 0 first.

    Raises:
        RecipeError: No such run in this store.
    """
    _, recipe = load_run(store, run_id)
    rows = []
    for round_ in range(recipe.run.rounds + 1):
        key = round_record_key(run_id, round_)
        if not store.exists(key):
            continue
        records = completed_stage_records(store, run_id, round_)
        rows.append(round_overhead(store.read_json(key), records))
    return rows


def completed_stage_records(store: ArtifactStore, run_id: str, round_: int) -> dict[str, dict]:
    """The completion records of a round's completed stages, by stage, in stage order."""
    records = {}
    for stage in stages_of(round_):
        ref = StageRef(run_id, round_, stage)
        if store.is_complete(ref):
            records[stage] = store.stage_record(ref)
    return records
