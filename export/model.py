"""A compact Jamba: attention every `attn_layer_period` layers, Mamba elsewhere, MoE every
`expert_layer_period` layers. Mixers call the jamba:: custom ops (or their `_ref` twins).

Parameter names follow the Hugging Face checkpoint (`model.layers.{i}.mamba.in_proj.weight`, ...)
except the experts, which are stacked per layer (`feed_forward.w13 [E,2I,H]`, `feed_forward.w2
[E,H,I]`, int8 + fp32 scales with ExpertsInt8); `export/checkpoint.py` maps them. With
--weights-int8 every other linear layer but the router is an `Int8Linear` (`<name>.weight` int8 +
`<name>.weight_scale` fp32).

State, one flat list in layer order: Mamba layer -> conv_state [B,D,K-1], ssm_state [B,D,N] fp32;
attention layer -> k [B,P,Hkv,d], v [B,P,Hkv,d]."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from jambatrt.config import JambaConfig
from jambatrt.export import ops as jops
from jambatrt.export.ops.moe_int8 import routing_weights

IMPLS = {
    "custom": SimpleNamespace(**{n: getattr(torch.ops.jamba, n) for n in jops.REGISTRY}),
    "ref": SimpleNamespace(**{n: jops.reference(n) for n in jops.REGISTRY}),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * xf.to(x.dtype)


class Int8Linear(nn.Module):
    """Weight-only int8 linear layer (--weights-int8), gpt-fast style: weight [O,I] int8, symmetric,
    one fp32 scale per output channel (max|W| / 127 over the input dim, as ExpertsInt8); activations
    stay in the model's dtype. y = (x @ weight^T) * scale (+ bias): the scale after the K loop."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__()
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8))
        self.register_buffer("weight_scale", torch.ones(out_features))
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:       # x [..., I] -> [..., O]
        y = F.linear(x, self.weight.to(x.dtype)) * self.weight_scale.to(x.dtype)
        return y if self.bias is None else y + self.bias


def linear(in_features: int, out_features: int, bias: bool, int8: bool) -> nn.Module:
    return Int8Linear(in_features, out_features, bias) if int8 else nn.Linear(in_features, out_features, bias=bias)


class MambaMixer(nn.Module):
    def __init__(self, cfg: JambaConfig, int8: bool = False):
        super().__init__()
        D, N, R, K = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv
        self.dims = (D, N, R)
        self.in_proj = linear(cfg.hidden_size, 2 * D, cfg.mamba_proj_bias, int8)
        self.conv1d = nn.Conv1d(D, D, K, groups=D, bias=cfg.mamba_conv_bias)
        self.x_proj = linear(D, R + 2 * N, False, int8)
        self.dt_proj = linear(R, D, True, int8)
        self.A_log = nn.Parameter(torch.log(torch.arange(1, N + 1, dtype=torch.float32)).repeat(D, 1))
        self.D = nn.Parameter(torch.ones(D))
        self.out_proj = linear(D, cfg.hidden_size, cfg.mamba_proj_bias, int8)
        self.dt_layernorm = RMSNorm(R, cfg.rms_norm_eps)
        self.b_layernorm = RMSNorm(N, cfg.rms_norm_eps)
        self.c_layernorm = RMSNorm(N, cfg.rms_norm_eps)

    def forward(self, h, ops, conv_state=None, ssm_state=None):   # h [B,L,H]
        D, N, R = self.dims
        x, z = self.in_proj(h).transpose(1, 2).chunk(2, dim=1)                     # [B,D,L] each
        bias = self.conv1d.bias if self.conv1d.bias is not None else x.new_zeros(D)
        x, conv_state = ops.causal_conv1d(x, self.conv1d.weight.squeeze(1), bias, conv_state)
        dt, Bm, Cm = torch.split(self.x_proj(x.transpose(1, 2)), [R, N, N], dim=-1)  # [B,L,*]
        dt = self._dt(self.dt_layernorm(dt)).transpose(1, 2)                         # [B,D,L]
        Bm = self.b_layernorm(Bm).transpose(1, 2)                                   # [B,N,L]
        Cm = self.c_layernorm(Cm).transpose(1, 2)
        A = -torch.exp(self.A_log.float())                                          # [D,N]
        y, ssm_state = ops.selective_scan(x, dt, A, Bm, Cm, self.D.float(), z, self.dt_proj.bias.float(),
                                          ssm_state)
        return self.out_proj(y.transpose(1, 2)), [conv_state, ssm_state]

    def _dt(self, dt):   # dt_proj without its bias: the scan adds it (delta_bias) before the softplus
        p = self.dt_proj
        if isinstance(p, Int8Linear):
            return F.linear(dt, p.weight.to(dt.dtype)) * p.weight_scale.to(dt.dtype)
        return dt @ p.weight.t()


