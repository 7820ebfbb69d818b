"""Pipeline-stage engines: the step graph split into N contiguous layer ranges
(graph/passes/split_stages.py), each lowered by the backend's pass list into its own engine, run one
after the other with the hidden states handed on. On N GPUs each stage sits on its own device
(deploy writes one Triton model per stage); here every stage is an ONNX Runtime session on CPU.

    OUT/model.stage{k}.ort.onnx    stage k's lowered graph; initializers point into weights.safetensors
                                   (ONNX Runtime wants external data beside the model: the artifact root)
    manifest engines["ort-stages"] {"backend": "ort", "plan": <export/stage_plan.py plan>,
                                    "stages": [{"path", "layers": [a, b], "inputs", "outputs"}], ...}

`StagedEngine` is an Engine like any other (prefill, decode, generate take it): the state is the
whole model's flat list, each stage reads and writes its own layers' part of it."""

from __future__ import annotations

import os
import tempfile
import time
import weakref
from pathlib import Path

import numpy as np

from jambatrt.artifact import record_files, verify_files
from jambatrt.engines.base import Engine
from jambatrt.errors import ArtifactError, InputError
from jambatrt.manifest import Manifest

KEY = "ort-stages"                        # the manifest's engines entry
STAGE_FILE = "model.stage{k}.ort.onnx"


def stage_io(manifest: Manifest, a: int, b: int, n_layers: int) -> tuple[list[dict], list[dict]]:
    """The inputs and outputs of the stage holding layers [a, b), with dtypes and symbolic dims
    (as the manifest's programs.step lists them)."""
    from jambatrt.graph.passes.split_stages import HIDDEN_IN, HIDDEN_OUT

    step = manifest.step
    hidden = {"dtype": manifest.dtype, "shape": ["batch", "seq", manifest.config.hidden_size]}

    def mine(spec, prefix):
        return spec.name.startswith(prefix) and a <= int(spec.name.split(".")[1].removeprefix("layer")) < b

    ins = [step.inputs[0].as_dict() if a == 0 else {"name": HIDDEN_IN, **hidden}]
    ins += [s.as_dict() for s in step.state if mine(s, "past.")]
    outs = [step.outputs[0].as_dict() if b == n_layers else {"name": HIDDEN_OUT, **hidden}]
    outs += [s.as_dict() for s in step.outputs[1:] if mine(s, "present.")]
    return ins, outs


