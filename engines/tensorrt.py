"""The TensorRT engine: the artifact's model.onnx (the stateful step program: input_ids + past
state -> logits + present state) parsed with our `jamba` plugins registered (QDP, AOT: the
engine holds the Triton kernels' PTX, no Python at run time), built with two optimisation
profiles — prefill (1 .. chunk tokens, any past) and decode (1 token) — and run chunk by chunk
with the state carried, so no tensor ever reaches 2^31 elements (engines/chunking.py; stacked
expert weights over the limit are split into expert groups by graph/passes/split_expert_groups.py).
MoE layers become route + grouped-GEMM plugins (graph/passes/lower_moe_grouped.py) unless
`moe="fused"`. The weights are never loaded or copied during the build: the parser reads them from
the artifact's weights.safetensors.

Build needs TensorRT (>= 10.10 for AOT plugins) and a CUDA GPU; without either, `build` and
loading raise BackendUnavailable naming what is missing. Host memory: see build_host_memory."""

from __future__ import annotations

import dataclasses
import gc
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jambatrt.engines.base import Engine, settings_from_kwargs, to_numpy, to_torch
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError
from jambatrt.manifest import Manifest, Program

SUBDIR = "engines/tensorrt"
ENGINE_FILE = "model.plan"
TIMING_CACHE = "timing.cache"


@dataclass(frozen=True)
class TensorRTSettings:
    """Every build setting, with its default, in one place."""

    max_batch: int = 4                 # 256K context x 4 sequences keeps Mini's KV under 2^31 elements
    opt_batch: int = 1
    max_seq: int | None = None         # default: the step program's max_seq
    prefill_chunk: int | None = None   # default: the chunk plan for (max_batch, max_seq)
    chunk_cap: int = 8192              # longest chunk the plan may pick
    decode_opt_past: int = 4096        # past length the decode profile is tuned for
    strongly_typed: bool = True        # types from the ONNX: bf16 activations, fp32 SSM state, int8 experts
    bf16: bool = True                  # BF16 builder flag (only when not strongly typed)
    workspace_bytes: int = 8 << 30
    optimization_level: int = 3
    timing_cache: bool = True          # engines/tensorrt/timing.cache, reused by later builds
    moe: str = "grouped"               # "grouped": route + grouped GEMM plugins; "fused": one plugin per layer

    @classmethod
    def from_kwargs(cls, **kw) -> "TensorRTSettings":
        s = settings_from_kwargs(cls, "TensorRT", kw)
        if s.max_batch < 1 or not 1 <= s.opt_batch <= s.max_batch:
            raise InputError(f"max_batch={s.max_batch}, opt_batch={s.opt_batch} (accepted: 1 <= opt_batch <= max_batch)")
        if s.moe not in ("grouped", "fused"):
            raise InputError(f"moe={s.moe!r} (accepted: grouped, fused)")
        return s


# ---- pure planning (no TensorRT) -------------------------------------------------------------------
def optimization_profiles(step: Program, settings: TensorRTSettings, chunk: int, max_seq: int) -> list[dict]:
    """(min, opt, max) of every input of the step program, per profile. Dims are named in the
    manifest: batch, seq (new tokens), past (tokens in the KV state); others are fixed ints."""
    B = (1, settings.opt_batch, settings.max_batch)
    profiles = {
        "prefill": {"batch": B, "seq": (1, chunk, chunk), "past": (0, 0, max_seq - 1)},
        "decode": {"batch": B, "seq": (1, 1, 1), "past": (0, min(settings.decode_opt_past, max_seq - 1), max_seq - 1)},
    }
    out = []
    for name, dims in profiles.items():
        shapes = {}
        for spec in step.inputs:
            lo, opt, hi = [], [], []
            for d in spec.shape:
                r = dims[d] if isinstance(d, str) else (int(d),) * 3
                lo.append(r[0])
                opt.append(r[1])
                hi.append(r[2])
            shapes[spec.name] = {"min": lo, "opt": opt, "max": hi}
        out.append({"name": name, "shapes": shapes})
    return out


