"""The DPO stage: TRL's DPOTrainer on chat-rendered pairs, in this process or under accelerate.

Each pair is one non-conversational row: the prompt rendered by the policy's chat template
(`tokens.render_prompt`), the chosen and rejected texts with EOS appended by the trainer, so
the tokens trained on are the tokens `tokens.encode_response` scores. The reference of the DPO
loss is the round's start policy. Reference log-probs supplied with the pairs (summed over the
response and EOS, as the rewards stage computes them) are used as they are, and the reference
model is then never loaded; pairs without them, and pairs the cutoff truncates, get theirs from
one reference forward before the first step.

Single process is the default. With `num_processes > 1` or a DeepSpeed section, the training
runs in a child `accelerate launch` of this module, which reads a JSON job file:

    accelerate launch --config_file ACCELERATE.yaml -m dice_core.training JOB.json

TRL 1.16 is pinned: the reference log-probs are supplied by overriding the trainer's private
precompute step, whose shape is tested in `tests/test_training.py`.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import random
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dice_core.config import TrainingConfig
from dice_core.errors import DataError, RecipeError, StageError

# Named, not __name__: the launched child runs this module as __main__.
log = logging.getLogger("dice_core.training")
child_log = logging.getLogger("dice_core.training.child")

PINNED_TRL = "1.16."
PROGRESS_MARK = "@dice-progress@ "
LOG_MARK = "@dice-log@ "
_CHILD_TAIL_LINES = 400
_REF_KEYS = ("ref_chosen_logps", "ref_rejected_logps")
_REWARD_KEYS = ("rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies")
_LAUNCHER_ERRORS = ("ChildFailedError", "CalledProcessError")
_EXCEPTION_LINE = re.compile(r"^(\[rank\d+\]:\s*)?[\w.]*(Error|Exception|Interrupt)\b")


@dataclass
class TrainResult:
    """What a DPO run produced.

    `metrics` holds one dict per optimiser step: step, loss, rewards/chosen, rewards/rejected,
    rewards/margins, rewards/accuracies, learning_rate, grad_norm, tokens (prompt and
    response tokens of the step's chosen and rejected sequences, all processes), seconds.
    """

    output_dir: Path
    steps: int
    final_loss: float
    metrics: list[dict]
    dropped_truncated: int
    global_batch: int
    seconds: float
    epochs: float = 0.0
    reference_computed: int = 0
    peak_memory_mb: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class LaunchPlan:
    """How a training job is laid out over processes."""

    processes: int
    zero_stage: int | None
    per_device_batch: int
    accumulation: int
    global_batch: int
    steps: int
    learning_rate: float
    lr_scheduler: str
    warmup_steps: int

    @property
    def distributed(self) -> bool:
        """Whether the job runs in a child `accelerate launch` rather than in this process."""
        return self.processes > 1 or self.zero_stage is not None

    def as_dict(self) -> dict[str, Any]:
        """The plan's fields and `distributed`, for printing."""
        return {**asdict(self), "distributed": self.distributed}


# ---------------------------------------------------------------------------------------------
# Launch plan and DeepSpeed settings


def build_launch_plan(config: TrainingConfig) -> LaunchPlan:
    """Lay a training config out over processes and check its global batch.

    Args:
        config: The DPO settings.

    Returns:
        The plan: global batch = per-device batch x accumulation x processes.

    Raises:
        RecipeError: `global_batch_size` is set and differs from that product.
    """
    global_batch = (
        config.per_device_batch_size * config.gradient_accumulation_steps * config.num_processes
    )
    if config.global_batch_size is not None and config.global_batch_size != global_batch:
        raise RecipeError(
            f"training.global_batch_size is {config.global_batch_size}, but "
            f"training.per_device_batch_size ({config.per_device_batch_size}) x "
            f"training.gradient_accumulation_steps ({config.gradient_accumulation_steps}) x "
            f"training.num_processes ({config.num_processes}) = {global_batch}"
        )
    return LaunchPlan(
        processes=config.num_processes,
        zero_stage=config.deepspeed.zero_stage if config.deepspeed else None,
        per_device_batch=config.per_device_batch_size,
        accumulation=config.gradient_accumulation_steps,
        global_batch=global_batch,
        steps=config.max_steps,
        learning_rate=config.learning_rate,
        lr_scheduler=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
    )


def deepspeed_config(config: TrainingConfig) -> dict[str, Any]:
    """The DeepSpeed JSON for a training config.

    Micro batch and accumulation are explicit and `train_batch_size` is left out, so DeepSpeed
    derives it from the real process count. There is no optimizer or scheduler section: the
    trainer's AdamW and learning-rate schedule are used, as without DeepSpeed. ZeRO-3 gathers
    the full weights when the model is saved.

    Args:
        config: The DPO settings; `config.deepspeed` must be set.

    Returns:
        The DeepSpeed config as a JSON-ready dict.

    Raises:
        ValueError: `config.deepspeed` is not set.
    """
    if config.deepspeed is None:
        raise ValueError("training.deepspeed is not set: there is no DeepSpeed config to build")
    ds = config.deepspeed
    zero: dict[str, Any] = {"stage": ds.zero_stage, "contiguous_gradients": True}
    if ds.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = True
    if ds.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": False}
    if ds.offload_params:
        if ds.zero_stage != 3:
            raise ValueError("training.deepspeed.offload_params needs zero_stage 3")
        zero["offload_param"] = {"device": "cpu", "pin_memory": False}
    return {
        "train_micro_batch_size_per_gpu": config.per_device_batch_size,
        "gradient_accumulation_steps": config.gradient_accumulation_steps,
        "gradient_clipping": config.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": config.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def has_accelerator() -> bool:
    """Whether torch sees a GPU (or another accelerator) on this machine."""
    return torch.accelerator.current_accelerator() is not None


def effective_config(config: TrainingConfig) -> TrainingConfig:
    """The config as it will run here: bf16 is switched off on a machine without accelerator."""
    if config.bf16 and not has_accelerator():
        return config.model_copy(update={"bf16": False})
    return config


# ---------------------------------------------------------------------------------------------
# Pairs: checks, tokenisation, truncation, layout over steps


@dataclass(frozen=True)
class PairPlan:
    """Which pairs train, which need a reference forward, and the row order over all steps."""

    kept: list[int]
    dropped_truncated: int
    recompute: set[int]
    order: list[int]

    @property
    def epochs(self) -> float:
        return len(self.order) / len(self.kept)


def _check_pairs(pairs: list[dict]) -> None:
    """Raise DataError naming the first malformed pair."""
    if not pairs:
        raise DataError("no training pairs: expected at least one {prompt, chosen, rejected}")
    for i, pair in enumerate(pairs):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(pair.get(key), str):
                got = type(pair.get(key)).__name__
                raise DataError(f"training pair {i}: `{key}` must be a string, got {got}")
        _supplied_pair(pair, i)


def _supplied_pair(pair: dict, i: int) -> tuple[float, float] | None:
    """A pair's supplied reference log-probs, or None when it carries none (missing or null)."""
    values = [pair.get(key) for key in _REF_KEYS]
    if all(v is None for v in values):
        return None
    if any(isinstance(v, bool) or not isinstance(v, int | float) for v in values):
        raise DataError(
            f"training pair {i}: ref_chosen_logps and ref_rejected_logps must both be numbers, "
            f"got {values[0]!r} and {values[1]!r}"
        )
    if not all(math.isfinite(v) for v in values):
        raise DataError(f"training pair {i}: reference log-probs must be finite, got {values}")
    return float(values[0]), float(values[1])


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = min(len(a), len(b))
    return next((i for i in range(n) if a[i] != b[i]), n)


def _token_view(
    tokenizer, prompt_text: str, chosen: str, rejected: str
) -> tuple[int, int, int, bool]:
    """Prompt, prompt+chosen and prompt+rejected lengths as the trainer tokenises them, and
    whether chosen and rejected split from the prompt at the same token."""
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    chosen_ids = tokenizer(prompt_text + chosen + eos)["input_ids"]
    rejected_ids = tokenizer(prompt_text + rejected + eos)["input_ids"]
    split_c = _common_prefix(prompt_ids, chosen_ids)
    split_r = _common_prefix(prompt_ids, rejected_ids)
    return min(split_c, split_r), len(chosen_ids), len(rejected_ids), split_c == split_r


def plan_pairs(
    tokenizer, rows: list[dict], max_length: int, total_rows: int, seed: int
) -> PairPlan:
    """Apply the trainer's truncation rules ahead of it, and lay pairs out over the steps.

    A pair whose prompt alone reaches `max_length` is dropped (the trainer would drop it
    silently). A pair whose chosen or rejected sequence exceeds `max_length` is truncated by
    the trainer, so its supplied reference log-probs (full-length sums) are recomputed; so are
    pairs whose chosen and rejected split from the prompt at different tokens. Kept pairs are
    laid out epoch after epoch, each epoch in a fresh order drawn from `seed`, and cut at
    `total_rows`: every optimiser step sees exactly one global batch.

    Args:
        tokenizer: The policy's tokenizer.
        rows: Pairs with `prompt` already rendered by the chat template.
        max_length: The cutoff of prompt + response tokens.
        total_rows: Steps x global batch.
        seed: Seed of the epoch orders.

    Returns:
        The plan.

    Raises:
        DataError: Every pair is dropped.
    """
    kept, recompute = [], set()
    for i, row in enumerate(rows):
        prompt_len, chosen_len, rejected_len, aligned = _token_view(
            tokenizer, row["prompt"], row["chosen"], row["rejected"]
        )
        if prompt_len >= max_length:
            continue
        kept.append(i)
        if max(chosen_len, rejected_len) > max_length or not aligned:
            recompute.add(i)
    if not kept:
        raise DataError(
            f"all {len(rows)} training pairs have prompts of at least training.max_length "
            f"({max_length}) tokens: nothing to train on"
        )
    rng = random.Random(seed)
    order: list[int] = []
    while len(order) < total_rows:
        epoch = list(kept)
        rng.shuffle(epoch)
        order.extend(epoch)
    return PairPlan(kept, len(rows) - len(kept), recompute, order[:total_rows])


def _supplied_logps(pairs: list[dict], plan: PairPlan) -> dict[int, tuple[float, float]]:
    """Supplied reference log-probs of the kept pairs that are used as they are."""
    supplied = {i: _supplied_pair(pairs[i], i) for i in plan.kept if i not in plan.recompute}
    return {i: values for i, values in supplied.items() if values is not None}


# ---------------------------------------------------------------------------------------------
# The trainer


class _SuppliedReference:
    """DPOTrainer mixin: reference log-probs come from the pairs where supplied, else from one
    reference forward over the pairs that lack them; no telemetry is sent."""

    def __init__(self, *args, supplied: dict, reference_dir: Path | None, **kwargs) -> None:
        self._supplied = supplied
        self._reference_dir = reference_dir
        self.reference_computed = 0
        super().__init__(*args, **kwargs)

    def _send_telemetry(self) -> None:
        return None

    def _precompute_ref_logps(self, dataset, name: str, batch_size: int):
        # TRL 1.16 calls this once from __init__ on the tokenised, filtered dataset.
        index = dataset["pair_index"]
        missing = sorted({i for i in index if i not in self._supplied})
        values = dict(self._supplied)
        if missing:
            values.update(self._reference_forward(dataset, index, missing, batch_size))
        self.reference_computed = len(missing)
        dataset = dataset.add_column("ref_chosen_logps", [values[i][0] for i in index])
        return dataset.add_column("ref_rejected_logps", [values[i][1] for i in index])

    def _reference_forward(self, dataset, index: list[int], missing: list[int], batch_size: int):
        """Reference sums of the `missing` pairs, by TRL's own collator and forward."""
        from torch.utils.data import DataLoader

        first_row: dict[int, int] = {}
        for row, pair in enumerate(index):
            first_row.setdefault(pair, row)
        subset = dataset.select([first_row[i] for i in missing])
        subset = subset.select_columns(["prompt_ids", "chosen_ids", "rejected_ids"])
        loader = DataLoader(subset, batch_size=batch_size, collate_fn=self.data_collator)
        loader = self.accelerator.prepare(loader)
        chosen, rejected = [], []
        with self._reference_model() as model:
            for batch in loader:
                c, r = self.compute_ref_log_probs(model, batch)
                c, r = self.accelerator.gather_for_metrics((c, r))
                chosen.extend(c.float().cpu().tolist())
                rejected.extend(r.float().cpu().tolist())
        return {i: (chosen[k], rejected[k]) for k, i in enumerate(missing)}

    @contextlib.contextmanager
    def _reference_model(self) -> Iterator[Any]:
        """The reference, ready for forwards: the untrained policy, or a model loaded for it."""
        from trl.models import prepare_deepspeed
        from trl.trainer.utils import (
            add_fused_lm_head,
            create_model_from_path,
            disable_dropout_in_model,
        )

        if self._reference_dir is None:
            # The reference is the policy itself, read before any optimiser step.
            model = self.model
        else:
            model = create_model_from_path(str(self._reference_dir), dtype=self.model.dtype)
            disable_dropout_in_model(model)
            add_fused_lm_head(model)
            if not self.is_deepspeed_enabled:
                model = self.accelerator.prepare_model(model, evaluation_mode=True)
        if self.is_deepspeed_enabled:
            model = prepare_deepspeed(model, self.accelerator)
        try:
            yield model
        finally:
            del model
            gc.collect()


@functools.cache
def _trainer_class() -> type:
    """TRL's DPOTrainer with `_SuppliedReference` (built on first use: TRL imports slowly)."""
    import trl
    from trl import DPOTrainer

    if not trl.__version__.startswith(PINNED_TRL):
        raise RuntimeError(
            f"dice_core.training overrides a private step of TRL {PINNED_TRL}x, found TRL "
            f"{trl.__version__}: install trl=={PINNED_TRL}*"
        )
    return type("DiceDPOTrainer", (_SuppliedReference, DPOTrainer), {})


class _StepLog:
    """TrainerCallback mixin: each optimiser step's log becomes metrics, a line and a call."""

    def __init__(
        self, total: int, label: str, progress: Callable[[dict], None] | None, sink: list[dict]
    ) -> None:
        self.total, self.label, self.progress, self.sink = total, label, progress, sink
        self.start = self.last = time.monotonic()
        self.tokens_seen = 0

    def on_train_begin(self, args, state, control, **kwargs) -> None:
        self.start = self.last = time.monotonic()

    def on_log(self, args, state, control, logs=None, **kwargs) -> None:
        if not logs or "loss" not in logs or not state.is_world_process_zero:
            return
        now = time.monotonic()
        tokens = int(logs.get("num_tokens", 0)) - self.tokens_seen
        self.tokens_seen += tokens
        metrics = {
            "step": state.global_step,
            "loss": float(logs["loss"]),
            **{k: float(logs.get(k, math.nan)) for k in _REWARD_KEYS},
            "learning_rate": float(logs.get("learning_rate", math.nan)),
            "grad_norm": float(logs.get("grad_norm", math.nan)),
            "tokens": tokens,
            "seconds": now - self.last,
        }
        self.last = now
        self.sink.append(metrics)
        log.info(_step_line(self.label, metrics, self.total, now - self.start))
        if self.progress is not None:
            self.progress(metrics)


def _step_callback(
    total: int, label: str, progress: Callable[[dict], None] | None, sink: list[dict]
):
    """A TrainerCallback that logs each optimiser step and appends its metrics to `sink`."""
    from transformers import TrainerCallback

    return type("StepLog", (_StepLog, TrainerCallback), {})(total, label, progress, sink)


def _step_line(label: str, m: dict, total: int, elapsed: float) -> str:
    """`dpo 3/20 | loss: 0.6931 | ... | 412 tok/s | 1m20s left`."""
    left = elapsed / m["step"] * (total - m["step"])
    rate = m["tokens"] / m["seconds"] if m["seconds"] > 0 else 0.0
    return (
        f"{label} {m['step']}/{total} | loss: {m['loss']:.4f} | "
        f"margin: {m['rewards/margins']:.4f} | acc: {m['rewards/accuracies']:.2f} | "
        f"chosen: {m['rewards/chosen']:.4f} | rejected: {m['rewards/rejected']:.4f} | "
        f"lr: {m['learning_rate']:.2e} | grad: {m['grad_norm']:.3f} | "
        f"{rate:.0f} tok/s | {int(left) // 60}m{int(left) % 60:02d}s left"
    )


def _dpo_args(config: TrainingConfig, scratch: Path, deepspeed_file: Path | None, **extra):
    """TRL's DPOConfig from ours; every TRL default that matters is set explicitly."""
    from trl import DPOConfig

    return DPOConfig(
        output_dir=str(scratch),
        beta=config.beta,
        loss_type=["sigmoid"],
        learning_rate=config.learning_rate,
        lr_scheduler_type=config.lr_scheduler,
        warmup_steps=config.warmup_steps,
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        max_length=config.max_length,
        truncation_mode="keep_start",
        bf16=config.bf16,
        activation_checkpointing=config.gradient_checkpointing,
        weight_decay=config.weight_decay,
        max_grad_norm=config.max_grad_norm,
        seed=config.seed,
        data_seed=config.seed,
        precompute_ref_log_probs=True,
        precompute_ref_batch_size=config.per_device_batch_size,
        train_sampling_strategy="sequential",
        model_init_kwargs={"dtype": "float32"},
        deepspeed=str(deepspeed_file) if deepspeed_file else None,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        disable_tqdm=True,
        dataloader_num_workers=0,
        dataloader_pin_memory=has_accelerator(),
        **extra,
    )


def _use_gloo_for_deepspeed_on_cpu() -> dict[str, Any]:
    """Without an accelerator, accelerate finds no distributed backend for a DeepSpeed launch and
    runs as one process while DeepSpeed sees all of them; set up its state with gloo first."""
    from accelerate import PartialState

    if has_accelerator() or "LOCAL_RANK" not in os.environ:
        return {}
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        return {}
    PartialState(backend="gloo")
    return {"accelerator_config": {"use_configured_state": True}}


def _peak_memory_mb() -> float:
    """This process's peak resident memory (or peak GPU memory where a GPU is used), in MB."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _build_trainer(
    policy_dir: Path,
    pairs: list[dict],
    config: TrainingConfig,
    scratch: Path,
    reference_dir: Path | None,
    callbacks: list,
    deepspeed_file: Path | None = None,
) -> tuple[Any, Any, PairPlan]:
    """The trainer, the tokenizer and the pair plan; reference log-probs are in place after it."""
    from datasets import Dataset
    from transformers import PrinterCallback

    from dice_core.models import load_tokenizer
    from dice_core.tokens import render_prompt

    plan = build_launch_plan(config)
    tokenizer = load_tokenizer(policy_dir)
    rows = [{**p, "prompt": render_prompt(tokenizer, p["prompt"])} for p in pairs]
    pair_plan = plan_pairs(
        tokenizer, rows, config.max_length, plan.steps * plan.global_batch, config.seed
    )
    columns = ("prompt", "chosen", "rejected")
    dataset = Dataset.from_list(
        [{**{k: rows[i][k] for k in columns}, "pair_index": i} for i in pair_plan.order]
    )
    extra = _use_gloo_for_deepspeed_on_cpu() if deepspeed_file else {}
    with _quiet_progress_bars():
        trainer = _trainer_class()(
            model=str(policy_dir),
            args=_dpo_args(config, scratch, deepspeed_file, **extra),
            train_dataset=dataset,
            processing_class=tokenizer,
            callbacks=callbacks,
            supplied=_supplied_logps(pairs, pair_plan),
            reference_dir=_distinct_reference(policy_dir, reference_dir),
        )
    trainer.remove_callback(PrinterCallback)
    if trainer.accelerator.num_processes != config.num_processes:
        raise RuntimeError(
            f"training.num_processes is {config.num_processes} but the trainer runs on "
            f"{trainer.accelerator.num_processes} process(es): the launch did not set up "
            "distributed training"
        )
    if len(trainer.train_dataset) != len(pair_plan.order):
        raise RuntimeError(
            f"the trainer kept {len(trainer.train_dataset)} of {len(pair_plan.order)} rows after "
            "its truncation filter: its tokenisation no longer matches plan_pairs"
        )
    return trainer, tokenizer, pair_plan


@contextlib.contextmanager
def _quiet_progress_bars() -> Iterator[None]:
    """Silence the datasets and transformers progress bars for a block, then restore them."""
    import datasets
    from transformers.utils import logging as hf_logging

    datasets_on = datasets.is_progress_bar_enabled()
    hf_on = hf_logging.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if datasets_on:
            datasets.enable_progress_bars()
        if hf_on:
            hf_logging.enable_progress_bar()


def _train_here(
    policy_dir: Path,
    pairs: list[dict],
    config: TrainingConfig,
    model_dir: Path,
    scratch: Path,
    reference_dir: Path | None,
    progress: Callable[[dict], None] | None,
    label: str,
    deepspeed_file: Path | None = None,
) -> TrainResult:
    """Run DPO in this process (one rank of a launch, or alone) and save into `model_dir`."""
    from accelerate.utils import gather_object

    start = time.monotonic()
    metrics: list[dict] = []
    callback = _step_callback(config.max_steps, label, progress, metrics)
    trainer, tokenizer, pair_plan = _build_trainer(
        policy_dir, pairs, config, scratch, reference_dir, [callback], deepspeed_file
    )
    trainer.train()
    with _quiet_progress_bars():
        _save(trainer, tokenizer, model_dir)
    peaks = gather_object([_peak_memory_mb()])
    return TrainResult(
        output_dir=model_dir,
        steps=trainer.state.global_step,
        final_loss=metrics[-1]["loss"] if metrics else math.nan,
        metrics=metrics,
        dropped_truncated=pair_plan.dropped_truncated,
        global_batch=build_launch_plan(config).global_batch,
        seconds=time.monotonic() - start,
        epochs=pair_plan.epochs,
        reference_computed=trainer.reference_computed,
        peak_memory_mb=[float(p) for p in peaks],
    )


def check_model_dir(path: Path, role: str) -> None:
    """Raise DataError unless `path` is a folder holding a transformers model config."""
    if not (Path(path) / "config.json").is_file():
        raise DataError(f"{role} model {path}: expected a model folder with config.json")


def _distinct_reference(policy_dir: Path, reference_dir: Path | None) -> Path | None:
    """The reference folder, or None when the reference is the policy itself."""
    if reference_dir is None or Path(reference_dir).resolve() == Path(policy_dir).resolve():
        return None
    return Path(reference_dir)


def _save(trainer, tokenizer, model_dir: Path) -> None:
    """Save safetensors weights, tokenizer and chat template from the main process.

    The full state dict comes from accelerate's gathering (under ZeRO-3 it assembles the
    shards; every process takes part).
    """
    wrapped = trainer.model_wrapped if trainer.is_deepspeed_enabled else trainer.model
    state_dict = trainer.accelerator.get_state_dict(wrapped)
    if trainer.accelerator.is_main_process:
        model = trainer.accelerator.unwrap_model(trainer.model)
        state_dict = _drop_tied_copy(model, state_dict)
        # Training switched the KV cache off; the saved model is for generation.
        model.config.get_text_config().use_cache = True
        model.save_pretrained(str(model_dir), state_dict=state_dict, safe_serialization=True)
        # An offline load marks the tokenizer local-only; that is no property of the model.
        tokenizer.init_kwargs.pop("local_files_only", None)
        tokenizer.save_pretrained(str(model_dir))
        if not any(model_dir.glob("*.safetensors")):
            raise StageError(f"{model_dir}: no safetensors weights were written")
    trainer.accelerator.wait_for_everyone()


def _drop_tied_copy(model, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keep one copy of tied input/output embeddings (a ZeRO-2 gather returns two)."""
    if not getattr(model.config.get_text_config(), "tie_word_embeddings", False):
        return state_dict
    names = {id(module): name for name, module in model.named_modules()}
    out_key = f"{names.get(id(model.get_output_embeddings()))}.weight"
    in_key = f"{names.get(id(model.get_input_embeddings()))}.weight"
    if out_key in state_dict and in_key in state_dict:
        if torch.equal(state_dict[out_key], state_dict[in_key]):
            return {k: v for k, v in state_dict.items() if k != out_key}
    return state_dict


# ---------------------------------------------------------------------------------------------
# Public entry points


def train_dpo(
    policy_dir: Path,
    pairs: list[dict],
    config: TrainingConfig,
    output_dir: Path,
    reference_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    *,
    label: str = "dpo",
) -> TrainResult:
    """DPO-train a policy on preference pairs and save it.

    With fewer kept pairs than `max_steps` x global batch, the pairs repeat epoch after epoch,
    each epoch in a new seeded order; with more, the first `max_steps` x global batch of one
    seeded order are used. Pairs carrying `ref_chosen_logps` / `ref_rejected_logps` use them;
    the others get theirs from one reference forward before training.

    Args:
        policy_dir: The start policy (safetensors model folder with tokenizer).
        pairs: Rows `{prompt, chosen, rejected}` with the raw user prompt, optionally with
            `ref_chosen_logps` and `ref_rejected_logps` (sums over response tokens and EOS).
        config: DPO settings.
        output_dir: Where the trained model goes; written beside it, renamed into place.
        reference_dir: The DPO reference; defaults to `policy_dir`.
        progress: Called with each optimiser step's metrics.
        label: First word of each progress line (stage and round).

    Returns:
        The run's result, with one metrics dict per optimiser step.

    Raises:
        DataError: A pair is malformed, the policy folder holds no model, or every pair is
            fully truncated.
        ValueError: The batch layout contradicts `global_batch_size`, or this machine cannot
            run the processes asked for.
        StageError: A launched training child failed.
    """
    _check_pairs(pairs)
    config = effective_config(config)
    plan = build_launch_plan(config)
    check_model_dir(policy_dir, "policy")
    if plan.distributed:
        return launch_training(
            policy_dir, pairs, config, output_dir, reference_dir, progress, label=label
        )
    with _staging(output_dir) as (model_dir, scratch):
        result = _train_here(
            Path(policy_dir), pairs, config, model_dir, scratch, reference_dir, progress, label
        )
    result.output_dir = Path(output_dir)
    return result


@contextlib.contextmanager
def _staging(output_dir: Path) -> Iterator[tuple[Path, Path]]:
    """A work folder beside `output_dir`; its `model` folder replaces `output_dir` on success."""
    output_dir = Path(output_dir)
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.dpo-", dir=output_dir.parent))
    try:
        yield work / "model", work / "trainer"
        if output_dir.exists():
            os.replace(output_dir, work / "previous")
        os.replace(work / "model", output_dir)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def launch_training(
    policy_dir: Path,
    pairs: list[dict],
    config: TrainingConfig,
    output_dir: Path,
    reference_dir: Path | None = None,
    progress: Callable[[dict], None] | None = None,
    *,
    label: str = "dpo",
) -> TrainResult:
    """Run DPO in a child `accelerate launch` when the config asks for processes or DeepSpeed.

    The child's output is streamed line by line: its step lines reach this module's logger at
    INFO, its metrics reach `progress`, and library output goes to the `child` logger at
    DEBUG. On a machine without GPU the child runs DeepSpeed's CPU accelerator with the gloo
    backend.

    Args:
        policy_dir: The start policy.
        pairs: Training pairs, as for `train_dpo`.
        config: DPO settings.
        output_dir: Where the trained model goes; written beside it, renamed into place.
        reference_dir: The DPO reference; defaults to `policy_dir`.
        progress: Called with each optimiser step's metrics.
        label: First word of each progress line.

    Returns:
        The run's result; `peak_memory_mb` holds one value per process.

    Raises:
        DataError: A pair is malformed or the policy folder holds no model.
        ValueError: The batch layout contradicts `global_batch_size`, or this machine cannot
            run the processes asked for.
        StageError: The child failed; the message carries its last output lines.
    """
    _check_pairs(pairs)
    config = effective_config(config)
    plan = build_launch_plan(config)
    check_model_dir(policy_dir, "policy")
    if not plan.distributed:
        return train_dpo(
            policy_dir, pairs, config, output_dir, reference_dir, progress, label=label
        )
    _check_devices(plan)
    with _staging(output_dir) as (model_dir, scratch):
        job_dir = scratch.parent / "job"
        job_dir.mkdir()
        job = _write_job(
            job_dir, policy_dir, pairs, config, model_dir, scratch, reference_dir, label
        )
        command = _launch_command(plan, config, job_dir, job)
        log.info(
            "%s: launching %d process(es), ZeRO stage %s, global batch %d",
            label,
            plan.processes,
            plan.zero_stage,
            plan.global_batch,
        )
        _run_child(command, _child_env(plan), progress)
        result = _read_result(job_dir / "result.json")
    result.output_dir = Path(output_dir)
    return result


def _check_devices(plan: LaunchPlan) -> None:
    """Refuse a launch this machine cannot run as asked.

    Raises:
        ValueError: Several processes without DeepSpeed on a machine without GPU (accelerate
            would start one process and train with a smaller batch), or more processes than GPUs.
    """
    if not has_accelerator():
        if plan.processes > 1 and plan.zero_stage is None:
            raise ValueError(
                f"training.num_processes is {plan.processes} without training.deepspeed on a "
                "machine without GPU: set training.deepspeed (ZeRO-2 or 3 run on CPU) or "
                "training.num_processes: 1"
            )
        return
    if torch.cuda.is_available() and torch.cuda.device_count() < plan.processes:
        raise ValueError(
            f"training.num_processes is {plan.processes} but {torch.cuda.device_count()} "
            "GPU(s) are visible"
        )


def _write_job(
    job_dir: Path,
    policy_dir: Path,
    pairs: list[dict],
    config: TrainingConfig,
    model_dir: Path,
    scratch: Path,
    reference_dir: Path | None,
    label: str,
) -> Path:
    """Write the pairs and the job description the child reads."""
    pairs_file = job_dir / "pairs.jsonl"
    with pairs_file.open("w") as f:
        for pair in pairs:
            f.write(json.dumps(pair) + "\n")
    deepspeed_file = None
    if config.deepspeed is not None:
        deepspeed_file = job_dir / "deepspeed.json"
        deepspeed_file.write_text(json.dumps(deepspeed_config(config), indent=2))
    job = {
        "policy_dir": str(Path(policy_dir).resolve()),
        "reference_dir": str(Path(reference_dir).resolve()) if reference_dir else None,
        "pairs_file": str(pairs_file),
        "config": config.model_dump(mode="json"),
        "model_dir": str(model_dir),
        "scratch": str(scratch),
        "deepspeed_file": str(deepspeed_file) if deepspeed_file else None,
        "result_file": str(job_dir / "result.json"),
        "label": label,
    }
    path = job_dir / "job.json"
    path.write_text(json.dumps(job, indent=2))
    return path


def _free_port() -> int:
    """A free TCP port on 127.0.0.1 for the launch's rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(
    plan: LaunchPlan, config: TrainingConfig, job_dir: Path, job: Path
) -> list[str]:
    """`accelerate launch` of this module with an accelerate config written for the plan."""
    lines = [
        "compute_environment: LOCAL_MACHINE",
        f"num_processes: {plan.processes}",
        "num_machines: 1",
        "machine_rank: 0",
        "main_process_ip: 127.0.0.1",
        f"main_process_port: {_free_port()}",
        "rdzv_backend: static",
        "same_network: true",
    ]
    if plan.zero_stage is not None:
        # mixed_precision and use_cpu stay out: DeepSpeed reads precision from its own file.
        lines += [
            "distributed_type: DEEPSPEED",
            "deepspeed_config:",
            f"  deepspeed_config_file: {job_dir / 'deepspeed.json'}",
            f"  zero3_init_flag: {'true' if plan.zero_stage == 3 else 'false'}",
        ]
    else:
        lines += ["distributed_type: MULTI_GPU", f"mixed_precision: {_precision(config)}"]
    accelerate_file = job_dir / "accelerate.yaml"
    accelerate_file.write_text("\n".join(lines) + "\n")
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(accelerate_file),
        "-m",
        "dice_core.training",
        str(job),
    ]


def _precision(config: TrainingConfig) -> str:
    return "bf16" if config.bf16 else "'no'"


def _child_env(plan: LaunchPlan) -> dict[str, str]:
    """The child's environment: unbuffered, no progress bars, no telemetry, CPU DeepSpeed."""
    env = dict(os.environ)
    env.update(
        PYTHONUNBUFFERED="1",
        TQDM_DISABLE="1",
        HF_DATASETS_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
    )
    # torch.distributed warns of deprecated collectives on every step DeepSpeed takes.
    env.setdefault("PYTHONWARNINGS", "ignore::FutureWarning")
    if not has_accelerator():
        env["DS_ACCELERATOR"] = "cpu"
        env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // plan.processes)))
    root = str(Path(__file__).resolve().parent.parent)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


def _run_child(
    command: list[str], env: dict[str, str], progress: Callable[[dict], None] | None
) -> None:
    """Run the launch, stream its lines into the logger, raise with its tail on failure."""
    tail: deque[str] = deque(maxlen=_CHILD_TAIL_LINES)
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        bufsize=1,
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        for raw in proc.stdout:
            line = raw.rstrip("\n")
            if PROGRESS_MARK not in line:
                tail.append(line)
            _relay(line, progress)
        code = proc.wait()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=30)
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
    if code != 0:
        last = "\n".join(_error_tail(tail))
        raise StageError(f"DPO training child exited with code {code}; its last lines:\n{last}")


