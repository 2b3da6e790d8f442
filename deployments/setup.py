"""Create the work pool, the `gpu` tag limit and the three deployments of the DICE pipeline.

python -m deployments.setup cpu
python -m deployments.setup gpu --image REGISTRY/dice-pipeline:0.1.0 --gpus 8 \
    --store s3://BUCKET/dice --namespace dice

`cpu` makes a process pool (`dice-cpu`) whose runs start in this checkout; `gpu` makes a
Kubernetes pool (`dice-gpu`) from deployments/kubernetes-gpu-template.json, one Job with
`--gpus` GPUs per flow run, running the image built from deployments/Dockerfile. Both then
create the tag limit `gpu` (stages tagged `gpu` run one at a time across all runs) and deploy
prefect.yaml to the pool. Each step is a `prefect` command, printed before it runs, against
the API of the current profile or PREFECT_API_URL; running the setup again updates in place.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

PROJECT_ROOT = Path(__file__).resolve().parent.parent
GPU_TEMPLATE = Path(__file__).resolve().parent / "kubernetes-gpu-template.json"
IMAGE_PROJECT_DIR = "/opt/dice"
GPU_TAG = "gpu"


class SetupError(RuntimeError):
    """A `prefect` command of the setup failed."""


def prefect(args: list[str], env: dict[str, str] | None = None) -> str:
    """Run one `prefect` command from the project folder, echoing it; returns its output.

    Raises:
        SetupError: The command exited with an error; the message carries its output.
    """
    print("$ prefect " + " ".join(args), flush=True)
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=PROJECT_ROOT,
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip()
        raise SetupError(f"`prefect {' '.join(args)}` failed ({done.returncode}):\n{output}")
    return done.stdout


def gpu_template(
    image: str, gpus: int, namespace: str, store: str | None, template: Path = GPU_TEMPLATE
) -> dict[str, Any]:
    """The Kubernetes base job template with this cluster's defaults filled in.

    Args:
        image: The image built from deployments/Dockerfile.
        gpus: nvidia.com/gpu per flow run.
        namespace: Where the Jobs are created.
        store: DICE_STORE of every run (s3://bucket/prefix); None keeps the template's.
        template: The template file.

    Returns:
        The template, ready for `prefect work-pool create --base-job-template`.
    """
    if gpus < 1:
        raise ValueError(f"--gpus must be 1 or more (got {gpus})")
    data = json.loads(template.read_text())
    properties = data["variables"]["properties"]
    properties["image"]["default"] = image
    properties["gpus"]["default"] = gpus
    properties["namespace"]["default"] = namespace
    if store:
        properties["env"]["default"]["DICE_STORE"] = store
    return data


def create_pool(name: str, kind: str, template: dict[str, Any] | None = None) -> None:
    """Create the work pool, or update it when it exists."""
    args = ["work-pool", "create", name, "--type", kind, "--overwrite"]
    if template is None:
        prefect(args)
        return
    with tempfile.TemporaryDirectory() as scratch:
        path = Path(scratch) / f"{name}-template.json"
        path.write_text(json.dumps(template, indent=2))
        prefect([*args, "--base-job-template", str(path)])


def create_gpu_limit(slots: int) -> None:
    """At most `slots` task runs tagged `gpu` at once, across all flow runs."""
    prefect(["concurrency-limit", "create", GPU_TAG, str(slots)])


def deploy(pool: str, project_dir: str, recipe: str) -> None:
    """Deploy prefect.yaml's three deployments to `pool`."""
    env = {"DICE_WORK_POOL": pool, "DICE_PROJECT_DIR": project_dir, "DICE_RECIPE": recipe}
    print("  with " + " ".join(f"{k}={v}" for k, v in env.items()), flush=True)
    prefect(["--no-prompt", "deploy", "--all"], env)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m deployments.setup", description=__doc__.split("\n\n")[0]
    )
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--gpu-slots", type=int, default=1, help="tasks tagged gpu at once")
    common.add_argument("--no-deploy", action="store_true", help="pool and limit only")
    kinds = parser.add_subparsers(dest="kind", required=True)
    cpu = kinds.add_parser("cpu", parents=[common], help="a process pool running this checkout")
    cpu.add_argument("--pool", default="dice-cpu")
    cpu.add_argument("--project-dir", default=str(PROJECT_ROOT), help="the code's folder")
    cpu.add_argument("--recipe", default="cpu-smollm2", help="the run form's first recipe")
    gpu = kinds.add_parser("gpu", parents=[common], help="a Kubernetes pool, GPUs per flow run")
    gpu.add_argument("--pool", default="dice-gpu")
    gpu.add_argument("--image", required=True, help="built from deployments/Dockerfile")
    gpu.add_argument("--gpus", type=int, default=8, help="nvidia.com/gpu per flow run")
    gpu.add_argument("--namespace", default="default")
    gpu.add_argument("--store", help="DICE_STORE of the runs, s3://bucket/prefix")
    gpu.add_argument("--recipe", default="zephyr-7b", help="the run form's first recipe")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.kind == "cpu":
            create_pool(args.pool, "process")
            project_dir = args.project_dir
        else:
            template = gpu_template(args.image, args.gpus, args.namespace, args.store)
            create_pool(args.pool, "kubernetes", template)
            project_dir = IMAGE_PROJECT_DIR
        create_gpu_limit(args.gpu_slots)
        if not args.no_deploy:
            deploy(args.pool, project_dir, args.recipe)
    except (SetupError, ValueError) as error:
        print(f"setup failed: {error}", file=sys.stderr)
        return 1
    worker = f"prefect worker start --pool {args.pool}"
    if args.kind == "gpu":
        worker += "  (in the cluster, where prefect-kubernetes is installed)"
    print(f"done; start a worker with: {worker}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
