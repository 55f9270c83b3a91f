"""YAML experiment configs for ``tools/``: defaults, a file, then ``key.sub=value`` overrides, each key
checked against the defaults so a typo is an error, not a silently ignored setting."""

from __future__ import annotations

import copy
import difflib
import functools
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from ._checks import is_int
from .errors import VistokError

__all__ = ["ConfigError", "load_config", "parse_overrides", "parse_option", "parse_method_spec"]


class ConfigError(VistokError, ValueError):
    """A config file or override names an unknown key, has a value of the wrong type, or cannot be read."""


@functools.cache
def _yaml_loader() -> type:
    """A safe YAML loader with YAML 1.2's scalars: the only booleans are ``true`` / ``false`` (YAML 1.1 also reads
    ``no``, ``yes``, ``on`` and ``off``, which turned ``mixed_precision=no`` (accelerate's setting) into ``False``);
    ``1e-3`` is a float; an int is decimal (``010`` is 10, not YAML 1.1's octal 8; ``1:30`` is a string, not 90),
    or ``0x``/``0o`` prefixed. A key written twice in one mapping is an error: YAML 1.1 loaders keep the last and
    drop the first section's settings unseen."""
    import re

    import yaml

    class Loader(yaml.SafeLoader):
        def construct_document(self, node: yaml.Node) -> Any:
            _refuse_twice_written_keys(node, set())  # on the file as written, before merge keys are expanded
            return super().construct_document(node)

    numbers = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:int", "tag:yaml.org,2002:float")
    Loader.yaml_implicit_resolvers = {
        first: [(tag, regexp) for tag, regexp in resolvers if tag not in numbers]
        for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()}
    Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                                 list("tTfF"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:int", re.compile(
        r"^(?:[-+]?[0-9][0-9_]*|0x[0-9a-fA-F][0-9a-fA-F_]*|0o[0-7][0-7_]*)$"), list("-+0123456789"))
    Loader.add_implicit_resolver("tag:yaml.org,2002:float", re.compile(
        r"^(?:[-+]?(?:[0-9][0-9_]*\.[0-9_]*|\.[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)?|[-+]?[0-9][0-9_]*[eE][-+]?[0-9]+"
        r"|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"), list("-+0123456789."))
    Loader.add_constructor("tag:yaml.org,2002:int", _construct_int)
    return Loader


def _refuse_twice_written_keys(node: Any, visited: set[int]) -> None:
    """Raise where a mapping under ``node`` (a composed YAML node) has a key written twice (merge keys aside)."""
    import yaml

    if id(node) in visited:  # an alias: its anchor's node, checked once
        return
    visited.add(id(node))
    if isinstance(node, yaml.MappingNode):
        seen: set[tuple[str, str]] = set()
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError("while reading a mapping", node.start_mark,
                                                            f"the key {key_node.value!r} is written twice",
                                                            key_node.start_mark)
                seen.add(key)
            _refuse_twice_written_keys(value_node, visited)
    elif isinstance(node, yaml.SequenceNode):
        for item in node.value:
            _refuse_twice_written_keys(item, visited)


def _construct_int(loader: Any, node: Any) -> int:
    text = loader.construct_scalar(node).replace("_", "")
    if text[:2] in ("0x", "0o"):
        return int(text, 0)
    try:
        return int(text, 10)
    except ValueError:
        import yaml

        raise yaml.constructor.ConstructorError(None, None, f"{text!r} is not a decimal, 0x or 0o int",
                                                node.start_mark) from None


def _load_yaml(text: str) -> Any:
    import yaml

    return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 -- a SafeLoader subclass


def parse_overrides(items: Sequence[str]) -> dict[str, Any]:
    """``["train.epochs=3", "method=ats"]`` -> ``{"train.epochs": 3, "method": "ats"}``; values are YAML (only
    ``true`` and ``false`` are booleans: ``no`` stays a string).

    Raises:
        ConfigError: an item that is not ``key=value``, a value that is not YAML, or a key given twice, or given
            with a key inside it (``method_options={k: 5}`` and ``method_options.r=3``: which wins would depend
            on their order).
    """
    import yaml

    overrides = {}
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"override {item!r} is not key=value (e.g. train.epochs=3)")
        clash = next((given for given in overrides
                      if given == key or given.startswith(f"{key}.") or key.startswith(f"{given}.")), None)
        if clash is not None:
            raise ConfigError(f"override {item!r}: {clash} is set twice (also by an earlier override); give it once")
        try:
            overrides[key] = _load_yaml(raw) if raw else None
        except yaml.YAMLError as error:
            raise ConfigError(f"override {item!r}: the value is not valid YAML: {error}") from None
    return overrides


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    flat = {}
    for key, value in tree.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping) and value and not path.endswith("_options") and not path.endswith("_kwargs"):
            flat.update(_flatten(value, f"{path}."))
        else:
            flat[path] = value
    return flat


