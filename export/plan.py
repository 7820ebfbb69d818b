"""Memory arithmetic from the config alone: parameters, weight bytes, KV cache, Mamba state, the
tensors one prefill chunk creates (TensorRT volumes are 32-bit: every tensor must hold fewer than
2^31 elements), activations per chunk, and whether the whole thing fits a GPU.

Pure arithmetic on the config; the chunking policy built on it lives in engines/chunking.py."""

from __future__ import annotations

import math
import os

from jambatrt.config import JambaConfig
from jambatrt.errors import ConfigError

TENSOR_LIMIT = 2 ** 31 - 1          # TensorRT: a tensor's volume must fit an int32
GPU_BYTES = 80 * 10 ** 9            # an "80 GB" GPU (H100 / A100-80GB), counted in decimal GB: conservative
DEFAULT_CHUNK_CAP = 8192            # longest prefill chunk we plan for (engine memory grows with it)
ACT_BYTES = 2                       # bf16 activations


def weight_tensors(cfg: JambaConfig) -> dict[str, tuple[int, ...]]:
    """The largest weight tensors of the engine graph (one per kind), as the graph holds them:
    experts stacked per layer (w13 [E,2I,H], w2 [E,H,I])."""
    H, I, V, D, E = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.d_inner, cfg.num_experts
    out = {"embed_tokens [V,H]": (V, H)}
    if not cfg.tie_word_embeddings:
        out["lm_head [V,H]"] = (V, H)
    if cfg.num_mamba_layers:
        out["mamba.in_proj [2*D_inner,H]"] = (2 * D, H)
    if cfg.num_moe_layers:
        out["moe.w13 [E,2I,H]"] = (E, 2 * I, H)
        out["moe.w2 [E,H,I]"] = (E, H, I)
    if cfg.num_dense_layers:
        out["mlp.gate_proj [I,H]"] = (I, H)
    return out


def param_counts(cfg: JambaConfig) -> dict[str, int]:
    """Parameters of the HF checkpoint layout (what hf_tensor_shapes lists), in closed form -- per
    layer kind times the number of such layers -- so any config, 10^9 layers or experts included,
    is counted in microseconds: {"dense", "expert", "expert_scales"} (scales: the int8 per-channel
    scales ExpertsInt8 adds)."""
    H, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.d_inner
    N, R, K, E = cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv, cfg.num_experts
    kv = cfg.num_key_value_heads * cfg.head_dim
    embed = V * H * (1 if cfg.tie_word_embeddings else 2) + H                      # + final norm
    norms = 2 * H                                                                 # per layer
    attention = 2 * H * H + 2 * kv * H
    mamba = (2 * D * H + D * K + (R + 2 * N) * D + D * R + D + D * N + D + H * D + R + 2 * N
             + (D if cfg.mamba_conv_bias else 0) + (2 * D + H if cfg.mamba_proj_bias else 0))
    dense_mlp = 3 * I * H
    router, one_expert = E * H, 3 * I * H
    n_moe = cfg.num_moe_layers
    dense = (embed + cfg.num_hidden_layers * norms + cfg.num_attention_layers * attention
             + cfg.num_mamba_layers * mamba + cfg.num_dense_layers * dense_mlp + n_moe * router)
    # the non-expert linear weights (*proj.weight, lm_head): what ONNX Runtime pre-packs (host_memory)
    linear = (cfg.num_attention_layers * attention + cfg.num_mamba_layers * (2 * D * H + (R + 2 * N) * D + D * R + H * D)
              + cfg.num_dense_layers * dense_mlp + (0 if cfg.tie_word_embeddings else V * H))
    return {"dense": dense, "expert": n_moe * E * one_expert, "expert_scales": n_moe * E * (2 * I + H),
            "linear": linear}


def export_weight_bytes(cfg: JambaConfig, dtype_bytes: int, experts_int8: bool) -> int:
    """Bytes of the artifact's weights (the model in its dtype; int8 experts + fp32 scales), without
    the store's alignment padding (export/weights.py store_bytes has that, but lists every tensor)."""
    c = param_counts(cfg)
    experts = c["expert"] + 4 * c["expert_scales"] if experts_int8 else c["expert"] * dtype_bytes
    return c["dense"] * dtype_bytes + experts


