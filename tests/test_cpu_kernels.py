"""CPU kernels (plugins/cpu) against the `<op>_ref` oracles: table-driven, op x case x dtype, each
with the tolerance of SPEC.tolerances[dtype]; through numpy, through torch.ops.jamba after
register_torch_kernels(), and as one-node ONNX Runtime models."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from torch.testing import assert_close

from conftest import assert_sums_close, native_variants
from jambatrt.export.ops import DOMAIN, SPECS, reference
from jambatrt.plugins.cpu import register_torch_kernels
from jambatrt.plugins.cpu.attention import attention
from jambatrt.plugins.cpu.causal_conv1d import causal_conv1d, causal_conv1d_update
from jambatrt.plugins.cpu.moe_int8 import moe_int8
from jambatrt.plugins.cpu.selective_scan import selective_scan, selective_state_update
from jambatrt.plugins.registry import implementations
from op_test_data import BF16, F32, ROWS, SESSION_ROWS, attn_args, inputs_and_attributes, make, zero_filled
from op_test_data import check_outputs as _check

# the registered implementations (plugins/registry.py), each run at every case of its op's row
CPU = implementations("cpu")
ORT = implementations("ort")
ALL_CASES = [(op, case) for op in CPU for case in ROWS[op].cases]
ORT_CASES = [(op, case) for op in ORT for case in ROWS[op].ort]


def _np(a):
    return a.numpy() if isinstance(a, torch.Tensor) else a


@pytest.fixture(scope="module")
def registered():
    register_torch_kernels()
    register_torch_kernels()          # idempotent


# ---- numpy kernels and torch registration vs the oracle ------------------------------------------
@pytest.mark.parametrize("op,case", ALL_CASES)
def test_numpy_kernel_matches_ref(op, case):
    """The ONNX Runtime op bodies (numpy in/out) on their own, absent inputs as None."""
    args = make(op, case)
    out = ORT[op][0].fn(*map(_np, args))
    for o in out if isinstance(out, tuple) else (out,):
        assert o.dtype == np.float32 and o.flags.c_contiguous
    _check(op, tuple(map(torch.from_numpy, out if isinstance(out, tuple) else (out,))),
           reference(op)(*args), F32)


@pytest.mark.parametrize("dtype", [F32, BF16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("op,case", ALL_CASES)
def test_torch_op_matches_ref(registered, op, case, dtype):
    """Every op takes bf16 on the torch path (computed in fp32, cast back like the ref)."""
    args = make(op, case, dtype)
    out = getattr(torch.ops.jamba, op)(*args)
    ref = reference(op)(*args)
    for a, e in zip(out if isinstance(out, tuple) else (out,), ref if isinstance(ref, tuple) else (ref,)):
        assert a.dtype == e.dtype
    _check(op, out, ref, dtype)


def test_torch_op_runs_the_kernel_not_the_ref(registered):
    """The registered op gives the kernel's bits exactly (the ref differs in the last bits), and the
    eager model's `ref` implementation still calls the plain oracle."""
    from jambatrt.export.model import IMPLS
    args = make("selective_scan", "odd_state")
    y, h = torch.ops.jamba.selective_scan(*args)
    y_np, h_np = selective_scan(*map(_np, args))
    assert np.array_equal(y.numpy(), y_np) and np.array_equal(h.numpy(), h_np)
    assert not torch.equal(y, reference("selective_scan")(*args)[0])
    for op in SPECS:
        assert getattr(IMPLS["ref"], op) is reference(op)


def test_torch_op_outputs_are_fresh(registered):
    """Custom ops may not return views of their inputs (torch checks it too): present_k with no
    past, the scan state with L = 0 and the conv state with K = 1 are the tricky ones."""
    for op, case in [("attention", "prefill"), ("selective_scan", "L0"), ("causal_conv1d", "K1")]:
        args = make(op, case)
        ptrs = {a.data_ptr() for a in args if isinstance(a, torch.Tensor) and a.numel()}
        for o in getattr(torch.ops.jamba, op)(*args):
            assert o.numel() == 0 or o.data_ptr() not in ptrs, f"{op}: an output aliases an input"


