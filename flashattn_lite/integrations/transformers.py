"""Hugging Face transformers attention backend ``"fa_lite"``.

::

    from flashattn_lite.integrations.transformers import register
    register()
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="fa_lite")

:func:`register` adds two functions under one name to transformers' registries:

* a **mask function** (``AttentionMaskInterface``).  transformers calls it wherever a
  model builds its attention mask (``create_causal_mask``, ``create_sliding_window_causal_mask``,
  ``create_bidirectional_mask``, ...), with the pattern as a composed ``mask_function``
  plus the 2-D padding mask, the cache offsets and lengths.  Instead of expanding that
  into a ``(batch, 1, q_len, kv_len)`` matrix, :func:`fa_lite_mask` recognises the
  pattern (causal, bidirectional, sliding window, packed sequences from ``position_ids``)
  and returns a compact :class:`MaskPlan` carried by a :class:`PlannedMask` (below).
  Patterns it does not recognise keep a dense mask built exactly as ``sdpa`` would build it.
* an **attention function** (``AttentionInterface``), :func:`fa_lite_attention_forward`,
  which turns the plan into flashattn_lite calls: one dense :func:`flash_attn_func` call
  when no row is padded, otherwise :func:`flash_attn_varlen_func` over each row's
  contiguous key range (left or right padding, KV-cache decoding with left padding) or
  over the packed sequences; on the CPU a padded decoding step calls
  :func:`flash_attn_with_kvcache` with those key ranges instead (no packed copy).  GQA
  runs without repeating K/V; sliding windows, softcap, the model's scaling and dropout
  map onto the kernel's arguments.  Packed sequences are those transformers' mask marks
  (``position_ids`` given, no padding mask, no cache) and,
  following flash-attn's convention as transformers' flash-attn backends do, also a
  ``position_ids`` restarting at 0 with no padding mask and no past tokens while a cache
  is in use (where eager attention would let the sequences see each other).

Models that compute with the mask.  Some models transform the mask between its creation
and attention: add a learned bias to it (doge), concatenate it with another mask or with a
bias over extra keys (t5gemma2's merged self/cross attention, deepseek_v4's compressed
keys), index it (the DeepSeek-V3.2 family's indexer, gemma4's KV-shared layers keeping the
last queries).  The :class:`PlannedMask` answers such code as eager attention's mask would:
its shape, dtype (the model's float dtype) and device are the eager mask's, and every torch
operation other than reading those runs on the exact eager mask (0 / dtype minimum, built
from transformers' own ``sdpa_mask`` when first needed) and returns an ordinary tensor.  So
whatever a model computes from the mask, it computes as under eager attention, and the
attention function receives a plain 4-D mask, which it applies as eager would (through
flashattn_lite's :func:`scaled_dot_product_attention`, or the model's eager function where
softcap requires it).  Writing into the mask (in place, or through a view of it)
makes the written eager mask its meaning.  An unchanged mask, also after a no-op index,
``.to()`` that changes nothing, ``.contiguous()``, ``.detach()`` or ``.clone()``, keeps the
compact plan and the fast kernels; copies (``copy.deepcopy``, pickling, ``.to()`` another
dtype or device) are the dense eager mask.  torch.compile traces through it.  Code that
reaches the carrier's storage bypassing torch's subclass dispatch finds one NaN, broadcast:
its results are NaN, and the attention function refuses that storage passed on as a mask.  Sparse attention handed to backends as arguments
rather than in the mask: the DeepSeek-V3.2 family's top-k ``indices`` are folded into the
mask as their eager path does; block-sparse ``block_indices`` (minimax_m3_vl) are refused.

Outputs at *padding query positions* are 0 (as with flash-attn): those positions carry
no meaning in transformers (losses and generation ignore them), and eager attention
itself gives them arbitrary values.  Everything else is computed exactly as eager
attention's mask says.  Anything this backend cannot serve (weights requested with
``output_attentions``, a head dim over 512, a mask that is not 4-D...)
goes to transformers' ``sdpa`` function (or the model's eager function where sdpa cannot
serve it either) with a one-time warning; it is never answered wrongly.
"""

import warnings

import torch

from ..backends import cpu as cpu_backend
from ..interface import (MAX_HEAD_DIM, SUPPORTED_DTYPES, flash_attn_func, flash_attn_varlen_func,
                         scaled_dot_product_attention)
from ..kvcache import flash_attn_with_kvcache

NAME = "fa_lite"  # a name containing "flash" would switch on transformers' flash-attn-specific code paths

__all__ = ["NAME", "register", "fa_lite_attention_forward", "fa_lite_mask", "MaskPlan", "PlannedMask"]

_warned = set()


