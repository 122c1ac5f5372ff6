"""Without CUDA, Triton kernels run in Triton's interpreter (fp32).

Triton picks interpreter or compiler when a kernel is decorated with `@triton.jit`, reading
`TRITON_INTERPRET` at that moment, so the variable has to be set before `kernels` is imported;
importing torch first (which imports triton) is harmless.
"""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