def test_model_with_kernels_matches_ref_model(registered):
    """The tiny preset end to end: prefill 33 tokens then decode 2, kernels vs the ref path."""
    from jambatrt.config import preset
    from jambatrt.export.checkpoint import random_tensors
    from jambatrt.export.weights import build_model
    cfg = preset("tiny")
    tensors = random_tensors(cfg, seed=0)
    fast, ref = (build_model(cfg, tensors, impl=impl) for impl in ("custom", "ref"))
    ids = torch.randint(0, cfg.vocab_size, (2, 35), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        lf, sf = fast(ids[:, :33])
        lr, sr = ref(ids[:, :33])
        assert_close(lf, lr, atol=1e-4, rtol=1e-4)
        for t in (33, 34):
            lf, sf = fast(ids[:, t:t + 1], sf)
            lr, sr = ref(ids[:, t:t + 1], sr)
            assert_close(lf, lr, atol=1e-4, rtol=1e-4)


# ---- single step and chunking ------------------------------------------------------------------
def test_selective_state_update_is_one_scan_step():
    u, delta, A, Bm, Cm, D, z, bias, state = map(_np, make("selective_scan", "odd_state"))
    y1, h1 = selective_state_update(state, u[:, :, 0], delta[:, :, 0], A, Bm[:, :, 0], Cm[:, :, 0], D,
                                    z[:, :, 0], bias)
    y, h = selective_scan(u[:, :, :1], delta[:, :, :1], A, Bm[:, :, :1], Cm[:, :, :1], D, z[:, :, :1], bias, state)
    assert y1.shape == u.shape[:2] and h1.shape == state.shape
    np.testing.assert_array_equal(y1, y[:, :, 0])
    np.testing.assert_array_equal(h1, h)


@pytest.mark.parametrize("variant", native_variants("scan", "scan step"))
@pytest.mark.parametrize("B,D", [(1, 2048), (2, 531)])
def test_native_scan_step_matches_numba_step(B, D, variant):
    """mamba_step.c's scan step (d_state 16; the native decode step's) against numba's `_step_kernel`: the
    same exp/log polynomials, C . h summed in another order, so within float32 rounding of each quantity's
    terms; D 531 leaves a masked tail in a 512-channel job and in a 16- (8-, AVX2) channel block."""
    from conftest import sum_error_bound
    from jambatrt.plugins.cpu.mamba_mixer import _scan_step_native
    from jambatrt.plugins.cpu.native import scan_step_address
    from jambatrt.plugins.cpu.selective_scan import _step_kernel_serial
    address = scan_step_address(variant)
    assert address, f"the {variant} scan step did not build or load (see the RuntimeWarning)"
    rng = np.random.default_rng(D)
    f = lambda *shape, s=1.0: (rng.standard_normal(shape) * s).astype(np.float32)
    N = 16
    u, z = f(B, D, 1), f(B, D, 1, s=3.0)
    delta = np.concatenate([f(B, D - 4, 1, s=2.0), np.array([[[25.0], [-30.0], [1e-8], [-90.0]]] * B, np.float32)], 1)
    A, Bm, Cm = -np.exp(f(D, N)), f(B, N, 1), f(B, N, 1)
    Dskip, bias, h0 = f(D), f(D, s=0.5), f(B, D, N)
    want_y, want_h = np.empty((B, D, 1), np.float32), np.empty((B, D, N), np.float32)
    _step_kernel_serial(u, delta, A, Bm, Cm, Dskip, z, True, bias, h0, want_y, want_h)
    y, h = np.full((B, D, 1), np.nan, np.float32), np.full((B, D, N), np.nan, np.float32)
    _scan_step_native(u, delta, A, Bm.reshape(B, N), Cm.reshape(B, N), Dskip, z, bias, h0, y, h, address)
    eps = float(np.finfo(np.float32).eps)
    # h = exp(dt A) h0 + dt u B: exp(dt A) <= 1 and |dt u B| <= |h| + |h0|, each a few roundings
    bound_h = 16 * eps * (np.abs(want_h) + np.abs(h0))
    assert np.isfinite(h).all() and (np.abs(h - want_h) <= bound_h).all(), float(np.abs(h - want_h).max())
    # y = (C . h + Dskip u) silu(z), |silu(z)| <= |z|: the 17-term sum in either order, h's differences, a few roundings
    C = np.abs(Cm.transpose(0, 2, 1))                                     # [B, 1, N]
    abs_sum = (np.abs(want_h) * C).sum(-1, keepdims=True) + np.abs(Dskip[None, :, None] * u)
    bound_y = (2 * sum_error_bound(abs_sum, N + 1) + (bound_h * C).sum(-1, keepdims=True)) * np.abs(z) \
        + 8 * eps * np.abs(want_y)
    assert np.isfinite(y).all() and (np.abs(y - want_y) <= bound_y).all(), float(np.abs(y - want_y).max())


@pytest.mark.parametrize("variant", native_variants("scan_chunk", "prefill scan"))
@pytest.mark.parametrize("B,D,L", [(2, 40, 70), (1, 2048, 33)])
def test_native_prefill_scan_matches_numba_scan(B, D, L, variant):
    """mamba_step.c's prefill-chunk scan (the fused int8 mixer's, time-major rows) against numba's
    `_scan_kernel` on the same rows: the same polynomials, C . h in four partial sums instead of one, so they
    agree within float32 rounding of sums over the chunk's steps and states. D 40 leaves a masked block, L 70
    a partial tile; softplus's two branches and an underflowing exp are in delta."""
    from conftest import sum_error_bound
    from jambatrt.plugins.cpu.mamba_mixer import _scan_chunk_native
    from jambatrt.plugins.cpu.native import scan_chunk_address
    from jambatrt.plugins.cpu.selective_scan import _scan_kernel
    address = scan_chunk_address(variant)
    assert address, f"the {variant} prefill scan did not build or load (see the RuntimeWarning)"
    rng = np.random.default_rng(D + L)
    f = lambda *shape, s=1.0: (rng.standard_normal(shape) * s).astype(np.float32)
    N = 16
    u, xz, Bm, Cm = f(B, L, D), f(B, L, 2 * D, s=3.0), f(B, L, N), f(B, L, N)
    delta = f(B, L, D, s=2.0)
    delta[:, 0, :4] = [25.0, -30.0, 1e-8, -90.0]
    A, Dskip, bias, h0 = -np.exp(f(D, N)), f(D), f(D, s=0.5), f(B, D, N)
    t = lambda a: a.transpose(0, 2, 1)
    want_y, want_h = np.empty((B, L, D), np.float32), np.empty((B, D, N), np.float32)
    _scan_kernel(t(u), t(delta), A, t(Bm), t(Cm), Dskip, t(xz[..., D:]), True, bias, h0, t(want_y), want_h)
    y, h = np.full((B, L, D), np.nan, np.float32), np.full((B, D, N), np.nan, np.float32)
    _scan_chunk_native(u, delta, xz, Bm, Cm, A, Dskip, bias, h0, y, h, address)
    # each state is a sum of L decayed contributions (and h0), y a 17-term sum of them times silu(z): both sides
    # round every term a few times; a wrong index or lane would be off by the terms themselves
    n = 4 * L * (N + 1)
    for got, want, what in ((h, want_h, "state"), (y, want_y, "y")):
        bound = 2 * sum_error_bound(np.abs(want).max(axis=-1, keepdims=True) * (N + 1), n)
        err = np.abs(got.astype(np.float64) - want)
        assert np.isfinite(got).all() and (err <= bound).all(), (what, float(err.max()), float(bound.min()))


def test_native_scan_step_follows_the_native_choice(monkeypatch):
    """JAMBATRT_NATIVE=avx2 stands for a CPU without AVX-512: its scan step is the AVX2 one; =0: none (numba's
    step kernel runs)."""
    from jambatrt.plugins.cpu.native import runnable_variants, scan_step_address
    monkeypatch.setenv("JAMBATRT_NATIVE", "avx2")
    assert scan_step_address() == (scan_step_address("avx2") if "avx2" in runnable_variants("scan") else 0)
    monkeypatch.setenv("JAMBATRT_NATIVE", "0")
    assert scan_step_address() == 0


def test_causal_conv1d_update_is_one_conv_step():
    x, w, b, state = map(_np, make("causal_conv1d", "odd_state"))
    y1, s1 = causal_conv1d_update(x[:, :, 0], w, b, state)
    y, s = causal_conv1d(x[:, :, :1], w, b, state)
    np.testing.assert_array_equal(y1, y[:, :, 0])
    np.testing.assert_array_equal(s1, s)


@pytest.mark.parametrize("split", [1, 63, 64, 100])
def test_scan_in_two_chunks_equals_one_call(split):
    u, delta, A, Bm, Cm, D, z, bias, state = map(_np, make("selective_scan", "odd_state"))
    y, h = selective_scan(u, delta, A, Bm, Cm, D, z, bias, state)
    c = lambda a, sl: np.ascontiguousarray(a[:, :, sl])
    first, rest = slice(0, split), slice(split, None)
    ya, ha = selective_scan(c(u, first), c(delta, first), A, c(Bm, first), c(Cm, first), D, c(z, first), bias, state)
    yb, hb = selective_scan(c(u, rest), c(delta, rest), A, c(Bm, rest), c(Cm, rest), D, c(z, rest), bias, ha)
    # the same operations in the same order: identical bits
    np.testing.assert_array_equal(np.concatenate([ya, yb], axis=2), y)
    np.testing.assert_array_equal(hb, h)


@pytest.mark.parametrize("split", [1, 2, 100])
def test_conv_in_two_chunks_equals_one_call(split):
    x, w, b, state = map(_np, make("causal_conv1d", "odd_state"))
    y, s = causal_conv1d(x, w, b, state)
    ya, sa = causal_conv1d(np.ascontiguousarray(x[:, :, :split]), w, b, state)
    yb, sb = causal_conv1d(np.ascontiguousarray(x[:, :, split:]), w, b, sa)
    np.testing.assert_array_equal(np.concatenate([ya, yb], axis=2), y)
    np.testing.assert_array_equal(sb, s)


@pytest.mark.parametrize("L", [1, 2, 70, 130])
def test_time_major_conv_and_strided_scan_give_the_same_bits(L):
    """The fused int8 mixer's prefill (mamba_mixer.py) keeps its activations time-major: `_conv_kernel_tl`
    reads channels c0.. of a wider [B,L,C] row, and numba's scan kernel (the mixer's scan off AVX-512) takes
    transposed (strided) views. Both give causal_conv1d's and selective_scan's bits, L shorter than the
    carried state included."""
    from jambatrt.plugins.cpu.causal_conv1d import _conv_kernel_tl
    from jambatrt.plugins.cpu.selective_scan import _scan_kernel, _scan_kernel_serial
    rng = np.random.default_rng(L)
    f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    B, D, N, K, c0 = 2, 40, 16, 4, 24
    rows = f(B, L, c0 + D + 8)                         # x is channels c0 .. c0+D-1 of these rows
    w, b, state = f(D, K), f(D), f(B, D, K - 1)
    want, want_state = causal_conv1d(np.ascontiguousarray(rows[..., c0:c0 + D].transpose(0, 2, 1)), w, b, state)
    y, s = np.empty((B, L, D), np.float32), np.empty((B, D, K - 1), np.float32)
    _conv_kernel_tl(rows, c0, np.ascontiguousarray(w.T), b, state, y, s)
    np.testing.assert_array_equal(y.transpose(0, 2, 1), want)
    np.testing.assert_array_equal(s, want_state)
    u, delta, z, Bm, Cm = f(B, L, D), f(B, L, D), f(B, L, D), f(B, L, N), f(B, L, N)
    A, Dskip, bias, h0 = -np.exp(f(D, N)), f(D), f(D), f(B, D, N)
    c = lambda a: np.ascontiguousarray(a.transpose(0, 2, 1))
    want_y, want_h = selective_scan(c(u), c(delta), A, c(Bm), c(Cm), Dskip, c(z), bias, h0)
    t = lambda a: a.transpose(0, 2, 1)
    for kernel in (_scan_kernel, _scan_kernel_serial):
        y, h = np.empty((B, L, D), np.float32), np.empty((B, D, N), np.float32)
        kernel(t(u), t(delta), A, t(Bm), t(Cm), Dskip, t(z), True, bias, h0, t(y), h)
        np.testing.assert_array_equal(t(y), want_y)
        np.testing.assert_array_equal(h, want_h)


def test_attention_in_chunks_with_past_equals_one_call():
    q, k, v, _, _ = map(_np, make("attention", "prefill"))
    o, pk, pv = attention(q, k, v)
    oa, ka, va = attention(q[:, :20], k[:, :20], v[:, :20])
    ob, kb, vb = attention(q[:, 20:], k[:, 20:], v[:, 20:], ka, va)
    atol, rtol = SPECS["attention"].tolerances[F32]
    np.testing.assert_allclose(np.concatenate([oa, ob], axis=1), o, atol=atol, rtol=rtol)
    np.testing.assert_array_equal(kb, pk)
    np.testing.assert_array_equal(vb, pv)


def test_int8_linear_matches_dequantised_matmul():
    """The MoE's decode GEMV (plugins/cpu/linear_int8.py) against a float64 product; the bound is a
    few fp32 eps times the sum of |terms| of each dot product."""
    from jambatrt.plugins.cpu.linear_int8 import linear_int8
    g = torch.Generator().manual_seed(3)
    x = torch.randn(3, 1037, generator=g)                    # H % 8 != 0: exercises the vector tail
    w = torch.randint(-127, 128, (45, 1037), dtype=torch.int8, generator=g)
    scale = torch.rand(45, generator=g)
    out = linear_int8(x.numpy(), w.numpy(), scale.numpy())
    # tolerance from the sums' own magnitude (sum |x_h w_h| * scale), not from |result|: the rounding
    # of 1,037 products does not shrink when they cancel (issue 15, item 9)
    x64, w64, s64 = x.double().numpy(), w.double().numpy(), scale.double().numpy()
    assert_sums_close(out, (x64 @ w64.T) * s64, (np.abs(x64) @ np.abs(w64).T) * s64, n_terms=x.shape[1] + 1,
                      what="int8 linear")
    # and a single wrong term is far beyond that bound: the test still sees a kernel that drops one
    dropped = (x64[:, :-1] @ w64[:, :-1].T) * s64
    with pytest.raises(AssertionError, match="rounding bound"):
        assert_sums_close(dropped, (x64 @ w64.T) * s64, (np.abs(x64) @ np.abs(w64).T) * s64, x.shape[1] + 1)


def test_kernels_reject_bad_shapes():
    u, delta, A, Bm, Cm, D, z, bias, state = map(_np, make("selective_scan", "odd_state"))
    with pytest.raises(ValueError, match="state"):
        selective_scan(u, delta, A, Bm, Cm, D, z, bias, state[:, :3])
    x, w, b, s = map(_np, make("causal_conv1d", "odd_state"))
    with pytest.raises(ValueError, match="bias"):
        causal_conv1d(x, w, b[:3], s)
    args = list(map(_np, make("moe_int8", "odd")))
    with pytest.raises(ValueError, match="w2_scale"):
        moe_int8(*args[:5], args[5][:, :3], args[6])
    q, k, v, pk, pv = map(_np, make("attention", "decode"))
    with pytest.raises(ValueError, match="past_k"):
        attention(q, k, v, pk[:, :, :1], pv)


def test_moe_one_token_fast_path_equals_the_general_path():
    """moe_int8's decode call (one float32 token, well-formed arrays) skips the tensor conversions and
    checks of moe_int8_torch: the same routing and kernel, so the same bits; a malformed one-token call
    still takes the general path and its error."""
    from jambatrt.plugins.cpu.moe_int8 import _one_token_ready, moe_int8_torch
    x, logits, w13, s13, w2, s2, k, *_ = make("moe_int8", "odd")
    for t in range(2):
        args = [_np(a) for a in (x[t:t + 1], logits[t:t + 1], w13, s13, w2, s2)]
        assert _one_token_ready(*args, k, 0)
        want = moe_int8_torch(*map(torch.from_numpy, args), k, 0).numpy()
        np.testing.assert_array_equal(moe_int8(*args, k, 0), want)
    with pytest.raises(ValueError, match="w2_scale"):
        moe_int8(*args[:5], args[5][:, :3], k)
    assert not _one_token_ready(*args[:5], args[5][:, :3], k, 0)


# ---- ONNX Runtime --------------------------------------------------------------------------------
def one_node_model(op: str, **attrs):
    """A model with one jamba::<SPEC.onnx_op_type> node whose inputs/outputs are the graph's."""
    from onnx import TensorProto, helper
    spec = SPECS[op]
    elem = {"int8": TensorProto.INT8}                     # else float32 (activations on ONNX Runtime)
    node = helper.make_node(spec.onnx_op_type, list(spec.inputs), list(spec.outputs), domain=DOMAIN,
                            **attrs)
    graph = helper.make_graph(
        [node], op, [helper.make_tensor_value_info(n, elem.get(t, TensorProto.FLOAT), None)
                     for n, t in zip(spec.inputs, spec.input_types)],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in spec.outputs])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])


