"""Context parallelism: exact attention over a sequence sharded across processes.

Every rank holds a shard of the sequence (``shard``).  ``ring_flash_attn_func`` keeps each
rank's queries where they are and brings every other rank's keys and values to them, one
peer per step; the partial results merge through their log-sum-exp, so the output equals
the matching slice of :func:`flashattn_lite.flash_attn_func` on the whole sequence.  The
kernels underneath are this package's, on whatever backend serves the tensors; the
transfers are ``torch.distributed`` point-to-point operations (gloo for CPU tensors,
NCCL for CUDA).

The schedule.  At step ``t`` (1..P-1) rank ``r`` sends its own K/V shard to rank
``r + t`` and receives rank ``r - t``'s (mod P), so every shard travels once to every
rank that needs it and never through a rank that does not.  Which rank needs which shard
follows from the layout alone (causal diagonal, window), so every rank knows, without
asking, which transfers and which tile products to skip; with a sliding window most of
the ring is skipped.  The next step's transfer is posted before the current step's
compute, so the two overlap.  Backward runs the same schedule and sends each shard's
key/value gradient contributions (float32) straight back to its owner, which sums them
in step order: the result is deterministic.

Layouts (``load_balance``).  ``"zigzag"`` cuts the sequence into 2P equal chunks and gives
rank r chunks r and 2P-1-r, so under a causal mask every rank has the same work; ``None``
gives rank r the r-th contiguous chunk.  Causal diagonals, windows and ALiBi distances are
those of the global positions.
"""

import dataclasses
import functools
import time

import torch

from . import backends, checks, ops
from .backends import Params, accum_dtype
from .planning import unbounded_if_beyond

LOAD_BALANCES = ("zigzag", None)

_NONE, _FULL, _PARTIAL = 0, 1, 2


def _dist():
    import torch.distributed as dist
    return dist


def _group_info(group, where):
    """(group, rank, world size) of ``group`` (None: the default group); a clear error
    when torch.distributed is not ready."""
    dist = _dist()
    if not dist.is_available():
        raise RuntimeError(f"flashattn_lite.distributed.{where}: this torch build has no torch.distributed")
    if not dist.is_initialized():
        raise RuntimeError(f"flashattn_lite.distributed.{where}: torch.distributed is not initialised; call "
                           "torch.distributed.init_process_group(...) first (gloo for CPU tensors, nccl for CUDA)")
    if group is None:
        group = dist.group.WORLD
    rank = dist.get_rank(group)
    if rank < 0:
        raise RuntimeError(f"flashattn_lite.distributed.{where}: this process is not a member of the given group")
    return group, rank, dist.get_world_size(group)


def _check_load_balance(load_balance, where):
    if load_balance not in LOAD_BALANCES:
        raise ValueError(f"flashattn_lite.distributed.{where}: load_balance must be 'zigzag' or None, got "
                         f"{load_balance!r}")


def chunks(rank, world, local_len, load_balance="zigzag"):
    """((local start, global start, length), ...) of the sequence chunks rank ``rank`` of
    ``world`` holds, in local order, for a shard of ``local_len`` positions."""
    if load_balance == "zigzag":
        c = local_len // 2
        return ((0, rank * c, c), (c, (2 * world - 1 - rank) * c, c))
    return ((0, rank * local_len, local_len),)


def _split_rule(length, world, load_balance, what):
    parts = 2 * world if load_balance == "zigzag" else world
    if length % parts:
        rule = (f"2 * world_size = {parts} chunks (zigzag: rank r holds chunks r and 2P-1-r)"
                if load_balance == "zigzag" else f"world_size = {parts} contiguous chunks")
        raise ValueError(f"flashattn_lite.distributed: {what} {length} cannot be cut into {rule}; pad the "
                         f"sequence to a multiple of {parts}")
    return length // world


