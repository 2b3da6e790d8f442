"""Implicit-reward scoring: r(x, y) = sum log pi(y | x) - sum log ref(y | x), no beta.

Sums run over the response tokens including the final EOS, never over prompt tokens, with
log-probs in fp32. Sequences are batched by length under a token budget. The language-model
head is applied only at response positions and the vocabulary is processed in chunks, so no
batch x length x vocabulary tensor is ever held. The two models are scored one after the
other: only one is in memory at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from dice_core.config import RewardsConfig
from dice_core.models import load_causal_lm, load_tokenizer
from dice_core.tokens import EncodedResponse, encode_response, render_prompt

log = logging.getLogger(__name__)
_TOKEN_CHUNK = 4096


def encode_rows(tokenizer, rows: Sequence[dict[str, Any]]) -> list[EncodedResponse]:
    """Tokenise `{prompt, response}` rows the way training will."""
    rendered: dict[str, str] = {}
    encoded = []
    for row in rows:
        text = rendered.setdefault(row["prompt"], render_prompt(tokenizer, row["prompt"]))
        encoded.append(encode_response(tokenizer, text, row["response"]))
    return encoded


def length_batches(lengths: Sequence[int], batch_tokens: int) -> list[list[int]]:
    """Group indices, longest first, so that rows x longest row stays within the budget."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batches: list[list[int]] = []
    for index in order:
        if batches and (len(batches[-1]) + 1) * lengths[batches[-1][0]] <= batch_tokens:
            batches[-1].append(index)
        else:
            batches.append([index])
    return batches


def _pad(items: list[EncodedResponse], pad_id: int, side: str) -> tuple[torch.Tensor, ...]:
    """Padded ids, attention mask and position ids (positions count real tokens only)."""
    width = max(len(i.prompt_ids) + len(i.response_ids) for i in items)
    ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(items), width), dtype=torch.long)
    for row, item in enumerate(items):
        seq = torch.tensor(item.prompt_ids + item.response_ids)
        start = 0 if side == "right" else width - len(seq)
        ids[row, start : start + len(seq)] = seq
        mask[row, start : start + len(seq)] = 1
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    return ids, mask, positions


def _response_positions(items: list[EncodedResponse], width: int, side: str):
    """(row, position predicting the token, target token) for every response token."""
    rows, cols, targets = [], [], []
    for row, item in enumerate(items):
        total = len(item.prompt_ids) + len(item.response_ids)
        offset = 0 if side == "right" else width - total
        first = offset + len(item.prompt_ids) - 1
        rows += [row] * len(item.response_ids)
        cols += range(first, first + len(item.response_ids))
        targets += item.response_ids
    return torch.tensor(rows), torch.tensor(cols), torch.tensor(targets)


def chunked_token_logprobs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    targets: torch.Tensor,
    vocab_chunk: int,
) -> torch.Tensor:
    """log softmax(hidden @ weight.T + bias)[targets] in fp32, a vocabulary chunk at a time.

    Args:
        hidden: Hidden states at the predicting positions, tokens x d.
        weight: The output embedding, vocab x d.
        bias: Its bias, or None.
        targets: The token id each position predicts.
        vocab_chunk: Vocabulary rows per matmul.

    Returns:
        One fp32 log-prob per token.
    """
    out = torch.empty(hidden.shape[0], dtype=torch.float32)
    for start in range(0, hidden.shape[0], _TOKEN_CHUNK):
        h = hidden[start : start + _TOKEN_CHUNK].float()
        t = targets[start : start + _TOKEN_CHUNK]
        norm = torch.full((h.shape[0],), -torch.inf)
        for v in range(0, weight.shape[0], vocab_chunk):
            logits = h @ weight[v : v + vocab_chunk].float().T
            if bias is not None:
                logits += bias[v : v + vocab_chunk].float()
            norm = torch.logaddexp(norm, torch.logsumexp(logits, dim=1))
        picked = (h * weight[t].float()).sum(dim=1)
        if bias is not None:
            picked += bias[t].float()
        out[start : start + _TOKEN_CHUNK] = picked - norm
    return out


