"""Test setup: Triton's CPU interpreter, and one fix to it.

TRITON_INTERPRET must be set before any ``triton.jit`` function is created, so
it is set here, at collection time, before flashattn_lite's kernels are imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402


def _patch_interpreter_bf16_dot():
    """Triton's interpreter stores bf16 as raw uint16 and its ``tl.dot`` multiplies
    those bits as integers.  Widen bf16 operands to fp32 (exact) before the
    product, as the GPU's tensor cores do; the kernels stay untouched."""
    from triton.runtime import interpreter

    builder_cls = interpreter.InterpreterBuilder
    if getattr(builder_cls, "_flashattn_lite_bf16_patch", False):
        return
    original = builder_cls.create_dot

    def widen(handle):
        if handle.dtype.scalar.name == "bf16" or str(handle.dtype.scalar) == "bf16":
            data = (handle.data.astype(np.uint32) << 16).view(np.float32)
            return interpreter.TensorHandle(data, interpreter.tl.float32)
        return handle

    def create_dot(self, a, b, d, *args, **kwargs):
        return original(self, widen(a), widen(b), d, *args, **kwargs)

    builder_cls.create_dot = create_dot
    builder_cls._flashattn_lite_bf16_patch = True


_patch_interpreter_bf16_dot()


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs with a fixed seed per test id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