class Attention(nn.Module):
    def __init__(self, cfg: JambaConfig, int8: bool = False):
        super().__init__()
        self.nh, self.nkv, self.hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = linear(cfg.hidden_size, self.nh * self.hd, False, int8)
        self.k_proj = linear(cfg.hidden_size, self.nkv * self.hd, False, int8)
        self.v_proj = linear(cfg.hidden_size, self.nkv * self.hd, False, int8)
        self.o_proj = linear(self.nh * self.hd, cfg.hidden_size, False, int8)

    def forward(self, h, ops, past_k=None, past_v=None):   # h [B,L,H]
        B, L, _ = h.shape
        q = self.q_proj(h).view(B, L, self.nh, self.hd)
        k = self.k_proj(h).view(B, L, self.nkv, self.hd)
        v = self.v_proj(h).view(B, L, self.nkv, self.hd)
        o, k, v = ops.attention(q, k, v, past_k, past_v)
        return self.o_proj(o.reshape(B, L, self.nh * self.hd)), [k, v]


class MLP(nn.Module):
    def __init__(self, cfg: JambaConfig, int8: bool = False):
        super().__init__()
        self.gate_proj = linear(cfg.hidden_size, cfg.intermediate_size, False, int8)
        self.up_proj = linear(cfg.hidden_size, cfg.intermediate_size, False, int8)
        self.down_proj = linear(cfg.intermediate_size, cfg.hidden_size, False, int8)

    def forward(self, x, ops):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class MoE(nn.Module):
    """Experts stacked: w13 [E,2I,H] (gate rows then up rows), w2 [E,H,I].
    int8=True: int8 weights + fp32 per-output-channel scales, run by jamba::moe_int8.
    int8=False: float weights, computed densely over all experts with zero weights for the
    unselected ones (exportable with plain ops; E times the FLOPs: for comparison runs only)."""

    def __init__(self, cfg: JambaConfig, int8: bool, dtype: torch.dtype):
        super().__init__()
        E, I, H = cfg.num_experts, cfg.intermediate_size, cfg.hidden_size
        self.top_k, self.int8 = cfg.num_experts_per_tok, int8
        self.router = nn.Linear(H, E, bias=False)
        if int8:
            self.register_buffer("w13", torch.zeros(E, 2 * I, H, dtype=torch.int8))
            self.register_buffer("w13_scale", torch.ones(E, 2 * I))
            self.register_buffer("w2", torch.zeros(E, H, I, dtype=torch.int8))
            self.register_buffer("w2_scale", torch.ones(E, H))
        else:
            self.w13 = nn.Parameter(torch.zeros(E, 2 * I, H, dtype=dtype))
            self.w2 = nn.Parameter(torch.zeros(E, H, I, dtype=dtype))

    def forward(self, x, ops):   # x [B,L,H]
        B, L, H = x.shape
        xt = x.reshape(B * L, H)
        logits = self.router(xt)                                                   # [T,E]
        if self.int8:
            y = ops.moe_int8(xt, logits, self.w13, self.w13_scale, self.w2, self.w2_scale, self.top_k)
        else:
            w, ids = routing_weights(logits, self.top_k)
            comb = torch.zeros_like(logits, dtype=torch.float32).scatter(1, ids, w)    # [T,E]
            hcat = torch.einsum("th,eoh->eto", xt, self.w13)                        # [E,T,2I]
            g, u = hcat.chunk(2, dim=-1)
            out = torch.einsum("eti,ehi->eth", F.silu(g) * u, self.w2)              # [E,T,H]
            y = torch.einsum("eth,te->th", out.float(), comb).to(x.dtype)
        return y.reshape(B, L, H)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: JambaConfig, i: int, experts_int8: bool, dtype: torch.dtype, weights_int8: bool = False):
        super().__init__()
        self.is_attention = cfg.is_attention(i)
        if self.is_attention:
            self.self_attn = Attention(cfg, weights_int8)
        else:
            self.mamba = MambaMixer(cfg, weights_int8)
        # the router stays float (as llama.cpp keeps ffn_gate_inp): top-k choices are sensitive and it is small
        self.feed_forward = MoE(cfg, experts_int8, dtype) if cfg.is_moe(i) else MLP(cfg, weights_int8)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.pre_ff_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, ops, state):
        mixer = self.self_attn if self.is_attention else self.mamba
        out, state = mixer(self.input_layernorm(h), ops, *state)
        h = h + out
        return h + self.feed_forward(self.pre_ff_layernorm(h), ops), state


