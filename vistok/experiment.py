"""What tools/train.py, tools/eval.py and tools/sweep.py share: config sections, building the model and the
data from a config.

Models: a timm name (vistok's models included), or ``hf:<transformers class>`` (e.g.
``hf:VideoMAEForVideoClassification``): built from ``model_kwargs`` as its config (random init), or with
``pretrained: true`` loaded by ``from_pretrained(model_kwargs.name_or_path)``.

Data: ``fashion_mnist``, ``folder`` (ImageNet-style class folders), or ``video``: clips listed in a Kinetics CSV
(``data.format: kinetics_csv``), a ``path label`` list (``list``) or class folders (``folders``), read with
:mod:`vistok.video`; a video model is wrapped in :class:`~vistok.video.VideoClassifier` (``[B, C, T, H, W]`` clips
in, logits out, test views averaged).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from ._checks import is_int
from .config import ConfigError, _flatten
from .data import DatasetNotFoundError, GreyBatchTransform, fashion_mnist_dataset, image_folder_dataset
from .errors import InputShapeError, InvalidConfigError

__all__ = ["MODEL_DEFAULTS", "DATA_DEFAULTS", "UNSET_KINDS", "build_model", "build_data", "fit_head_to_data",
           "check_head_is_trained", "check_model_classes", "check_model_takes_images", "image_settings",
           "upgrade_saved_config", "set_fused_attention", "wrap_for_data",
           "loader", "batches", "first_inputs", "LabelledBatches", "underlying", "truncate_log", "resumed_log",
           "save_whole", "check_run_folder"]

MODEL_DEFAULTS: dict[str, Any] = {
    "model": "vistok_vit_fmnist",
    "model_kwargs": {},
    "pretrained": False,
    "checkpoint": None,
    "method": None,
    "method_options": {},
}
DATA_DEFAULTS: dict[str, Any] = {
    # input_size, mean, std, interpolation, crop_pct: None takes the model's pretrained config (folder data), else
    # ImageNet's (IMAGENET_IMAGES)
    "name": "fashion_mnist", "root": None, "download": False, "input_size": None, "augment": True,
    "mean": None, "std": None, "interpolation": None, "crop_pct": None, "workers": 0, "limit": 0,
    # video (name: video): where the clips are listed, how clips are sampled, multi-view testing
    "format": "kinetics_csv", "train_list": "", "val_list": "", "train_split": "train", "val_split": "",
    "sampling": "dense", "num_frames": 16, "sampling_rate": 4, "short_side": 0, "test_clips": 1, "test_crops": 1,
    "on_error": "skip", "backend": "auto", "timeout": 10.0, "flip": True, "grey": False,
}
# what the keys above that default to None (unset) may be set to, for load_config's check
UNSET_KINDS: dict[str, tuple[type, ...]] = {
    "checkpoint": (str,), "method": (str, list), "data.root": (str,), "data.input_size": (int, list),
    "data.mean": (int, float, list), "data.std": (int, float, list), "data.interpolation": (str,),
    "data.crop_pct": (int, float)}
VIDEO_FORMATS = ("kinetics_csv", "list", "folders")
IMAGENET_IMAGES: dict[str, Any] = {"input_size": 224, "mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225),
                                   "interpolation": "bilinear", "crop_pct": 0.875}
IMAGE_KEYS = tuple(IMAGENET_IMAGES)


def build_model(config: dict[str, Any], patch: bool = True) -> nn.Module:
    """``timm.create_model(config["model"], ...)``, then the ``checkpoint`` weights if given, then the vistok
    ``method`` if given (and ``patch``).

    Raises:
        ConfigError: the model name is not in timm's registry.
        CheckpointError: the checkpoint is missing or does not fit.
    """
    from .models.reference import load_checkpoint
    from .patching import patch as patch_model

    if config["model"].startswith("hf:"):
        model = _build_hf_model(config["model"][3:], config["model_kwargs"], config["pretrained"])
    else:
        model = _create_timm(config["model"], config["model_kwargs"], pretrained=config["pretrained"])
    if config["checkpoint"]:
        load_checkpoint(model, config["checkpoint"])
    if patch and config["method"]:
        patch_model(model, config["method"], **config["method_options"])
    return model


def _build_hf_model(class_name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    import transformers

    cls = getattr(transformers, class_name, None)
    if cls is None or not hasattr(cls, "config_class"):
        raise ConfigError(f"model hf:{class_name}: transformers has no model class {class_name!r}")
    kwargs = dict(kwargs)
    source = kwargs.pop("name_or_path", None)
    if pretrained:
        if not source:
            raise ConfigError(f"model hf:{class_name} with pretrained: true needs model_kwargs.name_or_path")
        return cls.from_pretrained(source, **kwargs)
    defaults = cls.config_class()  # a config keeps any keyword as an attribute: a typo would change nothing
    # a setting, or one kept privately (attn_implementation as _attn_implementation)
    unknown = sorted(key for key in kwargs if not hasattr(defaults, key) and not hasattr(defaults, f"_{key}"))
    if unknown:
        raise ConfigError(f"model hf:{class_name}: model_kwargs {unknown} are not {cls.config_class.__name__} "
                          "settings")
    return cls(cls.config_class(**kwargs))


def wrap_for_data(model: nn.Module, data: dict[str, Any]) -> nn.Module:
    """``model`` as the data's batches need it: a video model in a :class:`~vistok.video.VideoClassifier`."""
    if data["name"] != "video":
        return model
    from .video import VideoClassifier

    return VideoClassifier(model)


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


