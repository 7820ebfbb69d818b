"""GPU check of the Triton kernels (plugins/gpu) on a CUDA machine — one prepared run, < 8 minutes.

    python -m jambatrt.validate.gpu_check [--quick]     # prints a JSON summary

1. parity: every kernel launcher against its op's `<op>_ref` at small shapes and at
   Jamba-1.5-Mini sizes (d_inner 8192, d_state 16, hidden 4096, 16 experts x 14336, 32/8 heads
   of 128), bf16 and fp32, with the tolerances of SPEC.tolerances;
2. the AOT path: one kernel compiled ahead of time (PTX, ptx_version 8.0) loaded with the plain
   CUDA driver (cuModuleLoadData) and launched with TensorRT's parameter order and NULL for the
   two hidden scratch pointers — what a TensorRT AOT plugin does;
3. timing: the selective scan at Mini dims (bf16 in, fp32 state), L = 4096 and 65536, for a few
   tile configurations and the sequential kernel, against the memory-bandwidth bound (bytes that
   must move / time, next to a measured device-to-device copy); plus the grouped MoE and
   attention for scale.

Needs the package installed (`pip install -e .` from the repository root: `make setup` does),
torch with CUDA and triton (3.6 or newer); no network, no TensorRT. Exit status 1 when a parity
check fails."""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import sys
import time
import traceback
from pathlib import Path

# --cpu-interpret: a dry run of the parity checks on CPU through Triton's interpreter (to test
# this script without a GPU); it must be decided before the kernels are imported
CPU = "--cpu-interpret" in sys.argv
if CPU:
    os.environ["TRITON_INTERPRET"] = "1"
else:
    os.environ.pop("TRITON_INTERPRET", None)
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
DEV = "cpu" if CPU else "cuda"

import torch  # noqa: E402

import jambatrt  # noqa: E402,F401
from jambatrt.export import ops as jops  # noqa: E402

T0 = time.perf_counter()
SUMMARY: dict = {"parity": [], "aot_driver_launch": None, "timing": {}, "errors": []}


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def grade(name, got, want, tol) -> bool:
    got, want = got.float(), want.float()
    err = (got - want).abs()
    excess = (err - (tol[0] + tol[1] * want.abs())).max().item() if err.numel() else 0.0
    ok = bool(torch.isfinite(got).all()) and excess <= 0
    SUMMARY["parity"].append({"case": name, "shape": list(want.shape), "max_abs_err": err.max().item() if err.numel()
                              else 0.0, "worst_excess": excess, "ok": ok})
    log(f"{'ok  ' if ok else 'FAIL'} {name} {list(want.shape)} max|err| {err.max().item() if err.numel() else 0:.3g}")
    return ok


def checked(fn):
    def run(*a, **k):
        try:
            return fn(*a, **k)
        except Exception as e:   # keep going: one failing check must not hide the others
            SUMMARY["errors"].append({"check": fn.__name__, "args": repr(a)[:200], "error": f"{type(e).__name__}: {e}",
                                      "trace": traceback.format_exc()[-2000:]})
            log(f"ERROR {fn.__name__}{a}: {type(e).__name__}: {e}")
    run.__name__ = fn.__name__
    return run


def rn(*shape, dtype=torch.float32, scale=1.0):
    return (torch.randn(*shape, device=DEV) * scale).to(dtype)


def quantise(w):
    s = w.abs().amax(-1) / 127
    return torch.round(w / s[..., None]).clamp(-127, 127).to(torch.int8), s.float()


# ---- parity -----------------------------------------------------------------------------------------
@checked
def check_scan(B, D, L, N, dtype, kernels=("selective_scan", "selective_scan_sequential")):
    from jambatrt.plugins.gpu import selective_scan as k
    tol = jops.SPECS["selective_scan"].tolerances[dtype]
    u, delta, z = rn(B, D, L, dtype=dtype), rn(B, D, L, dtype=dtype, scale=0.5), rn(B, D, L, dtype=dtype)
    A = -(torch.rand(D, N, device=DEV) * 2 + 0.1)
    Bm, Cm = rn(B, N, L, dtype=dtype), rn(B, N, L, dtype=dtype)
    Dk, bias, state = rn(D), rn(D, scale=0.5), rn(B, D, N)
    y_ref, h_ref = jops.reference("selective_scan")(u, delta, A, Bm, Cm, Dk, z, bias, state)
    for name in kernels:
        y, h = getattr(k, name)(u, delta, A, Bm, Cm, Dk, z, bias, state)
        grade(f"{name} y {dtype}", y, y_ref, tol)
        grade(f"{name} state {dtype}", h, h_ref, tol)
    if L == 1:
        y, h = k.selective_state_update(state, u[..., 0], delta[..., 0], A, Bm[..., 0], Cm[..., 0], Dk, z[..., 0], bias)
        grade(f"selective_state_update y {dtype}", y, y_ref[..., 0], tol)
        grade(f"selective_state_update state {dtype}", h, h_ref, tol)


