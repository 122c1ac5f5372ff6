"""Triton when it is installed; otherwise stand-ins that let the kernel modules import.

Triton has wheels for Linux only. Without it, `@triton.jit` leaves the kernel functions as plain
(never called) functions, `tl.constexpr` annotations evaluate, and `use_triton` sends every op to
its PyTorch reference.
"""
try:
    import triton
    import triton.language as tl

    AVAILABLE = True
except ImportError:
    AVAILABLE = False

    class _Absent:
        """Answers any attribute with itself; called on a function, returns it (the `jit` decorator)."""

        def __getattr__(self, name):
            return self

        def __call__(self, *args, **kwargs):
            return args[0] if len(args) == 1 and callable(args[0]) and not kwargs else self

    triton = tl = _Absent()

__all__ = ["AVAILABLE", "triton", "tl"]