def physical_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def refuse_unbuildable(cfg: JambaConfig, dtype_bytes: int, experts_int8: bool, out_dir=None, source: str = "config",
                       memory_bytes: int | None = None, disk_bytes: int | None = None) -> dict:
    """Refuse, from the plan and before a tensor is listed, read or allocated, a config this machine
    cannot export: its host memory (host_memory: the streamed weights' block, tracing per layer) over
    the physical memory, or its weights over the free space where `out_dir` will be. Closed form, so
    10^9 layers or experts are refused in microseconds (listing their tensors would not finish).
    ConfigError names the fields that make it so. Returns {"host", "weights"} in bytes."""
    need = {"host": host_memory(cfg, dtype_bytes)["export"], "weights": export_weight_bytes(cfg, dtype_bytes, experts_int8)}
    have_mem = memory_bytes if memory_bytes is not None else physical_memory_bytes()
    have_disk = disk_bytes
    if have_disk is None and out_dir is not None:
        import shutil
        from pathlib import Path
        where = Path(out_dir).absolute()
        while not where.exists() and where != where.parent:
            where = where.parent
        have_disk = shutil.disk_usage(where).free
    c = param_counts(cfg)
    fields = (f"{c['dense'] + c['expert']:,} parameters: num_hidden_layers={cfg.num_hidden_layers:,}, "
              f"num_experts={cfg.num_experts:,}, hidden_size={cfg.hidden_size:,}, intermediate_size="
              f"{cfg.intermediate_size:,}, vocab_size={cfg.vocab_size:,}")
    if have_mem is not None and need["host"] > have_mem:
        raise ConfigError(f"{source}: the memory plan needs {need['host'] / 1e9:,.1f} GB of host memory to export "
                          f"({fields}); this machine has {have_mem / 1e9:,.1f} GB (`jambatrt inspect` shows the plan)")
    if have_disk is not None and need["weights"] > have_disk:
        raise ConfigError(f"{source}: the memory plan needs {need['weights'] / 1e9:,.1f} GB for the weights ({fields}); "
                          f"the filesystem has {have_disk / 1e9:,.1f} GB free (`jambatrt inspect` shows the plan)")
    return need


