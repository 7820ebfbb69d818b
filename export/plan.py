"""Memory arithmetic from the config alone: parameters, weight bytes, KV cache, Mamba state."""

from __future__ import annotations

import math

from jambatrt.config import JambaConfig
from jambatrt.export.checkpoint import hf_tensor_shapes


def memory_plan(cfg: JambaConfig, context: int | None = None, batch: int = 1) -> dict:
    """Sizes in bytes. `params_active` counts what one token uses (top-k of the experts)."""
    context = context or cfg.max_position_embeddings
    expert = dense = 0
    for name, shape in hf_tensor_shapes(cfg).items():
        n = math.prod(shape)
        if ".experts." in name:
            expert += n
        else:
            dense += n
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    scales = moe_layers * cfg.num_experts * (2 * cfg.intermediate_size + cfg.hidden_size)
    n_attn, n_mamba = len(cfg.attention_layers), len(cfg.mamba_layers)
    kv_per_token = n_attn * 2 * cfg.num_key_value_heads * cfg.head_dim * 2          # bf16
    state = n_mamba * (cfg.d_inner * (cfg.mamba_d_conv - 1) * 2 + cfg.d_inner * cfg.mamba_d_state * 4)
    return {
        "params_total": dense + expert,
        "params_active": dense + expert * cfg.num_experts_per_tok // max(1, cfg.num_experts),
        "weight_bytes": {"bfloat16": 2 * (dense + expert), "experts_int8": 2 * dense + expert + 4 * scales},
        "kv_bytes_per_token": kv_per_token,
        "state_bytes_per_sequence": state,
        "layers": {"attention": n_attn, "mamba": n_mamba, "moe": moe_layers},
        "context": context,
        "batch": batch,
        "kv_bytes_at_context": kv_per_token * context * batch,
        "state_bytes_at_batch": state * batch,
    }
