"""The generation engines: exactness against transformers, sampling rules, reproducibility."""

from __future__ import annotations

import logging
import os

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

from dice_core.config import GenerationConfig
from dice_core.generation import (
    Completion,
    SlotCache,
    TransformersEngine,
    benchmark_generation,
    encode_prompts,
    engine_threads,
    make_engine,
    nucleus,
    pick_tokens,
    sample_seed,
    vllm_engine_args,
    vllm_requests,
)
from dice_core.models import load_tokenizer
from dice_core.tokens import render_prompt

PROMPTS = [
    "Hi",
    "Write a haiku about the sea, then explain its imagery line by line.",
    "2+2?",
    "List three prime numbers and say why each one is prime, briefly.",
    "What is the capital of France? Answer in one sentence, please.",
]


def engine_for(model_dir, **settings) -> TransformersEngine:
    """A transformers engine with one thread, so results do not depend on the machine."""
    settings = {"engine": "transformers", "num_threads": 1, **settings}
    return TransformersEngine(model_dir, GenerationConfig(**settings))


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory, tiny_model_dir):
    """The tiny model with weights 25x larger: its next token depends on the context.

    With the usual 0.02 initialisation, greedy decoding repeats one token whatever the
    prompt, so a broken cache or attention mask would go unnoticed.
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig.from_pretrained(tiny_model_dir)
    config.initializer_range = 0.5
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    out = tmp_path_factory.mktemp("sharp-model")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tiny_model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def tiny(sharp_model_dir) -> TransformersEngine:
    return engine_for(sharp_model_dir, batch_size=3)


@pytest.fixture(scope="module")
def sft(sft_model_dir) -> TransformersEngine:
    return engine_for(sft_model_dir, batch_size=2)


def generate_greedy(engine: TransformersEngine, prompts: list[str], budget: int) -> list[list[int]]:
    """Reference: transformers' own greedy `generate` on a left-padded batch, one thread."""
    pad = engine.tokenizer.pad_token_id
    ids = encode_prompts(engine.tokenizer, prompts)
    width = max(map(len, ids))
    inputs = torch.tensor([[pad] * (width - len(x)) + x for x in ids])
    mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids])
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            output = engine.model.generate(
                input_ids=inputs,
                attention_mask=mask,
                do_sample=False,
                max_new_tokens=budget,
                pad_token_id=pad,
            )
    finally:
        torch.set_num_threads(threads)
    rows = []
    for row in output[:, width:].tolist():
        cut = next((i + 1 for i, t in enumerate(row) if t in engine.eos), len(row))
        rows.append(row[:cut])
    return rows


# --------------------------------------------------------------------------------------
# Exactness against transformers


def test_greedy_equals_generate_tiny_model(tiny):
    # Five prompts of different lengths in three rows: rows are refilled and moved.
    expected = generate_greedy(tiny, PROMPTS, budget=20)
    got = tiny.sample_tokens(PROMPTS, n=1, max_new_tokens=20, temperature=0.0, top_p=1.0, seed=0)
    assert [row[0] for row in got] == expected


def test_greedy_equals_generate_with_chunked_attention(sharp_model_dir, monkeypatch):
    # Twelve rows make two attention chunks; short and long prompts alternate, so the
    # engine sorts its rows by length before decoding.
    short, long = ["Hi", "2+2?", "Why?"], [PROMPTS[1], PROMPTS[3], PROMPTS[4]]
    prompts = [p for pair in zip(short * 2, long * 2, strict=True) for p in pair]
    moves = []
    permute = SlotCache.permute
    monkeypatch.setattr(
        SlotCache, "permute", lambda self, *args: moves.append(args) or permute(self, *args)
    )
    engine = engine_for(sharp_model_dir, batch_size=12)
    assert engine.chunked
    expected = generate_greedy(engine, prompts, budget=10)
    got = engine.sample_tokens(prompts, 1, 10, temperature=0.0, top_p=1.0, seed=0)
    assert [row[0] for row in got] == expected
    assert moves


def test_greedy_equals_generate_real_model(sft):
    prompts = PROMPTS[1:4]
    expected = generate_greedy(sft, prompts, budget=8)
    got = sft.sample_tokens(prompts, n=2, max_new_tokens=8, temperature=0.0, top_p=1.0, seed=0)
    assert [row[0] for row in got] == expected
    assert all(row[0] == row[1] for row in got)


def test_budget_boundary_real_model(sft):
    prompt = ["What is 2+2? Answer with a number only."]
    (free,) = sft.complete(prompt, 1, 16, 0.0, 1.0, 0)
    assert free[0].finish_reason == "stop"
    used = free[0].num_tokens
    (exact,) = sft.complete(prompt, 1, used, 0.0, 1.0, 0)
    (short,) = sft.complete(prompt, 1, used - 1, 0.0, 1.0, 0)
    assert exact[0] == free[0]
    assert (short[0].finish_reason, short[0].num_tokens) == ("length", used - 1)
    assert free[0].text == free[0].text.strip() and "<|im_end|>" not in free[0].text


