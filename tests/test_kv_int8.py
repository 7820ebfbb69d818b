"""The int8 KV cache of the ORT engine (`build --backend ort --kv-cache int8`, plugins/cpu/kv_int8.py):
the quantiser against its torch twin, the decode kernel over int8 against the attention oracle on
the dequantised cache, the engine's cache and state hand-out, and the engine against the eager model
that rounds K/V the same way (what `jambatrt validate` checks)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import native_decode_matches_graph, native_variants, run_cli
from jambatrt.export.ops import reference
from jambatrt.export.ops.attention import SPEC as ATTENTION_SPEC
from jambatrt.plugins.cpu.kv_int8 import (KV_GROUP, QuantizedKV, dequantize_kv, fake_quant_kv, kv_group, quant_step,
                                          quantize_kv)
from op_test_data import F32, attn_args
from op_test_data import check_outputs as _check


def _values(shape, seed=0):
    """Normal values with a zero group, a 1000x outlier and a tiny group, in [..., d]."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal(shape).astype(np.float32)
    flat = x.reshape(-1, shape[-1])
    g = kv_group(shape[-1])
    flat[0, :g] = 0.0
    flat[1, 3] = 1000.0
    flat[2, :g] *= 1e-30
    return x


@pytest.mark.parametrize("d", [8, 32, 48, 128])
def test_quantize_matches_torch_twin_and_bounds(d):
    x = _values((3, 37, 2, d))
    q, s = quantize_kv(x)
    G = d // kv_group(d)
    assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (3, 37, 2, G)
    assert kv_group(d) == (KV_GROUP if d % KV_GROUP == 0 else d)
    assert np.abs(q.astype(np.int32)).max() == 127 and q.min() >= -127
    deq = dequantize_kv(q, s)
    # the eager reference's rounding (torch) gives the same float32 numbers
    np.testing.assert_array_equal(deq, fake_quant_kv(torch.from_numpy(x)).numpy())
    # round to nearest: half a step per element (+ the float32 rounding of q * s and of the scale)
    step = quant_step(x)
    assert (np.abs(deq.astype(np.float64) - x) <= 0.5 * step * (1 + 1e-6) + np.finfo(np.float32).eps * np.abs(x)).all()
    assert (deq.reshape(-1, d)[0, :kv_group(d)] == 0).all()          # a zero group stays zero (scale 0)
    # quantising what was handed out gives it back: a state returned to a cache is not rounded twice
    q2, s2 = quantize_kv(deq)
    np.testing.assert_array_equal(q2, q)
    np.testing.assert_array_equal(s2, s)


def test_quantize_nonfinite_group_reads_nan():
    x = _values((2, 5, 1, 64))
    x[0, 1, 0, 40] = np.nan
    x[1, 2, 0, 3] = np.inf
    deq = dequantize_kv(*quantize_kv(x))
    ref = fake_quant_kv(torch.from_numpy(x)).numpy()
    for b, t, lo in ((0, 1, 32), (1, 2, 0)):
        assert np.isnan(deq[b, t, 0, lo:lo + 32]).all() and np.isnan(ref[b, t, 0, lo:lo + 32]).all()
    finite = np.isfinite(x).all(-1, keepdims=True)
    assert np.isfinite(deq[np.broadcast_to(finite, x.shape)]).all()


def _takes_integer_path(address: int, d: int) -> bool:
    """Whether the decode kernel at `address` runs attention_decode.c's integer path (attn_vnni, attn_i16 on
    AVX2) on an int8 cache of head dimension d: the AVX512-VNNI or AVX2 entry point, groups of 32 channels,
    d <= 256."""
    from jambatrt.plugins.cpu.native import attention_decode_address, runnable_variants
    entries = [attention_decode_address(v) for v in ("avx512vnni", "avx2") if v in runnable_variants("attention")]
    return address != 0 and address in entries and kv_group(d) == 32 and d <= 256