def plan_build(manifest: Manifest, settings: TensorRTSettings) -> dict:
    """The chunk plan, expert groups and profiles a build would use (checked before any TensorRT work)."""
    from jambatrt.engines.chunking import engine_chunk_plan
    from jambatrt.export.plan import moe_expert_groups

    cfg, max_seq, plan = engine_chunk_plan(manifest, settings.max_batch, settings.max_seq, settings.prefill_chunk,
                                           settings.chunk_cap)
    # stacked expert weights over the limit are split into expert groups by a graph pass
    # (graph/passes/split_expert_groups.py); any other weight over it cannot be built
    over = {n: v for n, v in plan.weights_over_limit.items() if not n.startswith("moe.")}
    if over:
        raise BackendUnavailable("TensorRT tensors hold fewer than 2^31 elements, but this model's "
                                 + ", ".join(f"{n} ({v:,} elements)" for n, v in over.items()))
    groups = moe_expert_groups(cfg) if cfg.num_moe_layers else []
    return {"max_seq": max_seq, "chunk_plan": plan.as_dict(), "expert_groups": [list(g) for g in groups],
            "profiles": optimization_profiles(manifest.step, settings, plan.chunk, max_seq)}


def build_host_memory(weight_bytes: int) -> dict:
    """Host memory a TensorRT build of a model whose weights take `weight_bytes` needs, as the build
    orders it: the parser holds every weight while the engine is built (its weights then live on the
    GPU), parser and network are freed, then the serialized plan (which embeds the weights) is made
    and written from TensorRT's buffer. So one copy of the weights is on the host at a time, never
    the parser's and the plan's together (2x) nor a bytes() copy of the plan on top (3x). TensorRT's
    own working memory (tactic timing, weight transforms) comes on top and is not estimated."""
    return {"parser_weights": weight_bytes, "serialized_plan": weight_bytes, "peak": weight_bytes,
            "peak_if_held_together": 2 * weight_bytes}


def write_buffer(path: Path, buf) -> None:
    """Write a buffer (TensorRT's IHostMemory, bytes, ...) to `path` without copying it."""
    with open(path, "wb") as f:
        f.write(memoryview(buf))


# ---- TensorRT side ---------------------------------------------------------------------------------
def _require_gpu():
    try:
        import torch
    except ImportError:
        raise BackendUnavailable("torch not installed (the TensorRT runner keeps its buffers in torch CUDA tensors)"
                                 ) from None
    if not torch.cuda.is_available():
        raise BackendUnavailable("no CUDA GPU visible (TensorRT builds and runs engines on a GPU)")
    return torch


def _logger(trt):
    return trt.Logger(trt.Logger.WARNING)


def _lowered_onnx(manifest: Manifest, moe: str) -> tuple[bytes, Path, list[str]]:
    """The step model through the TensorRT pass list (expert groups under 2^31 elements, MoE as
    route + grouped-GEMM plugins unless moe="fused", absent optional inputs made explicit: plugins
    take a fixed number of inputs, shapes inferred, the memory-flat check), serialized without its weights: they stay in the artifact's external data
    file, which the parser reads relative to the returned model path (nothing of a 50 GB model is
    loaded or copied here). Returns (graph bytes, path the parser resolves weights from, pass names)."""
    from jambatrt.graph.onnx_export import load_onnx
    from jambatrt.graph.passes import PassSettings, run_passes, tensorrt_passes
    settings = PassSettings(dtype=manifest.dtype, moe=moe)
    passes = tensorrt_passes(settings)
    source = manifest.file(manifest.step.onnx)
    model = run_passes(load_onnx(source, load_external_data=False), settings, passes)
    return model.SerializeToString(), source, [p.__name__ for p in passes]