def shard(x, group=None, dim=1, load_balance="zigzag"):
    """This rank's part of ``x``, a tensor holding the whole sequence along ``dim``
    (1 = flash-attn's (batch, seqlen, heads, headdim) layout).

    ``load_balance="zigzag"``: the sequence is cut into 2P chunks and rank r gets chunks r
    and 2P-1-r (a new tensor); ``None``: rank r gets the r-th of P contiguous chunks (a
    view).  The length must divide evenly; otherwise a ValueError names the rule.
    Differentiable (a gradient flows back into ``x``'s positions)."""
    _check_load_balance(load_balance, "shard")
    _, rank, world = _group_info(group, "shard")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"flashattn_lite.distributed.shard: x must be a torch.Tensor, got {type(x).__name__}")
    dim = _dim(x, dim, "shard")
    local = _split_rule(x.shape[dim], world, load_balance, f"sequence length (dim {dim})")
    parts = [x.narrow(dim, g, n) for _, g, n in chunks(rank, world, local, load_balance)]
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)


def unshard(x_local, group=None, dim=1, load_balance="zigzag"):
    """The whole sequence, on every rank, from each rank's ``x_local`` (the inverse of
    :func:`shard`).  Every rank must pass the same shape.  Not differentiable: it is a
    gather for inspection and losses, not part of the model's graph."""
    group, _, world = _group_info(group, "unshard")
    # the sizes padded to _MAX_DIMS, so that every rank gathers as many numbers
    failure, fields = None, {"ndim": 0, "dtype": 0, **{f"size[{i}]": -1 for i in range(_MAX_DIMS)}}
    try:  # this rank's own checks: a refusal still joins the cross-rank check (see _agree)
        _check_load_balance(load_balance, "unshard")
        if not isinstance(x_local, torch.Tensor):
            raise TypeError(f"flashattn_lite.distributed.unshard: x_local must be a torch.Tensor, got "
                            f"{type(x_local).__name__}")
        if x_local.dim() > _MAX_DIMS:
            raise ValueError(f"flashattn_lite.distributed.unshard: x_local has {x_local.dim()} dims, more than "
                             f"{_MAX_DIMS}")
        dim = _dim(x_local, dim, "unshard")
        if load_balance == "zigzag" and x_local.shape[dim] % 2:
            raise ValueError(f"flashattn_lite.distributed.unshard: a zigzag shard holds two equal chunks, but dim "
                             f"{dim} has odd length {x_local.shape[dim]}")
        fields.update({"ndim": x_local.dim(), "dtype": _DTYPE_CODES.get(x_local.dtype, -1),
                       **{f"size[{i}]": n for i, n in enumerate(x_local.shape)}})
    except (TypeError, ValueError) as e:
        failure = e
    device = x_local.device if isinstance(x_local, torch.Tensor) else torch.device("cpu")
    _agree(group, world, device, "unshard", fields, failure)
    gathered = [torch.empty_like(x_local, memory_format=torch.contiguous_format) for _ in range(world)]
    _dist().all_gather(gathered, x_local.detach().contiguous(), group=group)
    pieces = {}
    for r, part in enumerate(gathered):
        for lo, g, n in chunks(r, world, x_local.shape[dim], load_balance):
            pieces[g] = part.narrow(dim, lo, n)
    return torch.cat([pieces[g] for g in sorted(pieces)], dim)


def _dim(x, dim, where):
    if not isinstance(dim, int) or not -x.dim() <= dim < x.dim():
        raise ValueError(f"flashattn_lite.distributed.{where}: dim {dim!r} is out of range for a {x.dim()}-d tensor")
    return dim % x.dim()


_MAX_DIMS = 64  # the most dims unshard takes (it gathers a fixed count of sizes)
_DTYPE_CODES = {torch.float16: 1, torch.bfloat16: 2, torch.float32: 3, torch.float64: 4}


