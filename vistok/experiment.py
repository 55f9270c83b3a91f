"""What tools/train.py, tools/eval.py and tools/sweep.py share: config sections, building the model and the
data from a config."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from .config import ConfigError
from .data import GreyBatchTransform, fashion_mnist_dataset, image_folder_dataset

__all__ = ["MODEL_DEFAULTS", "DATA_DEFAULTS", "build_model", "build_data", "set_fused_attention"]

MODEL_DEFAULTS: dict[str, Any] = {
    "model": "vistok_vit_fmnist",
    "model_kwargs": {},
    "pretrained": False,
    "checkpoint": None,
    "method": None,
    "method_options": {},
}
DATA_DEFAULTS: dict[str, Any] = {
    "name": "fashion_mnist", "root": None, "download": False, "input_size": 224, "augment": True,
    "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "workers": 0, "limit": 0,
}


def build_model(config: dict[str, Any], patch: bool = True) -> nn.Module:
    """``timm.create_model(config["model"], ...)``, then the ``checkpoint`` weights if given, then the vistok
    ``method`` if given (and ``patch``).

    Raises:
        ConfigError: the model name is not in timm's registry.
        CheckpointError: the checkpoint is missing or does not fit.
    """
    import timm

    from .models.reference import load_checkpoint
    from .patching import patch as patch_model

    if not timm.is_model(config["model"]):
        close = timm.list_models(f"*{config['model'][:6]}*")[:5]
        raise ConfigError(f"unknown model {config['model']!r}: not in timm's registry (nor vistok's); similar: {close}")
    model = timm.create_model(config["model"], pretrained=config["pretrained"], **config["model_kwargs"])
    if config["checkpoint"]:
        load_checkpoint(model, config["checkpoint"])
    if patch and config["method"]:
        patch_model(model, config["method"], **config["method_options"])
    return model


def set_fused_attention(model: nn.Module, enabled: bool) -> int:
    """Switch timm's fused attention (``F.scaled_dot_product_attention``) on or off in every attention module
    of ``model`` that has the ``fused_attn`` switch; returns how many it switched.

    Off, timm computes ``softmax(q @ k.T * scale) @ v`` with plain matmuls: the same function. On a CPU under
    bfloat16 autocast that trains the reference ViT 1.7x faster, because the CPU flash-attention backward for
    32-wide heads costs five times its forward.
    """
    switched = 0
    for module in model.modules():
        if isinstance(getattr(module, "fused_attn", None), bool):
            module.fused_attn = enabled
            switched += 1
    return switched


def build_data(data: dict[str, Any], seed: int = 0) -> tuple[Dataset, Dataset, Any, Any]:
    """Train and validation datasets, and the per-batch transforms (``None`` where the dataset transforms).

    Raises:
        ConfigError: unknown dataset name or missing folder root.
        DatasetNotFoundError: the data is not where the config says or vistok looks.
    """
    if data["name"] == "fashion_mnist":
        train = fashion_mnist_dataset("train", data["root"], data["download"])
        val = fashion_mnist_dataset("test", data["root"], data["download"])
        transforms = GreyBatchTransform(augment=data["augment"], seed=seed), GreyBatchTransform()
    elif data["name"] == "folder":
        if not data["root"]:
            raise ConfigError("data.name=folder needs data.root (a folder with train/ and val/ class folders)")
        size, mean, std = data["input_size"], tuple(data["mean"]), tuple(data["std"])
        train = image_folder_dataset(data["root"], "train", size, True, mean, std)
        val = image_folder_dataset(data["root"], "val", size, False, mean, std)
        transforms = None, None
    else:
        raise ConfigError(f"data.name must be 'fashion_mnist' or 'folder', got {data['name']!r}")
    if data["limit"]:  # the first images of each split only (smoke tests, quick looks)
        train, val = (torch.utils.data.Subset(d, range(min(data["limit"], len(d)))) for d in (train, val))
    return train, val, *transforms


def batches(dataset: Dataset, batch_size: int, limit: int | None = None):
    """Deterministic, unshuffled ``(images, labels)`` batches of a dataset, optionally its first ``limit``."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size)
