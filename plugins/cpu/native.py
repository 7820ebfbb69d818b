"""Native (C) kernels beside the numba ones, for what numba's code generation cannot reach: `gemv_int8.c`,
the int8 GEMV with integer dot products, on AVX512-VNNI or AVX2 (linear_int8.py explains when it runs).

`gemv_int8_address()` compiles the C source once per source version with the system C compiler (`$CC`,
else cc/gcc), loads it, and returns the address of the kernel this CPU runs best for numba code to call
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

_SOURCE = Path(__file__).with_name("gemv_int8.c")
_FLAGS = ("-O3", "-shared", "-fPIC")        # each function names its instruction set (target attributes)
# the kernels, fastest first: name -> (symbol, the CPU features it needs, as llvmlite names them)
VARIANTS = {"avx512vnni": ("jt_gemv_int8", ("avx512f", "avx512bw", "avx512vl", "avx512vnni")),
            "avx2": ("jt_gemv_int8_avx2", ("avx2",))}
F32_VARIANTS = {"avx512": ("jt_gemv_f32", ("avx512f",)),          # the float32 GEMV (linear_f32.py)
                "avx2": ("jt_gemv_f32_avx2", ("avx2", "fma"))}
_TABLES = {"int8": VARIANTS, "f32": F32_VARIANTS}
_state: dict = {}      # (table, variant) -> address, "lib" -> the loaded library, ("warned", value)


@functools.cache
def runnable_variants(table: str = "int8") -> tuple[str, ...]:
    """The kernels of gemv_int8.c this CPU can run (`table`: "int8", VARIANTS, or "f32", F32_VARIANTS),
    fastest first (LLVM is asked for the CPU's features once: ~350 us a time)."""
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
    return [_SOURCE.parent / "__pycache__", Path.home() / ".cache" / "jambatrt"]


def _build(cc: str, fresh: bool = False) -> Path:
    """The compiled library's path: a cached build of this source and these flags unless `fresh`."""
    key = hashlib.sha256(_SOURCE.read_bytes() + " ".join((cc, *_FLAGS)).encode()).hexdigest()[:16]
    name = f"gemv_int8-{key}.so"
    for d in _cache_dirs():
        if (d / name).is_file() and not fresh:
            return d / name
    errors = []
    for d in _cache_dirs():
        try:
            d.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=d, prefix=".gemv_int8-", suffix=".so")
            os.close(fd)
        except OSError as exc:
            errors.append(f"{d}: {exc}")
            continue
        try:
            run = subprocess.run([cc, *_FLAGS, "-o", tmp, str(_SOURCE)], capture_output=True, text=True, timeout=120)
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


def _address(table: str, variant: str | None) -> int:
    choice = os.environ.get("JAMBATRT_NATIVE", "1")
    if variant is None and choice == "0":
        return 0
    if choice not in ("1", *VARIANTS) and not _state.get(("warned", choice)):
        _state[("warned", choice)] = True
        warnings.warn(f"jambatrt: JAMBATRT_NATIVE={choice!r} is not one of 0, 1, {', '.join(VARIANTS)}; "
                      "using 1 (the best kernel this CPU runs)", RuntimeWarning, stacklevel=3)
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
        what, instead = (("int8 GEMV", "the numba kernel (~0.7x its speed on AVX512-VNNI)") if table == "int8"
                         else ("float32 GEMV", "torch's GEMV"))
        warnings.warn(f"jambatrt: the native {what} ({variant}) is not available ({why}); decode uses {instead}",
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
