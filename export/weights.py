"""The artifact's one weight store, `weights.safetensors`, and what is bound to it.

Names and dtypes are those of `JambaLM.state_dict()` (experts stacked per layer: w13 [E,2I,H],
w2 [E,H,I], int8 + fp32 scales with ExpertsInt8; a tied lm_head is stored once, as the
embedding). Everything that needs weights reads them from here:
- model.onnx's initializers point into the file by byte offset (graph/onnx_export.py);
- program.pt2 / step.pt2 are saved without weights and bound at load (`load_program`);
- the eager reference maps it (`load_artifact_model`): pages are read on first touch and stay
  file-backed, so a model larger than RAM can still be run layer by layer.

Every model is first built on the meta device (`meta_model`): shapes and dtypes without memory."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from jambatrt.config import JambaConfig
from jambatrt.errors import ArtifactError
from jambatrt.export.checkpoint import Checkpoint, DictSource, TensorSource, check_tensors, model_tensors
from jambatrt.export.model import JambaLM
from jambatrt.export.store import PAGE, MappedStore, StoreWriter

WEIGHTS = "weights.safetensors"
PROGRAM_PREFIX = "model."        # PrefillProgram / StepProgram hold the JambaLM as `.model`


def meta_model(cfg: JambaConfig, dtype: torch.dtype = torch.float32, experts_int8: bool = True,
               impl: str = "custom", weights_int8: bool = False) -> JambaLM:
    with torch.device("meta"):
        return JambaLM(cfg, experts_int8=experts_int8, dtype=dtype, impl=impl,
                       weights_int8=weights_int8).eval().requires_grad_(False)


def model_entries(cfg: JambaConfig, dtype: torch.dtype = torch.float32, experts_int8: bool = True,
                  weights_int8: bool = False) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """[(name, dtype, shape)] of every weight the model holds, in state-dict order, each shared
    tensor once (a tied lm_head is the embedding)."""
    seen, out = set(), []
    for name, t in meta_model(cfg, dtype, experts_int8, weights_int8=weights_int8).state_dict(keep_vars=True).items():
        if id(t) not in seen:
            seen.add(id(t))
            out.append((name, t.dtype, tuple(t.shape)))
    return out


def assign_weights(model: JambaLM, get: Callable[[str], torch.Tensor]) -> JambaLM:
    """Give a (meta) model its weights without copying: every parameter/buffer becomes `get(name)`."""
    names = [n for n, _, _ in model_entries(model.config, next(model.parameters()).dtype, model.experts_int8,
                                            model.weights_int8)]
    sd = {n: get(n) for n in names}
    if model.config.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
    model.load_state_dict(sd, strict=True, assign=True)
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def build_model(cfg: JambaConfig, tensors: dict[str, torch.Tensor] | TensorSource,
                dtype: torch.dtype = torch.float32, experts_int8: bool = True, impl: str = "custom",
                weights_int8: bool = False) -> JambaLM:
    """An in-memory JambaLM from HF-layout tensors (a dict or a `Checkpoint`), through the same
    `model_tensors` transform the export writes the store with. Holds the whole model: for small
    models (tests); artifacts are mapped instead (`load_artifact_model`)."""
    src = DictSource(tensors) if isinstance(tensors, dict) else tensors
    check_tensors(src, cfg, getattr(src, "path", "tensors"))
    entries = model_entries(cfg, dtype, experts_int8, weights_int8)
    blocks: dict[str, list[torch.Tensor]] = {}
    for name, block in model_tensors(src, entries, cfg, experts_int8):
        blocks.setdefault(name, []).append(block)
    shapes = {n: s for n, _, s in entries}
    return assign_weights(meta_model(cfg, dtype, experts_int8, impl, weights_int8),   # torch.cat copies
                          lambda n: torch.cat([b.reshape(-1) for b in blocks[n]]).reshape(shapes[n]))


def load_model(ckpt: str | Path, dtype: torch.dtype = torch.float32, experts_int8: bool = True,
               impl: str = "custom", weights_int8: bool = False) -> JambaLM:
    """A HF-format checkpoint directory as an in-memory JambaLM (see `build_model`)."""
    c = Checkpoint(ckpt)
    return build_model(c.config, c, dtype, experts_int8, impl, weights_int8)


def write_weights(src: TensorSource, cfg: JambaConfig, dtype: torch.dtype, experts_int8: bool, path: Path,
                  on_bytes: Callable[[int], None] | None = None, on_tensor: Callable[[], None] | None = None,
                  weights_int8: bool = False) -> dict:
    """Stream the model's weights from `src` into `path` (page-aligned safetensors) -> {"sha256",
    "bytes", "tensors"}. Memory: a few blocks of `checkpoint.BLOCK_BYTES`, whatever the model size."""
    entries = model_entries(cfg, dtype, experts_int8, weights_int8)
    with StoreWriter(path, entries, align=PAGE, metadata={"format": "pt", "producer": "jambatrt"},
                     on_bytes=on_bytes, on_tensor=on_tensor) as w:
        for name, block in model_tensors(src, entries, cfg, experts_int8):
            w.write(name, block)
        digest = w.close()
    return {"sha256": digest, "bytes": w.total, "tensors": len(entries)}


def store_bytes(cfg: JambaConfig, dtype: torch.dtype, experts_int8: bool, weights_int8: bool = False) -> int:
    """The size `write_weights` will give the store, from the plan alone (padding included); the
    file is created and removed again, nothing is written to it."""
    import os
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        w = StoreWriter(Path(d) / "plan", model_entries(cfg, dtype, experts_int8, weights_int8), align=PAGE)
        w.abort()
        os.unlink(Path(d) / "plan")
    return w.total


def open_store(artifact: str | Path) -> MappedStore:
    path = Path(artifact) / WEIGHTS
    if not path.is_file():
        raise ArtifactError(f"{artifact}: no {WEIGHTS} (re-run `jambatrt export`)")
    return MappedStore(path)


def load_artifact_model(artifact: str | Path, manifest=None, impl: str = "custom") -> JambaLM:
    """The artifact's model with its weights mapped from the store (no copy, nothing read until used).
    manifest: its Manifest (or read_manifest dict; None: read it)."""
    from jambatrt.export.checkpoint import DTYPES
    from jambatrt.manifest import Manifest

    m = Manifest.of(artifact, manifest)
    cfg, dtype = m.config, DTYPES[m.dtype]
    store = open_store(artifact)
    model = meta_model(cfg, dtype, m.experts_int8, impl, m.weights_int8)
    missing = [n for n, _, _ in model_entries(cfg, dtype, m.experts_int8, m.weights_int8) if n not in store]
    if missing:
        raise ArtifactError(f"{store.path}: missing weight(s) {', '.join(missing[:5])} (re-run `jambatrt export`)")
    model.store = store              # keeps the mapping alive as long as the model
    return assign_weights(model, store.tensor)


def save_weightless(ep: torch.export.ExportedProgram, path: Path) -> None:
    """torch.export.save without the weights: the state dict is saved as meta tensors (shapes and
    dtypes only); `load_program` binds the store to it."""
    import warnings

    def meta(v):
        t = torch.empty(v.shape, dtype=v.dtype, device="meta")
        return torch.nn.Parameter(t, requires_grad=False) if isinstance(v, torch.nn.Parameter) else t

    ep._state_dict = {k: meta(v) for k, v in ep.state_dict.items()}
    with warnings.catch_warnings():     # torch's own pytree deprecation noise
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        torch.export.save(ep, str(path))


def load_program(artifact: str | Path, rel: str) -> torch.export.ExportedProgram:
    """A weightless program of the artifact (program.pt2, step.pt2) with the store bound to it."""
    import warnings

    import jambatrt.export.ops  # noqa: F401  (the jamba:: ops must exist before torch.export.load)

    path = Path(artifact) / rel
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            ep = torch.export.load(str(path))
    except Exception as e:          # torch raises its own serialisation errors
        raise ArtifactError(f"{path}: unreadable torch.export program ({type(e).__name__}: {e})") from None
    store = open_store(artifact)
    sd = {}
    for k, v in ep.state_dict.items():
        name = k.removeprefix(PROGRAM_PREFIX)
        if name not in store and name == "lm_head.weight":
            name = "model.embed_tokens.weight"        # tied: stored once
        if name not in store:
            raise ArtifactError(f"{path}: weight {k} is not in {store.path}")
        t = store.tensor(name)
        if t.dtype != v.dtype or tuple(t.shape) != tuple(v.shape):
            raise ArtifactError(f"{path}: weight {k} is {v.dtype} {list(v.shape)} in the program, "
                                f"{t.dtype} {list(t.shape)} in {store.path}")
        sd[k] = torch.nn.Parameter(t, requires_grad=False) if isinstance(v, torch.nn.Parameter) else t
    ep._state_dict = sd
    ep._jambatrt_store = store       # keeps the mapping alive with the program
    return ep
