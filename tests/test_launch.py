"""The launchers' shared helpers: the SM count comes from the device, the fp32 dot precision
follows the PyTorch op a kernel replaces, and a compile-report signature cannot drift from its
kernel."""
import importlib
from types import SimpleNamespace

import pytest
import torch

from reprogrammer.kernels import launch

rpe = importlib.import_module("reprogrammer.kernels.reprogram_patch_embed")


@pytest.fixture
def fresh_sm_cache():
    launch._cuda_sm_count.cache_clear()
    yield
    launch._cuda_sm_count.cache_clear()


def test_sm_count_off_cuda_is_the_documented_default():
    assert launch.sm_count(torch.device("cpu")) == 132
    assert launch.sm_count(torch.device("meta")) == 132


def test_sm_count_is_read_from_the_cuda_device_once_per_device(monkeypatch, fresh_sm_cache):
    asked = []

    def properties(index):
        asked.append(index)
        return SimpleNamespace(multi_processor_count={0: 78, 1: 144}[index])

    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    assert launch.sm_count(torch.device("cuda", 0)) == 78
    assert launch.sm_count(torch.device("cuda", 0)) == 78
    assert launch.sm_count(torch.device("cuda")) == 144  # no index: the current device
    assert asked == [0, 1]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_sm_count_of_the_real_device(fresh_sm_cache):
    device = torch.device("cuda", torch.cuda.current_device())
    assert launch.sm_count(device) == torch.cuda.get_device_properties(device).multi_processor_count


def test_patch_gemm_tiles_follow_the_sm_count():
    """ViT-B/32 at B = 256 has 98 x 6 tiles of 128 x 128: two waves on 132 SMs keep 128-row tiles,
    on 300 SMs they would leave SMs idle, so the rows halve."""
    rows, width, patch = 256 * 49, 768, 32
    assert rpe._forward_gemm_config(rows, width, patch, "16bit", 132)["BLOCK_M"] == 128
    assert rpe._forward_gemm_config(rows, width, patch, "16bit", 300)["BLOCK_M"] == 64


def test_dot_precision_follows_the_replaced_op(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    assert launch.dot_precision(torch.float32, replaces="conv") == "tf32"
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    assert launch.dot_precision(torch.float32, replaces="conv") == "ieee"
    previous = torch.get_float32_matmul_precision()
    try:
        torch.set_float32_matmul_precision("highest")
        assert launch.dot_precision(torch.float32, replaces="matmul") == "ieee"
        torch.set_float32_matmul_precision("high")
        assert launch.dot_precision(torch.float32, replaces="matmul") == "tf32"
    finally:
        torch.set_float32_matmul_precision(previous)
    for dtype in (torch.bfloat16, torch.float16):
        assert launch.dot_precision(dtype, replaces="conv") == launch.dot_precision(dtype, replaces="matmul") == "tf32"
    with pytest.raises(ValueError, match="replaces='gemm' must be one of"):
        launch.dot_precision(torch.float32, replaces="gemm")


def test_triton_signature_in_kernel_order_and_refuses_drift():
    kernel = SimpleNamespace(__name__="k", arg_names=["x_ptr", "n", "scale", "flag", "BLOCK"])
    args = [("scale", 0.5), ("n", 2 ** 31), ("x_ptr", ("ptr", torch.bfloat16)), ("flag", True)]
    signature, values = launch.triton_signature(kernel, args, {"BLOCK": 64})
    assert signature == {"x_ptr": "*bf16", "n": "i64", "scale": "fp32", "flag": "i1", "BLOCK": "constexpr"}
    assert list(signature) == kernel.arg_names and values == {"n": 2 ** 31, "scale": 0.5}
    with pytest.raises(AssertionError, match=r"arguments \['flag'\] differ"):
        launch.triton_signature(kernel, args[:3], {"BLOCK": 64})
    assert launch.as_dtype("u8") is torch.uint8 and launch.as_dtype(torch.float16) is torch.float16
    with pytest.raises(ValueError, match="'int4' is not one of"):
        launch.as_dtype("int4")
