"""The method registry: names -> dataclass configs. ``vistok.list_methods()`` lists the names."""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any

from ..errors import InvalidConfigError, UnknownMethodError
from .ats import AdaptiveTokenSampler, ATSConfig
from .base import AttentionView, MethodConfig, TokenReducer
from .compose import ComposedConfig, ComposedReducer
from .merge import MergeConfig, TokenMerger
from .random_drop import RandomDropConfig, RandomDropper
from .super_token import SuperTokenAttender, SuperTokenConfig

__all__ = [
    "ATSConfig",
    "AdaptiveTokenSampler",
    "MergeConfig",
    "TokenMerger",
    "SuperTokenConfig",
    "SuperTokenAttender",
    "RandomDropConfig",
    "RandomDropper",
    "ComposedConfig",
    "ComposedReducer",
    "AttentionView",
    "MethodConfig",
    "TokenReducer",
    "register_method",
    "list_methods",
    "create_config",
    "MethodSpec",
]

_REGISTRY: dict[str, type[MethodConfig]] = {}


def register_method(config_cls: type[MethodConfig]) -> type[MethodConfig]:
    """Register a method config class under its ``name`` (usable as a decorator)."""
    if config_cls.name in _REGISTRY and _REGISTRY[config_cls.name] is not config_cls:
        raise InvalidConfigError(f"a method named {config_cls.name!r} is already registered")
    _REGISTRY[config_cls.name] = config_cls
    return config_cls


def list_methods() -> list[str]:
    """Names accepted by ``vistok.patch``."""
    return sorted(_REGISTRY)


MethodSpec = str | MethodConfig | tuple[str, dict[str, Any]]


def create_config(method: MethodSpec | list[MethodSpec], **options: Any) -> MethodConfig:
    """A config from a method name and keyword options, a config instance as is, or, for a list of
    names / ``(name, options)`` pairs / configs, a :class:`ComposedConfig` applying them together."""
    if isinstance(method, list):
        if options:
            raise InvalidConfigError("with a list of methods, give each its options in the list, e.g. "
                                     "[('ats', {'k': 100}), ('merge', {'r': 8})] (in a YAML config: "
                                     "method: [[ats, {k: 100}], [merge, {r: 8}]])")
        return ComposedConfig(tuple(_one_config(_as_pair(spec)) for spec in method))
    return _one_config(method, **options)


def _as_pair(spec: Any) -> Any:
    """A ``[name, options]`` list in a list of methods as the ``(name, options)`` pair it stands for: YAML and JSON
    configs have lists, not tuples."""
    if isinstance(spec, list) and len(spec) == 2 and isinstance(spec[0], str) and isinstance(spec[1], dict):
        return tuple(spec)
    return spec


def _one_config(method: MethodSpec, **options: Any) -> MethodConfig:
    if isinstance(method, tuple):
        if len(method) != 2 or not isinstance(method[1], dict):
            raise InvalidConfigError(f"expected (name, options dict), got {method!r}")
        if options:
            raise InvalidConfigError(f"pass options either as keywords or in the (name, options) pair, not both "
                                     f"(got {sorted(options)})")
        keys = [key for key in method[1] if not isinstance(key, str)]
        if keys:
            raise InvalidConfigError(f"{method[0]}: option names must be strings, got {keys!r}")
        return _one_config(method[0], **method[1])
    if isinstance(method, MethodConfig):
        if options:
            raise InvalidConfigError(
                f"pass options either as keywords or in the {type(method).__name__}, not both "
                f"(got {sorted(options)})")
        return method
    if not isinstance(method, str):
        raise UnknownMethodError(f"method must be a name or a config object, got {type(method).__name__}")
    if method not in _REGISTRY:
        close = difflib.get_close_matches(method, _REGISTRY, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise UnknownMethodError(
            f"unknown method {method!r}. Known methods: {', '.join(list_methods())}.{hint}")
    config_cls = _REGISTRY[method]
    fields = [f.name for f in dataclasses.fields(config_cls)]
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise InvalidConfigError(f"{method}: unknown option(s) {unknown}; options are {fields}")
    return config_cls(**options)


register_method(ATSConfig)
register_method(MergeConfig)
register_method(SuperTokenConfig)
register_method(RandomDropConfig)

# the vision-LLM boundary methods (vistok.adapters), after the in-tower ones: they build on methods.base
from ..adapters.methods import (  # noqa: E402
    DominantConfig,
    MergeToBudgetConfig,
    PoolConfig,
    RandomSelectConfig,
    RegionMergeConfig,
)

for _boundary in (MergeToBudgetConfig, RegionMergeConfig, DominantConfig, PoolConfig, RandomSelectConfig):
    register_method(_boundary)

# the page budget of vistok.document (correlation-guided compression), run by vistok.document.compress_page
from ..document.page import CorrelationGuidedConfig  # noqa: E402

register_method(CorrelationGuidedConfig)
