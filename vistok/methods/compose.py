"""Several methods on one model in one call: ``vistok.patch(model, [("ats", {...}), ("merge", {...})])``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import Tensor

from ..backbones.base import BackboneInfo
from ..errors import InvalidConfigError
from ..tokens import TokenLayout
from .base import AttentionView, MethodConfig, TokenReducer

__all__ = ["ComposedConfig", "ComposedReducer"]


def _overrides(reducer: TokenReducer, hook: str) -> bool:
    return getattr(type(reducer), hook) is not getattr(TokenReducer, hook)


class ComposedReducer(TokenReducer):
    """One method selecting before attention and another merging after it, in the same block."""

    def __init__(self, selector: TokenReducer | None, merger: TokenReducer | None) -> None:
        self.selector = selector
        self.merger = merger
        self.traces_members = any(r.traces_members for r in (selector, merger) if r is not None)

    def __repr__(self) -> str:
        return f"ComposedReducer({self.selector!r}, {self.merger!r})"

    def select(self, view: AttentionView) -> Tensor | None:
        return None if self.selector is None else self.selector.select(view)

    def merge(self, x: Tensor, keys: Tensor, layout: TokenLayout) -> tuple[Tensor, TokenLayout] | None:
        return None if self.merger is None else self.merger.merge(x, keys, layout)


@dataclass
class ComposedConfig(MethodConfig):
    """Methods applied together. In any one block, at most one of them may drop tokens before attention
    and at most one may merge after it (e.g. ATS and merging may share a block)."""

    parts: tuple[MethodConfig, ...]

    name: ClassVar[str] = "composed"

    def build(self, info: BackboneInfo) -> dict[int, TokenReducer]:
        if not self.parts:
            raise InvalidConfigError("an empty list of methods patches nothing")
        slots: dict[int, dict[str, tuple[str, TokenReducer]]] = {}
        for part in self.parts:
            for block, reducer in part.build(info).items():
                for hook in ("select", "merge"):
                    if not _overrides(reducer, hook):
                        continue
                    taken = slots.setdefault(block, {})
                    if hook in taken:
                        raise InvalidConfigError(
                            f"block {block}: both {taken[hook][0]!r} and {part.name!r} {hook} tokens there; give "
                            "them disjoint blocks")
                    taken[hook] = (part.name, reducer)
        return {block: ComposedReducer(hooks.get("select", (None, None))[1], hooks.get("merge", (None, None))[1])
                for block, hooks in slots.items()}
