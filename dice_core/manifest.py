"""Run manifests: what a run is (recipe, digest, code version) and where its stages stand."""

from __future__ import annotations

import getpass
import socket
from datetime import UTC, datetime
from typing import Any

from dice_core.config import Recipe, parse_recipe
from dice_core.errors import RecipeError
from dice_core.store import COMPLETE, ArtifactStore, check_run_id

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


def open_run(store: ArtifactStore, run_id: str, recipe: Recipe, code_version: str) -> dict:
    """Create a run's manifest, or check that an existing run has the same recipe.

    Args:
        store: The artifact store.
        run_id: The run (checked: nothing may escape the store root).
        recipe: The validated recipe.
        code_version: Recorded for lineage.

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
    """One row per round: each stage `done` (with seconds), `partial` or `pending`."""
    rows = []
    for round_ in range(rounds + 1):
        row: dict[str, Any] = {"round": round_}
        for stage in ROUND0_STAGES if round_ == 0 else STAGES:
            prefix = f"runs/{run_id}/round-{round_}/{stage}"
            if store.exists(f"{prefix}/{COMPLETE}"):
                record = store.read_json(f"{prefix}/{COMPLETE}")
                row[stage] = f"done ({record.get('seconds', 0):.0f}s)"
            elif store.list(prefix):
                row[stage] = "partial"
            else:
                row[stage] = "pending"
        rows.append(row)
    return rows
