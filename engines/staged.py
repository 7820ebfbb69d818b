"""Pipeline-stage engines: the step program split into N contiguous layer ranges, each its own engine,
run one after the other with the hidden states handed on. On N GPUs each stage sits on its own device
(deploy writes one Triton model per stage); here every stage runs on CPU.

  ort   model.onnx cut by graph/passes/split_stages.py, each stage lowered by the ORT pass list:
          OUT/model.stage{k}.ort.onnx      initializers point into weights.safetensors (ONNX Runtime
                                           wants external data beside the model: the artifact root)
          manifest engines["ort-stages"]
  aoti  the model's StageProgram of each range (export/trace.py; the same cut) compiled by
        AOTInductor (engines/aoti.py; cpu here, cuda on a GPU):
          OUT/engines/aoti-stages/stage{k}.pt2
          manifest engines["aoti-stages"]
  each entry: {"backend", "plan": <export/stage_plan.py plan>,
               "stages": [{"path", "layers": [a, b], "inputs", "outputs"}], ...}

`StagedEngine` / `AotiStagedEngine` are Engines like any other (prefill, decode, generate take them):
the state is the whole model's flat list, each stage reads and writes its own layers' part of it."""

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

KEYS = {"ort": "ort-stages", "aoti": "aoti-stages"}      # backend -> the manifest's engines entry
KEY = KEYS["ort"]
STAGE_FILES = {"ort": "model.stage{k}.ort.onnx", "aoti": "engines/aoti-stages/stage{k}.pt2"}


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
                 context: int | None = None, attention: str = "kernel", backend: str = "ort") -> dict:
    """Plan the stages (export/stage_plan.py: `stages`, or the fewest that fit `gpu_bytes`), build one
    engine per stage for `backend` (ort: model.onnx split and lowered by the ORT pass list; aoti: each
    StageProgram compiled by AOTInductor) and write them into the artifact, all or none; the plan and
    the stages go into the manifest (engines[KEYS[backend]]). Returns that entry."""
    from jambatrt.export.stage_plan import plan_stages

    if backend not in KEYS:
        raise InputError(f"stage engines for backend {backend!r} (accepted: {', '.join(KEYS)})")
    artifact = Path(artifact)
    m = Manifest.read(artifact)
    verify_files(artifact, m.raw)
    if attention != "kernel":
        raise InputError(f"attention={attention!r}: stage engines run the attention kernel (accepted: kernel)")
    cfg = m.config
    plan = plan_stages(cfg, stages=stages, gpu_bytes=gpu_bytes, context=context or m.step.max_seq,
                       experts_int8=m.experts_int8)
    t0 = time.perf_counter()
    writer, extra = (_ort_writer if backend == "ort" else _aoti_writer)(m, plan["ranges"])
    L = cfg.num_hidden_layers
    entries, written = [], []
    try:
        for k, (a, b) in enumerate(plan["ranges"]):
            rel = STAGE_FILES[backend].format(k=k)
            (artifact / rel).parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{Path(rel).name}.", suffix=".tmp" + Path(rel).suffix,
                                       dir=(artifact / rel).parent)
            os.close(fd)
            written.append(tmp)
            more = writer(k, a, b, Path(tmp))
            ins, outs = stage_io(m, a, b, L)
            entries.append({"path": rel, "layers": [a, b], "inputs": ins, "outputs": outs, **more})
        for tmp, e in zip(written, entries):          # all stages whole and checked: then into place
            os.chmod(tmp, (artifact / "manifest.json").stat().st_mode & 0o777)
            os.replace(tmp, artifact / e["path"])
    finally:
        for tmp in written:
            Path(tmp).unlink(missing_ok=True)
        for d in {Path(t).parent for t in written}:
            while d != artifact and not any(d.iterdir()):     # folders made for a build that failed
                d.rmdir()
                d = d.parent
    key, manifest = KEYS[backend], m.raw
    old = m.engines.get(key, {})
    stale = [s["path"] for s in old.get("stages", []) if s["path"] not in {e["path"] for e in entries}]
    for rel in stale:                                  # a previous build with more stages
        (artifact / rel).unlink(missing_ok=True)
        manifest.get("files", {}).pop(rel, None)
    entry = {"backend": backend, **extra(), "stages": entries, "plan": plan,
             "weights": m.weights, "build_seconds": round(time.perf_counter() - t0, 3)}
    manifest.setdefault("engines", {})[key] = entry
    record_files(artifact, manifest, [e["path"] for e in entries])
    return entry


