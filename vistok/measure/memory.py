"""Peak memory of a forward pass, counted tensor by tensor on any device.

CUDA has ``torch.cuda.max_memory_allocated``; the CPU has no allocator statistics, and a process's peak RSS
mixes in the allocator's caching and everything else the process holds. :func:`peak_memory` instead watches
every operator's outputs (a ``TorchDispatchMode``) and keeps the total size of the storages that are still
alive: the peak of that total is the most memory the forward pass's own tensors held at once. Weights,
buffers and the inputs exist before the pass and are not counted.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .._modes import evaluating

__all__ = ["peak_memory", "LiveTensorBytes"]


class LiveTensorBytes(TorchDispatchMode):
    """Inside ``with LiveTensorBytes(exclude) as counter:``, ``counter.peak`` is the largest total size in bytes
    of the storages that operators created and that were alive at once (storages of the tensors in
    ``exclude``, and any an operator reads before one created it, are never counted). Views share their storage
    and count once."""

    def __init__(self, exclude: list[Tensor] | tuple[Tensor, ...] = ()) -> None:
        super().__init__()
        # weak references held while the counter lives: a freed storage's address cannot be handed to a new one,
        # which would then pass for excluded
        self._excluded: dict[int, StorageWeakRef] = {}
        for tensor in exclude:
            self._exclude(tensor)
        self._live: dict[int, tuple[StorageWeakRef, int]] = {}
        self.current = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        for tensor in tree_leaves((args, kwargs)):  # a storage first seen as an input existed before: not counted
            if isinstance(tensor, Tensor) and StorageWeakRef(tensor.untyped_storage()).cdata not in self._live:
                self._exclude(tensor)
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, Tensor):
                storage = tensor.untyped_storage()
                ref = StorageWeakRef(storage)
                if ref.cdata not in self._excluded and ref.cdata not in self._live:
                    self._live[ref.cdata] = (ref, storage.nbytes())
        self._live = {key: entry for key, entry in self._live.items() if not entry[0].expired()}
        self.current = sum(size for _, size in self._live.values())
        self.peak = max(self.peak, self.current)
        return out

    def _exclude(self, tensor: Tensor) -> None:
        ref = StorageWeakRef(tensor.untyped_storage())
        self._excluded.setdefault(ref.cdata, ref)


def peak_memory(model: nn.Module, images: Tensor) -> int:
    """Peak bytes held by the tensors one inference forward pass of ``model`` on ``images`` creates
    (activations and scratch; weights, buffers and ``images`` excluded), under ``torch.no_grad()`` in eval mode
    (dropout's masks are no inference cost; every module's own mode comes back afterwards).

    It counts tensors, not the allocator: memory inside one kernel that never becomes a tensor (e.g. fused
    attention's workspace) is not seen. Compare two models under the same counter, never against RSS.
    """
    exclude = [*model.parameters(), *model.buffers(), images]
    with evaluating(model), torch.no_grad(), LiveTensorBytes(exclude) as counter:
        model(images)
    return counter.peak
