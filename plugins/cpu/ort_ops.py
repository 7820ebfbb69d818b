"""The CPU kernels as ONNX Runtime custom ops (onnxruntime-extensions Python ops), one per jamba op:
`jamba::<SPEC.onnx_op_type>`, inputs in SPEC.inputs order, float32 activations; the op bodies are
those plugins/cpu/<op>.py registers for target "ort" (plugins/registry.py).

    so = onnxruntime.SessionOptions()
    so.register_custom_ops_library(custom_ops_library())
    # ORT's idle pool threads spin by default and then starve the kernels' own (numba/torch) threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    outputs = run_checked(onnxruntime.InferenceSession(path, so), None, feeds)

Every input is required (these Python ops cannot take an absent optional input), so graphs pass:
- SelectiveScan: z and delta_bias always; state always (zeros [B,D,N] when there is none);
- CausalConv1d: state always (zeros [B,D,K-1]);
- MoEInt8: w13, w2 as int8; attributes top_k, expert_offset (int64);
- Attention: past_k, past_v always, [B,0,Hkv,d] when empty.

Errors. A Python exception escaping into ONNX Runtime terminates the process, so every op catches
everything: it appends "<op>: <error>" to `ERRORS`, returns NaN outputs of the expected shapes
(zero-size ones if even the shapes cannot be derived), so nothing downstream looks valid, and the
session run completes. The caller then raises: `run_checked` (or `raise_pending_errors()` after
its own `session.run`) raises `OrtKernelError` listing every recorded error.

Outputs. onnxruntime-extensions hands outputs back to C++ as Python lists (`flatten().tolist()`:
45-120 ns per element measured, bench/kernels.json). Its C++ side accepts any array (it casts the
object to `py::array`, then memcpy), so `custom_ops_library()` installs an invoker that returns
C-contiguous arrays instead: ~1-2 ns per element.

Expert weights. The C++ side copies every input into a fresh numpy array on every call, weights
included: 3 MB per MoE call on the small preset, gigabytes for real experts. `map_expert_weights`
therefore rebinds a session's MoEInt8 nodes to `MoEInt8Mapped(x, router_logits; top_k,
expert_offset, weights=<key>)` (engines/ort.py), whose weights are mapped once from the engine's
data file (np.memmap) and looked up here by key; ONNX Runtime then never loads them either. The engine file on disk keeps the
plain MoEInt8 nodes (Polygraphy and any other reader see the ONNX contract).

KV cache. The C++ side also copies every input into a fresh numpy array for the call, so the
attention op grows past_k/past_v in place into present_k/present_v (realloc, no copy of the cache;
`attention(..., scratch_inputs=True)`), and `custom_ops_library()` sets glibc's malloc so that those
KV-sized blocks are not returned to the kernel and faulted in again every step (`tune_malloc`)."""

from __future__ import annotations

import ctypes
import sys

import numpy as np

from jambatrt.errors import JambaTRTError
from jambatrt.export.ops import ACTIVATION, DOMAIN, SPECS

ERRORS: list[str] = []
MAPPED_WEIGHTS: dict[str, tuple] = {}   # key -> (w13, w13_scale, w2, w2_scale) or (w, scale), see engines/ort.py
MAPPED_OP = "MoEInt8Mapped"
LINEAR_INT8_OP = "LinearInt8"           # graph/passes/lower_linear_int8.py (--weights-int8)
LINEAR_INT8_MAPPED_OP = "LinearInt8Mapped"
CACHED_ATTENTION_OP = "CausalAttentionCached"
KV_CACHES: dict[str, "KVCache"] = {}   # key -> the KV cache one session's attention layer appends to


class KVCache:
    """Preallocated, in-place KV cache of one attention layer (engines/ort.py `map_kv_caches`):
    k, v [B, capacity, Hkv, d] float32 buffers whose first `length` positions hold the past. The
    engine sizes them before a run; the op appends the step's keys and values and attends over
    the first length + L positions, so no step copies the cache (ONNX Runtime never sees it)."""

    def __init__(self):
        self.k = self.v = None
        self.length = 0
        self.views = (None, None)       # the (k, v) state arrays the engine last handed out

    def reset(self, past_k: np.ndarray, past_v: np.ndarray, need: int) -> None:
        B, P, Hkv, d = past_k.shape
        cap = max(need, 2 * P, 256)
        k, v = np.empty((B, cap, Hkv, d), np.float32), np.empty((B, cap, Hkv, d), np.float32)
        k[:, :P], v[:, :P] = past_k, past_v
        self.k, self.v, self.length = k, v, P

    def reserve(self, need: int) -> None:
        """Room for `need` positions; grows by doubling (amortised O(1) copies per token)."""
        if need > self.k.shape[1]:
            B, _, Hkv, d = self.k.shape
            P, cap = self.length, max(need, 2 * self.k.shape[1])
            k, v = np.empty((B, cap, Hkv, d), np.float32), np.empty((B, cap, Hkv, d), np.float32)
            k[:, :P], v[:, :P] = self.k[:, :P], self.v[:, :P]
            self.k, self.v = k, v
