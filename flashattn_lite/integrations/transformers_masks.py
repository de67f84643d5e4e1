"""The mask side of the Hugging Face transformers backend ``"fa_lite"``
(:mod:`flashattn_lite.integrations.transformers` tells the whole story).

:func:`fa_lite_mask` is the function transformers calls wherever a model builds its
attention mask: it recognises the pattern (causal, bidirectional, sliding window, packed
sequences) and returns a :class:`PlannedMask`, which looks like the mask eager attention
would get and carries a compact :class:`MaskPlan`.  The attention function reads a mask
only through :func:`plan_of`, :func:`written_mask` and :func:`eager_mask`.
"""

import torch

PLAN_ATTR = "_flashattn_lite_plan"


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
        self.run_layout = None  # ((sq, sk), how to run it): the attention function's cache, for every layer

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
        setattr(carrier, PLAN_ATTR, plan)
        carrier._fa_value = None  # the eager mask, once some operation needed it
        carrier._fa_written = False  # whether _fa_value may differ from the plan (written, or a view handed out)
        return carrier

    def _eager_value(self):
        if self._fa_value is None:
            self._fa_value = getattr(self, PLAN_ATTR).additive(self.dtype)
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
            return PlannedMask._make(getattr(self, PLAN_ATTR), self.dtype, self.device)
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


def plan_of(mask):
    """The :class:`MaskPlan` a mask made by :func:`fa_lite_mask` carries (also after a no-op
    index or ``.clone()``), else None."""
    return getattr(mask, PLAN_ATTR, None) if mask is not None else None


def written_mask(mask):
    """The eager mask a :class:`PlannedMask` has been written into (which from then on is its
    meaning; its plan no longer is), else None."""
    if isinstance(mask, PlannedMask) and mask._fa_written:
        return mask._fa_value
    return None


def eager_mask(mask):
    """The exact mask eager attention would get for a :class:`PlannedMask` (0 where a key may
    be attended, the dtype's minimum elsewhere), built when first needed."""
    return mask._eager_value()