def _agree(group, world, device, where, fields, failure=None):
    """Every rank passed the same ``fields`` (names -> numbers): one small all_gather.  On a
    mismatch every rank raises the same error (they all see every rank's values).

    ``failure``: the exception this rank's own argument checks raised, or None.  Such a rank
    joins the gather anyway, with placeholder values (the names, and so the size of what is
    gathered, must be the same on every rank), so that it does not leave the others waiting
    in a collective until the group's timeout: it raises its own error, the others one that
    names it."""
    if world == 1:
        if failure is not None:
            raise failure
        return
    dist = _dist()
    names = list(fields)
    mine = torch.tensor([float(failure is not None)] + [float(fields[n]) for n in names], dtype=torch.float64)
    if dist.get_backend(group) == "nccl":
        mine = mine.to(device if device.type == "cuda" else torch.device("cuda", torch.cuda.current_device()))
    every = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(every, mine, group=group)
    rows = torch.stack(every).cpu()
    if failure is not None:
        raise failure
    refused = [r for r, x in enumerate(rows[:, 0].tolist()) if x]
    if refused:
        raise ValueError(f"flashattn_lite.distributed.{where}: rank {', '.join(map(str, refused))} refused its "
                         "arguments (the error is raised there), so every rank stops")
    for i, name in enumerate(names, start=1):
        column = rows[:, i].tolist()
        if any(x != column[0] for x in column):
            raise ValueError(f"flashattn_lite.distributed.{where}: ranks disagree on {name}: "
                             + ", ".join(f"rank {r}: {_show(x)}" for r, x in enumerate(column)))


def _show(x):
    return int(x) if float(x).is_integer() else x


def _visibility(m, n, off, left, right):
    """How a block of ``m`` queries sees ``n`` keys when query i sees key j iff
    ``i + off - left <= j <= i + off + right`` (a negative side is unbounded)."""
    if m == 0 or n == 0:
        return _NONE
    if right >= 0 and m - 1 + off + right < 0:
        return _NONE
    if left >= 0 and off - left > n - 1:
        return _NONE
    full = (right < 0 or off + right >= n - 1) and (left < 0 or m - 1 + off - left <= 0)
    return _FULL if full else _PARTIAL


@functools.lru_cache(maxsize=256)
def _plan(qchunks, kchunks, base_off, left, right, distance_matters):
    """Kernel calls ((q start, q len, k start, k len, diag offset), ...) that compute this
    rank's queries (``qchunks``) against one shard's keys (``kchunks``) exactly.

    A call over several chunks sees them at their local distances; it is used only where
    that gives every chunk pair the visibility (and, for ALiBi, the distance) of their
    global positions.  Tried in order: one call for everything, one call per query chunk,
    one call per chunk pair; pairs that see nothing are not computed."""
    def off(a, b):
        return base_off + a[1] - b[1]

    def call(qs, ks):
        a0, b0 = qs[0], ks[0]
        d = off(a0, b0)
        seen = False
        for a in qs:
            for b in ks:
                glob = off(a, b)
                local = d + (a[0] - a0[0]) - (b[0] - b0[0])
                kind = _visibility(a[2], b[2], glob, left, right)
                if kind != _visibility(a[2], b[2], local, left, right):
                    return None
                if kind == _PARTIAL or (kind == _FULL and distance_matters):
                    if local != glob:
                        return None
                seen = seen or kind != _NONE
        if not seen:
            return ()
        return ((a0[0], sum(a[2] for a in qs), b0[0], sum(b[2] for b in ks), d),)

    whole = call(qchunks, kchunks)
    if whole is not None:
        return whole
    calls = []
    for a in qchunks:
        row = call((a,), kchunks)
        if row is None:
            row = tuple(c for b in kchunks for c in call((a,), (b,)))
        calls.extend(row)
    return tuple(calls)


@dataclasses.dataclass(frozen=True)
class _Ring:
    """Everything one ring call decides before it moves a byte."""
    group: object
    rank: int
    world: int
    plans: tuple  # plans[s]: this rank's kernel calls against rank s's shard
    needed_by: tuple  # needed_by[s]: whether rank s has calls against this rank's shard
    peers: tuple  # global rank of each group rank

    def src(self, t):
        return (self.rank - t) % self.world

    def dst(self, t):
        return (self.rank + t) % self.world


