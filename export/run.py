"""The export stage: a HF checkpoint (or a preset written as one) -> an artifact directory, streamed.

    weights.safetensors   every weight once, in the model's layout, written tensor by tensor
    program.pt2, step.pt2 the torch.export programs (prefill; stateful step), saved without weights
    model.onnx            the step program as ONNX, initializers pointing into weights.safetensors
    config.json, manifest.json
    tokenizer.json, tokenizer_config.json, ... the checkpoint's tokenizer, chat template and
                          generation config, when it has them (manifest `text`)

Nothing holds the model: the programs are traced on fake tensors and the weights go from the
checkpoint's mapped shards to the store a block at a time. After export nothing reads the source
checkpoint again, so the artifact can be moved or copied whole."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

import torch

import jambatrt
from jambatrt.artifact import FORMAT_VERSION, library_versions
from jambatrt.config import JambaConfig
from jambatrt.errors import ArtifactError
from jambatrt.export import ops as jops
from jambatrt.export.checkpoint import Checkpoint, check_tensors, write_preset
from jambatrt.export.model import state_shapes
from jambatrt.export.trace import MAX_BATCH, export_prefill, export_step, fake_model
from jambatrt.export.weights import WEIGHTS, save_weightless, write_weights


class Progress:
    """What a stage reports; the CLI draws it (rich), tests ignore it."""

    def step(self, msg: str) -> None: ...
    def start_bytes(self, what: str, total: int, tensors: int = 0) -> None: ...
    def advance(self, nbytes: int) -> None: ...
    def tensor_done(self) -> None: ...


def export_stage(out_tmp: Path, checkpoint: str | Path | None = None, preset_name: str | None = None,
                 dtype: torch.dtype = torch.float32, experts_int8: bool = True, seed: int = 0,
                 max_seq: int | None = None, progress: Progress | None = None,
                 onnx: bool = True, weights_int8: bool = False) -> tuple[dict, dict[str, str]]:
    """Write the artifact into `out_tmp` (the caller renames it into place); `onnx=False` leaves out
    model.onnx (for machines without ONNX tooling: the aoti engine needs step.pt2 only). Returns the manifest
    without `files` and the digests already computed while writing ({relative path: sha256}), so
    that recording the files (artifact.record_files) reads only the small ones."""
    progress = progress or Progress()
    if preset_name is not None:
        # the preset is written as a real checkpoint and read by the same code as a downloaded one;
        # it lives (hidden) in the artifact's temp dir only while the export runs
        with tempfile.TemporaryDirectory(prefix=".preset-", dir=out_tmp) as d:
            progress.step(f"writing preset {preset_name!r} (seed {seed}) as a HF checkpoint")
            ckpt = write_preset(preset_name, Path(d) / "checkpoint", seed=seed)
            return _export(out_tmp, ckpt, {"preset": preset_name, "seed": seed}, dtype, experts_int8, max_seq,
                           progress, onnx, weights_int8)
    ckpt = Path(checkpoint).resolve()
    return _export(out_tmp, ckpt, {"checkpoint": str(ckpt)}, dtype, experts_int8, max_seq, progress, onnx,
                   weights_int8)


def _export(out_tmp: Path, ckpt: Path, source: dict, dtype, experts_int8, max_seq,
            progress: Progress, onnx: bool, weights_int8: bool = False) -> tuple[dict, dict[str, str]]:
    t0 = time.perf_counter()
    progress.step(f"reading {ckpt} (headers)")
    src = Checkpoint(ckpt)
    cfg: JambaConfig = src.config
    check_tensors(src, cfg, str(ckpt))

    progress.step("weights -> weights.safetensors")
    from jambatrt.export.weights import model_entries, store_bytes
    need = store_bytes(cfg, dtype, experts_int8, weights_int8)
    free = shutil.disk_usage(out_tmp).free
    if need > free:       # refuse before writing, not at 95% of a 100 GB store
        raise ArtifactError(f"{out_tmp.parent}: the artifact's weights need {need / 1e9:.2f} GB, the filesystem has "
                            f"{free / 1e9:.2f} GB free")
    progress.start_bytes("weights", need, len(model_entries(cfg, dtype, experts_int8, weights_int8)))
    weights = write_weights(src, cfg, dtype, experts_int8, out_tmp / WEIGHTS, on_bytes=progress.advance,
                            on_tensor=progress.tensor_done, weights_int8=weights_int8)
    t_weights = time.perf_counter() - t0

    progress.step("torch.export (fake weights; dynamic batch and sequence)")
    model = fake_model(cfg, dtype, experts_int8, weights_int8)
    save_weightless(export_prefill(model, max_seq=max_seq), out_tmp / "program.pt2")
    step_ep = export_step(model, max_seq=max_seq)
    cfg.save(out_tmp / "config.json")
    manifest = _manifest(cfg, source, dtype, experts_int8, max_seq, weights, weights_int8)
    from jambatrt.text import copy_text_files
    manifest["text"] = copy_text_files(ckpt, out_tmp, cfg.to_hf_dict())

    if onnx:
        progress.step("ONNX (jamba domain, weights by reference)")
        from jambatrt.graph.onnx_export import write_onnx
        write_onnx(step_ep, out_tmp, manifest, out_tmp / WEIGHTS)
    save_weightless(step_ep, out_tmp / "step.pt2")
    manifest["programs"]["step"]["pt2"] = "step.pt2"
    manifest["export_seconds"] = {"weights": round(t_weights, 3), "total": round(time.perf_counter() - t0, 3)}
    manifest["source"]["checkpoint_bytes"] = src.total_bytes
    return manifest, {WEIGHTS: weights["sha256"]}


def _manifest(cfg: JambaConfig, source: dict, dtype: torch.dtype, experts_int8: bool, max_seq: int | None,
              weights: dict, weights_int8: bool = False) -> dict:
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
    return {
        "format_version": FORMAT_VERSION,
        "jambatrt_version": jambatrt.__version__,
        "libraries": library_versions(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "source": source,
        "config": cfg.to_hf_dict(),
        "dtype": dname,
        "quantization": {"experts": "int8-symmetric-per-output-channel" if experts_int8 else "none",
                         # --weights-int8: every other linear layer but the router (the embedding stays float)
                         "weights": "int8-symmetric-per-output-channel" if weights_int8 else "none"},
        "weights": {"path": WEIGHTS, "bytes": weights["bytes"], "tensors": weights["tensors"],
                    "layout": "safetensors, JambaLM state dict (experts stacked per layer), tensors page-aligned"},
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
        "engines": {},
    }
