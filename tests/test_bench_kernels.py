"""Benchmarks of the CPU kernels (`make bench`; excluded from `make test`). Each test measures its
candidates side by side in one process (interleaved, best of N, after a warm-up run), records the
largest deviation between them, and merges its section into bench/kernels.json. No timed asserts:
the asserts only check that what was timed computed the same thing.

Peak memory is the growth of this process's resident set, sampled every 2 ms during one call."""

from __future__ import annotations

import json
import os
import platform
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

pytestmark = pytest.mark.bench

OUT = Path(__file__).resolve().parents[1] / "bench" / "kernels.json"
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


def peak_rss_growth(fn) -> int:
    """Bytes the resident set grew by, at its sampled peak, while fn() ran."""
    base = peak = _rss()
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss())
            time.sleep(0.002)
    t = threading.Thread(target=sample)
    t.start()
    try:
        fn()
    finally:
        done.set()
        t.join()
    return max(peak, _rss()) - base


def timings(candidates: dict, repeat: int, before=None) -> dict[str, list[float]]:
    """Seconds of each call, `repeat` calls a candidate, candidates interleaved so machine noise hits all
    alike; `before()` runs untimed before every call."""
    times = {name: [] for name in candidates}
    for _ in range(repeat):
        for name, fn in candidates.items():
            if before is not None:
                before()
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def best_of(candidates: dict, repeat: int = 3) -> dict[str, float]:
    """Seconds per call, best of `repeat` (interleaved, as `timings`)."""
    return {name: min(v) for name, v in timings(candidates, repeat).items()}


def record(section: str, rows) -> None:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    data = json.loads(OUT.read_text()) if OUT.exists() else {}
    data["machine"] = {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
                       "processor": platform.processor() or platform.machine(), "torch": torch.__version__,
                       "numpy": np.__version__, "loadavg_1min": os.getloadavg()[0]}
    data[section] = rows
    tmp = OUT.with_suffix(".tmp-json")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(OUT)


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


# ---- selective scan vs transformers' eager loop -------------------------------------------------------------
HF_MAX_BYTES = 6 << 30      # the HF loop materialises exp(dt A) and dt B u for all L: [B,D,L,N] fp32 each
HF_MAX_SECONDS = 120


def test_bench_selective_scan():
    from jambatrt.plugins.cpu.selective_scan import selective_scan
    hf_scan = pytest.importorskip("transformers.models.jamba.modeling_jamba").mamba_selective_scan
    hf_scan = getattr(hf_scan, "__wrapped__", hf_scan)       # its torch fallback, not a hub kernel lookup
    B, D, N = 1, 256, 16
    rows, hf_seconds_per_step = [], None
    for L in (4096, 65536):
        g = torch.Generator().manual_seed(0)
        u, delta, z = (torch.randn(B, D, L, generator=g) for _ in range(3))
        A = -torch.exp(torch.randn(D, N, generator=g))
        Bm, Cm = torch.randn(B, N, L, generator=g), torch.randn(B, N, L, generator=g)
        Dskip, bias = torch.randn(D, generator=g), torch.randn(D, generator=g)
        np_args = [t.numpy() for t in (u, delta, A, Bm, Cm, Dskip, z, bias)]
        kernel = lambda: selective_scan(*np_args)
        hf = lambda: hf_scan(u, delta, A, Bm, Cm, D=Dskip, z=z, delta_bias=bias, delta_softplus=True,
                             return_last_state=True)
        y, h = kernel()
        row = {"L": L, "D": D, "N": N, "B": B, "kernel_s": best_of({"k": kernel})["k"],
               "kernel_peak_rss_bytes": peak_rss_growth(kernel)}
        hf_bytes = 3 * B * D * L * N * 4                     # exp(dt A), dt B, dt B u
        hf_eta = None if hf_seconds_per_step is None else hf_seconds_per_step * L
        if hf_bytes > HF_MAX_BYTES:
            row["hf_loop_s"], row["hf_note"] = None, f"needs ~{hf_bytes / 2**30:.1f} GiB (> 6 GiB)"
        elif hf_eta is not None and hf_eta > HF_MAX_SECONDS:
            row["hf_loop_s"], row["hf_note"] = None, f"estimated {hf_eta:.0f} s (> {HF_MAX_SECONDS} s)"
        else:
            out = {}
            row["hf_peak_rss_bytes"] = peak_rss_growth(lambda: out.update(r=hf()))  # also the warm-up
            yh, hh = out["r"]
            times = best_of({"kernel": kernel, "hf": hf}, repeat=2 if L > 4096 else 3)
            row.update(kernel_s=times["kernel"], hf_loop_s=times["hf"], speedup=times["hf"] / times["kernel"],
                       max_abs_diff_y=_max_diff(y, yh), max_abs_diff_state=_max_diff(h, hh))
            hf_seconds_per_step = times["hf"] / L
            assert row["max_abs_diff_y"] < 1e-2 * max(1.0, float(np.abs(y).max()))
        rows.append(row)
    record("selective_scan", rows)


