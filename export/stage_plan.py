"""Pipeline stages: the decoder layers split into N contiguous ranges, one engine (and one device)
each, so a model that does not fit one GPU (Jamba-1.5-Large: ~460 GB with int8 experts) runs on N.

Every stage holds its layers' weights, their KV cache (attention layers, at the configured context)
and Mamba state, and the activations of one prefill chunk; the first stage also the embedding, the
last also the final norm, the lm_head and the chunk's logits. The plan minimises the largest
stage (an exact dynamic programme over the contiguous splits), and with `gpu_bytes` and no stage
count picks the fewest stages in which every stage fits.

Pure arithmetic on the config, like export/plan.py (whose per-kind sizes it uses): bf16 weights and
KV, fp32 SSM state, int8 experts with fp32 scales when `experts_int8`."""

from __future__ import annotations

import re

from jambatrt.config import JambaConfig
from jambatrt.errors import ConfigError
from jambatrt.export.plan import ACT_BYTES, activation_bytes, max_prefill_chunk

MAX_PLANNED_LAYERS = 4096          # the exact split is O(stages x layers^2): far above any Jamba (72)
WEIGHT_BYTES = 2                   # bf16 (the GPU engines' dtype)
# Per device, outside the plan's tensors: the CUDA context, cuBLAS / TensorRT workspaces and the
# allocator's fragmentation. A stage fits when its bytes + this <= the device.
DEVICE_RESERVE = 4 * 10 ** 9


def parse_bytes(text: str) -> int:
    """'80GB' / '80 GB' / '80G' (decimal, as GPUs are sold), '80GiB' (binary), or a plain byte count."""
    m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConfigError(f"memory size {text!r} (accepted: e.g. 80GB, 141GB, 80GiB, or a byte count)")
    unit = (m.group(2) or "B").upper().rstrip("B") or "B"
    scale = {"B": 1, "K": 10 ** 3, "M": 10 ** 6, "G": 10 ** 9, "T": 10 ** 12,
             "KI": 2 ** 10, "MI": 2 ** 20, "GI": 2 ** 30, "TI": 2 ** 40}[unit]
    value = int(float(m.group(1)) * scale)
    if value < 1:
        raise ConfigError(f"memory size {text!r} is zero (accepted: a positive size such as 80GB)")
    return value


def layer_costs(cfg: JambaConfig, context: int, batch: int = 1, experts_int8: bool = True) -> list[dict]:
    """Bytes of each decoder layer on its device: weights (mixer + MLP/MoE + its two norms), KV cache
    at `context` tokens (attention layers) and Mamba state (conv + SSM), for `batch` sequences."""
    H, I, D, N = cfg.hidden_size, cfg.intermediate_size, cfg.d_inner, cfg.mamba_d_state
    R, K, E = cfg.mamba_dt_rank, cfg.mamba_d_conv, cfg.num_experts
    kv = cfg.num_key_value_heads * cfg.head_dim
    attention = (2 * H * H + 2 * kv * H) * WEIGHT_BYTES
    mamba = (2 * D * H + D * K + (R + 2 * N) * D + D * R + D + D * N + D + H * D + R + 2 * N
             + (D if cfg.mamba_conv_bias else 0) + (2 * D + H if cfg.mamba_proj_bias else 0)) * WEIGHT_BYTES
    experts = E * 3 * I * H
    moe = E * H * WEIGHT_BYTES + (experts + 4 * E * (2 * I + H) if experts_int8 else experts * WEIGHT_BYTES)
    dense = 3 * I * H * WEIGHT_BYTES
    kv_bytes = 2 * kv * 2 * context * batch                                     # k and v, bf16
    state_bytes = (D * (K - 1) * 2 + D * N * 4) * batch                         # as export/plan.py memory_plan
    out = []
    for i in range(cfg.num_hidden_layers):
        att = cfg.is_attention(i)
        out.append({"layer": i, "kind": ("attention" if att else "mamba") + ("+moe" if cfg.is_moe(i) else ""),
                    "weights": 2 * H * WEIGHT_BYTES + (attention if att else mamba) + (moe if cfg.is_moe(i) else dense),
                    "kv": kv_bytes if att else 0, "mamba_state": 0 if att else state_bytes})
    return out


