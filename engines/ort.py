"""The ONNX Runtime engine: the artifact's model.onnx lowered by the ORT pass list, run on CPU with
our kernels registered as custom ops (onnxruntime-extensions) in domain `jamba`."""

from __future__ import annotations

import os
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jambatrt.artifact import artifact_file
from jambatrt.engines.base import Engine, settings_from_kwargs
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError

ENGINE = "model.ort.onnx"      # the lowered graph; its weights are the artifact's weights.safetensors


@dataclass(frozen=True)
class OrtSettings:
    """Every build setting, with its default, in one place."""

    attention: str = "kernel"          # "kernel": the jamba Attention op; "gqa": ONNX Runtime's GroupQueryAttention

    @classmethod
    def from_kwargs(cls, **kw) -> "OrtSettings":
        s = settings_from_kwargs(cls, "ort", kw)
        if s.attention not in ("kernel", "gqa"):
            raise InputError(f"attention={s.attention!r} (accepted: kernel, gqa)")
        return s


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
    # spinning ORT workers starve the numba/torch threads of our kernels on few cores
    so.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return so


def _initializer_array(t, weights_dir: Path) -> np.ndarray:
    """An initializer's values: mapped from its external data file (copy-on-write, so the array is
    writable for torch.from_numpy yet the file is never written), or decoded when stored inline."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    if not uses_external_data(t):
        return numpy_helper.to_array(t).copy()         # small, stored inline; a writable copy
    info = ExternalDataInfo(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    mapped = np.memmap(Path(weights_dir) / info.location, dtype=dtype, mode="c", offset=int(info.offset or 0),
                       shape=tuple(int(d) for d in t.dims))
    return mapped.view(np.ndarray)          # a plain array (numba, torch) that keeps the mapping alive


def map_expert_weights(model, weights_dir: Path) -> tuple:
    """Rebind `model` (loaded without external data; weights in `weights_dir`) for a session in this
    process (graph/passes/bind_weights.py): every MoEInt8 node whose four weights are initializers
    becomes MoEInt8Mapped(x, router_logits; top_k, expert_offset, weights=<key>), and every
    LinearInt8 node (--weights-int8) whose weight and scale are initializers becomes
    LinearInt8Mapped(x; weights=<key>), their weights mapped from the data file and registered in
    ort_ops.MAPPED_WEIGHTS under a fresh key. Returns (model, keys);
    `ort_ops.unmap_expert_weights(keys)` releases them."""
    from jambatrt.export.ops import SPECS
    from jambatrt.graph.passes.bind_weights import bind_weights
    from jambatrt.plugins.cpu.ort_ops import (LINEAR_INT8_MAPPED_OP, LINEAR_INT8_OP, MAPPED_OP, MAPPED_WEIGHTS,
                                              unmap_expert_weights)

    keys: list[str] = []

    def bind(node, tensors) -> str:
        key = f"{uuid.uuid4().hex}/{node.name}"
        MAPPED_WEIGHTS[key] = tuple(_initializer_array(t, weights_dir) for t in tensors)
        keys.append(key)
        return key

    try:
        model = bind_weights(model, {SPECS["moe_int8"].onnx_op_type: MAPPED_OP, LINEAR_INT8_OP: LINEAR_INT8_MAPPED_OP},
                             bind)
    except BaseException:
        unmap_expert_weights(keys)          # nothing stays registered for a session that never came
        raise
    return model, keys


def map_kv_caches(model) -> tuple:
    """Rebind `model` for a session in this process: every jamba CausalAttention node whose past
    KV are graph inputs and present KV graph outputs becomes CausalAttentionCached(q, k, v;
    cache=<key>) -> o over an in-place ort_ops.KVCache registered under a fresh key; those inputs
    and outputs leave the graph, so ONNX Runtime and the Python op boundary never copy the cache
    (decode time then stays flat in the context). Returns (model, {past input name: (key, "k"|"v")})."""
    import onnx.helper

    from jambatrt.export.ops import DOMAIN, SPECS
    from jambatrt.graph.passes._build import replace_nodes
    from jambatrt.plugins.cpu.ort_ops import CACHED_ATTENTION_OP, KV_CACHES, KVCache

    g = model.graph
    ins, outs = {i.name for i in g.input}, {o.name for o in g.output}
    cached: dict[str, tuple[str, str]] = {}
    gone: set[str] = set()
    others: dict[str, list] = {}         # other readers of a past input (the exporter's Shape for the batch)
    for n in g.node:
        if not (n.domain == DOMAIN and n.op_type == SPECS["attention"].onnx_op_type):
            for i in n.input:
                others.setdefault(i, []).append(n)

    def batch_shape(n) -> bool:          # Shape(past)[0:1]: the batch, which input_ids [B,L] gives too
        a = {x.name: onnx.helper.get_attribute_value(x) for x in n.attribute}
        return n.op_type == "Shape" and a.get("start", 0) == 0 and a.get("end") == 1

    def rewrite(node):
        if (node.domain != DOMAIN or node.op_type != SPECS["attention"].onnx_op_type or len(node.input) < 5
                or not {node.input[3], node.input[4]} <= ins or not {node.output[1], node.output[2]} <= outs
                or not all(batch_shape(n) for i in node.input[3:5] for n in others.get(i, []))):
            return None
        for i in node.input[3:5]:
            for n in others.get(i, []):
                n.input[0] = "input_ids"
        key = f"{uuid.uuid4().hex}/{node.name}"
        KV_CACHES[key] = KVCache()
        cached[node.input[3]], cached[node.input[4]] = (key, "k"), (key, "v")
        gone.update([node.input[3], node.input[4], node.output[1], node.output[2]])
        return [onnx.helper.make_node(CACHED_ATTENTION_OP, list(node.input[:3]), [node.output[0]], name=node.name,
                                      domain=DOMAIN, cache=key)]

    replace_nodes(g, rewrite)
    for field in (g.input, g.output):
        keep = [v for v in field if v.name not in gone]
        del field[:]
        field.extend(keep)
    return model, cached


class OrtEngine(Engine):
    backend = "ort"

    Settings = OrtSettings
    # at the artifact's root, not under engines/: ONNX Runtime and onnx.checker refuse external
    # data outside the model's own directory, symlinks included
    output = ENGINE

    @classmethod
    def _prepare(cls, artifact: Path, manifest: dict, s: OrtSettings) -> None:
        if manifest["dtype"] != "float32":
            # ORT's CPU provider has no bfloat16 MatMul/Gemm kernels; bf16 artifacts are for TensorRT.
            raise InputError(f"{artifact}: the ONNX Runtime CPU engine runs float32 artifacts; this one is "
                             f"{manifest['dtype']} (re-export with --dtype float32, or build --backend tensorrt)")

    @classmethod
    def _build(cls, artifact: Path, manifest: dict, s: OrtSettings, prepared: None, out: Path) -> dict:
        """Lower model.onnx with the ORT pass list into ENGINE beside it. The lowered graph's
        initializers keep pointing into the artifact's weights.safetensors: nothing is read or
        copied."""
        import onnx
        import onnxruntime

        from jambatrt.graph.onnx_export import check, load_onnx
        from jambatrt.graph.passes import PassSettings, ort_passes, run_passes

        settings = PassSettings(attention=s.attention, dtype=manifest["dtype"])
        step = manifest["programs"]["step"]
        model = load_onnx(artifact_file(artifact, manifest, step["onnx"]), load_external_data=False)
        passes = ort_passes(settings)
        model = run_passes(model, settings, passes)
        onnx.save_model(model, out)
        check(out)
        return {"path": ENGINE, "onnxruntime": onnxruntime.__version__, "passes": [p.__name__ for p in passes],
                "settings": {"attention": s.attention}, "weights": manifest["weights"]["path"]}

    def __init__(self, artifact, manifest=None, threads: int | None = None, map_weights: bool = True):
        """map_weights: run MoE layers with their expert weights mapped from the engine's data file
        (`map_expert_weights`) instead of handed over as op inputs, which
        onnxruntime-extensions copies on every call. The engine file is the same either way."""
        super().__init__(artifact, manifest)
        try:
            import onnx
            import onnxruntime as ort
        except ImportError:
            raise BackendUnavailable("onnxruntime not installed (pip install onnxruntime onnxruntime-extensions)") from None
        from jambatrt.plugins.cpu.ort_ops import unmap_expert_weights

        entry = self.manifest["engines"]["ort"]
        path = artifact_file(self.artifact, self.manifest, entry["path"])
        keys: list[str] = []
        try:
            so = _session_options(threads)
            self.kv_cached: dict[str, tuple[str, str]] = {}
            if map_weights:
                model, keys = map_expert_weights(onnx.load(str(path), load_external_data=False), path.parent)
                if entry["settings"]["attention"] == "kernel":
                    model, self.kv_cached = map_kv_caches(model)
                so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
                source = model.SerializeToString()
            else:
                source = str(path)
            self.session = ort.InferenceSession(source, so, providers=["CPUExecutionProvider"])
        except Exception as e:   # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
            unmap_expert_weights(keys)
            raise ArtifactError(f"{path}: ONNX Runtime cannot load the engine ({type(e).__name__}: {e})") from None
        self.mapped_weights = keys          # MAPPED_WEIGHTS keys of this session's MoE layers
        cache_keys = sorted({k for k, _ in self.kv_cached.values()})
        self._unmap = weakref.finalize(self, _release, keys, cache_keys)
        self.input_names = [i["name"] for i in self.step_program["inputs"]]      # the full state, in order
        self.output_names = [o["name"] for o in self.step_program["outputs"]]
        self.session_inputs = {i.name for i in self.session.get_inputs()}
        self.session_outputs = [o.name for o in self.session.get_outputs()]

    def run_step(self, input_ids, state):
        B, L = input_ids.shape
        if (B > 1 and L > 1 and self.manifest["engines"]["ort"]["settings"]["attention"] == "gqa"
                and self.check_state(state, B) > 0):
            # GroupQueryAttention's CPU kernel takes a multi-token chunk with past KV only at batch 1
            rows = [self._run(input_ids[b:b + 1], [t[b:b + 1] for t in state]) for b in range(B)]
            return (np.concatenate([r[0] for r in rows]),
                    [np.concatenate([r[1][i] for r in rows]) for i in range(len(state))])
        return self._run(input_ids, state)

    def close(self) -> None:
        self.session = None
        self._unmap()            # the mapped weights and KV caches go with the session

    def _run(self, input_ids, state):
        from jambatrt.plugins.cpu.ort_ops import KV_CACHES, run_checked   # raises OrtKernelError on kernel failures

        feeds = dict(zip(self.input_names, [input_ids, *state]))
        L = input_ids.shape[1]
        for name, (key, _) in self.kv_cached.items():        # in-place caches: reuse, or restart from the state
            if name.endswith(".k"):
                c, pk, pv = KV_CACHES[key], feeds[name], feeds[name[:-2] + ".v"]
                if c.k is None or c.views[0] is not pk or c.views[1] is not pv:
                    c.reset(pk, pv, pk.shape[1] + L)    # a state this engine did not hand out last
                c.reserve(c.length + L)
        outs = dict(zip(self.session_outputs, run_checked(self.session, self.session_outputs,
                                                          {n: feeds[n] for n in self.session_inputs})))
        for name, (key, part) in self.kv_cached.items():
            c = KV_CACHES[key]
            if part == "k":
                c.views = (c.k[:, :c.length], c.v[:, :c.length])
            outs[name.replace("past.", "present.", 1)] = c.views[0 if part == "k" else 1]
        return outs["logits"], [outs[n] for n in self.output_names[1:]]


def _release(weight_keys, cache_keys) -> None:
    from jambatrt.plugins.cpu.ort_ops import KV_CACHES, unmap_expert_weights
    unmap_expert_weights(weight_keys)
    for k in cache_keys:
        KV_CACHES.pop(k, None)
