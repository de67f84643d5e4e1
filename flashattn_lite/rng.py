"""The dropout random stream, defined once for every backend.

Element (b, h, i, j) of the attention matrix is kept iff

    philox4x32_10(counter, key=seed)[0] >= threshold(p)      (both as uint32)

with the 64-bit ``counter = ((b * H + h) * Sq + i) * Sk + j`` split into the Philox
counter words (lo, hi, 0, 0) and the 64-bit seed into the key words (lo, hi).  That is
``tl.philox(seed, lo, hi, 0, 0)[0]`` in Triton (and ``tl.randint(seed, counter)`` since
Triton 3.4), which the Triton kernels call;
the C++ kernels implement the same function, and this module is its plain PyTorch form
(the reference backend and the tests use it).  In varlen mode b = 0, H = heads,
Sq = total_q (i is the packed row) and Sk = max_seqlen_k (the public function passes the
longest key sequence; j is the key's index in its
own sequence).

``threshold(p) = round(p * 2**32)``, so the kept fraction is 1 - p to within 2**-32.
The seed is drawn from torch's default CPU generator for every call, so
``torch.manual_seed`` reproduces a run; backward regenerates the same mask from the seed.
"""

import contextlib

import torch

_M32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def threshold(p):
    """The uint32 cut below which a draw is dropped."""
    return min(int(round(p * 2.0 ** 32)), 2 ** 32 - 1)


def draw_seed():
    """A fresh 63-bit seed from torch's default generator."""
    return int(torch.randint(0, 2 ** 63 - 1, (), dtype=torch.int64).item())


def _mul32(a, b):
    """(hi, lo) 32-bit words of a * b for uint32 values held in int64 tensors (no overflow)."""
    a_hi, a_lo = a >> 16, a & 0xFFFF
    hi_part = a_hi * b  # < 2**48
    lo_part = a_lo * b  # < 2**48
    hi = (hi_part + (lo_part >> 16)) >> 16
    lo = (lo_part + ((hi_part & 0xFFFF) << 16)) & _M32
    return hi, lo


def philox_first_word(seed, counter, rounds=10):
    """First output word of Philox4x32 at 64-bit ``counter`` (int64 tensor), key ``seed``."""
    counter = counter.to(torch.int64)
    c0, c1 = counter & _M32, (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(rounds):
        hi_b, lo_b = _mul32(c2, torch.full_like(c2, _ROUND_B))
        hi_a, lo_a = _mul32(c0, torch.full_like(c0, _ROUND_A))
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    return c0


def dropout_keep(seed, p, batch, heads, seqlen_q, seqlen_k, device="cpu"):
    """Bool (batch, heads, seqlen_q, seqlen_k): which probabilities dropout keeps.

    The testing hook: with the seed a call used (see :func:`flashattn_lite.testing.record_dropout`)
    this is exactly the mask the kernels applied.
    """
    counter = torch.arange(batch * heads * seqlen_q * seqlen_k, dtype=torch.int64, device=device)
    keep = philox_first_word(seed, counter) >= threshold(p)
    return keep.reshape(batch, heads, seqlen_q, seqlen_k)


_recorders = []  # lists that recording() is filling


@contextlib.contextmanager
def recording():
    """Yields a list that fills with one :class:`DropoutCall` per dropout call made inside
    the block (:func:`flashattn_lite.testing.record_dropout` is the documented hook)."""
    calls = []
    _recorders.append(calls)
    try:
        yield calls
    finally:
        _recorders.remove(calls)


class DropoutCall:
    """One dropout call as recorded by :func:`flashattn_lite.testing.record_dropout`."""

    def __init__(self, params, q, k):
        self.seed, self.p = params.dropout_seed, params.dropout_p
        if params.varlen:
            self.dims = (1, q.shape[1], q.shape[0], params.max_seqlen_k)
        else:
            self.dims = (q.shape[0], q.shape[2], q.shape[1], k.shape[1])
        self.device = q.device

    def keep(self):
        """The keep mask this call applied: (B, H, Sq, Sk), or (1, H, total_q, max_seqlen_k) for varlen."""
        return dropout_keep(self.seed, self.p, *self.dims, device=self.device)


def note_call(params, q, k):
    for rec in _recorders:
        rec.append(DropoutCall(params, q, k))
