"""The requirements of the GPU image: the project's pins, then vLLM's own requirements less
the bounds that contradict them.

pip install --no-deps vllm==0.32.0
python deployments/image_requirements.py pyproject.toml > requirements.txt

vLLM 0.32 (the last release on the project's torch 2.13.0) asks for fastapi < 0.137, which
Prefect 3.9.1 (fastapi >= 0.139) excludes, and for transformers < 5.20, where the project pins
5.25. vLLM's offline engine, the one the generation stage runs, does not import fastapi; the
image keeps the project's transformers, so generation with vLLM under transformers 5.25 is
untested until a GPU run says otherwise (`generation.engine: transformers` avoids it).
"""

from __future__ import annotations

import re
import sys
import tomllib
from importlib.metadata import requires
from pathlib import Path

# vLLM requirements the image drops, and why: the project's own pins decide these.
OVERRIDDEN = ("fastapi", "transformers")


def requirement_name(requirement: str) -> str:
    """The normalised project name of a requirement string (`Foo_bar[x]>=1` -> `foo-bar`)."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", requirement)
    if not match:
        raise ValueError(f"not a requirement: {requirement!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def image_requirements(project: list[str], vllm: list[str]) -> list[str]:
    """The project's requirements, then vLLM's that are neither extras nor overridden (pip
    still sees both sides of any other conflict, and refuses it).

    Args:
        project: `[project].dependencies` of pyproject.toml.
        vllm: vLLM's `Requires-Dist` lines.

    Returns:
        One requirement a line, for `pip install -r`.
    """
    kept = [r for r in vllm if "extra ==" not in r and requirement_name(r) not in OVERRIDDEN]
    return [*project, *kept]


def main(pyproject: str) -> None:
    project = tomllib.loads(Path(pyproject).read_text())["project"]["dependencies"]
    print("\n".join(image_requirements(project, requires("vllm") or [])))


if __name__ == "__main__":
    main(sys.argv[1])