_declared = False
_malloc_tuned = False


class OrtKernelError(JambaTRTError):
    """A jamba custom op failed inside an ONNX Runtime session run; lists every failure."""

    exit_code = 1


def take_errors() -> list[str]:
    """The errors recorded since the last call (and forget them)."""
    errors = ERRORS[:]
    del ERRORS[:]
    return errors


def raise_pending_errors() -> None:
    errors = take_errors()
    if errors:
        raise OrtKernelError("jamba custom op failed inside ONNX Runtime:\n  " + "\n  ".join(errors))




def run_checked(session, output_names, feeds: dict) -> list:
    """session.run, then raise OrtKernelError if any jamba op failed during it."""
    take_errors()                      # stale errors belong to an earlier, already-reported run
    outputs = session.run(output_names, feeds)
    raise_pending_errors()
    return outputs


def _guarded(name: str, out_shapes):
    """Wrap the body of op `name` so that no exception reaches ONNX Runtime (see the module
    docstring). out_shapes(*inputs) -> the shapes of its float32 outputs, for the NaN outputs.
    `name`: a jamba op, or the ONNX op type of a lowering target with one output (LinearInt8)."""
    op_type, n_out = (SPECS[name].onnx_op_type, len(SPECS[name].outputs)) if name in SPECS else (name, 1)

    def wrap(body):
        def op(*inputs, **attrs):
            try:
                return body(*inputs, **attrs)
            except BaseException as exc:         # noqa: BLE001 -- anything escaping kills the process
                ERRORS.append(f"{DOMAIN}::{op_type}: {type(exc).__name__}: {exc}")
                try:
                    shapes = out_shapes(*inputs)
                except BaseException:            # noqa: BLE001
                    shapes = [(0,)] * n_out
                return tuple(np.full(s, np.nan, np.float32) for s in shapes)
        op.__name__ = body.__name__
        return op
    return wrap


def _invoke(op_id, feed, attributes):
    """Replacement for onnxruntime_extensions._ocos._on_pyop_invocation (same protocol: op id, then
    shape and data per output) that returns contiguous arrays instead of Python lists."""
    from onnxruntime_extensions import Opdef
    op = Opdef._odlist[op_id]
    result = op.body(*feed, **op.cast_attributes(attributes))
    reply = [op_id]
    for r in result if isinstance(result, tuple) else (result,):
        r = np.asarray(r)
        reply.append(r.shape)
        # strings still go as lists: the C++ side converts them to std::vector<std::string>
        reply.append(r.ravel().tolist() if r.dtype.kind in "OSU" else np.ascontiguousarray(r).reshape(-1))
    return tuple(reply)


