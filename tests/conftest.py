"""Test setup: Triton's CPU interpreter, and the package's fixes to it.

TRITON_INTERPRET must be set before any ``triton.jit`` function is created, so
it is set here, at collection time, before flashattn_lite's kernels are imported.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


from flashattn_lite.backends.triton import patch_interpreter_bf16_dot  # noqa: E402

# tl.dot on bf16 is wrong in Triton's interpreter (raw bits multiplied) and float32 -> bf16
# casts truncate; the package applies its fixes itself on first kernel use, and the tests
# apply them up front too.
patch_interpreter_bf16_dot()


@pytest.fixture(autouse=True)
def _seed(request):
    """Fresh random inputs with a fixed seed per test id."""
    import zlib

    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
