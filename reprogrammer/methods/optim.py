"""Optimisers and the warm-up + cosine schedule of the authors' runs (docs/method.md section 3)."""
import math

import torch


def warmup_cosine(step: int, warmup: int, total: int) -> float:
    """LR multiplier at `step`: linear warm-up `(step + 1) / warmup`, then half a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))


def check_schedule(warmup: int, total: int) -> None:
    if total <= 0:
        raise ValueError(f"training has {total} steps: give it at least one epoch of data")
    if warmup >= total:
        raise ValueError(
            f"warm-up ({warmup} steps) is not shorter than training ({total} steps); lower "
            "method.warmup_steps or train longer"
        )


def scheduled(optimizer: torch.optim.Optimizer, warmup: int, total: int) -> torch.optim.lr_scheduler.LambdaLR:
    check_schedule(warmup, total)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: warmup_cosine(step, warmup, total))


def reprogrammer_optimizers(model, *, image_lr: float = 5e-3, text_lr: float = 5e-4,
                            weight_decay: float = 0.1) -> list[torch.optim.Optimizer]:
    """Adam with coupled L2 for the image delta; AdamW (betas 0.9/0.98, eps 1e-6) for the text embeddings.

    Parameter groups are named (`image_delta`, `text`) for the learning rates the trackers log."""
    optimizers = []
    if model.image_delta is not None and model.image_delta.requires_grad:
        optimizers.append(torch.optim.Adam([{"params": [model.image_delta], "name": "image_delta"}], lr=image_lr,
                                           weight_decay=weight_decay))
    text = [p for p in (model.token_rows, model.text_positional) if p.requires_grad]
    if text:
        optimizers.append(torch.optim.AdamW([{"params": text, "name": "text"}], lr=text_lr, betas=(0.9, 0.98),
                                            eps=1e-6, weight_decay=weight_decay))
    return optimizers