class TensorRTEngine(Engine):
    backend = "tensorrt"

    Settings = TensorRTSettings
    output = SUBDIR

    @classmethod
    def _prepare(cls, artifact: Path, manifest: Manifest, s: TensorRTSettings) -> tuple:
        from jambatrt.plugins.tensorrt import register_all, require_tensorrt

        planned = plan_build(manifest, s)
        trt, _ = require_tensorrt()
        torch = _require_gpu()
        return planned, trt, torch, register_all()

    @classmethod
    def _build(cls, artifact: Path, manifest: Manifest, s: TensorRTSettings, prepared: tuple, tmp: Path) -> dict:
        planned, trt, torch, plugin_ids = prepared
        dest = artifact / SUBDIR      # the old engine (and its timing cache) stay until this one is whole
        model_bytes, model_path, pass_names = _lowered_onnx(manifest, s.moe)
        logger = _logger(trt)
        builder = trt.Builder(logger)
        flags = 0
        if s.strongly_typed:
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse(model_bytes, str(model_path)):     # weights: the artifact's weights.safetensors
            errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
            raise ArtifactError(f"{model_path}: TensorRT's ONNX parser failed:\n  " + "\n  ".join(errors))
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, s.workspace_bytes)
        config.builder_optimization_level = s.optimization_level
        if not s.strongly_typed and s.bf16:
            config.set_flag(trt.BuilderFlag.BF16)
        cache_path = dest / TIMING_CACHE
        if s.timing_cache:
            blob = cache_path.read_bytes() if cache_path.is_file() else b""
            config.set_timing_cache(config.create_timing_cache(blob), ignore_mismatch=False)
        for prof in planned["profiles"]:
            p = builder.create_optimization_profile()
            for name, r in prof["shapes"].items():
                p.set_shape(name, r["min"], r["opt"], r["max"])
            config.add_optimization_profile(p)
        # Host memory (build_host_memory): the parser holds every weight it read from the data
        # file (~60 GB for Mini) until the engine is built. Build the engine (its weights on the
        # GPU), free parser and network, and only then serialise: the host never holds the
        # parsed weights and the plan at once. The plan is written from TensorRT's buffer
        # (bytes(plan) would copy it again).
        engine = builder.build_engine_with_config(network, config)
        if engine is None:
            raise BackendUnavailable("TensorRT could not build the engine (see the TensorRT log above)")
        cache = config.get_timing_cache().serialize() if s.timing_cache else None
        del parser, network, config, builder
        gc.collect()
        serialized = engine.serialize()
        del engine
        write_buffer(tmp / ENGINE_FILE, serialized)
        del serialized
        if cache is not None:
            write_buffer(tmp / TIMING_CACHE, cache)
        major, minor = torch.cuda.get_device_capability()
        return {"path": f"{SUBDIR}/{ENGINE_FILE}", "tensorrt": trt.__version__,
                "gpu": {"name": torch.cuda.get_device_name(), "arch": f"sm_{major}{minor}"},
                "settings": dataclasses.asdict(s), "max_seq": planned["max_seq"],
                "chunk_plan": planned["chunk_plan"], "expert_groups": planned["expert_groups"],
                "passes": pass_names, "profiles": [p["name"] for p in planned["profiles"]], "plugins": plugin_ids}

    # ---- running -------------------------------------------------------------------------------
    def __init__(self, artifact, manifest=None):
        super().__init__(artifact, manifest)
        from jambatrt.plugins.tensorrt import require_tensorrt

        trt, _ = require_tensorrt()
        self.torch = torch = _require_gpu()
        self.trt = trt
        built_on = self.entry["gpu"]["arch"]
        major, minor = torch.cuda.get_device_capability()
        if built_on != f"sm_{major}{minor}":
            raise BackendUnavailable(f"the engine was built for {built_on} ({self.entry['gpu']['name']}); this GPU is "
                                     f"sm_{major}{minor}: rebuild it here (`jambatrt build {artifact} --backend tensorrt`)")
        path = self.artifact / self.entry["path"]
        self.runtime = trt.Runtime(_logger(trt))
        self.engine = self.runtime.deserialize_cuda_engine(path.read_bytes())
        if self.engine is None:
            raise ArtifactError(f"{path}: TensorRT cannot deserialize the engine (built with TensorRT "
                                f"{self.entry['tensorrt']}, running {trt.__version__})")
        self.stream = torch.cuda.Stream()
        self.contexts = {}
        for i, name in enumerate(self.entry["profiles"]):
            ctx = self.engine.create_execution_context()
            ctx.set_optimization_profile_async(i, self.stream.cuda_stream)
            self.contexts[name] = ctx
        self.stream.synchronize()
        io = [self.engine.get_tensor_name(i) for i in range(self.engine.num_io_tensors)]
        engine_in = {n for n in io if self.engine.get_tensor_mode(n) == trt.TensorIOMode.INPUT}
        engine_out = set(io) - engine_in
        # bound by name, in the step program's order (the engine may list them otherwise)
        self.input_names = [i.name for i in self.step_program.inputs]
        self.output_names = [o.name for o in self.step_program.outputs]
        if engine_in != set(self.input_names) or engine_out != set(self.output_names):
            raise ArtifactError(f"{path}: the engine's inputs/outputs differ from the step program's in "
                                f"{sorted(engine_in ^ set(self.input_names) | engine_out ^ set(self.output_names))[:4]} "
                                "(rebuild the engine)")

    def default_chunk(self, batch: int) -> int:
        return int(self.entry["chunk_plan"]["chunk"])

    def run_step(self, input_ids, state):
        logits, new_state = self.run_step_torch(to_torch(np.asarray(input_ids, dtype=np.int64), "cuda"),
                                                [to_torch(a, "cuda") for a in state])
        return to_numpy(logits), [to_numpy(t) for t in new_state]

    def run_step_torch(self, input_ids, state: list) -> tuple:
        """run_step on torch tensors on the GPU: ids [B,L] int64 and the state -> (logits, new state) as
        GPU tensors (no host copies: the Triton model keeps the state on the device between requests)."""
        torch, trt = self.torch, self.trt
        B, L = input_ids.shape
        if B > self.entry["settings"]["max_batch"]:
            raise InputError(f"batch {B} exceeds the engine's max_batch {self.entry['settings']['max_batch']} "
                             "(rebuild with a larger max_batch)")
        ctx = self.contexts["decode" if L == 1 else "prefill"]
        keep = []   # device buffers stay alive until the step has run
        for name, t in zip(self.input_names, [input_ids, *state]):
            t = t.to("cuda").contiguous()
            ctx.set_input_shape(name, tuple(t.shape))
            if t.numel() == 0:   # an empty past: give TensorRT a valid address anyway
                t = torch.empty(1, dtype=t.dtype, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            keep.append(t)
        outs = []
        for name in self.output_names:
            shape = tuple(ctx.get_tensor_shape(name))
            dtype = {trt.float32: torch.float32, trt.bfloat16: torch.bfloat16, trt.float16: torch.float16,
                     trt.int64: torch.int64, trt.int32: torch.int32}[self.engine.get_tensor_dtype(name)]
            t = torch.empty(shape if all(d > 0 for d in shape) else (1,), dtype=dtype, device="cuda")
            ctx.set_tensor_address(name, t.data_ptr())
            outs.append((t, shape))
        # the step runs on self.stream: wait for the copies made on the current stream first
        self.stream.wait_stream(torch.cuda.current_stream())
        if not ctx.execute_async_v3(self.stream.cuda_stream):
            raise BackendUnavailable("TensorRT failed to run the step (see the TensorRT log)")
        self.stream.synchronize()
        got = [t.reshape(-1)[:int(np.prod(shape))].reshape(shape) for t, shape in outs]
        return got[0], got[1:]

    def close(self) -> None:
        self.contexts = {}
        self.engine = None

