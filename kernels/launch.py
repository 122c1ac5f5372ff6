"""Launch-configuration helpers shared by the kernels' launchers."""


def pow2_between(n: int, low: int, high: int) -> int:
    """The power of two covering `n`, kept within [low, high] (`tl.dot` needs tiles of >= 16).
    Only comparisons touch `n`, so a symbolic size under torch.compile(dynamic=True) works."""
    size = low
    while size < high and size < n:
        size *= 2
    return size


def cdiv(a: int, b: int) -> int:
    """Ceiling division (`triton.cdiv`, here so that host code runs without Triton installed)."""
    return -(-a // b)
