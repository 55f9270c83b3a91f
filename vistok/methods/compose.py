"""Several methods on one model in one call: ``vistok.patch(model, [("ats", {...}), ("merge", {...})])``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..backbones.base import BackboneInfo, BlockOps
from ..errors import InvalidConfigError
from ..tokens import TokenLayout
from .base import AttentionView, MethodConfig, TokenReducer

__all__ = ["ComposedConfig", "ComposedReducer"]


# hooks that cannot share a block: one selector or attender, one merger, and no merging after a replaced
# attention (merging needs the usual attention's keys)
_EXCLUSIVE = {"select": ("select", "attend"), "attend": ("select", "attend", "merge"), "merge": ("merge", "attend")}


def _overrides(reducer: TokenReducer, hook: str) -> bool:
    return getattr(type(reducer), hook) is not getattr(TokenReducer, hook)


class ComposedReducer(TokenReducer):
    """The methods acting in one block: one may select before attention or replace the attention, one may
    merge after it (merging needs the usual attention's keys)."""

    def __init__(self, selector: TokenReducer | None, attender: TokenReducer | None,
                 merger: TokenReducer | None) -> None:
        self.selector = selector
        self.attender = attender
        self.merger = merger
        self.traces_members = any(r.traces_members for r in (selector, attender, merger) if r is not None)
        self.fuses = selector is not None and selector.fuses
        self.traceable = selector is None or selector.traceable

    def __repr__(self) -> str:
        parts = ", ".join(repr(r) for r in (self.selector, self.attender, self.merger) if r is not None)
        return f"ComposedReducer({parts})"

    @property
    def merges(self) -> bool:
        return self.merger is not None

    @property
    def selects(self) -> bool:
        return self.selector is not None and self.selector.selects

    def select(self, view: AttentionView) -> Tensor | None:
        return None if self.selector is None else self.selector.select(view)

    def max_kept(self, layout: TokenLayout) -> int | None:
        return None if self.selector is None else self.selector.max_kept(layout)

    def keeps_exactly(self, layout: TokenLayout) -> bool:
        return self.selector is not None and self.selector.keeps_exactly(layout)

    def attend(self, ops: BlockOps, h: Tensor, layout: TokenLayout, path: str = "auto") -> Tensor | None:
        return None if self.attender is None else self.attender.attend(ops, h, layout, path)

    def merge(self, x: Tensor, keys: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout] | None:
        return None if self.merger is None else self.merger.merge(x, keys, layout)


@dataclass
class ComposedConfig(MethodConfig):
    """Methods applied together. In any one block, at most one of them may drop tokens before attention
    and at most one may merge after it (e.g. ATS and merging may share a block)."""

    parts: tuple[MethodConfig, ...]

    name: ClassVar[str] = "composed"

    def __post_init__(self) -> None:  # a composition among the parts (a patched model's config) joins them
        self.parts = tuple(inner for part in self.parts
                           for inner in (part.parts if isinstance(part, ComposedConfig) else (part,)))

    def check(self) -> None:
        super().check()
        for part in self.parts:
            if not isinstance(part, MethodConfig):
                raise InvalidConfigError(f"a ComposedConfig's parts must be method configs, got {part!r} (use "
                                         "vistok.create_config(['ats', ('merge', {'r': 8})]) for names)")
            part.check()

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        if not self.parts:
            raise InvalidConfigError("an empty list of methods patches nothing")
        slots: dict[int, dict[str, tuple[str, TokenReducer]]] = {}
        for part in self.parts:
            for block, reducer in part.build(info).items():
                taken = slots.setdefault(block, {})
                for hook in ("select", "attend", "merge"):
                    if not _overrides(reducer, hook):
                        continue
                    clash = next((other for other in _EXCLUSIVE[hook] if other in taken), None)
                    if clash is not None:
                        raise InvalidConfigError(
                            f"block {block}: both {taken[clash][0]!r} and {part.name!r} act there ({clash} / "
                            f"{hook}); give them disjoint blocks")
                    taken[hook] = (part.name, reducer)
                if "select" in taken and "merge" in taken and taken["select"][1].fuses:
                    raise InvalidConfigError(
                        f"block {block}: {taken['select'][0]!r} with fusion merges after attention itself, and "
                        f"{taken['merge'][0]!r} merges there too; give them disjoint blocks")
        _check_whole_grids(slots)
        return {block: ComposedReducer(*(hooks.get(hook, (None, None))[1] for hook in ("select", "attend", "merge")))
                for block, hooks in slots.items()}


def _check_whole_grids(slots: dict[int, dict[str, tuple[str, TokenReducer]]]) -> None:
    """Refuse a method that needs the whole patch grid (super tokens) in or after a block where another has
    already dropped tokens (``select``, before attention) or merged them (``merge``, after it: later blocks)."""
    reduced_at = [block + (hook == "merge") for block, hooks in slots.items() for hook in ("select", "merge")
                  if hook in hooks]
    first = min(reduced_at, default=None)
    for block, hooks in sorted(slots.items()):
        name, reducer = hooks.get("attend", (None, None))
        if reducer is not None and reducer.needs_whole_grid and first is not None and block >= first:
            raise InvalidConfigError(f"block {block}: {name!r} needs the whole patch grid, but tokens are dropped or "
                                     f"merged from block {first} on; place its blocks before the others'")