def _warn_once(message):
    if message not in _warned:
        _warned.add(message)
        warnings.warn(f"flashattn_lite ({NAME}): {message}", RuntimeWarning, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# registration
# ---------------------------------------------------------------------------------------------

def register(name=NAME):
    """Register the attention function and its mask function under ``name`` (default
    ``"fa_lite"``); afterwards ``attn_implementation=name`` works in ``from_pretrained``,
    ``from_config`` and ``model.set_attn_implementation``.  Idempotent; returns ``name``."""
    if "flash" in name:
        raise ValueError(f"{name!r}: transformers treats names containing 'flash' as flash-attn itself; "
                         "choose another name")
    try:
        from transformers import AttentionInterface
    except ImportError as e:  # pragma: no cover - depends on the installed transformers
        raise ImportError("flashattn_lite's transformers backend needs transformers >= 4.48 "
                          "(AttentionInterface)") from e
    AttentionInterface.register(name, fa_lite_attention_forward)
    try:
        from transformers.masking_utils import AttentionMaskInterface
    except ImportError:  # pragma: no cover - transformers < 4.53 builds 4-D masks itself
        return name
    AttentionMaskInterface.register(name, fa_lite_mask)
    return name


# ---------------------------------------------------------------------------------------------
# the mask side: recognise the pattern, keep it compact
# ---------------------------------------------------------------------------------------------

_PLAN_ATTR = "_flashattn_lite_plan"


class MaskPlan:
    """Compact description of one attention mask, as transformers' ``sdpa_mask`` defines it.

    Key ``j`` (cache index; absolute position ``kv_offset + j``) is visible to query ``i``
    (position ``q_offset + i``) in batch row ``b`` iff ``padding[b, kv_offset + j]`` (when
    there is a padding mask), the band holds (``causal``: key position <= query position;
    ``window=(left, right)`` in flash-attn's convention on positions, -1 unbounded) and,
    for packed sequences, both lie in the same segment of ``segments`` (b, seqlen).

    ``pattern`` is None when the mask function was not recognised; :meth:`dense` then is the
    only description (built with transformers' own ``sdpa_mask``, as sdpa would).
    """

    def __init__(self, batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask,
                 pattern, mask_kwargs):
        self.batch_size, self.q_length, self.kv_length = batch_size, q_length, kv_length
        self.q_offset, self.kv_offset = q_offset, kv_offset
        self.mask_function, self.attention_mask = mask_function, attention_mask
        self.pattern = pattern
        self._mask_kwargs = mask_kwargs  # the mask function's arguments, as transformers gave them
        self._dense = None
        self._layout = None

    def dense(self):
        """(batch, 1, q_length, kv_length) bool, True = may attend: the mask sdpa would get,
        built by transformers' own ``sdpa_mask`` from the same arguments."""
        if self._dense is None:
            from transformers.masking_utils import sdpa_mask
            kwargs = dict(self._mask_kwargs, allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
            self._dense = sdpa_mask(**kwargs)
        return self._dense

    def padding(self):
        """(batch, kv_length) bool key validity for the cache's keys, or None (no padding mask)."""
        if self.attention_mask is None:
            return None
        pad = self.attention_mask.to(torch.bool)
        need = self.kv_offset + self.kv_length
        if pad.shape[-1] < need:  # as transformers' prepare_padding_mask: missing entries are padding
            pad = torch.nn.functional.pad(pad, (0, need - pad.shape[-1]))
        return pad[:, self.kv_offset:need]

    def additive(self, dtype):
        """(batch, 1, q_length, kv_length) ``dtype``: 0 where a key may be attended, the dtype's
        minimum elsewhere: the mask eager attention would get (as transformers' ``eager_mask``)."""
        dense = self.dense()
        return torch.where(dense, torch.zeros((), dtype=dtype, device=dense.device), torch.finfo(dtype).min)


# Reading these never depends on the mask's values: they answer from the carrier itself.
_METADATA = frozenset({
    torch.Tensor.dim, torch.Tensor.ndimension, torch.Tensor.size, torch.Tensor.numel, torch.Tensor.nelement,
    torch.Tensor.__len__, torch.Tensor.__hash__, torch.Tensor.is_floating_point, torch.Tensor.is_complex,
    torch.Tensor.element_size, torch.Tensor.get_device, torch.Tensor.shape.__get__, torch.Tensor.ndim.__get__,
    torch.Tensor.dtype.__get__, torch.Tensor.device.__get__, torch.Tensor.layout.__get__,
    torch.Tensor.requires_grad.__get__, torch.Tensor.is_cuda.__get__, torch.Tensor.is_cpu.__get__,
    torch.Tensor.is_meta.__get__, torch.Tensor.is_sparse.__get__, torch.Tensor.is_quantized.__get__,
    torch.Tensor.is_nested.__get__, torch.Tensor.itemsize.__get__, torch.Tensor.nbytes.__get__,
    # the carrier's own layout (one element, broadcast), as torch.compile's guards read it
    torch.Tensor.stride, torch.Tensor.storage_offset, torch.Tensor.is_contiguous,
})
_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__set__", "__setstate__", "__iadd__", "__isub__", "__imul__",
                               "__itruediv__", "__ifloordiv__", "__imod__", "__ipow__", "__imatmul__", "__iand__",
                               "__ior__", "__ixor__", "__ilshift__", "__irshift__"})


