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


def _text_transformer(clip):
    """`(module holding the text embeddings, pool type, eos id)`, or None for other text towers."""
    if isinstance(clip, CLIP):
        return clip, clip.text_pool_type, getattr(clip, "text_eos_id", None)
    if isinstance(clip, CustomTextCLIP) and isinstance(clip.text, TextTransformer):
        if clip.text.cls_emb is None and not clip.text.use_pad_mask:
            return clip.text, clip.text.pool_type, clip.text.eos_id
    return None


def text_tower(clip):
    """`(module holding the text embeddings, pool type, eos id)`: the CLIP itself, or its `.text`."""
    tower = _text_transformer(clip)
    if tower is None:
        raise TypeError(
            f"Reprogrammer supports CLIP text towers (open_clip CLIP, or a TextTransformer without a class "
            f"token or pad mask); got {type(clip).__name__}"
        )
    return tower


#: Cut sequence lengths are whole multiples of this (full tensor-core tiles on an accelerator).
TEXT_LENGTH_MULTIPLE = 8


def text_length(clip, tokens: torch.Tensor) -> int:
    """The sequence length the text tower needs for the features of the prompts `tokens` `[N, L]`.

    The tower is causal and pools one position (the EOT token), so no state after the pooled
    position of the longest prompt can reach any feature: that position + 1, rounded up to a
    multiple of `TEXT_LENGTH_MULTIPLE`, at most `L`. `L` itself when every position can count
    (no causal mask, or pooling at the last position). Reads `tokens` on the host: call it once
    per prompt set, never per step.
    """
    text, pool_type, eos_id = text_tower(clip)
    full = tokens.shape[1]
    if not isinstance(text.attn_mask, torch.Tensor) or pool_type not in ("argmax", "eos", "first"):
        return full
    if pool_type == "first":
        needed = 1
    else:  # the index text_global_pool reads
        pooled = tokens.argmax(-1) if pool_type == "argmax" else (tokens == eos_id).int().argmax(-1)
        needed = int(pooled.max()) + 1
    return min(full, -(-needed // TEXT_LENGTH_MULTIPLE) * TEXT_LENGTH_MULTIPLE)


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

    The tower runs at the length `L` it is given, with the first `L` rows of the positional
    embedding and of the causal mask: pass the prompts cut to `text_length` (or longer), so that
    every prompt's pooled position lies inside. `tokens` `[N, L]` are the prompts' ids, used only
    for pooling (the EOT position), so the embeddings may differ from the token table's rows
    (learned rows, prompt contexts). `positional` replaces the tower's positional embedding when
    given; the rows past `L` get no gradient, as no feature depends on them.
    """
    text, pool_type, eos_id = text_tower(clip)
    cast_dtype = text.transformer.get_cast_dtype()
    positional = text.positional_embedding if positional is None else positional
    length = embeddings.shape[1]
    if tokens.shape != embeddings.shape[:2] or length > positional.shape[0]:
        raise ValueError(f"prompt embeddings {tuple(embeddings.shape)} need token ids [N, L] = "
                         f"{tuple(embeddings.shape[:2])} (got {tuple(tokens.shape)}) and L <= the "
                         f"{positional.shape[0]} positional rows; cut both to the same length")
    x = embeddings.to(cast_dtype) + positional[:length].to(cast_dtype)
    mask = text.attn_mask[:length, :length] if isinstance(text.attn_mask, torch.Tensor) else text.attn_mask
    x = text.ln_final(text.transformer(x, attn_mask=mask))
    x = text_global_pool(x, tokens, pool_type, eos_token_id=eos_id)
    projection = text.text_projection
    if isinstance(projection, nn.Linear):
        return projection(x)
    return x @ projection if projection is not None else x


def encode_tokens(clip, tokens: torch.Tensor) -> torch.Tensor:
    """Unnormalised text features of the prompts `tokens` `[N, L]`, as `clip.encode_text`, with a CLIP
    text transformer run at `text_length`; other text towers (e.g. Hugging Face) run as open_clip runs them.
    Reads `tokens` on the host (see `text_length`)."""
    tower = _text_transformer(clip)
    if tower is None:
        return clip.encode_text(tokens)
    tokens = tokens[:, :text_length(clip, tokens)]
    return encode_text_embeddings(clip, tower[0].token_embedding(tokens), tokens)


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
