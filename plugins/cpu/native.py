"""Native (C) kernels beside the numba ones, for what numba's code generation cannot reach: `gemv_int8.c`,
the int8 and float32 GEMVs of decode (linear_int8.py, linear_f32.py explain when they run), and
`attention_decode.c`, decode attention over a float32 or int8 KV cache (attention.py), each on AVX-512
(with VNNI: integer dot products over an int8 cache) or AVX2; `mamba_step.c`, the scan's decode step
and (AVX-512) the fused int8 mixer's prefill scan;
`gemm.c`, the prefill GEMM of linear_int8 and linear_f32 on AVX2 CPUs without AVX-512.

`gemv_int8_address()` (and `gemv_f32_address()`, `attention_decode_address()`) compiles the C sources
into one library, once per source version, with the system C compiler (`$CC`, else cc/gcc), loads it,
and returns the address of the kernel this CPU runs best for numba code to call
(`call_gemv_int8`: the address is an argument, not a constant, so numba's on-disk cache of the callers
stays valid across processes). It returns 0, and the callers keep their numba loops, when the CPU has
neither instruction set, no compiler is found or the compile fails (one warning says why), or
JAMBATRT_NATIVE=0 (which also turns off linear_int8's integer GEMM). The shared object goes to
`__pycache__/` beside the source, or to ~/.cache/jambatrt when that is not writable, written under a
temporary name and renamed: a concurrent or interrupted build never leaves a half-written library to
be loaded."""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_SOURCES = tuple(Path(__file__).with_name(n) for n in ("gemv_int8.c", "attention_decode.c", "mamba_step.c",
                                                           "gemm.c"))
_HEADERS = (Path(__file__).with_name("simd_math.h"),)
_FLAGS = ("-O3", "-shared", "-fPIC")        # each function names its instruction set (target attributes)
_LIBS = ("-lm",)
# the kernels, fastest first: name -> (symbol, the CPU features it needs, as llvmlite names them)
VARIANTS = {"avx512vnni": ("jt_gemv_int8", ("avx512f", "avx512bw", "avx512vl", "avx512vnni")),
            "avx2": ("jt_gemv_int8_avx2", ("avx2",))}
F32_VARIANTS = {"avx512": ("jt_gemv_f32", ("avx512f",)),          # the float32 GEMV (linear_f32.py)
                "avx2": ("jt_gemv_f32_avx2", ("avx2", "fma"))}
ATTENTION_VARIANTS = {"avx512vnni": ("jt_attn_decode_vnni", ("avx512f", "avx512bw", "avx512vnni")),   # decode attention
                      "avx512": ("jt_attn_decode", ("avx512f",)),                                   # (attention.py)
                      "avx2": ("jt_attn_decode_avx2", ("avx2", "fma"))}
SCAN_VARIANTS = {"avx512": ("jt_scan_step16", ("avx512f",)),           # the scan's decode step (mamba_mixer.py)
                 "avx2": ("jt_scan_step16_avx2", ("avx2", "fma"))}
SCAN_CHUNK_VARIANTS = {"avx512": ("jt_scan_chunk16", ("avx512f",))}   # the scan over a prefill chunk (mamba_mixer.py)
GEMM_VARIANTS = {"avx2": ("jt_gemm_avx2", ("avx2", "fma"))}      # prefill GEMM (linear_int8, linear_f32)
_TABLES = {"int8": VARIANTS, "f32": F32_VARIANTS, "attention": ATTENTION_VARIANTS, "scan": SCAN_VARIANTS,
           "scan_chunk": SCAN_CHUNK_VARIANTS, "gemm": GEMM_VARIANTS}
_state: dict = {}      # (table, variant) -> address, "lib" -> the loaded library, ("warned", value)


@functools.cache
def runnable_variants(table: str = "int8") -> tuple[str, ...]:
    """The native kernels this CPU can run (`table`: "int8", VARIANTS; "f32", F32_VARIANTS; "attention",
    ATTENTION_VARIANTS), fastest first (LLVM is asked for the CPU's features once: ~350 us a time)."""
    return tuple(v for v, (_, needs) in _TABLES[table].items() if all(host_has(f) for f in needs))


def host_has(feature: str) -> bool:
    """Whether this CPU has `feature` (an LLVM feature name: "avx512vnni", "avxvnni", ...)."""
    return _host_features().get(feature, False)


@functools.cache
def _host_features() -> dict:
    from llvmlite import binding
    return dict(binding.get_host_cpu_features())


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _cache_dirs() -> list[Path]:
    return [_SOURCES[0].parent / "__pycache__", Path.home() / ".cache" / "jambatrt"]


