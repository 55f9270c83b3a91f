"""vistok: make vision transformers spend fewer visual tokens.

>>> import timm, vistok
>>> model = timm.create_model("deit_small_patch16_224")
>>> handle = vistok.patch(model, "ats")       # Adaptive Token Sampling, the paper's multi-stage setting
>>> handle.remove()                           # the original model again
"""

from . import measure, models, ops, viz
from .errors import (
    AlreadyPatchedError,
    InputShapeError,
    InvalidConfigError,
    PatchStateError,
    UnknownMethodError,
    UnsupportedModelError,
    VistokError,
)
from .methods import (
    ATSConfig,
    MergeConfig,
    MethodConfig,
    SuperTokenConfig,
    create_config,
    list_methods,
    register_method,
)
from .patching import PatchHandle, find_handle, get_handle, patch, unpatch
from .tokens import TokenLayout
from .tuner import TuneResult, config_from_saved, tune

__version__ = "0.1.0"

__all__ = [
    "patch",
    "tune",
    "TuneResult",
    "config_from_saved",
    "unpatch",
    "get_handle",
    "find_handle",
    "list_methods",
    "register_method",
    "create_config",
    "PatchHandle",
    "MethodConfig",
    "ATSConfig",
    "MergeConfig",
    "SuperTokenConfig",
    "TokenLayout",
    "measure",
    "models",
    "ops",
    "viz",
    "VistokError",
    "UnsupportedModelError",
    "UnknownMethodError",
    "InvalidConfigError",
    "AlreadyPatchedError",
    "InputShapeError",
    "PatchStateError",
]
