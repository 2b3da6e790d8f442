"""The deployments as a team runs them: a real Prefect server, the pools, tag limit and
deployments made by `python -m deployments.setup`, a real process worker, runs of the tiny
recipe with the real model triggered through the API, and their artifacts read back."""

from __future__ import annotations

import asyncio
from uuid import uuid4

import pytest
from prefect_stack import (
    CPU_POOL,
    GPU_POOL,
    PROJECT_ROOT,
    PrefectStack,
    finished,
    interval,
    launch_runs,
    shared_stack,
)

pytestmark = pytest.mark.slow

ROUND_STAGES = ("generation", "rewards", "pairs", "replay", "training", "evaluation")


@pytest.fixture(scope="session")
def stack(tmp_path_factory, sft_model_dir) -> PrefectStack:
    with shared_stack(tmp_path_factory.mktemp("prefect")) as running:
        launch_runs(running, sft_model_dir)
        yield running


# ------------------------------------------------------------------ setup and deployments
def test_setup_makes_pools_gpu_limit_and_deployments(stack):
    pools = {p["name"]: p for p in stack.post("/work_pools/filter")}
    assert pools[CPU_POOL]["type"] == "process"
    assert pools[GPU_POOL]["type"] == "kubernetes"
    limits = {c["tag"]: c["concurrency_limit"] for c in stack.post("/concurrency_limits/filter")}
    assert limits == {"gpu": 1}
    assert "$ prefect concurrency-limit create gpu 1" in stack.setup_output["cpu"]
    assert "$ prefect --no-prompt deploy --all" in stack.setup_output["cpu"]

    deployments = stack.deployments()
    assert set(deployments) == {"dice-run", "dice-round", "dice-evaluate"}
    for deployment in deployments.values():
        assert deployment["work_pool_name"] == CPU_POOL
        step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == str(PROJECT_ROOT)
    assert deployments["dice-run"]["parameters"] == {"recipe": "cpu-smollm2"}
    assert deployments["dice-run"]["concurrency_limit"] is None

    # The GPU setup deployed the same three to the Kubernetes pool, code in the image.
    for deployment in stack.snapshots["gpu"]:
        assert deployment["work_pool_name"] == GPU_POOL
        step = deployment["pull_steps"][0]["prefect.deployments.steps.set_working_directory"]
        assert step["directory"] == "/opt/dice"
        if deployment["name"] != "dice-round":
            assert deployment["parameters"] == {"recipe": "zephyr-7b"}


def test_run_form_offers_the_shipped_recipes_by_name(stack):
    schema = stack.deployments()["dice-run"]["parameter_openapi_schema"]
    recipe = schema["properties"]["recipe"]
    by_name, by_path = recipe["anyOf"]
    shipped = sorted(p.stem for p in (PROJECT_ROOT / "recipes").glob("*.yaml"))
    assert sorted(by_name["enum"]) == shipped
    assert (by_name["title"], by_path["title"], by_path["type"]) == (
        "shipped recipe",
        "recipe file",
        "string",
    )
    assert recipe["default"] == "cpu-smollm2"
    for name in ("recipe", "run_id", "store", "rounds", "overrides"):
        assert schema["properties"][name]["description"], name
    round_schema = stack.deployments()["dice-round"]["parameter_openapi_schema"]
    assert round_schema["required"] == ["run_id"]
    assert {"type": "integer"} in round_schema["properties"]["round"]["anyOf"]


def test_nightly_continuation_ships_paused(stack):
    (schedule,) = stack.deployments()["dice-round"]["schedules"]
    assert schedule["active"] is False
    assert schedule["schedule"]["cron"] == "0 2 * * *"
    assert schedule["schedule"]["timezone"] == "UTC"
    assert schedule["parameters"] == {"run_id": "my-run"}
    for name in ("dice-run", "dice-evaluate"):
        assert stack.deployments()[name]["schedules"] == []


