"""Bad input gets a typed error naming what is wrong, exit != 0, no traceback, nothing left behind."""

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from conftest import assert_same_model_sums, run_cli


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _assert_refused(p, out, *needles):
    assert p.returncode != 0
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)
    assert not out.exists()
    assert not [q for q in out.parent.iterdir() if ".tmp-" in q.name]


def test_missing_tensor(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    t = load_file(str(ck / "model.safetensors"))
    del t["model.layers.0.mamba.A_log"]
    save_file(t, str(ck / "model.safetensors"))
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", "model.layers.0.mamba.A_log")


def test_wrong_shape(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    t = load_file(str(ck / "model.safetensors"))
    t["model.layers.1.self_attn.k_proj.weight"] = t["model.layers.1.self_attn.k_proj.weight"][:5]
    save_file(t, str(ck / "model.safetensors"))
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "k_proj.weight", "expected [32, 64]")


def test_inconsistent_config(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["num_attention_heads"] = 5
    (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "ConfigError", "num_attention_heads=5")


def test_unknown_preset(tmp_path):
    out = tmp_path / "out"
    _assert_refused(run_cli("export", "--preset", "jamba-9", "-o", out), out, "unknown preset", "tiny")


def test_unreadable_safetensors(tiny_ckpt, tmp_path):
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    (ck / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", "model.safetensors")


def test_float16_refused(tmp_path):
    out = tmp_path / "out"
    _assert_refused(run_cli("export", "--preset", "tiny", "-o", out, "--dtype", "float16"), out, "float16",
                    "bfloat16")


def test_existing_output_kept_without_force(tiny_artifact, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    p = run_cli("export", "--preset", "tiny", "-o", out)
    assert p.returncode != 0 and "--force" in p.stderr and "Traceback" not in p.stderr
    assert (out / "precious.txt").read_text() == "user data"


def test_sharded_checkpoint_roundtrip(tiny_ckpt, tmp_path):
    """We load what transformers' save_pretrained writes (sharded), and it loads what we write."""
    import torch

    from conftest import hf_model
    from jambatrt.export.weights import load_model
    hf = hf_model(tiny_ckpt)
    hf.save_pretrained(str(tmp_path / "hf"), max_shard_size="100KB")
    assert (tmp_path / "hf" / "model.safetensors.index.json").exists()
    ids = torch.randint(0, 512, (1, 9))
    model = load_model(tmp_path / "hf", experts_int8=False)
    with torch.no_grad():
        a = model(ids)[0]
        b = hf(ids).logits
    assert_same_model_sums(a.numpy(), b.numpy(), model.config, 9, "logits")


@pytest.mark.parametrize("dtype", ["bfloat16"])
def test_bf16_export(tmp_path, dtype):
    out = tmp_path / "out"
    p = run_cli("export", "--preset", "tiny", "-o", out, "--dtype", dtype)
    assert p.returncode == 0, p.stderr
    assert json.loads((out / "manifest.json").read_text())["dtype"] == dtype


def _sharded(tmp_path):
    from jambatrt.export.checkpoint import write_preset
    return write_preset("tiny", tmp_path / "ck", max_shard_bytes=300_000)


def test_missing_shard(tmp_path):
    ck = _sharded(tmp_path)
    shard = sorted(ck.glob("model-*.safetensors"))[1]
    shard.unlink()
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", shard.name, "do not exist")


def test_truncated_shard(tmp_path):
    ck = _sharded(tmp_path)
    shard = sorted(ck.glob("model-*.safetensors"))[-1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 4096)
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", shard.name, "truncated or corrupt")


@pytest.mark.parametrize("name, value", [("model.layers.2.mamba.out_proj.weight", float("nan")),
                                         ("model.layers.3.feed_forward.experts.2.up_proj.weight", float("-inf"))])
def test_non_finite_weight(tmp_path, tiny_ckpt, name, value):
    """A dense weight is checked block by block; an expert's row through its int8 scale."""
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    t = load_file(str(ck / "model.safetensors"))
    t[name][3, 5] = value
    save_file(t, str(ck / "model.safetensors"))
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", name, "NaN or Inf")


def test_unexpected_tensor(tiny_ckpt, tmp_path):
    """A tensor the config does not account for (here a conv bias with mamba_conv_bias false) is
    refused, not dropped: dropping it would export another model."""
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg["mamba_conv_bias"] = False
    (ck / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "CheckpointError", "unexpected tensor",
                    "model.layers.0.mamba.conv1d.bias")


@pytest.mark.parametrize("field,value,needle", [
    ("tie_word_embeddings", "false", "tie_word_embeddings='false'"),     # a truthy string: would tie them
    ("attn_layer_offset", "1", "attn_layer_offset='1'"),
    ("rms_norm_eps", "1e-6", "rms_norm_eps='1e-6'"),
    ("rms_norm_eps", float("nan"), "rms_norm_eps=nan"),
    ("num_experts", 4.0, "num_experts=4.0"),
])
def test_config_field_types_refused_not_coerced(tiny_ckpt, tmp_path, field, value, needle):
    """Issue 15 (6): a config value of the wrong type, or NaN, is a ConfigError naming the field,
    never coerced (bool("false") is True) and never a TypeError traceback."""
    ck = _copy(tiny_ckpt, tmp_path / "ck")
    cfg = json.loads((ck / "config.json").read_text())
    cfg[field] = value
    (ck / "config.json").write_text(json.dumps(cfg))        # json writes NaN as the bare token NaN
    out = tmp_path / "out"
    _assert_refused(run_cli("export", ck, "-o", out), out, "ConfigError", needle)
