"""Export memory is bounded by a block of the largest tensor, not by the model (issue 13). The full
Mini-sized run is `make bench-scale` (jambatrt.validate.scale); this is its fast-suite twin."""

import math
import sys

import pytest
import torch

from jambatrt.export.checkpoint import hf_tensor_shapes, write_preset
from jambatrt.validate.memory import run_sampled

# ~90e6 parameters, ~350 MB of fp32: many tensors, none large (the biggest is 16.8 MB)
MEDIUM = dict(vocab_size=4096, hidden_size=1024, intermediate_size=1024, num_hidden_layers=4,
              num_attention_heads=8, num_key_value_heads=2, mamba_dt_rank=64, num_experts=8)


def _peak_export(src, out, *extra):
    p, peak, _ = run_sampled([sys.executable, "-m", "jambatrt", "export", str(src), "-o", str(out), *extra])
    assert p.returncode == 0, p.stderr[-2000:]
    return peak


def test_export_memory_bounded_by_largest_tensor(tmp_path, tiny_ckpt):
    ckpt = write_preset("tiny", tmp_path / "medium", **MEDIUM)
    from jambatrt.config import JambaConfig
    cfg = JambaConfig.load(ckpt)
    sizes = [math.prod(s) * 4 for s in hf_tensor_shapes(cfg).values()]
    total, largest = sum(sizes), max(sizes)
    assert total > 300e6 and total > 18 * largest, (total, largest)
    base = _peak_export(tiny_ckpt, tmp_path / "tiny-art")          # torch, tracing, ONNX: the fixed cost
    peak = _peak_export(ckpt, tmp_path / "medium-art")
    print(f"\nexport peak private memory: tiny {base / 1e6:.0f} MB, medium {peak / 1e6:.0f} MB "
          f"(checkpoint {total / 1e6:.0f} MB, largest tensor {largest / 1e6:.1f} MB)")
    # the stream holds a source block, its converted copy and the quantiser's temporaries
    assert peak <= base + 6 * largest, (peak, base, largest)
    store = tmp_path / "medium-art" / "weights.safetensors"
    assert store.stat().st_size < 1.1 * (total - sum(
        math.prod(s) * 3 for n, s in hf_tensor_shapes(cfg).items() if ".experts." in n))   # experts: 1 B not 4


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_streamed_checkpoint_is_what_transformers_reads(tmp_path, dtype):
    """Checkpoints written tensor by tensor (sharded, bf16, per-expert names) load in transformers."""
    transformers = pytest.importorskip("transformers", reason="transformers not installed (pip install '.[test]')")
    ckpt = write_preset("tiny", tmp_path / "ck", dtype=dtype, max_shard_bytes=200_000)
    assert len(list(ckpt.glob("model-*-of-*.safetensors"))) > 2 and (ckpt / "model.safetensors.index.json").exists()
    transformers.logging.set_verbosity_error()
    hf = transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=dtype)
    from jambatrt.export.checkpoint import Checkpoint
    ck = Checkpoint(ckpt)
    sd = hf.state_dict()
    assert torch.equal(sd["model.layers.0.mamba.in_proj.weight"], ck.get("model.layers.0.mamba.in_proj.weight"))
    assert ck.dtype("model.embed_tokens.weight") == dtype
