"""The ONNX Runtime engine: the artifact's model.onnx lowered by the ORT pass list, run on CPU with
our kernels registered as custom ops (onnxruntime-extensions) in domain `jamba`."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from jambatrt.artifact import add_files, read_manifest, verify_files
from jambatrt.engines.base import Engine
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError

SUBDIR = "engines/ort"


def _session_options(threads: int | None = None):
    import onnxruntime as ort

    from jambatrt.plugins.cpu.ort_ops import custom_ops_library

    so = ort.SessionOptions()
    so.register_custom_ops_library(custom_ops_library())
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL    # ORT_PARALLEL oversubscribes 2 cores
    so.intra_op_num_threads = threads or os.cpu_count() or 1
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3
    return so


class OrtEngine(Engine):
    backend = "ort"

    @classmethod
    def build(cls, artifact: str | Path, attention: str = "kernel", **_) -> dict:
        import onnxruntime

        from jambatrt.graph.onnx_export import check, load_onnx, save_onnx
        from jambatrt.graph.passes import PassSettings, ort_passes, run_passes

        artifact = Path(artifact)
        manifest = read_manifest(artifact)
        prefill = manifest["programs"]["prefill"]
        if "onnx" not in prefill:
            raise ArtifactError(f"{artifact}: the artifact has no model.onnx (re-run `jambatrt export`)")
        verify_files(artifact, manifest)     # refuse tampered or incomplete inputs before any work
        if attention not in ("kernel", "gqa"):
            raise InputError(f"attention={attention!r} (accepted: kernel, gqa)")
        settings = PassSettings(attention=attention, dtype=manifest["dtype"])
        t0 = time.perf_counter()
        model = load_onnx(artifact / prefill["onnx"])
        passes = ort_passes(settings)
        model = run_passes(model, settings, passes)
        dest = artifact / SUBDIR
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".ort.tmp-", dir=dest.parent))
        try:
            save_onnx(model, tmp / "model.onnx")
            check(tmp / "model.onnx")
            if dest.exists():
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        entry = {"path": f"{SUBDIR}/model.onnx", "onnxruntime": onnxruntime.__version__,
                 "passes": [p.__name__ for p in passes], "settings": {"attention": attention},
                 "build_seconds": round(time.perf_counter() - t0, 3)}
        manifest.setdefault("engines", {})["ort"] = entry
        add_files(artifact, manifest, SUBDIR)
        return entry

    def __init__(self, artifact, manifest=None, threads: int | None = None):
        super().__init__(artifact, manifest)
        try:
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime not installed (pip install onnxruntime onnxruntime-extensions)") from None
        entry = self.manifest["engines"]["ort"]
        path = self.artifact / entry["path"]
        try:
            self.session = ort.InferenceSession(str(path), _session_options(threads), providers=["CPUExecutionProvider"])
        except Exception as e:   # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
            raise ArtifactError(f"{path}: ONNX Runtime cannot load the engine ({type(e).__name__}: {e})") from None
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def prefill(self, input_ids, state=None):
        ids = self.check_ids(input_ids)
        if state is not None:
            raise InputError("this engine's prefill graph takes no incoming state")
        from jambatrt.plugins.cpu.ort_ops import raise_pending_error
        try:
            outs = self.session.run(self.output_names, {"input_ids": ids})
        finally:
            raise_pending_error()
        return outs[0], list(outs[1:])
