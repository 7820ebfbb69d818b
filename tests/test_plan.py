"""Chunking plan (engines/chunking.py) and memory plan (export/plan.py, `jambatrt inspect`)."""

import json

import pytest

from conftest import run_cli
from jambatrt.config import preset
from jambatrt.engines.chunking import plan_chunks, step_tensors
from jambatrt.errors import InputError
from jambatrt.export.plan import TENSOR_LIMIT, activation_tensors, chunk_activation_elements, memory_plan

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


@pytest.mark.parametrize("name", ["tiny", "peer", "jamba-1.5-mini"])
def test_chunk_activation_elements_are_the_ones_that_grow_with_the_chunk(name):
    """What default_chunk bounds: the logits and the largest of the other activations whose size is
    proportional to the chunk (found here by doubling it after 4096 past tokens), never the KV cache (past
    and chunk) or the Mamba state."""
    import math
    cfg = preset(name)
    for batch, c in ((1, 512), (2, 1280)):
        one, two = (activation_tensors(cfg, batch, n, past=4096) for n in (c, 2 * c))
        growing = {n: math.prod(s) for n, s in one.items() if math.prod(two[n]) == 2 * math.prod(s)}
        assert not any(n.startswith(("attention.kv", "mamba.ssm_state")) for n in growing)
        logits = growing.pop("logits [B,C,V]")
        assert chunk_activation_elements(cfg, batch, c) == (logits, max(growing.values()))


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
    assert plan["kv_bytes_at_context_ort"] == {"float32": 8 * 2 ** 30, "int8": 2 ** 31 + 2 ** 31 // 8}
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


# ---- configs too large to build, refused from the plan (issue 15, item 7) ---------------------------------
def _hf_counts(cfg):
    import math

    from jambatrt.export.checkpoint import hf_tensor_shapes
    out = {"dense": 0, "expert": 0, "linear": 0}
    for name, shape in hf_tensor_shapes(cfg).items():
        out["expert" if ".experts." in name else "dense"] += math.prod(shape)
        if ".experts." not in name and name.endswith("proj.weight") or name == "lm_head.weight":
            out["linear"] += math.prod(shape)
    return out


def test_closed_form_counts_equal_the_checkpoint_layout():
    """param_counts and the layer counts (closed form, so 10^9 layers cost nothing) equal what the
    checkpoint layout lists tensor by tensor, for every preset, the parity configs and 60 seeded
    random configs (periods, offsets, biases, tied embeddings, one expert)."""
    import random

    from conftest import PARITY_CONFIGS
    from jambatrt.config import PRESETS
    from jambatrt.export.plan import param_counts
    cfgs = [preset(n) for n in PRESETS] + [preset("tiny", **o) for o in PARITY_CONFIGS.values()]
    rng = random.Random(7)
    for _ in range(60):
        heads = rng.choice([1, 2, 4])
        ap, ep = rng.randint(1, 5), rng.randint(1, 4)
        e = rng.choice([1, 2, 3, 5])
        cfgs.append(preset("tiny", num_hidden_layers=rng.randint(1, 13), attn_layer_period=ap,
                           attn_layer_offset=rng.randrange(ap), expert_layer_period=ep,
                           expert_layer_offset=rng.randrange(ep), num_experts=e,
                           num_experts_per_tok=rng.randint(1, e), hidden_size=8 * heads * rng.randint(1, 3),
                           num_attention_heads=heads, num_key_value_heads=rng.choice([d for d in (1, 2, 4) if heads % d == 0]),
                           intermediate_size=rng.randint(1, 40), mamba_d_state=rng.randint(1, 9),
                           mamba_d_conv=rng.randint(1, 5), mamba_expand=rng.randint(1, 3), mamba_dt_rank=rng.randint(1, 9),
                           tie_word_embeddings=rng.random() < 0.5, mamba_conv_bias=rng.random() < 0.5,
                           mamba_proj_bias=rng.random() < 0.5, vocab_size=rng.randint(2, 300)))
    for cfg in cfgs:
        got = param_counts(cfg)
        assert {k: got[k] for k in ("dense", "expert", "linear")} == _hf_counts(cfg), cfg
        assert cfg.num_attention_layers == len(cfg.attention_layers)
        assert cfg.num_mamba_layers == len(cfg.mamba_layers)
        assert cfg.num_moe_layers == sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))


@pytest.mark.parametrize("field", ["num_hidden_layers", "num_experts"])
def test_billion_layers_or_experts_refused_from_the_plan(tiny_ckpt, tmp_path, field):
    """A checkpoint whose config asks for 10^9 layers (or experts) is refused by the plan before any
    tensor is listed, read or allocated (10^9 layers: the host memory of tracing them; 10^9 experts:
    the weights against the free disk): one ConfigError line naming the field, in seconds. The child
    runs under an 8 GB address-space limit so the unfixed code fails with MemoryError instead of
    taking the machine's memory."""
    import shutil
    import subprocess
    import sys

    from jambatrt.export.plan import memory_plan
    ck = tmp_path / "ck"
    shutil.copytree(tiny_ckpt, ck)
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = 10 ** 9
    (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    p = subprocess.run(["prlimit", f"--as={8 << 30}", sys.executable, "-m", "jambatrt", "export", str(ck), "-o", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2, p.stderr[-2000:]
    assert "Traceback" not in p.stderr and "ConfigError" in p.stderr and f"{field}=1,000,000,000" in p.stderr
    assert "memory plan" in p.stderr and not out.exists()
    # inspect's numbers for such a config come in closed form, without walking the layers
    plan = memory_plan(preset("tiny", **{field: 10 ** 9}))
    assert plan["params_total"] > 10 ** 12
