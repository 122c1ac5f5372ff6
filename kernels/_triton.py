"""Triton when it is installed; otherwise stand-ins that let the kernel modules import.

Triton has wheels for Linux only. Without it, `@triton.jit` leaves the kernel functions as plain
(never called) functions and `tl.constexpr` annotations evaluate; `use_triton` then sends every
op to its PyTorch reference. Host code must not need Triton (see `launch.cdiv`): the stand-in
`triton` has `jit` and nothing else, so such a use fails loudly.
"""
import torch

try:
    import triton
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    AVAILABLE = True
except ImportError:
    AVAILABLE = False
    InterpretedFunction = ()  # matches nothing in isinstance

    class _Triton:
        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

    class _Language:
        """Answers any attribute (kernel annotations such as `tl.constexpr`) with itself."""

        def __getattr__(self, name):
            return self

    triton, tl = _Triton(), _Language()


def wrap_triton(kernel):
    """`torch.library.wrap_triton(kernel)`, except that a kernel of Triton's interpreter
    (`TRITON_INTERPRET=1` makes `@triton.jit` return an `InterpretedFunction`) launches as it is.
    torch 2.11 rejects that type ("wrap_triton only works on functions annotated with
    triton.jit"); later versions return it unchanged, as here. Nothing is lost: the interpreter
    runs on real tensors only, so no traced call reaches it (see the ops' `_runs_triton`)."""
    if isinstance(kernel, InterpretedFunction):
        return kernel
    return torch.library.wrap_triton(kernel)


__all__ = ["AVAILABLE", "triton", "tl", "wrap_triton"]