def ort_feeds(op, args):
    """The op's arguments as the graph passes them: every input present (module docstring of ort_ops)."""
    inputs, _ = inputs_and_attributes(op, args)
    return {n: a.numpy() for n, a in zip(SPECS[op].inputs, zero_filled(op, inputs))}


@pytest.fixture(scope="module")
def ort_sessions():
    import onnxruntime as ort          # a dependency (pyproject.toml): its absence is a broken install, not a skip
    from jambatrt.plugins.cpu.ort_ops import custom_ops_library
    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_ops_library())
    # ORT's spinning pool threads would compete with the kernels' own threads
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    cache = {}

    def session(op, **attrs):
        key = (op, tuple(sorted(attrs.items())))
        if key not in cache:
            cache[key] = ort.InferenceSession(one_node_model(op, **attrs).SerializeToString(), so,
                                              providers=["CPUExecutionProvider"])
        return cache[key]
    return session


@pytest.mark.parametrize("op,case", ORT_CASES)
def test_ort_op_matches_ref(ort_sessions, op, case):
    from jambatrt.plugins.cpu.ort_ops import run_checked
    args = make(op, case)
    out = run_checked(ort_sessions(op, **inputs_and_attributes(op, args)[1]), None, ort_feeds(op, args))
    _check(op, tuple(map(torch.from_numpy, out)), reference(op)(*args), F32)