def _schedule(group, rank, world, lq, lk, load_balance, left, right, distance_matters):
    base_off = world * lk - world * lq  # bottom-right alignment of the whole sequences
    kc = [chunks(s, world, lk, load_balance) for s in range(world)]
    qc = [chunks(s, world, lq, load_balance) for s in range(world)]
    plans = tuple(_plan(qc[rank], kc[s], base_off, left, right, distance_matters) for s in range(world))
    needed_by = tuple(bool(_plan(qc[s], kc[rank], base_off, left, right, distance_matters)) for s in range(world))
    dist = _dist()
    peers = tuple(dist.get_global_rank(group, s) if group is not dist.group.WORLD else s for s in range(world))
    return _Ring(group, rank, world, plans, needed_by, peers)


# What the last ring call on this process spent (``ring_stats``).
_stats = {}


def ring_stats():
    """Counters of the last :func:`ring_flash_attn_func` forward and backward on this
    process: seconds spent waiting for transfers (``fwd_wait_s``, ``bwd_wait_s``), bytes sent,
    kernel calls, and ring steps skipped because no local query sees that shard."""
    return dict(_stats)


def _unpack(buf, shapes):
    """Contiguous views of ``buf``, one per shape, one after the other."""
    out, at = [], 0
    for shape in shapes:
        n = _numel(shape)
        out.append(buf[at:at + n].view(shape))
        at += n
    return out


class _Transfers:
    """The point-to-point operations of one step, posted together (``batch_isend_irecv``, so
    NCCL sees them as one group) and waited for together."""

    def __init__(self, ring, sends, recvs):
        dist = _dist()
        ops_ = [dist.P2POp(dist.isend, t, ring.peers[peer], ring.group) for peer, t in sends]
        ops_ += [dist.P2POp(dist.irecv, t, ring.peers[peer], ring.group) for peer, t in recvs]
        self.works = dist.batch_isend_irecv(ops_) if ops_ else []
        self.sent = sum(t.numel() * t.element_size() for _, t in sends)

    def wait(self, stats, key):
        start = time.perf_counter()
        for w in self.works:
            w.wait()
        self.works = []
        stats[key] = stats.get(key, 0.0) + time.perf_counter() - start


def _kv_transfers(ring, t, own, shapes, dtype, device):
    """Step ``t``'s K/V transfers: (posted transfers, received (k, v) or None).  K and V go
    as two messages, so a contiguous shard is sent from where it is, without a copy."""
    if not 0 < t < ring.world:
        return None, None
    sends = [(ring.dst(t), x) for x in own()] if ring.needed_by[ring.dst(t)] else []
    kv = None
    if ring.plans[ring.src(t)]:
        kv = _unpack(torch.empty(sum(_numel(s) for s in shapes), dtype=dtype, device=device), shapes)
    return _Transfers(ring, sends, [(ring.src(t), x) for x in kv] if kv is not None else []), kv


def _numel(shape):
    n = 1
    for s in shape:
        n *= s
    return n


def _own_shard(k, v):
    """() -> (k, v) contiguous, made (once) only when some rank needs them."""
    made = []

    def own():
        if not made:
            made.append((k.contiguous(), v.contiguous()))
        return made[0]
    return own


class _Sum:
    """A running sum over slices of dim 1 in ``dtype``.  The first contribution that covers
    the whole tensor is kept as it is (no zeros, no add): with one kernel call per step,
    the common case, no buffer beyond the kernel's own output is made."""

    def __init__(self, shape, dtype, device):
        self.shape, self.dtype, self.device, self.t = shape, dtype, device, None

    def add(self, lo, n, x):
        if self.t is None and lo == 0 and n == self.shape[1]:
            self.t = x.to(self.dtype)
            return
        if self.t is None:
            self.t = torch.zeros(self.shape, dtype=self.dtype, device=self.device)
        self.t[:, lo:lo + n] += x

    def value(self):
        return self.t if self.t is not None else torch.zeros(self.shape, dtype=self.dtype, device=self.device)