def build_data(data: dict[str, Any], seed: int = 0, train: bool = True, model: dict[str, Any] | None = None
               ) -> tuple[Dataset | None, Dataset, Any, Any]:
    """Train and validation datasets, and the per-batch transforms (``None`` where the dataset transforms).
    ``train=False`` (evaluation): no training set (``None``); a video dataset's class list is read from the
    training list without looking for its clips. ``model``: the config's model section (``model``,
    ``model_kwargs``), whose pretrained config gives folder data the ``data.*`` image settings left unset.

    Raises:
        ConfigError: unknown dataset name or missing folder root.
        DatasetNotFoundError: the data is not where the config says or vistok looks.
    """
    for key in ("limit", "workers"):
        if not is_int(data[key], 0):
            raise ConfigError(f"data.{key} must be an int >= 0, got {data[key]!r}")
    if data["name"] == "fashion_mnist":
        ignored = [key for key in IMAGE_KEYS if data[key] is not None and not _earlier_default(key, data[key])]
        if ignored:
            raise ConfigError(f"data.name=fashion_mnist reads 28 x 28 grey images normalised with the dataset's own "
                              f"mean and std; {', '.join(f'data.{key}' for key in ignored)} would change nothing "
                              "(they apply to folder and video data)")
        train_set = fashion_mnist_dataset("train", data["root"], data["download"]) if train else None
        val = fashion_mnist_dataset("test", data["root"], data["download"])
        transforms = GreyBatchTransform(augment=data["augment"], seed=seed, flip=data["flip"]), GreyBatchTransform()
    elif data["name"] == "video":
        train_set, val = _video_datasets(data, seed, train)
        transforms = None, None
    elif data["name"] == "folder":
        if not data["root"]:
            raise ConfigError("data.name=folder needs data.root (a folder with train/ and val/ class folders)")
        images = image_settings(data, model)
        train_set = image_folder_dataset(data["root"], "train", train=data["augment"], flip=data["flip"],
                                         **images) if train else None  # augment=false: the eval transform
        val = image_folder_dataset(data["root"], "val", train=False, **images)
        transforms = None, None
    else:
        raise ConfigError(f"data.name must be 'fashion_mnist', 'folder' or 'video', got {data['name']!r}")
    if data["limit"]:  # the first images of each split only (smoke tests, quick looks)
        train_set, val = (None if d is None else torch.utils.data.Subset(d, range(min(data["limit"], len(d))))
                          for d in (train_set, val))
    return train_set, val, *transforms


def _earlier_default(key: str, value: Any) -> bool:
    """Whether ``value`` is what ``data.<key>`` defaulted to before it could be unset (ImageNet's 224 px, mean and
    std), as configs saved then hold it."""
    earlier = IMAGENET_IMAGES[key] if key in ("input_size", "mean", "std") else None
    return earlier is not None and (value == earlier or isinstance(value, (list, tuple)) and tuple(value) == earlier)