def _stage_bytes(cfg: JambaConfig, costs: list[dict], a: int, b: int, acts: dict) -> dict:
    """One stage holding layers [a, b)."""
    L, V, H = cfg.num_hidden_layers, cfg.vocab_size, cfg.hidden_size
    weights = sum(c["weights"] for c in costs[a:b])
    extra = []
    if a == 0:
        weights += V * H * WEIGHT_BYTES
        extra.append("embedding")
    if b == L:
        weights += H * WEIGHT_BYTES + V * H * WEIGHT_BYTES        # final norm + lm_head (a tied one: a copy here)
        extra.append("norm + lm_head")
    kv = sum(c["kv"] for c in costs[a:b])
    state = sum(c["mamba_state"] for c in costs[a:b])
    act = acts["with_logits"] if b == L else acts["without_logits"]
    return {"layers": [a, b], "also": extra, "weights": weights, "kv": kv, "mamba_state": state,
            "activations": act, "total": weights + kv + state + act}


def _best_split(cfg: JambaConfig, costs: list[dict], n: int, acts: dict) -> list[tuple[int, int]]:
    """The contiguous split of the layers into `n` non-empty ranges whose largest stage is smallest
    (exact: dynamic programme over the split points, stage sizes from prefix sums)."""
    L = len(costs)
    inf = float("inf")
    prefix = [0]
    for c in costs:
        prefix.append(prefix[-1] + c["weights"] + c["kv"] + c["mamba_state"])
    ends = {"first": _stage_bytes(cfg, costs, 0, 0, acts)["total"] - acts["without_logits"],
            "last": _stage_bytes(cfg, costs, L, L, acts)["total"] - acts["with_logits"]}

    def total(a, b):
        return (prefix[b] - prefix[a] + (ends["first"] if a == 0 else 0) + (ends["last"] if b == L else 0)
                + (acts["with_logits"] if b == L else acts["without_logits"]))

    # best[k][b]: the smallest possible largest stage when layers [0, b) form k stages; cut[k][b]: where the last begins
    best = [[inf] * (L + 1) for _ in range(n + 1)]
    cut = [[0] * (L + 1) for _ in range(n + 1)]
    best[0][0] = 0
    for k in range(1, n + 1):
        for b in range(k, L - (n - k) + 1):
            for a in range(k - 1, b):
                if best[k - 1][a] == inf:
                    continue
                v = max(best[k - 1][a], total(a, b))
                if v < best[k][b]:
                    best[k][b], cut[k][b] = v, a
    ranges, b = [], L
    for k in range(n, 0, -1):
        a = cut[k][b]
        ranges.append((a, b))
        b = a
    return ranges[::-1]