class _Merged:
    """The running (out, lse) of one rank's rows, folded one kernel call at a time through
    the log-sum-exp (in the accumulation dtype).  Made at the first call: when that call
    covers every row, its own output is the running result (no zeros are written)."""

    def __init__(self, out_shape, lse_shape, dtype, device):
        self.out_shape, self.lse_shape, self.dtype, self.device = out_shape, lse_shape, dtype, device
        self.out = self.lse = None

    def add(self, qs, m, out, lse):
        if self.out is None:
            if qs == 0 and m == self.out_shape[1]:
                self.out, self.lse = out.to(self.dtype), lse.to(self.dtype)
                return
            self.out = torch.zeros(self.out_shape, dtype=self.dtype, device=self.device)
            self.lse = torch.full(self.lse_shape, float("-inf"), dtype=self.dtype, device=self.device)
        acc_o = self.out[:, qs:qs + m]
        acc_l = self.lse[:, :, qs:qs + m]
        lse = lse.to(self.dtype)
        new = torch.logaddexp(acc_l, lse)
        safe = new.masked_fill(new == float("-inf"), 0.0)  # rows no key reached yet stay 0
        acc_o.mul_(torch.exp(acc_l - safe).transpose(1, 2).unsqueeze(-1))
        acc_o.add_(out.to(self.dtype).mul_(torch.exp(lse - safe).transpose(1, 2).unsqueeze(-1)))
        acc_l.copy_(new)

    def result(self):
        """(out, lse); rows no call reached: out 0, lse -inf."""
        if self.out is None:
            self.out = torch.zeros(self.out_shape, dtype=self.dtype, device=self.device)
            self.lse = torch.full(self.lse_shape, float("-inf"), dtype=self.dtype, device=self.device)
        return self.out, self.lse


def _kv_at_step(ring, t, pending, stats, key):
    """The K/V shard of step ``t`` (0: this rank's own), or None when nothing here sees it."""
    if t == 0:
        return None
    transfers, kv = pending.pop(t)
    if kv is not None:
        transfers.wait(stats, key)
    return kv


