"""Runs that survive crashes: kill -9 in each stage, resume, fork, a paused S3 server.

The S3 and Prefect servers and the uninterrupted reference run come from test_s3.py (one of
each per session). One run, forked from the reference before round 1, is killed with SIGKILL
(its whole process group) in the middle of each stage of round 1 in turn, each time resumed
with the same run id; the S3 server is paused while the last resumption runs. Then its pairs,
training set and scores must equal the reference's, and no finished stage may have run twice.

Long stages are killed a few seconds after their start line appears in the log, or earlier,
when a fast machine reaches their completion record first: a TCP proxy in front of the S3
server holds that write unanswered and the run is killed there. Pairs and replay take a
fraction of a second, so they are always stopped by the proxy at their next write: pairs
after `pairs.jsonl` is stored, replay after `train.jsonl` and before its completion record.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import test_s3
from test_s3 import (
    BLOCK,
    BUCKET,
    CHEAP,
    REFERENCE_ID,
    ROOT,
    STORE,
    Reference,
    S3Server,
    cheap_args,
    dice,
    error_line,
    run_env,
    run_logs,
)

from dice_core.config import load_recipe
from dice_core.errors import RecipeError
from dice_core.manifest import STAGES, fork_run, open_run
from dice_core.store import COMPLETE, StageRef
from flows.common import recipe_path

CHAIN_ID = "chain"
# The session's servers and reference run (created once, whichever module asks first).
s3_server = test_s3.s3_server
prefect_server = test_s3.prefect_server
cache_dir = test_s3.cache_dir
reference = test_s3.reference


# -------------------------------------------------------------- the gate
class GateProxy:
    """A TCP proxy to the S3 server that holds, unanswered, the request carrying a pattern."""

    def __init__(self, upstream: int):
        self.upstream = upstream
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.pattern: bytes | None = None
        self.held = threading.Event()
        self.sockets: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def hold(self, pattern: str | None) -> None:
        self.pattern = pattern.encode() if pattern else None
        self.held.clear()

    def close(self) -> None:
        self.listener.close()
        for sock in self.sockets:
            sock.close()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
            self.sockets += [client, upstream]
            threading.Thread(target=self._pump, args=(client, upstream, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, outbound: bool) -> None:
        tail = b""
        try:
            while chunk := source.recv(1 << 16):
                pattern = self.pattern if outbound else None
                if pattern and pattern in tail + chunk:
                    self.held.set()
                    return  # never forwarded: the client waits until it is killed
                if pattern:
                    tail = (tail + chunk)[-len(pattern) :]
                sink.sendall(chunk)
        except OSError:
            pass


@pytest.fixture(scope="module")
def gate(s3_server) -> GateProxy:
    proxy = GateProxy(s3_server.port)
    yield proxy
    proxy.close()


# --------------------------------------------------------------- a dice run
@dataclass
class Attempt:
    returncode: int
    log: Path
    seconds: float
    killed_at: str = ""


def run_dice(
    args: list[str],
    env: dict[str, str],
    log: Path,
    kill_on: str | None = None,
    delay: float = 0.0,
    gate: GateProxy | None = None,
    on_line: tuple[str, Callable[[], None]] | None = None,
    timeout: float = 900,
) -> Attempt:
    """Run `dice` in its own process group; SIGKILL the group `delay` s after a log line
    containing `kill_on` appears, or as soon as the gate holds a request."""
    started = time.monotonic()
    with log.open("w") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "flows.cli", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        killed, state = "", {}
        reader = threading.Thread(target=_copy_lines, args=(process, out, state, kill_on, on_line))
        reader.start()
        deadline = started + timeout
        while process.poll() is None and time.monotonic() < deadline:
            seen = state.get("seen")
            if gate and gate.held.is_set():
                killed = "gate"
            elif seen is not None and time.monotonic() >= seen + delay:
                killed = kill_on or ""
            if killed:
                os.killpg(process.pid, signal.SIGKILL)
                break
            time.sleep(0.05)
        if process.poll() is None and not killed:
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
        reader.join()
    return Attempt(process.returncode, log, time.monotonic() - started, killed)


def _copy_lines(process: subprocess.Popen, out, state: dict, kill_on: str | None, on_line) -> None:
    """Copy the run's output to its log; note when the kill line appears, run the hook."""
    for line in process.stdout:
        out.write(line)
        out.flush()
        if kill_on and kill_on in line and "seen" not in state:
            state["seen"] = time.monotonic()
        if on_line and on_line[0] in line and "hooked" not in state:
            state["hooked"] = True
            on_line[1]()


def records_digests(s3: S3Server, run_id: str) -> dict[str, str]:
    """sha256 of every completion record of a run, by `round-t/stage`."""
    store = s3.store()
    found = {}
    for key in store.list(f"runs/{run_id}"):
        if key.endswith(f"/{COMPLETE}"):
            found[key.split("/", 2)[2].removesuffix(f"/{COMPLETE}")] = store.digest(key)
    return found


