"""Eager PyTorch references an engine is graded against.

- `eager`: this package's JambaLM running the plain `<op>_ref` oracles (not the fast kernels),
  prefilling in chunks with state carried, so memory stays flat at any length. Past
  `LONG_FROM` tokens (impl "auto", the default) it runs layer by layer over the whole sequence
  with two long-sequence twins of the oracles, both plain PyTorch and both checked against the
  `_ref` ops in tests/test_validate.py:
    * `selective_scan_chunked`: the same recurrence in blocks (local scans side by side, then the
      block-boundary states carried, then a closed-form correction) instead of a Python loop
      over every token: 0.2 s instead of 1.6 s for 8192 tokens x 256 channels x 16 states;
    * `attention_flash`: causal GQA through torch's fused scaled_dot_product_attention, which
      never holds an L x L matrix (its CPU kernel is flash-style; 65,536 tokens: 0.3 GB peak).
  Measured on the bench preset (2 cores): the plain `_ref` path takes 201 s at 65,536 tokens
  (its attention loop is quadratic: ~1 h extrapolated at 262,144); the long path 11-17 s at
  65,536 and 111-220 s at 262,144 (1.3 GB peak), logits within 6e-7 of the plain path. Exact
  causal attention at 262,144 tokens is 1.8e13 FLOPs (4 heads x d 32): the bound for any side.
  Caveat: the ONNX Runtime engine's attention kernel also calls torch's CPU flash kernel (in
  chunks, merged by log-sum-exp); at short lengths both are checked against `attention_ref`.
- `hf`: Hugging Face transformers' JambaForCausalLM on the same checkpoint: an independent
  implementation. For an ExpertsInt8 artifact its expert weights are replaced by the dequantised
  int8 weights, so both sides compute the same function.

`prefill_with_state(ids)` also returns the final state (named like the engine's outputs,
`present.layer{i}.*`) and per-layer health statistics of the hidden states (non-finite count,
largest magnitude), which `validate/health.py` uses to name the first layer that goes wrong."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace
from typing import Optional

import numpy as np
import torch
import torch.nn.functional as F

from jambatrt.config import JambaConfig
from jambatrt.engines.base import cut_past
from jambatrt.engines.ort import KV_CACHES
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError
from jambatrt.export import ops as jops
from jambatrt.export.checkpoint import DTYPES, hf_tensor_shapes
from jambatrt.export.model import state_shapes, with_kv_rounding
from jambatrt.export.quantize import dequantize_experts, dequantize_linear
from jambatrt.export.weights import load_artifact_model, open_store
from jambatrt.manifest import Manifest

REFERENCES = ("eager", "hf")
LONG_FROM = 16384        # impl "auto": lengths above this run the layer-by-layer long reference
IMPLS = ("auto", "ref", "long", "custom")
_MIN_EXPONENT = -80.0    # exp(-80) = 1.8e-35: decays below it are 0 to fp32 accuracy; clamping avoids
                         # denormals, which make every later multiply ~10x slower on x86


# ---- long-sequence twins of the oracles ---------------------------------------------------------
def selective_scan_chunked(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                           Cm: torch.Tensor, Dskip: torch.Tensor, z: Optional[torch.Tensor] = None,
                           delta_bias: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                           block: int = 64, compute_dtype: torch.dtype = torch.float32,
                           ) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `selective_scan_ref` (u, delta, z [B,D,L]; A [D,N]; Bm, Cm [B,N,L];
    Dskip, delta_bias [D]; state [B,D,N] fp32 or None -> y [B,D,L] in u.dtype, state [B,D,N] fp32),
    computed in blocks of `block` steps. With dA_t = exp(dt_t A) and dBu_t = dt_t u_t B_t:

    1. local scans: every block starts from h = 0; the blocks advance side by side, one
       vectorised step per position inside a block: hl_t = dA_t hl_{t-1} + dBu_t, yl_t = C_t . hl_t.
    2. carry: the state entering block j is h_j = exp(A sum_j dt) h_{j-1} + hl_end(j-1), a loop
       over blocks (L / block steps on [B,D,N]).
    3. correction, in closed form: h_t = hl_t + exp(A cumsum_j(dt)_t) h_j, so
       y_t = yl_t + C_t . (exp(A cumsum(dt)_t) h_j). Every exponent is <= 0: nothing overflows.

    Python loops: 2 x block + L / block iterations instead of L. Arithmetic in `compute_dtype`."""
    Bsz, D, L = u.shape
    N = A.shape[1]
    cd = compute_dtype
    dt = delta.to(cd)
    if delta_bias is not None:
        dt = dt + delta_bias.to(cd)[None, :, None]
    dt = F.softplus(dt)
    uf = u.to(cd)
    T = max(1, min(block, L))
    nb = -(-L // T)
    pad = nb * T - L      # padded steps have dt = 0 and B = 0: decay 1, no input, state unchanged

    def blocks(x):        # [B,C,L] -> [T,B,nb,C]: step t of every block is one contiguous slice
        return F.pad(x, (0, pad)).view(x.shape[0], x.shape[1], nb, T).permute(3, 0, 2, 1).contiguous()

    dts, dtu = blocks(dt), blocks(dt * uf)                                     # [T,B,nb,D]
    Bs, Cs = blocks(Bm.to(cd)), blocks(Cm.to(cd))                              # [T,B,nb,N]
    Af = A.to(cd)                                                              # [D,N]
    hl = uf.new_zeros(Bsz, nb, D, N, dtype=cd)
    y = uf.new_empty(T, Bsz, nb, D, dtype=cd)
    for t in range(T):                                                         # 1. local scans
        dA = torch.exp((dts[t, ..., None] * Af).clamp_(min=_MIN_EXPONENT))    # [B,nb,D,N]
        hl = torch.addcmul(dtu[t, ..., None] * Bs[t, :, :, None, :], dA, hl)
        y[t] = torch.matmul(hl, Cs[t, :, :, :, None])[..., 0]
    cum = dts.cumsum(0)                                                        # [T,B,nb,D]
    decay_block = torch.exp((cum[-1, ..., None] * Af).clamp_(min=_MIN_EXPONENT))  # [B,nb,D,N]
    h_in = torch.empty_like(hl)
    h = uf.new_zeros(Bsz, D, N, dtype=cd) if state is None else state.to(cd).clone()
    for j in range(nb):                                                        # 2. carry
        h_in[:, j] = h
        h = torch.addcmul(hl[:, j], decay_block[:, j], h)
    for t in range(T):                                                         # 3. correction
        decay = torch.exp((cum[t, ..., None] * Af).clamp_(min=_MIN_EXPONENT))  # [B,nb,D,N]
        y[t] += torch.matmul(decay * h_in, Cs[t, :, :, :, None])[..., 0]
    y = y.permute(1, 3, 2, 0).reshape(Bsz, D, nb * T)[..., :L]
    y = y + Dskip.to(cd)[None, :, None] * uf
    if z is not None:
        y = y * F.silu(z.to(cd))
    return y.to(u.dtype), h.float()


def attention_flash(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: Optional[torch.Tensor] = None,
                    past_v: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Same contract as `attention_ref` (q [B,L,Hq,d]; k, v [B,L,Hkv,d] -> o, present_k, present_v),
    through torch's fused causal scaled_dot_product_attention (fp32 softmax for fp32 inputs; its
    CPU kernel works in blocks and never holds L x L). SDPA's causal mask is aligned to the top
    left, which is right only without past tokens: with a past this falls back to `attention_ref`."""
    if past_k is not None and past_k.shape[1] > 0:
        return jops.reference("attention")(q, k, v, past_k, past_v)
    Hq, Hkv = q.shape[2], k.shape[2]
    qt = q.transpose(1, 2)                                                     # [B,Hq,L,d]
    kt = k.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)                 # [B,Hq,L,d]
    vt = v.transpose(1, 2).repeat_interleave(Hq // Hkv, dim=1)
    o = F.scaled_dot_product_attention(qt, kt, vt, is_causal=True)             # scale d^-0.5
    return o.transpose(1, 2).contiguous(), k.contiguous(), v.contiguous()


def long_ops() -> SimpleNamespace:
    """The op namespace of the long reference: `<op>_ref` except the scan and attention twins."""
    return SimpleNamespace(causal_conv1d=jops.reference("causal_conv1d"), selective_scan=selective_scan_chunked,
                           moe_int8=jops.reference("moe_int8"), attention=attention_flash)


class Reference:
    name = ""
    last_router_margins: dict = {}      # set by prefill_with_state: {MoE layer: [B, L] routing margins}

    def __init__(self, artifact: str | Path, chunk: int = 8192):
        self.artifact = Path(artifact)
        self.manifest = Manifest.read(self.artifact)
        self.config = self.manifest.config
        self.dtype = DTYPES[self.manifest.dtype]
        self.experts_int8 = self.manifest.experts_int8
        self.chunk = chunk

    def prefill(self, input_ids: np.ndarray) -> np.ndarray:
        """input_ids [B,L] -> logits [B,L,V] fp32 numpy."""
        raise NotImplementedError

    def prefill_with_state(self, input_ids: np.ndarray) -> tuple[np.ndarray, dict | None, list[dict]]:
        """-> (logits [B,L,V] fp32, {"present.layer{i}.*": final state} or None where this reference
        keeps no comparable state, per-layer health [{"layer", "kind", "nonfinite", "max_abs"}])."""
        return self.prefill(input_ids), None, []

    def describe(self, length: int) -> str:
        """What computes `length` tokens (recorded per length in reports)."""
        return self.name

    def layer_kind(self, i: int) -> str:
        c = self.config
        return ("attention" if c.is_attention(i) else "mamba") + ("+moe" if c.is_moe(i) else "+mlp")

    def state_names(self) -> list[str]:
        return ["present." + n for n, _, _ in state_shapes(self.config, 1, 0)]


class _LayerStats:
    """Forward hooks on decoder layers: non-finite count and largest |h| of each layer's output
    hidden states, accumulated over every call (chunks) until read."""

    def __init__(self, layers):
        self.stats = [{"nonfinite": 0, "max_abs": 0.0} for _ in layers]
        self.handles = [layer.register_forward_hook(self._hook(i)) for i, layer in enumerate(layers)]

    def _hook(self, i):
        def hook(module, args, out):
            h = out[0] if isinstance(out, (tuple, list)) else out
            self.stats[i]["nonfinite"] += int((~torch.isfinite(h)).sum())
            finite = torch.nan_to_num(h.float(), nan=0.0, posinf=0.0, neginf=0.0)
            self.stats[i]["max_abs"] = max(self.stats[i]["max_abs"], float(finite.abs().max()) if h.numel() else 0.0)
        return hook

    def close(self) -> list[dict]:
        for h in self.handles:
            h.remove()
        return self.stats


class _RouterMargins:
    """Forward hooks on every MoE router: per token, the routing margin p_k - p_(k+1) between the
    k-th and (k+1)-th softmax probability (k = top_k). Where it is ~1 ulp, the top-k choice is
    numerically a coin toss: a correct kernel may pick the other expert, and that token's output
    legitimately differs (seen once in 262,144 tokens of the bench preset: margin 6e-8).
    `close()` -> {layer: margins [B, L] fp32 numpy}."""

    def __init__(self, layers, batch: int, top_k: int):
        self.batch, self.top_k, self.calls, self.handles = batch, top_k, {}, []
        for i, layer in enumerate(layers):
            router = getattr(getattr(layer, "feed_forward", None), "router", None)
            if isinstance(router, torch.nn.Module):
                self.handles.append(router.register_forward_hook(self._hook(i)))

    def _hook(self, i):
        def hook(module, args, out):
            logits = out[0] if isinstance(out, (tuple, list)) else out
            p = torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)
            if p.shape[-1] <= self.top_k:                    # every expert is used: nothing to choose
                margin = torch.full(p.shape[:1], float("inf"))
            else:
                top = torch.topk(p, self.top_k + 1, dim=-1).values
                margin = top[:, self.top_k - 1] - top[:, self.top_k]
            self.calls.setdefault(i, []).append(margin.numpy().reshape(self.batch, -1))
        return hook

    def close(self) -> dict[int, np.ndarray]:
        for h in self.handles:
            h.remove()
        return {i: np.concatenate(c, axis=1) for i, c in self.calls.items()}


class EagerReference(Reference):
    """impl: "ref" (the plain `<op>_ref` oracles, chunks of `chunk` tokens with state carried),
    "long" (layer by layer over the whole sequence with `long_ops()`), "auto" ("ref" up to
    `long_from` tokens, "long" beyond), or "custom" (torch.ops.jamba.*: whatever kernels are
    registered for the torch custom ops; what `jambatrt profile` times as the eager model)."""

    name = "eager"

    def __init__(self, artifact, chunk: int = 8192, impl: str = "auto", long_from: int = LONG_FROM,
                 kv_cache: str = "float32"):
        """kv_cache: "int8" rounds attention's keys and values as the ORT engine's int8 KV cache
        stores them (plugins/cpu/kv_int8.py `fake_quant_kv`), the model the engine is validated against."""
        super().__init__(artifact, chunk)
        if impl not in IMPLS:
            raise InputError(f"unknown eager reference impl {impl!r} (accepted: {', '.join(IMPLS)})")
        if kv_cache not in KV_CACHES:
            raise InputError(f"unknown KV cache {kv_cache!r} (accepted: {', '.join(KV_CACHES)})")
        self.impl, self.long_from, self.kv_cache = impl, long_from, kv_cache
        # the weights stay in the artifact's store, mapped: pages are read as layers use them
        self.model = load_artifact_model(self.artifact, self.manifest, impl="custom" if impl == "custom" else "ref")
        if kv_cache == "int8":
            from jambatrt.plugins.cpu.kv_int8 import fake_quant_kv
            self.model.kv_round = fake_quant_kv

    def _impl_for(self, length: int) -> str:
        if self.impl == "auto":
            return "long" if length > self.long_from else "ref"
        return self.impl

    def describe(self, length: int) -> str:
        kv = ", K/V rounded to the int8 KV cache" if self.kv_cache == "int8" else ""
        return {"ref": f"eager, <op>_ref ops, chunks of {self.chunk}",
                "custom": f"eager, torch.ops.jamba custom ops, chunks of {self.chunk}",
                "long": "eager-long, layer by layer: <op>_ref conv/MoE, selective_scan_chunked, "
                        "attention_flash (SDPA)"}[self._impl_for(length)] + kv

    @torch.no_grad()
    def prefill(self, input_ids):
        return self.prefill_with_state(input_ids, stats=False)[0]

    # ---- the engines' generation interface (engines/base.py), for `profile` --------------------------
    @property
    def max_seq(self) -> int:
        return self.config.max_position_embeddings

    def default_chunk(self, batch: int) -> int:
        return self.chunk

    @torch.no_grad()
    def prefill_last(self, input_ids):
        """input_ids [B,L] -> (the last position's logits [B,V] fp32 numpy, the model's state), in
        chunks of `chunk` tokens with the state carried (this reference's impl)."""
        t = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        state = None
        for s in range(0, t.shape[1], self.chunk):
            logits, state = self.model(t[:, s:s + self.chunk], state)
        return logits[:, -1].float().numpy(), state

    @torch.no_grad()
    def decode(self, token_ids, state):
        """token_ids [B] + state -> (logits [B,V] fp32 numpy, new state)."""
        logits, state = self.model(torch.from_numpy(np.asarray(token_ids, dtype=np.int64).reshape(-1, 1)), state)
        return logits[:, -1].float().numpy(), state

    def cut_past(self, state, keep: int):
        """The model's state (the step program's order) with only the first `keep` past tokens of its KV."""
        return cut_past(self.manifest.step.state, state, keep)

    @torch.no_grad()
    def prefill_with_state(self, input_ids, stats: bool = True):
        """Also sets `last_router_margins` ({MoE layer: [B, L] margins}, see `_RouterMargins`)."""
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        routers = _RouterMargins(self.model.model.layers, ids.shape[0], self.config.num_experts_per_tok) \
            if stats else None
        try:
            return self._prefill(ids, stats)
        finally:
            self.last_router_margins = routers.close() if routers else {}

    def _prefill(self, ids: torch.Tensor, stats: bool):
        if self._impl_for(ids.shape[1]) == "long":
            return self._prefill_long(ids, stats)
        hooks = _LayerStats(self.model.model.layers) if stats else None
        state, outs = None, []
        try:
            for s in range(0, ids.shape[1], self.chunk):
                logits, state = self.model(ids[:, s:s + self.chunk], state)
                outs.append(logits.float().numpy())
        finally:
            layer_stats = hooks.close() if hooks else []
        return (np.concatenate(outs, axis=1), self._named(state),
                [{"layer": i, "kind": self.layer_kind(i), **st} for i, st in enumerate(layer_stats)])

    def _named(self, state) -> dict:
        return {n: t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()
                for n, t in zip(self.state_names(), state)}

    def _prefill_long(self, ids: torch.Tensor, stats: bool):
        """Layer-major: each layer runs over the whole sequence before the next. Mamba mixers and
        feed-forwards go in chunks of `self.chunk` tokens (state carried); attention runs at once
        through `attention_flash`. Memory: a few [B,L,H] hidden tensors and the logits, no L x L."""
        ops, c, m = with_kv_rounding(long_ops(), self.model.kv_round), self.chunk, self.model.model
        B, L = ids.shape
        h = torch.cat([m.embed_tokens(ids[:, s:s + c]) for s in range(0, L, c)], dim=1)   # [B,L,H]
        state, layer_stats = [], []
        for i, layer in enumerate(m.layers):
            if layer.is_attention:
                x = torch.cat([layer.input_layernorm(h[:, s:s + c]) for s in range(0, L, c)], dim=1)
                out, st = layer.self_attn(x, ops)
                del x
                for s in range(0, L, c):
                    h[:, s:s + c] += out[:, s:s + c]
                del out
            else:
                st = [None, None]
                for s in range(0, L, c):
                    out, st = layer.mamba(layer.input_layernorm(h[:, s:s + c]), ops, *st)
                    h[:, s:s + c] += out
            nonfinite, max_abs = 0, 0.0
            for s in range(0, L, c):
                hs = h[:, s:s + c]
                hs += layer.feed_forward(layer.pre_ff_layernorm(hs), ops)
                if stats:
                    nonfinite += int((~torch.isfinite(hs)).sum())
                    max_abs = max(max_abs, float(torch.nan_to_num(hs.float(), 0.0, 0.0, 0.0).abs().max()))
            state += st
            layer_stats.append({"layer": i, "kind": self.layer_kind(i), "nonfinite": nonfinite, "max_abs": max_abs})
        logits = np.empty((B, L, self.config.vocab_size), dtype=np.float32)
        for s in range(0, L, c):
            logits[:, s:s + c] = self.model.lm_head(m.final_layernorm(h[:, s:s + c])).float().numpy()
        return logits, self._named(state), layer_stats if stats else []


class HFReference(Reference):
    name = "hf"

    def __init__(self, artifact, chunk: int = 8192):
        super().__init__(artifact, chunk)
        try:
            import transformers
        except ImportError:
            raise BackendUnavailable("--reference hf needs transformers (pip install 'jambatrt[test]')") from None
        import tempfile

        transformers.logging.set_verbosity_error()
        # transformers loads a checkpoint whole: this reference is for models that fit in memory
        with tempfile.TemporaryDirectory() as d:
            ckpt = hf_checkpoint(self.manifest, Path(d) / "checkpoint")
            model = transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=self.dtype)
        self.model = model.eval()

    @torch.no_grad()
    def prefill(self, input_ids):
        ids = torch.from_numpy(np.asarray(input_ids, dtype=np.int64))
        return self.model(ids).logits.float().numpy()

    def describe(self, length: int) -> str:
        import transformers
        return f"hf, transformers {transformers.__version__} JambaForCausalLM ({self.model.config._attn_implementation})"

    @torch.no_grad()
    def prefill_with_state(self, input_ids):
        """transformers keeps its cache in its own layout: only logits and layer health here."""
        hooks = _LayerStats(self.model.model.layers)
        routers = _RouterMargins(self.model.model.layers, np.shape(input_ids)[0], self.config.num_experts_per_tok)
        try:
            logits = self.prefill(input_ids)
        finally:
            stats = hooks.close()
            self.last_router_margins = routers.close()
        return logits, None, [{"layer": i, "kind": self.layer_kind(i), **st} for i, st in enumerate(stats)]


def hf_tensors(artifact: Path, cfg: JambaConfig, experts_int8: bool):
    """The artifact's weights in the HF checkpoint layout (per-expert gate/up/down; with ExpertsInt8
    the int8 experts dequantised, so transformers computes the same function as the engine),
    one tensor at a time, in `hf_tensor_shapes` order."""
    store = open_store(artifact)
    I = cfg.intermediate_size
    for name in hf_tensor_shapes(cfg):
        if ".experts." not in name:
            t = store.tensor(name)
            if t.dtype == torch.int8:        # --weights-int8: an Int8Linear's weight, dequantised likewise
                t = dequantize_linear(t, store.tensor(name + "_scale"))
            yield name, t
            continue
        layer, rest = name.split(".experts.")
        e, part = int(rest.split(".")[0]), rest.split(".")[1]
        w = "w2" if part == "down_proj" else "w13"
        t = store.tensor(f"{layer}.{w}")[e]
        if experts_int8:
            t = dequantize_experts(t[None], store.tensor(f"{layer}.{w}_scale")[e][None])[0]
        yield name, {"gate_proj": t[:I], "up_proj": t[I:], "down_proj": t}[part]


def hf_checkpoint(manifest: Manifest, out: Path) -> Path:
    """Write the artifact's weights as a HF checkpoint directory `out` (see `hf_tensors`)."""
    from jambatrt.export.checkpoint import save_checkpoint

    return save_checkpoint(manifest.config, hf_tensors(manifest.artifact, manifest.config, manifest.experts_int8), out)


def make_reference(name: str, artifact, **kw) -> Reference:
    if name == "eager":
        return EagerReference(artifact, **kw)
    if name == "hf":
        return HFReference(artifact, **kw)
    raise ArtifactError(f"unknown reference {name!r} (accepted: {', '.join(REFERENCES)})")