@checked
def check_conv(B, D, L, K, dtype):
    from jambatrt.plugins.gpu import causal_conv1d as k
    tol = jops.SPECS["causal_conv1d"].tolerances[dtype]
    x, w, b = rn(B, D, L, dtype=dtype), rn(D, K, dtype=dtype, scale=0.5), rn(D, dtype=dtype)
    s = rn(B, D, K - 1, dtype=dtype)
    ref = jops.reference("causal_conv1d")
    for state in (s, None):
        y, st = k.causal_conv1d(x, w, b, state)
        yr, sr = ref(x, w, b, state)
        grade(f"causal_conv1d y {dtype} state={state is not None}", y, yr, tol)
        grade(f"causal_conv1d state {dtype}", st, sr, tol)
    y, st = k.causal_conv1d_update(x[..., 0], w, b, s)
    yr, sr = ref(x[..., :1], w, b, s)
    grade(f"causal_conv1d_update y {dtype}", y, yr[..., 0], tol)
    grade(f"causal_conv1d_update state {dtype}", st, sr, tol)


@checked
def check_moe(T, H, I, E, top_k, dtype, fused=True, grouped=True, tiles=None, group=None):
    """group=(a, b): the weights hold experts a..b-1 only (an expert group, expert_offset a)."""
    from jambatrt.plugins.gpu import moe_int8 as k
    tol = jops.SPECS["moe_int8"].tolerances[dtype]
    tiles = tiles or {}
    a, b = group or (0, E)
    x, logits = rn(T, H, dtype=dtype), rn(T, E, dtype=dtype)
    w13, s13 = quantise(rn(E, 2 * I, H, scale=H ** -0.5))
    w2, s2 = quantise(rn(E, H, I, scale=I ** -0.5))
    w = (w13[a:b], s13[a:b], w2[a:b], s2[a:b])
    ref = jops.reference("moe_int8")(x, logits, *w, top_k, a)
    tag = f" experts {a}..{b - 1}" if group else ""
    if grouped:
        grade(f"moe_int8 (grouped) {dtype} T={T}{tag}", k.moe_int8(x, logits, *w, top_k, a,
                                                                   **tiles.get("grouped", {})), ref, tol)
    if fused:
        grade(f"moe_int8_fused {dtype} T={T}{tag}", k.moe_int8_fused(x, logits, *w, top_k, a,
                                                                     **tiles.get("fused", {})), ref, tol)


@checked
def check_attention(B, L, P, Hq, Hkv, d, dtype, tiles=None):
    from jambatrt.plugins.gpu import attention as k
    tol = jops.SPECS["attention"].tolerances[dtype]
    q, kk, v = rn(B, L, Hq, d, dtype=dtype), rn(B, L, Hkv, d, dtype=dtype), rn(B, L, Hkv, d, dtype=dtype)
    pk, pv = (rn(B, P, Hkv, d, dtype=dtype), rn(B, P, Hkv, d, dtype=dtype)) if P else (None, None)
    got = k.attention(q, kk, v, pk, pv, **(tiles or {}))
    want = jops.reference("attention")(q, kk, v, pk, pv)
    for name, g, w in zip(("o", "present_k", "present_v"), got, want):
        grade(f"attention {name} {dtype} L={L} P={P}", g, w, tol)