@pytest.mark.parametrize("op_type", sorted(SESSION_ROWS))
def test_session_op_equals_the_op_it_stands_for(op_type):
    """Each ONNX Runtime session op in a one-node session, what it finds outside the graph bound
    as the engine binds it, against the plain op; once released, the op reports the key it lost
    (an OrtKernelError, not a crash)."""
    import onnxruntime as ort          # a dependency (pyproject.toml): its absence is a broken install, not a skip
    from onnx import TensorProto, helper

    from jambatrt.plugins.cpu import ort_ops
    from jambatrt.plugins.registry import session_ops
    op = session_ops()[op_type]
    keys: list[str] = []

    def bind(obj):
        keys.append(ort_ops.bind(obj, op_type))
        return keys[-1]
    inputs, attrs, check = SESSION_ROWS[op_type](torch.Generator().manual_seed(0), bind)
    elem = {"int8": TensorProto.INT8, "float32": TensorProto.FLOAT}
    names = [f"in{i}" for i in range(len(op.inputs))]
    outs = [f"out{i}" for i in range(len(op.outputs))]
    graph = helper.make_graph([helper.make_node(op_type, names, outs, domain=DOMAIN, **attrs)], op_type,
                              [helper.make_tensor_value_info(n, elem[t], None) for n, t in zip(names, op.inputs)],
                              [helper.make_tensor_value_info(n, elem[t], None) for n, t in zip(outs, op.outputs)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, 1)])
    so = ort.SessionOptions()
    so.register_custom_ops_library(ort_ops.custom_ops_library())
    session = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    feeds = dict(zip(names, inputs))
    try:
        check(ort_ops.run_checked(session, None, feeds))
    finally:
        ort_ops.release(keys)
    if keys:
        with pytest.raises(ort_ops.OrtKernelError, match=f"jamba::{op_type}: KeyError: .*not bound in this process"):
            ort_ops.run_checked(session, None, feeds)