def upgrade_saved_config(config: dict[str, Any]) -> dict[str, Any]:
    """A config saved by a vistok from before ``data.interpolation`` and ``data.crop_pct`` (when ``input_size``,
    ``mean`` and ``std`` defaulted to ImageNet's), in today's terms: folder data then resized bilinearly with crop
    0.875 at the saved size, mean and std; video read those three only (ImageNet's: today's unset); Fashion-MNIST
    read none of them."""
    data = config.get("data")
    if not isinstance(data, dict) or "crop_pct" in data:
        return config
    data = {**data, "interpolation": None, "crop_pct": None}
    if data.get("name") == "folder":
        data.update(interpolation="bilinear", crop_pct=0.875)
    else:
        data.update({key: None for key in ("input_size", "mean", "std")
                     if data.get("name") != "video" or _earlier_default(key, data.get(key))})
    return {**config, "data": data}


def image_settings(data: dict[str, Any], model: dict[str, Any] | None = None) -> dict[str, Any]:
    """``input_size``, ``mean``, ``std``, ``interpolation``, ``crop_pct`` and ``channels`` for images: each
    ``data.<key>`` that is set, else what timm's ``resolve_data_config`` gives for the timm model ``model["model"]``
    built with its ``model_kwargs`` (on the meta device: no weights), else ImageNet's (:data:`IMAGENET_IMAGES`);
    ``channels`` is the model's input channels (``model_kwargs.in_chans``, else its config's; 3 without a model).

    Raises:
        ConfigError: a setting of the wrong kind, or a mean and std that do not fit the channels.
    """
    pretrained: dict[str, Any] = {}
    kwargs = {} if model is None else model.get("model_kwargs", {})
    if model is not None and not model["model"].startswith("hf:"):
        from timm.data import resolve_data_config

        built = _on_meta(model["model"], kwargs)  # the model's own config (its kwargs applied)
        resolved = resolve_data_config({}, model=built)
        grid = getattr(getattr(built, "patch_embed", None), "img_size", None)  # model_kwargs.img_size, where set
        pretrained = {**resolved, "input_size": tuple(grid) if grid else resolved["input_size"][1:],
                      "channels": resolved["input_size"][0]}
    out = {key: _checked_image_setting(key, data[key] if data[key] is not None else pretrained.get(
        key, IMAGENET_IMAGES[key])) for key in IMAGE_KEYS}
    out["channels"] = kwargs.get("in_chans", pretrained.get("channels", 3))
    for key in ("mean", "std"):
        if len(out[key]) not in (1, out["channels"]):
            raise ConfigError(f"data.{key} has {len(out[key])} values for a model of {out['channels']} input "
                              f"channels: give one value per channel (or one for all)")
    return out


def _on_meta(name: str, kwargs: dict[str, Any]) -> nn.Module:
    """The timm model ``name`` built with ``kwargs`` on the meta device: its configuration, without weights."""
    with torch.device("meta"):
        return _create_timm(name, kwargs, pretrained=False)


def _create_timm(name: str, kwargs: dict[str, Any], pretrained: bool) -> nn.Module:
    """The timm model ``name`` built with ``model_kwargs`` ``kwargs``; a key it does not take (or a value of the
    wrong type) is a :class:`ConfigError`, not a ``TypeError`` from inside timm."""
    from ._timm import create_timm_model

    try:
        return create_timm_model(name, "model", ConfigError, pretrained=pretrained, **kwargs)
    except TypeError as error:
        raise ConfigError(f"model {name} with model_kwargs {kwargs}: {error}") from None


def _pair(size: int | list | tuple) -> tuple[int, int]:
    return (size, size) if is_int(size) else tuple(size)