@torch.inference_mode()
def sequence_logprobs(
    model,
    items: list[EncodedResponse],
    pad_id: int,
    config: RewardsConfig,
    padding_side: str = "right",
    desc: str = "scoring",
    progress: Callable[[int, int], None] | None = None,
) -> np.ndarray:
    """Sum of fp32 log-probs of each item's response tokens (EOS included) under a model.

    Args:
        model: A causal LM with a decoder (`get_decoder()`) and an output embedding.
        items: Encoded prompt/response pairs.
        pad_id: Padding token id.
        config: Batch token budget and vocabulary chunk.
        padding_side: "right" or "left"; the sums do not depend on it.
        desc: Progress-bar label.
        progress: Called with (items done, total) after each batch.

    Returns:
        A float64 array, one sum per item, in input order.
    """
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    lengths = [len(i.prompt_ids) + len(i.response_ids) for i in items]
    sums = np.zeros(len(items), dtype=np.float64)
    done, started = 0, time.monotonic()
    bar = tqdm(total=sum(lengths), desc=desc, unit="tok", unit_scale=True, leave=False)
    for batch in length_batches(lengths, config.batch_tokens):
        chunk = [items[i] for i in batch]
        ids, mask, positions = _pad(chunk, pad_id, padding_side)
        hidden = decoder(
            input_ids=ids, attention_mask=mask, position_ids=positions
        ).last_hidden_state
        rows, cols, targets = _response_positions(chunk, ids.shape[1], padding_side)
        token_logps = chunked_token_logprobs(
            hidden[rows, cols],
            head.weight,
            getattr(head, "bias", None),
            targets,
            config.vocab_chunk,
        )
        per_row = torch.zeros(len(chunk), dtype=torch.float64).index_add_(
            0, rows, token_logps.double()
        )
        sums[batch] = per_row.numpy()
        done += len(batch)
        bar.update(sum(lengths[i] for i in batch))
        if progress:
            progress(done, len(items))
    bar.close()
    log.debug("%s: %d sequences in %.1fs", desc, len(items), time.monotonic() - started)
    return sums


def score_samples(
    policy_dir: str,
    reference_dir: str,
    rows: Sequence[dict[str, Any]],
    config: RewardsConfig,
    dtype: str = "float32",
    progress: Callable[[str, int, int], None] | None = None,
) -> list[dict[str, float | int]]:
    """Implicit reward of every `{prompt, response}` row: policy vs reference log-prob sums.

    Args:
        policy_dir: pi_{t-1}.
        reference_dir: ref_{t-1}.
        rows: Generated samples.
        config: Scoring settings.
        dtype: Weights dtype; log-probs are fp32 whatever it is.
        progress: Called with (model role, done, total).

    Returns:
        Per row: `policy_logp`, `reference_logp`, `reward` and `response_tokens`.

    Raises:
        ValueError: The two models do not share a vocabulary.
    """
    tokenizer = load_tokenizer(policy_dir)
    if load_tokenizer(reference_dir).get_vocab() != tokenizer.get_vocab():
        raise ValueError(
            f"policy {policy_dir} and reference {reference_dir} have different vocabularies; "
            "implicit rewards need one tokenizer"
        )
    items = encode_rows(tokenizer, rows)
    sums = {}
    for role, path in (("policy", policy_dir), ("reference", reference_dir)):
        model = load_causal_lm(path, dtype)
        report = (lambda d, t, r=role: progress(r, d, t)) if progress else None
        sums[role] = sequence_logprobs(
            model, items, tokenizer.pad_token_id, config, desc=f"scoring {role}", progress=report
        )
        del model
    return [
        {
            "policy_logp": float(p),
            "reference_logp": float(r),
            "reward": float(p - r),
            "response_tokens": len(item.response_ids),
        }
        for p, r, item in zip(sums["policy"], sums["reference"], items, strict=True)
    ]


