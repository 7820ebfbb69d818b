"""The ORT engine's native decode step: one token of B sequences through the whole model in a few
numba calls per layer, on the kernels the graph's custom ops run (linear_int8 / linear_f32 GEMVs,
mamba_mixer's fused step, attention's in-place cache, moe_int8's few-token experts), with no ONNX
Runtime graph in between.

Why: a decode step of the int8 peer preset (issue 18) through the ONNX Runtime graph spent ~5 ms of
its ~13 above the time its GEMVs take back to back: ~100 ONNX Runtime nodes, ~30 Python op calls,
and the OpenMP threads of our kernels falling asleep in between and being woken (30-75 us each).
Here the numba threads stay warm from one layer to the next and each layer is 3-5 calls.

The math is export/model.py's JambaLM for L = 1, read from the artifact's weight store by the
checkpoint's names (the tensors the graph maps, in the same mapping):
    h = embed[ids]
    per layer: h += mixer(rms_norm(h)); h += ffn(rms_norm(h))
    logits = lm_head(rms_norm(h))
mixer: Mamba (mamba_mixer._mixer_step: in_proj, conv step, x_proj, dt/B/C norms, dt_proj, scan
step, out_proj) or attention (q/k/v GEMVs, the step's k/v appended to the layer's KVCache and
attended over in place, o_proj); ffn: SwiGLU MLP or ExpertsInt8 MoE (float32 router, softmax,
top-k without renormalisation, the chosen experts' GEMVs). Linear layers are int8 with per-channel
scales (--weights-int8) or float32, each GEMV the same kernel as the graph's.

`NativeDecoder.supports(config, store)` says whether an artifact's model is one this step runs
(float experts are left to the graph)."""

from __future__ import annotations

import numba
import numpy as np
from numba import njit

from jambatrt.plugins.cpu.linear_f32 import gemv_into
from jambatrt.plugins.cpu.mamba_mixer import _mixer_step, _rms_norm_into
from jambatrt.plugins.cpu.moe_int8 import _moe_few_tokens
from jambatrt.plugins.cpu.native import gemv_f32_address, gemv_int8_address, scan_step_address
from jambatrt.plugins.cpu.selective_scan import swiglu_into

_NO_SCALE = np.ones(0, np.float32)      # the scale argument of a float32 weight (gemv_into does not read it)


@njit(cache=True, error_model="numpy")
def _norm(h, w, eps, out):
    """out = rms_norm(h) * w, rows of h [B,H]."""
    _rms_norm_into(h, w, eps, out)


@njit(cache=True, error_model="numpy")
def _add_norm(h, y, w, eps, out):
    """h += y (the residual stream, in place); out = rms_norm(h) * w."""
    h += y
    _rms_norm_into(h, w, eps, out)


@njit(cache=True, error_model="numpy")
def _mlp(x, wg, sg, wu, su, wd, sd, y, n8, n32):
    """y = down(silu(gate(x)) * up(x)), x [B,H] -> y [B,H]."""
    B = x.shape[0]
    I = wg.shape[0]
    g = np.empty((B, I), np.float32)
    u = np.empty((B, I), np.float32)
    a = np.empty((B, I), np.float32)
    gemv_into(x, wg, sg, g, n8, n32)
    gemv_into(x, wu, su, u, n8, n32)
    for b in range(B):
        swiglu_into(g[b], u[b], a[b])
    gemv_into(a, wd, sd, y, n8, n32)


@njit(cache=True, error_model="numpy")
def _moe(x, router, top_k, w13, s13, w2, s2, y, n8, n32):
    """y = sum over the top_k experts of softmax(router x)[e] * expert_e(x) (moe_int8's semantics:
    float32 softmax, no renormalisation of the k weights), x [B,H] -> y [B,H] (overwritten)."""
    B = x.shape[0]
    E = router.shape[0]
    logits = np.empty((B, E), np.float32)
    gemv_into(x, router, _NO_SCALE, logits, n8, n32)
    experts = np.empty((B, top_k), np.int64)
    weights = np.empty((B, top_k), np.float32)
    for b in range(B):
        top = logits[b].max()
        p = np.exp(logits[b] - top)
        p /= p.sum()
        order = np.argsort(-p, kind="mergesort")     # stable: ties go to the lower expert id, as torch.topk
        for j in range(top_k):
            experts[b, j] = order[j]
            weights[b, j] = p[order[j]]
    y[:] = 0.0
    _moe_few_tokens(x, experts, weights, w13, s13, w2, s2, 0, y, n8)