def content(s3: S3Server, run_id: str, stage: str, name: str):
    """A round-1 file, parsed, with the run id (inside the evaluated model's name) masked."""
    text = s3.store().read_text(f"{StageRef(run_id, 1, stage).prefix}/{name}")
    text = text.replace(f"{run_id}-round-1", "RUN-round-1")
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    return json.loads(text)


# ------------------------------------------------------------------- tests
def test_resume_refuses_a_changed_recipe(s3_server):
    store_url = f"s3://{BUCKET}/refuse"
    recipe = load_recipe(recipe_path("tiny"), dict(CHEAP))
    open_run(s3_server.store(store_url), "started", recipe, "test")
    env = run_env(s3_server, None, None)
    args = ["run", "tiny", "--run-id", "started", "--store", store_url, *cheap_args()]
    line = error_line(dice(*args, "--set", "generation.temperature=0.5", env=env))
    assert "was started with another recipe (changed: generation.temperature)" in line
    assert "--fork-from" in line


def test_fork_records_parent_copies_and_changed_keys(s3_server):
    """Fork bookkeeping on its own, with small stand-in stages: copies, parent, idempotence."""
    store = s3_server.store(f"s3://{BUCKET}/fork-unit")
    recipe = load_recipe(recipe_path("tiny"))
    open_run(store, "parent", recipe, "test")
    for round_, stage in ((0, "training"), (0, "heldout"), (1, "generation")):
        ref = StageRef("parent", round_, stage)
        store.begin_stage(ref)
        store.write_bytes(f"{ref.prefix}/out.bin", os.urandom(1000))
        store.complete_stage(ref, {"summary": {}})
    store.write_bytes(f"{StageRef('parent', 1, 'rewards').prefix}/partial.jsonl", b"{}\n")
    changed = load_recipe(recipe_path("tiny"), {"generation.temperature": 0.5, "run.rounds": 2})

    manifest = fork_run(store, "parent", 2, "child", changed, "test")
    parent = manifest["parent"]
    assert parent["run_id"] == "parent" and parent["round"] == 2
    assert parent["changed"] == ["generation.temperature", "run.rounds"]
    assert set(parent["stages"]) == {"round-0/training", "round-0/heldout", "round-1/generation"}
    for name, digest in parent["stages"].items():
        assert digest == store.digest(f"runs/parent/{name}/{COMPLETE}")
    assert not store.exists("runs/child/round-1/rewards/partial.jsonl")
    assert fork_run(store, "parent", 2, "child", changed, "test") == manifest
    with pytest.raises(RecipeError, match="was not forked from parent:1"):
        fork_run(store, "parent", 1, "child", changed, "test")
    with pytest.raises(RecipeError, match="cannot be forked from itself"):
        fork_run(store, "parent", 1, "parent", changed, "test")
    with pytest.raises(RecipeError, match="no run 'ghost'"):
        fork_run(store, "ghost", 1, "other", changed, "test")