def test_ort_list_and_array_outputs_agree(ort_sessions):
    """The array-returning invoker gives what onnxruntime-extensions' list path gives."""
    from jambatrt.plugins.cpu.ort_ops import custom_ops_library, run_checked
    feeds = ort_feeds("attention", make("attention", "chunk_after_past"))
    fast = run_checked(ort_sessions("attention"), None, feeds)
    try:
        custom_ops_library(fast_outputs=False)
        slow = run_checked(ort_sessions("attention"), None, feeds)
    finally:
        custom_ops_library()
    for a, b in zip(fast, slow):
        np.testing.assert_array_equal(a, b)


def test_ort_op_error_is_reported_not_fatal(ort_sessions):
    from jambatrt.plugins.cpu import ort_ops
    feeds = ort_feeds("selective_scan", make("selective_scan", "odd_state"))
    feeds["state"] = feeds["state"][:, :4].copy()                 # wrong D: the kernel refuses it
    with pytest.raises(ort_ops.OrtKernelError, match=r"jamba::SelectiveScan: ValueError: .*state"):
        ort_ops.run_checked(ort_sessions("selective_scan"), None, feeds)
    # without the helper: the run completes with NaN outputs of the right shapes, the error waits
    y, h = ort_sessions("selective_scan").run(None, feeds)
    assert y.shape == feeds["u"].shape and np.isnan(y).all() and np.isnan(h).all()
    assert len(ort_ops.take_errors()) == 1 and ort_ops.take_errors() == []