def test_gpu_pool_renders_a_kubernetes_job_with_the_gpus_asked(stack):
    """The pool's template, as the Kubernetes worker renders it for a flow run, is a valid
    batch/v1 Job: N nvidia.com/gpu, the image, the store, a large /dev/shm."""
    worker = pytest.importorskip("prefect_kubernetes.worker", reason="make setup installs it")
    from prefect.client.schemas.objects import FlowRun
    from prefect.settings import PREFECT_API_URL, temporary_settings

    (pool,) = [p for p in stack.post("/work_pools/filter") if p["name"] == GPU_POOL]
    template = pool["base_job_template"]
    values = {"gpus": 2, "env": {"DICE_STORE_BLOCK": "secret/dice-store"}}
    with temporary_settings({PREFECT_API_URL: f"{stack.url}/api"}):
        config = asyncio.run(
            worker.KubernetesWorkerJobConfiguration.from_template_and_values(template, values)
        )
    config.prepare_for_flow_run(FlowRun(id=uuid4(), name="api-run", flow_id=uuid4()))
    job = config.job_manifest
    pod = job["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 2
    assert container["image"] == "registry.example/dice-pipeline:test"
    assert container["args"] == ["prefect", "flow-run", "execute"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["DICE_STORE"] == "s3://dice-test/store"  # the setup's --store
    assert env["DICE_STORE_BLOCK"] == "secret/dice-store"  # a deployment's job variable
    assert env["HF_HOME"] == "/cache/huggingface" and env["PREFECT__FLOW_RUN_ID"]
    assert {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]
    assert {"name": "cache", "emptyDir": {}} in pod["volumes"]
    assert job["metadata"]["namespace"] == "dice"

    # Every key is a field of the Kubernetes API's Job: nothing is dropped on a round trip
    # (quantities come back as strings), but for two keys the worker insists on in the pod
    # spec, where Kubernetes ignores them.
    expected = _without_nulls(job)
    pod_spec = expected["spec"]["template"]["spec"]
    for key in ("completions", "parallelism"):
        assert pod_spec.pop(key) == 1
    for quantities in pod_spec["containers"][0]["resources"].values():
        quantities.update({k: str(v) for k, v in quantities.items()})
    assert _without_nulls(asyncio.run(_as_kubernetes_job(job))) == expected


async def _as_kubernetes_job(manifest: dict) -> dict:
    """The manifest read into the Kubernetes client's V1Job model and written out again."""
    from kubernetes_asyncio.client import ApiClient

    async with ApiClient() as client:
        job = client._ApiClient__deserialize(manifest, "V1Job")
        return client.sanitize_for_serialization(job)


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v not in (None, {}, [])}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


def test_gpu_image_keeps_the_project_pins_over_vllm_bounds():
    """vLLM's fastapi and transformers bounds give way to Prefect's and the project's; its
    other requirements (torch included) stay, so pip still refuses a real conflict."""
    from deployments.image_requirements import image_requirements

    project = ["torch==2.13.0", "transformers==5.25.*", "prefect==3.9.1"]
    vllm = [
        "fastapi[standard]<0.137.0,>=0.133.0",
        "Transformers<5.20.0,>=5.16.1",
        "torch==2.13.0",
        "numpy",
        'zentorch==2.13.0.1; extra == "zen"',
    ]
    assert image_requirements(project, vllm) == [*project, "torch==2.13.0", "numpy"]


# ------------------------------------------------------------------------ retry policy
def test_only_transient_failures_are_retried(stack):
    """The stage tasks' retry policy on a real Prefect task run: a reset connection is tried
    again, a bad record fails at once."""
    from prefect import flow, task
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from dice_core.errors import DataError, StoreError
    from dice_core.store import ArtifactStore
    from tasks.common import TRANSIENT_RETRIES, is_transient

    attempts = {"transient": 0, "bad-input": 0}

    @task(**{**TRANSIENT_RETRIES, "retry_delay_seconds": 0})
    def flaky(kind: str) -> str:
        attempts[kind] += 1
        if kind == "transient" and attempts[kind] == 1:
            raise ConnectionResetError("connection reset by peer")
        if kind == "bad-input":
            raise DataError("pairs.jsonl line 3: missing field `chosen`")
        return "ok"

    @flow
    def both() -> list[bool]:
        states = [flaky(kind, return_state=True) for kind in attempts]
        return [state.is_completed() for state in states]

    with temporary_settings({PREFECT_API_URL: f"{stack.url}/api"}):
        assert both() == [True, False]
    assert attempts == {"transient": 2, "bad-input": 1}

    # A store that cannot be reached raises a StoreError whose context says so.
    unreachable = ArtifactStore(
        "s3://dice-test/store",
        {
            "key": "k",
            "secret": "s",
            "client_kwargs": {"endpoint_url": "http://127.0.0.1:9"},
            "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 1},
        },
    )
    with pytest.raises(StoreError) as caught:
        unreachable.read_json("runs/x/manifest.json")
    assert is_transient(caught.value)
    assert not is_transient(StoreError("store /x: runs/x/manifest.json does not exist"))


# ---------------------------------------------------------------------- runs and artifacts
def test_dice_run_from_the_deployment_publishes_each_round(stack):
    run = finished(stack, "api-run")
    assert run["state_type"] == "COMPLETED", stack.log_tail(run["id"])
    assert run["name"] == "api-run"
    print(f"\napi-run: {run['wall_s']:.0f} s from trigger to end (3 runs at once)")

    (round1,) = stack.subflow_runs(run["id"])
    assert round1["name"] == "api-run · round 1"
    assert round1["state_type"] == "COMPLETED"
    artifacts = stack.artifacts(round1["id"])
    for stage in ROUND_STAGES:
        assert f"api-run-round-1-{stage}" in artifacts, sorted(artifacts)

    overview = artifacts["api-run-round-1-overview"]["data"]
    for name in ("samples", "pairs", "alpha", "reward_mean", "reward_std", "dpo_loss", "WR", "LC"):
        assert f"| {name} |" in overview, name
    assert "| prompts_kept |" in overview and "| dropped_length_finish |" in overview
    for key in ("generation/samples.jsonl", "rewards/rewards.jsonl", "pairs/pairs.jsonl"):
        assert f"runs/api-run/round-1/{key}" in overview
    assert "runs/api-run/round-1/training/model/model.safetensors" in overview

    examples = artifacts["api-run-round-1-pairs-table"]["data"]
    assert examples
    for row in examples:
        assert row["chosen"] != row["rejected"]
        assert isinstance(row["chosen_reward"], float) and isinstance(row["rejected_reward"], float)
        assert row["chosen_chars"] == len(row["chosen"]) or len(row["chosen"]) == 200

    # A nightly dice-round (round left empty) would go on with round 2.
    from flows.common import next_round, reopen_run

    assert next_round(reopen_run("api-run", str(stack.store))) == 2

    # Round 0 belongs to the parent run.
    parent = stack.artifacts(run["id"])
    for key in ("training", "heldout", "evaluation", "overview", "summary"):
        assert any(k.startswith("api-run-round-") and k.endswith(key) for k in parent), key


def test_two_runs_take_turns_on_the_gpu_stages(stack):
    """gpu-a and gpu-b ran at the same time; their `gpu`-tagged stages (and api-run's)
    never did: each started after the previous one ended."""
    runs = [finished(stack, run_id) for run_id in ("gpu-a", "gpu-b", "api-run")]
    for run in runs:
        assert run["state_type"] == "COMPLETED", stack.log_tail(run["id"])
    (start_a, end_a), (start_b, end_b) = interval(runs[0]), interval(runs[1])
    assert start_a < end_b and start_b < end_a, "the two runs did not overlap"

    flow_runs = {r["id"]: r for r in runs}
    for run in runs:
        flow_runs.update({s["id"]: s for s in stack.subflow_runs(run["id"])})
    gpu = [t for t in stack.task_runs(list(flow_runs)) if "gpu" in t["tags"]]
    gpu.sort(key=lambda t: t["start_time"])
    lines = []
    for before, after in zip(gpu, gpu[1:], strict=False):
        assert interval(before)[1] <= interval(after)[0], (before["name"], after["name"])
    for t in gpu:
        start, end = interval(t)
        lines.append(f"{start:%H:%M:%S}-{end:%H:%M:%S} {flow_runs[t['flow_run_id']]['name']}: "
                     f"{t['name']}")  # fmt: skip
    (stack.root / "gpu-timeline.txt").write_text("\n".join(lines) + "\n")
    print("\ngpu-tagged task runs, in start order:\n" + "\n".join(lines))
    assert {flow_runs[t["flow_run_id"]]["name"] for t in gpu} >= {"gpu-a", "gpu-b"}
