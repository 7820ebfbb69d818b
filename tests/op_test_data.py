"""The test row of every jamba op (onnxscript's ops_test_data.py style): how to make its arguments,
the cases every implementation of the CPU folder runs, the cases each Triton launcher runs under
the interpreter, and one node of it at a model's sizes for the TensorRT plugin harness.

tests/test_registry.py checks the rows against plugins/registry.py: an implementation without a
row (or a launcher without interpreter cases), or a row without an implementation, fails. Adding
an op adds one row here; adding an ONNX Runtime session op (`@session_op`) one row in SESSION_ROWS."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch.testing import assert_close

from jambatrt.export.ops import SPECS

F32, BF16 = torch.float32, torch.bfloat16


@dataclass(frozen=True)
class OpRow:
    # (torch.Generator, **params) -> the op's positional arguments: torch, float32 activations
    make: Callable
    # the argument indices cast to the dtype under test (what the model keeps in fp32 -- A, D,
    # delta_bias, the scan state, the expert scales -- and the int8 weights stay)
    activations: tuple[int, ...]
    # case id -> params: the numpy kernel, the torch op ("cpu") and, for `ort`, ONNX Runtime run them
    cases: dict[str, dict]
    ort: tuple[str, ...]
    # gpu implementation (launcher) name -> case id -> params, at interpreter sizes (tests/test_gpu_kernels.py)
    interpreter: dict[str, dict[str, dict]]
    # JambaConfig -> ({input: dims}, attributes): one node at that config's sizes ("batch", "seq",
    # "past" symbolic; inputs whose dims are all fixed are weights) for the TensorRT plugin harness
    graph: Callable
    attributes: Callable = field(default=lambda args: {})       # args -> the node's attributes


# ---- argument makers --------------------------------------------------------------------------------
def _randn(g, *shape):
    return torch.randn(*shape, generator=g)


def scan_args(g, B, D, N, L, z=True, bias=True, state=True):
    return [_randn(g, B, D, L), _randn(g, B, D, L), -torch.exp(_randn(g, D, N)), _randn(g, B, N, L),
            _randn(g, B, N, L), _randn(g, D), _randn(g, B, D, L) if z else None,
            _randn(g, D) if bias else None, _randn(g, B, D, N) if state else None]


def conv_args(g, B, D, K, L, state=True):
    return [_randn(g, B, D, L), _randn(g, D, K) * K ** -0.5, _randn(g, D), _randn(g, B, D, K - 1) if state else None]


def moe_args(g, T, H, I, E, k, group=None):
    """group=(a, b): the weights of experts a..b-1 only, expert_offset a (an expert group)."""
    w13 = torch.randint(-127, 128, (E, 2 * I, H), dtype=torch.int8, generator=g)
    w2 = torch.randint(-127, 128, (E, H, I), dtype=torch.int8, generator=g)
    s13 = (torch.rand(E, 2 * I, generator=g) + 0.5) / (127 * H ** 0.5)     # unit-scale outputs
    s2 = (torch.rand(E, H, generator=g) + 0.5) / (127 * I ** 0.5)
    a, b = group or (0, E)
    return [_randn(g, T, H), _randn(g, T, E), w13[a:b], s13[a:b], w2[a:b], s2[a:b], k, a]


def attn_args(g, B, L, P, Hq, Hkv, d):
    past = [_randn(g, B, P, Hkv, d), _randn(g, B, P, Hkv, d)] if P else [None, None]
    return [_randn(g, B, L, Hq, d), _randn(g, B, L, Hkv, d), _randn(g, B, L, Hkv, d), *past]


# ---- the rows ---------------------------------------------------------------------------------------
ROWS = {
    "selective_scan": OpRow(
        make=scan_args, activations=(0, 1, 3, 4, 6),
        cases={
            "L1": dict(B=1, D=3, N=2, L=1, state=False),
            "odd_state": dict(B=2, D=37, N=5, L=130),          # D % 16 != 0, L % 64 != 0
            "no_z_no_bias": dict(B=1, D=16, N=16, L=64, z=False, bias=False),
            "L0": dict(B=2, D=5, N=3, L=0),
            "threaded": dict(B=2, D=40, N=16, L=300),         # > _SERIAL_MAX_UPDATES: numba's threads
            "L1_threaded": dict(B=4, D=4100, N=16, L=1),      # the decode-step kernel on numba's threads
        },
        ort=("L1", "odd_state"),
        interpreter={
            "selective_scan": {"chunked_full": dict(B=2, D=20, L=37, N=8),
                               "chunked_bare": dict(B=1, D=16, L=19, N=5, z=False, bias=False, state=False),
                               "chunked_L1": dict(B=2, D=8, L=1, N=16)},
            "selective_scan_sequential": {"sequential": dict(B=2, D=20, L=13, N=8)},
            "selective_state_update": {"state_update": dict(B=3, D=24, L=1, N=16)},
        },
        graph=lambda c: ({"u": ["batch", c.d_inner, "seq"], "delta": ["batch", c.d_inner, "seq"],
                          "A": [c.d_inner, c.mamba_d_state], "B": ["batch", c.mamba_d_state, "seq"],
                          "C": ["batch", c.mamba_d_state, "seq"], "D": [c.d_inner], "z": ["batch", c.d_inner, "seq"],
                          "delta_bias": [c.d_inner], "state": ["batch", c.d_inner, c.mamba_d_state]}, {})),
    "causal_conv1d": OpRow(
        make=conv_args, activations=(0, 1, 2, 3),
        cases={
            "L1": dict(B=1, D=4, K=4, L=1, state=False),
            "odd_state": dict(B=2, D=37, K=4, L=130),
            "shorter_than_kernel": dict(B=3, D=5, K=3, L=1),
            "K1": dict(B=1, D=8, K=1, L=5),
            "K1_L1": dict(B=1, D=8, K=1, L=1),
            "threaded": dict(B=2, D=64, K=4, L=300),          # >= _SERIAL_MAX_ELEMENTS: numba's threads
        },
        ort=("L1", "odd_state"),
        interpreter={
            "causal_conv1d": {"state": dict(B=2, D=40, L=70, K=4), "no_state": dict(B=1, D=16, L=2, K=4, state=False),
                              "k3_L1": dict(B=2, D=8, L=1, K=3)},
            "causal_conv1d_update": {"update": dict(B=2, D=40, L=1, K=4)},
        },
        graph=lambda c: ({"x": ["batch", c.d_inner, "seq"], "weight": [c.d_inner, c.mamba_d_conv], "bias": [c.d_inner],
                          "state": ["batch", c.d_inner, c.mamba_d_conv - 1]}, {})),
    "moe_int8": OpRow(
        make=moe_args, activations=(0, 1),
        cases={
            "one_token": dict(T=1, H=16, I=24, E=4, k=2),
            "odd": dict(T=37, H=48, I=72, E=5, k=1),
            "top3": dict(T=64, H=40, I=56, E=6, k=3),
            "int8_path": dict(T=3, H=1024, I=512, E=2, k=1),     # w13[e] has 2^20 weights
            "one_token_large": dict(T=1, H=1024, I=512, E=3, k=2),   # float32: one fused call at any size
            "expert_group": dict(T=29, H=32, I=40, E=7, k=2, group=(3, 6)),
            "few_tokens_group": dict(T=3, H=40, I=24, E=6, k=2, group=(1, 4)),   # the small-T path
        },
        ort=("odd", "top3", "expert_group", "one_token"),
        interpreter={
            # the last ones at the launchers' own tiles (DEFAULTS: compiled for TensorRT, checked for spills)
            "moe_int8": {"grouped": dict(T=10, H=32, I=24, E=4, k=2), "grouped_k3": dict(T=7, H=40, I=20, E=6, k=3),
                         "grouped_group": dict(T=9, H=32, I=24, E=6, k=2, group=(2, 5)),
                         "grouped_default_tiles": dict(T=11, H=64, I=96, E=4, k=2, tiles="default")},
            "moe_int8_fused": {"fused": dict(T=10, H=32, I=24, E=4, k=2), "fused_k1": dict(T=3, H=16, I=16, E=5, k=1),
                               "fused_group": dict(T=9, H=32, I=24, E=6, k=2, group=(2, 5)),
                               "fused_default_tiles": dict(T=11, H=64, I=96, E=4, k=2, tiles="default")},
        },
        graph=lambda c: ({"x": ["batch*seq", c.hidden_size], "router_logits": ["batch*seq", c.num_experts],
                          "w13": [c.num_experts, 2 * c.intermediate_size, c.hidden_size],
                          "w13_scale": [c.num_experts, 2 * c.intermediate_size],
                          "w2": [c.num_experts, c.hidden_size, c.intermediate_size],
                          "w2_scale": [c.num_experts, c.hidden_size]},
                         {"top_k": c.num_experts_per_tok, "expert_offset": 0}),
        attributes=lambda args: {"top_k": args[6], "expert_offset": args[7]}),
    "attention": OpRow(
        make=attn_args, activations=(0, 1, 2, 3, 4),
        cases={
            "prefill_L1": dict(B=1, L=1, P=0, Hq=4, Hkv=2, d=8),
            "prefill": dict(B=2, L=37, P=0, Hq=6, Hkv=3, d=16),
            "decode": dict(B=2, L=1, P=9, Hq=4, Hkv=2, d=8),
            "chunk_after_past": dict(B=2, L=17, P=23, Hq=4, Hkv=1, d=8),
            "mha_chunk": dict(B=1, L=130, P=70, Hq=4, Hkv=4, d=32),
        },
        ort=("prefill", "decode", "chunk_after_past"),
        interpreter={
            "attention": {"prefill": dict(B=2, L=9, P=0, Hq=4, Hkv=2, d=16),
                          "past_mqa": dict(B=1, L=20, P=7, Hq=4, Hkv=1, d=8),
                          "decode": dict(B=1, L=1, P=30, Hq=2, Hkv=2, d=16),
                          # Jamba's head_dim 128 at the launcher's own tiles
                          "head128_default_tiles": dict(B=1, L=37, P=21, Hq=4, Hkv=2, d=128, tiles="default")},
        },
        graph=lambda c: ({"q": ["batch", "seq", c.num_attention_heads, c.head_dim],
                          "k": ["batch", "seq", c.num_key_value_heads, c.head_dim],
                          "v": ["batch", "seq", c.num_key_value_heads, c.head_dim],
                          "past_k": ["batch", "past", c.num_key_value_heads, c.head_dim],
                          "past_v": ["batch", "past", c.num_key_value_heads, c.head_dim]}, {})),
}
TEST_ONLY = {"tiles"}      # params read by the tests, not by the makers


# ---- ONNX Runtime session ops (plugins/registry.py `session_op`) -------------------------------------
# op type -> case(generator, bind) -> (inputs, attributes, check(outputs)): the node's numpy inputs in
# order, its attributes (what it finds outside the graph bound with `bind(obj) -> key`), and the check of
# its outputs against the plain op it stands for (tests/test_cpu_kernels.py runs each in ONNX Runtime)
def _linear_int8_case(mapped: bool):
    def case(g, bind):
        from conftest import assert_sums_close
        x = _randn(g, 3, 1037)                       # K % 8 != 0: the GEMV's vector tail
        w = torch.randint(-127, 128, (45, 1037), dtype=torch.int8, generator=g)
        scale = torch.rand(45, generator=g)
        x64, w64, s64 = x.double().numpy(), w.double().numpy(), scale.double().numpy()

        def check(out):
            assert_sums_close(out[0], (x64 @ w64.T) * s64, (np.abs(x64) @ np.abs(w64).T) * s64, n_terms=1038,
                              what="LinearInt8")
        x, w, scale = x.numpy(), w.numpy(), scale.numpy()
        return ([x], {"weights": bind((w, scale))}, check) if mapped else ([x, w, scale], {}, check)
    return case


def _linear_f32_case(mapped: bool):
    def case(g, bind):
        from conftest import assert_sums_close
        x = _randn(g, 3, 1037)                       # K % 16 != 0: the GEMV's masked tail
        w = _randn(g, 45, 1037)
        x64, w64 = x.double().numpy(), w.double().numpy()

        def check(out):
            assert_sums_close(out[0], x64 @ w64.T, np.abs(x64) @ np.abs(w64).T, n_terms=1037, what="LinearF32")
        x, w = x.numpy(), w.numpy()
        return ([x], {"weights": bind((w,))}, check) if mapped else ([x, w], {}, check)
    return case


def _moe_int8_mapped_case(g, bind):
    from jambatrt.export.ops import reference
    args = make("moe_int8", "expert_group")
    x, router, w13, s13, w2, s2, top_k, offset = args
    want = reference("moe_int8")(*args)
    attrs = {"top_k": top_k, "expert_offset": offset, "weights": bind(tuple(t.numpy() for t in (w13, s13, w2, s2)))}
    return [x.numpy(), router.numpy()], attrs, lambda out: check_outputs("moe_int8", torch.from_numpy(out[0]), want, F32)


def _attention_cached_case(g, bind):
    from jambatrt.engines.ort import KVCache
    from jambatrt.export.ops import reference
    args = make("attention", "chunk_after_past")
    q, k, v, past_k, past_v = (t.numpy() for t in args)
    want = reference("attention")(*args)
    cache = KVCache()
    cache.reset(past_k, past_v, past_k.shape[1] + k.shape[1])

    def check(out):
        check_outputs("attention", (torch.from_numpy(out[0]), *want[1:]), want, F32)
        n = past_k.shape[1] + k.shape[1]          # the step's keys and values were appended in place
        assert cache.length == n
        np.testing.assert_array_equal(cache.k[:, :n], want[1].numpy())
        np.testing.assert_array_equal(cache.v[:, :n], want[2].numpy())
    return [q, k, v], {"cache": bind(cache)}, check


def _mamba_mixer_case(mapped: bool):
    """The fused int8 Mamba mixer against export/model.py's MambaMixer (int8 linears, the `_ref` ops)
    with the same random weights: the plain form on a 5-token chunk after a state (the kernels called
    from Python), the mapped form on one token of two sequences (the one-call decode step)."""
    def case(g, bind):
        from conftest import assert_same_model_sums
        from jambatrt.config import JambaConfig
        from jambatrt.export.model import IMPLS, MambaMixer
        cfg = JambaConfig(hidden_size=40, mamba_expand=2, mamba_d_state=4, mamba_dt_rank=6, mamba_d_conv=4,
                          num_hidden_layers=1, intermediate_size=8, rms_norm_eps=1e-6)
        mixer = MambaMixer(cfg, int8=True)
        with torch.no_grad():
            for name, p in [*mixer.named_parameters(), *mixer.named_buffers()]:
                if p.dtype == torch.int8:
                    p.copy_(torch.randint(-127, 128, p.shape, dtype=torch.int8, generator=g))
                elif name.endswith("weight_scale"):
                    p.copy_(torch.rand(p.shape, generator=g) * 0.02)
                else:
                    p.copy_(_randn(g, *p.shape) * 0.5 + (1.0 if "norm" in name else 0.0))
        D, N, K = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_d_conv
        B, L = (2, 1) if mapped else (2, 5)
        h = _randn(g, B, L, cfg.hidden_size)
        conv_state, ssm_state = _randn(g, B, D, K - 1), _randn(g, B, D, N) * 0.1
        with torch.no_grad():
            want, (want_conv, want_ssm) = mixer(h, IMPLS["ref"], conv_state, ssm_state)
        m = mixer
        params = [m.conv1d.weight.squeeze(1), m.conv1d.bias, -torch.exp(m.A_log), m.D, m.dt_proj.bias,
                  m.dt_layernorm.weight, m.b_layernorm.weight, m.c_layernorm.weight]
        weights = [t for lin in (m.in_proj, m.x_proj, m.dt_proj, m.out_proj) for t in (lin.weight, lin.weight_scale)]
        arrays = lambda ts: [t.detach().contiguous().numpy() for t in ts]

        def check(out):
            for got, ref, what in zip(out, (want, want_conv, want_ssm), ("y", "conv_state", "ssm_state")):
                assert_same_model_sums(got, ref.numpy(), cfg, L, f"MambaMixerInt8 {what}")
        inputs = arrays([h, conv_state, ssm_state, *params])
        if mapped:
            return inputs, {"eps": cfg.rms_norm_eps, "weights": bind(tuple(arrays(weights)))}, check
        return inputs + arrays(weights), {"eps": cfg.rms_norm_eps}, check
    return case


SESSION_ROWS = {
    "LinearInt8": _linear_int8_case(mapped=False),
    "LinearInt8Mapped": _linear_int8_case(mapped=True),
    "LinearF32": _linear_f32_case(mapped=False),
    "LinearF32Mapped": _linear_f32_case(mapped=True),
    "MoEInt8Mapped": _moe_int8_mapped_case,
    "CausalAttentionCached": _attention_cached_case,
    "MambaMixerInt8": _mamba_mixer_case(mapped=False),
    "MambaMixerInt8Mapped": _mamba_mixer_case(mapped=True),
}


# ---- using the rows ---------------------------------------------------------------------------------
def make(op: str, params: dict | str, dtype=F32, seed: int = 0) -> list:
    """The op's arguments for a case (an id of ROWS[op].cases, or params), activations in `dtype`."""
    row = ROWS[op]
    params = row.cases[params] if isinstance(params, str) else params
    args = row.make(torch.Generator().manual_seed(seed), **{k: v for k, v in params.items() if k not in TEST_ONLY})
    return [a.to(dtype) if i in row.activations and a is not None else a for i, a in enumerate(args)]


