"""Reprogrammer and Residual Reprogrammer around a frozen open_clip CLIP (METHOD.md 1, 2, 4).

Image side: a learned `[3, S, S]` delta becomes the border perturbation around the upsampled
image; `kernels.reprogram_patch_embed` turns source images straight into patch tokens, and the
frozen ViT (class token, `ln_pre`, transformer, pooling, projection) follows.
Text side: the prompts' token-embedding rows and the positional embedding are trainable copies
of the pretrained values; everything else of the text tower is frozen.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from open_clip.model import CLIP, CustomTextCLIP
from open_clip.transformer import TextTransformer, VisionTransformer, text_global_pool

import kernels
from .checkpoint import load_checked
from .clip import image_normalisation

DEFAULT_TEMPLATE = "a photo of a {}"


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


class Reprogrammer(nn.Module):
    """Reprogrammed CLIP classifier over `classnames`; `alpha > 0` gives Residual Reprogrammer.

    `image=False` or `text=False` freezes that side at its zero-shot behaviour (the paper's
    text-only and image-only ablations).
    """

    def __init__(self, clip, tokenizer, classnames: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                 up_resolution: Optional[int] = None, mr_resolution: Optional[int] = None,
                 dropout: float = 0.0, alpha: float = 0.0, image: bool = True, text: bool = True,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        visual = vision_tower(clip)
        text_module, _, _ = text_tower(clip)
        if not classnames:
            raise ValueError("classnames is empty: a classifier needs at least one class")
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
        canvas = visual.image_size[0]
        up_resolution = canvas if up_resolution is None else up_resolution
        mr_resolution = (6 * canvas) // 7 if mr_resolution is None else mr_resolution
        if not 1 <= up_resolution <= canvas:
            raise ValueError(f"up_resolution={up_resolution} must lie in [1, {canvas}] (the encoder's input size)")
        if not 0 <= mr_resolution <= canvas:
            raise ValueError(f"mr_resolution={mr_resolution} must lie in [0, {canvas}] (the encoder's input size)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout={dropout} must lie in [0, 1)")

        self.clip = clip.requires_grad_(False).eval()
        self.classnames = list(classnames)
        self.template = template
        self.canvas = canvas
        self.up_resolution = up_resolution
        self.mr_resolution = mr_resolution
        self.dropout = dropout
        self.alpha = alpha
        default_mean, default_std = image_normalisation(clip)
        self.mean = tuple(mean or default_mean)
        self.std = tuple(std or default_std)

        weight = visual.conv1.weight
        self.register_buffer("mask", kernels.border_mask(canvas, mr_resolution, device=weight.device))
        self.register_buffer("zero_canvas", torch.zeros(3, canvas, canvas, device=weight.device),
                             persistent=False)
        self.image_delta = nn.Parameter(torch.randn(3, canvas, canvas, device=weight.device)) if image else None

        prompts = tokenizer([template.format(c) for c in self.classnames]).to(weight.device)
        token_ids, prompt_index = torch.unique(prompts, return_inverse=True)
        self.register_buffer("prompt_tokens", prompts)
        self.register_buffer("token_ids", token_ids)
        self.register_buffer("prompt_index", prompt_index)
        self.token_rows = nn.Parameter(text_module.token_embedding.weight[token_ids].detach().clone())
        self.text_positional = nn.Parameter(text_module.positional_embedding.detach().clone())
        with torch.no_grad():
            zero_shot = self._text_features(text_module.token_embedding.weight[token_ids],
                                            text_module.positional_embedding, slice(None))
        self.register_buffer("zs_text_features", F.normalize(zero_shot, dim=-1))
        self.token_rows.requires_grad_(text)
        self.text_positional.requires_grad_(text)

    # The frozen CLIP stays in eval mode (no patch dropout, fixed norms) whatever the wrapper's mode.
    def train(self, mode: bool = True):
        super().train(mode)
        self.clip.eval()
        return self

    @property
    def logit_scale(self) -> torch.Tensor:
        return self.clip.logit_scale.exp()

    # ---- image side -------------------------------------------------------------------------
    def perturbation(self) -> torch.Tensor:
        if self.image_delta is None:
            return self.zero_canvas
        return kernels.perturbation(self.image_delta, self.mask, dropout=self.dropout, training=self.training)

    def _image_features(self, images: torch.Tensor, perturbation: torch.Tensor, up_resolution: int):
        visual = self.clip.visual
        check_pixel_range(images)
        tokens = kernels.reprogram_patch_embed(
            images, perturbation, visual.conv1.weight, up_resolution=up_resolution, mean=self.mean,
            std=self.std, pos_embed=visual.positional_embedding[1:])
        return encode_patch_tokens(visual, tokens)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised reprogrammed image features `[B, D]`."""
        if self.image_delta is None:
            return self.zero_shot_image_features(images)
        return self._image_features(images, self.perturbation(), self.up_resolution)

    @torch.no_grad()
    def zero_shot_image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unnormalised features of the frozen encoder on the image resized to the canvas."""
        return self._image_features(images, self.zero_canvas, self.canvas)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(images), dim=-1)

    # ---- text side --------------------------------------------------------------------------
    def _text_features(self, rows: torch.Tensor, positional: torch.Tensor, classes) -> torch.Tensor:
        return encode_text_embeddings(self.clip, rows[self.prompt_index[classes]], self.prompt_tokens[classes],
                                      positional)

    def encode_text(self, classes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised reprogrammed text features of `classes` (all classes by default)."""
        classes = slice(None) if classes is None else classes
        return F.normalize(self._text_features(self.token_rows, self.text_positional, classes), dim=-1)

    # ---- classifier -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, C]` = `exp(logit_scale) * cos` of the (residual-blended) features."""
        img_rp = self.image_features(images)
        img_zs = self.zero_shot_image_features(images) if self.alpha > 0 else img_rp
        return kernels.residual_logits(img_rp, img_zs, self.encode_text(), self.zs_text_features,
                                       alpha=self.alpha, logit_scale=self.logit_scale)

    # ---- learned state ----------------------------------------------------------------------
    def learned_state(self) -> dict[str, torch.Tensor]:
        """The tensors training changes; with the frozen CLIP they define the model."""
        state = {"token_ids": self.token_ids, "token_rows": self.token_rows,
                 "text_positional": self.text_positional, "mask": self.mask}
        if self.image_delta is not None:
            state["image_delta"] = self.image_delta
        return {k: v.detach() for k, v in state.items()}

    def load_learned_state(self, state: dict[str, torch.Tensor]) -> None:
        if "token_ids" in state and not torch.equal(state["token_ids"].cpu(), self.token_ids.cpu()):
            raise ValueError("checkpoint was trained on other prompts (class names or template differ)")
        targets = {"token_rows": self.token_rows, "text_positional": self.text_positional, "mask": self.mask,
                   "token_ids": self.token_ids}
        if self.image_delta is not None:
            targets["image_delta"] = self.image_delta
        load_checked(targets, state, "Reprogrammer")


def check_pixel_range(images: torch.Tensor) -> None:
    """Images must be uint8 (scaled by 1/255 inside the patch-embedding op) or floats in [0, 1].
    Floats are checked on CPU tensors only: on an accelerator the check would stall the stream,
    and the data pipeline converts uint8 there, which guarantees the range."""
    if images.dtype == torch.uint8 or images.device.type != "cpu" or images.numel() == 0 \
            or torch.compiler.is_compiling() \
            or torch.jit.is_tracing():
        return
    low, high = images.min().item(), images.max().item()
    if low < 0 or high > 1:
        raise ValueError(
            f"images must lie in [0, 1], got values in [{low:.3g}, {high:.3g}]; pass raw pixels / 255, "
            "not normalised images (the reprogrammer normalises after adding its perturbation)"
        )