def _build(cc: str, fresh: bool = False) -> Path:
    """The compiled library's path: a cached build of these sources and flags unless `fresh`."""
    key = hashlib.sha256(b"".join(s.read_bytes() for s in (*_SOURCES, *_HEADERS)) + " ".join((cc, *_FLAGS, *_LIBS)).encode())
    name = f"jt_native-{key.hexdigest()[:16]}.so"
    for d in _cache_dirs():
        if (d / name).is_file() and not fresh:
            return d / name
    errors = []
    for d in _cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".jt_native-", suffix=".so")
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc}")
            continue
        try:
            run = subprocess.run([cc, *_FLAGS, "-o", tmp, *map(str, _SOURCES), *_LIBS], capture_output=True, text=True,
                                 timeout=120)
            if run.returncode != 0:
                raise RuntimeError(f"{cc} exited {run.returncode}: {run.stderr.strip()[-400:]}")
            os.replace(tmp, d / name)
            return d / name
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    raise RuntimeError("no writable directory for the compiled kernel: " + "; ".join(errors))


def gemv_int8_address(variant: str | None = None) -> int:
    """The address of gemv_int8.c's int8 kernel for this CPU (`variant`: that one of VARIANTS, if this CPU runs
    it), or 0 where none can run (see the module docstring). JAMBATRT_NATIVE=0 turns them off, =avx2 picks that one."""
    return _address("int8", variant)


def gemv_f32_address(variant: str | None = None) -> int:
    """The address of gemv_int8.c's float32 kernel for this CPU (`variant`: one of F32_VARIANTS), or 0 (as
    gemv_int8_address; JAMBATRT_NATIVE=avx2 picks the AVX2 kernel here too)."""
    return _address("f32", variant)


def attention_decode_address(variant: str | None = None) -> int:
    """The address of attention_decode.c's kernel for this CPU (`variant`: one of ATTENTION_VARIANTS), or 0
    (as gemv_int8_address)."""
    return _address("attention", variant)


def scan_step_address(variant: str | None = None) -> int:
    """The address of mamba_step.c's scan step for this CPU (`variant`: one of SCAN_VARIANTS), or 0 (as
    gemv_int8_address; AVX-512 or AVX2 + FMA: elsewhere numba's `_step_kernel`)."""
    return _address("scan", variant)


def scan_chunk_address(variant: str | None = None) -> int:
    """The address of mamba_step.c's prefill-chunk scan (`variant`: one of SCAN_CHUNK_VARIANTS), or 0 (as
    gemv_int8_address; AVX-512: elsewhere numba's `_scan_kernel`)."""
    return _address("scan_chunk", variant)


def gemm_address(variant: str | None = None) -> int:
    """The address of gemm.c's GEMM (int8 or float32 weights, float32 activations) for this CPU (`variant`: one
    of GEMM_VARIANTS), or 0 (as gemv_int8_address)."""
    return _address("gemm", variant)


def gemm_scratch() -> int:
    """The float32 scratch (packed blocks) one call of gemm.c's GEMM needs; 0 when it is not loaded."""
    lib = _state.get("lib")
    if lib is None:
        return 0
    fn = lib.jt_gemm_scratch
    fn.restype = ctypes.c_int64
    return int(fn())


def _address(table: str, variant: str | None) -> int:
    choice = os.environ.get("JAMBATRT_NATIVE", "1")
    if variant is None and choice == "0":
        return 0
    if choice not in ("1", *VARIANTS) and not _state.get(("warned", choice)):
        _state[("warned", choice)] = True
        warnings.warn(f"jambatrt: JAMBATRT_NATIVE={choice!r} is not one of 0, 1, {', '.join(VARIANTS)}; "
                      "using 1 (the best kernel this CPU runs)", RuntimeWarning, stacklevel=3)
    if variant is None and choice == "avx2" and "avx2" not in _TABLES[table]:
        return 0                                     # as on a CPU without AVX-512: this kernel has no AVX2 form
    runnable = runnable_variants(table)
    variant = variant or (choice if choice in _TABLES[table] else (runnable[0] if runnable else None))
    if variant not in runnable:
        return 0                                     # the numba loop is this CPU's kernel: nothing to warn about
    if (table, variant) in _state:
        return _state[table, variant]
    address, why = 0, None
    if (cc := _compiler()) is None:
        why = "no C compiler (set CC)"
    else:
        try:
            if "lib" not in _state:
                try:
                    _state["lib"] = ctypes.CDLL(str(_build(cc)))     # kept loaded
                except OSError:                      # a cached library that does not load: build it again
                    _state["lib"] = ctypes.CDLL(str(_build(cc, fresh=True)))
            symbol = _TABLES[table][variant][0]
            address = ctypes.cast(getattr(_state["lib"], symbol), ctypes.c_void_p).value or 0
        except (OSError, RuntimeError, subprocess.SubprocessError) as exc:
            why = str(exc)
    if why:
        what, instead = {"int8": ("int8 GEMV", "the numba kernel (~0.7x its speed on AVX512-VNNI)"),
                         "f32": ("float32 GEMV", "torch's GEMV"),
                         "attention": ("decode attention", "the numba kernel"),
                         "scan": ("scan step", "the numba kernel"),
                         "scan_chunk": ("prefill scan", "the numba kernel"),
                         "gemm": ("prefill GEMM", "torch's GEMM (int8 weights dequantised in blocks)")}[table]
        warnings.warn(f"jambatrt: the native {what} ({variant}) is not available ({why}); {instead} runs instead",
                      RuntimeWarning, stacklevel=3)
    _state[table, variant] = address
    return address