def inputs_and_attributes(op: str, args: list) -> tuple[list, dict]:
    """Split the op's arguments into its tensor inputs (SPEC.inputs order) and its attributes."""
    n = len(SPECS[op].inputs)
    return list(args[:n]), ROWS[op].attributes(args)


def zero_filled(op: str, inputs: list) -> list:
    """Absent optional inputs as the zeros SPEC.zero_inputs says they stand for (what the graph
    passes to kernels that take every input)."""
    spec = SPECS[op]
    named = dict(zip(spec.inputs, inputs))
    out = list(inputs)
    for i, name in enumerate(spec.inputs):
        if out[i] is None and name in spec.zero_inputs:
            dims = [d if isinstance(d, int) else named[d[0]].shape[d[1]] + (d[2] if len(d) > 2 else 0)
                    for d in spec.zero_inputs[name]]
            out[i] = torch.zeros(dims)
    return out


def check_outputs(op, actual, expected, dtype):
    """Every output within SPEC.tolerances[dtype] of the oracle's, same shapes."""
    atol, rtol = SPECS[op].tolerances[dtype]
    actual = actual if isinstance(actual, (tuple, list)) else (actual,)
    expected = expected if isinstance(expected, (tuple, list)) else (expected,)
    assert len(actual) == len(expected) == len(SPECS[op].outputs)
    for name, a, e in zip(SPECS[op].outputs, actual, expected):
        a = torch.as_tensor(a)
        assert a.shape == e.shape, f"{op}.{name}: shape {list(a.shape)} != {list(e.shape)}"
        assert_close(a.float(), e.float(), atol=atol, rtol=rtol, msg=lambda m: f"{op}.{name} ({dtype}): {m}")
