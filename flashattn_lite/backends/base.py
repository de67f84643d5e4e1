"""What every backend receives: the description of a call (:class:`Call`, for the
capability check) and its parameters (:class:`Params`, for fwd/bwd)."""

import os
from dataclasses import dataclass, field
from typing import Optional

import torch


def accum_dtype(dtype):
    """float64 for float64 input, else float32: the dtype every backend accumulates in and lse has."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# os.environ.get costs about a microsecond (Mapping.get, key encoding, value decoding); the
# per-call settings are read on every call, so on POSIX they are looked up in the bytes
# mapping behind os.environ, which every os.environ / putenv-through-os change updates.
_ENV_BYTES = getattr(os.environ, "_data", None) if os.name == "posix" else None
if not isinstance(_ENV_BYTES, dict):
    _ENV_BYTES = None
_ENV_KEYS = {}


def getenv(name, default):
    """os.environ.get(name, default), cheaply (read on every call: settings take effect at once)."""
    if _ENV_BYTES is None:
        return os.environ.get(name, default)
    key = _ENV_KEYS.get(name)
    if key is None:
        key = _ENV_KEYS[name] = os.fsencode(name)
    value = _ENV_BYTES.get(key)
    return default if value is None else os.fsdecode(value)


# Params' fields in the order they are operator arguments: ops.py's _PARAM_ARGS and the
# C++ schema of csrc/ops.cpp.
OP_FIELDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k", "bias", "softmax_scale", "diag_offset",
             "window_left", "window_right", "softcap", "alibi_slopes", "dropout_p", "dropout_seed")


@dataclass(frozen=True)
class Call:
    """What a backend needs to know to decide whether it can serve a call.

    ``features``: the optional features the call uses, named as in ``ALL_FEATURES``
    (e.g. "varlen", "attn_mask", "dropout", "softcap", "alibi", "window", "kv-cache").
    ``head_dim``: q's and k's head dim D; ``head_dim_v``: v's (and the output's), None when
    it equals ``head_dim`` (:attr:`dv` gives it either way).  Every backend's ``supports``
    checks both.
    """
    device: torch.device
    dtype: torch.dtype
    head_dim: int
    features: frozenset = field(default_factory=frozenset)
    head_dim_v: Optional[int] = None

    @property
    def dv(self):
        return self.head_dim if self.head_dim_v is None else self.head_dim_v


def missing_features(call, features):
    """The reason a backend offering ``features`` cannot serve ``call``, or None."""
    missing = sorted(set(call.features) - set(features))
    return f"does not implement {', '.join(missing)}" if missing else None


@dataclass(frozen=True)
class Params:
    """Everything a backend's fwd/bwd needs besides the tensors.

    Dense mode (``cu_seqlens_q is None``): q (B, Sq, H, D), k/v (B, Sk, Hk, D), lse (B, H, Sq).

    Varlen mode: q (total_q, H, D), k/v (total_k, Hk, D), packed; sequence b owns rows
    ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and ``cu_seqlens_k[b]:cu_seqlens_k[b+1]`` of k/v
    (int32, on the tensors' device, validated by the interface); ``max_seqlen_*`` bound
    the lengths; lse is (H, total_q).  Sequence b's diagonal offset is
    ``diag_offset + len_k(b) - len_q(b)`` (bottom-right alignment per sequence when 0).

    Key j is visible to query i iff ``i + off - window_left <= j <= i + off + window_right``
    (a negative bound is unbounded).  The scores the softmax sees are
    ``softcap * tanh(scale * q.k / softcap)`` (or ``scale * q.k`` when softcap == 0), then
    ``- slope[b, h] * |i + off - j|`` (ALiBi, float32 (B, H)), then ``+ bias[b, h, i, j]``
    (dense mode only; a (B, H, Sq, Sk) view, broadcast dims with stride 0, any float dtype,
    -inf allowed).  A row whose scores are all invisible or -inf gives out 0, lse -inf.

    Dropout (``dropout_p > 0``): ``out = (P * keep / (1 - p)) @ V`` with ``keep`` from
    :func:`flashattn_lite.rng.dropout_keep` (Philox4x32-10 keyed by ``dropout_seed``) at the
    element's counter; lse is that of the undropped softmax.
    """
    softmax_scale: float
    diag_offset: int = 0
    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi_slopes: Optional[torch.Tensor] = None
    bias: Optional[torch.Tensor] = None
    cu_seqlens_q: Optional[torch.Tensor] = None
    cu_seqlens_k: Optional[torch.Tensor] = None
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    dropout_p: float = 0.0
    dropout_seed: int = 0

    @classmethod
    def from_op_args(cls, args):
        """Params from the operator arguments (in ``OP_FIELDS`` order)."""
        return cls(**dict(zip(OP_FIELDS, args)))

    def op_args(self):
        """The fields as operator arguments, in ``OP_FIELDS`` order."""
        return tuple(getattr(self, name) for name in OP_FIELDS)

    @property
    def varlen(self):
        return self.cu_seqlens_q is not None

    def features(self):
        """The optional features these parameters use (names of ``ALL_FEATURES``)."""
        used = set()
        if self.window_left >= 0 or self.window_right >= 0:
            used.add("window")
        if self.softcap > 0:
            used.add("softcap")
        if self.alibi_slopes is not None:
            used.add("alibi")
        if self.bias is not None:
            used.add("attn_mask")
        if self.varlen:
            used.add("varlen")
        if self.dropout_p > 0:
            used.add("dropout")
        return frozenset(used)