@intrinsic
def call_gemv_int8(typingctx, address, xh, xl, xs, Kp, w, scale, n0, n1, out):
    """jt_gemv_int8(xh, xl, xs, M, Kp, w, K, scale, n0, n1, out, ldo) at `address`, from numba code:
    xh, xl [M, Kp] int16, xs [M] float64, w [N, K] int8, scale [N] float32, out [M, ldo] float32, all
    C-contiguous (M, K and ldo are read from the arrays)."""
    def codegen(context, builder, sig, args):
        addr, axh, axl, axs, kp, aw, asc, a0, a1, aout = args
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        addr, kp, a0, a1 = (context.cast(builder, v, t, types.int64) for v, t in
                            ((addr, sig.args[0]), (kp, sig.args[4]), (a0, sig.args[7]), (a1, sig.args[8])))
        arrays = [context.make_array(t)(context, builder, v) for t, v in
                  zip((sig.args[1], sig.args[2], sig.args[3], sig.args[5], sig.args[6], sig.args[9]),
                      (axh, axl, axs, aw, asc, aout))]
        h, l, s, wa, sc, o = arrays
        M = builder.extract_value(h.shape, 0)
        K = builder.extract_value(wa.shape, 1)
        ldo = builder.extract_value(o.shape, 1)
        ptr = [builder.bitcast(a.data, i8p) for a in arrays]
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i8p, i8p, i64, i64, i8p, i64, i8p, i64, i64, i8p, i64])
        fn = builder.inttoptr(addr, fnty.as_pointer())
        builder.call(fn, [ptr[0], ptr[1], ptr[2], M, kp, ptr[3], K, ptr[4], a0, a1, ptr[5], ldo])
        return context.get_dummy_value()
    return types.void(address, xh, xl, xs, Kp, w, scale, n0, n1, out), codegen


@intrinsic
def call_gemv_f32(typingctx, address, x, w, n0, n1, out):
    """jt_gemv_f32(x, M, K, w, n0, n1, out, ldo) at `address`, from numba code: x [M, K], w [N, K], out
    [M, ldo] float32, C-contiguous."""
    def codegen(context, builder, sig, args):
        addr, ax, aw, a0, a1, aout = args
        i64, i8p = ir.IntType(64), ir.IntType(8).as_pointer()
        addr, a0, a1 = (context.cast(builder, v, t, types.int64) for v, t in
                        ((addr, sig.args[0]), (a0, sig.args[3]), (a1, sig.args[4])))
        xa, wa, oa = (context.make_array(t)(context, builder, v) for t, v in
                      zip((sig.args[1], sig.args[2], sig.args[5]), (ax, aw, aout)))
        M = builder.extract_value(xa.shape, 0)
        K = builder.extract_value(xa.shape, 1)
        ldo = builder.extract_value(oa.shape, 1)
        fnty = ir.FunctionType(ir.VoidType(), [i8p, i64, i64, i8p, i64, i64, i8p, i64])
        fn = builder.inttoptr(addr, fnty.as_pointer())
        builder.call(fn, [builder.bitcast(xa.data, i8p), M, K, builder.bitcast(wa.data, i8p), a0, a1,
                          builder.bitcast(oa.data, i8p), ldo])
        return context.get_dummy_value()
    return types.void(address, x, w, n0, n1, out), codegen


@intrinsic
def call_native(typingctx, address, args):
    """The C function at `address` called with `args`, a tuple of integers (pointers as addresses:
    `arr.ctypes.data` + byte offsets), each passed as int64; it returns nothing. From numba code."""
    if not isinstance(args, types.BaseTuple) or not all(isinstance(t, types.Integer) for t in args):
        return None

    def codegen(context, builder, sig, llargs):
        i64 = ir.IntType(64)
        addr = context.cast(builder, llargs[0], sig.args[0], types.int64)
        vals = [context.cast(builder, builder.extract_value(llargs[1], i), t, types.int64)
                for i, t in enumerate(sig.args[1])]
        fn = builder.inttoptr(addr, ir.FunctionType(ir.VoidType(), [i64] * len(vals)).as_pointer())
        builder.call(fn, vals)
        return context.get_dummy_value()
    return types.void(address, args), codegen
