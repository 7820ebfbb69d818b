"""Issue 18: --weights-int8 (every linear layer but the router int8, per output channel), its ORT
lowering to jamba::LinearInt8, and the ORT engine's in-place KV cache."""

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch

from conftest import assert_same_model_sums, native_decode_matches_graph, native_variants, run_cli
from jambatrt.engines.ort import OrtEngine
from jambatrt.export.checkpoint import Checkpoint
from jambatrt.export.quantize import dequantize_linear, quantize_linear
from jambatrt.export.store import MappedStore
from jambatrt.export.weights import build_model
from jambatrt.plugins.cpu.linear_int8 import GEMV_MAX_ROWS, linear_int8
from jambatrt.validate.reference import EagerReference

EPS = float(np.finfo(np.float32).eps)


@pytest.fixture(scope="module")
def int8_artifact(tmp_path_factory, tiny_ckpt):
    art = tmp_path_factory.mktemp("w8") / "tiny-w8"
    run_cli("export", tiny_ckpt, "-o", art, "--weights-int8", check=True)
    run_cli("build", art, "--backend", "ort", check=True)
    return art


def _dot_bound(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """fp32 rounding bound of x @ w.T: a few eps times the sum of |terms| (grows with K and magnitude)."""
    return 4 * x.shape[-1] * EPS * (np.abs(x) @ np.abs(w).T) + 1e-30


@pytest.mark.parametrize("M, N", [(1, 45), (GEMV_MAX_ROWS, 45), (GEMV_MAX_ROWS + 3, 45), (300, 45),
                                  (1, 520), (GEMV_MAX_ROWS, 520)])     # N * K >= 2^19: the GEMV on both threads
def test_linear_int8_kernel_matches_dequantised_matmul(M, N):
    rng = np.random.default_rng(M)
    K = 1037                                                     # K % 8 != 0: vector tails
    x = rng.standard_normal((M, K)).astype(np.float32) * 50
    w = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = rng.random(N).astype(np.float32)
    got = linear_int8(x, w, scale)
    want = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
    assert got.shape == (M, N) and got.dtype == np.float32
    assert (np.abs(got - want) <= _dot_bound(x, w.astype(np.float32)) * scale).all()


@pytest.mark.parametrize("M", [GEMV_MAX_ROWS + 1, 300])
def test_linear_int8_bfloat16_gemm_within_its_rounding_bound(M):
    """compute="bfloat16" (the GEMM path only): the weights exact in bfloat16, the activations and the
    outputs rounded to it (unit roundoff 2^-8 each), fp32 accumulation: |y - exact| <=
    (2 * 2^-8 + K * 2^-24 + 2^-16) * sum_k |x_k w_k| * scale, the last term for the scale's own
    rounding; and a few rows (decode's GEMV) stay float32."""
    from jambatrt.plugins.cpu.linear_int8 import _BF16_OF_INT8
    every = torch.from_numpy(_BF16_OF_INT8.copy()).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(every, np.arange(-128, 128, dtype=np.float32))     # the table is exact
    rng = np.random.default_rng(M)
    K, N = 1037, 300
    x = rng.standard_normal((M, K)).astype(np.float32) * 50
    w = rng.integers(-127, 128, (N, K), dtype=np.int8)
    scale = rng.random(N).astype(np.float32)
    got = linear_int8(x, w, scale, compute="bfloat16")
    want = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
    terms = (np.abs(x).astype(np.float64) @ np.abs(w).astype(np.float64).T) * scale
    assert got.dtype == np.float32
    assert (np.abs(got - want) <= (2 * 2.0 ** -8 + K * 2.0 ** -24 + 2.0 ** -16) * terms).all()
    assert not np.array_equal(got, linear_int8(x, w, scale))          # it is the bfloat16 path
    few = x[:GEMV_MAX_ROWS]
    np.testing.assert_array_equal(linear_int8(few, w, scale, compute="bfloat16"), linear_int8(few, w, scale))
    with pytest.raises(ValueError, match="accepted: float32, bfloat16"):
        linear_int8(x, w, scale, compute="float16")


def _integer_gemm_or_skip():
    from jambatrt.plugins.cpu import linear_int8 as li
    if not li.integer_gemm():
        pytest.skip("the integer-limb GEMM needs a CPU with AVX512-VNNI or AVX-VNNI (oneDNN's int8 GEMM "
                    "saturates 16-bit pair sums without them) and torch._int_mm")
    return li


@pytest.mark.parametrize("M, N, K", [(GEMV_MAX_ROWS + 1, 300, 1037), (300, 520, 128), (77, 256, 3001)])
def test_linear_int8_integer_gemm_within_its_fixed_point_bound(M, N, K, monkeypatch):
    """The GEMM path on 24-bit fixed-point limbs (torch._int_mm on int8): every row of x rounded to
    2^-23 of its max (error <= 1.008 * 2^-24 max|x_m| per element), exact integer sums, float64 scaling,
    one float32 rounding: |y - exact| <= scale * 1.008 * 2^-24 max|x_m| sum_k |w_nk| + 2^-24 |exact|, inside
    the float32 GEMM's own bound. x holds a 1000x outlier, a row of zeros and both signs of the row max
    (the top limb's extremes); w holds -128. Blocks of output columns (a ragged last one) give the same
    bits as one block; JAMBATRT_NATIVE=0 runs the dequantised float32 GEMM."""
    li = _integer_gemm_or_skip()
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[1, K // 3], x[1, K // 2], x[2] = 1000.0, -1000.0, 0.0
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    w[:, 0] = -128
    scale = rng.random(N).astype(np.float32)
    calls = []
    real = li._limb_gemm
    monkeypatch.setattr(li, "_limb_gemm", lambda *a: calls.append(1) or real(*a))
    got = linear_int8(x, w, scale)
    assert calls, "the integer GEMM did not run"
    exact = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
    top = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    bound = scale * 1.008 * 2.0 ** -24 * top * np.abs(w).astype(np.float64).sum(axis=1) + 2.0 ** -24 * np.abs(exact)
    assert (np.abs(got - exact) <= bound).all()
    assert (np.abs(got - exact) <= _dot_bound(x, w.astype(np.float32)) * scale).all()    # float32's bound
    assert (got[2] == 0).all()
    monkeypatch.setattr(li, "_LIMB_BLOCK_BYTES", 12 * M * 100)       # blocks of 100 columns
    np.testing.assert_array_equal(linear_int8(x, w, scale), got)
    monkeypatch.setenv("JAMBATRT_NATIVE", "0")
    n = len(calls)
    off = linear_int8(x, w, scale)
    assert len(calls) == n and not np.array_equal(off, got)
    assert (np.abs(off - exact) <= _dot_bound(x, w.astype(np.float32)) * scale).all()


def test_linear_int8_integer_gemm_leaves_nan_and_inf_rows_to_the_float_path():
    """A NaN or an infinity in x has no fixed-point form: the call runs the float32 GEMM, which
    propagates them as the dequantised matmul does."""
    _integer_gemm_or_skip()
    rng = np.random.default_rng(0)
    x = rng.standard_normal((9, 300)).astype(np.float32)
    x[3, 7], x[5, 2] = np.nan, np.inf
    w = rng.integers(-127, 128, (260, 300), dtype=np.int8)
    got = linear_int8(x, w, np.ones(260, np.float32))
    assert np.isnan(got[3]).all() and not np.isfinite(got[5]).any() and np.isfinite(np.delete(got, [3, 5], 0)).all()


def test_integer_gemm_only_where_its_sums_are_exact(monkeypatch):
    """Without VNNI (oneDNN's AVX2/AVX-512 int8 kernels saturate 16-bit pair sums), or when torch's int8
    GEMM disagrees with int64 arithmetic on the extreme values, the float32 GEMM runs."""
    import jambatrt.plugins.cpu.linear_int8 as li
    monkeypatch.setattr(li, "host_has", lambda f: False)
    li._integer_gemm_exact.cache_clear()
    try:
        assert not li.integer_gemm()
        monkeypatch.setattr(li, "host_has", lambda f: f == "avxvnni")
        monkeypatch.setattr(torch, "_int_mm", lambda a, b: (a.long() @ b.long()).clamp(-2 ** 15, 2 ** 15 - 1).int())
        li._integer_gemm_exact.cache_clear()
        assert not li.integer_gemm()                     # a saturating kernel is caught by the check
    finally:
        monkeypatch.undo()
        li._integer_gemm_exact.cache_clear()


def test_integer_gemm_engine_matches_eager(int8_artifact, monkeypatch):
    """The int8 engine's prefill with every LinearInt8 and mixer projection on the integer GEMM (its
    size thresholds lowered to reach the tiny preset's layers) equals the eager int8 model (F.linear on
    the dequantised weights) within the float32 model tolerances, argmax for argmax."""
    li = _integer_gemm_or_skip()
    monkeypatch.setattr(li, "_LIMB_MIN_N", 1)
    monkeypatch.setattr(li, "_LIMB_MIN_K", 1)
    calls = []
    real = li._limb_gemm
    monkeypatch.setattr(li, "_limb_gemm", lambda *a: calls.append(a[1].shape) or real(*a))
    ids = np.random.default_rng(3).integers(0, 512, (2, 150))
    with OrtEngine.load(int8_artifact) as e:
        got = e.prefill(ids)[0]
        cfg = e.config
    assert len(set(calls)) >= 5, calls                 # in/out/x/dt projections, MLP and attention layers
    want = EagerReference(int8_artifact).prefill(ids)
    assert_same_model_sums(got, want, cfg, 150, "prefill")
    assert (got.argmax(-1) == want.argmax(-1)).all()


def test_prefill_compute_bfloat16_engine(int8_artifact, tmp_path, monkeypatch):
    """build --backend ort --prefill-compute bfloat16: recorded in the engine entry, validated at the
    bfloat16 tolerances (compute_dtype); a decode step and a chunk of up to GEMV_MAX_ROWS rows
    (batch x tokens) are the float32 engine's, bit for bit; longer prompts take the bfloat16 GEMMs, within the
    bfloat16 logits tolerance of the float32 engine. Refused for artifacts without int8 linear
    layers, and on CPUs without bf16 dot products (the engine itself runs on any CPU)."""
    import shutil

    import jambatrt.engines.ort as ort_engine
    from jambatrt.errors import InputError
    from jambatrt.validate.parity import TOLERANCES
    art = tmp_path / "bf16"
    shutil.copytree(int8_artifact, art)
    monkeypatch.setattr(ort_engine, "cpu_has_bf16", lambda: False)
    with pytest.raises(InputError, match="no bf16 dot-product instructions"):
        OrtEngine.build(art, prefill_compute="bfloat16")
    monkeypatch.setattr(ort_engine, "cpu_has_bf16", lambda: True)
    OrtEngine.build(art, prefill_compute="bfloat16")
    ids = np.random.default_rng(4).integers(0, 512, (2, 40))
    with OrtEngine.load(art) as e, OrtEngine.load(int8_artifact) as f:
        assert e.entry["settings"]["prefill_compute"] == "bfloat16" and e.compute_dtype == "bfloat16"
        assert f.compute_dtype == "float32"
        short = GEMV_MAX_ROWS // ids.shape[0]              # batch x tokens rows: the GEMV
        short_e, st_e = e.prefill(ids[:, :short])
        short_f, st_f = f.prefill(ids[:, :short])
        np.testing.assert_array_equal(short_e, short_f)
        np.testing.assert_array_equal(e.decode(ids[:, 5], st_e)[0], f.decode(ids[:, 5], st_f)[0])
        long_e, long_f = e.prefill(ids)[0], f.prefill(ids)[0]
        tol = TOLERANCES["bfloat16"]
        assert not np.array_equal(long_e, long_f)
        assert (np.abs(long_e - long_f) <= tol["atol"] + tol["rtol"] * np.abs(long_f)).all()


def test_prefill_compute_bfloat16_needs_int8_linears(tiny_artifact, tmp_path):
    import shutil

    from jambatrt.errors import InputError
    art = tmp_path / "f32"
    shutil.copytree(tiny_artifact, art)
    with pytest.raises(InputError, match="for the int8 kernels of --weights-int8 artifacts"):
        OrtEngine.build(art, prefill_compute="bfloat16")


@pytest.mark.parametrize("variant", native_variants("gemm", "prefill GEMM"))
@pytest.mark.parametrize("weights", ["int8", "float32"])
@pytest.mark.parametrize("M, N, K", [(5, 16, 7), (97, 45, 1037), (130, 2080, 600), (13, 33, 8)])
def test_native_gemm_within_the_float32_bound(M, N, K, weights, variant):
    """gemm.c: float32 products and sums (and for int8 weights the scale on the finished sums), so |y -
    exact| <= scale * K 2^-24 sum_k |x w| + 2^-24 |exact| (the product with the scale). Shapes: partial
    register tiles in both directions (M % 6, N % 16), more rows than one packed block of x (96), K over one
    block (512) and not a multiple of 8 (the packing's scalar columns), more columns than one block of w
    (1024); two parts (the columns split over threads), x with an outlier 1000x the rest."""
    from jambatrt.plugins.cpu.linear_int8 import _gemm
    from jambatrt.plugins.cpu.native import gemm_address, gemm_scratch
    rng = np.random.default_rng(M * N + K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, K // 3] = 1000.0
    if weights == "int8":
        w, scale = rng.integers(-128, 128, (N, K), dtype=np.int8), rng.random(N).astype(np.float32)
    else:
        w, scale = rng.standard_normal((N, K)).astype(np.float32), np.ones(0, np.float32)
    address = gemm_address(variant)
    assert address, f"the {variant} GEMM did not build or load (see the RuntimeWarning)"
    got = np.full((M, N), np.nan, np.float32)
    _gemm(x, w, int(weights == "float32"), scale, got, address, np.empty((2, gemm_scratch()), np.float32))
    s = scale.astype(np.float64) if scale.size else 1.0
    w64 = w.astype(np.float64)
    exact = (x.astype(np.float64) @ w64.T) * s
    bound = s * K * 2.0 ** -24 * (np.abs(x).astype(np.float64) @ np.abs(w64).T) + 2.0 ** -24 * np.abs(exact)
    assert (np.abs(got - exact) <= bound).all()


@pytest.mark.parametrize("variant", native_variants("gemm", "prefill GEMM"))
def test_linear_layers_run_the_native_gemm_where_it_is_chosen(monkeypatch, variant):
    """Where native_gemm() gives the kernel (AVX2 without AVX-512, for int8 weights without the integer limb
    GEMM; forced here as on such a CPU), the GEMM path of linear_int8 and of linear_f32 is that kernel: the
    same bits as calling it; NaN and inf rows carry through (float32 arithmetic, as torch's GEMM)."""
    from jambatrt.plugins.cpu import linear_int8 as li
    from jambatrt.plugins.cpu.linear_f32 import linear_f32
    monkeypatch.setenv("JAMBATRT_NATIVE", variant)
    monkeypatch.setattr(li, "integer_gemm", lambda: False)
    address, scratch = li.native_gemm()
    assert address and li.native_gemm(int8=False)[0] == address
    rng = np.random.default_rng(4)
    x = rng.standard_normal((40, 300)).astype(np.float32)
    x[3, 5], x[7, 0] = np.nan, np.inf
    w = rng.integers(-128, 128, (70, 300), dtype=np.int8)
    wf = rng.standard_normal((70, 300)).astype(np.float32)
    scale = rng.random(70).astype(np.float32)
    for got, weights, flag, s in ((linear_int8(x, w, scale), w, 0, scale),
                                  (linear_f32(x, wf), wf, 1, np.ones(0, np.float32))):
        want = np.empty((40, 70), np.float32)
        li._gemm(x, weights, flag, s, want, address, scratch)
        np.testing.assert_array_equal(got, want)
        assert np.isnan(got[3]).all() and not np.isfinite(got[7]).any()
        assert np.isfinite(np.delete(got, [3, 7], 0)).all()


def test_linear_int8_kernel_rejects_bad_shapes():
    with pytest.raises(ValueError, match="linear_int8"):
        linear_int8(np.zeros((1, 8), np.float32), np.zeros((4, 9), np.int8), np.ones(4, np.float32))


def test_quantize_linear_per_output_channel():
    w = torch.randn(6, 33)
    w[2] = 0
    q, s = quantize_linear(w)
    assert q.dtype == torch.int8 and s.shape == (6,) and torch.equal(s, w.abs().amax(-1) / 127)
    assert (q[2] == 0).all() and ((dequantize_linear(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()


def test_store_holds_int8_weights_once(int8_artifact):
    """Every linear weight but the router's is int8 with an fp32 scale per row; no float copy; the
    embedding and the router stay float."""
    store = MappedStore(int8_artifact / "weights.safetensors")
    names = set(store.names())
    int8 = sorted(n for n in names if store.tensor(n).dtype == torch.int8 and n.endswith(".weight"))
    assert any("mamba.in_proj" in n for n in int8) and any("self_attn.q_proj" in n for n in int8)
    assert "lm_head.weight" in int8
    for n in int8:
        assert store.tensor(n + "_scale").shape == (store.tensor(n).shape[0],)
        assert store.tensor(n + "_scale").dtype == torch.float32
    assert store.tensor("model.embed_tokens.weight").dtype == torch.float32
    assert all(store.tensor(n).dtype == torch.float32 for n in names if n.endswith("router.weight"))


def test_weights_int8_equals_dequantised_model(tiny_ckpt):
    """The int8 model equals the float model whose linear weights are the dequantised int8 ones (to
    fp32 rounding, bounded by the logits' magnitude and the layer widths); the gap to the
    unquantised model is reported."""
    ck = Checkpoint(tiny_ckpt)
    cfg, tensors = ck.config, {n: ck.get(n) for n in ck.names()}
    int8 = build_model(cfg, tensors, weights_int8=True)
    deq = dict(tensors)
    for n, b in int8.named_buffers():
        if b.dtype == torch.int8 and n.endswith(".weight"):
            deq[n] = dequantize_linear(b, int8.get_buffer(n + "_scale"))
    dq, full = build_model(cfg, deq), build_model(cfg, tensors)
    ids = torch.randint(0, cfg.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        a, b, c = int8(ids)[0], dq(ids)[0], full(ids)[0]
    tol = 64 * EPS * cfg.num_hidden_layers * max(cfg.hidden_size, cfg.intermediate_size) * b.abs().max().item()
    assert (a - b).abs().max().item() <= tol
    gap = (a - c).abs().max().item()
    print(f"\nweights-int8 vs dequantised: {(a - b).abs().max().item():.2e} (bound {tol:.2e}); "
          f"vs unquantised model: {gap:.3e} (max |logit| {c.abs().max().item():.2f})")
    assert gap > 0     # quantisation is really applied


def test_ort_lowers_int8_linears_and_matches_eager(int8_artifact):
    """The engine graph: every int8 linear layer a LinearInt8, every Mamba mixer one fused
    MambaMixerInt8 (graph/passes/fuse_mamba_mixer.py); prefill (the mixers' kernels called from
    Python) and decode steps (one numba call per mixer) equal the eager int8 model."""
    m = onnx.load(str(int8_artifact / "model.ort.onnx"), load_external_data=False)
    ops = [n.op_type for n in m.graph.node]
    assert not any(n.op_type == "Cast" and n.input[0].endswith("proj.weight") for n in m.graph.node)
    ids = np.random.default_rng(1).integers(0, 512, (2, 37))
    ref = EagerReference(int8_artifact)
    with OrtEngine.load(int8_artifact) as e:
        cfg = e.config
        assert ops.count("MambaMixerInt8") == cfg.num_mamba_layers and "SelectiveScan" not in ops
        assert ops.count("LinearInt8") == 4 * cfg.num_attention_layers + 3 * cfg.num_dense_layers + 1
        got, state = e.prefill(ids)
        want = ref.prefill(ids)
        assert_same_model_sums(got, want, cfg, 37, "prefill")
        assert (got.argmax(-1) == want.argmax(-1)).all()
        last, _ = e.prefill_last(ids)                   # the int8 output layer on the last position only
        assert_same_model_sums(last, want[:, -1], cfg, 37, "prefill_last")
        want_state = ref.prefill_last(ids)[1]
        for t in range(3):
            tok = got[:, -1].argmax(-1) if t == 0 else lg.argmax(-1)
            lg, state = e.decode(tok, state)
            wl, want_state = ref.decode(tok, want_state)
            assert_same_model_sums(lg, wl, cfg, 38 + t, f"decode {t}")


def test_in_place_kv_cache_equals_copied_state(tiny_artifact):
    """Decode through the in-place KV cache (the default session) equals the session that passes
    the cache through ONNX Runtime, including a branch from an older state (which must not see
    the newer tokens) and a state the caller cut."""
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    ids = np.random.default_rng(2).integers(0, 512, (1, 40))
    with OrtEngine.load(tiny_artifact) as fast, OrtEngine(tiny_artifact, map_weights=False) as plain:
        assert fast.kv_cached and not plain.kv_cached
        lf, sf = fast.prefill(ids)
        lp, sp = plain.prefill(ids)
        states_f, states_p = [sf], [sp]
        for t in range(5):
            lf, sf = fast.decode([t + 3], sf)
            lp, sp = plain.decode([t + 3], sp)
            states_f.append(sf)
            states_p.append(sp)
            assert_same_model_sums(lf, lp, fast.config, 40 + t + 1, f"decode {t}")
        for a, b in zip(sf, sp):
            assert_same_model_sums(a, b, fast.config, 45, "state")
        branch_f, _ = fast.decode([7], states_f[2])            # an older state: its cache was advanced since
        branch_p, _ = plain.decode([7], states_p[2])
        assert_same_model_sums(branch_f, branch_p, fast.config, 43, "branch")
        again, _ = fast.decode([8], sf)                        # the latest state is intact after the branch
        again_p, _ = plain.decode([8], sp)
        assert_same_model_sums(again, again_p, fast.config, 46, "after the branch")


def test_fuse_mamba_mixer_leaves_a_mixer_whose_intermediates_are_read_elsewhere(int8_artifact):
    """The fusion only removes what nothing else reads: a mixer one of whose intermediate tensors
    is also a graph output stays as it is; the others are fused."""
    from jambatrt.config import JambaConfig
    from jambatrt.graph.onnx_export import load_onnx
    from jambatrt.graph.passes import PassSettings, fuse_mamba_mixer, fuse_rms_norm, lower_linear_int8, run_passes
    from jambatrt.graph.passes import materialize_optional_inputs
    cfg = JambaConfig.load(int8_artifact / "config.json")
    s = PassSettings()
    m = run_passes(load_onnx(int8_artifact / "model.onnx", load_external_data=False), s,
                   [materialize_optional_inputs, lower_linear_int8, fuse_rms_norm])
    scan = next(n for n in m.graph.node if n.op_type == "SelectiveScan")
    m.graph.output.append(onnx.helper.make_tensor_value_info(scan.input[1], onnx.TensorProto.FLOAT, None))
    ops = [n.op_type for n in fuse_mamba_mixer(m, s).graph.node]
    assert ops.count("MambaMixerInt8") == cfg.num_mamba_layers - 1
    assert ops.count("SelectiveScan") == ops.count("CausalConv1d") == 1


def test_fused_mixer_step_is_a_process_first_parallel_kernel():
    """A decode step of the fused mixer whose GEMVs run on numba's threads, as the first parallel
    kernel of a fresh process (the first step of `jambatrt validate` from the empty state): the
    kernels it calls from compiled code cannot start numba's threading layer themselves."""
    code = ("import numpy as np\n"
            "from jambatrt.plugins.cpu.mamba_mixer import mamba_mixer_int8\n"
            "r = np.random.default_rng(0)\n"
            "f = lambda *s: r.standard_normal(s).astype(np.float32)\n"
            "i8 = lambda *s: r.integers(-127, 127, s, dtype=np.int8)\n"
            "H, D, N, R, K = 256, 1024, 4, 8, 4\n"           # in_proj 2D x H = 2^19 weights: both threads
            "y, c, s = mamba_mixer_int8(f(1, 1, H), f(1, D, K - 1), f(1, D, N), f(D, K), f(D), -np.exp(f(D, N)), f(D),\n"
            "    f(D), f(R), f(N), f(N), i8(2 * D, H), f(2 * D), i8(R + 2 * N, D), f(R + 2 * N), i8(D, R), f(D),\n"
            "    i8(H, D), f(H), eps=1e-6)\n"
            "assert np.isfinite(y).all() and y.shape == (1, 1, H)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"exit {r.returncode}: {r.stderr[-2000:]}"


# ---- the native int8 GEMV (plugins/cpu/gemv_int8.c) ---------------------------------------------------
def _variants() -> list:
    """One param per kernel of gemv_int8.c (conftest.native_variants)."""
    return native_variants("int8", "int8 GEMV")


def _native_gemv(x, w, scale, variant):
    from jambatrt.plugins.cpu.linear_int8 import _gemv_int8, _gemv_int8_serial
    from jambatrt.plugins.cpu.native import gemv_int8_address
    out = np.full((x.shape[0], w.shape[0]), -1.0, np.float32)
    kernel = _gemv_int8_serial if w.size < 1 << 19 else _gemv_int8
    address = gemv_int8_address(variant)
    assert address, f"the {variant} kernel did not build or load (see the RuntimeWarning)"
    kernel(np.ascontiguousarray(x), w, scale, out, address)
    return out


@pytest.mark.parametrize("variant", _variants())
@pytest.mark.parametrize("M, N, K", [(1, 300, 64), (4, 45, 1037), (1, 600, 1050), (2, 70, 9000)])
def test_native_gemv_within_its_fixed_point_bound(M, N, K, variant):
    """x as 31-bit fixed point per row (rounding error <= 2^-31 max|x| per element), exact integer sums,
    one float32 rounding of the product: |y - exact| <= scale * 2^-31 max|x_m| sum_k |w_nk| + 2^-23 |exact|.
    Shapes: a tail of K % 32 != 0 (masked loads; AVX2: K % 32 >= 16 runs its 16-weight step), K > 4096 (the lanes' int64 flush), several rows of x,
    serial (N*K < 2^19) and threaded; x with an outlier 1000x the rest."""
    rng = np.random.default_rng(K)
    x = rng.standard_normal((M, K)).astype(np.float32)
    x[:, K // 3] = 1000.0
    w = rng.integers(-128, 128, (N, K), dtype=np.int8)
    scale = rng.random(N).astype(np.float32)
    got = _native_gemv(x, w, scale, variant)
    exact = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
    top = np.abs(x).max(axis=1, keepdims=True).astype(np.float64)
    bound = scale * 2.0 ** -31 * top * np.abs(w).astype(np.float64).sum(axis=1) * 1.001 + 2.0 ** -23 * np.abs(exact)
    assert (np.abs(got - exact) <= bound).all()
    assert (np.abs(got - exact) <= _dot_bound(x, w.astype(np.float32)) * scale).all()    # the float32 loop's bound


@pytest.mark.parametrize("variant", _variants())
def test_native_gemv_sums_do_not_overflow(variant):
    """The largest products the fixed point makes (|lo| = 2^15 against w = -128) over K = 9000: the int32
    lanes would pass 2^31 without their flush to int64 (every 4096 weights; 2048 on AVX2). Exact here."""
    K = 9000
    x = np.full((1, K), 1.0 - 2.0 ** -15, np.float32)      # fixed point 2^30 - 2^15: hi 2^14, lo -2^15
    x[0, 0] = 1.0
    w = np.full((3, K), -128, np.int8)
    got = _native_gemv(x, w, np.ones(3, np.float32), variant)
    exact = -128.0 * x.astype(np.float64).sum()
    np.testing.assert_allclose(got, exact, rtol=2.0 ** -23, atol=0)


@pytest.mark.parametrize("variant", _variants())
def test_native_gemv_propagates_nan_and_inf_and_zero_rows(variant):
    """A row of x with a NaN or an infinity cannot be fixed point: the call runs the float32 loop, whose
    outputs carry them; a zero row gives zeros."""
    rng = np.random.default_rng(3)
    w = rng.integers(-127, 128, (700, 1024), dtype=np.int8)
    scale = np.ones(700, np.float32)
    x = rng.standard_normal((3, 1024)).astype(np.float32)
    x[1] = 0.0
    clean = _native_gemv(x, w, scale, variant)
    assert (clean[1] == 0).all()
    for bad in (np.nan, np.inf):
        y = x.copy()
        y[0, 7] = bad
        got = _native_gemv(y, w, scale, variant)
        assert not np.isfinite(got[0]).any()
        assert (got[1] == 0).all()
        np.testing.assert_allclose(got[2], clean[2], rtol=4 * 1024 * EPS, atol=1e-3)


def test_native_gemv_falls_back_with_a_warning_and_leaves_no_partial_library(tmp_path, monkeypatch):
    """A compile that fails (here: a flag the compiler refuses) warns once, names why, returns 0 (the numba
    loop runs) and leaves nothing in the cache directory; a cached library that does not load is rebuilt;
    JAMBATRT_NATIVE=0 turns it off without a warning, a value it does not know is named in one."""
    import warnings

    from jambatrt.plugins.cpu import native
    monkeypatch.setattr(native, "_cache_dirs", lambda: [tmp_path / "other"])
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_FLAGS", (*native._FLAGS, "-O0"))   # these builds are private: 6x faster
    monkeypatch.setenv("JAMBATRT_NATIVE", "off")              # a value it does not know: said, then the default
    with pytest.warns(RuntimeWarning, match="'off' is not one of 0, 1, avx512vnni, avx2"):
        native.gemv_int8_address()
    lib_dir = tmp_path / "lib"
    monkeypatch.setattr(native, "_cache_dirs", lambda: [lib_dir])
    monkeypatch.setenv("JAMBATRT_NATIVE", "0")
    monkeypatch.setattr(native, "_state", {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert native.gemv_int8_address() == 0
    if not native.runnable_variants() or native._compiler() is None:
        pytest.skip("needs an x86-64 CPU with AVX2 or AVX512-VNNI and a C compiler")
    monkeypatch.delenv("JAMBATRT_NATIVE")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_FLAGS", (*native._FLAGS, "-fno-such-flag-jambatrt"))
    with pytest.warns(RuntimeWarning, match="not available.*exited"):
        assert native.gemv_int8_address() == 0
    assert list(lib_dir.iterdir()) == []
    monkeypatch.setattr(native, "_FLAGS", native._FLAGS[:-1])
    monkeypatch.setattr(native, "_state", {})
    key_path = native._build(native._compiler())     # a good build, then corrupted in place
    key_path.write_bytes(b"not a shared object")
    assert native.gemv_int8_address() != 0
    assert key_path.read_bytes()[:4] == b"\x7fELF"


@pytest.mark.parametrize("variant", _variants())
def test_native_gemv_takes_strided_arrays_as_the_loop_does(variant):
    """The C kernel reads w, scale and out as C-contiguous rows: strided views run the numba loop and give
    what the contiguous copies give, within the float32 loop's bound."""
    from jambatrt.plugins.cpu.linear_int8 import _gemv_int8_serial
    from jambatrt.plugins.cpu.native import gemv_int8_address
    rng = np.random.default_rng(9)
    w = rng.integers(-127, 128, (64, 200), dtype=np.int8)[:, ::2]          # rows of stride 200
    x = rng.standard_normal((1, 100)).astype(np.float32)
    scale = rng.random(128).astype(np.float32)[::2]
    out = np.zeros((1, 128), np.float32)[:, ::2]
    assert gemv_int8_address(variant), f"the {variant} kernel did not build or load"
    _gemv_int8_serial(x, w, scale, out, gemv_int8_address(variant))
    want = (x.astype(np.float64) @ w.astype(np.float64).T) * scale
    assert (np.abs(out - want) <= _dot_bound(x, w.astype(np.float32)) * scale).all()


def test_native_decode_matches_graph_decode_int8_weights(int8_artifact):
    native_decode_matches_graph(int8_artifact, seed=3)
