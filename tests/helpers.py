"""What the vision tests share: the timm families and their random models and images, the parity tolerance, a
method that keeps a different number of tokens per image, reference computations written against timm's own
(unpatched) code or straight from a paper, tiny vision-LLMs, and the tools as modules."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import timm
import torch
from torch import Tensor, nn

import vistok
from vistok.methods import MethodConfig, TokenReducer

ROOT = Path(__file__).resolve().parents[1]  # the repository
TOL = 1e-4  # parity tolerance of a patched model against the unpatched one

# One entry per supported timm family: (model name, create_model kwargs). Random init, no downloads.
# DINOv2 is built at 224 px instead of 518 to keep the suite fast; the family (registers + LayerScale) is
# the same.
FAMILIES = {
    "vit": ("vit_small_patch16_224", {}),
    "deit_distilled": ("deit_small_distilled_patch16_224", {}),
    "deit3_layerscale": ("deit3_small_patch16_224", {}),
    "dinov2_registers": ("vit_small_patch14_reg4_dinov2", {"img_size": 224}),
    "gap_registers": ("vit_base_patch16_reg4_gap_256", {}),
    "siglip_map": ("vit_base_patch16_siglip_224", {}),
    "qk_norm": ("vit_small_patch16_224", {"qk_norm": True}),
    "eva02_rope": ("eva02_tiny_patch14_224", {"init_values": 1e-5}),  # with LayerScale (gamma_1, gamma_2)
    "rope_mixed": ("vit_small_patch16_rope_mixed_224", {}),
}


def make_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A random model of ``family`` whose every parameter shapes its output: timm starts LayerScale at 1e-6 / 1e-5
    and the mixed-RoPE ViT's head near zero, so with timm's own init a patched attention that returned zeros moved
    deit3's logits by 6e-5 (under :data:`TOL`) and rope_mixed's by 1e-8; here LayerScale is drawn around 1, the
    other constant parameters as :func:`vary_constant_parameters` says, and a head that small is drawn again."""
    name, kwargs = FAMILIES[family]
    torch.manual_seed(seed)
    model = timm.create_model(name, pretrained=False, **{**kwargs, **overrides}).eval()
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter_name, parameter in model.named_parameters():
            if parameter_name.endswith(("gamma", "gamma_1", "gamma_2")):  # timm's LayerScale, EVA's
                parameter.copy_(0.5 + torch.rand(parameter.shape, generator=generator))
        head = model.get_classifier()
        if isinstance(head, nn.Linear) and float(head.weight.abs().max()) < 1e-2:
            nn.init.trunc_normal_(head.weight, std=0.02)
    return vary_constant_parameters(model, seed)


