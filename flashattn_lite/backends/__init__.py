"""Backend registry: names, capability checks, and the choice of backend.

Every backend module exposes ``NAME``, ``FEATURES``, ``available() -> (bool, reason)``,
``supports(call) -> None | reason``, ``fwd(q, k, v, params) -> (out, lse)`` and
``bwd(dout, dlse, q, k, v, out, lse, params, bias_grad, deterministic) -> (dq, dk, dv, dbias)``
with :class:`Params` describing everything but the tensors.
"""

import contextlib
import contextvars
from . import cpu, cuda, cuda_emu, reference, triton
from .base import OP_FIELDS, Call, Params, accum_dtype, getenv, missing_features  # noqa: F401  (re-exported)

BACKENDS = {m.NAME: m for m in (triton, cuda, cpu, reference, cuda_emu)}  # cuda_emu: verification only, never auto
NAMES = ("auto",) + tuple(BACKENDS)
ENV_VAR = "FLASHATTN_LITE_BACKEND"

# auto's order of preference per device type; reference is always last.
_AUTO_ORDER = {"cuda": ("triton", "reference"), "cpu": ("cpu", "reference")}

_current = contextvars.ContextVar("flashattn_lite_backend", default=None)


def _check_name(name):
    if not isinstance(name, str) or name not in NAMES:
        raise ValueError(f"unknown flashattn_lite backend {name!r}; choose one of {', '.join(NAMES)}")
    return name


@contextlib.contextmanager
def use_backend(name):
    """Force a backend inside a ``with`` block ("auto" restores the automatic choice).

    An explicitly chosen backend that cannot serve a call raises with the reason;
    it never hands the call to another backend.
    """
    token = _current.set(_check_name(name))
    try:
        yield
    finally:
        _current.reset(token)


def requested_backend():
    """The backend asked for: ``use_backend`` first, then $FLASHATTN_LITE_BACKEND, then auto."""
    name = _current.get()
    if name is None:
        env = getenv(ENV_VAR, "").strip()
        if env:
            if env not in NAMES:
                raise ValueError(f"{ENV_VAR}={env!r} is not a flashattn_lite backend; "
                                 f"choose one of {', '.join(NAMES)}")
            name = env
        else:
            name = "auto"
    return name


# Everything the API names; the ones no backend lists yet raise NotImplementedError.
ALL_FEATURES = ("forward", "backward", "causal", "window", "gqa", "fp16", "bf16", "fp32", "fp64", "dropout",
                "softcap", "alibi", "attn_mask", "varlen", "kv-cache", "kv-quant")


def feature_table():
    """{feature: {backend: bool}} as ``flashattn-lite info`` prints it."""
    return {f: {name: f in mod.FEATURES for name, mod in BACKENDS.items()} for f in ALL_FEATURES}


def available_backends():
    """{name: (usable here, why or why not)} for every concrete backend."""
    return {name: tuple(mod.available()) for name, mod in BACKENDS.items()}


def supports(name, call):
    """None if backend ``name`` can serve ``call``, else the reason."""
    return BACKENDS[name].supports(call)


def select(call):
    """Name of the backend that will serve ``call``; raises if none can."""
    name = requested_backend()
    if name != "auto":
        why = supports(name, call)
        if why is not None:
            raise RuntimeError(f"flashattn_lite backend {name!r} cannot run this call: {why}")
        return name
    reasons = []
    for candidate in _AUTO_ORDER.get(call.device.type, ("reference",)):
        why = supports(candidate, call)
        if why is None:
            if candidate == "reference" and call.device.type == "cpu" and reasons:
                cpu.warn_fallback_once(reasons[0], built=cpu.available()[0])
            return candidate
        reasons.append(f"{candidate}: {why}")
    raise RuntimeError("no flashattn_lite backend can run this call (" + "; ".join(reasons) + ")")


def select_backend(device, dtype, head_dim, features=frozenset(), head_dim_v=None):
    """:func:`select` for a call described by its parts (what the public functions know)."""
    return select(Call(device=device, dtype=dtype, head_dim=head_dim, features=features, head_dim_v=head_dim_v))


# Under torch.compile the backend choice is made once, at trace time, and baked into
# the graph.  This attribute is all ``torch.compiler.assume_constant_result`` sets; it is
# set directly because calling that function imports torch._dynamo (about 2 s, and it
# imports Triton before a CLI can switch on TRITON_INTERPRET).
# tests/test_ops.py::test_torch_compile_fullgraph_matches_eager guards the mechanism.
select_backend._dynamo_marked_constant = True


def get(name):
    return BACKENDS[_check_name(name)]