class _RingAttention(torch.autograd.Function):

    @staticmethod
    def forward(ctx, q, k, v, ring, params, backend):
        stats = {"fwd_wait_s": 0.0, "fwd_bytes_sent": 0, "fwd_calls": 0,
                 "steps_skipped": sum(1 for s in range(ring.world) if not ring.plans[s])}
        acc = accum_dtype(q.dtype)
        b, lq, h = q.shape[:3]
        merged = _Merged((b, lq, h, v.shape[-1]), (b, h, lq), acc, q.device)
        shapes = (k.shape, v.shape)
        own = _own_shard(k, v)
        pending, posted = {}, []  # step t + 1's transfers are posted before step t's compute
        for t in range(ring.world):
            pending[t + 1] = _kv_transfers(ring, t + 1, own, shapes, k.dtype, k.device)
            posted.append(pending[t + 1][0])
            kt, vt = _kv_at_step(ring, t, pending, stats, "fwd_wait_s") or (k, v)
            for qs, m, ks, n, off in ring.plans[ring.src(t)]:
                p = dataclasses.replace(params, diag_offset=off)
                out, lse = ops.run_fwd(q[:, qs:qs + m], kt[:, ks:ks + n], vt[:, ks:ks + n], p, backend)
                merged.add(qs, m, out, lse)
                stats["fwd_calls"] += 1
        for transfers in posted:
            if transfers is not None:
                stats["fwd_bytes_sent"] += transfers.sent
                transfers.wait(stats, "fwd_wait_s")
        _stats.clear()
        _stats.update(stats)
        out, lse = merged.result()
        out = out.to(q.dtype)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.ring, ctx.params, ctx.backend = ring, params, backend
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        ring, params, backend = ctx.ring, ctx.params, ctx.backend
        stats = {"bwd_wait_s": 0.0, "bwd_bytes_sent": 0, "bwd_calls": 0}
        acc = accum_dtype(q.dtype)
        if dout is None:
            dout = torch.zeros_like(out)
        dout = dout.contiguous()
        dlse = None if dlse is None else dlse.contiguous()
        dq = _Sum(q.shape, acc, q.device)
        dk_own, dv_own = _Sum(k.shape, acc, k.device), _Sum(v.shape, acc, v.device)
        shapes = (k.shape, v.shape)
        own = _own_shard(k, v)
        lse_rows = {}

        def rows(qs, m):
            if (qs, m) not in lse_rows:
                lse_rows[qs, m] = (lse[:, :, qs:qs + m].contiguous(),
                                   None if dlse is None else dlse[:, :, qs:qs + m].contiguous())
            return lse_rows[qs, m]

        pending, posted = {}, []  # step t + 1's transfers are posted before step t's compute
        grads_back = []  # each step's gradient returns: (transfers, received (dk, dv) or None)
        for t in range(ring.world):
            pending[t + 1] = _kv_transfers(ring, t + 1, own, shapes, k.dtype, k.device)
            posted.append(pending[t + 1][0])
            src = ring.src(t)
            kt, vt = _kv_at_step(ring, t, pending, stats, "bwd_wait_s") or (k, v)
            dkt, dvt = (dk_own, dv_own) if t == 0 else (_Sum(k.shape, acc, k.device), _Sum(v.shape, acc, v.device))
            for qs, m, ks, n, off in ring.plans[src]:
                p = dataclasses.replace(params, diag_offset=off)
                lse_m, dlse_m = rows(qs, m)
                with checks.trusted():
                    g = torch.ops.flashattn_lite.bwd(
                        dout[:, qs:qs + m], dlse_m, q[:, qs:qs + m], kt[:, ks:ks + n], vt[:, ks:ks + n],
                        out[:, qs:qs + m], lse_m, *p.op_args(), False, True, backend)
                dq.add(qs, m, g[0])
                dkt.add(ks, n, g[1])
                dvt.add(ks, n, g[2])
                stats["bwd_calls"] += 1
            if t > 0:
                # this step's contribution to rank src's dK/dV goes home (in the accumulation
                # dtype); our own shard's contribution from rank dst arrives
                sends = [(src, x.value().contiguous()) for x in (dkt, dvt)] if ring.plans[src] else []
                back = None
                if ring.needed_by[ring.dst(t)]:
                    back = _unpack(torch.empty(sum(_numel(x) for x in shapes), dtype=acc, device=k.device), shapes)
                grads_back.append((_Transfers(ring, sends, [(ring.dst(t), x) for x in back or ()]), back))
                if len(grads_back) > 1:  # at most two gradient returns in flight
                    _fold_back(grads_back.pop(0), dk_own, dv_own, stats)
        while grads_back:
            _fold_back(grads_back.pop(0), dk_own, dv_own, stats)
        for transfers in posted:
            if transfers is not None:
                stats["bwd_bytes_sent"] += transfers.sent
                transfers.wait(stats, "bwd_wait_s")
        _stats.update(stats)
        return (dq.value().to(q.dtype), dk_own.value().to(k.dtype), dv_own.value().to(v.dtype), None, None, None)


def _fold_back(item, dk_own, dv_own, stats):
    transfers, back = item
    stats["bwd_bytes_sent"] += transfers.sent
    transfers.wait(stats, "bwd_wait_s")
    if back is not None:
        dk_own.add(0, back[0].shape[1], back[0])
        dv_own.add(0, back[1].shape[1], back[1])


_RING_FIELDS = ("batch", "local seqlen_q", "heads", "headdim", "local seqlen_k", "kv heads", "value headdim", "dtype",
                "device type", "causal", "window left", "window right", "softcap", "softmax_scale", "alibi",
                "load_balance")


