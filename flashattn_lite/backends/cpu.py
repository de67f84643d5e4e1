"""The C++ CPU backend (csrc/cpu).  Not built in this version: reports itself
unavailable, so ``auto`` routes CPU tensors to ``reference``."""

NAME = "cpu"
_REASON = "the C++ CPU kernels are not part of this version yet"


def available():
    return False, _REASON


def supports(call):
    return _REASON
