"""Text features kept for as long as every tensor they are computed from is unchanged.

Prompt-learning classifiers (Reprogrammer, CoOp) compute their class text features from a few
trainable tensors and the frozen text tower. At inference those features are the same on every
call, and the text tower is the expensive part (for ViT-B/32 about 58 GFLOP for 10 prompts of 77
tokens, against 4.4 GFLOP per image). The key is the package's one tensor cache
(`kernels.cache.TensorCache`: each input's identity, storage address and in-place version
counter) plus the autocast state. Writes through `.data` bypass version counters, as they bypass
autograd's checks: call `clear()` after those.
"""
from collections.abc import Callable, Sequence

import torch
import torch.nn as nn

from .kernels.cache import TensorCache
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
    """`cache(inputs, compute)`: `compute()` (run without gradients) unless `inputs` and the autocast
    state are unchanged since the last call. While gradients can flow to the inputs every call
    computes afresh."""

    def __init__(self):
        self._cache = TensorCache(capacity=1)

    @torch.compiler.disable  # identities and version counters are Python-side state: a graph break
    def __call__(self, inputs: Sequence[torch.Tensor], compute: Callable[[], torch.Tensor]) -> torch.Tensor:
        device_type = inputs[0].device.type
        autocast_state = (torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type))
        return self._cache(inputs, autocast_state, compute)

    def clear(self) -> None:
        self._cache.clear()