def _assign(tree: dict[str, Any], path: str, value: Any, defaults: dict[str, Any], source: str,
            unset_kinds: Mapping[str, tuple[type, ...]]) -> None:
    known = _flatten(defaults)
    free = [k for k in known if path.startswith(f"{k}.") and (k.endswith("_options") or k.endswith("_kwargs"))]
    if path not in known and not free:
        close = difflib.get_close_matches(path, known, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(f"{source}: unknown config key {path!r}.{hint} Known keys: {', '.join(sorted(known))}")
    default = known.get(path)
    mismatched = not isinstance(value, type(default)) or isinstance(value, bool) != isinstance(default, bool)
    if path in known and default is not None and mismatched and not (isinstance(default, float) and is_int(value)):
        raise ConfigError(f"{source}: {path} should be {type(default).__name__} (like the default {default!r}), "
                          f"got {value!r}")
    kinds = unset_kinds.get(path)
    if default is None and kinds and value is not None and (not isinstance(value, kinds) or isinstance(value, bool)):
        raise ConfigError(f"{source}: {path} should be {' or '.join(kind.__name__ for kind in kinds)} (or unset), "
                          f"got {value!r}")
    if isinstance(default, list) and default and isinstance(value, list) and \
            any(_kind(item) != _kind(default[0]) for item in value):
        raise ConfigError(f"{source}: {path} should be a list of {_kind(default[0])}s (like the default {default!r}), "
                          f"got {value!r}")
    node = tree
    parts = path.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"{source}: {path} goes through a non-mapping value")
    node[parts[-1]] = value


def _kind(value: Any) -> str:
    """What a list item is, for checking one against a default's items: ints and floats are both numbers (a
    sweep's ``k`` may be a count or a fraction)."""
    if isinstance(value, bool):
        return "bool"
    return "number" if isinstance(value, (int, float)) else type(value).__name__


def load_config(defaults: dict[str, Any], path: str | Path | None = None,
                overrides: Mapping[str, Any] | None = None,
                unset_kinds: Mapping[str, tuple[type, ...]] | None = None) -> dict[str, Any]:
    """Defaults, updated by the YAML file at ``path`` (if any), then by ``overrides`` (dotted keys). Only ``true``
    and ``false`` are booleans, in files as on the command line.

    Keys ending in ``_options`` or ``_kwargs`` hold free-form mappings (method options, model kwargs). A key whose
    default is ``None`` takes a value of the types ``unset_kinds`` gives it (``{"checkpoint": (str,)}``; never a
    bool), or any value when it has none there.

    Raises:
        ConfigError: unreadable file, unknown key, or a value whose type differs from the default's.
    """
    import yaml

    config = copy.deepcopy(defaults)
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} does not exist")
        try:
            loaded = _load_yaml(path.read_text()) or {}
        except yaml.YAMLError as error:
            raise ConfigError(f"{path} is not valid YAML: {error}") from None
        if not isinstance(loaded, Mapping):
            raise ConfigError(f"{path} must hold a mapping of settings, not {type(loaded).__name__}")
        known = _flatten(defaults)
        for key, value in _flatten(loaded).items():
            if value in (None, {}) and any(k.startswith(f"{key}.") for k in known):
                continue  # a section whose settings are all commented out, or written {}
            if value is None and isinstance(known.get(key), Mapping):
                value = {}  # options left empty
            _assign(config, key, value, defaults, str(path), unset_kinds or {})
    for key, value in (overrides or {}).items():
        _assign(config, key, value, defaults, "command line", unset_kinds or {})
    return config


def parse_option(text: str) -> tuple[str, Any]:
    """``key=value`` with a Python literal value (``k=108``, ``k=0.5``, ``blocks=[3,4,5]``); a bare word stays a
    string (``allocation=uniform``).

    Raises:
        ConfigError: ``text`` is not ``key=value`` with an identifier for a key.
    """
    import ast

    key, sep, raw = text.partition("=")
    if not sep or not key.isidentifier():
        raise ConfigError(f"expected key=value, got {text!r}")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw
    return key, value


def parse_method_spec(text: str) -> tuple[str, dict[str, Any]]:
    """``"method"`` or ``"method:key=value,key=value"`` -> ``(method, options)``: a method with its options in
    one command-line word (``correlation_guided:allocation=uniform``)."""
    name, _, rest = text.partition(":")
    if not name:
        raise ConfigError(f"expected method or method:key=value,..., got {text!r}")
    options = [parse_option(item) for item in _top_level_items(rest) if item]
    keys = [key for key, _ in options]
    twice = sorted({key for key in keys if keys.count(key) > 1})
    if twice:
        raise ConfigError(f"{text!r}: {', '.join(twice)} given more than once")
    return name, dict(options)


def _top_level_items(text: str) -> list[str]:
    """``text`` split at the commas outside brackets: ``"k=[[1,2],[3]],r=4"`` -> ``["k=[[1,2],[3]]", "r=4"]``."""
    items, depth, start = [], 0, 0
    for position, char in enumerate(text):
        if char in "([{":
            depth += 1
        elif char in ")]}":
            depth = max(depth - 1, 0)
        elif char == "," and depth == 0:
            items.append(text[start:position])
            start = position + 1
    items.append(text[start:])
    return items
