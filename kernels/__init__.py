"""Fused ops of the reprogramming data path, each with the PyTorch reference that defines it."""
from .backend import backend, use_backend, use_triton
from .perturbation import border_mask, perturbation
from .reprogram_patch_embed import reprogram_image, reprogram_patch_embed, reprogram_patch_embed_ref
from .residual_logits import (ResidualScores, blend, check_alpha, ood_scores, residual_logits,
                              residual_logits_ref, residual_scores, residual_scores_ref)

__all__ = [
    "backend", "use_backend", "use_triton", "border_mask", "perturbation", "reprogram_image",
    "reprogram_patch_embed", "reprogram_patch_embed_ref", "blend", "check_alpha", "ood_scores",
    "residual_logits", "residual_logits_ref", "ResidualScores", "residual_scores", "residual_scores_ref",
]