def plan_stages(cfg: JambaConfig, stages: int | None = None, gpu_bytes: int | None = None,
                context: int | None = None, batch: int = 1, chunk: int | None = None,
                experts_int8: bool = True, reserve_bytes: int = DEVICE_RESERVE) -> dict:
    """The stage plan. `stages`: that many stages; else the fewest in which every stage fits
    `gpu_bytes` less `reserve_bytes` (ConfigError when even one layer per stage does not). Bytes."""
    L = cfg.num_hidden_layers
    if L > MAX_PLANNED_LAYERS:
        raise ConfigError(f"num_hidden_layers={L:,}: stage plans cover up to {MAX_PLANNED_LAYERS:,} layers")
    if stages is not None and not 1 <= stages <= L:
        raise ConfigError(f"--stages {stages} (accepted: 1 .. {L}, the model's num_hidden_layers)")
    if stages is None and gpu_bytes is None:
        raise ConfigError("a stage plan needs a stage count (--stages N) or a device size (--gpu-memory 80GB)")
    context = context or cfg.max_position_embeddings
    chunk = chunk or max_prefill_chunk(cfg, batch, context) or 1
    with_logits = activation_bytes(cfg, batch, chunk)
    acts = {"with_logits": with_logits, "without_logits": with_logits - batch * chunk * cfg.vocab_size * ACT_BYTES}
    costs = layer_costs(cfg, context, batch, experts_int8)
    usable = None if gpu_bytes is None else gpu_bytes - reserve_bytes
    if stages is None:
        # the fewest stages: the largest stage shrinks as stages are added (never grows), so stop at the first
        # fit, starting from the count the bytes alone need; one layer per stage is the last resort
        singles = [_stage_bytes(cfg, costs, i, i + 1, acts)["total"] for i in range(L)]
        whole = sum(c["weights"] + c["kv"] + c["mamba_state"] for c in costs)
        lower = max(1, -(-whole // max(1, usable))) if max(singles) <= usable else L + 1
        for n in range(min(lower, L + 1), L + 1):
            ranges = _best_split(cfg, costs, n, acts)
            if max(_stage_bytes(cfg, costs, a, b, acts)["total"] for a, b in ranges) <= usable:
                break
        else:
            worst = max(range(L), key=lambda i: _stage_bytes(cfg, costs, i, i + 1, acts)["total"])
            need = _stage_bytes(cfg, costs, worst, worst + 1, acts)["total"]
            raise ConfigError(f"even one layer per stage does not fit {gpu_bytes / 1e9:,.1f} GB (less "
                              f"{reserve_bytes / 1e9:.1f} GB reserved per device): layer {worst} "
                              f"needs {need / 1e9:,.1f} GB at {context:,} tokens, batch {batch} (a shorter "
                              "--context, a smaller --batch, or larger devices)")
    else:
        ranges = _best_split(cfg, costs, stages, acts)
    per_stage = [_stage_bytes(cfg, costs, a, b, acts) for a, b in ranges]
    for s in per_stage:
        s["fits"] = None if gpu_bytes is None else s["total"] <= usable
    return {"stages": len(ranges), "ranges": [list(r) for r in ranges], "context": context, "batch": batch,
            "chunk": chunk, "weights": "experts_int8" if experts_int8 else "bfloat16", "gpu_bytes": gpu_bytes,
            "reserve_bytes": reserve_bytes,
            "fits": None if gpu_bytes is None else all(s["fits"] for s in per_stage), "per_stage": per_stage}


def describe(plan: dict) -> list[str]:
    """One line per stage, for `inspect` and `build` (GB: decimal, as GPU sizes are given)."""
    gb = 1e9
    lines = []
    for k, s in enumerate(plan["per_stage"]):
        a, b = s["layers"]
        also = f" + {', '.join(s['also'])}" if s["also"] else ""
        fits = "" if s["fits"] is None else (
            f" (+ {plan['reserve_bytes'] / gb:.0f} reserved: {'fits' if s['fits'] else 'DOES NOT FIT'} "
            f"{plan['gpu_bytes'] / gb:.0f} GB)")
        lines.append(f"stage {k}: layers {a}-{b - 1}{also}: weights {_size(s['weights'], 1)}, KV "
                     f"{_size(s['kv'], 2)}, Mamba state {_size(s['mamba_state'], 3)}, activations "
                     f"{_size(s['activations'], 2)} = {_size(s['total'], 1)}{fits}")
    return lines


def _size(n: int, digits: int) -> str:
    """GB (decimal) with `digits` decimals; MB below 1 GB, so a small model does not print as 0.0 GB."""
    return f"{n / 1e9:.{digits}f} GB" if n >= 1e9 or n == 0 else f"{n / 1e6:.{max(1, digits - 1)}f} MB"
