"""Implicit reward: exact sums over response tokens (EOS in, prompt out), padding-independent."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dice_core.config import RewardsConfig
from dice_core.models import load_causal_lm, load_tokenizer
from dice_core.rewards import encode_rows, length_batches, score_samples, sequence_logprobs
from dice_core.tokens import render_prompt

ROWS = [
    {"prompt": "What is 2+2?", "response": "4"},
    {"prompt": "Write a haiku about the sea.", "response": "Waves fold into foam,\nsalt wind."},
    {"prompt": "hi", "response": "Hello! How can I help you today?"},
    {"prompt": "hi", "response": ""},
]


def slow_logprob(model, prompt_ids: list[int], response_ids: list[int]) -> float:
    """One sequence per forward, the full fp32 log-softmax: the independent reference."""
    with torch.no_grad():
        ids = torch.tensor([prompt_ids + response_ids])
        logps = torch.log_softmax(model(ids).logits.float(), dim=-1)[0]
    start = len(prompt_ids) - 1
    return sum(logps[start + j, t].item() for j, t in enumerate(response_ids))


def test_encoding_ends_with_eos_and_excludes_the_prompt(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    items = encode_rows(tokenizer, ROWS)
    for row, item in zip(ROWS, items, strict=True):
        assert item.response_ids[-1] == tokenizer.eos_token_id
        assert tokenizer.decode(item.prompt_ids) == render_prompt(tokenizer, row["prompt"])
        assert tokenizer.decode(item.response_ids[:-1]) == row["response"]
    assert len(items[3].response_ids) == 1  # an empty response still scores its EOS


@pytest.mark.parametrize("side", ["right", "left"])
def test_sums_equal_the_slow_path_for_either_padding(tiny_model_dir, side):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    items = encode_rows(tokenizer, ROWS)
    config = RewardsConfig(batch_tokens=4096, vocab_chunk=4096)
    fast = sequence_logprobs(model, items, tokenizer.pad_token_id, config, padding_side=side)
    slow = [slow_logprob(model, i.prompt_ids, i.response_ids) for i in items]
    np.testing.assert_allclose(fast, slow, rtol=1e-5, atol=1e-4)


def test_batching_and_vocab_chunk_do_not_change_sums(tiny_model_dir):
    tokenizer, model = load_tokenizer(tiny_model_dir), load_causal_lm(tiny_model_dir)
    items = encode_rows(tokenizer, ROWS)
    one = sequence_logprobs(model, items, 2, RewardsConfig(batch_tokens=64, vocab_chunk=256))
    many = sequence_logprobs(model, items, 2, RewardsConfig(batch_tokens=8192, vocab_chunk=50000))
    np.testing.assert_allclose(one, many, rtol=1e-5, atol=1e-4)


def test_length_batches_respect_the_budget():
    lengths = [10, 300, 20, 299, 5, 150]
    batches = length_batches(lengths, batch_tokens=600)
    assert sorted(i for b in batches for i in b) == list(range(6))
    for batch in batches:
        assert len(batch) * max(lengths[i] for i in batch) <= 600 or len(batch) == 1


def test_reward_is_policy_minus_reference_and_zero_for_the_same_model(tiny_model_dir):
    scores = score_samples(str(tiny_model_dir), str(tiny_model_dir), ROWS, RewardsConfig())
    for s in scores:
        assert s["reward"] == s["policy_logp"] - s["reference_logp"] == 0.0
        assert s["policy_logp"] < 0


def test_real_model_prefers_a_sensible_answer(sft_model_dir):
    """SmolLM2 itself gives an on-topic answer a higher log-prob than an off-topic one."""
    tokenizer, model = load_tokenizer(sft_model_dir), load_causal_lm(sft_model_dir)
    rows = [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
        {"prompt": "What is the capital of France?", "response": "Bananas are yellow fruit."},
    ]
    items = encode_rows(tokenizer, rows)
    sums = sequence_logprobs(model, items, tokenizer.pad_token_id, RewardsConfig())
    assert sums[0] > sums[1]
    slow = [slow_logprob(model, i.prompt_ids, i.response_ids) for i in items]
    np.testing.assert_allclose(sums, slow, rtol=1e-5, atol=2e-4)
