"""AlpacaEval 2 judging: the weighted_alpaca_eval_gpt4_turbo protocol behind one interface.

The protocol is read at run time from the installed alpaca_eval package (its annotator
config and prompt template), so a judge sees the leaderboard's prompt: a system and a user
message that show the instruction and two outputs labelled "m" and "M". Which output is
shown first is a coin seeded by the instruction and a seed, recorded per judgement. The
judge answers one token; the preference is the expected label under the judge's
log-probabilities of "m" and "M" among its top 5, mapped back to the unswapped order:
1 = the baseline (output_1) wins, 2 = the evaluated model (output_2) wins.

Two judges share the protocol and the parser:
- `LocalJudge` reads a Hugging Face causal LM from disk and runs one forward pass a prompt.
- `OpenAIJudge` calls any OpenAI-compatible chat-completions endpoint, with retries, a rate
  limit, a disk cache keyed by the exact request, and a cost check before a paid run.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import math
import os
import random
import re
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Protocol
from urllib.parse import urlparse

import httpx
import torch
import yaml
from tqdm.auto import tqdm

from dice_core.config import JudgeConfig
from dice_core.errors import DataError, DiceError

log = logging.getLogger(__name__)

ANNOTATOR = "weighted_alpaca_eval_gpt4_turbo"
BASELINE_GENERATOR = "gpt4_1106_preview"
CONFIRM_COST_ENV = "DICE_JUDGE_CONFIRM_COST"
DEFAULT_BASE_URL = "https://api.openai.com/v1"

# OpenAI list prices in USD per million tokens (input, output), as published in 2024-2025.
# A model missing here, or any endpoint on this machine, is estimated at $0.
PRICES_USD_PER_MTOK: dict[str, tuple[float, float]] = {
    "gpt-4-1106-preview": (10.0, 30.0),
    "gpt-4-0125-preview": (10.0, 30.0),
    "gpt-4-turbo": (10.0, 30.0),
    "gpt-4-turbo-2024-04-09": (10.0, 30.0),
    "gpt-4": (30.0, 60.0),
    "gpt-4o": (2.5, 10.0),
    "gpt-4o-2024-08-06": (2.5, 10.0),
    "gpt-4o-2024-05-13": (5.0, 15.0),
    "gpt-4o-mini": (0.15, 0.6),
    "gpt-3.5-turbo": (0.5, 1.5),
}
# Token counts before a run are estimated from characters (no tokenizer of the endpoint's
# model is available offline): about 4 characters a token for English text.
_CHARS_PER_TOKEN = 4.0
_TOKENS_PER_MESSAGE = 4
_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_PLACEHOLDER = re.compile(r"\{(instruction|output_1|output_2)\}")
_CHAT_BLOCK = re.compile(r"<\|im_start\|>(\w+)\n(.*?)<\|im_end\|>", flags=re.DOTALL)
_MAX_BACKOFF_S = 60.0

OnMissing = Literal["error", "nan"]


class JudgeError(DiceError):
    """The judge gave no usable preference: a malformed answer, a refused cost, a dead endpoint."""


# ----------------------------------------------------------------------------------------
# The protocol, read from the installed alpaca_eval


@dataclass(frozen=True)
class JudgeProtocol:
    """The annotator's prompt, decoding settings and parser settings, as alpaca_eval ships them.

    Attributes:
        name: Annotator name, recorded in annotations.
        system: The system message.
        user_template: The user message, with `{instruction}`, `{output_1}`, `{output_2}`.
        numerator_token: The label whose probability share is read ("m", the first shown).
        denominator_tokens: All labels ("m", "M").
        max_tokens: Tokens the judge answers (1).
        temperature: Sampling temperature sent to endpoints.
        top_logprobs: How many top log-probabilities the parser reads (5).
        reference_model: The judge model of the leaderboard.
    """

    name: str
    system: str
    user_template: str
    numerator_token: str
    denominator_tokens: tuple[str, ...]
    max_tokens: int
    temperature: float
    top_logprobs: int
    reference_model: str

    def messages(self, instruction: str, first: str, second: str) -> list[dict[str, str]]:
        """The chat messages that show `first` labelled "m" and `second` labelled "M".

        Placeholders are filled in one pass, so text inside an output is never substituted
        again, and an output holding ChatML markers is shown whole.
        """
        values = {"instruction": instruction, "output_1": first, "output_2": second}
        user = _PLACEHOLDER.sub(lambda match: values[match.group(1)], self.user_template)
        return [
            {"role": "system", "content": self.system},
            {"role": "user", "content": user.strip()},
        ]

    @property
    def labels(self) -> tuple[str, ...]:
        """Every label token the parser looks for."""
        return tuple(dict.fromkeys((*self.denominator_tokens, self.numerator_token)))


def _alpaca_eval_dir() -> Path:
    spec = importlib.util.find_spec("alpaca_eval")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("the alpaca-eval package is not installed (pip install alpaca-eval)")
    return Path(list(spec.submodule_search_locations)[0])


def _split_chat_template(text: str, source: Path) -> tuple[str, str]:
    blocks = _CHAT_BLOCK.findall(text)
    roles = [role for role, _ in blocks]
    if roles != ["system", "user"]:
        raise DataError(f"{source}: expected a system then a user message, got roles {roles}")
    return blocks[0][1].strip(), blocks[1][1].strip()


def load_protocol(name: str = ANNOTATOR) -> JudgeProtocol:
    """Read an annotator's config and prompt template from the installed alpaca_eval.

    Args:
        name: An annotator under alpaca_eval's `evaluators_configs`.

    Returns:
        The protocol.

    Raises:
        DataError: The annotator is missing or does not parse weighted log-probabilities.
    """
    root = _alpaca_eval_dir() / "evaluators_configs"
    config_path = root / name / "configs.yaml"
    if not config_path.is_file():
        raise DataError(f"{config_path}: no such alpaca_eval annotator config")
    config = yaml.safe_load(config_path.read_text())[name]
    parser = config.get("completion_parser_kwargs", {})
    if config.get("fn_completion_parser") != "logprob_parser" or parser.get("is_binarize", True):
        raise DataError(
            f"{config_path}: expected fn_completion_parser logprob_parser with "
            f"is_binarize false, got {config.get('fn_completion_parser')!r} and {parser!r}"
        )
    template_path = root / config["prompt_template"]
    system, user = _split_chat_template(template_path.read_text(), template_path)
    decoding = config["completions_kwargs"]
    return JudgeProtocol(
        name=name,
        system=system,
        user_template=user,
        numerator_token=parser["numerator_token"],
        denominator_tokens=tuple(parser["denominator_tokens"]),
        max_tokens=int(decoding["max_tokens"]),
        temperature=float(decoding["temperature"]),
        top_logprobs=int(decoding["top_logprobs"]),
        reference_model=decoding["model_name"],
    )


# ----------------------------------------------------------------------------------------
# Requests, judgements and the parser shared by every judge


@dataclass(frozen=True)
class JudgeRequest:
    """One comparison as the judge sees it.

    Attributes:
        index: Position in the caller's list, named in errors.
        instruction: The AlpacaEval instruction.
        first: The output shown first, labelled "m".
        second: The output shown second, labelled "M".
    """

    index: int
    instruction: str
    first: str
    second: str

    def describe(self) -> str:
        """`instruction 3 ('Write a poem about ...')`: how errors name the request."""
        words = self.instruction.split()
        head = " ".join(words[:8]) + (" ..." if len(words) > 8 else "")
        return f"instruction {self.index} ({head!r})"


@dataclass(frozen=True)
class Judgement:
    """The judge's answer to one request, in the order it was shown.

    Attributes:
        preference: 1 = the first shown output wins, 2 = the second wins, NaN = missing.
        raw_completion: The answer as an OpenAI chat-completion choice (message, logprobs).
        seconds: Time spent on this request.
        price_usd: Estimated price of this request (0 for local judges).
        cached: Whether the answer came from the disk cache.
        truncated: Whether the outputs were cut to fit the judge's prompt limit.
    """

    preference: float
    raw_completion: dict[str, Any]
    seconds: float = 0.0
    price_usd: float = 0.0
    cached: bool = False
    truncated: bool = False


class Judge(Protocol):
    """Anything that turns judge requests into judgements, in the same order."""

    model_name: str

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Judge every request; the result is in the order of `requests`."""
        ...