# ---- AOT PTX through the CUDA driver (TensorRT's way of launching) -------------------------------------
@checked
def check_aot_driver_launch():
    from jambatrt.plugins.gpu import aot
    from jambatrt.plugins.gpu import selective_scan as k
    major, minor = torch.cuda.get_device_capability()
    cc = major * 10 + minor
    B, D, L, N = 2, 512, 333, 16
    plan = k.selective_scan_launch(B, D, L, N)           # grid and int32 arguments, as the plugin's aot_impl
    spec = k.kernel_spec(plan, "bfloat16")
    compiled = aot.compile_kernel(spec, cc)
    scratch = aot.check_scratch(spec, compiled)
    ptx = compiled.asm["ptx"]
    ptx = (ptx if isinstance(ptx, str) else ptx.decode()).encode() + b"\0"
    dt = torch.bfloat16
    u, delta, z = rn(B, D, L, dtype=dt), rn(B, D, L, dtype=dt, scale=0.5), rn(B, D, L, dtype=dt)
    A = -(torch.rand(D, N, device="cuda") * 2 + 0.1)
    Bm, Cm = rn(B, N, L, dtype=dt), rn(B, N, L, dtype=dt)
    Dk, bias, state = rn(D), rn(D, scale=0.5), rn(B, D, N)
    y, h = torch.empty_like(u), torch.empty(B, D, N, device="cuda")
    cuda = ctypes.CDLL("libcuda.so.1")
    torch.cuda.synchronize()   # the primary context is current on this thread from here on
    mod, fn = ctypes.c_void_p(), ctypes.c_void_p()
    r = cuda.cuModuleLoadData(ctypes.byref(mod), ctypes.c_char_p(ptx))
    assert r == 0, f"cuModuleLoadData -> CUresult {r} (the driver refused the PTX)"
    r = cuda.cuModuleGetFunction(ctypes.byref(fn), mod, compiled.metadata.name.encode())
    assert r == 0, f"cuModuleGetFunction -> {r}"
    # TensorRT's order: inputs, int32 extras, outputs; then Triton's two hidden scratch pointers, NULL
    vals = [ctypes.c_void_p(t.data_ptr()) for t in (u, delta, A, Bm, Cm, Dk, z, bias, state)]
    vals += [ctypes.c_int32(v) for v in plan.extras]
    vals += [ctypes.c_void_p(y.data_ptr()), ctypes.c_void_p(h.data_ptr()), ctypes.c_void_p(0), ctypes.c_void_p(0)]
    params = (ctypes.c_void_p * len(vals))(*[ctypes.cast(ctypes.pointer(v), ctypes.c_void_p) for v in vals])
    grid = plan.grid
    stream = ctypes.c_void_p(torch.cuda.current_stream().cuda_stream)
    r = cuda.cuLaunchKernel(fn, *[ctypes.c_uint(g) for g in grid], ctypes.c_uint(compiled.metadata.num_warps * 32),
                            ctypes.c_uint(1), ctypes.c_uint(1), ctypes.c_uint(compiled.metadata.shared), stream,
                            params, None)
    assert r == 0, f"cuLaunchKernel -> {r}"
    torch.cuda.synchronize()
    y_ref, h_ref = jops.reference("selective_scan")(u, delta, A, Bm, Cm, Dk, z, bias, state)
    tol = jops.SPECS["selective_scan"].tolerances[dt]
    ok = grade("AOT PTX via cuLaunchKernel y", y, y_ref, tol) & grade("AOT PTX via cuLaunchKernel state", h, h_ref, tol)
    cuda.cuModuleUnload(mod)
    SUMMARY["aot_driver_launch"] = {"ok": ok, "kernel": compiled.metadata.name, "arch": f"sm_{cc}",
                                    "ptx_version": aot.PINNED_PTX.get(cc), "scratch": scratch, "grid": grid}


