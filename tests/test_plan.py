"""Chunking plan (engines/chunking.py) and memory plan (export/plan.py, `jambatrt inspect`)."""

import json

import pytest

from conftest import run_cli
from jambatrt.config import preset
from jambatrt.engines.chunking import plan_chunks, step_tensors
from jambatrt.errors import InputError
from jambatrt.export.plan import TENSOR_LIMIT, memory_plan

LIMIT = 2 ** 31 - 1


@pytest.mark.parametrize("name", ["jamba-1.5-large", "jamba-1.5-mini"])
def test_chunk_plan_keeps_every_tensor_under_2_31(name):
    cfg = preset(name)
    total = 262_144
    plan = plan_chunks(cfg, total, batch=1)
    assert plan.fits and plan.largest_elements <= LIMIT
    steps = list(plan.chunks())
    assert steps[0][0] == 0 and steps[-1][1] == total and len(steps) == plan.steps
    assert all(a == b for (_, a), (b, _) in zip(steps, steps[1:]))       # contiguous, no gap, no overlap
    worst = 0
    for start, end in steps:
        sizes = step_tensors(cfg, 1, end - start, past=start)
        assert "logits [B,C,V]" in sizes and "attention.kv [B,P+C,Hkv,d]" in sizes
        assert "moe.gate_up [T*top_k,2I]" in sizes and "mamba.in_proj_out [B,C,2*D_inner]" in sizes
        worst = max(worst, max(sizes.values()))
    assert worst == plan.largest_elements <= LIMIT
    # what the plan prevents: the whole prompt in one step overflows (logits alone: 2^34 elements)
    assert max(step_tensors(cfg, 1, total, past=0).values()) > LIMIT


def test_chunk_plan_large_flags_stacked_expert_weights():
    plan = plan_chunks(preset("jamba-1.5-large"), 262_144)
    assert set(plan.weights_over_limit) == {"moe.w13 [E,2I,H]", "moe.w2 [E,H,I]"}
    assert plan_chunks(preset("jamba-1.5-mini"), 262_144).weights_over_limit == {}


def test_chunk_plan_batch_and_limits():
    mini = preset("jamba-1.5-mini")
    assert plan_chunks(mini, 262_144, batch=4).chunk < plan_chunks(mini, 262_144, batch=1).chunk
    assert plan_chunks(mini, 5).as_dict()["steps"] == 1
    with pytest.raises(InputError, match="attention.kv"):      # 8 x 262,144 x 8 x 128 = 2^31 KV elements
        plan_chunks(mini, 262_144, batch=8)
    # an attention that materialises scores forces far shorter chunks
    assert plan_chunks(mini, 262_144, attention_scores=True).chunk < 1024


def test_memory_plan_mini_fits_80gb_with_int8_experts():
    plan = memory_plan(preset("jamba-1.5-mini"), context=262_144, batch=1)
    for key in ("params_total", "params_active", "weight_bytes", "kv_bytes_per_token", "state_bytes_per_sequence",
                "layers", "context", "batch", "kv_bytes_at_context", "state_bytes_at_batch"):
        assert key in plan
    assert plan["kv_bytes_at_context"] == 4 * 2 ** 30                  # 4 attention layers x 16 KiB x 256K
    assert plan["prefill_chunk"] >= 1024 and plan["largest_activation"]["under_limit"]
    total = plan["total_bytes"]
    assert total["experts_int8"] == (plan["weight_bytes"]["experts_int8"] + plan["kv_bytes_at_context"]
                                     + plan["state_bytes_at_batch"] + plan["activation_bytes_per_chunk"])
    assert plan["gpu"]["fits"] == {"bfloat16": False, "experts_int8": True}
    assert total["experts_int8"] < 80e9 < total["bfloat16"]
    assert plan["verdict"].startswith("fits one 80 GB GPU with int8 experts at 262,144 tokens")


def test_memory_plan_large_needs_several_gpus():
    plan = memory_plan(preset("jamba-1.5-large"), context=262_144)
    assert plan["gpu"]["fits"]["experts_int8"] is False
    assert 2 <= plan["gpu"]["gpus_needed_at_least"]["experts_int8"] <= 8
    assert plan["tensor_limit"] == TENSOR_LIMIT
    assert (plan["expert_groups"], plan["experts_per_group"]) == (4, 4)     # w13 6.4e9 elements -> 4 x 1.6e9


def test_inspect_json_has_the_plan():
    p = run_cli("inspect", "--preset", "jamba-1.5-mini", "--json", check=True)
    plan = json.loads(p.stdout)
    assert plan["gpu"]["fits"]["experts_int8"] is True and plan["prefill_chunk"] == 8192
    p = run_cli("inspect", "--preset", "jamba-1.5-large", check=True, env={"COLUMNS": "200"})
    assert "verdict" in p.stdout and "moe.w13" in p.stdout and "4 of <= 4 experts" in p.stdout