class Backbone(nn.Module):
    def __init__(self, cfg: JambaConfig, experts_int8: bool, dtype: torch.dtype, weights_int8: bool = False):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i, experts_int8, dtype, weights_int8)
                                    for i in range(cfg.num_hidden_layers))
        self.final_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


class JambaLM(nn.Module):
    """forward(input_ids [B,L] int64, state: flat list or None) -> (logits [B,L,V], new state list).
    weights_int8: every linear layer but the router (and a tied lm_head, which is the embedding) is
    an Int8Linear; the embedding stays float (decode reads one row of it)."""

    def __init__(self, cfg: JambaConfig, experts_int8: bool = True, dtype: torch.dtype = torch.float32,
                 impl: str = "custom", weights_int8: bool = False):
        super().__init__()
        self.config, self.experts_int8, self.weights_int8, self.impl = cfg, experts_int8, weights_int8, impl
        self.kv_round = None     # validation only: attention's k, v through this (an engine's int8 KV cache)
        self.model = Backbone(cfg, experts_int8, dtype, weights_int8)
        self.lm_head = linear(cfg.hidden_size, cfg.vocab_size, False, weights_int8 and not cfg.tie_word_embeddings)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.to(dtype)   # int8 buffers keep their dtype; scales are restored to fp32 below
        for m in self.modules():
            if isinstance(m, MoE) and m.int8:
                m.w13_scale.data, m.w2_scale.data = m.w13_scale.float(), m.w2_scale.float()
            if isinstance(m, Int8Linear):
                m.weight_scale.data = m.weight_scale.float()
        for m in self.modules():    # A_log, D, dt bias are used in fp32 by the scan
            if isinstance(m, MambaMixer):
                m.A_log.data = m.A_log.float()

    def forward(self, input_ids: torch.Tensor, state: Optional[list] = None):
        h, new_state = self.run_layers(self.model.embed_tokens(input_ids), state, 0, self.config.num_hidden_layers)
        return self.lm_head(self.model.final_layernorm(h)), new_state

    def run_layers(self, h: torch.Tensor, state: Optional[list], a: int, b: int):
        """Decoder layers [a, b) on h [B,L,H]; state: those layers' part of the flat state (or None)
        -> (h, their new state). A pipeline stage (export/trace.py StageProgram) is such a range."""
        ops = with_kv_rounding(IMPLS[self.impl], self.kv_round)
        new_state = []
        for i in range(a, b):
            j = 2 * (i - a)
            h, s = self.model.layers[i](h, ops, (None, None) if state is None else state[j:j + 2])
            new_state += s
        return h, new_state


def with_kv_rounding(ops: SimpleNamespace, kv_round) -> SimpleNamespace:
    """`ops` whose attention takes the step's keys and values through `kv_round` before it stores and
    attends over them (the eager twin of an engine's quantised KV cache); `ops` itself when None."""
    if kv_round is None:
        return ops
    attention = ops.attention
    return SimpleNamespace(**{**vars(ops), "attention": lambda q, k, v, past_k=None, past_v=None: attention(
        q, kv_round(k).to(k.dtype), kv_round(v).to(v.dtype), past_k, past_v)})


def state_shapes(cfg: JambaConfig, batch: int, past: int) -> list[tuple[str, tuple[int, ...], torch.dtype | None]]:
    """Names and shapes of the flat state list (dtype None = the model's dtype)."""
    out = []
    for i in range(cfg.num_hidden_layers):
        if cfg.is_attention(i):
            kv = (batch, past, cfg.num_key_value_heads, cfg.head_dim)
            out += [(f"layer{i}.k", kv, None), (f"layer{i}.v", kv, None)]
        else:
            out += [(f"layer{i}.conv_state", (batch, cfg.d_inner, cfg.mamba_d_conv - 1), None),
                    (f"layer{i}.ssm_state", (batch, cfg.d_inner, cfg.mamba_d_state), torch.float32)]
    return out