def _checked_image_setting(key: str, value: Any) -> Any:
    from ._checks import is_real

    if key == "input_size":
        size = _pair(value) if is_int(value) or isinstance(value, (list, tuple)) else None
        if size is None or len(size) != 2 or not all(is_int(side, 1) for side in size):
            raise ConfigError(f"data.input_size must be an int >= 1 or [height, width], got {value!r}")
        return size[0] if size[0] == size[1] else size
    if key in ("mean", "std"):
        value = [value] if is_real(value) else value  # one number: the same for every channel
        finite = isinstance(value, (list, tuple)) and all(is_real(v) and math.isfinite(v) for v in value)
        if not value or not finite or (key == "std" and not all(v > 0 for v in value)):
            raise ConfigError(f"data.{key} must be a finite number or a list of them (one per channel"
                              f"{', > 0' * (key == 'std')}), got {value!r}")
        return tuple(float(v) for v in value)
    if key == "crop_pct":
        if not is_real(value) or not 0 < value <= 1:
            raise ConfigError(f"data.crop_pct must be a number in (0, 1], got {value!r}")
        return float(value)
    if value not in ("bilinear", "bicubic", "nearest", "lanczos"):
        raise ConfigError(f"data.interpolation must be bilinear, bicubic, nearest or lanczos, got {value!r}")
    return value


def check_model_takes_images(model: nn.Module, dataset: Dataset, transform: Callable | None, where: str) -> None:
    """Refuse, before the work, a timm model that does not take ``dataset``'s images (its first item, through
    ``transform``): other input channels, or another size for a model whose timm ``PatchEmbed`` has a fixed size
    (timm's own assertion came from the first forward, after the model and data were built). Other models, and
    other patch embeddings, are left to their own checks.

    Raises:
        ConfigError: the model's input channels or fixed size differ from the images'.
    """
    embed = getattr(model, "patch_embed", None)
    if embed is None or len(dataset) == 0:
        return
    image = dataset[0][0]
    image = image[None] if transform is None else transform(image[None])  # [1, C, H, W]
    conv = next((m for m in embed.modules() if isinstance(m, nn.Conv2d)), None)
    shape = "x".join(map(str, image.shape[1:]))
    if conv is not None and image.dim() == 4 and image.shape[1] != conv.in_channels:
        raise ConfigError(f"{where}: the data's images are {shape} (channels x height x width) and "
                          f"{type(model).__name__} takes {conv.in_channels} channels; set model_kwargs.in_chans or "
                          "pick the data for the model")
    from timm.layers import PatchEmbed

    # the size rule of timm's PatchEmbed, which asserts it (XCiT's conv stem, say, takes any size)
    fixed = getattr(embed, "img_size", None) if isinstance(embed, PatchEmbed) else None
    flexible = (getattr(model, "dynamic_img_size", False) or getattr(embed, "dynamic_img_pad", False)
                or not getattr(embed, "strict_img_size", True))
    if fixed is not None and not flexible and image.dim() == 4 and tuple(image.shape[-2:]) != tuple(fixed):
        raise ConfigError(f"{where}: the data's images are {shape} (channels x height x width) and "
                          f"{type(model).__name__} was built for {'x'.join(map(str, fixed))}; set "
                          "model_kwargs.img_size (or model_kwargs.dynamic_img_size=true), or data.input_size for "
                          "folder data")


def fit_head_to_data(config: dict[str, Any], *datasets: Dataset) -> dict[str, Any]:
    """``config`` with a timm model's ``model_kwargs.num_classes`` set to the class count of a class-folder dataset
    (``data.name=folder``: as many outputs as ``train/`` has class folders, not the model's default 1000).

    Raises:
        ConfigError: the splits' classes differ, or ``model_kwargs.num_classes`` says another count.
    """
    if config["data"]["name"] != "folder" or config["model"].startswith("hf:"):
        return config
    found = []
    for dataset in datasets:
        found.append(list(underlying(dataset).classes))
    if any(classes != found[0] for classes in found[1:]):
        raise ConfigError(f"data.root={config['data']['root']}: the splits have different class folders "
                          f"({[len(classes) for classes in found]} classes: {found})")
    count = len(found[0])
    given = config["model_kwargs"].get("num_classes")
    if given is not None and given != count:
        raise ConfigError(f"model_kwargs.num_classes={given}, but data.root={config['data']['root']} has {count} "
                          "class folders")
    return {**config, "model_kwargs": {**config["model_kwargs"], "num_classes": count}}