# ---- timing -------------------------------------------------------------------------------------------
def time_ms(fn, reps=10, warmup=2) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    return sorted(times)[len(times) // 2]


@checked
def copy_bandwidth() -> float:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = time_ms(lambda: y.copy_(x), reps=10)
    gbps = 2 * x.numel() / ms / 1e6
    SUMMARY["timing"]["copy_GBps"] = round(gbps, 1)
    log(f"device copy: {gbps:.0f} GB/s")
    return gbps


@checked
def time_scan(L, configs, reps):
    from jambatrt.plugins.gpu import selective_scan as k
    B, D, N, dt = 1, 8192, 16, torch.bfloat16
    u, delta, z = rn(B, D, L, dtype=dt), rn(B, D, L, dtype=dt, scale=0.5), rn(B, D, L, dtype=dt)
    A = -(torch.rand(D, N, device="cuda") * 2 + 0.1)
    Bm, Cm = rn(B, N, L, dtype=dt), rn(B, N, L, dtype=dt)
    Dk, bias, state = rn(D), rn(D, scale=0.5), rn(B, D, N)
    # bytes that must move: read u, delta, z, B, C; write y; state in and out
    nbytes = B * D * L * 2 * 4 + 2 * B * N * L * 2 + 2 * B * D * N * 4
    bound = SUMMARY["timing"].get("copy_GBps") or 4000.0
    rows = []
    y_first = None
    for cfg in configs:
        kind = cfg["kind"]
        if kind == "chunked":
            run = lambda: k.selective_scan(u, delta, A, Bm, Cm, Dk, z, bias, state, block_d=cfg["BLOCK_D"],  # noqa: E731
                                           chunk=cfg["CHUNK"], num_warps=cfg["num_warps"])
        else:
            run = lambda: k.selective_scan_sequential(u, delta, A, Bm, Cm, Dk, z, bias, state,  # noqa: E731
                                                      block_d=cfg["BLOCK_D"], num_warps=cfg["num_warps"])
        y, h = run()
        if y_first is None:
            y_first = (y, h)
        agree = (y.float() - y_first[0].float()).abs().max().item()
        ms = time_ms(run, reps=reps)
        gbps = nbytes / ms / 1e6
        rows.append({**cfg, "ms": round(ms, 4), "GBps": round(gbps, 1), "fraction_of_copy_bw": round(gbps / bound, 4),
                     "max_abs_diff_vs_first": agree})
        log(f"scan L={L} {cfg}: {ms:.3f} ms  {gbps:.0f} GB/s  ({100 * gbps / bound:.1f}% of copy)")
    SUMMARY["timing"][f"selective_scan_L{L}"] = {"bytes": nbytes, "configs": rows,
                                                  "best": min(rows, key=lambda r: r["ms"]) if rows else None}
    return rows


@checked
def time_moe(T):
    from jambatrt.plugins.gpu import moe_int8 as k
    H, I, E, top_k = 4096, 14336, 16, 2
    x, logits = rn(T, H, dtype=torch.bfloat16), rn(T, E, dtype=torch.bfloat16)
    w13 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8, device="cuda")
    w2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8, device="cuda")
    s13, s2 = torch.full((E, 2 * I), 1e-3, device="cuda"), torch.full((E, H), 1e-3, device="cuda")
    ms = time_ms(lambda: k.moe_int8(x, logits, w13, s13, w2, s2, top_k), reps=5)
    tflops = 2 * T * top_k * 3 * H * I / ms / 1e9
    SUMMARY["timing"][f"moe_int8_grouped_T{T}"] = {"ms": round(ms, 3), "TFLOPs": round(tflops, 1)}
    log(f"moe grouped T={T}: {ms:.3f} ms, {tflops:.0f} TFLOP/s")


@checked
def time_attention(L, P):
    from jambatrt.plugins.gpu import attention as k
    B, Hq, Hkv, d, dt = 1, 32, 8, 128, torch.bfloat16
    q, kk, v = rn(B, L, Hq, d, dtype=dt), rn(B, L, Hkv, d, dtype=dt), rn(B, L, Hkv, d, dtype=dt)
    pk, pv = rn(B, P, Hkv, d, dtype=dt), rn(B, P, Hkv, d, dtype=dt)
    ms = time_ms(lambda: k.attention(q, kk, v, pk, pv), reps=5)
    flops = 4 * B * Hq * d * (L * P + L * (L + 1) / 2)
    SUMMARY["timing"][f"attention_L{L}_P{P}"] = {"ms": round(ms, 3), "TFLOPs": round(flops / ms / 1e9, 1)}
    log(f"attention L={L} P={P}: {ms:.3f} ms, {flops / ms / 1e9:.0f} TFLOP/s")


