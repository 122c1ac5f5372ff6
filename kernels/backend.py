"""Which implementation an op runs: the Triton kernel or the PyTorch reference.

Backends:
- `auto` (default): Triton on CUDA tensors, the reference elsewhere;
- `triton`: always Triton. On the CPU this needs `TRITON_INTERPRET=1` (Triton's
  interpreter, fp32 only); without it the op raises instead of falling back;
- `torch`: always the reference.

`use_backend(name)` switches for a block of code (per thread and task); the environment
variable `REPROGRAMMER_BACKEND` sets the process default.
"""
import contextlib
import os
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

from ._triton import AVAILABLE as TRITON_AVAILABLE

BACKENDS = ("auto", "triton", "torch")

_chosen: ContextVar[Optional[str]] = ContextVar("reprogrammer_backend", default=None)


def _checked(name: str) -> str:
    name = name.strip().lower()
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    return name


def backend() -> str:
    """The backend in force: `use_backend`'s, else `REPROGRAMMER_BACKEND`, else `auto`."""
    chosen = _chosen.get()
    if chosen is not None:
        return chosen
    try:
        return _checked(os.environ.get("REPROGRAMMER_BACKEND", "auto"))
    except ValueError as error:
        raise ValueError(f"REPROGRAMMER_BACKEND: {error}") from None


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the block with backend `name` (`auto`, `triton` or `torch`), restoring the previous one after."""
    token = _chosen.set(_checked(name))
    try:
        yield
    finally:
        _chosen.reset(token)


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(tensor: torch.Tensor) -> bool:
    """Whether the op called on `tensor` should launch its Triton kernel."""
    name = backend()
    if name == "torch":
        return False
    if name == "auto":
        return tensor.is_cuda and TRITON_AVAILABLE
    if not TRITON_AVAILABLE:
        raise RuntimeError("backend 'triton' needs the triton package (Linux: pip install triton); "
                           "use the 'torch' or 'auto' backend")
    if tensor.is_cuda:
        return True
    if not triton_interpreting():
        raise RuntimeError(
            "backend 'triton' on a CPU tensor needs Triton's interpreter: set TRITON_INTERPRET=1 "
            "(fp32 only), move the tensors to CUDA, or use the 'torch' backend "
            "(reprogrammer.kernels.use_backend('torch'))"
        )
    if tensor.dtype != torch.float32:
        raise RuntimeError(
            f"Triton's CPU interpreter computes in fp32 only, got {tensor.dtype}; "
            "cast to float32 or use the 'torch' backend"
        )
    return True