def build_stages(artifact: str | Path, stages: int | None = None, gpu_bytes: int | None = None,
                 context: int | None = None, attention: str = "kernel") -> dict:
    """Plan the stages (export/stage_plan.py: `stages`, or the fewest that fit `gpu_bytes`), split
    model.onnx, lower every stage with the ORT pass list and write them beside the weights; the plan
    and the stages go into the manifest (engines["ort-stages"]). Returns that entry."""
    import onnx
    import onnxruntime

    from jambatrt.export.stage_plan import plan_stages
    from jambatrt.graph.onnx_export import check, load_onnx
    from jambatrt.graph.passes import PassSettings, ort_passes, run_passes
    from jambatrt.graph.passes.split_stages import split_stages

    artifact = Path(artifact)
    m = Manifest.read(artifact)
    if not m.step.onnx:
        raise ArtifactError(f"{artifact}: the artifact has no model.onnx (re-run `jambatrt export`)")
    verify_files(artifact, m.raw)
    if m.dtype != "float32":
        raise InputError(f"{artifact}: the ONNX Runtime CPU engine runs float32 artifacts; this one is "
                         f"{m.dtype} (re-export with --dtype float32)")
    if attention != "kernel":
        raise InputError(f"attention={attention!r}: stage engines run the attention kernel (accepted: kernel)")
    cfg = m.config
    plan = plan_stages(cfg, stages=stages, gpu_bytes=gpu_bytes, context=context or m.step.max_seq,
                       experts_int8=m.experts_int8)
    settings = PassSettings(attention=attention, dtype=m.dtype)
    passes = ort_passes(settings)
    t0 = time.perf_counter()
    source = m.file(m.step.onnx)
    model = load_onnx(source, load_external_data=False)
    L = cfg.num_hidden_layers
    graphs = split_stages(model, [tuple(r) for r in plan["ranges"]], L, cfg.hidden_size)
    entries, written = [], []
    try:
        for k, ((a, b), g) in enumerate(zip(plan["ranges"], graphs)):
            g = run_passes(g, settings, passes)
            rel = STAGE_FILE.format(k=k)
            fd, tmp = tempfile.mkstemp(prefix=f".{rel}.", suffix=".tmp", dir=artifact)
            os.close(fd)
            written.append(tmp)
            onnx.save_model(g, tmp)
            check(Path(tmp))
            ins, outs = stage_io(m, a, b, L)
            entries.append({"path": rel, "layers": [a, b], "inputs": ins, "outputs": outs})
        for tmp, e in zip(written, entries):          # all stages whole and checked: then into place
            os.chmod(tmp, source.stat().st_mode & 0o777)
            os.replace(tmp, artifact / e["path"])
    finally:
        for tmp in written:
            Path(tmp).unlink(missing_ok=True)
    manifest = m.raw
    old = m.engines.get(KEY, {})
    stale = [s["path"] for s in old.get("stages", []) if s["path"] not in {e["path"] for e in entries}]
    for rel in stale:                                  # a previous build with more stages
        (artifact / rel).unlink(missing_ok=True)
        manifest.get("files", {}).pop(rel, None)
    entry = {"backend": "ort", "onnxruntime": onnxruntime.__version__, "stages": entries, "plan": plan,
             "passes": ["split_stages"] + [p.__name__ for p in passes], "settings": {"attention": attention},
             "weights": m.weights, "build_seconds": round(time.perf_counter() - t0, 3)}
    manifest.setdefault("engines", {})[KEY] = entry
    record_files(artifact, manifest, [e["path"] for e in entries])
    return entry


class StageSession:
    """One stage's ONNX Runtime session (the MoE experts mapped from the store, as OrtEngine does)."""

    def __init__(self, manifest: Manifest, stage: dict, threads: int | None = None):
        from jambatrt.engines.ort import load_session
        from jambatrt.plugins.cpu.ort_ops import release

        self.stage = stage
        path = manifest.file(stage["path"])
        self.session, _, keys = load_session(path, threads, kv_caches=False, what="stage")
        self._release = weakref.finalize(self, release, keys)
        self.input_names = [i.name for i in self.session.get_inputs()]
        self.output_names = [o.name for o in self.session.get_outputs()]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        from jambatrt.plugins.cpu.ort_ops import run_checked
        outs = run_checked(self.session, self.output_names, {n: feeds[n] for n in self.input_names})
        return dict(zip(self.output_names, outs))

    def close(self) -> None:
        self.session = None
        self._release()


class StagedEngine(Engine):
    """All stages of `engines["ort-stages"]` in this process, run in order (for tests, `generate`,
    `validate`; a server places each stage on its own device instead)."""

    backend = KEY
    build_options = "--backend ort --stages N"

    @classmethod
    def build(cls, artifact, **settings) -> dict:
        return build_stages(artifact, **settings)

    def __init__(self, artifact, manifest=None, threads: int | None = None):
        super().__init__(artifact, manifest)
        self.plan = self.entry["plan"]
        self.stages = [StageSession(self.manifest, s, threads) for s in self.entry["stages"]]
        self.state_names = [s.name for s in self.step_program.state]

    def run_step(self, input_ids, state):
        from jambatrt.graph.passes.split_stages import HIDDEN_IN, HIDDEN_OUT
        past = dict(zip(self.state_names, state))
        present: dict[str, np.ndarray] = {}
        x = {"input_ids": input_ids}
        for s in self.stages:
            out = s.run({**x, **past})
            present.update({k: v for k, v in out.items() if k.startswith("present.")})
            x = {HIDDEN_IN: out[HIDDEN_OUT]} if HIDDEN_OUT in out else out
        return x["logits"], [present["present." + n.removeprefix("past.")] for n in self.state_names]

    def close(self) -> None:
        for s in self.stages:
            s.close()
