"""The deployable classifier as one traceable module: reprogramming, frozen image tower, constant text.

Everything that does not depend on the input is folded into constants: the perturbation
`tanh(W * M)` (eval mode, no dropout), the blended class embeddings
`(1 - a) * norm(txt_rp) + a * norm(txt_zs)` and `exp(logit_scale)`. The image side calls the
PyTorch reference ops directly, never the `kernels` dispatchers: those route through custom
operators (Triton on CUDA) that no ONNX exporter can translate. The OOD score is MCM as its one
definition computes it (`kernels.ood_scores`).
"""
import copy

import torch
import torch.nn as nn
from open_clip.transformer import VisionTransformer

from reprogrammer.constants import MCM_TEMPERATURE
from reprogrammer.kernels import blend, check_alpha, ood_scores, reprogram_patch_embed_ref
from reprogrammer.model import Reprogrammer
from reprogrammer.towers import encode_patch_tokens, vision_tower

OUTPUT_NAMES = ("logits", "probabilities", "ood_score", "prediction")


def check_exportable(model, image_resolution) -> None:
    """Raise a clear error when `model` or `image_resolution` cannot become an ONNX classifier."""
    if not isinstance(model, Reprogrammer):
        raise TypeError(
            f"ONNX export needs a reprogrammer.Reprogrammer (or a subclass), got {type(model).__name__}; "
            "build one with Reprogrammer(clip, tokenizer, classnames) and load its learned state"
        )
    vision_tower(model.clip)
    if isinstance(image_resolution, bool) or not isinstance(image_resolution, int) or image_resolution < 1:
        raise ValueError(
            f"image_resolution={image_resolution!r} must be a positive int: the side of the square "
            "images the exported graph accepts (the dataset's image resolution, e.g. 32 for CIFAR-10)"
        )


class ExportableClassifier(nn.Module):
    """`images [B, 3, H, W]` in [0, 1] -> (logits, probabilities, ood_score, prediction).

    `model` must be in eval mode while this is built (the perturbation is read once).
    `dtype=torch.float16` runs the image tower in half precision on a copy of it; the
    reprogramming arithmetic before the patch embedding and the scores after the pooled
    features stay in fp32, so the graph's inputs and outputs are float32 either way.
    """

    def __init__(self, model: Reprogrammer, *, alpha: float, dtype: torch.dtype = torch.float32):
        super().__init__()
        alpha = check_alpha(alpha)
        visual = model.clip.visual
        self.visual: VisionTransformer = visual if dtype == visual.conv1.weight.dtype \
            else copy.deepcopy(visual).to(dtype)
        self.alpha = alpha
        self.canvas = model.canvas
        self.up_resolution = model.up_resolution
        self.mean, self.std = model.mean, model.std
        with torch.no_grad():
            self.register_buffer("zero_canvas", torch.zeros(3, self.canvas, self.canvas))
            perturbation = None if model.image_delta is None else model.perturbation().detach().float()
            self.register_buffer("perturbation", perturbation)
            text = blend(model.encode_text(), model.zs_text_features, self.alpha)
            self.register_buffer("text_features", text.detach().float())
            self.register_buffer("logit_scale", model.logit_scale.detach().float())

    def _features(self, images: torch.Tensor, perturbation: torch.Tensor, up_resolution: int) -> torch.Tensor:
        visual = self.visual
        tokens = reprogram_patch_embed_ref(
            images, perturbation, visual.conv1.weight, up_resolution=up_resolution, mean=self.mean,
            std=self.std, pos_embed=visual.positional_embedding[1:])
        return encode_patch_tokens(visual, tokens).float()

    def forward(self, images: torch.Tensor):
        def zero_shot():
            return self._features(images, self.zero_canvas, self.canvas)

        if self.perturbation is None:  # text-only reprogramming: the image side is zero-shot
            reprogrammed = other = zero_shot()
        else:
            reprogrammed = self._features(images, self.perturbation, self.up_resolution)
            other = zero_shot() if self.alpha > 0 else reprogrammed
        cos = blend(reprogrammed, other, self.alpha) @ self.text_features.T
        logits = self.logit_scale * cos
        scores = ood_scores(cos, MCM_TEMPERATURE)
        return logits, logits.softmax(dim=-1), scores.mcm, scores.prediction
