"""The AOTInductor engine: the artifact's step program (step.pt2, the same StepProgram model.onnx
comes from, bound to the artifact's weights) compiled by `torch._inductor.aoti_compile_and_package` into one
package, engines/aoti/model.pt2, with dynamic batch, sequence and past; run with
`torch._inductor.aoti_load_package`, chunk by chunk as the TensorRT engine (engines/chunking.py).
A GPU engine for machines where TensorRT cannot be installed: it needs only torch (and triton at
build time).

How the jamba:: ops get into the package depends on the device:
- cuda: `plugins.gpu.torch_ops.register_cuda_kernels()` lets Inductor trace each op into its
  Triton kernels (wrap_triton), which it compiles into the package as cubins: no Python and no
  jamba:: op is called at run time. The build checks that none is left as a fallback call.
- cpu: AOTInductor compiles the ops as fallback calls through its proxy executor, which looks the
  op up in the dispatcher and calls its Python implementation (the CPU kernels of plugins/cpu, or
  `<op>_ref`): the package runs in a Python process that has imported jambatrt (this engine, the
  Triton Python backend), not from C++ alone. Inductor lays out its buffers from each op's fake
  (meta) implementation, so the real outputs must have the fake outputs' strides: every fake and
  every kernel returns contiguous outputs (export/ops), so the package calls the jamba:: ops
  themselves. (Packages from before that called them through `jamba_aoti::` twins; they are refused
  with a rebuild hint.)

Build needs a C++ compiler (both devices) and, for cuda, a CUDA GPU of the arch that will run it;
without one, building a cuda package raises BackendUnavailable("no CUDA GPU: ...")."""

from __future__ import annotations

import dataclasses
import json
import time
import warnings
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jambatrt.engines.base import Engine, settings_from_kwargs, to_numpy, to_torch
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError
from jambatrt.manifest import Manifest

SUBDIR = "engines/aoti"
PACKAGE = "model.pt2"
DEVICES = ("auto", "cuda", "cpu")


@dataclass(frozen=True)
class AotiSettings:
    """Every build setting, with its default, in one place."""

    device: str = "auto"               # cuda | cpu | auto (cuda when a CUDA GPU is visible, else cpu)
    max_batch: int = 4                 # as TensorRT: 256K context x 4 sequences keeps Mini's KV under 2^31
    max_seq: int | None = None         # default: the step program's max_seq
    prefill_chunk: int | None = None   # default: the chunk plan for (max_batch, max_seq)
    chunk_cap: int = 8192              # longest chunk the plan may pick
    max_autotune: bool = False         # Inductor's max-autotune for its own GEMMs/kernels (slow builds)
    # round bf16 intermediates where eager does (Inductor otherwise keeps fused pointwise chains in
    # fp32): the package then matches the eager model it is validated against (tiny bf16 on CPU:
    # max |diff| 4.2e-3 -> 0 at 17 tokens)
    emulate_precision_casts: bool = True

    def inductor_configs(self) -> dict:
        return {"max_autotune": self.max_autotune, "emulate_precision_casts": self.emulate_precision_casts}

    @classmethod
    def from_kwargs(cls, **kw) -> "AotiSettings":
        s = settings_from_kwargs(cls, "aoti", kw)
        if s.device not in DEVICES:
            raise InputError(f"device={s.device!r} (accepted: {', '.join(DEVICES)})")
        if s.max_batch < 1:
            raise InputError(f"max_batch={s.max_batch} (accepted: >= 1)")
        return s


# ---- pieces that need no GPU ----------------------------------------------------------------------
def _torch():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("torch is not installed (the aoti backend compiles with torch's Inductor)") from None
    return torch


def resolve_device(device: str) -> str:
    """auto -> cuda when a CUDA GPU is visible, else cpu; cuda without a GPU -> BackendUnavailable."""
    torch = _torch()
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise BackendUnavailable(f"no CUDA GPU: torch {torch.__version__} sees no CUDA device "
                                 f"(cuda built: {torch.version.cuda or 'no'}); a cuda AOTInductor package is "
                                 "compiled on the GPU that will run it (build with device=cpu here, or on a GPU)")
    return device


def plan(manifest: Manifest, settings: AotiSettings) -> dict:
    """The chunk plan the engine prefills with (the Triton kernels index with int32 offsets, so
    every activation tensor stays under 2^31 elements, as for TensorRT)."""
    from jambatrt.engines.chunking import engine_chunk_plan

    _, max_seq, p = engine_chunk_plan(manifest, settings.max_batch, settings.max_seq, settings.prefill_chunk,
                                      settings.chunk_cap)
    return {"max_seq": max_seq, "chunk_plan": p.as_dict()}


