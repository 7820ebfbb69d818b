"""Hugging Face-format Jamba checkpoints: config.json + safetensors (single file or sharded with
model.safetensors.index.json). Loads into `JambaLM`; writes seeded random-init presets in exactly
the format `JambaForCausalLM.from_pretrained` reads."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import torch

from jambatrt.config import JambaConfig, preset
from jambatrt.errors import CheckpointError, ConfigError
from jambatrt.export.model import JambaLM
from jambatrt.export.quantize import quantize_experts

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def hf_tensor_shapes(cfg: JambaConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a HF Jamba checkpoint of this config holds (per-expert file layout)."""
    H, I, V, D = cfg.hidden_size, cfg.intermediate_size, cfg.vocab_size, cfg.d_inner
    N, R, K, E = cfg.mamba_d_state, cfg.mamba_dt_rank, cfg.mamba_d_conv, cfg.num_experts
    kv = cfg.num_key_value_heads * cfg.head_dim
    s = {"model.embed_tokens.weight": (V, H), "model.final_layernorm.weight": (H,)}
    if not cfg.tie_word_embeddings:
        s["lm_head.weight"] = (V, H)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        s[p + "input_layernorm.weight"] = (H,)
        s[p + "pre_ff_layernorm.weight"] = (H,)
        if cfg.is_attention(i):
            s.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                      p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H)})
        else:
            m = p + "mamba."
            s.update({m + "in_proj.weight": (2 * D, H), m + "conv1d.weight": (D, 1, K),
                      m + "x_proj.weight": (R + 2 * N, D), m + "dt_proj.weight": (D, R), m + "dt_proj.bias": (D,),
                      m + "A_log": (D, N), m + "D": (D,), m + "out_proj.weight": (H, D),
                      m + "dt_layernorm.weight": (R,), m + "b_layernorm.weight": (N,), m + "c_layernorm.weight": (N,)})
            if cfg.mamba_conv_bias:
                s[m + "conv1d.bias"] = (D,)
            if cfg.mamba_proj_bias:
                s[m + "in_proj.bias"] = (2 * D,)
                s[m + "out_proj.bias"] = (H,)
        f = p + "feed_forward."
        if cfg.is_moe(i):
            s[f + "router.weight"] = (E, H)
            for e in range(E):
                s.update({f"{f}experts.{e}.gate_proj.weight": (I, H), f"{f}experts.{e}.up_proj.weight": (I, H),
                          f"{f}experts.{e}.down_proj.weight": (H, I)})
        else:
            s.update({f + "gate_proj.weight": (I, H), f + "up_proj.weight": (I, H), f + "down_proj.weight": (H, I)})
    return s


# ---- reading ---------------------------------------------------------------------------------
def _safetensors_files(ckpt: Path) -> list[Path]:
    if (ckpt / INDEX).exists():
        try:
            weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{ckpt / INDEX}: unreadable index ({e}); expected {{'weight_map': {{name: file}}}}")
        files = sorted({ckpt / f for f in weight_map.values()})
        missing = [str(f) for f in files if not f.exists()]
        if missing:
            raise CheckpointError(f"{ckpt / INDEX} names shard(s) that do not exist: {', '.join(missing)}")
        return files
    if (ckpt / SINGLE).exists():
        return [ckpt / SINGLE]
    found = sorted(ckpt.glob("*.safetensors"))
    if found:
        return found
    raise CheckpointError(f"{ckpt}: no safetensors weights (expected {SINGLE} or {INDEX} with shards)")


