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
from jambatrt.export.trace import export_prefill


def export_stage(out_tmp: Path, checkpoint: str | Path | None = None, preset_name: str | None = None,
                 dtype: torch.dtype = torch.float32, experts_int8: bool = True, seed: int = 0,
                 max_seq: int | None = None, step=lambda msg: None):
    """Returns (exported_program, model, manifest-without-files). `step(msg)` reports progress."""
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
    ep = export_prefill(model, max_seq=max_seq)
    torch.export.save(ep, str(out_tmp / "program.pt2"))
    cfg.save(out_tmp / "config.json")
    dname = str(dtype).removeprefix("torch.")
    state = [{"name": n, "shape": list(s), "dtype": str(d or dtype).removeprefix("torch.")}
             for n, s, d in state_shapes(cfg, 1, 0)]
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
        "programs": {"prefill": {
            "pt2": "program.pt2",
            "inputs": [{"name": "input_ids", "dtype": "int64", "shape": ["batch", "seq"]}],
            "outputs": [{"name": "logits", "dtype": dname, "shape": ["batch", "seq", cfg.vocab_size]}] + state,
            "max_batch": 64, "max_seq": max_seq or cfg.max_position_embeddings,
            "export_seconds": round(time.perf_counter() - t0, 3)}},
        "engines": {},
    }
    return ep, model, manifest
