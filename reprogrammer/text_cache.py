"""Text features kept for as long as every tensor they are computed from is unchanged.

Prompt-learning classifiers (Reprogrammer, CoOp) compute their class text features from a few
trainable tensors and the frozen text tower. At inference those features are the same on every
call, and the text tower is the expensive part (for ViT-B/32 about 58 GFLOP for 10 prompts of 77
tokens, against 4.4 GFLOP per image). The cache key holds each input tensor's storage address and
in-place version counter (optimiser steps, `load_state_dict`, `.to()` and in-place edits all change
one) and the autocast state. Writes through `.data` bypass version counters, as they bypass
autograd's checks: call `clear()` after those.
"""
from collections.abc import Callable, Sequence
from typing import Optional

import torch
import torch.nn as nn

from .towers import text_tower


def text_tower_tensors(clip) -> list[torch.Tensor]:
    """The frozen text tower's tensors that shape its output (transformer, final norm, projection, mask)."""
    text, _, _ = text_tower(clip)
    projection = text.text_projection
    return [*text.transformer.parameters(), *text.ln_final.parameters(),
            *(projection.parameters() if isinstance(projection, nn.Module) else
              [projection] if projection is not None else []),
            *([text.attn_mask] if isinstance(text.attn_mask, torch.Tensor) else [])]


class TextFeatureCache:
    """`cache(inputs, compute)`: `compute()` (run without gradients) unless `inputs` are unchanged since
    the last call. Callers compute afresh themselves while gradients must flow to the inputs."""

    def __init__(self):
        self._entry: Optional[tuple[tuple, torch.Tensor]] = None

    @torch.compiler.disable  # addresses and version counters are Python-side state: a graph break
    def __call__(self, inputs: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        device_type = inputs[0].device.type
        key = (tuple((t.data_ptr(), t._version) for t in inputs),
               torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        if self._entry is None or self._entry[0] != key:
            with torch.no_grad():
                self._entry = (key, compute())
        return self._entry[1]

    def clear(self) -> None:
        self._entry = None
