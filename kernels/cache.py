"""Values computed from tensors, kept for as long as every one of those tensors is unchanged.

The one cache of the package: the residual ops keep their blended text side in one
(`residual_logits`), the prompt-learning classifiers their text features on top of it
(`reprogrammer.text_cache`). It lives here, on the lowest floor that needs it, so that the
kernels and the model share one key.

A value is reused while each tensor it came from is the same object (a weak reference, so a
recycled `id` never hits), at the same storage address (`.to()` and `.data = ...` move it) and
at the same in-place version (optimiser steps, `load_state_dict`, `copy_` and every other
in-place op bump it), and the caller's `key` (whatever else the value depends on) is equal.
Writes through `.data` bypass version counters, as they bypass autograd's checks: call
`clear()` after those.

Nothing is kept while a gradient could flow to one of the tensors (the value must be part of
the graph), while torch.compile traces (the compiled graph computes it; a caller that wants the
cache there disables the compiler around its call, a graph break), or for inference-mode
tensors, which have no version counter.
"""
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence

import torch


class TensorCache:
    """`cache(tensors, key, compute)`: the value of `compute()` (run without gradients) for
    unchanged `tensors` and `key`; the `capacity` most recently used values are kept."""

    def __init__(self, capacity: int = 1):
        self.capacity = capacity
        self._entries: OrderedDict = OrderedDict()

    def clear(self) -> None:
        self._entries.clear()

    @staticmethod
    def _usable(tensors: Sequence[torch.Tensor]) -> bool:
        if torch.compiler.is_compiling():
            return False
        if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
            return False
        return not any(t.is_inference() for t in tensors)

    def __call__(self, tensors: Sequence[torch.Tensor], key: Hashable,
                 compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        if not self._usable(tensors):
            return compute()
        full_key = (tuple((id(t), t.data_ptr(), t._version) for t in tensors), key)
        entry = self._entries.get(full_key)
        if entry is not None and all(ref() is t for ref, t in zip(entry[0], tensors)):
            self._entries.move_to_end(full_key)
            return entry[1]
        with torch.no_grad():
            value = compute()
        self._entries[full_key] = ([weakref.ref(t) for t in tensors], value)
        while len(self._entries) > self.capacity:
            self._entries.popitem(last=False)
        return value