def _writes_first_argument(func):
    name = getattr(func, "__name__", "")
    return name in _IN_PLACE_DUNDERS or (name[-1:] == "_" and name[-2:] != "__")  # (slices: torch.compile traces them)


def _leaves(obj):
    """The tensors inside nested lists / tuples / dicts (torch function arguments and results)."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for x in obj:
            yield from _leaves(x)
    elif isinstance(obj, dict):
        for x in obj.values():
            yield from _leaves(x)


def _replace(obj, swap):
    if isinstance(obj, PlannedMask):
        return swap(obj)
    if isinstance(obj, (list, tuple)):
        items = [_replace(x, swap) for x in obj]
        return type(obj)(*items) if hasattr(obj, "_fields") else type(obj)(items)
    if isinstance(obj, dict):
        return {k: _replace(x, swap) for k, x in obj.items()}
    return obj


def _aliases(t, value):
    """Whether ``t`` shares memory with ``value`` (a tensor that is no view itself)."""
    if torch.compiler.is_compiling():  # (traceable; _is_alias_of is not, and compiled code has no inference tensors)
        return t is value or t._base is value
    return torch._C._is_alias_of(t, value)  # (inference-mode views have no _base)


def _is_noop_index(index, shape):
    """Whether ``t[index]`` selects all of ``t`` unchanged (slices over whole dims, ``...``)."""
    index = index if isinstance(index, tuple) else (index,)
    if any(not isinstance(i, slice) and i is not Ellipsis for i in index) or sum(i is Ellipsis for i in index) > 1:
        return False
    if Ellipsis in index:
        at = index.index(Ellipsis)
        dims = list(range(at)) + list(range(len(shape) - (len(index) - at - 1), len(shape)))
        index = index[:at] + index[at + 1:]
    else:
        dims = range(len(index))
    if len(index) > len(shape):
        return False
    for i, d in zip(index, dims):
        if i.start not in (None, 0) or i.step not in (None, 1):
            return False
        if i.stop is not None and not (isinstance(i.stop, int) and i.stop >= shape[d]):
            return False
    return True


class PlannedMask(torch.Tensor):
    """The attention mask :func:`fa_lite_mask` hands to the model: a :class:`MaskPlan` in the
    clothes of the mask eager attention would get.

    Its metadata are the eager mask's: shape ``(batch, 1, q_length, kv_length)``, the model's
    float dtype, the device.  It holds no such matrix (its storage is one NaN, broadcast), and
    :func:`fa_lite_attention_forward` reads only the plan.  Every other use of it by torch
    (arithmetic, ``torch.cat``, indexing, comparisons, ``masked_fill``, copies, ``.to(dtype)``,
    pickling...) runs on the exact eager mask (:meth:`MaskPlan.additive`, built when first
    needed) instead and gives a plain tensor, so whatever a model computes from the mask it
    computes as under eager attention, and the attention function then receives an ordinary 4-D
    mask, which it honours as eager would.  Writes into the mask (in-place ops, ``out=``, or
    writes through a view of it) land in that eager mask, which from then on is the mask's
    meaning (the plan is no longer used).  Left unchanged: reading the mask with a no-op index
    (``m[:, :, :, :kv_len]``), ``.to()`` / ``.contiguous()`` / ``.detach()`` that change nothing,
    and ``.clone()``.
    """

    @staticmethod
    def _make(plan, dtype, device):
        nan = torch.full((), float("nan"), dtype=dtype, device=device)
        carrier = nan.expand(plan.batch_size, 1, plan.q_length, plan.kv_length).as_subclass(PlannedMask)
        setattr(carrier, _PLAN_ATTR, plan)
        carrier._fa_value = None  # the eager mask, once some operation needed it
        carrier._fa_written = False  # whether _fa_value may differ from the plan (written, or a view handed out)
        return carrier

    def _eager_value(self):
        if self._fa_value is None:
            self._fa_value = getattr(self, _PLAN_ATTR).additive(self.dtype)
        return self._fa_value

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _METADATA:
            return super().__torch_function__(func, types, args, kwargs)
        first = args[0] if args else None
        if isinstance(first, PlannedMask) and not first._fa_written:
            same = first._unchanged_by(func, args, kwargs)
            if same is not None:
                return same
        carriers = [t for t in _leaves((args, kwargs)) if isinstance(t, PlannedMask)]
        values = [c._eager_value() for c in carriers]
        args, kwargs = _replace((args, kwargs), lambda c: c._eager_value())
        result = func(*args, **kwargs)
        written = set(map(id, _leaves(kwargs.get("out"))))
        if isinstance(first, PlannedMask) and _writes_first_argument(func):
            written.add(id(first._fa_value))
        for carrier, value in zip(carriers, values):
            if id(value) in written or any(_aliases(t, value) for t in _leaves(result)):
                carrier._fa_written = True  # written now, or a view of it given out that can be written later
        if isinstance(first, PlannedMask) and result is first._fa_value:
            return first  # an in-place method returns the object it was called on
        return result

    def _unchanged_by(self, func, args, kwargs):
        """``self`` (or a copy of it) when ``func`` would give a mask with the same meaning, else None."""
        if func is torch.Tensor.__getitem__ and len(args) == 2 and not kwargs:
            return self if _is_noop_index(args[1], self.shape) else None
        if func in (torch.Tensor.contiguous, torch.Tensor.detach) and len(args) == 1 and not kwargs:
            return self
        if func is torch.Tensor.clone and len(args) == 1 and not kwargs:
            return PlannedMask._make(getattr(self, _PLAN_ATTR), self.dtype, self.device)
        if func is torch.Tensor.to:
            # what .to() would do is asked of an empty tensor of the same dtype and device
            probe = torch.empty(0, dtype=self.dtype, device=self.device)
            return self if func(probe, *args[1:], **kwargs) is probe else None
        return None


def _closure(fn):
    return dict(zip(fn.__code__.co_freevars, (c.cell_contents for c in fn.__closure__ or ())))


_KNOWN_CODES = None


def _known_codes():
    """The code objects of transformers' mask-function factories, to recognise closures by."""
    global _KNOWN_CODES
    if _KNOWN_CODES is None:
        from transformers import masking_utils as mu
        codes = {}

        def add(kind, factory):
            try:
                codes[factory().__code__] = kind
            except Exception:  # pragma: no cover - a factory missing in this transformers version
                pass

        def always(*args):
            return True

        add("and", lambda: mu.and_masks(always))
        add("sliding", lambda: mu.sliding_window_overlay(1))
        add("bidirectional_sliding", lambda: mu.sliding_window_bidirectional_overlay(1))
        add("packed", lambda: mu.packed_sequence_mask_function(None))
        add("remap", lambda: mu.remap_positions_for_packed_sequence(always, None))
        _KNOWN_CODES = codes
    return _KNOWN_CODES