def _relay(line: str, progress: Callable[[dict], None] | None) -> None:
    """Route one child line: step metrics to `progress`, the project's log records to this
    module's logger at their level, anything else (library output) to the child logger at
    DEBUG."""
    if (mark := line.find(PROGRESS_MARK)) >= 0:
        if progress is not None:
            progress(json.loads(line[mark + len(PROGRESS_MARK) :]))
    elif (mark := line.find(LOG_MARK)) >= 0:
        level, _, message = line[mark + len(LOG_MARK) :].partition(" ")
        log.log(logging.getLevelNamesMapping().get(level, logging.INFO), message)
    else:
        child_log.debug(line)


def _error_tail(lines: deque[str]) -> list[str]:
    """The lines that end with the child's last own exception, else its last lines."""
    items = list(lines)
    ends = [
        i
        for i, line in enumerate(items)
        if _EXCEPTION_LINE.match(line) and not any(w in line for w in _LAUNCHER_ERRORS)
    ]
    if not ends:
        return items[-15:]
    return items[max(0, ends[-1] - 12) : ends[-1] + 1]


def _read_result(path: Path) -> TrainResult:
    if not path.is_file():
        raise StageError(f"{path}: the training child ended without writing its result")
    data = json.loads(path.read_text())
    data["output_dir"] = Path(data["output_dir"])
    return TrainResult(**data)


