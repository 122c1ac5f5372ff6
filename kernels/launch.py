"""What the kernels' launchers share: tile sizes, the device's SM count, the `tl.dot` precision
that mirrors PyTorch's own setting, and the Triton signatures of the offline compile report.

Host code here must run without Triton installed (see `_triton.py`).
"""
import functools

import torch

# The SM count assumed where no CUDA device is there to ask: CPU interpreter runs, meta tensors
# and the offline sm_90a compile report. 132 is the H100 SXM's and the H200's, the GPUs the
# tile sizes were chosen on; a launch on a CUDA device always uses that device's own count.
DEFAULT_SM_COUNT = 132


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


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of the CUDA `device`, read from the device once per device;
    `DEFAULT_SM_COUNT` for any other device (CPU interpreter, meta)."""
    device = torch.device(device)
    if device.type != "cuda":
        return DEFAULT_SM_COUNT
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


# The fp32 setting each kind of PyTorch op reads: a kernel that stands in for a convolution
# follows cuDNN's flag (TF32 by default), one that stands in for a matmul follows
# `torch.set_float32_matmul_precision` ("highest", i.e. exact fp32, by default).
_FP32_USES_TF32 = {
    "conv": lambda: torch.backends.cudnn.allow_tf32,
    "matmul": lambda: torch.get_float32_matmul_precision() != "highest",
}


def dot_precision(dtype: torch.dtype, replaces: str) -> str:
    """`tl.dot`'s `input_precision` for operands of `dtype` in a kernel that replaces the PyTorch
    op `replaces` ("conv" or "matmul"): "ieee" where that op would compute exact fp32, else
    "tf32" (which 16-bit operands ignore). Following the replaced op's setting is what keeps the
    kernel and its PyTorch reference within the same tolerance under any user setting."""
    if replaces not in _FP32_USES_TF32:
        raise ValueError(f"replaces={replaces!r} must be one of {sorted(_FP32_USES_TF32)}")
    if dtype == torch.float32 and not _FP32_USES_TF32[replaces]():
        return "ieee"
    return "tf32"


# ------------------------------------------------------------------------------------------------
# Triton signatures, for `sm90_cases` (what `bench.compile_report` compiles)
# ------------------------------------------------------------------------------------------------
_TRITON_TYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.uint8: "u8",
                 torch.int32: "i32", torch.int64: "i64"}
_DTYPE_NAMES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32, "u8": torch.uint8,
                "uint8": torch.uint8}


def as_dtype(dtype) -> torch.dtype:
    """A torch dtype from itself or from its report name ("bf16", "fp16", "fp32", "u8")."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in _DTYPE_NAMES:
        raise ValueError(f"dtype {dtype!r} is not one of {sorted(_DTYPE_NAMES)} or a torch.dtype")
    return _DTYPE_NAMES[dtype]


def triton_signature(kernel, args: list, constexprs: dict) -> tuple[dict, dict]:
    """Triton signature strings, in the kernel's argument order, for `(name, value)` pairs:
    ("ptr", dtype) -> "*bf16" etc., bool -> "i1", int -> "i32"/"i64", float -> "fp32"; the names
    in `constexprs` -> "constexpr". Also the run-time int and float values, by name. Raises when
    the names differ from the kernel's arguments, so a description cannot drift from its kernel."""
    types, values = {}, {}
    for name, value in args:
        if isinstance(value, tuple):
            types[name] = "*" + _TRITON_TYPES[value[1]]
        elif isinstance(value, bool):
            types[name] = "i1"
        elif isinstance(value, int):
            types[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
            values[name] = value
        else:
            types[name] = "fp32"
            values[name] = value
    types.update({name: "constexpr" for name in constexprs})
    if set(types) != set(kernel.arg_names):
        raise AssertionError(f"{kernel.__name__}: arguments {sorted(set(types) ^ set(kernel.arg_names))} "
                             "differ between the launcher's description and the kernel")
    return {name: types[name] for name in kernel.arg_names}, values