def _parse(fn, acc, inside_remap=False):
    """Collect what ``fn`` requires into ``acc``; False when some part is not recognised."""
    from transformers import masking_utils as mu
    if fn is mu.causal_mask_function:
        acc["causal"] = True
        return True
    if fn is getattr(mu, "bidirectional_mask_function", None):  # not in every transformers version
        return True
    code = getattr(fn, "__code__", None)
    kind = _known_codes().get(code)
    if kind is None or (fn.__closure__ is None and kind != "and"):
        return False
    cells = _closure(fn)
    if kind == "and":
        return all(_parse(f, acc, inside_remap) for f in cells["mask_functions"])
    if kind == "sliding":  # kv > q - w  <=>  q - kv <= w - 1
        w = cells["sliding_window"]
        if not isinstance(w, int) or w < 1:
            return False
        acc["left"].append(w - 1)
        return True
    if kind == "bidirectional_sliding":  # |q - kv| <= w
        w = cells["sliding_window"]
        if not isinstance(w, int) or w < 0:
            return False
        acc["left"].append(w)
        acc["right"].append(w)
        return True
    if inside_remap:
        return False
    if kind == "packed":
        acc["segments"] = cells["packed_sequence_mask"]
        return True
    if kind == "remap":
        # positions inside one packed segment are consecutive (that is how transformers finds the
        # segments), so the band on positions equals the band on indices there
        acc["remap"] = True
        return _parse(cells["mask_function"], acc, inside_remap=True)
    return False  # pragma: no cover


def _recognise(mask_function):
    acc = {"causal": False, "left": [], "right": [], "segments": None, "remap": False}
    if not _parse(mask_function, acc):
        return None
    if acc["remap"] and acc["segments"] is None:
        return None
    left = min(acc["left"]) if acc["left"] else -1
    right = 0 if acc["causal"] else (min(acc["right"]) if acc["right"] else -1)
    return {"causal": acc["causal"], "window": (left, right), "segments": acc["segments"]}


