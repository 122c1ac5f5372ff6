"""Residual blend of reprogrammed and zero-shot features, cosine logits and OOD scores
(METHOD.md sections 4 and 5).

    img = (1 - a) * norm(img_rp) + a * norm(img_zs)        # [B, D], not re-normalised
    txt = (1 - a) * norm(txt_rp) + a * norm(txt_zs)        # [C, D]
    logits = logit_scale * img @ txt.T                      # [B, C]
"""
import torch
import torch.nn.functional as F


def _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha):
    if img_rp.dim() != 2 or txt_rp.dim() != 2 or img_rp.shape[1] != txt_rp.shape[1]:
        raise ValueError(
            f"image features must be [B, D] and text features [C, D], got {tuple(img_rp.shape)} "
            f"and {tuple(txt_rp.shape)}"
        )
    if img_zs.shape != img_rp.shape or txt_zs.shape != txt_rp.shape:
        raise ValueError(
            f"zero-shot features {tuple(img_zs.shape)}, {tuple(txt_zs.shape)} must match the "
            f"reprogrammed ones {tuple(img_rp.shape)}, {tuple(txt_rp.shape)}"
        )
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha={alpha} must lie in [0, 1] (0: Reprogrammer, 1: zero-shot)")


def blend(rp: torch.Tensor, zs: torch.Tensor, alpha: float) -> torch.Tensor:
    """`(1 - a) * norm(rp) + a * norm(zs)`, without re-normalisation."""
    return (1.0 - alpha) * F.normalize(rp, dim=-1) + alpha * F.normalize(zs, dim=-1)


def residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale) -> torch.Tensor:
    _check_inputs(img_rp, img_zs, txt_rp, txt_zs, alpha)
    return logit_scale * blend(img_rp, img_zs, alpha) @ blend(txt_rp, txt_zs, alpha).T


def residual_logits(img_rp, img_zs, txt_rp, txt_zs, *, alpha: float, logit_scale) -> torch.Tensor:
    """Residual Reprogrammer logits `[B, C]`; see the module docstring."""
    return residual_logits_ref(img_rp, img_zs, txt_rp, txt_zs, alpha=alpha, logit_scale=logit_scale)