def preference_from_top_logprobs(
    top_logprobs: Sequence[dict[str, Any]], numerator: str, denominators: Sequence[str]
) -> float:
    """Expected label in [1, 2] from the top log-probabilities, as alpaca_eval's parser reads them.

    A label absent from the list has probability 0; when no label is present the result is NaN.

    Args:
        top_logprobs: Items with `token` and `logprob`.
        numerator: The label of the first shown output.
        denominators: All labels.

    Returns:
        2 - P(numerator) / P(any label).
    """
    wanted = {*denominators, numerator}
    by_token = {item["token"]: item["logprob"] for item in top_logprobs if item["token"] in wanted}
    if not by_token:
        return math.nan
    denominator = _logsumexp([by_token.get(token, -math.inf) for token in denominators])
    if denominator == -math.inf:
        return math.nan
    return 2.0 - math.exp(by_token.get(numerator, -math.inf) - denominator)


def _logsumexp(values: Sequence[float]) -> float:
    top = max(values)
    if top == -math.inf:
        return top
    return top + math.log(sum(math.exp(value - top) for value in values))


def _top_logprobs(completion: Any) -> list[dict[str, Any]] | None:
    try:
        top = completion["logprobs"]["content"][0]["top_logprobs"]
    except (KeyError, IndexError, TypeError):
        return None
    if not isinstance(top, list) or not top:
        return None
    if not all(isinstance(item, dict) and {"token", "logprob"} <= item.keys() for item in top):
        return None
    return top