def test_qmoe_matches_moe_int8_ref():
    """com.microsoft::QMoE computes jamba::moe_int8 when given: uint8 = int8 + 128 weights, gate/up
    rows interleaved (swiglu_fusion=1), per-channel fp32 scales, and softmax(logits) as
    router_weights (input 14) -- without it QMoE renormalises the top-k weights."""
    import onnxruntime as ort          # a dependency (pyproject.toml): its absence is a broken install, not a skip
    from onnx import TensorProto, helper
    x, logits, w13, s13, w2, s2, k, _ = make("moe_int8", "odd")
    k = 2
    E, I2, H = w13.shape
    I = I2 // 2
    interleave = lambda a: torch.stack([a[:, :I], a[:, I:]], dim=2).reshape(a.shape)   # g0,u0,g1,u1,...
    feeds = {"x": x.numpy(), "logits": logits.numpy(),
             "fc1": (interleave(w13).to(torch.int16) + 128).to(torch.uint8).numpy(), "fc1_s": interleave(s13).numpy(),
             "fc2": (w2.to(torch.int16) + 128).to(torch.uint8).numpy(), "fc2_s": s2.numpy(),
             "rw": torch.softmax(logits, -1).numpy()}
    node = helper.make_node("QMoE", ["x", "logits", "fc1", "fc1_s", "", "fc2", "fc2_s"] + [""] * 7 + ["rw"], ["y"],
                            domain="com.microsoft", k=k, activation_type="swiglu", swiglu_fusion=1,
                            activation_alpha=1.0, activation_beta=0.0, expert_weight_bits=8,
                            normalize_routing_weights=0)
    elem = {"fc1": TensorProto.UINT8, "fc2": TensorProto.UINT8}
    inputs = [helper.make_tensor_value_info(n, elem.get(n, TensorProto.FLOAT), None) for n in feeds]
    graph = helper.make_graph([node], "qmoe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    y = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    _check("moe_int8", torch.from_numpy(y), reference("moe_int8")(x, logits, w13, s13, w2, s2, k), F32)


# ---- attention decode (L = 1 with past): numba kernel and KV-cache growth in place -----------------
DECODE_PASTS = [0, 1, 2, 63, 64, 65, 1500, 4099]      # tile (64) and split (1024 keys) edges


def _decode_args(P, B=2, Hq=4, Hkv=2, d=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return attn_args(g, B=B, L=1, P=P, Hq=Hq, Hkv=Hkv, d=d)


@pytest.mark.parametrize("P", DECODE_PASTS)
def test_attention_decode_matches_ref(P):
    """Every CPU path of decode against the oracle: present = concat(past, new) exactly, o within
    the op's fp32 tolerance; the scratch path grows the given past arrays themselves."""
    from jambatrt.plugins.cpu.attention import attention_torch
    args = _decode_args(P)
    expected = reference("attention")(*args)
    np_args = [None if a is None else a.numpy() for a in args]
    paths = {"numpy": attention(*np_args), "torch": attention_torch(*args)}
    scratch = [None if a is None else a.copy() for a in np_args]
    paths["scratch"] = attention(*scratch, scratch_inputs=True)
    for name, out in paths.items():
        o, pk, pv = map(torch.as_tensor, out)
        assert torch.equal(pk, expected[1]) and torch.equal(pv, expected[2]), name
        _check("attention", (o, pk, pv), expected, F32)
    if P:
        assert paths["scratch"][1] is scratch[3] and paths["scratch"][2] is scratch[4]   # grown, not copied
        assert paths["numpy"][1] is not np_args[3]


@pytest.mark.parametrize("B,Hq,Hkv,d,P", [(1, 4, 2, 32, 3000), (3, 6, 3, 16, 777), (2, 8, 1, 64, 130),
                                         (1, 4, 4, 8, 5)])
def test_decode_attention_kernel_shapes(B, Hq, Hkv, d, P):
    from jambatrt.plugins.cpu.attention import decode_attention
    q, k, v, pk, pv = _decode_args(P, B=B, Hq=Hq, Hkv=Hkv, d=d, seed=1)
    o_ref, kk, vv = reference("attention")(q, k, v, pk, pv)
    o = decode_attention(q.numpy(), kk.numpy(), vv.numpy())
    assert o.shape == (B, 1, Hq, d) and o.dtype == np.float32
    _check("attention", (torch.from_numpy(o), kk, vv), (o_ref, kk, vv), F32)


def test_attention_scratch_inputs_leave_unowned_past_alone():
    """Arrays that do not own their memory (views, other dtypes) are copied, never resized."""
    q, k, v, pk, pv = (a.numpy() for a in _decode_args(40))
    big_k, big_v = np.concatenate([pk, pk], 1), np.concatenate([pv, pv], 1)
    view_k, view_v = big_k[:, :40], big_v[:, :40]
    o, pk2, pv2 = attention(q, k, v, view_k, view_v, scratch_inputs=True)
    assert view_k.shape == (2, 40, 2, 32) and np.array_equal(big_k[:, :40], pk) and pk2.base is None
    o64, pk3, _ = attention(q, k, v, pk.astype(np.float64), pv.astype(np.float64), scratch_inputs=True)
    np.testing.assert_array_equal(pk2, pk3)
    np.testing.assert_array_equal(o, o64)


def test_attention_scratch_inputs_restored_on_error(monkeypatch):
    """A failure after the cache grew gives the past arrays their shapes back (the ORT error path
    derives its NaN outputs' shapes from the inputs)."""
    import jambatrt.plugins.cpu.attention as attn_mod

    def boom(*_):
        raise RuntimeError("boom")
    monkeypatch.setattr(attn_mod, "_attend", boom)
    q, k, v, pk, pv = (a.numpy().copy() for a in _decode_args(10))
    with pytest.raises(RuntimeError, match="boom"):
        attention(q, k, v, pk, pv, scratch_inputs=True)
    assert pk.shape == pv.shape == (2, 10, 2, 32)


def test_ort_attention_decode_long_past(ort_sessions):
    """The ORT op at batch 2 with a past of several splits: the in-place growth of the op's input
    copies (rows of batch 1 move) gives the oracle's present and output."""
    from jambatrt.plugins.cpu.ort_ops import run_checked
    args = _decode_args(3001)
    out = run_checked(ort_sessions("attention"), None, ort_feeds("attention", args))
    expected = reference("attention")(*args)
    assert np.array_equal(out[1], expected[1].numpy()) and np.array_equal(out[2], expected[2].numpy())
    _check("attention", tuple(map(torch.from_numpy, out)), expected, F32)


def test_attention_scratch_inputs_never_grow_shared_memory():
    """k or v living inside past (or past_k being past_v) is never resized: the result is the copy path's."""
    q, k, v, pk, pv = (a.numpy() for a in _decode_args(30))
    expected = attention(q, k, v, pk, pv)
    same = attention(q, k, v, pk.copy(), pk.copy())
    pk_same = pk.copy()
    got = attention(q, k, v, pk_same, pk_same, scratch_inputs=True)
    assert pk_same.shape == (2, 30, 2, 32)
    for a, b in zip(got, same):
        np.testing.assert_array_equal(a, b)
    np.testing.assert_array_equal(expected[1][:, :30], pk)
    q, k, v, pk, pv = (a.numpy() for a in _decode_args(30, B=1))
    past_k = np.concatenate([pk, k], 1)                # owns its memory, and k is its last token:
    k_view = past_k[:, 30:31]                          # a contiguous view that attention uses as is
    past_v = np.concatenate([pv, v], 1)
    ref = attention(q, k_view.copy(), v, past_k.copy(), past_v.copy())
    got = attention(q, k_view, v, past_k, past_v, scratch_inputs=True)
    assert past_k.shape == (1, 31, 2, 32)
    for a, b in zip(got, ref):
        np.testing.assert_array_equal(a, b)


def test_tune_malloc_is_idempotent():
    from jambatrt.plugins.cpu import ort_ops
    first = ort_ops.tune_malloc()
    assert ort_ops.tune_malloc() == first
    import platform
    if platform.system() == "Linux" and platform.libc_ver()[0] == "glibc":
        assert first


# ---- serial twins ----------------------------------------------------------------------------------
def _twins():
    from jambatrt.plugins.cpu import attention, causal_conv1d, linear_int8, selective_scan
    return [(linear_int8._gemv_int8, linear_int8._gemv_int8_serial),
            (selective_scan._scan_kernel, selective_scan._scan_kernel_serial),
            (selective_scan._step_kernel, selective_scan._step_kernel_serial),
            (causal_conv1d._conv_kernel, causal_conv1d._conv_kernel_serial),
            (attention._decode_kernel, attention._decode_kernel_serial)]


def test_serial_twins_are_cached_under_their_own_names():
    """numba's disk cache keys a kernel by qualified name + signature, not `parallel`: a serial twin
    under its kernel's name is loaded as the parallel kernel (or overwrites it)."""
    for kernel, twin in _twins():
        assert kernel.targetoptions.get("parallel") and not twin.targetoptions.get("parallel")
        assert twin.py_func.__qualname__ != kernel.py_func.__qualname__


def test_parallel_kernel_keeps_its_threads_after_its_serial_twin(tmp_path):
    """In a fresh cache, compile the serial GEMV first, then the parallel one: the parallel one
    must start numba's threading layer (it did not when both came from one function object)."""
    code = ("import numpy as np, numba\n"
            "from jambatrt.plugins.cpu.linear_int8 import _gemv_int8, _gemv_int8_serial\n"
            "x, w = np.ones((1, 64), np.float32), np.ones((64, 64), np.int8)\n"
            "s, o = np.ones(64, np.float32), np.empty((1, 64), np.float32)\n"
            "_gemv_int8_serial(x, w, s, o)\n"
            "_gemv_int8(x, w, s, o)\n"
            "print(numba.threading_layer())\n")
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    for _ in range(2):              # compiled into the empty cache, then loaded from it
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
        assert r.returncode == 0 and r.stdout.strip() in ("omp", "tbb", "workqueue"), r.stderr[-2000:]


def test_import_sets_openmp_wait_before_torch_loads():
    """`import jambatrt` sets threads.OMP_ENV before its first import of torch (which loads libgomp,
    which reads them once), unless the environment already has a value, which wins."""
    from jambatrt.threads import OMP_ENV
    code = ("import builtins, os\n"
            "seen, real = [], builtins.__import__\n"
            "def spy(name, *a, **k):\n"
            "    if name.split('.')[0] == 'torch' and not seen:\n"
            "        seen.append((os.environ.get('OMP_WAIT_POLICY'), os.environ.get('GOMP_SPINCOUNT')))\n"
            "    return real(name, *a, **k)\n"
            "builtins.__import__ = spy\n"
            "import jambatrt\n"
            "print(*seen[0])\n")
    env = {k: v for k, v in os.environ.items() if k not in OMP_ENV}
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == [OMP_ENV["OMP_WAIT_POLICY"], OMP_ENV["GOMP_SPINCOUNT"]], r.stderr
    r = subprocess.run([sys.executable, "-c", code], env=dict(env, GOMP_SPINCOUNT="7"), capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.split() == [OMP_ENV["OMP_WAIT_POLICY"], "7"], r.stderr
