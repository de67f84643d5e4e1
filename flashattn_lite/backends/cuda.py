"""The CUDA C++ backend (csrc/cuda).  Not built in this version: reports itself
unavailable, so ``auto`` keeps Triton for CUDA tensors."""

NAME = "cuda"
FEATURES = ()
_REASON = "the CUDA C++ kernels are not part of this version yet"


def available():
    return False, _REASON


def supports(call):
    return _REASON
