"""One tokenisation for generation, scoring and training, so their log-probs line up.

The prompt is a single user turn rendered by the model's chat template with the generation
prompt; the response is the stripped assistant text followed by the EOS token. Both are
tokenised with the tokenizer's plain call, as TRL's DPOTrainer does for non-conversational
rows (prompt text, completion text, EOS appended), so log-probs computed here equal the
trainer's own.
"""

from __future__ import annotations

from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase


@dataclass(frozen=True)
class EncodedResponse:
    """Token ids of a prompt and of its response (response ids end with EOS)."""

    prompt_ids: list[int]
    response_ids: list[int]


def render_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The chat-templated text of a single-turn prompt, ending where the assistant starts."""
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    # Tokenizers that add BOS themselves would otherwise see it twice (template + tokenizer).
    bos = tokenizer.bos_token
    if bos and text.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        text = text[len(bos) :]
    return text


def common_prefix(a: list[int], b: list[int]) -> int:
    """Length of the longest common prefix of two id lists."""
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n


def encode_response(
    tokenizer: PreTrainedTokenizerBase, prompt_text: str, response: str
) -> EncodedResponse:
    """Tokenise a rendered prompt and a response the way the DPO trainer does.

    Args:
        tokenizer: The policy's tokenizer.
        prompt_text: Output of `render_prompt`.
        response: Assistant text, without EOS.

    Returns:
        Prompt ids and response ids; the response ends with the EOS id.
    """
    eos = tokenizer.eos_token
    prompt_ids = tokenizer(prompt_text)["input_ids"]
    full_ids = tokenizer(prompt_text + response + eos)["input_ids"]
    split = common_prefix(prompt_ids, full_ids)
    return EncodedResponse(prompt_ids=full_ids[:split], response_ids=full_ids[split:])