def _ort_writer(manifest: Manifest, ranges: list):
    """For the ORT stages: (write(k, a, b, path) -> {}: stage k's lowered ONNX graph into path,
    extra() -> the entry's own fields)."""
    import onnx
    import onnxruntime

    from jambatrt.graph.onnx_export import check, load_onnx
    from jambatrt.graph.passes import PassSettings, ort_passes, run_passes
    from jambatrt.graph.passes.split_stages import split_stages

    artifact, cfg = manifest.artifact, manifest.config
    if not manifest.step.onnx:
        raise ArtifactError(f"{artifact}: the artifact has no model.onnx (re-run `jambatrt export`)")
    if manifest.dtype != "float32":
        raise InputError(f"{artifact}: the ONNX Runtime CPU engine runs float32 artifacts; this one is "
                         f"{manifest.dtype} (re-export with --dtype float32)")
    settings = PassSettings(attention="kernel", dtype=manifest.dtype)
    passes = ort_passes(settings)
    model = load_onnx(manifest.file(manifest.step.onnx), load_external_data=False)
    graphs = split_stages(model, [tuple(r) for r in ranges], cfg.num_hidden_layers, cfg.hidden_size)

    def write(k: int, a: int, b: int, path: Path) -> dict:
        onnx.save_model(run_passes(graphs[k], settings, passes), str(path))
        check(path)
        return {}

    return write, lambda: {"onnxruntime": onnxruntime.__version__, "settings": {"attention": "kernel"},
                           "passes": ["split_stages"] + [p.__name__ for p in passes]}


def _aoti_writer(manifest: Manifest, ranges: list):
    """For the AOTI stages: (write(k, a, b, path) -> {"python_ops"}: stage k's package into path,
    extra() -> the entry's own fields). The artifact's model (weights mapped from the store), each
    range exported as a StageProgram with the step program's dynamic dims, compiled for the device
    (cpu here, where the jamba ops are called back through Python: python_ops)."""
    from jambatrt.engines.aoti import compile_package, package_entry, resolve_device
    from jambatrt.export.trace import export_stage
    from jambatrt.export.weights import load_artifact_model

    device = resolve_device("auto")
    model = load_artifact_model(manifest.artifact, manifest)
    infos = []

    def write(k: int, a: int, b: int, path: Path) -> dict:
        ep = export_stage(model, a, b, max_seq=manifest.step.max_seq)
        infos.append(compile_package(ep, device, path))
        return {"python_ops": infos[-1]["fallback_ops"]}

    def extra() -> dict:
        out = package_entry(infos[0], device)
        out.pop("python_ops")                         # per stage
        return out

    return write, extra


class StageSession:
    """One stage's ONNX Runtime session (weights bound outside the graph, as OrtEngine does)."""

    def __init__(self, manifest: Manifest, stage: dict, threads: int | None = None):
        from jambatrt.engines.ort import load_session
        from jambatrt.plugins.cpu.ort_ops import release

        self.stage = stage
        path = manifest.file(stage["path"])
        self.session, _, keys = load_session(path, threads, kv_cache=None, what="stage")
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


def stage_session(manifest: Manifest, backend: str, stage: dict, threads: int | None = None):
    """One stage's runner for `backend` (ort | aoti): run(feeds by name) -> outputs by name, numpy in
    and out (StagedEngine in this process; deploy/stage_model.py in a Triton stage model)."""
    if backend == "aoti":
        from jambatrt.engines.aoti import AotiStageSession
        return AotiStageSession(manifest, manifest.engine(KEYS["aoti"]), stage)
    return StageSession(manifest, stage, threads)


class StagedEngine(Engine):
    """All stages of `engines["ort-stages"]` in this process, run in order (for tests, `generate`,
    `validate`; a server places each stage on its own device instead)."""

    backend = KEY
    build_options = "--backend ort --stages N"

    @classmethod
    def build(cls, artifact, **settings) -> dict:
        return build_stages(artifact, backend=cls.backend.removesuffix("-stages"), **settings)

    def __init__(self, artifact, manifest=None, threads: int | None = None):
        super().__init__(artifact, manifest)
        self.plan = self.entry["plan"]
        backend = self.backend.removesuffix("-stages")
        self.stages = [stage_session(self.manifest, backend, s, threads) for s in self.entry["stages"]]
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


class AotiStagedEngine(StagedEngine):
    """The AOTInductor stage packages of `engines["aoti-stages"]` (`build --backend aoti --stages N`)."""

    backend = KEYS["aoti"]
    build_options = "--backend aoti --stages N"


def staged_engine_class(backend: str) -> type[StagedEngine]:
    """The stage engines' class for a backend: ort -> StagedEngine, aoti -> AotiStagedEngine."""
    if backend not in KEYS:
        raise InputError(f"stage engines for backend {backend!r} (accepted: {', '.join(KEYS)})")
    return AotiStagedEngine if backend == "aoti" else StagedEngine
