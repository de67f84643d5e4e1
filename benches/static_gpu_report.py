"""Compile every shipped Triton kernel config for sm_80 and sm_90 on the CPU and
print registers, spill bytes, shared memory and tensor-core use.

    python benches/static_gpu_report.py [--json report.json]
"""

import os
import sys

os.environ.pop("TRITON_INTERPRET", None)

from flashattn_lite.static_report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