# ---- attention: the kernel against the alternatives it was chosen over ----------------------------------------
REF_MAX_LENGTH = 8192     # the blocked-matmul oracle is O(L^2) in time with small blocks: too slow beyond


def test_bench_attention():
    import torch.nn.functional as F

    from jambatrt.export.ops.attention import attention_ref
    from jambatrt.plugins.cpu.attention import attention_torch
    B, Hq, Hkv, d = 1, 4, 2, 32
    rows = []
    for P, L in ((0, 4096), (0, 65536), (4096, 4096), (61440, 4096)):
        g = torch.Generator().manual_seed(0)
        q, k, v = torch.randn(B, L, Hq, d, generator=g), torch.randn(B, L, Hkv, d, generator=g), \
            torch.randn(B, L, Hkv, d, generator=g)
        pk, pv = (torch.randn(B, P, Hkv, d, generator=g), torch.randn(B, P, Hkv, d, generator=g)) if P else (None, None)

        def sdpa_repeat_kv():          # no GQA support needed: k/v heads repeated (2x their memory)
            K = torch.cat([pk, k], 1) if P else k
            V = torch.cat([pv, v], 1) if P else v
            Kr, Vr = (t.transpose(1, 2).repeat_interleave(Hq // Hkv, 1) for t in (K, V))
            return F.scaled_dot_product_attention(q.transpose(1, 2), Kr, Vr, is_causal=True).transpose(1, 2)

        def sdpa_query_blocks_with_mask(block=256):   # the explicit-mask alternative for P > 0
            K, V = (torch.cat([p, t], 1).transpose(1, 2) for p, t in ((pk, k), (pv, v)))
            Q = q.transpose(1, 2)
            o = torch.empty(B, Hq, L, d)
            for i0 in range(0, L, block):
                i1 = min(L, i0 + block)
                mask = torch.ones(i1 - i0, P + i1, dtype=torch.bool).tril_(P + i0)
                o[:, :, i0:i1] = F.scaled_dot_product_attention(Q[:, :, i0:i1], K[:, :, :P + i1], V[:, :, :P + i1],
                                                                attn_mask=mask, enable_gqa=True)
            return o.transpose(1, 2)

        kernel = lambda: attention_torch(q, k, v, pk, pv)[0]
        cands = {"kernel": kernel}
        notes = {}
        if P == 0:
            cands["sdpa_repeat_kv"] = sdpa_repeat_kv
        else:
            cands["sdpa_query_blocks_with_mask"] = sdpa_query_blocks_with_mask
        if P + L <= REF_MAX_LENGTH:
            cands["blocked_matmul_ref"] = lambda: attention_ref(q, k, v, pk, pv)[0]
        else:
            notes["blocked_matmul_ref"] = f"not run beyond {REF_MAX_LENGTH} tokens (O(L^2) time in small blocks)"
        outs = {}
        mem = {n: peak_rss_growth(lambda n=n, f=f: outs.update({n: f()})) for n, f in cands.items()}
        times = best_of(cands, repeat=2 if P + L > 8192 else 3)
        diffs = {n: _max_diff(outs[n], outs["kernel"]) for n in cands if n != "kernel"}
        assert all(x < 1e-4 for x in diffs.values()), diffs
        rows.append({"B": B, "P": P, "L": L, "Hq": Hq, "Hkv": Hkv, "d": d, "seconds": times,
                     "peak_rss_bytes": mem, "max_abs_diff_vs_kernel": diffs, "notes": notes})
    record("attention", rows)


# ---- decode attention: each kernel over a float32 and an int8 cache, from the cache and from memory --------------
def _last_level_cache_bytes() -> int:
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
    return max(sizes, default=32 << 20)


def test_bench_decode_attention(monkeypatch):
    """One decode query (8 heads of 128 over 2 kv heads: the peer preset's attention) over 4K and 64K cached
    positions, on every attention_decode.c kernel this CPU runs and the numba loop. "cold" reads the last-level
    cache's worth twice over before each call, as a decode step's weights do between two attention layers: a
    back-to-back loop ("warm") finds part of a 38 MB int8 cache in a 32 MB L3 and hid a 2x difference between
    two prefetch hints (attention_decode.c, PREFETCHING)."""
    from jambatrt.plugins.cpu import attention as att
    from jambatrt.plugins.cpu.kv_int8 import quantize_kv
    from jambatrt.plugins.cpu.native import attention_decode_address, runnable_variants
    Hq, Hkv, d = 8, 2, 128
    flush = np.ones(2 * _last_level_cache_bytes() // 8, np.int64)
    kernels = {v: attention_decode_address(v) for v in runnable_variants("attention")}
    kernels["numba"] = 0
    chosen = {"address": 0}
    monkeypatch.setattr(att, "attention_decode_address", lambda: chosen["address"])
    rows = []
    for S in (4096, 65536):
        rng = np.random.default_rng(S)
        q = rng.standard_normal((1, 1, Hq, d), dtype=np.float32)
        kf, vf = (rng.standard_normal((1, S, Hkv, d), dtype=np.float32) for _ in range(2))
        (kq, ks), (vq, vs) = quantize_kv(kf), quantize_kv(vf)
        for cache, args in (("float32", (kf, vf)), ("int8", (kq, vq, ks, vs))):
            cands = {}
            for name, address in kernels.items():
                def run(address=address):
                    chosen["address"] = address
                    return att.decode_attention(q, *args)
                cands[name] = run
            outs = {n: f() for n, f in cands.items()}          # warm-up (numba compiles, pages fault in)
            warm = best_of(cands, repeat=5)
            cold = timings(cands, 5, before=flush.sum)
            # the kernels round differently (the integer paths to 16 bits): agreement to a thousandth of the
            # largest value they average says they computed the same attention
            diffs = {n: _max_diff(outs[n], outs["numba"]) for n in cands if n != "numba"}
            bound = 1e-3 * float(np.abs(vf).max())
            assert all(x <= bound for x in diffs.values()), (cache, S, diffs, bound)
            cache_bytes = sum(a.nbytes for a in args)
            rows.append({"cache": cache, "positions": S, "Hq": Hq, "Hkv": Hkv, "d": d, "cache_bytes": cache_bytes,
                         "threads": att.numba.get_num_threads(), "seconds_warm_best": warm,
                         "seconds_cold_median": {n: float(np.median(v)) for n, v in cold.items()},
                         "cold_gb_per_s": {n: cache_bytes / float(np.median(v)) / 1e9 for n, v in cold.items()},
                         "max_abs_diff_vs_numba": diffs, "flush_bytes": flush.nbytes})
    record("decode_attention", rows)


# ---- MoE: the kernel, the oracle and ONNX Runtime's QMoE ---------------------------------------------------------
def _qmoe_session(top_k):
    import onnxruntime as ort
    from onnx import TensorProto, helper
    names = ["x", "logits", "fc1", "fc1_s", "fc2", "fc2_s", "rw"]
    node = helper.make_node("QMoE", names[:4] + [""] + names[4:6] + [""] * 7 + ["rw"], ["y"], domain="com.microsoft",
                            k=top_k, activation_type="swiglu", swiglu_fusion=1, activation_alpha=1.0,
                            activation_beta=0.0, expert_weight_bits=8, normalize_routing_weights=0)
    elem = {"fc1": TensorProto.UINT8, "fc2": TensorProto.UINT8}
    inputs = [helper.make_tensor_value_info(n, elem.get(n, TensorProto.FLOAT), None) for n in names]
    graph = helper.make_graph([node], "qmoe", inputs, [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17),
                                                    helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")   # else it starves the next candidate
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_bench_moe_int8():
    from jambatrt.export.ops.moe_int8 import moe_int8_ref
    from jambatrt.plugins.cpu.moe_int8 import moe_int8
    rows = []
    for T, H, I, E, k in ((4096, 128, 256, 4, 2), (1, 128, 256, 4, 2), (2, 4096, 14336, 2, 1)):
        g = torch.Generator().manual_seed(0)
        x, logits = torch.randn(T, H, generator=g), torch.randn(T, E, generator=g)
        w13 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8, generator=g)
        w2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8, generator=g)
        s13, s2 = torch.rand(E, 2 * I, generator=g) / (127 * H ** 0.5), torch.rand(E, H, generator=g) / (127 * I ** 0.5)
        targs = (x, logits, w13, s13, w2, s2, k)
        nargs = [t.numpy() if isinstance(t, torch.Tensor) else t for t in targs]
        inter = lambda a: torch.stack([a[:, :I], a[:, I:]], 2).reshape(a.shape)
        feeds = {"x": nargs[0], "logits": nargs[1], "fc1": (inter(w13).to(torch.int16) + 128).to(torch.uint8).numpy(),
                 "fc1_s": inter(s13).numpy(), "fc2": (w2.to(torch.int16) + 128).to(torch.uint8).numpy(),
                 "fc2_s": nargs[5], "rw": torch.softmax(logits, -1).numpy()}
        sess = _qmoe_session(k)
        cands = {"kernel": lambda: moe_int8(*nargs), "qmoe": lambda: sess.run(None, feeds)[0],
                 "ref": lambda: moe_int8_ref(*targs).numpy()}
        outs = {n: f() for n, f in cands.items()}
        times = best_of(cands, repeat=5 if T * H * I < 1 << 28 else 3)
        diffs = {n: _max_diff(outs[n], outs["ref"]) for n in ("kernel", "qmoe")}
        assert all(x < 1e-4 for x in diffs.values()), diffs
        rows.append({"T": T, "H": H, "I": I, "E": E, "top_k": k, "seconds": times,
                     "qmoe_over_kernel": times["qmoe"] / times["kernel"], "max_abs_diff_vs_ref": diffs})
    record("moe_int8", rows)


# ---- what a Python custom op costs inside ONNX Runtime -----------------------------------------------------------
_copy_declared = False


def test_bench_ort_output_transfer():
    """ns per output element: onnxruntime-extensions' list path vs the array invoker of ort_ops, on
    an op that does nothing but return its input; plus the ORT overhead around the real scan."""
    global _copy_declared
    import onnxruntime as ort
    from onnx import TensorProto, helper
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    from jambatrt.plugins.cpu.ort_ops import custom_ops_library, run_checked
    from jambatrt.plugins.cpu.selective_scan import selective_scan
    if not _copy_declared:
        onnx_op(op_type="jambabench::Copy", inputs=[PyCustomOpDef.dt_float],
                outputs=[PyCustomOpDef.dt_float])(lambda x: x)
        _copy_declared = True
    lib = custom_ops_library()

    def session(op_type, domain, inputs, outputs):
        node = helper.make_node(op_type, inputs, outputs, domain=domain)
        graph = helper.make_graph([node], op_type, [helper.make_tensor_value_info(n, TensorProto.FLOAT, None)
                                                    for n in inputs],
                                  [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in outputs])
        model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(domain, 1)])
        so = ort.SessionOptions()
        so.register_custom_ops_library(lib)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])

    copy = session("Copy", "jambabench", ["x"], ["y"])
    rows = []
    try:
        for n in (10_000, 1_000_000, 16_000_000):
            x = np.random.default_rng(0).standard_normal(n, dtype=np.float32)
            run = lambda: copy.run(None, {"x": x})[0]
            custom_ops_library(fast_outputs=False)
            lists = best_of({"r": run})["r"]
            assert np.array_equal(run(), x)
            custom_ops_library(fast_outputs=True)
            arrays = best_of({"r": run})["r"]
            assert np.array_equal(run(), x)
            rows.append({"elements": n, "list_path_s": lists, "array_path_s": arrays,
                         "list_path_ns_per_element": lists / n * 1e9, "array_path_ns_per_element": arrays / n * 1e9})
        # the scan through ONNX Runtime vs called directly (input copies + output transfer)
        g = torch.Generator().manual_seed(0)
        B, D, N, L = 1, 256, 16, 4096
        names = ["u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"]
        shapes = [(B, D, L), (B, D, L), (D, N), (B, N, L), (B, N, L), (D,), (B, D, L), (D,), (B, D, N)]
        feeds = {nm: torch.randn(*s, generator=g).numpy() for nm, s in zip(names, shapes)}
        feeds["A"] = -np.exp(feeds["A"])
        scan = session("SelectiveScan", "jamba", names, ["y", "state_out"])
        out_direct = selective_scan(*feeds.values())
        cands = {"direct": lambda: selective_scan(*feeds.values()),
                 "ort_arrays": lambda: run_checked(scan, None, feeds)}
        times = best_of(cands)
        custom_ops_library(fast_outputs=False)
        times["ort_lists"] = best_of({"r": lambda: run_checked(scan, None, feeds)})["r"]
        assert np.array_equal(run_checked(scan, None, feeds)[0], out_direct[0])
    finally:
        custom_ops_library(fast_outputs=True)
    record("ort_python_op", {"output_transfer": rows,
                             "selective_scan_L4096_D256": {"seconds": times, "output_elements": B * D * (L + N)}})