def pair_accuracy(
    policy_dir: str,
    reference_dir: str,
    pairs: Sequence[dict[str, Any]],
    config: RewardsConfig,
    dtype: str = "float32",
) -> dict[str, float | int]:
    """How often the implicit reward ranks a pair's chosen response above its rejected one.

    Args:
        policy_dir: The DPO model whose implicit reward is measured.
        reference_dir: Its reference (the SFT model for pi_0).
        pairs: `{prompt, chosen, rejected}` rows the policy never trained on.
        config: Scoring settings.
        dtype: Weights dtype.

    Returns:
        `accuracy` (ties count half), `pairs`, `ties` and the mean reward margin.
    """
    rows = [
        {"prompt": p["prompt"], "response": p[side]}
        for p in pairs
        for side in ("chosen", "rejected")
    ]
    scores = score_samples(policy_dir, reference_dir, rows, config, dtype)
    margins = [scores[2 * i]["reward"] - scores[2 * i + 1]["reward"] for i in range(len(pairs))]
    wins = sum(m > 0 for m in margins) + 0.5 * sum(m == 0 for m in margins)
    return {
        "accuracy": wins / len(pairs),
        "pairs": len(pairs),
        "ties": sum(m == 0 for m in margins),
        "mean_margin": float(np.mean(margins)),
    }


# ---------------------------------------------------------------------------------------------
# Benchmark

# Sums of the two scorers agree within |a - b| <= atol + rtol * |b| (fp32 log-probs, summed
# in another order over a few hundred tokens).
SUMS_RTOL, SUMS_ATOL = 1e-5, 2e-4
_SCORERS = ("batched", "one_per_forward")


@torch.inference_mode()
def one_per_forward_logprobs(model, items: list[EncodedResponse]) -> np.ndarray:
    """The plain scorer: one sequence per forward, the model's logits at every position and
    the full fp32 log-softmax over the vocabulary, summed over the response tokens."""
    sums = np.zeros(len(items), dtype=np.float64)
    for n, item in enumerate(items):
        ids = torch.tensor([item.prompt_ids + item.response_ids])
        logps = torch.log_softmax(model(input_ids=ids).logits.float(), dim=-1)[0]
        first = len(item.prompt_ids) - 1
        positions = torch.arange(first, first + len(item.response_ids))
        sums[n] = logps[positions, torch.tensor(item.response_ids)].double().sum().item()
    return sums


def benchmark_scoring(
    model_dir: str | Path, rows: list[dict[str, Any]], config: RewardsConfig, stretch: int = 2
) -> dict[str, Any]:
    """Time the batched, chunked-vocabulary scorer against `one_per_forward_logprobs` on the
    same `{prompt, response}` rows, and measure the peak memory of each.

    Each measurement runs in a fresh process (spawned), which loads the model, scores one
    sequence to warm up, resets the kernel's peak-RSS mark (`/proc/self/clear_refs`), scores
    every row, and reads the peak (VmHWM) back: the peak is what scoring added above the
    loaded model. Both scorers run again on the rows with every response repeated `stretch`
    times, to show which peak grows with length. A script that calls this needs a main guard
    (`if __name__ == "__main__":`): the spawned processes import it.

    Args:
        model_dir: Model folder.
        rows: Real samples to score.
        config: Batch token budget and vocabulary chunk of the batched scorer.
        stretch: How many times each response is repeated in the second measurement.

    Returns:
        Per scorer and length (`batched`, `one_per_forward`; `x1`, `xN`): seconds,
        samples/s, real tokens/s and peak MB; real and padded tokens; the largest logits
        block each scorer holds by construction (MB); the largest difference between the
        two scorers' sums and whether it is within SUMS_RTOL / SUMS_ATOL.
    """
    longer = [{**r, "response": "\n\n".join([r["response"]] * stretch)} for r in rows]
    runs = {}
    for length, data in (("x1", rows), (f"x{stretch}", longer)):
        for scorer in _SCORERS:
            runs[scorer, length] = _in_fresh_process(
                _measure_scoring, str(model_dir), data, scorer, config.model_dump()
            )
    result: dict[str, Any] = {"samples": len(rows), "stretch": stretch}
    for (scorer, length), run in runs.items():
        result[f"{scorer}_{length}_seconds"] = run["seconds"]
        result[f"{scorer}_{length}_samples_per_s"] = len(rows) / run["seconds"]
        result[f"{scorer}_{length}_tokens_per_s"] = run["tokens"] / run["seconds"]
        result[f"{scorer}_{length}_peak_mb"] = run["peak_mb"]
        result[f"{scorer}_{length}_logits_mb"] = run["logits_mb"]
        result[f"real_tokens_{length}"] = run["tokens"]
        if scorer == "batched":
            result[f"padded_tokens_{length}"] = run["padded_tokens"]
    batched, plain = runs["batched", "x1"], runs["one_per_forward", "x1"]
    result.update(compare_sums(batched["sums"], plain["sums"]))
    result["speedup_batched_over_one_per_forward"] = plain["seconds"] / batched["seconds"]
    return result


