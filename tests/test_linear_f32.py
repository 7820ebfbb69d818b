"""Issue 18: the ORT engine's float32 linear layers (graph/passes/lower_linear_f32.py ->
plugins/cpu/linear_f32.py): the native GEMV for decode rows, oneDNN's GEMM for prefill chunks."""

import numpy as np
import onnx
import pytest

from conftest import assert_same_model_sums, native_variants, run_cli
from jambatrt.engines.ort import OrtEngine
from jambatrt.plugins.cpu.linear_f32 import linear_f32
from jambatrt.plugins.cpu.linear_int8 import GEMV_MAX_ROWS
from jambatrt.validate.reference import EagerReference

EPS = float(np.finfo(np.float32).eps)


def _f32_variants() -> list:
    return native_variants("f32", "float32 GEMV")


def _check(x, w, got):
    """Within float32's rounding bound of a K-long sum: a few eps times K times sum |x w|."""
    want = x.astype(np.float64) @ w.astype(np.float64).T
    bound = 4 * x.shape[1] * EPS * (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) + 1e-30
    assert got.shape == want.shape and got.dtype == np.float32
    assert (np.abs(got - want) <= bound).all()


@pytest.mark.parametrize("variant", _f32_variants())
@pytest.mark.parametrize("M, N, K", [(1, 45, 7), (1, 300, 1037), (GEMV_MAX_ROWS, 600, 1037), (3, 70, 64), (2, 9, 15)])
def test_native_f32_gemv_within_float32_rounding(M, N, K, variant, monkeypatch):
    """Decode rows through each native kernel: K tails (masked on AVX-512, scalar on AVX2), serial
    (N*K < 2^19) and threaded row ranges; x with an outlier 1000x the rest."""
    from jambatrt.plugins.cpu import linear_f32 as lf
    from jambatrt.plugins.cpu.native import gemv_f32_address
    address = gemv_f32_address(variant)
    assert address, f"the {variant} kernel did not build or load (see the RuntimeWarning)"
    monkeypatch.setattr(lf, "gemv_f32_address", lambda: address)
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, K // 2] = 1000.0
    w = rng.standard_normal((N, K)).astype(np.float32)
    _check(x, w, linear_f32(x, w))


@pytest.mark.parametrize("M", [GEMV_MAX_ROWS + 1, 300])
def test_linear_f32_gemm_and_fallbacks(M, monkeypatch):
    """Prefill chunks (oneDNN's GEMM, or torch's matmul without it), a strided weight view and
    JAMBATRT_NATIVE=0 (torch for every row count) give the same float32 class of result; a
    leading batch shape is kept; a weight of the wrong dtype or width is refused."""
    from jambatrt.plugins.cpu import linear_f32 as lf
    rng = np.random.default_rng(M)
    x = rng.standard_normal((2, M, 300)).astype(np.float32)
    w = rng.standard_normal((260, 300)).astype(np.float32)
    got = linear_f32(x, w)
    assert got.shape == (2, M, 260)
    _check(x.reshape(-1, 300), w, got.reshape(-1, 260))
    monkeypatch.setattr(lf, "_onednn_linear", lambda: False)
    _check(x.reshape(-1, 300), w, linear_f32(x, w).reshape(-1, 260))
    wide = rng.standard_normal((300, 520)).astype(np.float32)
    _check(x[0, :3], wide[:, ::2].T, linear_f32(x[0, :3], wide[:, ::2].T))      # not C-contiguous: torch
    monkeypatch.setenv("JAMBATRT_NATIVE", "0")
    _check(x[0, :2], w, linear_f32(x[0, :2], w))
    with pytest.raises(ValueError, match="linear_f32"):
        linear_f32(x, w.astype(np.float64))
    with pytest.raises(ValueError, match="linear_f32"):
        linear_f32(x, w[:, :7])


def test_ort_lowers_float_linears_and_matches_eager(tiny_artifact, tmp_path):
    """Every MatMul(x, Transpose(w)) of the default export becomes one jamba::LinearF32 (no Transpose
    of a weight left, the weight initializer kept once), and the engine equals the eager model in
    prefill and decode."""
    import shutil
    art = tmp_path / "f32"
    shutil.copytree(tiny_artifact, art)
    run_cli("build", art, "--backend", "ort", check=True)
    m = onnx.load(str(art / "model.ort.onnx"), load_external_data=False)
    inits = {t.name for t in m.graph.initializer}
    assert not any(n.op_type == "Transpose" and n.input[0] in inits for n in m.graph.node)
    linears = [n for n in m.graph.node if n.op_type == "LinearF32"]
    assert not any(n.op_type == "MatMul" for n in m.graph.node)
    ids = np.random.default_rng(2).integers(0, 512, (2, 23))
    ref = EagerReference(art)
    with OrtEngine.load(art) as e:
        cfg = e.config
        # per mamba layer in/x/dt/out, per attention layer q/k/v/o, per dense MLP gate/up/down, the output layer
        assert len(linears) == (4 * cfg.num_mamba_layers + 4 * cfg.num_attention_layers + 3 * cfg.num_dense_layers + 1)
        got, state = e.prefill(ids)
        want = ref.prefill(ids)
        assert_same_model_sums(got, want, cfg, 23, "prefill")
        assert (got.argmax(-1) == want.argmax(-1)).all()
        want_state = ref.prefill_last(ids)[1]
        tok = got[:, -1].argmax(-1)
        lg, _ = e.decode(tok, state)
        wl, _ = ref.decode(tok, want_state)
        assert_same_model_sums(lg, wl, cfg, 24, "decode")