def fa_lite_mask(batch_size, q_length=None, kv_length=None, q_offset=0, kv_offset=0, mask_function=None,
                 attention_mask=None, device=None, cache_position=None, **kwargs):
    """transformers mask function for ``"fa_lite"`` (same arguments as ``sdpa_mask``: transformers
    5.x passes ``q_length``/``q_offset``, 4.x the query positions as ``cache_position``).

    Returns a :class:`PlannedMask` carrying a :class:`MaskPlan`: it looks like the mask eager
    attention would get, and nothing of size q_length x kv_length is built for recognised
    patterns unless the model computes with the mask.
    """
    from transformers import masking_utils as mu
    mask_kwargs = dict(kwargs, batch_size=batch_size, kv_length=kv_length, kv_offset=kv_offset,
                       attention_mask=attention_mask)
    if mask_function is not None:
        mask_kwargs["mask_function"] = mask_function
    else:
        mask_function = mu.causal_mask_function
    if isinstance(kv_offset, torch.Tensor):
        kv_offset = int(kv_offset)
    contiguous_queries = True
    if cache_position is not None:  # transformers 4.x: absolute query positions
        mask_kwargs["cache_position"] = cache_position
        q_length = int(cache_position.numel())
        q_offset = int(cache_position[0]) if q_length else 0
        expected = torch.arange(q_offset, q_offset + q_length, device=cache_position.device)
        contiguous_queries = bool((cache_position == expected).all())
        device = cache_position.device if device is None else device
    else:
        mask_kwargs.update(q_length=q_length, q_offset=q_offset)
        if isinstance(q_offset, torch.Tensor):
            q_offset = int(q_offset)
    device = torch.device("cpu") if device is None else device
    mask_kwargs["device"] = device
    pattern = _recognise(mask_function) if contiguous_queries else None
    plan = MaskPlan(batch_size, q_length, kv_length, q_offset, kv_offset, mask_function, attention_mask, pattern,
                    mask_kwargs)
    dtype = kwargs.get("dtype")
    if not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        dtype = torch.float32  # what transformers' eager_mask uses when it is given no dtype
    return PlannedMask._make(plan, dtype, device)


# ---------------------------------------------------------------------------------------------
# the attention side
# ---------------------------------------------------------------------------------------------

def _int_list(t):
    return [int(x) for x in t.tolist()]


def _segments_from_position_ids(plan, position_ids, sq, sk):
    """flash-attn's packing convention: with no padding mask and no past tokens, a position id
    of 0 after a row's first token starts a new sequence.  (B, sq) segment ids, or None."""
    p = plan.pattern
    if (p is None or p["segments"] is not None or plan.attention_mask is not None or plan.q_offset != 0
            or plan.kv_offset != 0 or sq != sk or sq < 2 or not isinstance(position_ids, torch.Tensor)):
        return None
    if position_ids.dim() != 2 or position_ids.shape[-1] != sq or position_ids.shape[0] not in (1, plan.batch_size):
        return None
    starts = position_ids.expand(plan.batch_size, sq) == 0
    if not bool(starts[:, 1:].any()):
        return None
    starts = starts.clone()
    starts[:, 0] = True
    return starts.cumsum(-1)


def _layout(plan, sq, sk, position_ids=None):
    """How to run ``plan`` for q length ``sq`` and k length ``sk``: ("dense", k_end) |
    ("padded", ...) | ("packed", ...) | ("mask", None) (the dense bool mask)."""
    p = plan.pattern
    if p is None:
        return ("mask", None)
    d = plan.q_offset - plan.kv_offset  # key index j and query index i share a position iff j == i + d
    causal = p["causal"]
    left, right = p["window"]
    seg = p["segments"]
    if seg is None:
        seg = _segments_from_position_ids(plan, position_ids, sq, sk)
    if seg is not None:
        seg = seg.expand(plan.batch_size, -1) if seg.shape[0] == 1 else seg
        if plan.attention_mask is not None or d != 0 or sq != sk or tuple(seg.shape) != (plan.batch_size, sq):
            return ("mask", None)
        starts = torch.ones(seg.shape, dtype=torch.bool, device=seg.device)
        starts[:, 1:] = seg[:, 1:] != seg[:, :-1]
        begin = starts.flatten().nonzero().flatten()
        cu = torch.cat([begin, begin.new_tensor([seg.numel()])]).to(torch.int32)
        lengths = cu[1:] - cu[:-1]
        return ("packed", cu, int(lengths.max()))

    if causal and sq + d > sk:
        return ("mask", None)  # the last queries' own keys are not in K: no kernel diagonal fits
    pad = plan.padding()
    batch = plan.batch_size
    if pad is None:
        ks, ke = [0] * batch, [sk] * batch
    else:
        pad = pad.to(torch.bool)
        idx = torch.arange(sk, device=pad.device)
        count = pad.sum(1)
        first = torch.where(pad, idx, sk).amin(1)
        last = torch.where(pad, idx + 1, 0).amax(1)
        contiguous = (count == 0) | (last - first == count)
        if not bool(contiguous.all()):
            return ("mask", None)  # holes in a row's keys: only the dense mask describes that
        ks, ke = _int_list(torch.where(count == 0, 0, first)), _int_list(torch.where(count == 0, 0, last))
    qs, qe = [0] * batch, [sq] * batch
    for b in range(batch):
        if causal:
            # keys after the last query's position are invisible to every query: drop them, so that the
            # kernel's bottom-right diagonal (last query row <-> last key row) is the true one; query rows
            # after the row's last real key are padding queries and are not computed (output 0)
            ke[b] = min(ke[b], sq + d)
            qe[b] = max(0, min(sq, ke[b] - d))
        elif left >= 0 or right >= 0:
            if ke[b] - sq != d:
                return ("mask", None)  # a windowed band whose diagonal the kernel cannot place
        if ke[b] <= ks[b]:
            ks[b] = ke[b] = 0
            qe[b] = 0  # no visible key at all: the row's queries give 0
    if pad is None or all(k0 == 0 and k1 == ke[0] and q1 == sq for k0, k1, q1 in zip(ks, ke, qe)):
        if ke[0] > 0 and qe[0] == sq:
            return ("dense", ke[0])
    return ("padded", ks, ke, qs, qe)