def compare_sums(fast: Sequence[float], slow: Sequence[float]) -> dict[str, float | bool]:
    """Largest absolute and relative differences of two scorers' sums, and whether every sum
    agrees within SUMS_RTOL and SUMS_ATOL."""
    a, b = np.asarray(fast, dtype=np.float64), np.asarray(slow, dtype=np.float64)
    diff = np.abs(a - b)
    return {
        "max_abs_diff": float(diff.max()),
        "max_rel_diff": float((diff / np.maximum(np.abs(b), 1e-12)).max()),
        "sums_match": bool(np.all(diff <= SUMS_ATOL + SUMS_RTOL * np.abs(b))),
    }


def _in_fresh_process(func: Callable[..., Any], *args: Any) -> Any:
    """Call `func(*args)` in a new spawned process and return its result."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(func, *args).result()


def _measure_scoring(
    model_dir: str, rows: list[dict[str, Any]], scorer: str, config: dict[str, int]
) -> dict[str, Any]:
    """One measurement of `benchmark_scoring`, run in its own process."""
    import gc

    settings = RewardsConfig(**config)
    tokenizer, model = load_tokenizer(model_dir), load_causal_lm(model_dir)
    items = encode_rows(tokenizer, rows)
    lengths = [len(i.prompt_ids) + len(i.response_ids) for i in items]
    batches = length_batches(lengths, settings.batch_tokens)
    vocab = model.get_output_embeddings().weight.shape[0]

    def score(part: list[EncodedResponse]) -> np.ndarray:
        if scorer == "batched":
            return sequence_logprobs(model, part, tokenizer.pad_token_id, settings)
        return one_per_forward_logprobs(model, part)

    if scorer == "batched":
        held = max(min(sum(len(items[i].response_ids) for i in b), _TOKEN_CHUNK) for b in batches)
        logits_mb = held * min(settings.vocab_chunk, vocab) * 4 / 2**20
    else:
        # Logits and their log-softmax, both sequence x vocabulary in fp32.
        logits_mb = 2 * max(lengths) * vocab * 4 / 2**20
    score(items[:1])
    gc.collect()
    baseline = _reset_peak_rss_kb()
    started = time.perf_counter()
    sums = score(items)
    seconds = time.perf_counter() - started
    return {
        "sums": sums.tolist(),
        "seconds": seconds,
        "peak_mb": (_status_kb("VmHWM") - baseline) / 1024,
        "tokens": sum(lengths),
        "padded_tokens": sum(len(b) * lengths[b[0]] for b in batches),
        "logits_mb": logits_mb,
    }


def _reset_peak_rss_kb() -> int:
    """Reset this process's peak-RSS mark to its current RSS (Linux) and return that, in kB.

    Free heap memory is handed back to the kernel first (glibc's `malloc_trim`), so that
    memory freed by the warm-up and reused later does not hide from the peak.

    Raises:
        RuntimeError: The kernel offers no way to reset it (not Linux, or /proc read-only).
    """
    import ctypes
    import ctypes.util

    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    if hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError as error:
        raise RuntimeError(f"cannot reset the peak RSS in /proc/self/clear_refs: {error}") from None
    return _status_kb("VmRSS")


def _status_kb(field: str) -> int:
    """A memory field of /proc/self/status, in kB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")