def test_budget_of_one_token(tiny):
    rows = tiny.complete(PROMPTS[:2], n=3, max_new_tokens=1, temperature=1.0, top_p=1.0, seed=1)
    assert all(c.num_tokens == 1 and c.finish_reason == "length" for row in rows for c in row)


def test_eos_is_stop_and_counted(tiny):
    # Make the third greedy token of the first prompt an EOS: the sample must stop there.
    plain = tiny.sample_tokens(PROMPTS[:1], 1, 10, 0.0, 1.0, 0)[0][0]
    engine = engine_for(tiny.model.name_or_path, batch_size=3)
    engine.eos = engine.eos | {plain[2]}
    cut = plain.index(plain[2]) + 1
    (row,) = engine.complete(PROMPTS[:1], 1, 10, 0.0, 1.0, 0)
    assert (row[0].finish_reason, row[0].num_tokens) == ("stop", cut)


# --------------------------------------------------------------------------------------
# Sampling rules


@pytest.mark.parametrize("top_p", [0.05, 0.5, 0.9, 0.999])
def test_nucleus_keeps_what_transformers_keeps(top_p):
    generator = torch.Generator().manual_seed(3)
    # Peaked rows take the top-k path, flat rows the full sort.
    scales = torch.tensor([0.1, 1.0, 4.0, 12.0])[:, None]
    logits = torch.randn(4, 5000, generator=generator) * scales
    probs = torch.softmax(logits, dim=-1)
    ours = torch.zeros_like(probs, dtype=torch.bool)
    groups = nucleus(probs, top_p)
    for group in groups:
        rows = torch.ones(4, dtype=torch.bool) if group.rows is None else group.rows
        ours[rows] = ours[rows].scatter(1, group.ids, group.probs > 0)
    if top_p >= 0.5:
        assert len(groups) == 2
    theirs = TopPLogitsWarper(top_p)(None, logits.clone()) > -float("inf")
    assert torch.equal(ours, theirs)


def test_draws_follow_the_renormalised_nucleus():
    logits = torch.log(torch.tensor([[0.5, 0.05, 0.3, 0.15]]))
    grid = (torch.arange(2000, dtype=torch.float64) + 0.5) / 2000
    tokens = pick_tokens(logits.expand(2000, -1), grid, temperature=1.0, top_p=0.9)
    counts = torch.bincount(tokens, minlength=4).tolist()
    # The nucleus at 0.9 is tokens 0, 2, 3 (mass above token 3 is 0.8 < 0.9); 1 is cut.
    # Renormalised: 0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95 of 2000 evenly spaced uniforms.
    assert counts == [1053, 0, 631, 316]


def test_temperature_sharpens_and_zero_is_greedy():
    logits = torch.tensor([[1.0, 2.0, 0.5]]).expand(1000, -1)
    grid = (torch.arange(1000, dtype=torch.float64) + 0.5) / 1000
    cold = torch.bincount(pick_tokens(logits, grid, 0.25, 1.0), minlength=3)
    warm = torch.bincount(pick_tokens(logits, grid, 1.0, 1.0), minlength=3)
    assert cold[1] > warm[1]
    assert pick_tokens(logits, grid, 0.0, 0.5).unique().tolist() == [1]


# --------------------------------------------------------------------------------------
# Reproducibility and shape of the results


def test_same_seed_same_samples_whatever_else(tiny):
    torch.manual_seed(123)
    first = tiny.complete(PROMPTS[:3], 4, 8, 1.0, 0.95, seed=7)
    torch.manual_seed(456)
    again = tiny.complete(PROMPTS[:3], 4, 8, 1.0, 0.95, seed=7)
    other = tiny.complete(PROMPTS[:3], 4, 8, 1.0, 0.95, seed=8)
    assert first == again
    assert first != other
    # Four samples of a prompt differ from each other.
    assert len({c.text for c in first[0]}) > 1


def test_samples_do_not_depend_on_prompt_order(sharp_model_dir):
    # Reversing the prompts puts every sample in other rows at other steps.
    engine = engine_for(sharp_model_dir, batch_size=4)
    forward = engine.sample_tokens(PROMPTS[:3], 3, 8, 1.0, 0.9, seed=5)
    backward = engine.sample_tokens(PROMPTS[2::-1], 3, 8, 1.0, 0.9, seed=5)
    assert forward == backward[::-1]


def test_global_random_state_is_untouched(tiny):
    torch.manual_seed(0)
    before = torch.get_rng_state()
    tiny.complete(PROMPTS[:2], 2, 4, 1.0, 0.9, seed=1)
    assert torch.equal(before, torch.get_rng_state())


def test_shape_order_and_progress(tiny):
    calls = []
    record = lambda done, total: calls.append((done, total))  # noqa: E731
    rows = tiny.complete(PROMPTS[:2], 3, 5, 0.8, 0.9, seed=2, progress=record)
    assert [len(row) for row in rows] == [3, 3]
    assert all(isinstance(c, Completion) for row in rows for c in row)
    assert calls[-1] == (6, 6) and [d for d, _ in calls] == sorted(d for d, _ in calls)
    # Sample k is the k-th pass: a call with fewer samples returns the same first ones.
    assert tiny.complete(PROMPTS[:2], 2, 5, 0.8, 0.9, seed=2) == [row[:2] for row in rows]