# ---------------------------------------------------------------------------------------------
# Child entry point


def _child_main(job_file: Path) -> None:
    """One rank of a launched job: train, and on rank 0 write the result file."""
    job = json.loads(Path(job_file).read_text())
    config = TrainingConfig.model_validate(job["config"])
    with open(job["pairs_file"]) as f:
        pairs = [json.loads(line) for line in f]
    rank = int(os.environ.get("RANK", "0"))
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter(LOG_MARK + "%(levelname)s %(message)s"))
    project = logging.getLogger("dice_core")
    project.addHandler(handler)
    project.setLevel(logging.INFO if rank == 0 else logging.WARNING)
    project.propagate = False

    def report(metrics: dict) -> None:
        print(PROGRESS_MARK + json.dumps(metrics), flush=True)

    deepspeed_file = Path(job["deepspeed_file"]) if job["deepspeed_file"] else None
    result = _train_here(
        Path(job["policy_dir"]),
        pairs,
        config,
        Path(job["model_dir"]),
        Path(job["scratch"]),
        Path(job["reference_dir"]) if job["reference_dir"] else None,
        report,
        job["label"],
        deepspeed_file,
    )
    if rank == 0:
        data = asdict(result)
        data["output_dir"] = str(result.output_dir)
        Path(job["result_file"]).write_text(json.dumps(data))
        log.info(
            "%s: peak memory per process (MB): %s",
            job["label"],
            ", ".join(f"{p:.0f}" for p in result.peak_memory_mb),
        )


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dice_core.training JOB.json")
    _child_main(Path(sys.argv[1]))


