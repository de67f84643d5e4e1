"""The CUDA C++ backend: the kernels of csrc/cuda (FlashAttention-2 style, mma.sync
tensor cores, fp16/bf16, head dims up to 256), built just in time with nvcc and
registered as the CUDA implementation of ``torch.ops.flashattn_lite_C``.

Available only where torch has CUDA, the device is sm_80 or newer, and nvcc is
present.  ``auto`` does not pick it: Triton stays the CUDA default until these
kernels have been measured faster on a GPU.  They have been verified by compilation
(tests/test_cuda_compile.py) and by running the same sources under the CPU emulator
(the ``cuda_emu`` backend), never on a GPU.
"""

import torch

from .. import _build_cuda
from .cuda_emu import FEATURES, kernel_limits, run_bwd, run_fwd  # noqa: F401  (FEATURES: the same kernels)

NAME = "cuda"


def _ops():
    _build_cuda.build_cuda()
    return torch.ops.flashattn_lite_C


def available():
    why = _build_cuda.cuda_unavailable_reason()
    if why:
        return False, why
    try:
        path = _build_cuda.build_cuda()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"CUDA C++ extension {path} (compiled and emulated, not timed on a GPU)"


def supports(call):
    if call.device.type != "cuda":
        return f"tensors on {call.device.type}; the cuda backend needs CUDA tensors"
    why = kernel_limits(call, NAME)
    if why:
        return why
    ok, why = available()
    return None if ok else why


def fwd(q, k, v, p):
    return run_fwd(_ops(), NAME, q, k, v, p)


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    return run_bwd(_ops(), NAME, dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic)
