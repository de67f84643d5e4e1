"""One-shot GPU check: environment, correctness of every GPU path against float64
attention, and timing against torch's SDPA (FLASH, CUDNN), in under 8 minutes.

    python benches/gpu_check.py [--out gpu_check_out] [--full] [--budget 440] [--dry-run]

The same as ``flashattn-lite gpu-check``; the work is in ``flashattn_lite/gpu_check.py``.
Runs from a plain checkout (the checkout's root is put on ``sys.path``, and the kernel
folders are found without an install).  Without a CUDA device it prints the plan and exits 0.
"""

import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)  # this checkout's flashattn_lite, before any installed one

os.environ.pop("TRITON_INTERPRET", None)  # the check runs the kernels on the GPU

from flashattn_lite.gpu_check import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
