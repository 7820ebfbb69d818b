"""The Triton kernels (plugins/gpu) against each op's `<op>_ref`, fp32 and bf16, with the
tolerances of SPEC.tolerances — run on CPU by Triton's interpreter.

Triton decides at decoration time whether a kernel is interpreted, so TRITON_INTERPRET=1 must be
set before plugins.gpu is imported; other tests in this session need the compiled form (AOT). The
kernels therefore run in one child process (this file run as a script), which writes one JSON
result per case; the tests below read and grade them. Shapes are tiny: the interpreter costs
~0.6 ms per loop step per program."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

DTYPES = ("float32", "bfloat16")

# case id -> (op, launcher, shape parameters)
CASES = {
    "scan_chunked_full": ("selective_scan", "selective_scan", dict(B=2, D=20, L=37, N=8, opt=True)),
    "scan_chunked_bare": ("selective_scan", "selective_scan", dict(B=1, D=16, L=19, N=5, opt=False)),
    "scan_chunked_L1": ("selective_scan", "selective_scan", dict(B=2, D=8, L=1, N=16, opt=True)),
    "scan_sequential": ("selective_scan", "selective_scan_sequential", dict(B=2, D=20, L=13, N=8, opt=True)),
    "scan_state_update": ("selective_scan", "selective_state_update", dict(B=3, D=24, L=1, N=16, opt=True)),
    "conv_state": ("causal_conv1d", "causal_conv1d", dict(B=2, D=40, L=70, K=4, state=True)),
    "conv_no_state": ("causal_conv1d", "causal_conv1d", dict(B=1, D=16, L=2, K=4, state=False)),
    "conv_k3_L1": ("causal_conv1d", "causal_conv1d", dict(B=2, D=8, L=1, K=3, state=True)),
    "conv_update": ("causal_conv1d", "causal_conv1d_update", dict(B=2, D=40, L=1, K=4, state=True)),
    "moe_grouped": ("moe_int8", "moe_int8", dict(T=10, H=32, I=24, E=4, k=2)),
    "moe_grouped_k3": ("moe_int8", "moe_int8", dict(T=7, H=40, I=20, E=6, k=3)),
    "moe_fused": ("moe_int8", "moe_int8_fused", dict(T=10, H=32, I=24, E=4, k=2)),
    "moe_fused_k1": ("moe_int8", "moe_int8_fused", dict(T=3, H=16, I=16, E=5, k=1)),
    # one expert group (experts 2..4 of 6): the weights hold 3 experts, expert_offset 2
    "moe_grouped_group": ("moe_int8", "moe_int8", dict(T=9, H=32, I=24, E=6, k=2, group=(2, 5))),
    "moe_fused_group": ("moe_int8", "moe_int8_fused", dict(T=9, H=32, I=24, E=6, k=2, group=(2, 5))),
    "attn_prefill": ("attention", "attention", dict(B=2, L=9, P=0, Hq=4, Hkv=2, d=16)),
    "attn_past_mqa": ("attention", "attention", dict(B=1, L=20, P=7, Hq=4, Hkv=1, d=8)),
    "attn_decode": ("attention", "attention", dict(B=1, L=1, P=30, Hq=2, Hkv=2, d=16)),
    # the launchers' own tiles (DEFAULTS: the tiles compiled for TensorRT and checked for spills),
    # attention at Jamba's head_dim 128
    "moe_grouped_default_tiles": ("moe_int8", "moe_int8", dict(T=11, H=64, I=96, E=4, k=2, tiles="default")),
    "moe_fused_default_tiles": ("moe_int8", "moe_int8_fused", dict(T=11, H=64, I=96, E=4, k=2, tiles="default")),
    "attn_head128_default_tiles": ("attention", "attention", dict(B=1, L=37, P=21, Hq=4, Hkv=2, d=128,
                                                                  tiles="default")),
}
SMALL_TILES = {"moe_int8": dict(block_m=16, block_n=16, block_k=16),
               "moe_int8_fused": dict(block_n=16, block_i=16, block_k=16),
               "attention": dict(block_m=16, block_n=16)}


# ---- child process: run the kernels under the interpreter --------------------------------------
def _inputs(op, p, dtype, g):
    import torch
    rn = lambda *s: torch.randn(*s, generator=g)   # noqa: E731
    if op == "selective_scan":
        B, D, L, N = p["B"], p["D"], p["L"], p["N"]
        u, delta, z = (rn(B, D, L).to(dtype) for _ in range(3))
        A = -(torch.rand(D, N, generator=g) * 2 + 0.1)
        Bm, Cm = rn(B, N, L).to(dtype), rn(B, N, L).to(dtype)
        args = [u, delta, A, Bm, Cm, rn(D)]
        return args + ([z, rn(D) * 0.5, rn(B, D, N)] if p["opt"] else [None, None, None])
    if op == "causal_conv1d":
        B, D, L, K = p["B"], p["D"], p["L"], p["K"]
        return [rn(B, D, L).to(dtype), rn(D, K).to(dtype), rn(D).to(dtype),
                rn(B, D, K - 1).to(dtype) if p["state"] else None]
    if op == "moe_int8":
        T, H, I, E, k = p["T"], p["H"], p["I"], p["E"], p["k"]

        def quantise(w):   # ExpertsInt8: symmetric, one scale per output channel
            scale = w.abs().amax(-1) / 127
            return torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8), scale
        w13, s13 = quantise(rn(E, 2 * I, H) * 0.2)
        w2, s2 = quantise(rn(E, H, I) * 0.2)
        a, b = p.get("group", (0, E))
        return [rn(T, H).to(dtype), rn(T, E).to(dtype), w13[a:b], s13[a:b], w2[a:b], s2[a:b], k, a]
    if op == "attention":
        B, L, P, Hq, Hkv, d = p["B"], p["L"], p["P"], p["Hq"], p["Hkv"], p["d"]
        past = [rn(B, P, Hkv, d).to(dtype), rn(B, P, Hkv, d).to(dtype)] if P else [None, None]
        return [rn(B, L, Hq, d).to(dtype), rn(B, L, Hkv, d).to(dtype), rn(B, L, Hkv, d).to(dtype), *past]
    raise KeyError(op)


def _grade(got, want, tol) -> dict:
    import torch
    atol, rtol = tol
    got, want = got.float(), want.float()
    err = (got - want).abs()
    excess = (err - (atol + rtol * want.abs())).max().item() if err.numel() else 0.0
    return {"shape": list(want.shape), "max_abs_err": err.max().item() if err.numel() else 0.0,
            "worst_excess": excess, "finite": bool(torch.isfinite(got).all()), "ok": excess <= 0}


def run_case(case: str, dtype_name: str) -> list[dict]:
    import importlib

    import torch

    import jambatrt  # noqa: F401
    from jambatrt.export import ops as jops
    op, launcher, p = CASES[case]
    dtype = getattr(torch, dtype_name)
    kernels = importlib.import_module(f"jambatrt.plugins.gpu.{op}")
    ref = jops.reference(op)
    tol = jops.SPECS[op].tolerances[dtype]
    args = _inputs(op, p, dtype, torch.Generator().manual_seed(sum(map(ord, case))))
    fn = getattr(kernels, launcher)
    extra = {} if p.get("tiles") == "default" else SMALL_TILES.get(launcher, {})
    if launcher == "selective_state_update":
        u, delta, A, Bm, Cm, Dk, z, bias, state = args
        got = fn(state, u[..., 0], delta[..., 0], A, Bm[..., 0], Cm[..., 0], Dk, z[..., 0], bias)
        y, h = ref(*args)
        want = (y[..., 0], h)
    elif launcher == "causal_conv1d_update":
        x, w, b, s = args
        got = fn(x[..., 0], w, b, s)
        y, s2 = ref(*args)
        want = (y[..., 0], s2)
    else:
        got = fn(*args, **extra)
        want = ref(*args)
    if isinstance(got, torch.Tensor):
        got, want = (got,), (want,)
    return [{"output": i, **_grade(g, w, tol)} for i, (g, w) in enumerate(zip(got, want))]


def _child_main(out_path: str, cases: list[str]) -> None:
    results = {}
    for case in cases:
        for dt in DTYPES:
            try:
                results[f"{case}-{dt}"] = {"outputs": run_case(case, dt)}
            except Exception as e:   # reported by the test of this case, with the child's message
                results[f"{case}-{dt}"] = {"error": f"{type(e).__name__}: {e}"}
    Path(out_path).write_text(json.dumps(results))


# ---- the tests ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def results(tmp_path_factory):
    """Run every case in two interpreter child processes (two cores); collect their results."""
    out = tmp_path_factory.mktemp("triton-interpret")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    names = sorted(CASES)
    halves = [names[0::2], names[1::2]]
    procs = [subprocess.Popen([sys.executable, __file__, str(out / f"part{i}.json"), *half], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i, half in enumerate(halves)]
    merged = {}
    for i, proc in enumerate(procs):
        log, _ = proc.communicate(timeout=900)
        path = out / f"part{i}.json"
        assert proc.returncode == 0 and path.exists(), f"interpreter child failed ({proc.returncode}):\n{log[-4000:]}"
        merged.update(json.loads(path.read_text()))
    return merged


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(CASES))
def test_kernel_matches_reference(results, case, dtype):
    r = results[f"{case}-{dtype}"]
    assert "error" not in r, f"{case} {dtype}: {r.get('error')}"
    op, launcher, params = CASES[case]
    for o in r["outputs"]:
        assert o["finite"], f"{launcher} {params} {dtype}: output {o['output']} has inf/nan"
        assert o["ok"], (f"{launcher} {params} {dtype}: output {o['output']} {o['shape']} off by "
                         f"{o['max_abs_err']:.3g} (exceeds the SPEC tolerance by {o['worst_excess']:.3g})")


def test_every_launcher_is_covered():
    """Every public launcher of plugins/gpu has a parity case (a new kernel needs one)."""
    launchers = {c[1] for c in CASES.values()}
    assert launchers == {"selective_scan", "selective_scan_sequential", "selective_state_update", "causal_conv1d",
                         "causal_conv1d_update", "moe_int8", "moe_int8_fused", "attention"}
    assert {c[0] for c in CASES.values()} == {"selective_scan", "causal_conv1d", "moe_int8", "attention"}


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _child_main(sys.argv[1], sys.argv[2:])