class NativeDecoder:
    """One decode step of an artifact's model, from its weight store (export/store.py MappedStore) and
    the engine's KV caches {layer: engines.ort.KVCache}."""

    def __init__(self, config, store, caches: dict):
        self.cfg, self.caches = config, caches
        self.n8, self.n32, self.nscan = gemv_int8_address(), gemv_f32_address(), scan_step_address()
        self.eps = np.float32(config.rms_norm_eps)
        self.embed = store.array("model.embed_tokens.weight")
        self.final_norm = store.array("model.final_layernorm.weight")
        self.lm_head = self._linear(store, "model.embed_tokens" if config.tie_word_embeddings else "lm_head")
        self.layers = [self._layer(store, i) for i in range(config.num_hidden_layers)]
        numba.get_num_threads()     # starts numba's threads (gemv_int8_into's precondition)

    @staticmethod
    def supports(config, store) -> str | None:
        """None when this step runs the model in `store`, else why not (the engine then decodes
        through the graph)."""
        for i in range(config.num_hidden_layers):
            if config.is_moe(i) and store.array(f"model.layers.{i}.feed_forward.w13").dtype != np.int8:
                return "float experts (the dense comparison export)"
        return None

    @staticmethod
    def _linear(store, name: str) -> tuple:
        w = store.array(f"{name}.weight")
        s = store.array(f"{name}.weight_scale") if w.dtype == np.int8 else _NO_SCALE
        return w, s

    def _layer(self, store, i: int) -> tuple:
        cfg, p = self.cfg, f"model.layers.{i}."
        a = store.array
        norms = (a(p + "input_layernorm.weight"), a(p + "pre_ff_layernorm.weight"))
        if cfg.is_attention(i):
            mixer = ("attention", *(self._linear(store, f"{p}self_attn.{n}_proj") for n in "qkvo"))
        else:
            m = p + "mamba."
            D = cfg.d_inner
            conv_b = a(m + "conv1d.bias") if cfg.mamba_conv_bias else np.zeros(D, np.float32)
            params = (a(m + "conv1d.weight").reshape(D, -1), conv_b,
                      -np.exp(a(m + "A_log").astype(np.float32)), a(m + "D"), a(m + "dt_proj.bias"),
                      a(m + "dt_layernorm.weight"), a(m + "b_layernorm.weight"), a(m + "c_layernorm.weight"))
            weights = sum((self._linear(store, m + n) for n in ("in_proj", "x_proj", "dt_proj", "out_proj")), ())
            biases = ((a(m + "in_proj.bias"), a(m + "out_proj.bias")) if cfg.mamba_proj_bias else (None, None))
            mixer = ("mamba", params, weights, biases)
        f = p + "feed_forward."
        if cfg.is_moe(i):
            ffn = ("moe", a(f + "router.weight"), *(a(f + n) for n in ("w13", "w13_scale", "w2", "w2_scale")))
        else:
            ffn = ("mlp", *sum((self._linear(store, f + n) for n in ("gate_proj", "up_proj", "down_proj")), ()))
        return norms, mixer, ffn

    def step(self, ids: np.ndarray, state: list) -> tuple[np.ndarray, list]:
        """ids [B,1] int64; state: the flat state list (Mamba layers' conv/ssm states as arrays; attention
        layers' entries are read from their caches, which must hold the past and have room for one
        more position) -> (logits [B,1,V] float32, the new flat state; the attention entries are the
        caches' views, as the graph path hands them)."""
        B = ids.shape[0]
        H = self.cfg.hidden_size
        h = np.ascontiguousarray(self.embed[ids[:, 0]], dtype=np.float32)
        x = np.empty((B, H), np.float32)
        y = np.empty((B, H), np.float32)
        n8, n32, eps = self.n8, self.n32, self.eps
        new_state: list = []
        _norm(h, self.layers[0][0][0], eps, x)
        for i, ((_, ln_ff), mixer, ffn) in enumerate(self.layers):    # input norms: applied before the layer
            if mixer[0] == "mamba":
                conv, ssm = (np.ascontiguousarray(s, dtype=np.float32) for s in state[2 * i:2 * i + 2])
                conv_out, ssm_out = np.empty_like(conv), np.empty_like(ssm)
                _mixer_step(x, conv, ssm, *mixer[1], *mixer[2], eps, y, conv_out, ssm_out, (n8, n32, self.nscan),
                            *mixer[3])
                new_state += [conv_out, ssm_out]
            else:
                new_state += self._attention(i, x, mixer[1:], y)
            _add_norm(h, y, ln_ff, eps, x)
            if ffn[0] == "moe":
                _moe(x, ffn[1], self.cfg.num_experts_per_tok, *ffn[2:], y, n8, n32)
            else:
                _mlp(x, *ffn[1:], y, n8, n32)
            nxt = self.layers[i + 1][0][0] if i + 1 < len(self.layers) else self.final_norm
            _add_norm(h, y, nxt, eps, x)
        logits = np.empty((B, self.cfg.vocab_size), np.float32)
        _project(x, *self.lm_head, logits, n8, n32)
        return logits.reshape(B, 1, -1), new_state

    def _attention(self, i: int, x: np.ndarray, proj: tuple, y: np.ndarray) -> list:
        from jambatrt.plugins.cpu.attention import attend_in_cache
        cfg, B = self.cfg, x.shape[0]
        Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        q, k, v = (np.empty((B, n * d), np.float32) for n in (Hq, Hkv, Hkv))
        for (w, s), out in zip(proj[:3], (q, k, v)):
            _project(x, w, s, out, self.n8, self.n32)
        c = self.caches[i]
        o = attend_in_cache(c, q.reshape(B, 1, Hq, d), k.reshape(B, 1, Hkv, d), v.reshape(B, 1, Hkv, d))
        _project(o.reshape(B, Hq * d), *proj[3], y, self.n8, self.n32)
        c.views = c.state_views()
        return list(c.views)


@njit(cache=True, error_model="numpy")
def _project(x, w, s, out, n8, n32):
    """out = x @ w^T (* s): one GEMV from Python."""
    gemv_into(x, w, s, out, n8, n32)