def _declare() -> None:
    """Declare every op's registered ONNX Runtime body (plugins/registry.py, target "ort") as
    `jamba::<SPEC.onnx_op_type>`: input/output types and attributes from its SPEC. Then the forms
    only the ONNX Runtime engine's session graphs and lowering have (not exported ops, so not in
    the registry yet): MoEInt8Mapped, CausalAttentionCached, LinearInt8 and LinearInt8Mapped."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from jambatrt.plugins.cpu.attention import attention_cached
    from jambatrt.plugins.cpu.linear_int8 import linear_int8
    from jambatrt.plugins.cpu.moe_int8 import moe_int8
    from jambatrt.plugins.registry import implementations

    F, I8, I64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int64
    types = {ACTIVATION: F, "float32": F, "int8": I8}     # float32 activations on ONNX Runtime's CPU provider
    attr_types = {int: I64, float: F}
    for name, (impl, *_) in implementations("ort").items():
        spec = SPECS[name]
        onnx_op(op_type=f"{DOMAIN}::{spec.onnx_op_type}", inputs=[types[t] for t in spec.input_types],
                outputs=[types[t] for t in spec.output_types],
                attrs={a: attr_types[t] for a, t in spec.attributes.items()}
                )(_guarded(name, impl.extra["out_shapes"])(impl.fn))

    @onnx_op(op_type=f"{DOMAIN}::{MAPPED_OP}", inputs=[F, F], outputs=[F],
             attrs={"top_k": I64, "expert_offset": I64, "weights": PyCustomOpDef.dt_string})
    @_guarded("moe_int8", lambda x, *_: [x.shape])
    def moe_int8_mapped_op(x, router_logits, top_k, expert_offset, weights):
        try:
            w13, w13_scale, w2, w2_scale = MAPPED_WEIGHTS[weights]
        except KeyError:
            raise KeyError(f"expert weights {weights!r} are not mapped in this process (sessions of "
                           "MoEInt8Mapped graphs come from engines/ort.py map_expert_weights)") from None
        return moe_int8(x, router_logits, w13, w13_scale, w2, w2_scale, int(top_k), int(expert_offset))

    @onnx_op(op_type=f"{DOMAIN}::{CACHED_ATTENTION_OP}", inputs=[F, F, F], outputs=[F],
             attrs={"cache": PyCustomOpDef.dt_string})
    @_guarded(CACHED_ATTENTION_OP, lambda q, *_: [q.shape])
    def attention_cached_op(q, k, v, cache):
        c = KV_CACHES[cache]
        P, L = c.length, k.shape[1]
        if c.k is None or P + L > c.k.shape[1] or k.shape[0] != c.k.shape[0]:
            raise ValueError(f"KV cache {cache!r} holds {P} of {0 if c.k is None else c.k.shape[1]} positions for "
                             f"batch {None if c.k is None else c.k.shape[0]}; the step brings {L} for batch "
                             f"{k.shape[0]} (the engine reserves room before every run)")
        c.k[:, P:P + L], c.v[:, P:P + L] = k, v
        o = attention_cached(q, c.k[:, :P + L], c.v[:, :P + L], P)
        c.length = P + L
        return o

    def linear_shape(x, w, *_):
        return [(*x.shape[:-1], w.shape[0])]

    @onnx_op(op_type=f"{DOMAIN}::{LINEAR_INT8_OP}", inputs=[F, I8, F], outputs=[F])
    @_guarded(LINEAR_INT8_OP, linear_shape)
    def linear_int8_op(x, w, scale):
        return linear_int8(x, w, scale)

    @onnx_op(op_type=f"{DOMAIN}::{LINEAR_INT8_MAPPED_OP}", inputs=[F], outputs=[F],
             attrs={"weights": PyCustomOpDef.dt_string})
    @_guarded(LINEAR_INT8_MAPPED_OP, lambda x, *_: [(*x.shape[:-1], 0)])
    def linear_int8_mapped_op(x, weights):
        try:
            w, scale = MAPPED_WEIGHTS[weights]
        except KeyError:
            raise KeyError(f"linear weights {weights!r} are not mapped in this process (sessions of "
                           "LinearInt8Mapped graphs come from engines/ort.py map_weights)") from None
        return linear_int8(x, w, scale)


def unmap_expert_weights(keys) -> None:
    for k in keys:
        MAPPED_WEIGHTS.pop(k, None)


def tune_malloc() -> bool:
    """glibc only, once per process: blocks under 32 MiB come from the heap, and freed heap memory
    stays mapped (up to 256 MiB at the top), instead of glibc's dynamic defaults. Returns whether
    the settings are in force.

    Why: each decode step allocates and frees KV-sized arrays (the C++ side copies every input into
    a fresh numpy array; the attention op grows past into present with realloc). With the defaults
    glibc raises its mmap threshold to the size of the last freed block and trims the heap top past
    twice that, so at 4-32 MiB per array (16K-128K tokens of the bench preset) the heap is returned
    and re-faulted every step and realloc moves blocks into fresh pages: at 64K past, decode took
    20 ms/token with the old kernel and 40 with the in-place growth, 14 with this (bench preset, 2
    cores). 32 MiB is glibc's largest mmap threshold: bigger blocks stay mmapped (realloc = mremap,
    no copy). Prefill time is unchanged (32K tokens)."""
    global _malloc_tuned
    if _malloc_tuned or not sys.platform.startswith("linux"):
        return _malloc_tuned
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc, not musl (whose mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, 256 << 20))
    return _malloc_tuned


def custom_ops_library(fast_outputs: bool = True) -> str:
    """Declare the jamba ops (once per process) and return the path to pass to
    `SessionOptions.register_custom_ops_library`. fast_outputs: return outputs to ONNX Runtime as
    arrays (one memcpy) rather than onnxruntime-extensions' Python lists; this applies to every
    Python custom op in the process and leaves their results unchanged. Also applies
    `tune_malloc()` (process-wide glibc malloc settings) for the KV-sized arrays of decode."""
    global _declared
    from onnxruntime_extensions import PyCustomOpDef, get_library_path
    from onnxruntime_extensions._ocos import _on_pyop_invocation
    if not _declared:
        _declare()
        _declared = True
    tune_malloc()
    PyCustomOpDef.install_hooker(_invoke if fast_outputs else _on_pyop_invocation)
    return get_library_path()
