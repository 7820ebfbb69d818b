"""Hugging Face-format Jamba checkpoints: config.json + safetensors (single file or sharded with
model.safetensors.index.json), read tensor by tensor through a mapping, never whole.

`model_tensors` is the one place where the checkpoint's layout becomes the model's: per-expert
gate/up/down become stacked w13 [E,2I,H] / w2 [E,H,I] (int8 + per-row scales with ExpertsInt8,
quantised a block of rows at a time); with --weights-int8 the other linear weights are quantised the
same way (int8 `<name>.weight` + fp32 `<name>.weight_scale`); everything else is cast to the export dtype. It yields blocks
of bounded size in the model's state-dict order, which the artifact's weight store is written in.

Presets are seeded random initialisations written, tensor by tensor, in exactly the format
`JambaForCausalLM.from_pretrained` reads (and AI21's checkpoints use: per-expert key names, 2 GB
shards with an index)."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Protocol

import torch

from jambatrt.config import JambaConfig, preset
from jambatrt.errors import CheckpointError, ConfigError
from jambatrt.export.quantize import quantize_experts, quantize_linear
from jambatrt.export.store import MappedStore, iter_blocks, nbytes, read_header, torch_dtype, write_tensors

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
SOURCE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
BLOCK_BYTES = 2 << 20           # rows read, cast or quantised at a time: bounds export memory; small blocks
                                # stay in cache (measured: 2 MB blocks quantise 2x faster than 64 MB ones)


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
class TensorSource(Protocol):
    """Where `model_tensors` reads HF-layout tensors from: a checkpoint on disk, or a dict."""

    def __contains__(self, name: str) -> bool: ...
    def get(self, name: str) -> torch.Tensor: ...
    def shape(self, name: str) -> tuple[int, ...]: ...
    def dtype(self, name: str) -> torch.dtype: ...
    def where(self, name: str) -> str: ...
    def names(self) -> list[str]: ...


class DictSource:
    """Tensors already in memory (tests, the HF reference's dequantised experts)."""

    def __init__(self, tensors: dict[str, torch.Tensor], name: str = "tensors"):
        self.tensors, self.name = tensors, name

    def __contains__(self, name):
        return name in self.tensors

    def get(self, name):
        return self.tensors[name]

    def shape(self, name):
        return tuple(self.tensors[name].shape)

    def dtype(self, name):
        return self.tensors[name].dtype

    def where(self, name):
        return self.name

    def names(self):
        return list(self.tensors)


class Checkpoint:
    """A HF-format checkpoint directory, opened lazily: headers are read up front (names, dtypes,
    shapes, offsets checked against file sizes), tensors are views of private mappings of the
    shards, so reading one costs its pages and nothing else."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise CheckpointError(f"{self.path}: not a directory (expected a Hugging Face checkpoint: "
                                  "config.json + safetensors)")
        self.config = JambaConfig.load(self.path)
        self._file_of: dict[str, Path] = {}
        self._info: dict[str, dict] = {}
        for f in self._files():
            entries, _ = read_header(f, error=CheckpointError)
            for name, info in entries.items():
                self._file_of[name], self._info[name] = f, info
        self._maps: dict[Path, MappedStore] = {}

    def _files(self) -> list[Path]:
        ckpt = self.path
        if (ckpt / INDEX).exists():
            try:
                weight_map = json.loads((ckpt / INDEX).read_text())["weight_map"]
                files = sorted({(ckpt / f).resolve() for f in weight_map.values()})
            except (json.JSONDecodeError, KeyError, TypeError, AttributeError, UnicodeDecodeError, OSError) as e:
                raise CheckpointError(f"{ckpt / INDEX}: unreadable index ({e}); expected "
                                      "{'weight_map': {name: file}}") from None
            outside = [str(f) for f in files if not f.is_relative_to(ckpt.resolve())]
            if outside:
                raise CheckpointError(f"{ckpt / INDEX} names shard(s) outside the checkpoint: {', '.join(outside)}")
            missing = [str(f) for f in files if not f.is_file()]
            if missing:
                raise CheckpointError(f"{ckpt / INDEX} names shard(s) that do not exist: {', '.join(missing)}")
            return files
        if (ckpt / SINGLE).is_file():
            return [ckpt / SINGLE]
        found = sorted(p for p in ckpt.glob("*.safetensors") if p.is_file())
        if found:
            return found
        raise CheckpointError(f"{ckpt}: no safetensors weights (expected {SINGLE} or {INDEX} with shards)")

    def __contains__(self, name):
        return name in self._info

    def names(self):
        return list(self._info)

    def shape(self, name):
        return tuple(self._info[name]["shape"])

    def dtype(self, name):
        return torch_dtype(self._info[name]["dtype"])

    def where(self, name):
        return str(self._file_of[name])

    def get(self, name) -> torch.Tensor:
        f = self._file_of[name]
        if f not in self._maps:
            try:
                self._maps[f] = MappedStore(f, error=CheckpointError)
            except OSError as e:
                raise CheckpointError(f"{f}: unreadable safetensors file ({e})") from None
        return self._maps[f].tensor(name)

    @property
    def total_bytes(self) -> int:
        return sum(i["nbytes"] for i in self._info.values())


def check_tensors(src: TensorSource, cfg: JambaConfig, where: str) -> None:
    """Every tensor the config needs is present with its shape and a float dtype (headers only)."""
    expected = hf_tensor_shapes(cfg)
    problems = []
    for name, shape in expected.items():
        if ".experts." in name and f"{name.split('.experts.')[0]}.experts.gate_up_proj" in src:
            continue        # transformers' fused in-memory layout
        if name not in src:
            problems.append(f"missing tensor {name} (expected shape {list(shape)})")
        elif src.shape(name) != shape:
            problems.append(f"tensor {name} has shape {list(src.shape(name))}, expected {list(shape)}")
        elif src.dtype(name) not in SOURCE_DTYPES:
            problems.append(f"tensor {name} has dtype {src.dtype(name)}, expected a float dtype "
                            f"({', '.join(str(d).removeprefix('torch.') for d in SOURCE_DTYPES)})")
    fused = {f"{n.split('.experts.')[0]}.experts.{k}" for n in expected if ".experts." in n
             for k in ("gate_up_proj", "down_proj")}
    allowed = set(expected) | fused | ({"lm_head.weight"} if cfg.tie_word_embeddings else set())
    names = src.names() if hasattr(src, "names") else []
    unexpected = sorted(n for n in names if n not in allowed)
    if unexpected:   # e.g. a conv bias the config says is absent: dropping it would change the model
        problems.append(f"unexpected tensor(s) for this config: {', '.join(unexpected[:5])}"
                        + (f" (+{len(unexpected) - 5} more)" if len(unexpected) > 5 else "")
                        + " (is config.json the checkpoint's own?)")
    if problems:
        more = f" (+{len(problems) - 5} more)" if len(problems) > 5 else ""
        raise CheckpointError(f"{where}: " + "; ".join(problems[:5]) + more)


def _finite(src: TensorSource, name: str, block: torch.Tensor) -> torch.Tensor:
    if block.is_floating_point() and not bool(torch.isfinite(block).all()):
        raise CheckpointError(f"{src.where(name)}: tensor {name} holds NaN or Inf values; refusing to export "
                              "non-finite weights (accepted: finite floats)")
    return block


def _expert_rows(src: TensorSource, layer: str, e: int, which: str) -> Iterator[tuple[str, torch.Tensor]]:
    """The rows of expert e's w13 (which="w13": gate rows, then up rows) or w2, from the per-expert
    file layout or transformers' fused one; -> (source name, row block view)."""
    if f"{layer}experts.gate_up_proj" in src:
        name = f"{layer}experts.gate_up_proj" if which == "w13" else f"{layer}experts.down_proj"
        yield name, src.get(name)[e]
    elif which == "w13":
        for part in ("gate_proj", "up_proj"):
            name = f"{layer}experts.{e}.{part}.weight"
            yield name, src.get(name)
    else:
        name = f"{layer}experts.{e}.down_proj.weight"
        yield name, src.get(name)


def model_tensors(src: TensorSource, entries: list[tuple[str, torch.dtype, tuple[int, ...]]], cfg: JambaConfig,
                  experts_int8: bool, block_bytes: int = BLOCK_BYTES) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights (`entries`: [(name, dtype, shape)] in state-dict order, see
    `export.weights.model_entries`) as (name, block) pairs: consecutive row blocks of at most about
    `block_bytes` of source data, in `entries` order. Expert weights are quantised a block of rows
    at a time (the scale is per row, so this equals quantising the whole stack); their scales
    follow the stack they belong to. So are the int8 entries of Int8Linear layers (--weights-int8),
    whose `.weight_scale` follows the weight. Every source block is checked to be finite (a quantised
    expert row through its scale: max|w| is NaN or Inf exactly when the row holds one, so no extra pass)."""
    shapes = {name: shape for name, _, shape in entries}
    scales: dict[str, torch.Tensor] = {}
    for name, dtype, _ in entries:
        layer, _, leaf = name.rpartition("feed_forward.")
        if leaf in ("w13", "w2"):
            layer += "feed_forward."
            # allocated once, before the stream: small tensors kept alive between the quantiser's large
            # temporaries fragment the heap, which then never shrinks (seen: 3.9 GB for 4 MB blocks)
            scale = scales[name] = torch.empty(shapes[name + "_scale"]).view(-1) if experts_int8 else None
            done = 0
            for e in range(cfg.num_experts):
                for src_name, rows in _expert_rows(src, layer, e, leaf):
                    for block in iter_blocks(rows, block_bytes):
                        if experts_int8:
                            q, s = quantize_experts(block[None])     # from the checkpoint's own precision
                            _finite(src, src_name, s)
                            scale[done:done + s.shape[1]] = s[0]
                            done += s.shape[1]
                            yield name, q[0]
                        else:
                            yield name, _finite(src, src_name, block).to(dtype)
        elif leaf in ("w13_scale", "w2_scale"):
            yield name, scales.pop(name.removesuffix("_scale")).view(shapes[name])
        elif dtype == torch.int8:        # an Int8Linear weight: only the int8 rows and their scales are stored
            scale = scales[name] = torch.empty(shapes[name + "_scale"])      # preallocated, as the experts'
            done = 0
            for block in iter_blocks(src.get(name), block_bytes):
                q, s = quantize_linear(_finite(src, name, block))
                scale[done:done + s.shape[0]] = s
                done += s.shape[0]
                yield name, q
        elif name.endswith(".weight_scale") and name.removesuffix("_scale") in scales:
            yield name, scales.pop(name.removesuffix("_scale"))
        else:
            for block in iter_blocks(src.get(name), block_bytes):
                yield name, _finite(src, name, block).to(dtype)


# ---- writing ---------------------------------------------------------------------------------
def iter_random_tensors(cfg: JambaConfig, seed: int = 0) -> Iterator[tuple[str, torch.Tensor]]:
    """Seeded random initialisation in the HF layout (fp32), Mamba-style dt bias and A; one tensor
    at a time, in `hf_tensor_shapes` order (the values depend only on the seed and that order)."""
    g = torch.Generator().manual_seed(seed)
    std = cfg.initializer_range
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
        yield name, t.contiguous()


def random_tensors(cfg: JambaConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """All of `iter_random_tensors` in memory (small configs, tests)."""
    return dict(iter_random_tensors(cfg, seed))


def _shards(entries: list[tuple[str, torch.dtype, tuple[int, ...]]], max_shard_bytes: int | None) -> list[list]:
    shards, cur, size = [], [], 0
    for e in entries:
        nb = nbytes(e[1], e[2])
        if cur and max_shard_bytes is not None and size + nb > max_shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append(e)
        size += nb
    return shards + [cur]


def _named(want: str, given: str, t: torch.Tensor) -> tuple[str, torch.Tensor]:
    if want != given:
        raise ValueError(f"tensors out of order: got {given!r} where {want!r} belongs")
    return want, t


def save_checkpoint(cfg: JambaConfig, tensors: dict[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
                    out: str | Path, max_shard_bytes: int | None = None, dtype: torch.dtype | None = None,
                    on_bytes=None, extra_files=None) -> Path:
    """Write config.json + safetensors, sharded with an index when over `max_shard_bytes`, one
    tensor at a time, atomically: a temp dir renamed into place; an existing `out` is refused.
    `tensors`: a dict, or (name, tensor) pairs in `hf_tensor_shapes` order (`iter_random_tensors`),
    which are then never all in memory. `dtype` casts every tensor (e.g. a bf16 checkpoint).
    `extra_files(dir)` writes more files (a tokenizer) into the checkpoint before it is renamed in."""
    out = Path(out)
    if out.exists():
        raise CheckpointError(f"{out} already exists; refusing to overwrite a checkpoint")
    if isinstance(tensors, dict):
        entries = [(k, dtype or t.dtype, tuple(t.shape)) for k, t in tensors.items()]
        pairs: Iterable = tensors.items()
    else:
        entries = [(k, dtype or torch.float32, s) for k, s in hf_tensor_shapes(cfg).items()]
        pairs = tensors
    out.parent.mkdir(parents=True, exist_ok=True)
    need, free = sum(nbytes(d, sh) for _, d, sh in entries), shutil.disk_usage(out.parent).free
    if need > free:
        raise CheckpointError(f"{out}: the checkpoint needs {need / 1e9:.2f} GB, {out.parent} has {free / 1e9:.2f} GB free")
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o755)
    try:
        cfg.save(tmp / "config.json")
        shards = _shards(entries, max_shard_bytes)
        it = iter(pairs)
        weight_map, total = {}, 0
        for j, shard in enumerate(shards):
            fname = SINGLE if len(shards) == 1 else f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
            blocks = (_named(n, given, t.to(d)) for (n, d, _), (given, t) in zip(shard, it))
            write_tensors(tmp / fname, blocks, shard, metadata={"format": "pt"}, on_bytes=on_bytes)
            weight_map.update({n: fname for n, _, _ in shard})
            total += (tmp / fname).stat().st_size
        if len(shards) > 1:
            (tmp / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                indent=2))
        if extra_files is not None:
            extra_files(tmp)
        os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def write_preset(name: str, out: str | Path, seed: int = 0, dtype: torch.dtype | None = None,
                 max_shard_bytes: int | None = None, on_bytes=None, tokenizer: bool = True, **overrides) -> Path:
    """A seeded random-init HF checkpoint for a named preset, written tensor by tensor, with a real
    tokenizer, chat template and generation config (export/tokenizer.py) unless `tokenizer=False`."""
    from jambatrt.config import PRESET_GENERATION
    from jambatrt.export.tokenizer import write_tokenizer

    cfg = preset(name, **overrides)
    generation = PRESET_GENERATION.get(name)

    def tokenizer_files(d: Path) -> None:
        write_tokenizer(cfg, d, generation, seed=seed)
    return save_checkpoint(cfg, iter_random_tensors(cfg, seed), out, max_shard_bytes=max_shard_bytes, dtype=dtype,
                           on_bytes=on_bytes, extra_files=tokenizer_files if tokenizer else None)


def dtype_from_name(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"dtype {name!r} not supported (accepted: {', '.join(DTYPES)}; never float16: "
                              "Jamba activations reach ~4e6)")
    return DTYPES[name]
