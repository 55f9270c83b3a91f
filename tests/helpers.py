"""Reference computations for tests, written against timm's own (unpatched) code."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import torch
from torch import Tensor, nn

import vistok


def upstream_forward_on_kept(model: nn.Module, image: Tensor, layouts: dict[int, vistok.TokenLayout]) -> Tensor:
    """Run ``model`` on one image with timm's own block classes, dropping after each block the tokens a
    vistok run dropped there (``layouts`` from ``handle.layouts`` of that run, batch of one).

    A block's outputs for a token depend on the other tokens only through attention keys, so running the
    full upstream block and then keeping rows gives exactly what a block computing only the kept rows gives.
    """
    assert image.shape[0] == 1
    is_eva = hasattr(model, "rope")
    x = model.patch_embed(image)
    rope = None
    if is_eva:
        x, rope = model._pos_embed(x)
    else:
        x = model._pos_embed(x)
    x = model.norm_pre(x)
    prefix = model.num_prefix_tokens
    source = torch.arange(x.shape[1])
    for index, block in enumerate(model.blocks):
        if is_eva:
            block_rope = rope[index] if getattr(model, "rope_mixed", False) and rope is not None else rope
            if block_rope is not None:
                block_rope = block_rope[..., source[prefix:] - prefix, :]
            x = type(block).forward(block, x, rope=block_rope)
        else:
            x = type(block).forward(block, x)
        if index in layouts:
            kept = layouts[index].source_index()[0]
            position = {int(s): i for i, s in enumerate(source)}
            rows = torch.tensor([position[int(s)] for s in kept])
            x, source = x[:, rows], source[rows]
    x = model.norm(x)
    return type(model).forward_head(model, x)


def tiny_idefics3(kind: str = "idefics3", seed: int = 0) -> nn.Module:
    """A random ``Idefics3ForConditionalGeneration`` (or SmolVLM's) small enough for CPU tests: 32 px tiles in
    4 px patches, pixel shuffle 2, so 16 features per tile; placeholder id 99, 100-token vocabulary."""
    import transformers

    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    vision = getattr(transformers, f"{prefix}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=32, patch_size=4)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, image_token_id=99,
                                                     scale_factor=2)
    torch.manual_seed(seed)
    return getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval()


ROOT = Path(__file__).resolve().parents[1]


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