def _query_rounded_to_int16(q: torch.Tensor) -> torch.Tensor:
    """q [B,1,Hq,d] as the integer path uses it: q * d^-0.5 rounded per group of 32 channels to qi * (max|q| /
    32767), qi = rint(q * (32767 / max|q|)) in float32, then divided by d^-0.5 again for the oracle."""
    d = q.shape[-1]
    qs = (q.numpy() * np.float32(d ** -0.5)).astype(np.float32).reshape(*q.shape[:-1], d // 32, 32)
    top = np.abs(qs).max(-1, keepdims=True)
    inv = np.where(top > 0, np.float32(32767) / np.where(top > 0, top, 1), 0).astype(np.float32)
    qr = np.rint(qs * inv) * (top / np.float32(32767))
    return torch.from_numpy((qr.reshape(q.shape) / np.float32(d ** -0.5)).astype(np.float32))


def _check_int8(o, q, kd, vd, vq, vs, integer: bool):
    """o (decode over the int8 cache) against the attention oracle over its dequantised values kd, vd at
    the op's float32 tolerance. When the integer path ran: the oracle takes the query as that path
    rounds it (_query_rounded_to_int16), and o may differ further by the rounding of the softmax weights
    times the value scales to 16 bits per tile (<= 64 positions): each p' = p vs by at most half a step of
    its tile's largest, so by at most min(p', max p' within 63 positions / 65534) relative to the global
    maximum, and the numerator by the sum over t of that times |v_int| (over the softmax's sum; x2 for
    slack)."""
    B, _, Hq, d = q.shape
    k_new, v_new, k_past, v_past = kd[:, -1:], vd[:, -1:], kd[:, :-1], vd[:, :-1]
    qq = _query_rounded_to_int16(q) if integer else q
    o_ref, _, _ = reference("attention")(qq, k_new, v_new, k_past, v_past)
    extra = torch.zeros_like(o_ref)
    if integer:
        g = Hq // kd.shape[2]
        kh = kd.double().repeat_interleave(g, dim=2)                                 # [B, S, Hq, d]
        s = torch.einsum("bhd,bthd->bht", qq[:, 0].double() * d ** -0.5, kh)
        p = torch.exp(s - s.amax(-1, keepdim=True))                                 # [B, Hq, S]
        vsh = torch.from_numpy(vs).double().repeat_interleave(g, dim=2)              # [B, S, Hq, G]
        pv = p.transpose(1, 2)[..., None] * vsh                                      # p', [B, S, Hq, G]
        near = torch.nn.functional.max_pool1d(pv.permute(0, 2, 3, 1).reshape(-1, 1, pv.shape[1]), 127, 1, 63)
        near = near.reshape(pv.shape[0], *pv.shape[2:], pv.shape[1]).permute(0, 3, 1, 2)  # max p' within 63
        err_t = torch.minimum(pv, near / 65534)                                      # rounding error of p'
        vint = torch.from_numpy(vq).double().abs().repeat_interleave(g, dim=2)       # [B, S, Hq, d]
        num = (err_t.repeat_interleave(32, dim=-1) * vint).sum(1)                    # [B, Hq, d]
        extra = (2 * num / p.sum(-1)[..., None]).float()[:, None]
    atol, rtol = ATTENTION_SPEC.tolerances[torch.float32]
    err = (torch.as_tensor(o) - o_ref).abs()
    bound = atol + rtol * o_ref.abs() + extra
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g} (max error {err.max().item():.3g})"


@pytest.mark.parametrize("B,Hq,Hkv,d,P", [(1, 4, 2, 32, 3000), (3, 6, 3, 16, 777), (2, 8, 2, 128, 1500),
                                         (1, 4, 4, 64, 5)])