def test_greedy_repeats_one_decode(tiny):
    rows = tiny.complete(PROMPTS[:2], 3, 6, 0.0, 0.9, seed=0)
    assert all(row[0] == row[1] == row[2] for row in rows)


def test_bad_settings_are_refused(tiny):
    with pytest.raises(ValueError, match="top_p"):
        tiny.complete(PROMPTS[:1], 1, 4, 1.0, 0.0, seed=0)
    with pytest.raises(ValueError, match="n must"):
        tiny.complete(PROMPTS[:1], 0, 4, 1.0, 0.5, seed=0)
    assert tiny.complete([], 2, 4, 1.0, 0.5, seed=0) == []


def test_sample_seed_is_stable():
    assert sample_seed(42, "hello", 3) == sample_seed(42, "hello", 3)
    assert len({sample_seed(42, "hello", k) for k in range(16)}) == 16
    assert sample_seed(42, "hello", 0) != sample_seed(43, "hello", 0)


# --------------------------------------------------------------------------------------
# Engine choice and the vLLM requests


def test_missing_vllm_falls_back_with_one_warning(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setitem(__import__("sys").modules, "vllm", None)
    with caplog.at_level(logging.WARNING, logger="dice_core.generation"):
        engine = make_engine(tiny_model_dir, GenerationConfig(engine="vllm"))
    assert engine.name == "transformers"
    warnings = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0].getMessage()
    assert "vLLM" in warnings[0].getMessage()


def test_auto_and_transformers_choose_quietly(tiny_model_dir, caplog, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level(logging.WARNING):
        for choice in ("auto", "transformers"):
            assert make_engine(tiny_model_dir, GenerationConfig(engine=choice)).name == (
                "transformers"
            )
    assert not caplog.records


def test_vllm_requests_render_prompts_like_the_cpu_engine(tiny_model_dir):
    tokenizer = load_tokenizer(tiny_model_dir)
    inputs, settings = vllm_requests(tokenizer, PROMPTS[:2], 4, 16, 0.7, 0.9, seed=3)
    for prompt, item in zip(PROMPTS[:2], inputs, strict=True):
        ids = tokenizer(render_prompt(tokenizer, prompt))["input_ids"]
        assert item["prompt_token_ids"] == ids
        assert tokenizer.decode(ids).endswith("<|im_start|>assistant\n")
    assert inputs == [{"prompt_token_ids": ids} for ids in encode_prompts(tokenizer, PROMPTS[:2])]
    assert settings[0]["n"] == 4 and settings[0]["max_tokens"] == 16
    assert settings[0]["seed"] != settings[1]["seed"]
    greedy = vllm_requests(tokenizer, PROMPTS[:1], 4, 16, 0.0, 0.9, seed=3)[1][0]
    assert greedy["n"] == 1


def test_vllm_without_cuda_gets_a_fixed_kv_cache_and_eager_mode():
    config = GenerationConfig(engine="vllm", gpu_memory_utilization=0.8)
    gpu = vllm_engine_args("model", config, "float32", cuda=True)
    cpu = vllm_engine_args("model", config, "float32", cuda=False)
    assert gpu["gpu_memory_utilization"] == 0.8 and "kv_cache_memory_bytes" not in gpu
    assert "gpu_memory_utilization" not in cpu and cpu["enforce_eager"] is True
    assert cpu["kv_cache_memory_bytes"] >= 1 << 30
    assert {k: cpu[k] for k in ("model", "dtype", "seed")} == {
        k: gpu[k] for k in ("model", "dtype", "seed")
    }


# --------------------------------------------------------------------------------------
# Benchmark


def test_benchmark_reports_rates_and_ratios(tiny_model_dir):
    config = GenerationConfig(
        engine="transformers", samples_per_prompt=2, max_new_tokens=6, num_threads=1
    )
    torch.manual_seed(0)
    before = torch.get_rng_state()
    result = benchmark_generation(tiny_model_dir, PROMPTS[:2], config, baseline_prompts=1)
    assert torch.equal(before, torch.get_rng_state())
    assert result["forward_probes"] >= 2
    assert 0 < result["engine_tokens"] <= 2 * 2 * 6
    for key in ("engine_tokens_per_s", "generate_tokens_per_s", "forward_tokens_per_s"):
        assert result[key] > 0
    expected = result["engine_tokens_per_s"] / result["generate_tokens_per_s"]
    assert result["speedup_vs_generate"] == pytest.approx(expected)


def test_threads_default_leaves_a_core_free(monkeypatch):
    import psutil

    assert engine_threads(3) == 3
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 8)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert engine_threads(None) == 7
    monkeypatch.setattr(psutil, "cpu_count", lambda logical=True: 1)
    assert engine_threads(None) == 1