def vary_constant_parameters(model: nn.Module, seed: int = 0) -> nn.Module:
    """``model`` with the parameters a random init leaves constant drawn anew (norm weights and other ones around
    1, zero biases around 0): constant, a patched block that skipped a LayerScale, swapped the q and k norms or
    dropped or swapped a bias gave the unpatched output, and no test could see it. Scalars are left alone."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.numel() < 2 or not parameter.is_floating_point():
                continue
            value = float(parameter.flatten()[0])
            if not bool((parameter == value).all()) or value not in (0.0, 1.0):
                continue
            noise = torch.randn(parameter.shape, generator=generator, dtype=torch.float32).to(parameter.dtype)
            parameter.copy_(0.02 * noise if value == 0.0 else 1.0 + 0.25 * noise.clamp(-2, 2))
    return model


def make_images(model: torch.nn.Module, batch: int, seed: int = 1) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, 3, *model.patch_embed.img_size, generator=generator)


class KeepAboveMeanNorm(TokenReducer):
    """Keeps the patch tokens whose value norm exceeds their image's mean: a different count per image,
    and a choice that depends on nothing but the image itself."""

    def select(self, view):
        prefix = view.layout.num_prefix
        norms = view.v.transpose(1, 2).flatten(2).norm(dim=-1)
        valid = view.layout.valid_mask(norms.device)
        patch_norms = norms[:, prefix:]
        patch_valid = valid[:, prefix:]
        mean = (patch_norms * patch_valid).sum(1, keepdim=True) / patch_valid.sum(1, keepdim=True)
        keep = valid.clone()
        keep[:, prefix:] &= patch_norms > mean
        return keep


class KeepAboveMeanConfig(MethodConfig):
    name = "test-keep-above-mean"

    def __init__(self, blocks):
        self.blocks = blocks

    def build(self, info):
        return {block: KeepAboveMeanNorm() for block in self.blocks}


def reference_sampling(scores, levels, valid, min_keep):
    """Straight from the paper, one image at a time, O(levels x N): normalise, sort ascending, CDF rescaled
    to [0, 1], levels evenly spaced from the smallest positive CDF value to 1, nearest CDF value per level
    (first position on ties), unique; then top up with the best unkept tokens."""
    keep = torch.zeros_like(valid)
    for b in range(scores.shape[0]):
        ids = [i for i in range(scores.shape[1]) if valid[b, i]]
        s = scores[b, ids].double().clamp_min(0)
        s = s / s.sum() if s.sum() > 0 else torch.full_like(s, 1 / len(ids))
        order = sorted(range(len(ids)), key=lambda i: (float(s[i]), i))
        cdf = torch.cumsum(s[order], 0)
        span = float(cdf[-1] - cdf[0])
        ncdf = [(float(c) - float(cdf[0])) / span if span > 0 else 0.0 for c in cdf]
        positive = [c for c in ncdf if c > 0]
        start = min(positive) if positive else 1.0
        n_levels = int(levels[b])
        targets = [1.0] if n_levels == 1 else [start + j * (1 - start) / (n_levels - 1) for j in range(n_levels)]
        picked = set()
        for t in targets:
            distances = [abs(t - c) for c in ncdf]
            picked.add(order[distances.index(min(distances))])
        extra = sorted((i for i in range(len(ids)) if i not in picked), key=lambda i: (-float(s[i]), i))
        need = max(0, min(min_keep, len(ids)) - len(picked))
        for i in list(picked) + extra[:need]:
            keep[b, ids[i]] = True
    return keep


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


def tiny_idefics3(kind: str = "idefics3", seed: int = 0, image_size: int = 32) -> nn.Module:
    """A random ``Idefics3ForConditionalGeneration`` (or SmolVLM's) small enough for CPU tests: 32 px tiles (or
    ``image_size``) in 4 px patches, pixel shuffle 2, so 16 features per tile; placeholder id 99, 100-token
    vocabulary; norm affines and biases varied as :func:`vary_constant_parameters` says."""
    import transformers

    prefix = "Idefics3" if kind == "idefics3" else "SmolVLM"
    vision = getattr(transformers, f"{prefix}VisionConfig")(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                                           num_attention_heads=4, image_size=image_size,
                                                           patch_size=4)
    text = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    config = getattr(transformers, f"{prefix}Config")(vision_config=vision, text_config=text, image_token_id=99,
                                                     scale_factor=2)
    torch.manual_seed(seed)
    return vary_constant_parameters(getattr(transformers, f"{prefix}ForConditionalGeneration")(config).eval(), seed)


def tiny_llama(vocab_size: int, pad_token_id: int) -> nn.Module:
    """A random 2-layer ``LlamaForCausalLM`` of width 16 (seed 0), tied embeddings: a language model for the
    reference VLM and its tools that builds and runs in a moment."""
    import transformers

    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, vocab_size=vocab_size, pad_token_id=pad_token_id,
                                      tie_word_embeddings=True)
    return transformers.LlamaForCausalLM(config).eval()


def tiny_hf_tower(kind: str = "clip", image_size: int = 64, seed: int | None = 0, **vision_config) -> nn.Module:
    """A random Hugging Face ``CLIPVisionModel`` (``kind="clip"``), ``CLIPModel`` (``"clip-full"``, with a tiny text
    tower) or ``SiglipVisionModel`` (``"siglip"``): 4 blocks of width 64 over ``image_size`` px in 8 px patches,
    initialised from ``seed`` (``None``: from torch's global generator as it stands). ``vision_config`` overrides
    or adds vision config fields (``num_hidden_layers=2``, ``attention_dropout=0.5``, ``attn_implementation=...``)."""
    from transformers import (
        CLIPConfig,
        CLIPModel,
        CLIPVisionConfig,
        CLIPVisionModel,
        SiglipVisionConfig,
        SiglipVisionModel,
    )

    vision = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                  image_size=image_size, patch_size=8) | vision_config
    if seed is not None:
        torch.manual_seed(seed)
    if kind == "clip":
        model = CLIPVisionModel(CLIPVisionConfig(**vision))
    elif kind == "clip-full":
        text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
        model = CLIPModel(CLIPConfig(vision_config=vision, text_config=text))
    else:
        model = SiglipVisionModel(SiglipVisionConfig(**vision))
    return vary_constant_parameters(model.eval(), int(torch.randint(2**31, ())) if seed is None else seed)


def tiny_llava(tower: str = "clip", strategy: str = "default", seed: int = 0, image_size: int = 32) -> nn.Module:
    """A random ``LlavaForConditionalGeneration`` for CPU tests: a CLIP (or SigLIP) tower on 32 px images (or
    ``image_size``) in 8 px patches (16 per image), a 2-layer Llama, placeholder id 99, 100-token vocabulary; norm
    affines and biases varied as :func:`vary_constant_parameters` says."""
    from transformers import (
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        SiglipVisionConfig,
    )

    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                  image_size=image_size, patch_size=8)
    vision_config = CLIPVisionConfig(**vision) if tower == "clip" else SiglipVisionConfig(**vision)
    text = LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                       num_key_value_heads=2, vocab_size=100, pad_token_id=0)
    torch.manual_seed(seed)
    config = LlavaConfig(vision_config=vision_config, text_config=text, image_token_id=99,
                         vision_feature_layer=-2, vision_feature_select_strategy=strategy)
    return vary_constant_parameters(LlavaForConditionalGeneration(config).eval(), seed)


def blind_accuracy(examples: list) -> float:
    """The best exact-match accuracy without looking: the most common answer of each question kind, for
    FashionQA-style examples (``kind``, ``answer``)."""
    from collections import Counter

    by_kind = {kind: Counter(e.answer for e in examples if e.kind == kind) for kind in {e.kind for e in examples}}
    return sum(counter.most_common(1)[0][1] for counter in by_kind.values()) / len(examples)


def vlm_accuracy(model: nn.Module, tokenizer, images: Tensor, examples: list) -> float:
    """Exact-match accuracy of a reference VLM's answers to ``examples``' questions about ``images``."""
    from vistok.models.reference_vlm import answer_questions

    answers = answer_questions(model, tokenizer, images, [e.question for e in examples]).answers
    return sum(a == e.answer for a, e in zip(answers, examples, strict=True)) / len(examples)


def load_tool(name: str) -> ModuleType:
    """``tools/<name>.py`` as a module (the tools are scripts, not a package)."""
    spec = importlib.util.spec_from_file_location(f"tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def interrupted_at(function: Callable, call: int) -> Callable:
    """``function``, raising ``KeyboardInterrupt`` on its ``call``-th call instead (a run cut off there, e.g. in the
    validation of epoch 2)."""
    calls = 0

    def cut_off(*args, **kwargs):
        nonlocal calls
        calls += 1
        if calls == call:
            raise KeyboardInterrupt
        return function(*args, **kwargs)

    return cut_off
