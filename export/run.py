"""The export stage: checkpoint (or preset) -> program.pt2 + checkpoint copy + manifest, written
into a directory the caller makes atomic (see jambatrt.artifact.atomic_dir)."""

from __future__ import annotations

import time
from pathlib import Path

import torch

import jambatrt
from jambatrt.artifact import FORMAT_VERSION, library_versions
from jambatrt.config import JambaConfig
from jambatrt.export import ops as jops
from jambatrt.export.checkpoint import load_model, write_preset
from jambatrt.export.model import state_shapes
from jambatrt.export.trace import MAX_BATCH, export_prefill, export_step


def export_stage(out_tmp: Path, checkpoint: str | Path | None = None, preset_name: str | None = None,
                 dtype: torch.dtype = torch.float32, experts_int8: bool = True, seed: int = 0,
                 max_seq: int | None = None, step=lambda msg: None):
    """Returns (step program, model, manifest-without-files); writes program.pt2 (the stateless
    prefill program). `step(msg)` reports progress."""
    if preset_name is not None:
        step(f"writing preset {preset_name!r} (seed {seed}) as a HF checkpoint")
        ckpt = write_preset(preset_name, out_tmp / "checkpoint", seed=seed)
        source = {"preset": preset_name, "seed": seed, "checkpoint": "checkpoint"}
    else:
        ckpt = Path(checkpoint).resolve()
        source = {"checkpoint": str(ckpt)}
    step(f"loading {ckpt}")
    model = load_model(ckpt, dtype=dtype, experts_int8=experts_int8)
    cfg: JambaConfig = model.config
    step("torch.export (dynamic batch and sequence)")
    t0 = time.perf_counter()
    torch.export.save(export_prefill(model, max_seq=max_seq), str(out_tmp / "program.pt2"))
    ep = export_step(model, max_seq=max_seq)
    cfg.save(out_tmp / "config.json")
    dname = str(dtype).removeprefix("torch.")
    def state_io(prefix: str, kv_len: str) -> list[dict]:
        out = []
        for n, shape, d in state_shapes(cfg, 1, 0):
            dims = ["batch", kv_len, *shape[2:]] if n.endswith((".k", ".v")) else ["batch", *shape[1:]]
            out.append({"name": f"{prefix}.{n}", "dtype": str(d or dtype).removeprefix("torch."), "shape": dims})
        return out

    max_seq = max_seq or cfg.max_position_embeddings
    logits = {"name": "logits", "dtype": dname, "shape": ["batch", "seq", cfg.vocab_size]}
    ids = {"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}
    manifest = {
        "format_version": FORMAT_VERSION,
        "jambatrt_version": jambatrt.__version__,
        "libraries": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "config": cfg.to_hf_dict(),
        "dtype": dname,
        "quantization": {"experts": "int8-symmetric-per-output-channel" if experts_int8 else "none"},
        "ops": {name: {"qualname": s.qualname, "onnx": f"{jops.DOMAIN}::{s.onnx_op_type}", "version": s.version}
                for name, s in jops.SPECS.items()},
        "programs": {
            # stateless prefill, torch.export only (program.pt2 contract: input_ids -> logits, ...)
            "prefill": {"pt2": "program.pt2", "inputs": [ids], "outputs": [logits] + state_io("present", "seq"),
                        "max_batch": MAX_BATCH, "max_seq": max_seq},
            # stateful step: prefill from zero state, chunked prefill, decode (seq = 1) -> model.onnx
            "step": {"inputs": [ids] + state_io("past", "past"), "outputs": [logits] + state_io("present", "past+seq"),
                     "max_batch": MAX_BATCH, "max_seq": max_seq},
        },
        "export_seconds": round(time.perf_counter() - t0, 3),
        "engines": {},
    }
    return ep, model, manifest
