"""Precision, autocast and device placement: one place for training, evaluation and benchmarks."""
import contextlib

import torch

# `train.precision` / `eval` precision names and the autocast dtype each stands for.
PRECISIONS = {"fp32": None, "amp_bf16": torch.bfloat16, "amp_fp16": torch.float16}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """`auto`, `cuda` or `cpu` (any torch device name) as a device; CUDA picks this process's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("device=cuda but no CUDA device is visible; use device=cpu (train.device=cpu)")
        torch.cuda.set_device(local_rank)
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """The autocast context of a precision name (a no-op for `fp32`)."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r} is not one of {', '.join(PRECISIONS)}")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def to_device_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A batch on `device` as the classifiers take it: uint8 stays bytes (the reprogramming ops
    scale it by 1/255 as they read it, so no float copy of the batch is ever made), anything else
    becomes fp32 in [0, 1]."""
    images = images.to(device, non_blocking=True)
    return images if images.dtype == torch.uint8 else images.float()