def check_head_is_trained(config: dict[str, Any], tool: str) -> None:
    """Refuse to evaluate a pretrained timm model whose head :func:`fit_head_to_data` resized to a class folder's
    count without a ``checkpoint`` to fill it: its head would be random, its accuracy chance.

    Raises:
        ConfigError: as above.
    """
    if config["data"]["name"] != "folder" or not config["pretrained"] or config["checkpoint"] or \
            config["model"].startswith("hf:"):
        return
    kwargs = {key: value for key, value in config["model_kwargs"].items() if key != "num_classes"}
    trained = _on_meta(config["model"], kwargs).num_classes
    wanted = config["model_kwargs"]["num_classes"]
    if trained != wanted:
        raise ConfigError(f"{tool}: {config['model']}'s pretrained head has {trained} classes and data.root="
                          f"{config['data']['root']} has {wanted} class folders, so the head would be random; give a "
                          "checkpoint trained on these classes (checkpoint=...)")


def check_model_classes(model: nn.Module, dataset: Dataset, config: dict[str, Any], tool: str) -> None:
    """Refuse a model whose class scores are not one per class of a dataset that names its classes (class folders,
    video folders and Kinetics CSVs; a video list file's numeric labels only need scores up to its highest): eval and
    the sweep scored the missing classes as misses, training failed in the loss.

    Raises:
        ConfigError: as above.
    """
    inner = underlying(dataset)
    names = getattr(inner, "classes", None)
    names = getattr(getattr(inner, "videos", None), "classes", None) if names is None else names
    outputs = getattr(model, "num_classes", None)
    config_labels = getattr(getattr(model, "config", None), "num_labels", None)
    outputs = config_labels if outputs is None else outputs
    if names is None or not isinstance(outputs, int):
        return
    if outputs == len(names):
        _check_label_order(model, list(names), config, tool)
        return
    if config["data"].get("format") == "list" and outputs > len(names):
        return  # a list's labels are the model's own class ids, and its highest may be below the model's last
    raise ConfigError(f"{tool}: {config['model']} gives {outputs} class scores, but data.root={config['data']['root']} "
                      f"has {len(names)} classes; give the model that many (model_kwargs.num_classes, or num_labels "
                      "for an hf: model) and weights trained on them")


def _check_label_order(model: nn.Module, names: list[str], config: dict[str, Any], tool: str) -> None:
    """Refuse a Hugging Face model whose ``id2label`` names the data's classes in another order (a checkpoint's
    class ``i`` would be scored as the data's class ``i``: near zero accuracy, silently). Names that differ (the
    default ``LABEL_i``, other spellings) are not compared."""
    id2label = getattr(getattr(model, "config", None), "id2label", None)
    if not isinstance(id2label, dict) or set(id2label) != set(range(len(names))):
        return
    labels = [str(id2label[index]) for index in range(len(names))]
    if labels != names and sorted(labels) == sorted(names):
        first = next(index for index, (a, b) in enumerate(zip(labels, names, strict=True)) if a != b)
        raise ConfigError(f"{tool}: {config['model']} numbers the classes in another order than data.root="
                          f"{config['data']['root']} (class {first} is {labels[first]!r} for the model, "
                          f"{names[first]!r} for the data, which numbers its classes by their sorted names); use "
                          "weights trained on this numbering, or a list file (data.format=list) of the model's ids")