def parse_completion(
    completion: Any, request: JudgeRequest, protocol: JudgeProtocol, on_missing: OnMissing
) -> float:
    """The preference (in the shown order) of one judge answer.

    Args:
        completion: An OpenAI chat-completion choice.
        request: The request it answers, named in errors.
        protocol: Labels and the expected number of top log-probabilities.
        on_missing: What to do when no label is among the top log-probabilities.

    Returns:
        The preference in [1, 2], or NaN for a missing label under `on_missing="nan"`.

    Raises:
        JudgeError: The answer has no top log-probabilities, or no label under "error".
    """
    top = _top_logprobs(completion)
    if top is None:
        raise JudgeError(
            f"the judge's answer to {request.describe()} has no top log-probabilities; the "
            f"endpoint must honour logprobs=true and top_logprobs={protocol.top_logprobs}"
        )
    preference = preference_from_top_logprobs(
        top, protocol.numerator_token, protocol.denominator_tokens
    )
    if math.isnan(preference):
        tokens = [item["token"] for item in top]
        message = (
            f"the judge's answer to {request.describe()} has neither label "
            f"{list(protocol.labels)} among its top log-probabilities {tokens}"
        )
        if on_missing == "error":
            raise JudgeError(
                f"{message}; set judge.on_missing_labels to `nan` to record it as missing"
            )
        log.warning("%s: preference recorded as missing", message)
    return preference


# ----------------------------------------------------------------------------------------
# Output order and annotations


def is_swapped(instruction: str, seed: int) -> bool:
    """Whether the evaluated output is shown first: a coin seeded by the instruction and seed.

    The coin is seeded the way alpaca_eval seeds its own ("is_switched_outputs", then the
    instruction, then the seed), so seed 0, alpaca_eval's default, shows every instruction
    in the leaderboard's order, and every model meets the same order for the same seed.
    """
    return random.Random(f"is_switched_outputs{instruction}{seed}").random() >= 0.5


def annotate(
    instructions: list[str],
    model_outputs: list[str],
    baseline_outputs: list[str],
    judge: Judge,
    seed: int,
    generator: str,
    baseline_generator: str = BASELINE_GENERATOR,
) -> list[dict]:
    """Judge a model against a baseline, one alpaca_eval annotation per instruction.

    Identical outputs are a tie (preference 1.5) and are not sent to the judge; a missing
    preference is None. Both follow alpaca_eval.

    Args:
        instructions: The instructions.
        model_outputs: The evaluated model's outputs (output_2).
        baseline_outputs: The baseline's outputs (output_1).
        judge: The judge.
        seed: Seed of the output order; 0 reproduces the leaderboard's order.
        generator: Name of the evaluated model.
        baseline_generator: Name of the baseline.

    Returns:
        Annotation dicts in input order: instruction, output_1, generator_1, output_2,
        generator_2, annotator, judge_model, preference (2 = the evaluated model wins),
        raw_completion, is_switched_outputs, prompt_truncated, price_per_example,
        time_per_example.

    Raises:
        ValueError: The three lists differ in length.
        JudgeError: The judge failed on an instruction.
    """
    if not len(instructions) == len(model_outputs) == len(baseline_outputs):
        raise ValueError(
            f"expected as many model and baseline outputs as instructions, got "
            f"{len(instructions)} instructions, {len(model_outputs)} model outputs and "
            f"{len(baseline_outputs)} baseline outputs"
        )
    swapped = [is_swapped(instruction, seed) for instruction in instructions]
    requests = [
        _request(index, instructions[index], baseline, output, swapped[index])
        for index, (baseline, output) in enumerate(
            zip(baseline_outputs, model_outputs, strict=True)
        )
        if baseline != output
    ]
    indices = [request.index for request in requests]
    judged = dict(zip(indices, judge.judge(requests), strict=True))
    names = {"generator_1": baseline_generator, "generator_2": generator}
    return [
        _annotation(row, judge.model_name, names, swapped[index], judged.get(index))
        for index, row in enumerate(zip(instructions, baseline_outputs, model_outputs, strict=True))
    ]


def _request(index: int, instruction: str, baseline: str, output: str, swapped: bool):
    first, second = (output, baseline) if swapped else (baseline, output)
    return JudgeRequest(index=index, instruction=instruction, first=first, second=second)


def _annotation(
    row: tuple[str, str, str],
    judge_model: str,
    names: dict[str, str],
    swapped: bool,
    judgement: Judgement | None,
) -> dict[str, Any]:
    instruction, baseline, output = row
    preference: float | None = 1.5
    if judgement is not None:
        shown = judgement.preference
        preference = None if math.isnan(shown) else (3.0 - shown if swapped else shown)
    return {
        "instruction": instruction,
        "output_1": baseline,
        "generator_1": names["generator_1"],
        "output_2": output,
        "generator_2": names["generator_2"],
        "annotator": ANNOTATOR,
        "judge_model": judge_model,
        "preference": preference,
        "raw_completion": judgement.raw_completion if judgement else None,
        "is_switched_outputs": swapped,
        "prompt_truncated": judgement.truncated if judgement else False,
        "price_per_example": judgement.price_usd if judgement else 0.0,
        "time_per_example": judgement.seconds if judgement else 0.0,
    }