def expert_groups(n_experts: int, elements_per_expert: int, limit: int = TENSOR_LIMIT) -> list[tuple[int, int]]:
    """Split E stacked experts into the fewest contiguous groups [start, end) whose stacked weights
    hold at most `limit` elements each (sizes differ by at most one). One group when all fit."""
    per_group = limit // max(1, elements_per_expert)
    if per_group < 1:
        raise ValueError(f"one expert's weight holds {elements_per_expert:,} elements, over the limit {limit:,}")
    g = -(-n_experts // per_group)        # then ceil(E / g) <= per_group: every group fits
    return [(i * n_experts // g, (i + 1) * n_experts // g) for i in range(g)]


def moe_expert_groups(cfg: JambaConfig, limit: int = TENSOR_LIMIT) -> list[tuple[int, int]]:
    """The expert groups graph/passes/split_expert_groups.py makes of every MoE layer of `cfg`:
    the larger of w13 [E,2I,H] and w2 [E,H,I] decides (they are equal in size)."""
    return expert_groups(cfg.num_experts, 2 * cfg.intermediate_size * cfg.hidden_size, limit)


def activation_tensors(cfg: JambaConfig, batch: int, chunk: int, past: int = 0,
                       attention_scores: bool = False) -> dict[str, tuple[int, ...]]:
    """The largest tensors one step of `chunk` new tokens after `past` tokens creates.
    attention_scores: also the [B,Hq,C,P+C] score tensor of an attention that materialises it
    (ours does not: flash kernel)."""
    B, C, H = batch, chunk, cfg.hidden_size
    D, N, R, V, I = cfg.d_inner, cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.vocab_size, cfg.intermediate_size
    T, k, E = B * C, cfg.num_experts_per_tok, cfg.num_experts
    out = {"hidden [B,C,H]": (B, C, H), "logits [B,C,V]": (B, C, V)}
    if cfg.num_mamba_layers:
        out.update({"mamba.in_proj_out [B,C,2*D_inner]": (B, C, 2 * D),
                    "mamba.x_proj_out [B,C,R+2N]": (B, C, R + 2 * N),
                    "mamba.scan_in [B,D_inner,C]": (B, D, C),
                    "mamba.ssm_state [B,D_inner,N]": (B, D, N)})
    if cfg.num_attention_layers:
        Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        out.update({"attention.q [B,C,Hq,d]": (B, C, Hq, d), "attention.kv [B,P+C,Hkv,d]": (B, past + C, Hkv, d)})
        if attention_scores:
            out["attention.scores [B,Hq,C,P+C]"] = (B, Hq, C, past + C)
    if cfg.num_moe_layers:
        out.update({"moe.router_logits [T,E]": (T, E), "moe.gate_up [T*top_k,2I]": (T * k, 2 * I),
                    "moe.out [T*top_k,H]": (T * k, H)})
    if cfg.num_dense_layers:
        out["mlp.gate_up [B,C,2I]"] = (B, C, 2 * I)
    return out


def chunk_activation_elements(cfg: JambaConfig, batch: int, chunk: int) -> tuple[int, int]:
    """Elements of a prefill chunk's logits [B,C,V] and of its largest other activation that grows with
    the chunk (activation_tensors less the KV cache and the Mamba state, which do not): what
    engines/base.py `default_chunk` bounds."""
    t = activation_tensors(cfg, batch, chunk)
    other = max(math.prod(shape) for name, shape in t.items()
                if not name.startswith(("logits", "attention.kv", "mamba.ssm_state")))
    return math.prod(t["logits [B,C,V]"]), other


def largest(tensors: dict[str, tuple[int, ...]]) -> tuple[str, int]:
    name = max(tensors, key=lambda n: math.prod(tensors[n]))
    return name, math.prod(tensors[name])


def max_prefill_chunk(cfg: JambaConfig, batch: int, context: int, cap: int | None = DEFAULT_CHUNK_CAP,
                      limit: int = TENSOR_LIMIT, attention_scores: bool = False) -> int | None:
    """The longest chunk (min(cap, context), else a power of two below it) whose step keeps every activation tensor
    under `limit` elements when the past is as long as it gets (context - chunk). None when even
    one token does not fit (the KV cache at `context` alone is too large)."""
    top = min(cap or context, context)
    candidates = [top] + [1 << p for p in range(top.bit_length() - 1, -1, -1) if (1 << p) < top]
    for c in candidates:
        if largest(activation_tensors(cfg, batch, c, context - c, attention_scores))[1] <= limit:
            return c
    return None


def activation_bytes(cfg: JambaConfig, batch: int, chunk: int) -> int:
    """Upper estimate of the activations alive during one step of `chunk` tokens: the residual
    stream, the widest mixer's intermediates and the widest MLP's, all at once, plus the logits
    (bf16; router logits, MoE rows and SSM states fp32). An engine reuses memory across layers,
    so one layer's worth is what counts."""
    B, C, H, D = batch, chunk, cfg.hidden_size, cfg.d_inner
    N, R, I = cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.intermediate_size
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    T = B * C
    residual = 3 * T * H * ACT_BYTES
    mamba = (5 * T * D + T * (R + 2 * N)) * ACT_BYTES + B * D * N * 4 if cfg.num_mamba_layers else 0
    attn = 0
    if cfg.num_attention_layers:
        attn = T * (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * cfg.head_dim * 2 * ACT_BYTES
    has_moe = cfg.num_moe_layers > 0
    moe = T * E * 4 + T * k * (2 * I * ACT_BYTES + H * 4) if has_moe else 0
    dense = T * 2 * I * ACT_BYTES
    return residual + max(mamba, attn) + max(moe, dense) + T * cfg.vocab_size * ACT_BYTES


# Host memory of the stages, calibrated on this project's machines (private memory, RssAnon: weights
# mapped from files are page cache and not counted). Process base with torch, onnx and ORT imported:
HOST_BASE = 300 * 10 ** 6
# torch.export + ONNX conversion on fake weights, per decoder layer (tiny: 326 MB peak; the
# 32-layer Jamba-1.5-Mini config: 483 MB; 2026-12-01)
TRACE_PER_LAYER = 5 * 10 ** 6


def host_memory(cfg: JambaConfig, dtype_bytes: int = 4, source_bytes: int = 2, block_bytes: int | None = None) -> dict:
    """Peak private host memory of each stage for `cfg`, from the plan (bytes).

    export: the weights stream a block of `block_bytes` of source rows at a time (export/checkpoint.py
    model_tensors): the block is mapped (not private); its cast copy, the finiteness mask and, for
    experts, the quantiser's fp32 temporaries are (|w|, w/scale, round, int8). Then tracing and
    the ONNX conversion, on fake weights, grow with the number of layers only.
    build ort: the graph proto and the passes; no weight is read.
    run ort: ONNX Runtime pre-packs every MatMul's constant weight into its own buffers (the
    non-expert linear layers, in the engine's float32); the embedding and the experts stay mapped."""
    from jambatrt.export.checkpoint import BLOCK_BYTES
    elems = (block_bytes or BLOCK_BYTES) // source_bytes
    stream = max(elems * (dtype_bytes + 1),                                   # cast copy + mask
                 elems * (4 * (4 if source_bytes != 4 else 3) + 1 + 1))       # fp32 copy, |w|, w/s, round; int8; mask
    trace = cfg.num_hidden_layers * TRACE_PER_LAYER
    linear = param_counts(cfg)["linear"]          # closed form: any number of layers
    return {"export": HOST_BASE + max(stream, trace), "build_ort": HOST_BASE + trace,
            "run_ort": HOST_BASE + 4 * linear}


def memory_plan(cfg: JambaConfig, context: int | None = None, batch: int = 1, chunk: int | None = None,
                gpu_bytes: int = GPU_BYTES) -> dict:
    """Sizes in bytes. `params_active` counts what one token uses (top-k of the experts).
    `chunk`: prefill chunk (default: the longest that keeps every tensor under 2^31 elements)."""
    context = context or cfg.max_position_embeddings
    counts = param_counts(cfg)
    dense, expert, scales = counts["dense"], counts["expert"], counts["expert_scales"]
    moe_layers = cfg.num_moe_layers
    n_attn, n_mamba = cfg.num_attention_layers, cfg.num_mamba_layers
    kv_per_token = n_attn * 2 * cfg.num_key_value_heads * cfg.head_dim * 2          # bf16
    state = n_mamba * (cfg.d_inner * (cfg.mamba_d_conv - 1) * 2 + cfg.d_inner * cfg.mamba_d_state * 4)
    weights = {"bfloat16": 2 * (dense + expert), "experts_int8": 2 * dense + expert + 4 * scales}

    chunk = chunk or max_prefill_chunk(cfg, batch, context)
    acts = activation_tensors(cfg, batch, chunk or 1, context - (chunk or 1))
    big_name, big_n = largest(acts)
    over_w = {n: math.prod(s) for n, s in weight_tensors(cfg).items() if math.prod(s) > TENSOR_LIMIT}
    groups = moe_expert_groups(cfg) if moe_layers else [(0, cfg.num_experts)]
    act_bytes = activation_bytes(cfg, batch, chunk or 1)
    kv_at_context = kv_per_token * context * batch
    # the ORT engine's KV cache (engines/ort.py KVCache): float32, or --kv-cache int8 (plugins/cpu/kv_int8.py:
    # int8 plus a float32 scale per position, kv head and group of 32 channels, or of the head when d % 32)
    group = 32 if cfg.head_dim % 32 == 0 else cfg.head_dim
    kv_elements = kv_per_token // 2 * context * batch
    kv_ort = {"float32": 4 * kv_elements, "int8": kv_elements + 4 * kv_elements // group}
    total = {k: w + kv_at_context + state * batch + act_bytes for k, w in weights.items()}
    fits = {k: v <= gpu_bytes for k, v in total.items()}
    gpus = {k: math.ceil(v / gpu_bytes) for k, v in total.items()}
    gb = 1e9
    verdict = (f"{'fits' if fits['experts_int8'] else 'does not fit'} one {gpu_bytes / gb:.0f} GB GPU with int8 "
               f"experts at {context:,} tokens, batch {batch}: {total['experts_int8'] / gb:.1f} GB "
               f"(weights {weights['experts_int8'] / gb:.1f} + KV {kv_at_context / gb:.1f} + Mamba state "
               f"{state * batch / gb:.2f} + activations {act_bytes / gb:.1f}); bf16 needs "
               f"{total['bfloat16'] / gb:.1f} GB ({gpus['bfloat16']} GPU{'s' if gpus['bfloat16'] > 1 else ''})")
    return {
        "host_bytes": host_memory(cfg),
        "params_total": dense + expert,
        "params_active": dense + expert * cfg.num_experts_per_tok // max(1, cfg.num_experts),
        "weight_bytes": weights,
        "kv_bytes_per_token": kv_per_token,
        "state_bytes_per_sequence": state,
        "layers": {"attention": n_attn, "mamba": n_mamba, "moe": moe_layers},
        "context": context,
        "batch": batch,
        "kv_bytes_at_context": kv_at_context,
        "kv_bytes_at_context_ort": kv_ort,
        "state_bytes_at_batch": state * batch,
        # chunked prefill: TensorRT volumes are int32
        "tensor_limit": TENSOR_LIMIT,
        "prefill_chunk": chunk,
        "largest_activation": {"name": big_name, "elements": big_n, "under_limit": big_n <= TENSOR_LIMIT},
        "weight_tensors_over_limit": over_w,
        # TensorRT build: each MoE layer's experts split into groups under the limit (1 = no split)
        "expert_groups": len(groups),
        "experts_per_group": max(e - s for s, e in groups),
        "activation_bytes_per_chunk": act_bytes,
        "total_bytes": total,
        "gpu": {"bytes": gpu_bytes, "fits": fits, "gpus_needed_at_least": gpus},
        "verdict": verdict,
    }
