"""The Triton kernels (plugins/gpu) against each op's `<op>_ref`, fp32 and bf16, with the
tolerances of SPEC.tolerances — run on CPU by Triton's interpreter. Every registered GPU
implementation (plugins/registry.py) runs the interpreter cases of its op's row in
tests/op_test_data.py, with the arguments the row makes.

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


def _cases() -> dict:
    """case id -> (op, launcher, params): every gpu implementation registered (plugins/registry.py,
    variants included) at each interpreter case of its op's row (tests/op_test_data.py); a
    launcher without cases, or cases without a launcher, fail tests/test_registry.py."""
    from op_test_data import ROWS
    return {f"{op}:{launcher}:{case}": (op, launcher, params)
            for op, row in sorted(ROWS.items()) for launcher, cases in row.interpreter.items()
            for case, params in cases.items()}


CASES = _cases()
# interpreter-sized tiles (the interpreter pays per program); cases with tiles="default" keep the
# launchers' own (DEFAULTS: the tiles compiled for TensorRT and checked for spills)
SMALL_TILES = {"moe_int8": dict(block_m=16, block_n=16, block_k=16),
               "moe_int8_fused": dict(block_n=16, block_i=16, block_k=16),
               "attention": dict(block_m=16, block_n=16)}


def _grade(got, want, tol) -> dict:
    import torch
    atol, rtol = tol
    got, want = got.float(), want.float()
    err = (got - want).abs()
    excess = (err - (atol + rtol * want.abs())).max().item() if err.numel() else 0.0
    return {"shape": list(want.shape), "max_abs_err": err.max().item() if err.numel() else 0.0,
            "worst_excess": excess, "finite": bool(torch.isfinite(got).all()), "ok": excess <= 0}


def run_case(case: str, dtype_name: str) -> list[dict]:
    import torch

    import jambatrt  # noqa: F401
    from jambatrt.export import ops as jops
    from jambatrt.plugins.registry import implementations
    from op_test_data import make
    op, launcher, p = CASES[case]
    dtype = getattr(torch, dtype_name)
    fn = next(i.fn for i in implementations("gpu", variants=True)[op] if i.name == launcher)
    ref = jops.reference(op)
    tol = jops.SPECS[op].tolerances[dtype]
    args = make(op, p, dtype, seed=sum(map(ord, case)))
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


if __name__ == "__main__":
    os.environ.setdefault("TRITON_INTERPRET", "1")
    _child_main(sys.argv[1], sys.argv[2:])