@pytest.mark.slow
def test_kill_in_each_stage_then_resume(
    request, reference: Reference, s3_server, prefect_server, cache_dir, gate, tmp_path
):
    env = run_env(
        s3_server,
        prefect_server,
        cache_dir,
        AWS_ENDPOINT_URL=gate.url,
        AWS_ACCESS_KEY_ID="",  # the credentials come from the Prefect block
        AWS_SECRET_ACCESS_KEY="",
    )
    base = ["run", "tiny", "--run-id", CHAIN_ID, "--store", STORE, "--store-block", BLOCK]
    base += cheap_args()
    prefix = f"/{BUCKET}/store/runs/{CHAIN_ID}/round-1"

    def long_stage(stage: str) -> dict:
        # Killed 3 s after it starts, or, on a machine fast enough to finish it sooner, while
        # its completion record is held at the gate: either way before the record exists.
        hold = f"PUT {prefix}/{stage}/{COMPLETE} "
        return {"kill_on": f"{stage} round 1 | started", "delay": 3.0, "hold": hold}

    plan = [
        ("generation", long_stage("generation")),
        ("rewards", long_stage("rewards")),
        ("pairs", {"hold": f"PUT {prefix}/pairs/alpha_curve.json "}),
        ("replay", {"hold": f"PUT {prefix}/replay/{COMPLETE} "}),
        ("training", long_stage("training")),
        ("evaluation", long_stage("evaluation")),
    ]
    attempts: list[tuple[str, Attempt]] = []
    finished: dict[str, str] = {}
    for number, (stage, how) in enumerate(plan):
        args = base + (["--fork-from", f"{REFERENCE_ID}:1"] if number == 0 else [])
        gate.hold(how.get("hold"))
        log = tmp_path / f"{number}-{stage}.log"
        run_logs(request).append(log)
        attempt = run_dice(
            args, env, log, kill_on=how.get("kill_on"), delay=how.get("delay", 0.0), gate=gate
        )
        gate.hold(None)
        attempts.append((stage, attempt))
        assert attempt.killed_at, (
            f"{stage}: the run ended before the kill\n{log.read_text()[-3000:]}"
        )
        now = records_digests(s3_server, CHAIN_ID)
        # Killed in the middle: this stage has no record, and nothing finished was redone.
        assert f"round-1/{stage}" not in now, stage
        assert {k: now[k] for k in finished} == finished, stage
        finished = now
        if stage in ("pairs", "replay"):
            left = s3_server.store().list(StageRef(CHAIN_ID, 1, stage).prefix)
            assert left, f"{stage}: the held write should follow a stored file"

    # The last resumption, with the S3 server paused for 6 s once the flow has started, and
    # short read timeouts, so that requests time out and are retried during the pause.
    def pause() -> None:
        s3_server.pause()
        threading.Timer(6.0, s3_server.resume).start()

    env_pause = {**env, "DICE_S3_READ_TIMEOUT": "2"}
    log = tmp_path / "final.log"
    run_logs(request).append(log)
    final = run_dice(base, env_pause, log, on_line=(f"run {CHAIN_ID} | recipe", pause))
    attempts.append(("final", final))
    if final.returncode != 0:  # stopped by the outage: one clear line, then a clean resume
        assert "error: store" in log.read_text(), log.read_text()[-3000:]
        log = tmp_path / "final-again.log"
        run_logs(request).append(log)
        final = run_dice(base, env, log)
        attempts.append(("final-again", final))
    assert final.returncode == 0, log.read_text()[-5000:]
    for stage, attempt in attempts:
        print(f"{stage}: {attempt.seconds:.0f} s, killed at: {attempt.killed_at or '-'}")

    done = records_digests(s3_server, CHAIN_ID)
    assert {k: done[k] for k in finished} == finished
    assert {f"round-1/{s}" for s in STAGES} <= set(done)
    # Round 0 came from the reference, by copy.
    manifest = s3_server.store().read_json(f"runs/{CHAIN_ID}/manifest.json")
    assert manifest["parent"]["run_id"] == REFERENCE_ID and manifest["parent"]["changed"] == []
    reference_records = records_digests(s3_server, REFERENCE_ID)
    for name, digest in manifest["parent"]["stages"].items():
        assert name.startswith("round-0/") and done[name] == reference_records[name] == digest
    compare_with_reference(s3_server)


# Fields that hold wall-clock times: they differ between any two runs.
CLOCK_FIELDS = {"time_per_example", "train_runtime", "train_samples_per_second"}
CLOCK_FIELDS |= {"train_steps_per_second", "seconds", "elapsed", "tokens_per_second"}


def differences(a, b, where: str = "") -> list[str]:
    """Every place two parsed JSON values differ, clock fields left out."""
    if isinstance(a, dict) and isinstance(b, dict):
        found = [f"{where}.{k}: only in one" for k in set(a) ^ set(b)]
        for key in sorted(set(a) & set(b) - CLOCK_FIELDS):
            found += differences(a[key], b[key], f"{where}.{key}")
        return found
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{where}: {len(a)} vs {len(b)} items"]
        return [
            d
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            for d in differences(x, y, f"{where}[{i}]")
        ]
    if isinstance(a, float) and isinstance(b, float) and a != b:
        return [f"{where}: {a!r} vs {b!r} (diff {abs(a - b):.3g})"]
    return [] if a == b else [f"{where}: {str(a)[:80]!r} vs {str(b)[:80]!r}"]


def compare_with_reference(s3: S3Server) -> None:
    """The resumed run's round 1 equals the uninterrupted run's, file by file."""
    found = []
    for stage, name in (
        ("generation", "samples.jsonl"),
        ("rewards", "rewards.jsonl"),
        ("pairs", "pairs.jsonl"),
        ("pairs", "alpha_curve.json"),
        ("replay", "train.jsonl"),
        ("training", "metrics.jsonl"),
        ("evaluation", "model_outputs.json"),
        ("evaluation", "annotations.json"),
        ("evaluation", "scores.json"),
    ):
        chain, ref = content(s3, CHAIN_ID, stage, name), content(s3, REFERENCE_ID, stage, name)
        found += differences(chain, ref, f"{stage}/{name}")
    store = s3.store()
    weights = "round-1/training/model/model.safetensors"
    chain_weights = store.file_meta(f"runs/{CHAIN_ID}/{weights}")
    if chain_weights != store.file_meta(f"runs/{REFERENCE_ID}/{weights}"):
        found.append(f"{weights}: other bytes")
    print("\n".join(["differences from the reference:", *found]))
    assert not found
