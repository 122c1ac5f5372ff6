"""Padded image reprogramming fused with the ViT patch embedding (METHOD.md section 1).

    tokens[b, n, :] = W @ patch_n( normalise( clamp( pad_o( bicubic_U(x_b) ) + P, 0, 1 ) ) )

`x` is `[B, 3, h, w]` in [0, 1]; `bicubic_U` resizes it to `U x U` (skipped when h == w == U);
`pad_o` centres it on a zero `S x S` canvas at offset `o = (S - U) // 2`; `P` is the
`[3, S, S]` perturbation shared by the batch; `normalise` is `(v - mean_c) / std_c`; `W` is the
`[width, 3, p, p]` patch-embedding weight (stride `p`, no bias); patches are taken in raster
order, as open_clip's `conv1 -> flatten -> permute` gives them. An optional positional
embedding (`[(S/p)^2, width]`, the patch rows of open_clip's table) is added in the epilogue.

Only `P` receives a gradient: images are data and `W` is frozen. With `g = dL/dtokens`,

    dL/dP[c, y, x] = sum_b [0 < v_b(c, y, x) < 1] / std_c * (g[b, n(y, x)] @ W)[c, y % p, x % p]

where `v` is the unclamped canvas value.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed):
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(
            f"images must be [B, 3, h, w] (RGB, channels first), got shape {tuple(images.shape)}; "
            "convert grey or RGBA images to RGB first"
        )
    if not images.is_floating_point():
        raise TypeError(
            f"images must be floating point in [0, 1], got {images.dtype}; divide uint8 images by 255"
        )
    if perturbation.dim() != 3 or perturbation.shape[0] != 3 or perturbation.shape[1] != perturbation.shape[2]:
        raise ValueError(f"perturbation must be [3, S, S], got {tuple(perturbation.shape)}")
    canvas = perturbation.shape[-1]
    if not 1 <= up_resolution <= canvas:
        raise ValueError(
            f"up_resolution={up_resolution} must lie in [1, canvas size {canvas}]: the upsampled "
            "image is placed inside the canvas"
        )
    if weight is not None:
        if weight.dim() != 4 or weight.shape[1] != 3 or weight.shape[2] != weight.shape[3]:
            raise ValueError(f"patch weight must be [width, 3, p, p], got {tuple(weight.shape)}")
        patch = weight.shape[-1]
        if canvas % patch:
            raise ValueError(f"canvas size {canvas} is not a multiple of the patch size {patch}")
        if pos_embed is not None and tuple(pos_embed.shape) != ((canvas // patch) ** 2, weight.shape[0]):
            raise ValueError(
                f"pos_embed must be [(S/p)^2, width] = [{(canvas // patch) ** 2}, {weight.shape[0]}], "
                f"got {tuple(pos_embed.shape)}"
            )
    for name, value in (("mean", mean), ("std", std)):
        if len(value) != 3:
            raise ValueError(f"{name} must have 3 entries (one per RGB channel), got {len(value)}")
    if min(std) <= 0:
        raise ValueError(f"std must be positive, got {tuple(std)}")


def reprogram_image(images: torch.Tensor, perturbation: torch.Tensor, *, up_resolution: int,
                    mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """The reprogrammed, normalised canvas `[B, 3, S, S]` (reference; steps 1-5 of METHOD.md 1)."""
    _check_inputs(images, perturbation, None, up_resolution, mean, std, None)
    canvas = perturbation.shape[-1]
    if images.shape[-2:] != (up_resolution, up_resolution):
        images = F.interpolate(images, size=(up_resolution, up_resolution), mode="bicubic",
                               align_corners=False)
    before = (canvas - up_resolution) // 2
    after = canvas - up_resolution - before
    x = F.pad(images, (before, after, before, after)) + perturbation.to(images.dtype)
    x = x.clamp(0, 1)
    mean_t = torch.tensor(mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    std_t = torch.tensor(std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    return (x - mean_t) / std_t


def reprogram_patch_embed_ref(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor, *,
                              up_resolution: int, mean: Sequence[float], std: Sequence[float],
                              pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Reference: `reprogram_image` then the stride-`p` convolution, as `[B, (S/p)^2, width]` tokens."""
    _check_inputs(images, perturbation, weight, up_resolution, mean, std, pos_embed)
    x = reprogram_image(images, perturbation, up_resolution=up_resolution, mean=mean, std=std)
    patch = weight.shape[-1]
    tokens = F.conv2d(x.to(weight.dtype), weight, stride=patch)
    tokens = tokens.flatten(2).transpose(1, 2)
    if pos_embed is not None:
        tokens = tokens + pos_embed.to(tokens.dtype)
    return tokens


def reprogram_patch_embed(images: torch.Tensor, perturbation: torch.Tensor, weight: torch.Tensor, *,
                          up_resolution: int, mean: Sequence[float], std: Sequence[float],
                          pos_embed: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Patch tokens `[B, (S/p)^2, width]` of the reprogrammed images; see the module docstring."""
    return reprogram_patch_embed_ref(images, perturbation, weight, up_resolution=up_resolution,
                                     mean=mean, std=std, pos_embed=pos_embed)