def package_contents(path: str | Path) -> dict:
    """What an AOTInductor package holds: the ops it calls back through the proxy executor (in
    order of the calls), which of our Triton kernels it compiled in, and its build metadata."""
    from jambatrt.plugins.gpu.torch_ops import traced_kernels

    fallback, meta = [], {}
    with zipfile.ZipFile(path) as z:
        sources = "\n".join(z.namelist())          # kernel binaries may be named after the kernel
        for name in sorted(z.namelist()):
            if name.endswith(".wrapper.json"):
                fallback += [n["node"]["target"] for n in json.loads(z.read(name)).get("nodes", [])]
            elif name.endswith(("wrapper.cpp", ".cpp", ".py")) and "/aotinductor/" in name:
                sources += z.read(name).decode("utf-8", "replace")
            elif name.endswith("wrapper_metadata.json"):
                meta = json.loads(z.read(name))
    kernels = sorted({k for ks in traced_kernels().values() for k in ks if k in sources})
    return {"fallback_ops": fallback, "triton_kernels": kernels, "metadata": meta}


def compile_package(ep, device: str, package_path: str | Path, inductor_configs: dict | None = None) -> dict:
    """Compile an ExportedProgram of the step program into an AOTInductor package for `device`
    (cpu | cuda). Returns package_contents(). Raises BackendUnavailable when a cuda package would
    call a jamba:: op back through Python (its Triton kernels were not compiled in)."""
    torch = _torch()
    device = resolve_device(device)
    if device == "cuda":
        from jambatrt.plugins.gpu.torch_ops import cuda_unavailable_reason, register_cuda_kernels
        if not register_cuda_kernels():
            raise BackendUnavailable(f"the Triton kernels cannot be compiled in: {cuda_unavailable_reason()}")
        try:
            from torch.export.passes import move_to_device_pass
        except ImportError:
            raise BackendUnavailable(f"torch {torch.__version__} has no torch.export.passes.move_to_device_pass "
                                     "(torch >= 2.6 needed for a cuda package)") from None
        ep = move_to_device_pass(ep, "cuda")
    configs = dict(AotiSettings().inductor_configs() if inductor_configs is None else inductor_configs)
    with warnings.catch_warnings():     # torch's own pytree deprecation noise, once per graph module
        warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
        path = torch._inductor.aoti_compile_and_package(ep, package_path=str(package_path),
                                                        inductor_configs=configs)
    info = package_contents(path)
    python_ops = [t for t in info["fallback_ops"] if t.startswith("jamba::")]
    if device == "cuda" and python_ops:
        raise BackendUnavailable(f"the cuda package would call {sorted(set(python_ops))} back through Python: "
                                 "their Triton kernels were not traced in (register_cuda_kernels)")
    return info


def load_step_program(manifest: Manifest):
    """The artifact's step program (step.pt2: StepProgram, torch.export, dynamic batch/seq/past, the
    program model.onnx was made from), its weights bound from the artifact's store."""
    from jambatrt.export.weights import load_program

    if not manifest.step.pt2:
        raise ArtifactError(f"{manifest.artifact}/manifest.json has no step program (re-run `jambatrt export`)")
    return load_program(manifest.artifact, manifest.step.pt2)


def _versions() -> dict:
    import platform

    torch = _torch()
    out = {"torch": torch.__version__, "python": platform.python_version()}
    try:
        import triton
        out["triton"] = triton.__version__
    except ImportError:
        out["triton"] = None
    return out


def load_package(path: Path, entry: dict, rebuild: str):
    """torch's runner of the AOTInductor package at `path`, built as the manifest `entry` (aoti, or
    aoti-stages) says; BackendUnavailable when it was built by another torch or for another GPU
    (`rebuild`: the command that rebuilds it), ArtifactError when torch cannot load it."""
    torch = _torch()
    built, here = entry.get("torch", "?"), torch.__version__
    if built.split("+")[0].split(".")[:2] != here.split("+")[0].split(".")[:2]:
        raise BackendUnavailable(f"the aoti package was compiled by torch {built}; this is torch {here}: rebuild "
                                 f"it here (`{rebuild}`)")
    if entry["device"] == "cuda":
        resolve_device("cuda")
        major, minor = torch.cuda.get_device_capability()
        if entry["gpu"]["arch"] != f"sm_{major}{minor}":
            gpu = entry["gpu"]
            raise BackendUnavailable(f"the aoti package was built for {gpu['arch']} ({gpu['name']}); this GPU is "
                                     f"sm_{major}{minor}: rebuild it here")
    else:
        if any(o.startswith("jamba_aoti::") for o in entry.get("python_ops", [])):
            raise BackendUnavailable("the aoti package calls the ops through jamba_aoti:: twins, which this jambatrt "
                                     f"no longer defines: rebuild it (`{rebuild}`)")
        # before loading: the package resolves the ops when it is loaded (kernels registered
        # after a load were seen not to be picked up by it)
        try:    # the proxy executor calls the ops: give them the fast CPU kernels where they exist
            from jambatrt.plugins.cpu import register_torch_kernels
            register_torch_kernels()
        except ImportError:
            pass
    try:
        with warnings.catch_warnings():     # torch's own pytree deprecation noise when unpickling
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            return torch._inductor.aoti_load_package(str(path))
    except Exception as e:   # torch raises RuntimeError / zipfile errors for a bad package
        raise ArtifactError(f"{path}: torch cannot load the AOTInductor package ({type(e).__name__}: {e})") from None


