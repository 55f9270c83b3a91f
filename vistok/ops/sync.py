"""When vistok may read tensor values on the host.

Reading a value (``int(t)``, ``t.tolist()``, ``if t.any()``) is free on the CPU, but on a GPU it waits for every
queued kernel, so the host can no longer launch work ahead of the device. Where a static bound will do, vistok
uses it instead on such devices; on the CPU it reads exact values (less padding, earlier exits). Under
``torch.compile`` nothing is read on any device: a read would break the graph (and its shapes would no longer be
static), so the static bounds apply there too.
"""

from __future__ import annotations

import torch

__all__ = ["reads_are_free"]


def reads_are_free(device: torch.device) -> bool:
    """Whether reading a tensor on ``device`` back to the host costs nothing (the CPU, outside ``torch.compile``)."""
    return device.type == "cpu" and not torch.compiler.is_compiling()