def _video_datasets(data: dict[str, Any], seed: int, train: bool) -> tuple[Dataset | None, Dataset]:
    from .video import ClipSampling, ClipTransform, VideoClipDataset, class_folders, kinetics_csv, list_file
    from .video.datasets import folder_classes, kinetics_classes, list_classes

    ignored = [f"data.{key}" for key in ("interpolation", "crop_pct") if data[key] is not None]
    if ignored:
        raise ConfigError(f"data.name=video resizes each clip's short side and crops it; {', '.join(ignored)} would "
                          "change nothing (they apply to folder data)")
    if data["format"] not in VIDEO_FORMATS:
        raise ConfigError(f"data.format must be one of {VIDEO_FORMATS}, got {data['format']!r}")
    if not data["root"]:
        raise ConfigError("data.name=video needs data.root (the folder the clips are in)")
    root = Path(data["root"])
    if not root.is_dir():
        made = " (python tools/make_video_data.py writes it)" if root.name == "fmnist_clips" else ""
        raise DatasetNotFoundError(f"data.root={root} is not a folder{made}")

    def list_path(which: str) -> Path:
        listing = data[f"{which}_list"]
        if not listing:
            raise ConfigError(f"data.format={data['format']} needs data.{which}_list")
        return Path(listing) if Path(listing).is_absolute() else root / listing

    def listed(which: str, split: str, classes: list[str] | None = None):
        if data["format"] == "folders":
            return class_folders(root / which, classes=classes)
        if data["format"] == "list":
            return list_file(list_path(which), root, classes=classes, on_error=data["on_error"])
        return kinetics_csv(list_path(which), root, split=split or None, classes=classes, on_error=data["on_error"])

    def training_classes() -> list[str]:  # what listed("train", ...) names its classes, without finding clips
        if data["format"] == "folders":
            return folder_classes(root / "train")
        if data["format"] == "list":
            return list_classes(list_path("train"))
        return kinetics_classes(list_path("train"), data["train_split"] or None)

    train_videos = listed("train", data["train_split"]) if train else None
    classes = train_videos.classes if train else training_classes()
    val_videos = listed("val", data["val_split"], classes)
    sampling = dict(mode=data["sampling"], num_frames=data["num_frames"], sampling_rate=data["sampling_rate"])
    images = image_settings(data)  # what data.* sets, else ImageNet's
    if not is_int(images["input_size"]):
        raise ConfigError(f"data.input_size of video data must be one int (square crops), got {data['input_size']!r}")
    size, short = images["input_size"], data["short_side"] or images["input_size"]
    normalise = dict(mean=images["mean"], std=images["std"], grey=data["grey"])
    reading = dict(on_error=data["on_error"], backend=data["backend"], timeout=data["timeout"])
    train_set = None
    if train:
        train_set = VideoClipDataset(train_videos, ClipSampling(**sampling),
                                     ClipTransform(size, short, train=data["augment"], seed=seed, flip=data["flip"],
                                                   **normalise), train=True, seed=seed, **reading)
    val = VideoClipDataset(val_videos, ClipSampling(**sampling, num_clips=data["test_clips"]),
                           ClipTransform(size, short, num_crops=data["test_crops"], **normalise), **reading)
    return train_set, val


def save_whole(state: dict[str, Any], path: Path, save: Callable[[Any, Path], Any] = torch.save) -> None:
    """``save(state, path)`` (``torch.save``; ``safetensors.torch.save_file`` for weights) written beside ``path``
    and moved over it in one step: a save cut off half-way leaves the previous file whole, never a broken one a
    resume or a loader cannot read."""
    partial = path.with_name(path.name + ".partial")
    save(state, partial)
    os.replace(partial, path)


_UNSET = object()  # a setting one of the two runs does not have


def check_resumed_settings(saved: dict[str, Any] | None, current: dict[str, Any], may_change: tuple[str, ...],
                           where: Path) -> None:
    """Refuse to resume a run under other settings than it started with: the result would be neither run.
    ``saved`` / ``current`` are (nested) settings dicts, compared by dotted key, except the keys in ``may_change``
    (threads, output folders, save cadence); ``saved`` is ``None`` for a run written by an older vistok."""
    if saved is None:
        raise ConfigError(f"--resume: {where} does not record the run's settings (written by an older vistok); "
                          "train again without --resume")
    saved, current = _flatten(saved), _flatten(current)
    changed = [f"{key}: {saved.get(key, '(unset)')!r} -> {current.get(key, '(unset)')!r}"
               for key in sorted(saved.keys() | current.keys())
               if key not in may_change and saved.get(key, _UNSET) != current.get(key, _UNSET)]
    if changed:
        raise ConfigError(f"--resume: the run in {where} started with other settings ({'; '.join(changed)}); "
                          "resume with the same settings, or train again without --resume")


