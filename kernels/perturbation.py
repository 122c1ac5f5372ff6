"""The learned border perturbation `P = dropout(tanh(delta * M))` (docs/method.md section 1, step 4).

`M` is ones on the canvas except a centred `R x R` square of zeros, so the centre of the
upsampled image is never perturbed and only `3 * (S^2 - R^2)` entries of `delta` matter.
Pure PyTorch: it is a `[3, S, S]` elementwise op, tiny next to the batch it is added to.
"""
import torch
import torch.nn.functional as F


def border_mask(canvas: int, mr_resolution: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
    """`[3, S, S]` mask: zero on the centred `R x R` square starting at `(S - R) // 2`, one elsewhere."""
    if not 0 <= mr_resolution <= canvas:
        raise ValueError(
            f"mr_resolution={mr_resolution} must lie in [0, canvas size {canvas}]: it is the side of "
            "the untouched centre square"
        )
    mask = torch.ones(3, canvas, canvas, device=device, dtype=dtype)
    start = (canvas - mr_resolution) // 2
    mask[:, start:start + mr_resolution, start:start + mr_resolution] = 0
    return mask


def perturbation(delta: torch.Tensor, mask: torch.Tensor, *, dropout: float = 0.0,
                 training: bool = False) -> torch.Tensor:
    """`dropout_p(tanh(delta * mask))`: one dropout mask per call, shared by the whole batch."""
    if delta.shape != mask.shape or delta.dim() != 3 or delta.shape[0] != 3:
        raise ValueError(
            f"delta {tuple(delta.shape)} and mask {tuple(mask.shape)} must both be [3, S, S]"
        )
    return F.dropout(torch.tanh(delta * mask), p=dropout, training=training)