def benchmark_reference_reuse(
    policy_dir: Path, pairs: list[dict], config: TrainingConfig, scratch: Path
) -> dict[str, float]:
    """Time the same DPO steps twice in one process: with the reference log-probs supplied
    (as the rewards stage hands them over for on-policy pairs) and with the reference model
    computing them. The supplied values are computed first, untimed, by the rewards scorer.

    Args:
        policy_dir: The start policy, which is also the reference.
        pairs: `{prompt, chosen, rejected}` rows.
        config: DPO settings (steps, batch, cutoff).
        scratch: A folder for the two trained models.

    Returns:
        Wall seconds of each run, mean seconds per step, and their ratio.
    """
    supplied = _with_reference_logps(policy_dir, pairs)
    timings = {}
    for name, data in (("computed", pairs), ("supplied", supplied)):
        started = time.monotonic()
        result = train_dpo(policy_dir, data, config, scratch / name, label=f"bench-{name}")
        timings[f"{name}_seconds"] = time.monotonic() - started
        timings[f"{name}_reference_forwards"] = result.reference_computed
        timings[f"{name}_final_loss"] = result.final_loss
    timings["ratio_computed_over_supplied"] = (
        timings["computed_seconds"] / timings["supplied_seconds"]
    )
    return timings


def _with_reference_logps(policy_dir: Path, pairs: list[dict]) -> list[dict]:
    """The pairs with the policy's own log-prob sums as reference, from the rewards scorer."""
    from dice_core.config import RewardsConfig
    from dice_core.rewards import score_samples

    rows = [
        {"prompt": p["prompt"], "response": p[side]}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    logps = score_samples(str(policy_dir), str(policy_dir), rows, RewardsConfig())
    return [
        {
            **p,
            "ref_chosen_logps": logps[2 * i]["policy_logp"],
            "ref_rejected_logps": logps[2 * i + 1]["policy_logp"],
        }
        for i, p in enumerate(pairs)
    ]


# The DPOConfig fields whose TRL defaults `benchmark_against_trl` reports.
TRL_DEFAULT_FIELDS = (
    "bf16",
    "activation_checkpointing",
    "padding_free",
    "pad_to_multiple_of",
    "precompute_ref_log_probs",
    "learning_rate",
    "lr_scheduler_type",
    "warmup_steps",
    "weight_decay",
    "max_grad_norm",
    "max_length",
    "truncation_mode",
    "loss_type",
    "beta",
    "disable_dropout",
    "logging_steps",
    "seed",
)
# Settings of ours that do not change the speed, set as TRL's defaults so that the two loss
# curves can be compared: TRL decays the learning rate linearly to zero over the steps.
_TRL_SCHEDULE = {
    "lr_scheduler": "linear",
    "warmup_steps": 0,
    "weight_decay": 0.0,
    "max_grad_norm": 1.0,
    "seed": 42,
}


def trl_defaults(scratch: Path) -> dict[str, Any]:
    """The installed TRL's DPOConfig defaults, as resolved on this machine.

    Without an accelerator only `use_cpu=True` is added: TRL's default bf16 refuses to
    build a config on CPU otherwise.
    """
    import trl
    from trl import DPOConfig

    args = DPOConfig(output_dir=str(scratch), use_cpu=not has_accelerator())
    # Enum fields (the scheduler) are reported by their value.
    found = {
        name: getattr(getattr(args, name), "value", getattr(args, name))
        for name in TRL_DEFAULT_FIELDS
    }
    return {"trl_version": trl.__version__, "use_cpu": args.use_cpu, **found}


def benchmark_against_trl(
    policy_dir: Path, pairs: list[dict], config: TrainingConfig, scratch: Path
) -> dict[str, Any]:
    """Train the same pairs for the same steps with our training path and with TRL's
    DPOTrainer under its DPOConfig defaults, and compare tokens/s and losses.

    Ours: supplied reference log-probs (computed first, untimed, by the rewards scorer, as
    the rewards stage hands them over), fp32, the recipe's checkpointing. TRL: its defaults
    (bf16 autocast, activation checkpointing, a reference model run every step), with only
    the output folder, steps, batch, learning rate and cutoff set as ours, plus `use_cpu`
    without an accelerator and `logging_steps=1` to log each step's loss. Our learning-rate
    schedule, warmup, weight decay, clipping and seed are set to TRL's defaults. Both count
    real (unpadded) tokens the same way (TRL's `num_tokens`) and time the optimiser steps
    alone. With as many pairs as a step's global batch, every step of both sees every pair.

    The loss curves are compared against a third run, TRL's defaults with bf16 off: bf16
    autocast alone moves TRL's curve away from any fp32 run's (its rounding of the logits
    changes the updates), so only a run at the same precision can show that our path
    computes the same losses.

    Args:
        policy_dir: The start policy, which is also the reference.
        pairs: `{prompt, chosen, rejected}` rows.
        config: Our DPO settings (steps, batch, learning rate, cutoff, checkpointing).
        scratch: A folder for the runs' outputs.

    Returns:
        Seconds, tokens and tokens/s of each run (`ours`, `trl`, `trl_fp32`), the speed
        ratios, the loss curves, the largest difference of ours against each TRL run, and
        TRL's defaults (`trl_defaults`).
    """
    config = effective_config(config).model_copy(update=_TRL_SCHEDULE)
    supplied = _with_reference_logps(policy_dir, pairs)
    runs = {
        "ours": train_dpo(
            policy_dir, supplied, config, scratch / "ours", label="bench-ours"
        ).metrics,
        "trl": _train_with_trl_defaults(policy_dir, pairs, config, scratch / "trl"),
        "trl_fp32": _train_with_trl_defaults(
            policy_dir, pairs, config, scratch / "trl-fp32", bf16=False
        ),
    }
    result: dict[str, Any] = {
        "pairs": len(pairs),
        "global_batch": build_launch_plan(config).global_batch,
    }
    for name, metrics in runs.items():
        seconds = sum(m["seconds"] for m in metrics)
        tokens = sum(m["tokens"] for m in metrics)
        result.update(
            {
                f"{name}_steps": len(metrics),
                f"{name}_seconds": seconds,
                f"{name}_tokens": tokens,
                f"{name}_tokens_per_s": tokens / seconds,
                f"{name}_losses": [m["loss"] for m in metrics],
            }
        )
    for name in ("trl", "trl_fp32"):
        result[f"ratio_ours_over_{name}"] = (
            result["ours_tokens_per_s"] / result[f"{name}_tokens_per_s"]
        )
        steps = zip(result["ours_losses"], result[f"{name}_losses"], strict=True)
        result[f"max_loss_diff_{name}"] = max(abs(a - b) for a, b in steps)
    result["trl_defaults"] = trl_defaults(scratch / "defaults")
    return result


def _train_with_trl_defaults(
    policy_dir: Path, pairs: list[dict], config: TrainingConfig, scratch: Path, **changed: Any
) -> list[dict]:
    """TRL's DPOTrainer under DPOConfig defaults (but for the `changed` settings) on the
    chat-rendered pairs; each step's metrics as `_StepLog` records them. Nothing is saved
    and no telemetry is sent."""
    from datasets import Dataset
    from transformers import PrinterCallback, ProgressCallback
    from trl import DPOConfig, DPOTrainer

    from dice_core.models import load_tokenizer
    from dice_core.tokens import render_prompt

    tokenizer = load_tokenizer(policy_dir)
    rows = [
        {
            "prompt": render_prompt(tokenizer, p["prompt"]),
            **{k: p[k] for k in ("chosen", "rejected")},
        }
        for p in pairs
    ]
    args = DPOConfig(
        output_dir=str(scratch),
        max_steps=config.max_steps,
        per_device_train_batch_size=config.per_device_batch_size,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        learning_rate=config.learning_rate,
        max_length=config.max_length,
        use_cpu=not has_accelerator(),
        logging_steps=1,
        **changed,
    )
    metrics: list[dict] = []
    callback = _step_callback(config.max_steps, "bench-trl", None, metrics)
    trainer_class = type("QuietDPOTrainer", (DPOTrainer,), {"_send_telemetry": _no_telemetry})
    with _quiet_progress_bars():
        trainer = trainer_class(
            model=str(policy_dir),
            args=args,
            train_dataset=Dataset.from_list(rows),
            processing_class=tokenizer,
            callbacks=[callback],
        )
    for printer in (PrinterCallback, ProgressCallback):
        trainer.remove_callback(printer)
    trainer.train()
    return metrics


def _no_telemetry(self) -> None:
    return None