def truncate_log(log: Path, key: str, last: int) -> None:
    """Keep the lines of a JSON-lines log whose ``key`` (``"epoch"``, ``"step"``) is at most ``last``: a resumed
    run repeats what came after its checkpoint, and would log it twice."""
    import json

    def before_the_checkpoint(line: str) -> bool:
        try:
            return json.loads(line)[key] <= last
        except (ValueError, KeyError, TypeError):  # a line cut off when the run was killed
            return False

    if log.is_file():
        kept = [line for line in log.read_text().splitlines() if before_the_checkpoint(line)]
        log.write_text("".join(line + "\n" for line in kept))


def resumed_log(log: Path, state: dict[str, Any], key: str, last: int) -> list[str]:
    """The log lines of a run up to its checkpoint ``state`` (kept under ``state["log"]``), written back to ``log``:
    a run started in the folder since, and cut off, may have replaced the log with its own lines. A checkpoint from
    before the lines were kept in it: ``log``'s lines whose ``key`` is at most ``last`` (:func:`truncate_log`)."""
    if state.get("log") is None:
        truncate_log(log, key, last)
        return log.read_text().splitlines() if log.is_file() else []
    log.write_text("".join(line + "\n" for line in state["log"]))
    return list(state["log"])


def check_run_folder(option: str, folder: Path) -> None:
    """Refuse, before any work, a run folder ``folder`` (given as ``option``) that cannot be made or written into:
    it is a file, or a path above it is a file (missing folders are fine: they are made).

    Raises:
        InvalidConfigError: naming the file.
    """
    for path in (folder, *folder.parents):
        if path.exists():
            if path == folder and not path.is_dir():
                raise InvalidConfigError(f"{option} {folder}: a file, not a folder")
            if not path.is_dir():
                raise InvalidConfigError(f"{option} {folder}: {path} is a file, not a folder")
            return


def underlying(dataset: Dataset) -> Dataset:
    """The dataset inside any number of ``Subset`` wrappers (``data.limit`` adds one, ``batches(limit=)`` another)."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def loader(dataset: Dataset, batch_size: int, **kwargs: Any) -> torch.utils.data.DataLoader:
    """A DataLoader; for video datasets with :func:`~vistok.video.collate_clips` (unreadable clips dropped)."""
    from .video import VideoClipDataset, collate_clips

    if isinstance(underlying(dataset), VideoClipDataset):
        kwargs.setdefault("collate_fn", collate_clips)
    return torch.utils.data.DataLoader(dataset, batch_size=batch_size, **kwargs)


class LabelledBatches:
    """``(inputs, labels)`` from a loader, whatever its batches are: pairs, or :func:`~vistok.video.collate_clips`
    dicts, whose skipped (unreadable) clips it counts in ``skipped``; batches left empty are passed over."""

    def __init__(self, batches: Any) -> None:
        self.batches = batches
        self.skipped = 0

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            if isinstance(batch, dict):
                self.skipped += int(batch["skipped"])
                if len(batch["labels"]) == 0:
                    continue
                yield batch["clips"], batch["labels"]
            else:
                yield batch


def batches(dataset: Dataset, batch_size: int, limit: int | None = None, workers: int = 0) -> LabelledBatches:
    """Deterministic, unshuffled ``(inputs, labels)`` batches of a dataset, optionally its first ``limit``, loaded
    by ``workers`` processes (``data.workers``; 0: in this one)."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    return LabelledBatches(loader(dataset, batch_size, num_workers=workers))


def first_inputs(dataset: Dataset, batch_size: int, count: int, workers: int = 0) -> list[torch.Tensor]:
    """The inputs of the first ``count`` readable items of ``dataset`` (all of them if it has fewer), in unshuffled
    batches of at most ``batch_size``: unreadable clips are passed over and the batches go on past them, so a data
    set whose first clips are broken still gives ``count`` (what FLOPs and throughput are measured on).

    Raises:
        InputShapeError: not one item of ``dataset`` is readable.
    """
    taken: list[torch.Tensor] = []
    total = 0
    for inputs, _ in batches(dataset, batch_size, workers=workers):
        taken.append(inputs[: count - total])
        total += taken[-1].shape[0]
        if total >= count:
            break
    if not taken:
        raise InputShapeError(f"none of the {len(dataset)} items of the data set is readable")
    return taken