# ----------------------------------------------------------------------------------------
# Local scoring, shared by LocalJudge and the judge server


def encode_messages(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Token ids of chat messages under the model's chat template, up to the answer's start."""
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@torch.no_grad()
def top_next_tokens(
    model: Any, batch: list[list[int]], k: int, pad_id: int
) -> list[list[tuple[int, float]]]:
    """The k most likely next tokens after each prompt, with their log-probabilities.

    Prompts are left-padded with explicit positions, so each row scores as if alone.

    Args:
        model: A causal LM in eval mode.
        batch: Token ids of each prompt.
        k: How many tokens to keep.
        pad_id: Padding token id.

    Returns:
        For each prompt, (token id, log-probability) pairs, most likely first.
    """
    width = max(len(ids) for ids in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, ids in enumerate(batch):
        input_ids[row, width - len(ids) :] = torch.tensor(ids)
        mask[row, width - len(ids) :] = 1
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    output = model(
        input_ids=input_ids, attention_mask=mask, position_ids=positions, logits_to_keep=1
    )
    logprobs = output.logits[:, -1, :].float().log_softmax(-1)
    top = logprobs.topk(k, dim=-1)
    return [
        list(zip(ids, values, strict=True))
        for ids, values in zip(top.indices.tolist(), top.values.tolist(), strict=True)
    ]


def completion_from_top(tokenizer: Any, top: list[tuple[int, float]]) -> dict[str, Any]:
    """An OpenAI chat-completion choice that answers the most likely token, with top log-probs."""
    items = [_token_item(tokenizer.decode([token_id]), logprob) for token_id, logprob in top]
    best = items[0]
    return {
        "index": 0,
        "message": {"role": "assistant", "content": best["token"]},
        "logprobs": {"content": [{**best, "top_logprobs": items}]},
        "finish_reason": "length",
    }


def _token_item(token: str, logprob: float) -> dict[str, Any]:
    return {"token": token, "bytes": list(token.encode("utf-8")), "logprob": logprob}


def _share_budget(first: int, second: int, budget: int) -> tuple[int, int]:
    half = budget // 2
    if first <= half:
        return first, min(second, budget - first)
    if second <= half:
        return min(first, budget - second), second
    return half, budget - half


def _length_batches(order: list[int], lengths: list[int], batch_tokens: int) -> list[list[int]]:
    batches: list[list[int]] = []
    current: list[int] = []
    for index in order:
        if current and (len(current) + 1) * lengths[index] > batch_tokens:
            batches.append(current)
            current = []
        current.append(index)
    return batches + [current] if current else batches


class LocalJudge:
    """A Hugging Face causal LM read from disk, judging with one forward pass a prompt.

    The judge model's own chat template renders the protocol's system and user messages.
    Its top-k next-token log-probabilities (k as the API's top_logprobs) go through the same
    parser as an endpoint's answer, so a label outside the top k counts as probability 0
    exactly as it would behind an API. A prompt longer than `max_prompt_tokens` has its two
    outputs cut at a token boundary, with no marker, each keeping an equal share of the
    room left by the template and the instruction (a short output leaves its unused share
    to the other); the template and the instruction are never cut.
    """

    def __init__(
        self,
        model_dir: Path,
        protocol: JudgeProtocol | None = None,
        *,
        max_prompt_tokens: int = 4096,
        on_missing_labels: OnMissing = "error",
        batch_tokens: int = 8192,
        dtype: str = "float32",
        show_progress: bool = True,
    ) -> None:
        """Load the model.

        Args:
            model_dir: A transformers model folder with tokenizer and chat template.
            protocol: The judging protocol (default: read from alpaca_eval).
            max_prompt_tokens: Longest prompt, template included, after truncation.
            on_missing_labels: `error` or `nan` when no label is among the top-k.
            batch_tokens: Padded tokens in one forward batch.
            dtype: Weights dtype.
            show_progress: Show a progress bar.
        """
        from dice_core.models import load_causal_lm, load_tokenizer

        self.model_name = Path(model_dir).name
        self.protocol = protocol or load_protocol()
        self.max_prompt_tokens = max_prompt_tokens
        self.on_missing_labels = on_missing_labels
        self.batch_tokens = batch_tokens
        self.show_progress = show_progress
        self.tokenizer = load_tokenizer(model_dir)
        self.model = load_causal_lm(model_dir, dtype)

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Judge requests in batches of similar length.

        Args:
            requests: The comparisons.

        Returns:
            One judgement per request, in order.

        Raises:
            JudgeError: A prompt cannot fit, or an answer has no label under "error".
        """
        encoded = [self.encode(request) for request in requests]
        lengths = [len(ids) for ids, _ in encoded]
        order = sorted(range(len(requests)), key=lambda index: lengths[index])
        results: list[Judgement | None] = [None] * len(requests)
        started = time.perf_counter()
        with tqdm(
            total=len(requests), desc="judge", unit="prompt", disable=not self.show_progress
        ) as bar:
            for batch in _length_batches(order, lengths, self.batch_tokens):
                for index, judgement in self._judge_batch(batch, requests, encoded):
                    results[index] = judgement
                bar.update(len(batch))
        _log_summary(
            self.model_name, results, time.perf_counter() - started, requested=len(results)
        )
        return results  # type: ignore[return-value]

    def _judge_batch(
        self,
        batch: list[int],
        requests: Sequence[JudgeRequest],
        encoded: list[tuple[list[int], bool]],
    ) -> list[tuple[int, Judgement]]:
        """Score one batch and parse its answers."""
        started = time.perf_counter()
        tops = top_next_tokens(
            self.model,
            [encoded[index][0] for index in batch],
            self.protocol.top_logprobs,
            self.tokenizer.pad_token_id,
        )
        seconds = (time.perf_counter() - started) / len(batch)
        judged = []
        for index, top in zip(batch, tops, strict=True):
            completion = completion_from_top(self.tokenizer, top)
            preference = parse_completion(
                completion, requests[index], self.protocol, self.on_missing_labels
            )
            truncated = encoded[index][1]
            judged.append((index, Judgement(preference, completion, seconds, truncated=truncated)))
        return judged

    def encode(self, request: JudgeRequest) -> tuple[list[int], bool]:
        """Prompt ids of a request, cut to `max_prompt_tokens`, and whether outputs were cut.

        Raises:
            JudgeError: The template and the instruction alone exceed the limit.
        """
        messages = self.protocol.messages(request.instruction, request.first, request.second)
        ids = encode_messages(self.tokenizer, messages)
        if len(ids) <= self.max_prompt_tokens:
            return ids, False
        return self._truncated(request), True

    def _truncated(self, request: JudgeRequest) -> list[int]:
        """Prompt ids with both outputs cut so that the whole prompt fits."""
        empty = self.protocol.messages(request.instruction, "", "")
        budget = self.max_prompt_tokens - len(encode_messages(self.tokenizer, empty))
        if budget < 2:
            raise JudgeError(
                f"the judge prompt of {request.describe()} exceeds judge.max_prompt_tokens "
                f"({self.max_prompt_tokens}) with both outputs empty; outputs are cut, never "
                "the template or the instruction: raise the limit"
            )
        first = self.tokenizer(request.first, add_special_tokens=False)["input_ids"]
        second = self.tokenizer(request.second, add_special_tokens=False)["input_ids"]
        # Re-tokenising cut text can merge across the cut: shrink until the prompt fits.
        while budget >= 2:
            keep_first, keep_second = _share_budget(len(first), len(second), budget)
            messages = self.protocol.messages(
                request.instruction,
                self.tokenizer.decode(first[:keep_first]),
                self.tokenizer.decode(second[:keep_second]),
            )
            ids = encode_messages(self.tokenizer, messages)
            if len(ids) <= self.max_prompt_tokens:
                return ids
            budget -= len(ids) - self.max_prompt_tokens
        raise JudgeError(f"cannot fit the judge prompt of {request.describe()} in the limit")


def _log_summary(
    model: str, results: Sequence[Judgement | None], seconds: float, requested: int
) -> None:
    done = [judgement for judgement in results if judgement is not None]
    missing = sum(math.isnan(judgement.preference) for judgement in done)
    truncated = sum(judgement.truncated for judgement in done)
    cost = sum(judgement.price_usd for judgement in done if not judgement.cached)
    log.info(
        "judge %s | %d/%d | requested: %d | missing: %d | truncated: %d | cost: $%.2f | %.2f req/s",
        model,
        len(done),
        len(results),
        requested,
        missing,
        truncated,
        cost,
        requested / seconds if seconds > 0 else 0.0,
    )


# ----------------------------------------------------------------------------------------
# Endpoint judge


@dataclass(frozen=True)
class CostEstimate:
    """What a run of uncached requests will cost, before it starts.

    Attributes:
        requests: Requests to send.
        input_tokens: Estimated prompt tokens (characters / 4, plus message overhead).
        output_tokens: Answer tokens.
        usd: Estimated price; 0 when the model has no known price.
        priced: Whether the model's price is known.
    """

    requests: int
    input_tokens: int
    output_tokens: int
    usd: float
    priced: bool


def estimate_cost(
    bodies: Sequence[dict[str, Any]], model: str, prices: dict[str, tuple[float, float]]
) -> CostEstimate:
    """Estimate the price of sending chat-completion bodies to a model.

    Args:
        bodies: Request bodies with `messages` and `max_tokens`.
        model: The endpoint's model name.
        prices: USD per million (input, output) tokens by model name.

    Returns:
        The estimate; $0 for a model missing from `prices`.
    """
    input_tokens = sum(_estimate_prompt_tokens(body["messages"]) for body in bodies)
    output_tokens = sum(int(body.get("max_tokens", 1)) for body in bodies)
    price = prices.get(model)
    usd = 0.0 if price is None else _price(input_tokens, output_tokens, price)
    return CostEstimate(len(bodies), input_tokens, output_tokens, usd, price is not None)


def _estimate_prompt_tokens(messages: Sequence[dict[str, str]]) -> int:
    characters = sum(len(message["content"]) for message in messages)
    return math.ceil(characters / _CHARS_PER_TOKEN) + _TOKENS_PER_MESSAGE * len(messages) + 3


def _price(input_tokens: int, output_tokens: int, price: tuple[float, float]) -> float:
    return (input_tokens * price[0] + output_tokens * price[1]) / 1e6


def _is_loopback(base_url: str) -> bool:
    return urlparse(base_url).hostname in _LOOPBACK_HOSTS


class _RateLimiter:
    """Spaces request starts at least 60 / rpm seconds apart, across threads."""

    def __init__(self, requests_per_minute: int | None) -> None:
        self._interval = 60.0 / requests_per_minute if requests_per_minute else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        """Sleep until this caller's slot comes."""
        if not self._interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self._interval
        time.sleep(start - now)


class _DiskCache:
    """One JSON file a request, named by the request's hash; written whole or not at all."""

    def __init__(self, root: Path | None) -> None:
        self.root = root

    def _path(self, key: str) -> Path:
        assert self.root is not None
        return self.root / key[:2] / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The cached entry, or None (also for an unreadable file, which is then redone)."""
        if self.root is None or not self._path(key).is_file():
            return None
        try:
            return json.loads(self._path(key).read_text())
        except (OSError, json.JSONDecodeError) as error:
            log.warning("judge cache: ignoring unreadable %s (%s)", self._path(key), error)
            return None

    def put(self, key: str, entry: dict[str, Any]) -> None:
        """Write an entry atomically."""
        if self.root is None:
            return
        path = self._path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, staging = tempfile.mkstemp(prefix=".tmp-", dir=path.parent)
        with os.fdopen(handle, "w") as file:
            json.dump(entry, file, ensure_ascii=False)
        os.replace(staging, path)


class OpenAIJudge:
    """A judge behind any OpenAI-compatible chat-completions endpoint.

    Each request asks for the protocol's one token with logprobs and top_logprobs, at the
    protocol's temperature. Connection errors, timeouts, 408, 409, 429 and 5xx are retried
    with exponential backoff (a Retry-After header wins); other errors stop the run. The key
    is read from the environment variable named by `api_key_env` when a request is sent; it
    is never logged, stored or put in an error message. Answers are cached on disk under a
    hash of the endpoint URL and the exact request body, so a rerun sends nothing it has
    already sent. Before a run the cost of the uncached requests is estimated and logged; a
    paid run above `confirm_cost_above_usd` is refused unless confirmed by argument or by
    the DICE_JUDGE_CONFIRM_COST=1 environment variable.
    """

    def __init__(
        self,
        model: str,
        protocol: JudgeProtocol | None = None,
        *,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        cache_dir: Path | None = None,
        max_retries: int = 6,
        requests_per_minute: int | None = None,
        concurrency: int = 4,
        timeout_s: float = 60.0,
        confirm_cost_above_usd: float | None = 5.0,
        confirm_cost: bool = False,
        on_missing_labels: OnMissing = "error",
        prices: dict[str, tuple[float, float]] | None = None,
        backoff_s: float = 1.0,
        show_progress: bool = True,
    ) -> None:
        """Set up the client; nothing is sent yet.

        Args:
            model: The endpoint's model name.
            protocol: The judging protocol (default: read from alpaca_eval).
            base_url: Endpoint base URL, up to `/v1` (default: OPENAI_BASE_URL or OpenAI).
            api_key_env: Environment variable holding the key; unset is allowed on this machine.
            cache_dir: Folder of cached answers (None: no cache).
            max_retries: Retries of one request after a transient failure.
            requests_per_minute: Rate limit (None: unlimited).
            concurrency: Requests in flight at once.
            timeout_s: Seconds one request may take.
            confirm_cost_above_usd: Refuse a costlier run unless confirmed (None: never).
            confirm_cost: Confirm a run above the threshold.
            on_missing_labels: `error` or `nan` when no label is among the top log-probs.
            prices: USD per million (input, output) tokens by model (default: the OpenAI
                list prices, or none for an endpoint on this machine).
            backoff_s: First retry delay; each retry doubles it, up to 60 s.
            show_progress: Show a progress bar.
        """
        self.model_name = model
        self.protocol = protocol or load_protocol()
        self.base_url = (base_url or os.environ.get("OPENAI_BASE_URL") or DEFAULT_BASE_URL).rstrip(
            "/"
        )
        self.api_key_env = api_key_env
        self.max_retries = max_retries
        self.concurrency = concurrency
        self.timeout_s = timeout_s
        self.confirm_cost_above_usd = confirm_cost_above_usd
        self.confirm_cost = confirm_cost
        self.on_missing_labels = on_missing_labels
        default_prices = {} if _is_loopback(self.base_url) else PRICES_USD_PER_MTOK
        self.prices = default_prices if prices is None else prices
        self.backoff_s = backoff_s
        self.show_progress = show_progress
        self._cache = _DiskCache(cache_dir)
        self._limiter = _RateLimiter(requests_per_minute)

    def __repr__(self) -> str:
        return f"OpenAIJudge(model={self.model_name!r}, base_url={self.base_url!r})"

    def body(self, request: JudgeRequest) -> dict[str, Any]:
        """The chat-completion request body of one comparison."""
        return {
            "model": self.model_name,
            "messages": self.protocol.messages(request.instruction, request.first, request.second),
            "max_tokens": self.protocol.max_tokens,
            "temperature": self.protocol.temperature,
            "logprobs": True,
            "top_logprobs": self.protocol.top_logprobs,
        }

    def cache_key(self, body: dict[str, Any]) -> str:
        """Hash of the endpoint and the exact request body."""
        text = json.dumps({"base_url": self.base_url, **body}, sort_keys=True, ensure_ascii=False)
        return hashlib.sha256(text.encode("utf-8")).hexdigest()

    def judge(self, requests: Sequence[JudgeRequest]) -> list[Judgement]:
        """Judge requests: cached answers first, then the rest from the endpoint.

        Args:
            requests: The comparisons.

        Returns:
            One judgement per request, in order.

        Raises:
            JudgeError: The cost is refused, the key is missing, a request keeps failing,
                or an answer is malformed; the error names the instruction.
        """
        bodies = [self.body(request) for request in requests]
        keys = [self.cache_key(body) for body in bodies]
        results = [
            self._from_cache(key, request) for key, request in zip(keys, requests, strict=True)
        ]
        todo = [index for index, judgement in enumerate(results) if judgement is None]
        self.check_cost(estimate_cost([bodies[i] for i in todo], self.model_name, self.prices))
        started = time.perf_counter()
        if todo:
            self._send_all(todo, requests, bodies, keys, results)
        _log_summary(self.model_name, results, time.perf_counter() - started, requested=len(todo))
        return results  # type: ignore[return-value]

    def check_cost(self, estimate: CostEstimate) -> None:
        """Log the estimate; refuse it above the threshold unless confirmed.

        Raises:
            JudgeError: The estimate exceeds `confirm_cost_above_usd` and is not confirmed.
        """
        if estimate.requests == 0:
            return
        if estimate.usd == 0.0:
            reason = "an endpoint on this machine" if not self.prices else "no known price"
            log.info(
                "judge %s: %d requests, $0 estimated (%s)",
                self.model_name,
                estimate.requests,
                reason,
            )
            return
        log.warning(
            "judge %s: %d requests, about %d input tokens: estimated cost $%.2f",
            self.model_name,
            estimate.requests,
            estimate.input_tokens,
            estimate.usd,
        )
        threshold = self.confirm_cost_above_usd
        confirmed = self.confirm_cost or os.environ.get(CONFIRM_COST_ENV, "") in {
            "1",
            "true",
            "yes",
        }
        if threshold is not None and estimate.usd > threshold and not confirmed:
            raise JudgeError(
                f"the judge run would cost about ${estimate.usd:.2f} ({estimate.requests} "
                f"requests to {self.model_name}), above judge.confirm_cost_above_usd "
                f"(${threshold:.2f}); confirm it with {CONFIRM_COST_ENV}=1 or confirm_cost=True"
            )

    def _from_cache(self, key: str, request: JudgeRequest) -> Judgement | None:
        entry = self._cache.get(key)
        if entry is None:
            return None
        completion = entry["completion"]
        preference = parse_completion(completion, request, self.protocol, self.on_missing_labels)
        return Judgement(preference, completion, price_usd=entry.get("price_usd", 0.0), cached=True)

    def _send_all(
        self,
        todo: list[int],
        requests: Sequence[JudgeRequest],
        bodies: list[dict[str, Any]],
        keys: list[str],
        results: list[Judgement | None],
    ) -> None:
        """Send the uncached requests concurrently; the first failure stops the rest."""
        client = httpx.Client(timeout=self.timeout_s, headers=self._headers())
        bar = tqdm(total=len(todo), desc="judge", unit="req", disable=not self.show_progress)
        with client, bar, ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {
                pool.submit(self._send_one, client, requests[i], bodies[i], keys[i]): i
                for i in todo
            }
            try:
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    bar.update()
            except BaseException:
                # Requests already in flight finish (and are cached); queued ones are dropped.
                pool.shutdown(wait=True, cancel_futures=True)
                raise

    def _headers(self) -> dict[str, str]:
        key = os.environ.get(self.api_key_env, "")
        if key:
            return {"Authorization": f"Bearer {key}"}
        if _is_loopback(self.base_url):
            return {}
        raise JudgeError(
            f"no judge key: the environment variable {self.api_key_env} is not set "
            f"(judge endpoint {self.base_url})"
        )

    def _send_one(
        self, client: httpx.Client, request: JudgeRequest, body: dict[str, Any], key: str
    ) -> Judgement:
        """Send one request, parse the answer, cache it."""
        started = time.perf_counter()
        answer = self._post(client, request, body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices:
            raise JudgeError(f"the judge's answer to {request.describe()} has no choices")
        completion = choices[0]
        preference = parse_completion(completion, request, self.protocol, self.on_missing_labels)
        usage = answer.get("usage") or {}
        price = self._price_of(usage, body)
        self._cache.put(
            key, {"request": body, "completion": completion, "usage": usage, "price_usd": price}
        )
        seconds = time.perf_counter() - started
        return Judgement(preference, completion, seconds=seconds, price_usd=price)

    def _price_of(self, usage: dict[str, Any], body: dict[str, Any]) -> float:
        price = self.prices.get(self.model_name)
        if price is None:
            return 0.0
        input_tokens = usage.get("prompt_tokens") or _estimate_prompt_tokens(body["messages"])
        output_tokens = usage.get("completion_tokens") or body["max_tokens"]
        return _price(int(input_tokens), int(output_tokens), price)

    def _post(self, client: httpx.Client, request: JudgeRequest, body: dict[str, Any]) -> Any:
        """POST with retries on transient failures; the decoded JSON answer."""
        url = f"{self.base_url}/chat/completions"
        for attempt in range(self.max_retries + 1):
            self._limiter.wait()
            try:
                response = client.post(url, json=body)
            except httpx.TransportError as error:
                reason, retry_after = f"{type(error).__name__}", None
            else:
                if response.status_code == 200:
                    return _decode(response, request)
                reason = f"HTTP {response.status_code}: {self._redact(response.text[:300])}"
                if not _is_transient(response.status_code):
                    raise JudgeError(f"the judge endpoint refused {request.describe()}: {reason}")
                retry_after = _retry_after(response)
            if attempt == self.max_retries:
                raise JudgeError(
                    f"the judge endpoint failed {request.describe()} {attempt + 1} times; "
                    f"last: {reason}"
                )
            delay = self._delay(attempt, retry_after)
            log.warning(
                "judge request for %s failed (%s); retry %d/%d in %.1f s",
                request.describe(),
                reason,
                attempt + 1,
                self.max_retries,
                delay,
            )
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(retry_after, _MAX_BACKOFF_S)
        delay = min(self.backoff_s * 2**attempt, _MAX_BACKOFF_S)
        return delay * (1.0 + 0.25 * random.random())

    def _redact(self, text: str) -> str:
        key = os.environ.get(self.api_key_env, "")
        return text.replace(key, "***") if key else text


def _is_transient(status: int) -> bool:
    return status in (408, 409, 429) or status >= 500


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers.get("retry-after", "")))
    except ValueError:
        return None


def _decode(response: httpx.Response, request: JudgeRequest) -> Any:
    try:
        return response.json()
    except json.JSONDecodeError:
        raise JudgeError(
            f"the judge's answer to {request.describe()} is not JSON: {response.text[:200]!r}"
        ) from None


# ----------------------------------------------------------------------------------------
# Construction from the recipe


def make_judge(
    config: JudgeConfig,
    sft_model_dir: Path | None,
    cache_dir: Path | None,
    *,
    confirm_cost: bool = False,
) -> Judge:
    """The judge a recipe asks for.

    Args:
        config: The recipe's judge settings.
        sft_model_dir: The run's SFT model folder, used when `config.model` is `sft`.
        cache_dir: Folder of cached endpoint answers (None: no cache).
        confirm_cost: Accept an endpoint run above `config.confirm_cost_above_usd`.

    Returns:
        A `LocalJudge` or an `OpenAIJudge`.

    Raises:
        ValueError: A local judge is `sft` but no SFT folder was given.
        DataError: A local judge's folder holds no model.
    """
    protocol = load_protocol()
    if config.kind == "local":
        return LocalJudge(
            _local_model_dir(config.model, sft_model_dir),
            protocol,
            max_prompt_tokens=config.max_prompt_tokens,
            on_missing_labels=config.on_missing_labels,
        )
    return OpenAIJudge(
        config.model,
        protocol,
        base_url=config.base_url,
        api_key_env=config.api_key_env,
        cache_dir=cache_dir,
        max_retries=config.max_retries,
        requests_per_minute=config.requests_per_minute,
        concurrency=config.concurrency,
        timeout_s=config.timeout_s,
        confirm_cost_above_usd=config.confirm_cost_above_usd,
        confirm_cost=confirm_cost,
        on_missing_labels=config.on_missing_labels,
    )


def _local_model_dir(model: str, sft_model_dir: Path | None) -> Path:
    if model == "sft":
        if sft_model_dir is None:
            raise ValueError("judge.model is `sft` but the run's SFT model folder was not given")
        return Path(sft_model_dir)
    path = Path(model).expanduser()
    if not (path / "config.json").is_file():
        raise DataError(
            f"judge.model {model!r}: expected `sft` or a model folder with config.json for a "
            "local judge"
        )
    return path
