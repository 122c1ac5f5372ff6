"""The open_clip towers as the reprogramming methods use them: checked access, and the frozen
encoders run from the point where reprogramming hands over (patch tokens, token embeddings)."""
from typing import Optional

import torch
import torch.nn as nn
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool


def vision_tower(clip) -> VisionTransformer:
    visual = getattr(clip, "visual", None)
    if not isinstance(visual, VisionTransformer):
        raise TypeError(
            f"Reprogrammer supports open_clip models with a ViT image tower (VisionTransformer); "
            f"this model's image tower is {type(visual).__name__} (ResNet, timm and other towers have "
            "no patch embedding to reprogram)"
        )
    conv = visual.conv1
    if conv.bias is not None or conv.stride != conv.kernel_size or conv.kernel_size[0] != conv.kernel_size[1]:
        raise TypeError("the ViT patch embedding must be a square, bias-free convolution with stride = patch size")
    if visual.image_size[0] != visual.image_size[1]:
        raise TypeError(f"non-square ViT input {visual.image_size} is not supported")
    return visual


def text_tower(clip):
    """`(module holding the text embeddings, pool type, eos id)`: the CLIP itself, or its `.text`."""
    if isinstance(clip, CLIP):
        return clip, clip.text_pool_type, getattr(clip, "text_eos_id", None)
    if isinstance(clip, CustomTextCLIP) and isinstance(clip.text, TextTransformer):
        if clip.text.cls_emb is None and not clip.text.use_pad_mask:
            return clip.text, clip.text.pool_type, clip.text.eos_id
    raise TypeError(
        f"Reprogrammer supports CLIP text towers (open_clip CLIP, or a TextTransformer without a class "
        f"token or pad mask); got {type(clip).__name__}"
    )


def encode_patch_tokens(visual: VisionTransformer, tokens: torch.Tensor) -> torch.Tensor:
    """The frozen ViT after its patch embedding (positional rows already added to `tokens`):
    class token, `ln_pre`, transformer, pooling, projection, as open_clip's forward does."""
    cls = (visual.class_embedding + visual.positional_embedding[0]).to(tokens.dtype)
    x = torch.cat([cls.expand(tokens.shape[0], 1, -1), tokens], dim=1)
    x = visual.ln_pre(visual.patch_dropout(x))
    pooled, _ = visual._pool(visual.transformer(x))
    return pooled @ visual.proj if visual.proj is not None else pooled


def encode_text_embeddings(clip, embeddings: torch.Tensor, tokens: torch.Tensor,
                           positional: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Unnormalised text features of prompts given as token embeddings `[N, L, width]`.

    `tokens` `[N, L]` are the prompts' ids, used only for pooling (the EOT position), so the
    embeddings may differ from the token table's rows (learned rows, prompt contexts).
    `positional` replaces the tower's positional embedding when given.
    """
    text, pool_type, eos_id = text_tower(clip)
    cast_dtype = text.transformer.get_cast_dtype()
    positional = text.positional_embedding if positional is None else positional
    x = embeddings.to(cast_dtype) + positional.to(cast_dtype)
    x = text.ln_final(text.transformer(x, attn_mask=text.attn_mask))
    x = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
    projection = text.text_projection
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection if projection is not None else x


def check_pixel_range(images: torch.Tensor) -> None:
    """Images must be uint8 (scaled by 1/255 inside the patch-embedding op) or floats in [0, 1].
    Floats are checked on CPU tensors only: on an accelerator the check would stall the stream,
    and the data pipeline converts uint8 there, which guarantees the range."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"images must be a torch.Tensor [B, 3, H, W] (uint8, or floats in [0, 1]), got "
                        f"{type(images).__name__}; convert with torch.as_tensor(images)")
    if images.dtype == torch.uint8 or images.device.type != "cpu" or images.numel() == 0 \
            or torch.compiler.is_compiling() or torch.jit.is_tracing():
        return
    low, high = images.min().item(), images.max().item()
    if not 0 <= low <= high <= 1:  # also false for NaN
        raise ValueError(
            f"images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; pass raw pixels / 255, "
            "not normalised images (the reprogrammer normalises after adding its perturbation)"
        )
