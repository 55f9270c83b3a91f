"""Creating a timm model by name with an error that names the problem."""

from __future__ import annotations

from typing import Any

from torch import nn

from .errors import InvalidConfigError

__all__ = ["create_timm_model"]


def create_timm_model(name: str, caller: str, error: type[Exception] = InvalidConfigError, **kwargs: Any
                      ) -> nn.Module:
    """``timm.create_model(name, **kwargs)``; a registry name that neither timm nor vistok registers raises
    ``error`` naming ``caller`` and similar names (an ``hf-hub:`` / ``local-dir:`` source that cannot be read
    raises the hub's or the file system's own error)."""
    import timm

    try:
        return timm.create_model(name, **kwargs)
    except RuntimeError as failure:
        if not str(failure).startswith("Unknown model"):
            raise
        close = timm.list_models(f"*{name[:6]}*")[:5]
        raise error(f"{caller}: unknown model {name!r}: not in timm's registry (nor vistok's); similar: {close}"
                    ) from None