def ring_flash_attn_func(q, k, v, group=None, causal=False, softmax_scale=None, window_size=(-1, -1), softcap=0.0,
                         alibi_slopes=None, load_balance="zigzag", return_lse=False, dropout_p=0.0):
    """Exact attention over a sequence sharded across the ranks of ``group``.

    Args:
        q: this rank's query shard, (batch, seqlen_q / P, nheads, headdim), as :func:`shard`
            cuts it with the same ``load_balance``.
        k, v: this rank's key/value shards, (batch, seqlen_k / P, nheads_k, headdim[_v]);
            GQA/MQA and a value head dim of its own (MLA) as in :func:`flash_attn_func`.
        group: the process group (None: the default one).  Every rank of it calls this
            function with the same shapes and arguments; this is checked (one small gather).
        causal, softmax_scale, window_size, softcap, alibi_slopes: as in
            :func:`flashattn_lite.flash_attn_func`, on the global positions of the whole
            sequences (causal aligned bottom-right when seqlen_q != seqlen_k).
        load_balance: ``"zigzag"`` or None, the layout the shards were cut with.
        return_lse: also return the local rows' ``softmax_lse`` (batch, nheads, seqlen_q / P).
        dropout_p: must be 0; dropout is refused (its random mask is keyed by positions
            within one kernel call, so a sharded call could not reproduce the unsharded one).

    Returns this rank's rows of ``flash_attn_func(full q, full k, full v, ...)``: ``out``, or
    ``(out, lse)``.  Differentiable: dq stays on this rank, dk/dv contributions travel back to
    the rank that owns the shard.
    """
    group, rank, world = _group_info(group, "ring_flash_attn_func")
    failure, fields = None, dict.fromkeys(_RING_FIELDS, 0)
    try:  # this rank's own checks: a refusal still joins the cross-rank check (see _agree)
        _check_load_balance(load_balance, "ring_flash_attn_func")
        if dropout_p != 0:
            raise NotImplementedError(
                "flashattn_lite.distributed.ring_flash_attn_func: dropout is not supported; its random mask is keyed "
                "by a position within one kernel call, so a sharded sequence would not drop what the unsharded call "
                "drops")
        for name, t in (("q", q), ("k", k), ("v", v)):
            checks.check_tensor(name, t, 4, "(batch, seqlen / world_size, heads, headdim)")
        softcap = checks.check_softcap(softcap)
        slopes = checks.check_alibi(alibi_slopes, q.shape[0], q.shape[2], q.device)
        scale = q.shape[-1] ** -0.5 if softmax_scale is None else checks.check_scale(softmax_scale, "softmax_scale")
        checks.check_scale_over_softcap(scale, softcap)
        left, right = checks.check_window(window_size)
        if causal:
            right = 0
        lq, lk = q.shape[1], k.shape[1]
        left, right = unbounded_if_beyond(left, right, world * lq, world * lk)
        params = Params(softmax_scale=scale, window_left=left, window_right=right, softcap=softcap,
                        alibi_slopes=slopes)
        checks.check_fwd(q, k, v, params, op="ring_flash_attn_func")
        if load_balance == "zigzag":
            for name, n in (("q", lq), ("k/v", lk)):
                if n % 2:
                    raise ValueError(f"flashattn_lite.distributed.ring_flash_attn_func: a zigzag shard holds two "
                                     f"equal chunks, but {name} has an odd local length {n}; shard() the full "
                                     "sequence")
        fields = dict(zip(_RING_FIELDS, (
            q.shape[0], lq, q.shape[2], q.shape[3], lk, k.shape[2], v.shape[3], _DTYPE_CODES.get(q.dtype, -1),
            0 if q.device.type == "cpu" else 1, bool(causal), left, right, softcap, scale, slopes is not None,
            LOAD_BALANCES.index(load_balance))))
    except (TypeError, ValueError, NotImplementedError) as e:
        failure = e
    device = q.device if isinstance(q, torch.Tensor) else torch.device("cpu")
    _agree(group, world, device, "ring_flash_attn_func", fields, failure)
    if slopes is not None:  # (every rank has them, of one shape: agreed above)
        _agree(group, world, q.device, "ring_flash_attn_func",
               {f"alibi_slopes[{b}, {h}]": x for b, row in enumerate(slopes.tolist()) for h, x in enumerate(row)})
    ring = _schedule(group, rank, world, lq, lk, load_balance, left, right, slopes is not None)
    features = set(params.features())
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v)):
        features.add("backward")
    backend = backends.select_backend(q.device, q.dtype, int(q.shape[-1]), frozenset(features),
                                      None if v.shape[-1] == q.shape[-1] else int(v.shape[-1]))
    q, k, v = (t if t.shape[-1] <= 1 or t.stride(-1) == 1 else t.contiguous() for t in (q, k, v))
    out, lse = _RingAttention.apply(q, k, v, ring, params, backend)
    return (out, lse) if return_lse else out


__all__ = ["shard", "unshard", "ring_flash_attn_func", "ring_stats", "chunks", "LOAD_BALANCES"]