def _run_plan(plan, q, k, v, scale, softcap, dropout, position_ids=None, sink=None):
    """q (B, Sq, Hq, D), k (B, Sk, Hk, D), v (B, Sk, Hk, Dv) (views) -> out (B, Sq, Hq, Dv);
    ``sink``: the model's attention sinks (s_aux), (Hq,) or None."""
    batch, sq, hq, dim = q.shape
    dim_v = v.shape[-1]
    sk = k.shape[1]
    key = (sq, sk)
    if plan._layout is None or plan._layout[0] != key:
        plan._layout = (key, _layout(plan, sq, sk, position_ids))
    layout = plan._layout[1]
    p = plan.pattern
    kw = dict(softmax_scale=scale, softcap=softcap, dropout_p=dropout, learnable_sink=sink)
    if layout[0] == "mask":
        if softcap:
            return None  # SDPA has no softcap: the caller falls back
        out = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                           attn_mask=plan.dense(), dropout_p=dropout, scale=scale, enable_gqa=True,
                                           learnable_sink=sink)
        return out.transpose(1, 2)
    causal = p["causal"]
    left, right = p["window"]
    window = (left, -1 if causal else right)
    if layout[0] == "dense":
        k_end = layout[1]
        return flash_attn_func(q, k[:, :k_end], v[:, :k_end], causal=causal, window_size=window, **kw)
    if layout[0] == "packed":
        _, cu, max_len = layout
        out = flash_attn_varlen_func(q.reshape(batch * sq, hq, dim), k.reshape(batch * sk, k.shape[2], dim),
                                     v.reshape(batch * sk, v.shape[2], dim_v), cu, cu, max_len, max_len,
                                     causal=causal, window_size=window, **kw)
        return out.view(batch, sq, hq, dim_v)
    if len(layout) == 5:  # first use: build the index tensors once, every layer reuses them
        _, ks, ke, qs, qe = layout
        device = q.device
        k_idx = torch.arange(sk, device=device)
        q_idx = torch.arange(sq, device=device)
        def between(idx, lo, hi):
            return (idx >= torch.tensor(lo, device=device)[:, None]) & (idx < torch.tensor(hi, device=device)[:, None])

        k_keep, q_keep = between(k_idx, ks, ke), between(q_idx, qs, qe)
        lens_k = [e - s for s, e in zip(ks, ke)]
        lens_q = [e - s for s, e in zip(qs, qe)]
        cu_k = torch.tensor([0, *_cumsum(lens_k)], dtype=torch.int32, device=device)
        cu_q = torch.tensor([0, *_cumsum(lens_q)], dtype=torch.int32, device=device)
        rows = None if all(n == sq for n in lens_q) else q_keep.nonzero(as_tuple=True)
        step = None
        if all(n in (0, sq) for n in lens_q):  # (qs is 0) each row computes all its queries or none
            step = tuple(torch.tensor([x if n else 0 for x, n in zip(bounds, lens_q)], dtype=torch.int32,
                                      device=device) for bounds in (ks, ke))
        layout = ("padded", k_keep, q_keep, cu_k, cu_q, max(max(lens_q), 1), max(max(lens_k), 1), rows, step)
        plan._layout = (key, layout)
    _, k_keep, q_keep, cu_k, cu_q, max_q, max_k, rows, step = layout
    if step is not None and _decoding_step(q, k, v, dropout, sink):
        # A decoding step of a padded batch: the KV-cache kernel reads each row's keys
        # [ks, ke) where they lie (its cache_leftpad and cache_seqlens, the queries at the end
        # as varlen's bottom-right places them; a row without queries sees no key and gives
        # 0), instead of gathering every layer's keys into a packed copy first.
        return flash_attn_with_kvcache(q, k, v, cache_seqlens=step[1], cache_leftpad=step[0], causal=causal,
                                       window_size=window, softcap=softcap, softmax_scale=scale, learnable_sink=sink,
                                       num_splits=cpu_backend.decode_splits(batch, k.shape[2], sk))
    out_packed = flash_attn_varlen_func(q[q_keep], k[k_keep], v[k_keep], cu_q, cu_k, max_q, max_k, causal=causal,
                                        window_size=window, **kw)
    if rows is None:
        return out_packed.view(batch, sq, hq, dim_v)
    return out_packed.new_zeros(batch, sq, hq, dim_v).index_put(rows, out_packed)


