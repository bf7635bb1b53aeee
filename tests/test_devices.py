"""The one dtype map and the one device check (evomerge.devices)."""

from __future__ import annotations

import pytest
import torch

from evomerge.devices import DTYPE_NAMES, check_device, dtype_name, torch_dtype
from evomerge.errors import EvomergeError


def test_dtype_names_and_aliases():
    assert DTYPE_NAMES == ("float32", "bfloat16", "float16")
    for alias, name in [("fp32", "float32"), ("float", "float32"), ("FP16", "float16"), ("half", "float16"),
                        ("bf16", "bfloat16"), ("torch.bfloat16", "bfloat16"), (torch.float16, "float16")]:
        assert dtype_name(alias) == name, alias
        assert torch_dtype(alias) == getattr(torch, name)
    assert dtype_name("int8") is None
    assert torch_dtype(torch.float64) is torch.float64  # a torch.dtype passes through
    with pytest.raises(EvomergeError, match="unknown dtype 'int8': use float32, bfloat16 or float16"):
        torch_dtype("int8")


def test_check_device_names_the_field():
    assert check_device("cpu", "x") == torch.device("cpu")
    with pytest.raises(EvomergeError, match=r"^--device: 'gpu' is not a device name"):
        check_device("gpu", "--device")
    with pytest.raises(EvomergeError, match=r"^evaluator\.device: 'mps': only cpu and cuda"):
        check_device("mps", "evaluator.device")
    with pytest.raises(EvomergeError, match=r"^merge engine device: 'cuda:99', but .*(no CUDA GPU|GPU\(s\))"):
        check_device("cuda:99", "merge engine device")
