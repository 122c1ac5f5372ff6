"""Triton when it is installed; otherwise stand-ins that let the kernel modules import.

Triton has wheels for Linux only. Without it, `@triton.jit` leaves the kernel functions as plain
(never called) functions and `tl.constexpr` annotations evaluate; `use_triton` then sends every
op to its PyTorch reference. Host code must not need Triton (see `launch.cdiv`): the stand-in
`triton` has `jit` and nothing else, so such a use fails loudly.
"""
try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _Triton:
        @staticmethod
        def jit(fn=None, **options):
            return fn if fn is not None else (lambda f: f)

    class _Language:
        """Answers any attribute (kernel annotations such as `tl.constexpr`) with itself."""

        def __getattr__(self, name):
            return self

    triton, tl = _Triton(), _Language()

__all__ = ["AVAILABLE", "triton", "tl"]
