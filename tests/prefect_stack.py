"""A real Prefect server and process worker on 127.0.0.1, started once for the tests that deploy
the pipeline and drive its UI. The setup module creates the pools, the `gpu` limit and the
deployments; runs are triggered and read back through the REST API."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

PROJECT_ROOT = Path(__file__).resolve().parent.parent
CPU_POOL, GPU_POOL = "dice-cpu", "dice-gpu"
TERMINAL = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}

# The tiny recipe cut to what these tests look at, still with the real SmolLM2 model: two
# prompts of three samples, one DPO step per round, one AlpacaEval instruction.
CHEAP_OVERRIDES: dict[str, Any] = {
    "data.prompts_per_round": 2,
    "generation.samples_per_prompt": 3,
    "generation.max_new_tokens": 24,
    "round0.num_pairs": 2,
    "round0.heldout_pairs": 1,
    "round0.training.max_steps": 1,
    "training.max_steps": 1,
    "training.max_length": 128,
    "evaluation.num_instructions": 1,
    "evaluation.max_new_tokens": 8,
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class PrefectStack:
    """The server's URL, the environment its clients use, and the processes to stop."""

    url: str
    env: dict[str, str]
    root: Path
    processes: list[subprocess.Popen] = field(default_factory=list)
    setup_output: dict[str, str] = field(default_factory=dict)
    snapshots: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    runs: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def store(self) -> Path:
        return self.root / "store"

    def post(self, path: str, body: dict[str, Any] | None = None) -> Any:
        response = httpx.post(f"{self.url}/api{path}", json=body or {}, timeout=30)
        response.raise_for_status()
        return response.json() if response.content else None

    def get(self, path: str) -> Any:
        response = httpx.get(f"{self.url}/api{path}", timeout=30)
        response.raise_for_status()
        return response.json()

    def deployments(self) -> dict[str, dict[str, Any]]:
        return {d["name"]: d for d in self.post("/deployments/filter")}

    def trigger(self, deployment: str, parameters: dict[str, Any]) -> dict[str, Any]:
        """Create a flow run of a deployment, as the UI's Run button does."""
        deployment_id = self.deployments()[deployment]["id"]
        return self.post(
            f"/deployments/{deployment_id}/create_flow_run", {"parameters": parameters}
        )

    def wait(self, flow_run_id: str, timeout: float) -> dict[str, Any]:
        """The flow run once it reaches a terminal state.

        Raises:
            AssertionError: It is not finished after `timeout` seconds (with its state and
                the last lines of its logs).
        """
        deadline = time.monotonic() + timeout
        while True:
            run = self.get(f"/flow_runs/{flow_run_id}")
            if run["state_type"] in TERMINAL:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"flow run {run['name']} still {run['state_name']} after {timeout:.0f} s\n"
                    + self.log_tail(flow_run_id)
                )
            time.sleep(2)

    def flow_runs(self, **flow_runs_filter: Any) -> list[dict[str, Any]]:
        return self.post("/flow_runs/filter", {"flow_runs": flow_runs_filter, "limit": 200})

    def subflow_runs(self, parent_id: str) -> list[dict[str, Any]]:
        """The flow runs started from inside a flow run (dice-run's rounds)."""
        parents = self.post(
            "/task_runs/filter", {"flow_runs": {"id": {"any_": [parent_id]}}, "limit": 200}
        )
        ids = [t["id"] for t in parents]
        if not ids:
            return []
        return self.flow_runs(parent_task_run_id={"any_": ids})

    def task_runs(self, flow_run_ids: list[str]) -> list[dict[str, Any]]:
        return self.post(
            "/task_runs/filter", {"flow_runs": {"id": {"any_": flow_run_ids}}, "limit": 200}
        )

    def artifacts(self, flow_run_id: str) -> dict[str, dict[str, Any]]:
        """The artifacts a flow run published, by key; a table's data is decoded."""
        found = self.post(
            "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        by_key = {}
        for artifact in found:
            if artifact["type"] == "table" and isinstance(artifact["data"], str):
                artifact["data"] = json.loads(artifact["data"])
            by_key[artifact["key"]] = artifact
        return by_key

    def log_tail(self, flow_run_id: str, lines: int = 30) -> str:
        logs = self.post(
            "/logs/filter",
            {"logs": {"flow_run_id": {"any_": [flow_run_id]}}, "sort": "TIMESTAMP_DESC"},
        )
        return "\n".join(entry["message"][:300] for entry in reversed(logs[:lines]))


def _prefect_env(root: Path, url: str) -> dict[str, str]:
    """This machine's environment with every Prefect setting replaced by the stack's own."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(root / "prefect-home"),
        PREFECT_API_URL=f"{url}/api",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        DO_NOT_TRACK="1",
        PREFECT_SERVER_UI_SHOW_PROMOTIONAL_CONTENT="false",
        PREFECT_WORKER_QUERY_SECONDS="1",
        PREFECT_LOGGING_EXTRA_LOGGERS="dice_core",
        DICE_STORE=str(root / "store"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    return env


def _start(stack: PrefectStack, name: str, args: list[str]) -> subprocess.Popen:
    """Start a process in its own session (so its children can be stopped with it)."""
    log = (stack.root / f"{name}.log").open("w")
    process = subprocess.Popen(
        args,
        cwd=PROJECT_ROOT,
        env=stack.env,
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    stack.processes.append(process)
    return process


def _wait_healthy(stack: PrefectStack, server: subprocess.Popen, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(
                f"prefect server exited ({server.returncode}):\n"
                + (stack.root / "server.log").read_text()[-3000:]
            )
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{stack.url}/api/health", timeout=5).status_code == 200:
                return
        time.sleep(1)
    raise RuntimeError(f"prefect server not healthy after {timeout:.0f} s")


def run_setup(stack: PrefectStack, args: list[str]) -> str:
    """`python -m deployments.setup ARGS` against the stack's server; returns its output."""
    done = subprocess.run(
        [sys.executable, "-m", "deployments.setup", *args],
        cwd=PROJECT_ROOT,
        env=stack.env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    if done.returncode != 0:
        raise RuntimeError(f"setup {args} failed:\n{done.stdout}\n{done.stderr}")
    return done.stdout


def start_stack(root: Path) -> PrefectStack:
    """Server, then the GPU setup (its deployments are kept in `snapshots`), then the CPU
    setup, which deploys again to the process pool, then a process worker."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    stack = PrefectStack(url=url, env=_prefect_env(root, url), root=root)
    stack.store.mkdir(parents=True, exist_ok=True)
    python = [sys.executable, "-m", "prefect"]
    started = time.monotonic()
    try:
        server_args = ["server", "start", "--host", "127.0.0.1", "--port", str(port)]
        server = _start(stack, "server", [*python, *server_args])
        _wait_healthy(stack, server, timeout=180)
        stack.setup_output["gpu"] = run_setup(
            stack,
            ["gpu", "--image", "registry.example/dice-pipeline:test", "--gpus", "4",
             "--namespace", "dice", "--store", "s3://dice-test/store"],
        )  # fmt: skip
        stack.snapshots["gpu"] = list(stack.deployments().values())
        stack.setup_output["cpu"] = run_setup(stack, ["cpu"])
        _start(stack, "worker", [*python, "worker", "start", "--pool", CPU_POOL])
    except BaseException:
        stop_stack(stack)
        raise
    stack.setup_output["seconds"] = f"{time.monotonic() - started:.1f}"
    return stack


def stop_stack(stack: PrefectStack) -> None:
    """Stop the worker (SIGINT: it ignores a lone SIGTERM for long), then the server; whatever
    is left of their sessions is killed."""
    for process in reversed(stack.processes):
        if process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGINT)
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


_shared: dict[str, Any] = {"stack": None, "users": 0}


@contextlib.contextmanager
def shared_stack(root: Path) -> Iterator[PrefectStack]:
    """The one stack of this test session: started by its first user, stopped by its last."""
    if _shared["stack"] is None:
        _shared["stack"] = start_stack(root)
    _shared["users"] += 1
    try:
        yield _shared["stack"]
    finally:
        _shared["users"] -= 1
        if _shared["users"] == 0:
            stop_stack(_shared["stack"])
            _shared["stack"] = None


def cheap_run(run_id: str, rounds: int = 1, **overrides: Any) -> dict[str, Any]:
    """dice-run parameters for the tiny recipe at the cost these tests can afford."""
    return {
        "recipe": "tiny",
        "run_id": run_id,
        "rounds": rounds,
        "overrides": {**CHEAP_OVERRIDES, **overrides},
    }


def interval(run: dict[str, Any]) -> tuple[datetime, datetime]:
    """A run's start and end times."""
    return datetime.fromisoformat(run["start_time"]), datetime.fromisoformat(run["end_time"])


def launch_runs(stack: PrefectStack, model_dir: Path) -> None:
    """Trigger, once per session and all at once, the runs the tests read back: `api-run`
    (round 0 and one round) and two runs of round 0 alone from a given pi_0 (`gpu-a`,
    `gpu-b`), whose held-out scoring is their one stage tagged `gpu`."""
    if stack.runs:
        return
    pi0 = {"models.dpo": str(model_dir), "evaluation.enabled": False}
    wanted = {
        "api-run": cheap_run("api-run"),
        "gpu-a": cheap_run("gpu-a", rounds=0, **pi0),
        "gpu-b": cheap_run("gpu-b", rounds=0, **pi0),
    }
    for run_id, parameters in wanted.items():
        stack.runs[run_id] = stack.trigger("dice-run", parameters)


def finished(stack: PrefectStack, run_id: str, timeout: float = 900) -> dict[str, Any]:
    """A launched run once it has finished, with `wall_s`: from its creation to its end."""
    run = stack.runs[run_id]
    if "final" not in run:
        final = stack.wait(run["id"], timeout)
        if final["end_time"]:
            created = datetime.fromisoformat(final["created"])
            final["wall_s"] = (datetime.fromisoformat(final["end_time"]) - created).total_seconds()
        run["final"] = final
    return run["final"]