def _decoding_step(q, k, v, dropout, sink=None):
    """Whether a padded call takes the KV-cache kernel: on the CPU (where the gather it saves
    was measured: 2.4 ms against 0.45 for 4 rows x 8 heads x 1024 keys), for the few query
    rows the cpu backend decodes that way, with no dropout and nothing needing a gradient
    (the KV-cache API has no backward)."""
    needs_grad = any(t is not None and t.requires_grad for t in (q, k, v, sink))
    if q.device.type != "cpu" or dropout or (torch.is_grad_enabled() and needs_grad):
        return False
    return cpu_backend.decode_rows(q.shape[1], q.shape[2] // k.shape[2])


def _cumsum(values):
    total = 0
    for x in values:
        total += x
        yield total


def _fallback(reason, module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal, kwargs):
    """Hand the call to transformers' sdpa function (or the model's eager one where sdpa cannot serve)."""
    plan = getattr(attention_mask, _PLAN_ATTR, None) if attention_mask is not None else None
    mask = plan.dense() if plan is not None else attention_mask
    needs_eager = softcap or kwargs.get("s_aux") is not None
    if needs_eager:
        import sys
        eager = getattr(sys.modules.get(type(module).__module__), "eager_attention_forward", None)
        if eager is None:
            raise NotImplementedError(f"flashattn_lite ({NAME}) cannot serve this call ({reason}), and neither "
                                      "sdpa nor an eager function of this model can")
        _warn_once(f"{reason}: falling back to the model's eager attention")
        if plan is not None:
            mask = attention_mask._eager_value()  # the very mask eager attention would have got
        elif mask is not None and mask.dtype == torch.bool:
            mask = torch.where(mask, torch.zeros((), dtype=query.dtype, device=query.device),
                               torch.finfo(query.dtype).min)
        extra = dict(kwargs)
        if softcap:
            extra["softcap"] = softcap
        return eager(module, query, key, value, mask, dropout=dropout, scaling=scaling, **extra)
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    _warn_once(f"{reason}: falling back to sdpa")
    return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, scaling=scaling,
                                  is_causal=is_causal, **kwargs)


def _fold_topk_indices(mask, indices, query, key):
    """Sparse attention of the DeepSeek-V3.2 kind: models of that family hand backends other than
    eager and sdpa the indexer's choice, ``indices`` (batch, q_len, k) key indices per query,
    instead of folding it into the mask.  Fold it in as their eager path does."""
    drop = indices.new_ones((query.shape[0], query.shape[2], key.shape[2]), dtype=torch.bool)
    drop = drop.scatter(-1, indices.long(), False).unsqueeze(1)  # (batch, 1, q_len, kv_len), True: not chosen
    if mask is None:
        mask = torch.zeros((), dtype=query.dtype, device=query.device)
    if mask.dtype == torch.bool:
        return mask & ~drop
    return mask.masked_fill(drop, torch.finfo(query.dtype).min)  # (a PlannedMask: on its eager mask)


