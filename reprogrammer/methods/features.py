"""What the baselines share: standard CLIP preprocessing, zero-shot text features, checked state loading.

Standard preprocessing is the reprogramming data path with a zero perturbation and the image
upsampled to the whole canvas (bicubic resize to `S`, clamp, normalise), so the baselines and
the zero-shot branch of Residual Reprogrammer see exactly the same pixels.
"""
from copy import deepcopy
from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..classnames import checked_classnames
from ..clip import image_normalisation
from ..towers import check_pixel_range, encode_tokens


def canvas_size(visual: nn.Module) -> int:
    """The image tower's (square) input size `S`."""
    size = getattr(visual, "image_size", None)
    size = (size, size) if isinstance(size, int) else tuple(size or ())
    if len(size) != 2 or size[0] != size[1]:
        raise TypeError(f"the image tower must take square inputs and declare image_size, got {size or None}")
    return size[0]


class ImageTower(nn.Module):
    """A CLIP image tower behind standard preprocessing: `forward(images)` -> unnormalised `[B, D]`.

    Frozen (every parameter `requires_grad=False`) it runs without autograd and stays in eval
    mode whatever its parent's mode; `requires_grad_(True)` makes it a trained tower that
    follows the parent's train/eval mode. `copy=True` trains a private copy, so the caller's
    CLIP keeps its pretrained weights.
    """

    def __init__(self, clip, *, copy: bool = False):
        super().__init__()
        self.visual = deepcopy(clip.visual) if copy else clip.visual
        self.canvas = canvas_size(self.visual)
        self.mean, self.std = image_normalisation(clip)
        self.requires_grad_(False)

    @property
    def trainable(self) -> bool:
        return any(p.requires_grad for p in self.visual.parameters())

    def train(self, mode: bool = True):
        self.training = mode
        self.visual.train(mode and self.trainable)
        return self

    def requires_grad_(self, requires_grad: bool = True):
        super().requires_grad_(requires_grad)
        return self.train(self.training)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_pixel_range(images)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.trainable):
            zero = images.new_zeros(3, self.canvas, self.canvas)
            x = kernels.reprogram_image(images, zero, up_resolution=self.canvas, mean=self.mean, std=self.std)
            return self.visual(x.to(next(self.visual.parameters()).dtype))


@torch.no_grad()
def zero_shot_text_features(clip, tokenizer, classnames: Sequence[str], template: str) -> torch.Tensor:
    """L2-normalised text features `[C, D]` of one prompt per class, from the frozen text tower
    (run at the longest prompt's length, `towers.encode_tokens`)."""
    classnames = checked_classnames(classnames)
    if "{}" not in template:
        raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
    device = clip.logit_scale.device
    tokens = tokenizer([template.format(c) for c in classnames]).to(device)
    return F.normalize(encode_tokens(clip, tokens), dim=-1)
