"""Reprogrammer and Residual Reprogrammer around a frozen open_clip CLIP (docs/method.md 1, 2, 4).

Image side: a learned `[3, S, S]` delta becomes the border perturbation around the upsampled
image; `kernels.reprogram_patch_embed` turns source images straight into patch tokens, and the
frozen ViT (class token, `ln_pre`, transformer, pooling, projection) follows.
Text side: the prompts' token-embedding rows and the positional embedding are trainable copies
of the pretrained values; everything else of the text tower is frozen. The tower runs on the
prompts cut to `text_length` (the longest prompt, rounded up to 8; `towers.text_length`): the
positions after it cannot change a feature of a causal tower pooled at the EOT token.

Inference caches the text features: `text_features()` re-runs the text tower only when a tensor
it reads has changed (see there), so `model(images)` costs the image tower alone.
"""
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels
from .classnames import checked_classnames
from .clip import image_normalisation
from .constants import DEFAULT_TEMPLATE
from .state import load_checked
from .text_cache import TextFeatureCache, text_tower_tensors
from .towers import (check_pixel_range, encode_patch_tokens, encode_text_embeddings, text_length, text_tower,
                     vision_tower)


class Reprogrammer(nn.Module):
    """Reprogrammed CLIP classifier over `classnames`; `alpha > 0` gives Residual Reprogrammer.

    `image=False` or `text=False` freezes that side at its zero-shot behaviour (the paper's
    text-only and image-only ablations). `text_length` is the sequence length the text tower runs
    at; any value from it up to the context length gives the same features.
    """

    def __init__(self, clip, tokenizer, classnames: Sequence[str], *, template: str = DEFAULT_TEMPLATE,
                 up_resolution: Optional[int] = None, mr_resolution: Optional[int] = None,
                 dropout: float = 0.0, alpha: float = 0.0, image: bool = True, text: bool = True,
                 mean: Optional[Sequence[float]] = None, std: Optional[Sequence[float]] = None):
        super().__init__()
        visual = vision_tower(clip)
        text_module, _, _ = text_tower(clip)
        classnames = checked_classnames(classnames)
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the class name goes")
        canvas = visual.image_size[0]
        up_resolution = canvas if up_resolution is None else up_resolution
        mr_resolution = (6 * canvas) // 7 if mr_resolution is None else mr_resolution
        if not 1 <= up_resolution <= canvas:
            raise ValueError(f"up_resolution={up_resolution} must lie in [1, {canvas}] (the encoder's input size)")
        if not 0 <= mr_resolution <= canvas:
            raise ValueError(f"mr_resolution={mr_resolution} must lie in [0, {canvas}] (the encoder's input size)")
        if mr_resolution > up_resolution:
            raise ValueError(f"mr_resolution={mr_resolution} exceeds up_resolution={up_resolution}: the untouched "
                             "centre would be larger than the image, leaving a blank ring between image and "
                             "perturbation; set method.mr_resolution <= method.up_resolution")
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
        self.text_length = text_length(clip, prompts)
        self.token_rows = nn.Parameter(text_module.token_embedding.weight[token_ids].detach().clone())
        self.text_positional = nn.Parameter(text_module.positional_embedding.detach().clone())
        with torch.no_grad():
            zero_shot = self._text_features(text_module.token_embedding.weight[token_ids],
                                            text_module.positional_embedding, slice(None))
        self.register_buffer("zs_text_features", F.normalize(zero_shot, dim=-1))
        self.token_rows.requires_grad_(text)
        self.text_positional.requires_grad_(text)
        self._text_cache = TextFeatureCache()

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

    def image_feature_pair(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """`(image_features, zero_shot_image_features)` of `images`.

        Without gradients the two passes share one run of the frozen tower over `2B` token rows:
        its matrix products see twice the rows, which fills an accelerator's tiles at small batches
        and on a 2-core CPU is faster at every batch size (RP-ViT-Small, fastest of 5 interleaved
        runs, separate -> paired: B=1 2.5 -> 1.5 ms, B=8 4.4 -> 3.2, B=32 9.1 -> 8.2, B=64 15.7 -> 14.3).
        With gradients they stay apart, so the backward pass never runs over the zero-shot half.
        """
        if self.image_delta is None:
            features = self.zero_shot_image_features(images)
            return features, features
        if torch.is_grad_enabled() and self.image_delta.requires_grad:
            return self.image_features(images), self.zero_shot_image_features(images)
        visual = self.clip.visual
        check_pixel_range(images)
        common = dict(mean=self.mean, std=self.std, pos_embed=visual.positional_embedding[1:])
        tokens = torch.cat([
            kernels.reprogram_patch_embed(images, self.perturbation(), visual.conv1.weight,
                                          up_resolution=self.up_resolution, **common),
            kernels.reprogram_patch_embed(images, self.zero_canvas, visual.conv1.weight,
                                          up_resolution=self.canvas, **common)])
        return encode_patch_tokens(visual, tokens).chunk(2)

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image_features(images), dim=-1)

    # ---- text side --------------------------------------------------------------------------
    def _text_features(self, rows: torch.Tensor, positional: torch.Tensor, classes) -> torch.Tensor:
        # The length of all prompts, not of `classes`' own: theirs would need the indices on the host
        # (a device sync per training step) and rarely gives a shorter multiple of 8.
        length = self.text_length
        return encode_text_embeddings(self.clip, rows[self.prompt_index[classes, :length]],
                                      self.prompt_tokens[classes, :length], positional)

    def encode_text(self, classes: Optional[torch.Tensor] = None) -> torch.Tensor:
        """L2-normalised reprogrammed text features of `classes` (all classes by default)."""
        classes = slice(None) if classes is None else classes
        return F.normalize(self._text_features(self.token_rows, self.text_positional, classes), dim=-1)

    def text_features(self) -> torch.Tensor:
        """`encode_text()` of all classes, computed once for as long as it cannot change.

        While gradients flow to the prompt parameters every call encodes afresh (training); otherwise
        the features are cached until a tensor the text tower reads changes (`text_cache`: optimiser
        steps, `load_state_dict`, `load_learned_state`, `.to()` and in-place edits all re-encode).
        After writes through `.data` call `clear_text_cache()`. `alpha` only enters the blend that
        `kernels.residual_logits` does per call, so it needs no key here.
        """
        if (torch.is_grad_enabled() and (self.token_rows.requires_grad or self.text_positional.requires_grad)) \
                or torch.jit.is_tracing():
            return self.encode_text()
        inputs = [self.token_rows, self.text_positional, self.prompt_tokens, self.prompt_index,
                  *text_tower_tensors(self.clip)]
        return self._text_cache(inputs, self.encode_text)

    def clear_text_cache(self) -> None:
        self._text_cache.clear()

    # ---- classifier -------------------------------------------------------------------------
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Logits `[B, C]` = `exp(logit_scale) * cos` of the (residual-blended) features."""
        if self.alpha > 0:
            img_rp, img_zs = self.image_feature_pair(images)
        else:
            img_rp = img_zs = self.image_features(images)
        return kernels.residual_logits(img_rp, img_zs, self.text_features(), self.zs_text_features,
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