def dry_run() -> int:
    """Tiny parity cases on CPU (TRITON_INTERPRET=1): exercises this script's checks, not the GPU."""
    torch.manual_seed(0)
    small = {"grouped": dict(block_m=16, block_n=16, block_k=16), "fused": dict(block_n=16, block_i=16, block_k=16)}
    for dt in (torch.float32, torch.bfloat16):
        check_scan(1, 24, 19, 5, dt)
        check_scan(2, 16, 1, 16, dt)
        check_conv(1, 24, 9, 3, dt)
        check_moe(9, 32, 16, 4, 2, dt, tiles=small)
        check_attention(1, 9, 5, 4, 2, 16, dt, tiles=dict(block_m=16, block_n=16))
    ok = all(r["ok"] for r in SUMMARY["parity"]) and not SUMMARY["errors"]
    print(json.dumps({"dry_run": True, "passed": ok, "parity_cases": len(SUMMARY["parity"]),
                      "errors": SUMMARY["errors"]}, indent=1))
    return 0 if ok else 1


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="small shapes and L=4096 timing only")
    ap.add_argument("--cpu-interpret", action="store_true",
                    help="dry run without a GPU: tiny parity checks through Triton's interpreter")
    a = ap.parse_args()
    if CPU:
        return dry_run()
    if not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU visible"}))
        return 2
    import triton
    SUMMARY["device"] = {"name": torch.cuda.get_device_name(), "capability": torch.cuda.get_device_capability(),
                         "torch": torch.__version__, "triton": triton.__version__, "python": sys.version.split()[0]}
    log(f"{SUMMARY['device']}")
    torch.manual_seed(0)
    bf, f32 = torch.bfloat16, torch.float32
    # small shapes, both dtypes (odd sizes: masks, padding, N not a power of two)
    for dt in (f32, bf):
        check_scan(2, 40, 77, 16, dt)
        check_scan(1, 24, 19, 5, dt)
        check_scan(3, 64, 1, 16, dt)
        check_conv(2, 72, 130, 4, dt)
        check_conv(1, 24, 2, 3, dt)
        check_moe(37, 64, 96, 6, 2, dt)
        check_moe(5, 48, 32, 5, 1, dt)
        check_moe(37, 64, 96, 6, 2, dt, group=(2, 5))     # one expert group (TensorRT split of big layers)
        check_attention(2, 70, 0, 8, 2, 64, dt)
        check_attention(1, 33, 45, 4, 1, 128, dt)
        check_attention(2, 1, 100, 4, 2, 128, dt)
    # Jamba-1.5-Mini sizes, bf16 (the reference loops are slow: moderate lengths)
    check_scan(1, 8192, 1024 if a.quick else 4096, 16, bf)
    check_scan(2, 8192, 1, 16, bf)
    check_conv(1, 8192, 4096, 4, bf)
    check_moe(256 if a.quick else 1024, 4096, 14336, 16, 2, bf, fused=False)
    check_moe(16, 4096, 14336, 16, 2, bf, grouped=True)
    check_attention(1, 1024, 1024, 32, 8, 128, bf)
    check_attention(2, 1, 4096, 32, 8, 128, bf)
    check_aot_driver_launch()
    # timing
    copy_bandwidth()
    configs = [dict(kind="chunked", BLOCK_D=bd, CHUNK=ch, num_warps=w)
               for bd, ch, w in [(16, 16, 4), (16, 32, 4), (16, 32, 8), (8, 32, 4), (32, 16, 8), (8, 16, 2),
                                 (16, 64, 8), (32, 32, 8)]]
    configs += [dict(kind="seq", BLOCK_D=bd, num_warps=w) for bd, w in [(64, 4), (32, 2), (128, 4)]]
    rows = time_scan(4096, configs, reps=10) or []
    if not a.quick and rows:
        best = sorted((r for r in rows if r["kind"] == "chunked"), key=lambda r: r["ms"])[:2]
        keep = [{k: r[k] for k in ("kind", "BLOCK_D", "CHUNK", "num_warps")} for r in best]
        keep.append(dict(kind="chunked", BLOCK_D=16, CHUNK=16, num_warps=4))
        uniq = [dict(t) for t in {tuple(sorted(c.items())) for c in keep}]
        time_scan(65536, uniq, reps=3)
    time_moe(4096)
    time_moe(16)
    time_attention(4096, 0)
    time_attention(1, 65536)
    ok = (all(r["ok"] for r in SUMMARY["parity"]) and not SUMMARY["errors"]
          and (SUMMARY["aot_driver_launch"] or {}).get("ok"))
    SUMMARY["passed"] = bool(ok)
    SUMMARY["parity_failures"] = [r for r in SUMMARY["parity"] if not r["ok"]]
    SUMMARY["parity_cases"] = len(SUMMARY["parity"])
    SUMMARY["seconds"] = round(time.perf_counter() - T0, 1)
    text = json.dumps(SUMMARY, indent=1, default=str)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "gpu_check.json").write_text(text)
    compact = {k: v for k, v in SUMMARY.items() if k != "parity"}
    print(json.dumps(compact, indent=1, default=str))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