def fa_lite_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None,
                              sliding_window=None, softcap=None, is_causal=None, **kwargs):
    """transformers attention function for ``"fa_lite"``.

    query (batch, heads, q_len, head_dim), key/value (batch, kv_heads, kv_len, head_dim);
    returns ``(out (batch, q_len, heads, head_dim), None)``.  The band and padding come
    from the mask (see :class:`MaskPlan`); ``sliding_window`` and ``is_causal`` are what
    the mask already encodes and only serve when the mask is None.
    """
    softcap = float(softcap) if softcap else 0.0
    if isinstance(attention_mask, PlannedMask) and attention_mask._fa_written:
        attention_mask = attention_mask._fa_value  # written into: its eager mask is its meaning
    if kwargs.get("block_indices") is not None:
        raise NotImplementedError(f"{NAME}: block-sparse attention (block_indices) is not supported; the model leaves "
                                  "the selection out of the mask for backends other than eager/sdpa. Use "
                                  "attn_implementation='eager' or 'sdpa'.")
    indices = kwargs.pop("indices", None)
    if indices is not None:
        attention_mask = _fold_topk_indices(attention_mask, indices, query, key)
    args = (module, query, key, value, attention_mask, dropout, scaling, softcap, is_causal, kwargs)
    if kwargs.get("output_attentions"):
        _warn_once("output_attentions=True is not supported (no weights are returned)")
    if kwargs.get("position_bias") is not None:
        return _fallback("position_bias", *args)
    dim = query.shape[-1]
    if key.shape[-1] != dim:  # (value's head dim may differ: MLA)
        return _fallback("different query/key head dims", *args)
    if not 1 <= dim <= MAX_HEAD_DIM or not 1 <= value.shape[-1] <= MAX_HEAD_DIM:
        return _fallback(f"head dim {dim}, value head dim {value.shape[-1]} (supported: 1..{MAX_HEAD_DIM})", *args)
    if query.dtype not in SUPPORTED_DTYPES or not (query.dtype == key.dtype == value.dtype):
        return _fallback(f"dtypes {query.dtype}/{key.dtype}/{value.dtype}", *args)
    hq, hk = query.shape[1], key.shape[1]
    if hk == 0 or hq % hk:
        return _fallback(f"{hq} query heads over {hk} key/value heads", *args)
    scale = dim ** -0.5 if scaling is None else float(scaling)
    sink = kwargs.get("s_aux")  # attention sinks (gpt-oss & co): one zero-value logit per query head
    if sink is not None and not (isinstance(sink, torch.Tensor) and sink.is_floating_point()
                                 and tuple(sink.shape) == (hq,) and sink.device == query.device):
        return _fallback(f"attention sinks (s_aux) of shape {tuple(getattr(sink, 'shape', ()))}, not ({hq},)", *args)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)  # (B, S, H, D) views
    sq, sk = q.shape[1], k.shape[1]

    plan = getattr(attention_mask, _PLAN_ATTR, None) if attention_mask is not None else None
    if plan is not None:
        if (plan.batch_size, plan.q_length, plan.kv_length) != (q.shape[0], sq, sk):
            return _fallback(f"mask built for (batch, q, kv) = {(plan.batch_size, plan.q_length, plan.kv_length)} "
                             f"used with {(q.shape[0], sq, sk)}", *args)
        out = _run_plan(plan, q, k, v, scale, softcap, dropout, kwargs.get("position_ids"), sink)
        if out is None:
            return _fallback("softcap with a mask pattern only a dense mask describes", *args)
        return out, None
    if attention_mask is not None:
        if attention_mask.dim() == 4 and attention_mask.is_floating_point() and attention_mask.numel() > 1 \
                and not any(attention_mask.stride()) and bool(attention_mask.reshape(-1)[0].isnan()):
            # A PlannedMask's own storage (one NaN, broadcast), reached without the PlannedMask:
            # something read it bypassing torch's dispatch to tensor subclasses.  Refused.
            raise RuntimeError(
                f"{NAME}: the attention mask is the bare storage of a {NAME} mask, separated from its "
                "description by code that bypassed torch's tensor-subclass dispatch; it has no meaning as a "
                "mask. Use attn_implementation='sdpa' with this code.")
        # a mask this backend did not build, or one a model computed from ours (which then is the mask
        # eager attention would have got, transformed the same way): honour it as eager/sdpa would
        if attention_mask.dim() == 4 and (attention_mask.dtype == torch.bool or attention_mask.is_floating_point()) \
                and not softcap:
            out = scaled_dot_product_attention(query, key, value, attn_mask=attention_mask.to(query.device),
                                               dropout_p=dropout, scale=scale, enable_gqa=True, learnable_sink=sink)
            return out.transpose(1, 2), None
        return _fallback(f"a {attention_mask.dim()}-D {attention_mask.dtype} mask not built by {NAME}", *args)

    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    if causal and sq > 1 and sq != sk:
        return _fallback("no mask, causal, and q_len != kv_len (ambiguous alignment)", *args)
    window = (-1, -1)
    if sliding_window and causal:
        window = (int(sliding_window) - 1, -1)
    elif sliding_window:
        return _fallback("bidirectional sliding window without a mask", *args)
    out = flash_attn_func(q, k, v, causal=causal and sq > 1, window_size=window, softmax_scale=scale,
                          softcap=softcap, dropout_p=dropout, learnable_sink=sink)
    return out, None