def read_tensors(ckpt: str | Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    out: dict[str, torch.Tensor] = {}
    for f in _safetensors_files(Path(ckpt)):
        try:
            out.update(load_file(str(f)))
        except (SafetensorError, OSError, ValueError, RuntimeError) as e:
            raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
    return out


def _fuse_experts(tensors: dict, cfg: JambaConfig, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """-> w13 [E,2I,H] (gate rows, then up rows), w2 [E,H,I], from per-expert tensors or the
    fused layout transformers keeps in memory (`experts.gate_up_proj`, `experts.down_proj`)."""
    f = f"model.layers.{i}.feed_forward.experts."
    if f + "gate_up_proj" in tensors:
        return tensors.pop(f + "gate_up_proj"), tensors.pop(f + "down_proj")
    w13 = torch.stack([torch.cat([tensors.pop(f"{f}{e}.gate_proj.weight"), tensors.pop(f"{f}{e}.up_proj.weight")])
                       for e in range(cfg.num_experts)])
    w2 = torch.stack([tensors.pop(f"{f}{e}.down_proj.weight") for e in range(cfg.num_experts)])
    return w13, w2


def check_tensors(tensors: dict[str, torch.Tensor], cfg: JambaConfig, where: str) -> None:
    expected = hf_tensor_shapes(cfg)
    fused = {k for k in tensors if k.endswith(("experts.gate_up_proj", "experts.down_proj"))}
    problems = []
    for name, shape in expected.items():
        if ".experts." in name:
            layer = name.split(".experts.")[0]
            if f"{layer}.experts.gate_up_proj" in fused:
                continue
        if name not in tensors:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif tuple(tensors[name].shape) != shape:
            problems.append(f"tensor {name} has shape {list(tensors[name].shape)}, expected {list(shape)}")
        elif not tensors[name].is_floating_point():
            problems.append(f"tensor {name} has dtype {tensors[name].dtype}, expected a float dtype")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: " + "; ".join(problems[:5]) + more)


def load_model(ckpt: str | Path, dtype: torch.dtype = torch.float32, experts_int8: bool = True,
               impl: str = "custom") -> JambaLM:
    """Load a HF-format checkpoint directory into JambaLM (eval mode)."""
    ckpt = Path(ckpt)
    if not ckpt.is_dir():
        raise CheckpointError(f"{ckpt}: not a directory (expected a Hugging Face checkpoint: config.json + safetensors)")
    cfg = JambaConfig.load(ckpt)
    tensors = read_tensors(ckpt)
    check_tensors(tensors, cfg, str(ckpt))
    return build_model(cfg, tensors, dtype, experts_int8, impl)


def build_model(cfg: JambaConfig, tensors: dict[str, torch.Tensor], dtype: torch.dtype = torch.float32,
                experts_int8: bool = True, impl: str = "custom") -> JambaLM:
    tensors = dict(tensors)
    model = JambaLM(cfg, experts_int8=experts_int8, dtype=dtype, impl=impl)
    sd = {}
    for i in range(cfg.num_hidden_layers):
        if cfg.is_moe(i):
            w13, w2 = _fuse_experts(tensors, cfg, i)
            p = f"model.layers.{i}.feed_forward."
            if experts_int8:
                # quantise from the checkpoint's own precision, not after a cast to `dtype`
                sd[p + "w13"], sd[p + "w13_scale"] = quantize_experts(w13)
                sd[p + "w2"], sd[p + "w2_scale"] = quantize_experts(w2)
            else:
                sd[p + "w13"], sd[p + "w2"] = w13, w2
    sd.update(tensors)
    if cfg.tie_word_embeddings:
        sd.pop("lm_head.weight", None)
    own = model.state_dict()
    unexpected = sorted(set(sd) - set(own))
    if unexpected:
        raise CheckpointError(f"unexpected tensor(s) for this config: {', '.join(unexpected[:5])}")
    for name, t in own.items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        t.copy_(sd[name].to(t.dtype))
    return model.eval().requires_grad_(False)


# ---- writing ---------------------------------------------------------------------------------
def random_tensors(cfg: JambaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random initialisation in the HF layout (fp32), Mamba-style dt bias and A."""
    g = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
    out = {}
    for name, shape in hf_tensor_shapes(cfg).items():
        leaf = name.rsplit(".", 2)
        if name.endswith("layernorm.weight"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("A_log"):
            t = torch.log(torch.arange(1, shape[1] + 1, dtype=torch.float32)).repeat(shape[0], 1)
            t = t + 0.1 * torch.rand(shape, generator=g)
        elif name.endswith("mamba.D"):
            t = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name.endswith("dt_proj.bias"):
            dt = torch.exp(torch.rand(shape, generator=g) * (math.log(0.1) - math.log(1e-3)) + math.log(1e-3))
            t = dt + torch.log(-torch.expm1(-dt))          # inverse softplus: softplus(t) = dt
        elif name.endswith("dt_proj.weight"):
            t = (torch.rand(shape, generator=g) * 2 - 1) * shape[1] ** -0.5
        elif "conv1d" in name:
            t = (torch.rand(shape, generator=g) * 2 - 1) * shape[-1] ** -0.5
        elif leaf[-1] == "bias":
            t = torch.zeros(shape)
        else:
            t = torch.randn(shape, generator=g) * std
        out[name] = t.contiguous()
    return out


def save_checkpoint(cfg: JambaConfig, tensors: dict[str, torch.Tensor], out: str | Path,
                    max_shard_bytes: int | None = None) -> Path:
    """Write config.json + safetensors (sharded with an index when over `max_shard_bytes`)
    atomically: a temp dir renamed into place; an existing `out` is refused."""
    from safetensors.torch import save_file

    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; refusing to overwrite a checkpoint")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        cfg.save(tmp / "config.json")
        meta = {"format": "pt"}
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        if max_shard_bytes is None or total <= max_shard_bytes:
            save_file(tensors, str(tmp / SINGLE), metadata=meta)
        else:
            shards, cur, size = [], {}, 0
            for k, t in tensors.items():
                nb = t.numel() * t.element_size()
                if cur and size + nb > max_shard_bytes:
                    shards.append(cur)
                    cur, size = {}, 0
                cur[k], size = t, size + nb
            shards.append(cur)
            weight_map = {}
            for j, shard in enumerate(shards):
                fname = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
                save_file(shard, str(tmp / fname), metadata=meta)
                weight_map.update({k: fname for k in shard})
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_preset(name: str, out: str | Path, seed: int = 0, **overrides) -> Path:
    """A seeded random-init HF checkpoint for a named preset."""
    cfg = preset(name, **overrides)
    return save_checkpoint(cfg, random_tensors(cfg, seed), out)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} not supported (accepted: {', '.join(DTYPES)}; never float16: "
                              "Jamba activations reach ~4e6)")
    return DTYPES[name]
