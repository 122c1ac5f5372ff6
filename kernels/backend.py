"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

`REPROGRAMMER_BACKEND`:
- `auto` (default): Triton on CUDA tensors, the reference elsewhere;
- `triton`: always Triton. On the CPU this needs `TRITON_INTERPRET=1` (Triton's
  interpreter, fp32 only); without it the op raises instead of falling back;
- `torch`: always the reference.
"""
import os

import torch

BACKENDS = ("auto", "triton", "torch")


def backend() -> str:
    name = os.environ.get("REPROGRAMMER_BACKEND", "auto").strip().lower()
    if name not in BACKENDS:
        raise ValueError(
            f"REPROGRAMMER_BACKEND={name!r} is not a backend; use one of {', '.join(BACKENDS)}"
        )
    return name


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the op called on `tensor` should launch its Triton kernel."""
    name = backend()
    if name == "torch":
        return False
    if name == "auto":
        return tensor.is_cuda
    if tensor.is_cuda:
        return True
    if not triton_interpreting():
        raise RuntimeError(
            "REPROGRAMMER_BACKEND=triton on a CPU tensor needs Triton's interpreter: "
            "set TRITON_INTERPRET=1 (fp32 only), move the tensors to CUDA, or use "
            "REPROGRAMMER_BACKEND=torch"
        )
    if tensor.dtype != torch.float32:
        raise RuntimeError(
            f"Triton's CPU interpreter computes in fp32 only, got {tensor.dtype}; "
            "cast to float32 or use REPROGRAMMER_BACKEND=torch"
        )
    return True
