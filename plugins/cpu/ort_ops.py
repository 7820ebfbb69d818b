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

Session ops (plugins/registry.py `session_op`): the ORT engine's own forms, declared here with
the jamba ops. A Python op sees only its inputs and attributes, so what a session keeps outside its
graph -- expert and linear weights mapped once from the store (onnxruntime-extensions' C++ side
would copy every input, weights included, on every call: gigabytes for real experts), the
in-place KV caches -- reaches the op through `bind(obj) -> key` here: the engine binds it when it
makes the session (engines/ort.py, graph/passes/bind_weights.py and bind_kv_caches.py), the node
carries the key as an attribute, the op body finds it with `bound(key)`, and the engine releases
it with the session. The kernels themselves take plain arrays and keep nothing.

KV cache. The attention op grows past_k/past_v in place into present_k/present_v (realloc, no copy
of the cache; `attention(..., scratch_inputs=True)`) when the cache is an input, and
`custom_ops_library()` sets glibc's malloc so that those KV-sized blocks are not returned to the
kernel and faulted in again every step (`tune_malloc`)."""

from __future__ import annotations

import ctypes
import functools
import sys
import uuid

import numpy as np

from jambatrt.errors import JambaTRTError
from jambatrt.export.ops import ACTIVATION, DOMAIN, SPECS

ERRORS: list[str] = []
_BOUND: dict[str, object] = {}          # key -> what an engine's session keeps outside its graph
_declared = False
_malloc_tuned = False


def bind(obj, name: str) -> str:
    """Keep `obj` for a session in this process; returns the key its nodes carry."""
    key = f"{uuid.uuid4().hex}/{name}"
    _BOUND[key] = obj
    return key


def bound(key: str):
    """What `bind` kept under `key`; KeyError naming the key when it was released or never bound."""
    try:
        return _BOUND[key]
    except KeyError:
        raise KeyError(f"{key!r} is not bound in this process (sessions of the ORT engine's own forms are made by "
                       "engines/ort.py, which binds their weights and caches)") from None


class Weights(tuple):
    """The arrays an engine binds for one node (graph/passes/bind_weights.py), with the precision its
    kernels run their GEMMs in (`compute`: linear_int8.COMPUTES, the engine's `prefill_compute`)."""

    def __new__(cls, arrays, compute: str = "float32"):
        self = super().__new__(cls, arrays)
        self.compute = compute
        return self


def bound_weights(key: str) -> tuple[tuple, str]:
    """The arrays bound under `key` and the precision of their GEMMs (float32 for a plain tuple)."""
    b = bound(key)
    return b, getattr(b, "compute", "float32")


def release(keys) -> None:
    for k in keys:
        _BOUND.pop(k, None)


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




def run_checked(session, output_names, feeds: dict, run_options=None) -> list:
    """session.run, then raise OrtKernelError if any jamba op failed during it."""
    take_errors()                      # stale errors belong to an earlier, already-reported run
    outputs = session.run(output_names, feeds, run_options)
    raise_pending_errors()
    return outputs


def _guarded(op_type: str, n_out: int, out_shapes):
    """Wrap the body of op `jamba::<op_type>` (n_out outputs) so that no exception reaches ONNX
    Runtime (see the module docstring). out_shapes(*inputs) -> the shapes of its float32 outputs,
    for the NaN outputs."""
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
    `jamba::<SPEC.onnx_op_type>` with the types and attributes of its SPEC, and every session op
    with its own."""
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from jambatrt.plugins.registry import implementations, session_ops

    F, I8, I64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int8, PyCustomOpDef.dt_int64
    types = {ACTIVATION: F, "float32": F, "int8": I8}     # float32 activations on ONNX Runtime's CPU provider
    attr_types = {int: I64, float: F, str: PyCustomOpDef.dt_string}
    ops = [(SPECS[name].onnx_op_type, SPECS[name].input_types, SPECS[name].output_types, SPECS[name].attributes,
            impl.fn, impl.extra["out_shapes"]) for name, (impl, *_) in implementations("ort").items()]
    ops += [(s.op_type, s.inputs, s.outputs, s.attributes, s.fn, s.out_shapes) for s in session_ops().values()]
    for op_type, inputs, outputs, attributes, fn, out_shapes in ops:
        onnx_op(op_type=f"{DOMAIN}::{op_type}", inputs=[types[t] for t in inputs], outputs=[types[t] for t in outputs],
                attrs={a: attr_types[t] for a, t in attributes.items()}
                )(_guarded(op_type, len(outputs), out_shapes)(fn))


HEAP_KEEP_BYTES = 256 << 20     # freed heap memory glibc keeps mapped at the top (tune_malloc) and a prefill
                                # leaves mapped for the next one (trim_heap)


def tune_malloc() -> bool:
    """glibc only, once per process: blocks under 32 MiB come from the heap, and freed heap memory
    stays mapped (up to HEAP_KEEP_BYTES at the top), instead of glibc's dynamic defaults. Returns whether
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
    if _malloc_tuned or (libc := _glibc()) is None:
        return _malloc_tuned
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
    return _malloc_tuned


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(f, ctypes.c_size_t) for f in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


@functools.cache
def _glibc():
    """The process's C library where it is glibc (Linux, gnu_get_libc_version present: musl's mallopt does
    nothing), else None."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version
    except (OSError, AttributeError):
        return None
    if (info := getattr(libc, "mallinfo2", None)) is not None:      # glibc 2.33+
        info.restype = _Mallinfo2
    return libc


def heap_free_bytes() -> int | None:
    """Freed memory the C heap holds (glibc mallinfo2: the main arena's free chunks, where a prefill's
    numpy temporaries go; pages already given back by a trim still count, so what stays resident is at
    most this); None where it cannot be read."""
    info = getattr(_glibc(), "mallinfo2", None)
    return None if info is None else int(info().fordblks)


def trim_heap(keep: int | None = None) -> bool:
    """Return the C heap's free pages to the system (glibc malloc_trim) when it holds more than `keep` bytes
    of freed memory (default HEAP_KEEP_BYTES; always where that cannot be read): the custom ops' numpy
    temporaries of a prefill (each under glibc's mmap threshold) otherwise stay resident after they are
    freed (engines/ort.py `OrtEngine.prefill`). Below `keep` they stay mapped for the next prefill to reuse:
    faulting them in again cost each 512-token prefill of the int8 peer preset (~190 MB of temporaries) ~15%
    of its time (0.47 against 0.40 s). Returns whether it trimmed."""
    trim = getattr(_glibc(), "malloc_trim", None)
    free = heap_free_bytes()
    if trim is None or (free is not None and free <= (HEAP_KEEP_BYTES if keep is None else keep)):
        return False
    trim(0)
    return True
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version          # glibc, not musl (whose mallopt does nothing)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    _malloc_tuned = bool(mallopt(M_MMAP_THRESHOLD, 32 << 20)) and bool(mallopt(M_TRIM_THRESHOLD, HEAP_KEEP_BYTES))
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