def test_decode_kernel_int8_matches_oracle_on_dequantised_cache(B, Hq, Hkv, d, P):
    """decode_attention over int8 K/V with scales == the attention oracle over their float32 values,
    within the op's float32 tolerance: the kernel dequantises as it reads, nothing else differs (on
    AVX512-VNNI and AVX2, but for the integer path's two roundings to 16 bits, _check_int8)."""
    from jambatrt.plugins.cpu.attention import attention_decode_address, decode_attention
    q, k, v, pk, pv = attn_args(torch.Generator().manual_seed(3), B=B, L=1, P=P, Hq=Hq, Hkv=Hkv, d=d)
    kk, vv = torch.cat([pk, k], 1).numpy(), torch.cat([pv, v], 1).numpy()
    (kq, ks), (vq, vs) = quantize_kv(kk), quantize_kv(vv)
    kd, vd = torch.from_numpy(dequantize_kv(kq, ks)), torch.from_numpy(dequantize_kv(vq, vs))
    o = decode_attention(q.numpy(), kq, vq, ks, vs)
    assert o.shape == (B, 1, Hq, d) and o.dtype == np.float32
    _check_int8(torch.from_numpy(o), q, kd, vd, vq, vs, _takes_integer_path(attention_decode_address(), d))
    if B > 1:      # the engine's cache views: batch-strided (capacity > length)
        cap = P + 40
        kb, vb = np.zeros((B, cap, Hkv, d), np.int8), np.zeros((B, cap, Hkv, d), np.int8)
        sk, sv = np.zeros((B, cap, Hkv, d // kv_group(d)), np.float32), np.zeros_like(ks, shape=(B, cap) + ks.shape[2:])
        kb[:, :P + 1], vb[:, :P + 1], sk[:, :P + 1], sv[:, :P + 1] = kq, vq, ks, vs
        o2 = decode_attention(q.numpy(), kb[:, :P + 1], vb[:, :P + 1], sk[:, :P + 1], sv[:, :P + 1])
        np.testing.assert_array_equal(o2, o)


def _attention_variants() -> list:
    return ["numba"] + native_variants("attention", "decode attention kernel")


@pytest.mark.parametrize("variant", _attention_variants())
@pytest.mark.parametrize("B,Hq,Hkv,d,P", [(1, 4, 2, 32, 5000), (2, 8, 2, 128, 1500), (1, 6, 2, 16, 70),
                                         (3, 16, 1, 64, 130), (1, 64, 4, 16, 33), (2, 6, 3, 48, 300),
                                         (1, 16, 2, 96, 200), (1, 2, 2, 256, 90), (1, 20, 5, 128, 100),
                                         (2, 18, 9, 128, 77)])
def test_decode_attention_kernels_float32_and_int8(B, Hq, Hkv, d, P, variant, monkeypatch):
    """decode_attention on each kernel (the numba loop, attention_decode.c per instruction set), over
    a float32 cache and an int8 one, against the attention oracle (on the dequantised values for
    int8) at the op's float32 tolerance (the AVX512-VNNI and AVX2 kernels' integer path on int8 within the
    bound of its roundings, _check_int8): query heads per kv head 1, 2, 3 (not unrolled), 4, 8 and 16, 64 query
    heads, batch-strided cache views, tiles with tails, splits over threads, head dimensions of one to
    eight groups of 32 (96: a half block of the integer path's 64-channel transposes), 20 scales a position
    (the AVX512-VNNI path's scale transposes: a full and a partial block of 16 columns) and 36 (more than
    it transposes: gathered). d 48 with int8 (groups of 48 channels) is not the native kernel's and takes the
    numba loop."""
    from jambatrt.plugins.cpu import attention as att
    from jambatrt.plugins.cpu.native import attention_decode_address
    if variant == "numba":
        monkeypatch.setenv("JAMBATRT_NATIVE", "0")
    else:
        address = attention_decode_address(variant)
        assert address, f"the {variant} kernel did not build or load (see the RuntimeWarning)"
        monkeypatch.setattr(att, "attention_decode_address", lambda: address)
    q, k, v, pk, pv = attn_args(torch.Generator().manual_seed(d), B=B, L=1, P=P, Hq=Hq, Hkv=Hkv, d=d)
    cap = P + 41                          # the engine's cache: capacity beyond the length, views of it
    kk, vv = np.zeros((B, cap, Hkv, d), np.float32), np.zeros((B, cap, Hkv, d), np.float32)
    kk[:, :P + 1], vv[:, :P + 1] = torch.cat([pk, k], 1).numpy(), torch.cat([pv, v], 1).numpy()
    kk, vv = kk[:, :P + 1], vv[:, :P + 1]
    o_ref, _, _ = reference("attention")(q, k, v, pk, pv)
    o = att.decode_attention(q.numpy(), kk, vv)
    kt, vt = torch.from_numpy(np.ascontiguousarray(kk)), torch.from_numpy(np.ascontiguousarray(vv))
    _check("attention", (torch.from_numpy(o), kt, vt), (o_ref, kt, vt), F32)
    (kq, ks), (vq, vs) = quantize_kv(kk), quantize_kv(vv)
    kd, vd = torch.from_numpy(dequantize_kv(kq, ks)), torch.from_numpy(dequantize_kv(vq, vs))
    o = att.decode_attention(q.numpy(), kq, vq, ks, vs)
    _check_int8(torch.from_numpy(o), q, kd, vd, vq, vs,
                variant != "numba" and _takes_integer_path(att.attention_decode_address(), d))
    if variant != "numba":
        assert att._native_fits(kk, vv, None, None, Hq)
        assert att._native_fits(kq, vq, ks, vs, Hq) == (d != 48)


@pytest.mark.parametrize("P", [0, 130])
def test_chunk_over_int8_cache_dequantises_block_by_block(P, monkeypatch):
    """A prefill chunk (L > 1) over an int8 cache: the past dequantised 37 positions at a time (the
    partial softmaxes merged), the chunk's own keys causal, against the oracle on the dequantised cache."""
    from jambatrt.plugins.cpu import attention as att
    monkeypatch.setattr(att, "_DEQUANT_BLOCK", 37)
    q, k, v, pk, pv = attn_args(torch.Generator().manual_seed(7), B=2, L=9, P=P, Hq=4, Hkv=2, d=32)
    kk = k.numpy() if P == 0 else torch.cat([pk, k], 1).numpy()
    vv = v.numpy() if P == 0 else torch.cat([pv, v], 1).numpy()
    (kq, ks), (vq, vs) = quantize_kv(kk), quantize_kv(vv)
    kd, vd = torch.from_numpy(dequantize_kv(kq, ks)), torch.from_numpy(dequantize_kv(vq, vs))
    past = (None, None) if P == 0 else (kd[:, :P], vd[:, :P])
    o_ref, _, _ = reference("attention")(q, kd[:, P:], vd[:, P:], *past)
    o = att.attention_cached(q.numpy(), kq, vq, P, ks, vs)
    _check("attention", (torch.from_numpy(o), kd, vd), (o_ref, kd, vd), F32)


@pytest.mark.parametrize("layout", ["rows", "blocked"])
def test_kv_cache_int8_append_grow_reset_and_state_views(layout):
    from jambatrt.engines.ort import KVCache
    from jambatrt.errors import InputError
    with pytest.raises(InputError, match="accepted: float32, int8"):
        KVCache("float16")
    with pytest.raises(InputError, match="accepted: rows; blocked for int8"):
        KVCache("float32", layout="blocked")
    x = _values((2, 300, 2, 64), seed=1)
    c = KVCache("int8", layout)
    c.reset(x[:, :0], x[:, :0], 10)
    assert c.k.dtype == np.int8 and c.length == 0 and c.capacity >= 10
    for lo, hi in ((0, 7), (7, 8), (8, 300)):       # a chunk, a token, a long chunk (grows the buffers)
        c.reserve(hi)
        c.append(x[:, lo:hi], x[:, lo:hi] * 2)
        c.length = hi
    k, v = c.state_views()
    assert isinstance(k, QuantizedKV) and k.shape == (2, 300, 2, 64) and k.dtype == np.float32 and k.groups == 2
    assert (k.layout is not None) == (layout == "blocked")
    np.testing.assert_array_equal(np.asarray(k), fake_quant_kv(torch.from_numpy(x)).numpy())
    np.testing.assert_array_equal(np.asarray(v), fake_quant_kv(torch.from_numpy(x * 2)).numpy())
    assert k.nbytes == 2 * 300 * 2 * (64 + 2 * 4)          # 1.125 bytes per element at groups of 32
    assert sum(a.nbytes for a in c.stored()) >= 2 * k.nbytes  # what a step reads (blocked: whole blocks)
    from jambatrt.config import preset
    from jambatrt.export.plan import memory_plan
    cfg = preset("tiny")                                    # d 16: one scale per head; `inspect` counts the same
    kq, ks = quantize_kv(np.zeros((1, 10, cfg.num_key_value_heads, cfg.head_dim), np.float32))
    per_layer = 2 * (kq.nbytes + ks.nbytes)
    assert memory_plan(cfg, context=10)["kv_bytes_at_context_ort"]["int8"] == per_layer * cfg.num_attention_layers
    cut = k[:, :100]                                        # cut_past slices without converting
    assert isinstance(cut, QuantizedKV) and cut.shape == (2, 100, 2, 64) and (cut.layout is None) == (k.layout is None)
    np.testing.assert_array_equal(np.asarray(cut), np.asarray(k)[:, :100])
    np.testing.assert_array_equal(np.asarray(k[1:, 10:20]), np.asarray(k)[1:, 10:20])
    np.testing.assert_array_equal(k[1, 5], np.asarray(k)[1, 5])
    # another cache, of either layout, restarts from the handed-out state: int8 values taken as they are ...
    kq, ksc = k.rows()
    for other in ("rows", "blocked"):
        c2 = KVCache("int8", other)
        c2.reset(k, v, 400)
        k2, v2 = c2.state_views()
        assert c2.length == 300 and all(np.array_equal(a, b) for a, b in zip(k2.rows() + v2.rows(), k.rows() + v.rows()))
    # ... or float32 arrays, quantised (a float32 engine's state); and a float32 cache reads an int8 state
    c3 = KVCache("int8", layout)
    c3.reset(np.asarray(k), np.asarray(v), 300)
    assert all(np.array_equal(a, b) for a, b in zip(c3.state_views()[0].rows(), (kq, ksc)))
    c4 = KVCache("float32")
    c4.reset(k, v, 300)
    np.testing.assert_array_equal(c4.k[:, :300], np.asarray(k))


@pytest.mark.parametrize("B,Hq,Hkv,d,P", [(1, 8, 2, 128, 5000), (2, 4, 2, 32, 77), (2, 16, 2, 64, 1531), (1, 6, 2, 48, 40)])
def test_blocked_cache_attends_as_rows(B, Hq, Hkv, d, P):
    """An int8 cache in the blocked layout (kv_int8.py) gives the same bits as in rows: a decode step (the
    AVX512-VNNI kernel where this CPU has it, else the rows read out of the blocks) and a prefill chunk.
    d 48 does not fit the layout: a blocked cache of it is refused (an automatic one stays in rows)."""
    from jambatrt.engines.ort import KVCache
    from jambatrt.errors import InputError
    from jambatrt.plugins.cpu.attention import attend_in_cache
    from jambatrt.plugins.cpu.kv_int8 import blocked_fits
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((B, P + 9, Hkv, d)).astype(np.float32) for _ in range(2))
    q = rng.standard_normal((B, 9, Hq, d)).astype(np.float32)
    outs = {}
    for layout in ("rows", "blocked"):
        if layout == "blocked" and not blocked_fits(d):
            with pytest.raises(InputError, match="layout blocked for head dimension 48"):
                KVCache("int8", layout).reset(k[:, :P], v[:, :P], P + 9)
            return
        c = KVCache("int8", layout)
        c.reset(k[:, :P], v[:, :P], P + 9)
        chunk = attend_in_cache(c, q[:, :8], k[:, P:P + 8], v[:, P:P + 8])      # a prefill chunk
        step = attend_in_cache(c, q[:, 8:], k[:, P + 8:], v[:, P + 8:])         # a decode step
        outs[layout] = chunk, step
    for a, b in zip(outs["rows"], outs["blocked"]):
        np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module", params=["tiny", "d32"])
def kv_artifact(request, tiny_artifact, tmp_path_factory):
    """The tiny model's int8-KV engine (head dimension 16: the cache in rows), and the tiny model with 2
    heads of 32 (where the CPU has AVX512-VNNI, the cache in the blocked layout)."""
    from conftest import private_artifact
    if request.param == "tiny":
        art = private_artifact(tiny_artifact, tmp_path_factory, "kvint8")
    else:
        from jambatrt.export.checkpoint import write_preset
        root = tmp_path_factory.mktemp("kvint8d32")
        write_preset("tiny", root / "ckpt", seed=0, num_attention_heads=2, num_key_value_heads=1)
        art = root / "art"
        run_cli("export", root / "ckpt", "-o", art, check=True)
    run_cli("build", art, "--backend", "ort", "--kv-cache", "int8", check=True)
    return art


def test_engine_int8_kv_matches_rounding_eager_model_prefill_and_decode(kv_artifact):
    """Prefill (chunks, so later chunks attend over the quantised past) and decode steps of the int8-KV
    engine against the eager model with K/V through fake_quant_kv, at validate's float32 tolerances,
    K/V states within one rounding step (validate/parity.py); and the gap to the float-KV model."""
    from jambatrt.engines.ort import OrtEngine
    from jambatrt.validate.parity import TOLERANCES
    from jambatrt.validate.reference import EagerReference
    tol = TOLERANCES["float32"]
    ids = np.random.default_rng(5).integers(0, 512, (2, 150))
    with OrtEngine.load(kv_artifact) as e:
        assert e.kv_cache == "int8"
        ref, flt = EagerReference(kv_artifact, kv_cache="int8"), EagerReference(kv_artifact)
        logits, st = e.prefill(ids, chunk=64)
        r_logits, r_st = ref.model(torch.from_numpy(ids), None)
        np.testing.assert_allclose(logits, r_logits.numpy(), atol=tol["atol"], rtol=tol["rtol"])
        kv = [i for i, spec in enumerate(e.step_program.state) if "past" in spec.shape]
        assert kv and all(isinstance(st[i], QuantizedKV) for i in kv)
        from jambatrt.plugins.cpu.attention import blocked_kernel
        assert all((st[i].layout is not None) == (st[i].shape[-1] == 32 and bool(blocked_kernel())) for i in kv)
        for i in kv:
            r = r_st[i].numpy()
            assert (np.abs(np.asarray(st[i]) - r) <= 1e-6 + quant_step(r)).all()
        f_logits, _ = flt.model(torch.from_numpy(ids), None)
        gap = np.abs(logits - f_logits.numpy()).max()
        assert 0 < gap < 0.05 * np.abs(f_logits.numpy()).max(), gap      # rounded, and only by rounding
        tok = logits[:, -1].argmax(-1)
        for _ in range(5):
            out, st = e.decode(tok, st)
            r_out, r_st = ref.model(torch.from_numpy(tok.reshape(-1, 1)), r_st)
            np.testing.assert_allclose(out, r_out[:, -1].numpy(), atol=tol["atol"], rtol=tol["rtol"])
            tok = out.argmax(-1)
        # the state handed out continues in a fresh engine (its cache restarts from the int8 values)
        with OrtEngine.load(kv_artifact) as e2:
            a, _ = e.decode(tok, st)
            b, _ = e2.decode(tok, st)
            np.testing.assert_array_equal(a, b)


def test_native_decode_matches_graph_decode_int8_kv(kv_artifact):
    native_decode_matches_graph(kv_artifact, seed=4, kv_int8=True)


def test_validate_int8_kv_engine(kv_artifact, tmp_path):
    r = run_cli("validate", kv_artifact, "--backend", "ort", "--lengths", "1,40,300",
                "--report", tmp_path / "p.json", check=True)
    assert "parity passed" in r.stdout
    import json
    rep = json.loads((tmp_path / "p.json").read_text())
    assert all("K/V rounded to the int8 KV cache" in x["reference_impl"] for x in rep["results"])
    r = run_cli("validate", kv_artifact, "--backend", "ort", "--reference", "hf", "--lengths", "1")
    assert r.returncode != 0 and "--reference eager" in r.stderr


def test_kv_cache_setting_refusals(tiny_artifact, tmp_path):
    from jambatrt.engines.ort import OrtSettings
    from jambatrt.errors import InputError
    with pytest.raises(InputError, match="needs attention=kernel"):
        OrtSettings.from_kwargs(attention="gqa", kv_cache="int8")
    with pytest.raises(InputError, match="accepted: float32, int8"):
        OrtSettings.from_kwargs(kv_cache="fp8")
    r = run_cli("build", tiny_artifact, "--backend", "aoti", "--kv-cache", "int8")
    assert r.returncode != 0 and "--kv-cache is a setting of the single ONNX Runtime engine" in r.stderr
