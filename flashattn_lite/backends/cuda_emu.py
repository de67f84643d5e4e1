"""``cuda_emu``: the CUDA C++ kernels of csrc/cuda run on the CPU under the host
emulation of the CUDA execution model (csrc/cuda/emu/cuda_emu.h).

A verification tool, not a way to compute attention: it exists so that the CUDA
kernels' logic (tiling, masking, online softmax, the backward recomputation, the
tensor-core fragment layouts) can be tested on machines without a GPU.  It is slow
(every CUDA thread is a fiber, every warp instruction a rendezvous of 32 of them),
serves CPU tensors in fp16 and bf16, and is never chosen by ``auto``; ask for it with
``use_backend("cuda_emu")`` or ``FLASHATTN_LITE_BACKEND=cuda_emu``.
"""

import torch

from .. import _build_cuda
from .base import missing_features

NAME = "cuda_emu"
# exactly what the CUDA kernels implement (shared with the cuda backend)
FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16")
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256


def _ops():
    _build_cuda.build_emu()
    return torch.ops.flashattn_lite_emu


def available():
    try:
        path = _build_cuda.build_emu()
    except RuntimeError as exc:
        return False, str(exc)
    return True, f"CUDA kernels under the CPU emulator (verification only, slow): {path}"


def kernel_limits(call, backend):
    """Reason the CUDA kernels cannot serve ``call`` (dtype, head dim, features), or None."""
    if call.dtype not in DTYPES:
        return f"dtype {call.dtype} is not supported by the {backend} backend (float16, bfloat16)"
    if not 1 <= call.head_dim <= MAX_HEAD_DIM:
        return f"head_dim {call.head_dim} is not supported by the {backend} backend (1..{MAX_HEAD_DIM})"
    if call.dv != call.head_dim:
        return (f"the {backend} backend needs the value head dim to equal the query/key head dim (no MLA), got "
                f"{call.head_dim} and {call.dv}")
    missing = missing_features(call, FEATURES)
    if missing:
        return f"the {backend} backend {missing}"
    return None


def param_limits(p, backend):
    """The same check on the parameters themselves (fwd/bwd may be called directly)."""
    extra = set(p.features()) - set(FEATURES)
    if extra:
        raise RuntimeError(f"the {backend} backend does not implement {', '.join(sorted(extra))}")


def supports(call):
    if call.device.type != "cpu":
        return f"tensors on {call.device.type}; the cuda_emu backend runs CPU tensors"
    why = kernel_limits(call, NAME)
    if why:
        return why
    ok, why = available()
    return None if ok else why


def _empty(q, k):
    """Whether the call has nothing to compute (a zero batch, heads or sequence length).
    It is answered here, not by the kernels: an empty tensor may carry any strides (autograd
    hands an expanded, all-zero-stride ``dout`` to the backward of ``out.sum()``, and
    ``.contiguous()`` keeps them, since an empty tensor counts as contiguous), which the
    operators' unit-stride checks would refuse."""
    return q.numel() == 0 or k.numel() == 0


def _unit_last(*tensors):
    """A last dim of size 1 may carry any stride (no element is ever stepped over); the
    kernels' wrapper insists on 1, so such tensors are re-viewed with it (no copy)."""
    return [t if t is None or t.shape[-1] != 1 or t.stride(-1) == 1 else t.as_strided(t.shape, t.stride()[:-1] + (1,))
            for t in tensors]


def run_fwd(ops, backend, q, k, v, p):
    """fwd through the ``flashattn_lite_C`` ops of ``ops`` (the emulated or the real CUDA build)."""
    param_limits(p, backend)
    q, k, v = _unit_last(q, k, v)
    if _empty(q, k):
        # every query row sees no key: output 0, lse -inf (the shared masked-row rule)
        lse = torch.full((q.shape[0], q.shape[2], q.shape[1]), float("-inf"), dtype=torch.float32, device=q.device)
        return torch.zeros_like(q), lse
    return ops.fwd(q, k, v, *p.op_args())


def run_bwd(ops, backend, dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    param_limits(p, backend)
    dout, q, k, v, out = _unit_last(dout, q, k, v, out)
    if bias_grad:
        raise RuntimeError(f"the {backend} backend does not implement bias gradients")
    if _empty(q, k):
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v), None
    dq, dk, dv, _ = ops.bwd(dout, dlse, q, k, v, out, lse, *p.op_args(), False, bool(deterministic))
    return dq, dk, dv, None


def fwd(q, k, v, p):
    return run_fwd(_ops(), NAME, q, k, v, p)


def bwd(dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic):
    return run_bwd(_ops(), NAME, dout, dlse, q, k, v, out, lse, p, bias_grad, deterministic)