def package_entry(info: dict, device: str) -> dict:
    """The manifest fields of a compiled package (compile_package's info) that loading checks and
    that say what it runs: device, versions, GPU, the ops it calls back through Python."""
    torch = _torch()
    entry = {"device": device, **_versions(), "triton_kernels": info["triton_kernels"],
             "python_ops": info["fallback_ops"],
             "cpu_isa": info["metadata"].get("AOTI_CPU_ISA") if device == "cpu" else None}
    if device == "cuda":
        major, minor = torch.cuda.get_device_capability()
        entry["gpu"] = {"name": torch.cuda.get_device_name(), "arch": f"sm_{major}{minor}", "cuda": torch.version.cuda}
    return entry


class AotiStageSession:
    """One pipeline stage's AOTInductor package (engines/staged.py, `build --backend aoti --stages N`):
    run(feeds by name) -> outputs by name, numpy in and out, as the ORT StageSession."""

    def __init__(self, manifest: Manifest, entry: dict, stage: dict):
        self.torch = _torch()
        self.device = entry["device"]
        self.stage = stage
        self.runner = load_package(manifest.file(stage["path"]), entry,
                                   f"jambatrt build {manifest.artifact} --backend aoti --stages N")
        self.input_names = [s["name"] for s in stage["inputs"]]
        self.output_names = [s["name"] for s in stage["outputs"]]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        x, *state = [to_torch(np.ascontiguousarray(feeds[n]), self.device) for n in self.input_names]
        with self.torch.inference_mode():
            outs = self.runner(x, state)
        return {n: to_numpy(t) for n, t in zip(self.output_names, outs)}

    def close(self) -> None:
        self.runner = None


class AotiEngine(Engine):
    backend = "aoti"

    Settings = AotiSettings
    output = SUBDIR
    reads_onnx = False               # the step program step.pt2

    @classmethod
    def _prepare(cls, artifact: Path, manifest: Manifest, s: AotiSettings) -> tuple:
        return plan(manifest, s), resolve_device(s.device)

    @classmethod
    def _build(cls, artifact: Path, manifest: Manifest, s: AotiSettings, prepared: tuple, tmp: Path) -> dict:
        planned, device = prepared
        t0 = time.perf_counter()
        with warnings.catch_warnings():     # torch's own pytree deprecation noise
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            # the program admits batch 1..64 and the artifact's max_seq; run_step enforces max_batch
            ep = load_step_program(manifest)
        t_export = time.perf_counter() - t0
        info = compile_package(ep, device, tmp / PACKAGE, inductor_configs=s.inductor_configs())
        # cuda: the Triton kernels inside the package; cpu: the ops called back through Python
        return {"path": f"{SUBDIR}/{PACKAGE}", **package_entry(info, device),
                "settings": {**dataclasses.asdict(s), "device": device}, "max_seq": planned["max_seq"],
                "max_batch": s.max_batch, "chunk_plan": planned["chunk_plan"], "export_seconds": round(t_export, 3)}

    # ---- running -------------------------------------------------------------------------------
    def __init__(self, artifact, manifest=None):
        super().__init__(artifact, manifest)
        self.torch = _torch()
        self.device = self.entry["device"]
        self.runner = load_package(self.artifact / self.entry["path"], self.entry,
                                   f"jambatrt build {artifact} --backend aoti")

    def default_chunk(self, batch: int) -> int:
        return int(self.entry["chunk_plan"]["chunk"])

    def run_step(self, input_ids, state):
        B = input_ids.shape[0]
        if B > self.entry["max_batch"]:
            raise InputError(f"batch {B} exceeds the aoti engine's max_batch {self.entry['max_batch']} "
                             "(rebuild with a larger max_batch)")
        with self.torch.inference_mode():
            logits, new_state = self.run_step_torch(to_torch(np.asarray(input_ids, dtype=np.int64), self.device),
                                                    [to_torch(s, self.device) for s in state])
            return to_numpy(logits), [to_numpy(t) for t in new_state]

    def run_step_torch(self, input_ids, state: list) -> tuple:
        """run_step on torch tensors (already checked): ids [B,L] int64 and the state on the engine's
        device -> (logits, new state) as torch tensors on that device (no host copies; the Triton
        model uses this with DLPack)."""
        outs = self.runner(input_ids, list(state))
        return outs[0], list(outs[1:])

    def close(self) -> None:
        self.runner = None
