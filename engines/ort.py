"""The ONNX Runtime engine: the artifact's model.onnx lowered by the ORT pass list, run on CPU with
our kernels registered as custom ops (onnxruntime-extensions) in domain `jamba`."""

from __future__ import annotations

import functools
import math
import os
import re
import weakref
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from jambatrt.engines.base import Engine, settings_from_kwargs
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError
from jambatrt.manifest import Manifest
from jambatrt.plugins.cpu.ort_ops import trim_heap

ENGINE = "model.ort.onnx"      # the lowered graph; its weights are the artifact's weights.safetensors
KV_CACHES = ("float32", "int8")  # the in-place KV cache's storage (KVCache)
DECODES = ("native", "graph")      # what runs a decode step (OrtSettings.decode)


@dataclass(frozen=True)
class OrtSettings:
    """Every build setting, with its default, in one place."""

    attention: str = "kernel"          # "kernel": the jamba Attention op; "gqa": ONNX Runtime's GroupQueryAttention
    # the GEMMs of the int8 kernels over prefill chunks (--weights-int8 artifacts): "float32", or
    # "bfloat16" on CPUs with bf16 dot products (AVX512-BF16, AMX): ~2.8x their rate, ~2^-8 relative
    # error (plugins/cpu/linear_int8.py); decode steps stay float32
    prefill_compute: str = "float32"
    # the attention layers' in-place KV cache (attention="kernel"): "float32", or "int8" with a float32
    # scale per token, head and 32 channels (plugins/cpu/kv_int8.py): 3.6x less memory and bytes read
    kv_cache: str = "float32"
    # decode steps (one token): "native", every layer through plugins/cpu/decode_step.py's kernels with no
    # ONNX Runtime graph in between (the graph runs prefill; models the step does not cover decode through
    # it), or "graph": through the ONNX Runtime graph too
    decode: str = "native"

    @classmethod
    def from_kwargs(cls, **kw) -> "OrtSettings":
        from jambatrt.plugins.cpu.linear_int8 import COMPUTES
        s = settings_from_kwargs(cls, "ort", kw)
        if s.attention not in ("kernel", "gqa"):
            raise InputError(f"attention={s.attention!r} (accepted: kernel, gqa)")
        if s.prefill_compute not in COMPUTES:
            raise InputError(f"prefill_compute={s.prefill_compute!r} (accepted: {', '.join(COMPUTES)})")
        if s.kv_cache not in KV_CACHES:
            raise InputError(f"kv_cache={s.kv_cache!r} (accepted: {', '.join(KV_CACHES)})")
        if s.decode not in DECODES:
            raise InputError(f"decode={s.decode!r} (accepted: {', '.join(DECODES)})")
        if s.kv_cache != "float32" and s.attention != "kernel":
            raise InputError(f"kv_cache={s.kv_cache} needs attention=kernel: com.microsoft::GroupQueryAttention keeps "
                             "its float32 KV in the graph (accepted with attention=gqa: kv_cache=float32)")
        return s


def cpu_has_bf16() -> bool:
    """Whether this CPU has bf16 dot-product instructions (AVX512-BF16 or AMX), as oneDNN detects them."""
    import torch
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


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


@functools.cache
def _prefill_run_options():
    """Run options of a multi-token run: ONNX Runtime's CPU arena gives back what it grew for the run's
    intermediate tensors when the run ends (a chunk's activations: hundreds of MB at 2048 tokens of the peer
    preset), instead of holding it through the decode that follows."""
    import onnxruntime as ort
    ro = ort.RunOptions()
    ro.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")
    return ro


def _initializer_array(t, weights_dir: Path, maps: dict | None = None) -> np.ndarray:
    """An initializer's values: mapped from its external data file (copy-on-write, so the array is
    writable for torch.from_numpy yet the file is never written), or decoded when stored inline.
    maps {path: mmap}: files already mapped (the engine's weight store, which its native decode step
    reads too: one mapping, so resident pages are not counted twice)."""
    from onnx import helper, numpy_helper
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data
    if not uses_external_data(t):
        return numpy_helper.to_array(t).copy()         # small, stored inline; a writable copy
    info = ExternalDataInfo(t)
    dtype = np.dtype(helper.tensor_dtype_to_np_dtype(t.data_type))
    shape = tuple(int(d) for d in t.dims)
    shared = (maps or {}).get((Path(weights_dir) / info.location).resolve())
    if shared is not None:
        return np.frombuffer(shared, dtype=dtype, count=math.prod(shape), offset=int(info.offset or 0)).reshape(shape)
    mapped = np.memmap(Path(weights_dir) / info.location, dtype=dtype, mode="c", offset=int(info.offset or 0),
                       shape=shape)
    return mapped.view(np.ndarray)          # a plain array (numba, torch) that keeps the mapping alive


class KVCache:
    """Preallocated, in-place KV cache of one attention layer, bound to a session's
    CausalAttentionCached node (graph/passes/bind_kv_caches.py; the op's body is in
    plugins/cpu/attention.py): k, v [B, capacity, Hkv, d] buffers whose first `length` positions
    hold the past, float32, or int8 with float32 scales ks, vs [B, capacity, Hkv, G]
    (`dtype="int8"`, plugins/cpu/kv_int8.py). An int8 cache takes the blocked layout (kv_int8.py) where
    the AVX512-VNNI decode kernel reads it (`layout` None: decided at the first allocation; "rows" or
    "blocked" to choose). The engine sizes them before a run; the op appends the step's keys and values
    and attends over the first length + L positions, so no step copies the cache (ONNX Runtime never
    sees it)."""

    def __init__(self, dtype: str = "float32", layout: str | None = None):
        if dtype not in KV_CACHES:
            raise InputError(f"KV cache dtype {dtype!r} (accepted: {', '.join(KV_CACHES)})")
        if layout not in (None, "rows", "blocked") or (layout == "blocked" and dtype != "int8"):
            raise InputError(f"KV cache layout {layout!r} for {dtype} (accepted: rows; blocked for int8)")
        self.dtype, self.layout = dtype, layout
        self.k = self.v = self.ks = self.vs = None
        self.length = 0
        self.views = (None, None)       # the (k, v) state tensors the engine last handed out

    @property
    def blocked(self) -> bool:
        return self.layout == "blocked"

    @property
    def capacity(self) -> int:
        """Positions the buffers hold room for (0 before the first run)."""
        from jambatrt.plugins.cpu.kv_int8 import BLOCK
        return 0 if self.k is None else self.k.shape[1] * (BLOCK if self.blocked else 1)

    def _alloc(self, B: int, cap: int, Hkv: int, d: int) -> tuple:
        if self.dtype == "float32":
            return np.empty((B, cap, Hkv, d), np.float32), np.empty((B, cap, Hkv, d), np.float32), None, None
        from jambatrt.plugins.cpu.kv_int8 import blocked_alloc, blocked_fits, kv_groups
        if self.layout is None:
            from jambatrt.plugins.cpu.attention import blocked_kernel
            self.layout = "blocked" if blocked_fits(d) and blocked_kernel() else "rows"
        if self.blocked:
            if not blocked_fits(d):
                raise InputError(f"KV cache layout blocked for head dimension {d} (accepted: multiples of 32 up to 256)")
            return blocked_alloc(B, cap, Hkv, d)
        G = kv_groups(d)
        return (np.empty((B, cap, Hkv, d), np.int8), np.empty((B, cap, Hkv, d), np.int8),
                np.empty((B, cap, Hkv, G), np.float32), np.empty((B, cap, Hkv, G), np.float32))

    def _move(self, bufs: tuple, P: int) -> None:
        """The first P positions of this cache into bufs (a larger allocation), which it then uses."""
        for new, old in zip(bufs, (self.k, self.v, self.ks, self.vs)):
            if new is not None:
                n = old.shape[1] if self.blocked else P      # blocked: every block (a prefix of blocks)
                new[:, :n] = old[:, :n]
        self.k, self.v, self.ks, self.vs = bufs

    def reset(self, past_k, past_v, need: int) -> None:
        """Start over from a state this cache did not hand out: arrays (quantised here for int8), or
        an int8 cache's QuantizedKV (its values taken as they are)."""
        from jambatrt.plugins.cpu.kv_int8 import QuantizedKV, kv_groups
        B, P, Hkv, d = past_k.shape
        self.k, self.v, self.ks, self.vs = self._alloc(B, max(need, 2 * P, 256), Hkv, d)
        self.length = 0
        if self.dtype == "float32":
            self.k[:, :P], self.v[:, :P] = past_k, past_v
        elif (isinstance(past_k, QuantizedKV) and isinstance(past_v, QuantizedKV)
              and past_k.groups == past_v.groups == kv_groups(d)):
            self._write(0, *past_k.rows(), *past_v.rows())
        else:
            self.append(np.asarray(past_k, np.float32), np.asarray(past_v, np.float32))
        self.length = P

    def reserve(self, need: int) -> None:
        """Room for `need` positions; grows by doubling (amortised O(1) copies per token)."""
        if need > self.capacity:
            B, Hkv = self.k.shape[0], self.k.shape[2]
            d = 4 * self.k.shape[3] if self.blocked else self.k.shape[3]
            self._move(self._alloc(B, max(need, 2 * self.capacity), Hkv, d), self.length)

    def _write(self, P: int, qk, sk, qv, sv) -> None:
        if self.blocked:
            from jambatrt.plugins.cpu.kv_int8 import blocked_write
            blocked_write((self.k, self.v, self.ks, self.vs), P, qk, sk, qv, sv)
            return
        L = qk.shape[1]
        self.k[:, P:P + L], self.ks[:, P:P + L], self.v[:, P:P + L], self.vs[:, P:P + L] = qk, sk, qv, sv

    def append(self, k: np.ndarray, v: np.ndarray) -> None:
        """Writes k, v [B, L, Hkv, d] at positions length..length+L-1 (quantised for int8); `length`
        is the caller's to advance."""
        P, L = self.length, k.shape[1]
        if self.dtype == "float32":
            self.k[:, P:P + L], self.v[:, P:P + L] = k, v
            return
        from jambatrt.plugins.cpu.kv_int8 import quantize_kv
        self._write(P, *quantize_kv(k), *quantize_kv(v))

    def present(self, n: int) -> tuple:
        """The first n positions as the attention kernels take them: (k, v, ks, vs); scales None for
        float32; a blocked cache's keys and values as QuantizedKV (scales None)."""
        if self.dtype == "float32":
            return self.k[:, :n], self.v[:, :n], None, None
        if self.blocked:
            from jambatrt.plugins.cpu.kv_int8 import QuantizedKV
            arrays = (self.k, self.v, self.ks, self.vs)
            return QuantizedKV.blocked(arrays, n, values=False), QuantizedKV.blocked(arrays, n, values=True), None, None
        return self.k[:, :n], self.v[:, :n], self.ks[:, :n], self.vs[:, :n]

    def stored(self) -> list[np.ndarray]:
        """The arrays that hold the first `length` positions (views; blocked: the blocks holding them)."""
        if self.blocked:
            from jambatrt.plugins.cpu.kv_int8 import BLOCK, TILE
            nb, nt = -(-self.length // BLOCK), -(-self.length // TILE)
            return [self.k[:, :nb], self.v[:, :nt], self.ks[:, :nb], self.vs[:, :nb]]
        return [a[:, :self.length] for a in (self.k, self.v, self.ks, self.vs) if a is not None]

    def state_views(self) -> tuple:
        """The past as the engine hands it out as state: float32 views, or an int8 cache's
        QuantizedKV views (np.asarray reads them as float32); no copy either way."""
        k, v, ks, vs = self.present(self.length)
        if ks is None:                  # float32, or a blocked cache's QuantizedKV
            return k, v
        from jambatrt.plugins.cpu.kv_int8 import QuantizedKV
        return QuantizedKV(k, ks), QuantizedKV(v, vs)


def session_graph(path: Path, kv_cache: str | None, compute: str = "float32", maps: dict | None = None) -> tuple:
    """The engine graph at `path` as this process hands it to a session: the weights of MoE layers
    and (--weights-int8) linear layers mapped from the data file beside it and bound outside the
    graph (graph/passes/bind_weights.py; onnxruntime-extensions would copy them on every call), and
    with `kv_cache` (a KV_CACHES dtype) the attention layers' KV in in-place `KVCache`s of that
    dtype (graph/passes/bind_kv_caches.py);
    the weights' kernels run their prefill GEMMs in `compute` (ort_ops.Weights); `maps` as
    `_initializer_array` takes it.
    Returns (model bytes, {past input name: (key, "k"|"v")}, keys); `ort_ops.release(keys)` frees
    what was bound, and nothing stays bound when this raises."""
    import onnx

    from jambatrt.graph.passes.bind_kv_caches import bind_kv_caches
    from jambatrt.graph.passes.bind_weights import bind_weights
    from jambatrt.plugins.cpu.ort_ops import Weights, bind, release

    keys: list[str] = []

    def keep(obj, node) -> str:
        keys.append(bind(obj, node.name))
        return keys[-1]

    try:
        model = bind_weights(onnx.load(str(path), load_external_data=False),
                             lambda node, tensors: keep(Weights((_initializer_array(t, path.parent, maps)
                                                                 for t in tensors), compute), node))
        cached = bind_kv_caches(model, lambda node: keep(KVCache(kv_cache), node)) if kv_cache else {}
        return model.SerializeToString(), cached, keys
    except BaseException:
        release(keys)
        raise


def load_session(path: Path, threads: int | None, kv_cache: str | None, map_weights: bool = True,
                 what: str = "engine", compute: str = "float32", maps: dict | None = None) -> tuple:
    """An ONNX Runtime session of the engine graph at `path`: as `session_graph` hands it with
    `map_weights`, else the file as written (every weight and cache an op input). Returns (session,
    cached, keys) as session_graph does. ArtifactError when ONNX Runtime cannot load it."""
    try:
        import onnxruntime as ort
    except ImportError:
        raise BackendUnavailable("onnxruntime not installed (pip install onnxruntime onnxruntime-extensions)") from None
    from jambatrt.plugins.cpu.ort_ops import release

    keys: list[str] = []
    try:
        so = _session_options(threads)
        source, cached = str(path), {}
        if map_weights:
            source, cached, keys = session_graph(path, kv_cache, compute, maps)
            so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(path.parent))
        return ort.InferenceSession(source, so, providers=["CPUExecutionProvider"]), cached, keys
    except Exception as e:   # ORT raises its own exception types (Fail, InvalidGraph, NoSuchFile, ...)
        release(keys)
        raise ArtifactError(f"{path}: ONNX Runtime cannot load the {what} ({type(e).__name__}: {e})") from None


class OrtEngine(Engine):
    backend = "ort"

    Settings = OrtSettings
    # at the artifact's root, not under engines/: ONNX Runtime and onnx.checker refuse external
    # data outside the model's own directory, symlinks included
    output = ENGINE

    @classmethod
    def _prepare(cls, artifact: Path, manifest: Manifest, s: OrtSettings) -> None:
        if manifest.dtype != "float32":
            # ORT's CPU provider has no bfloat16 MatMul/Gemm kernels; bf16 artifacts are for TensorRT.
            raise InputError(f"{artifact}: the ONNX Runtime CPU engine runs float32 artifacts; this one is "
                             f"{manifest.dtype} (re-export with --dtype float32, or build --backend tensorrt)")
        if s.prefill_compute == "bfloat16":
            if not manifest.weights_int8:
                raise InputError(f"{artifact}: --prefill-compute bfloat16 is for the int8 kernels of --weights-int8 "
                                 "artifacts; this one has float32 linear layers (re-export with --weights-int8, or "
                                 "build with --prefill-compute float32)")
            if not cpu_has_bf16():
                raise InputError("--prefill-compute bfloat16: this CPU has no bf16 dot-product instructions "
                                 "(AVX512-BF16 or AMX), where bfloat16 GEMMs would be slower than float32 ones "
                                 "(accepted here: --prefill-compute float32)")

    @classmethod
    def _build(cls, artifact: Path, manifest: Manifest, s: OrtSettings, prepared: None, out: Path) -> dict:
        """Lower model.onnx with the ORT pass list into ENGINE beside it. The lowered graph's
        initializers keep pointing into the artifact's weights.safetensors: nothing is read or
        copied."""
        import onnx
        import onnxruntime

        from jambatrt.graph.onnx_export import check, load_onnx
        from jambatrt.graph.passes import PassSettings, ort_passes, run_passes

        settings = PassSettings(attention=s.attention, dtype=manifest.dtype, slice_logits=True)
        model = load_onnx(manifest.file(manifest.step.onnx), load_external_data=False)
        passes = ort_passes(settings)
        model = run_passes(model, settings, passes)
        onnx.save_model(model, out)
        check(out)
        return {"path": ENGINE, "onnxruntime": onnxruntime.__version__, "passes": [p.__name__ for p in passes],
                "settings": {"attention": s.attention, "prefill_compute": s.prefill_compute, "kv_cache": s.kv_cache,
                             "decode": s.decode},
                "weights": manifest.weights}

    def __init__(self, artifact, manifest=None, threads: int | None = None, map_weights: bool = True):
        """map_weights: the session as `session_graph` hands it (weights mapped once, KV caches in
        place); False: the engine file as written, which onnxruntime-extensions copies every weight
        and cache of on every call (for comparison)."""
        super().__init__(artifact, manifest)
        from jambatrt.export.store import MappedStore
        from jambatrt.plugins.cpu.ort_ops import bound, release

        path = self.manifest.file(self.entry["path"])
        kv_cache = self.kv_cache if self.entry["settings"]["attention"] == "kernel" else None
        store = MappedStore(self.manifest.file(self.manifest.weights)) if map_weights else None
        maps = {store.path.resolve(): store.mapping} if store is not None else None
        self.session, self.kv_cached, keys = load_session(path, threads, kv_cache, map_weights,
                                                          compute=self.prefill_compute, maps=maps)
        self.bound = keys          # what this session keeps outside its graph (ort_ops.bind)
        self._release = weakref.finalize(self, release, keys)     # the mapped weights and KV caches go with it
        self.decoder = None        # plugins/cpu/decode_step.py's NativeDecoder, when it runs this model's decode
        self.decode_path = "graph"
        if store is not None and self.entry["settings"].get("decode", "native") == "native":
            self.decode_path = self._native_decoder(store, {n: bound(k) for n, (k, part) in self.kv_cached.items()
                                                            if part == "k"})
        self.input_names = [i.name for i in self.step_program.inputs]      # the full state, in order
        self.output_names = [o.name for o in self.step_program.outputs]
        self.session_inputs = {i.name for i in self.session.get_inputs()}
        self.session_outputs = [o.name for o in self.session.get_outputs()]
        state_index = {n: i for i, n in enumerate(self.input_names[1:])}
        # (k's and v's index in the state, their KVCache) per attention layer with an in-place cache
        self._kv_slots = [(state_index[n], state_index[n[:-2] + ".v"], bound(key))
                          for n, (key, part) in self.kv_cached.items() if part == "k"]

    def _native_decoder(self, store, caches: dict) -> str:
        """Sets self.decoder when the native decode step runs this model; returns what runs decode
        steps: "native", or "graph (why)"."""
        from jambatrt.plugins.cpu.decode_step import NativeDecoder
        layers = {int(re.search(r"layer(\d+)\.k$", n).group(1)): c for n, c in caches.items()}
        attention = [i for i in range(self.config.num_hidden_layers) if self.config.is_attention(i)]
        why = (None if sorted(layers) == attention else "attention without the in-place KV cache (attention=gqa)")
        why = why or NativeDecoder.supports(self.config, store)
        if why:
            return f"graph ({why})"
        self.decoder = NativeDecoder(self.config, store, layers)
        return "native"

    @property
    def prefill_compute(self) -> str:
        return self.entry["settings"].get("prefill_compute", "float32")

    @property
    def kv_cache(self) -> str:
        """The in-place KV cache's storage: "float32", or "int8" (plugins/cpu/kv_int8.py)."""
        return self.entry["settings"].get("kv_cache", "float32")

    @property
    def compute_dtype(self) -> str:
        return "bfloat16" if self.prefill_compute == "bfloat16" else super().compute_dtype

    def run_step(self, input_ids, state, last_only: bool = False):
        B, L = input_ids.shape
        if (B > 1 and L > 1 and self.entry["settings"]["attention"] == "gqa"
                and self.check_state(state, B) > 0):
            # GroupQueryAttention's CPU kernel takes a multi-token chunk with past KV only at batch 1
            rows = [self._run(input_ids[b:b + 1], [t[b:b + 1] for t in state], last_only) for b in range(B)]
            return (np.concatenate([r[0] for r in rows]),
                    [np.concatenate([r[1][i] for r in rows]) for i in range(len(state))])
        return self._run(input_ids, state, last_only)

    def run_step_last(self, input_ids, state):
        return self.run_step(input_ids, state, last_only=True)

    def prefill(self, input_ids, state=None, chunk=None, last_only=False):
        """Engine.prefill, then the memory its chunks' intermediates held returned to the system (the arena
        shrinks after every multi-token run; `trim_heap` at the end, past the HEAP_KEEP_BYTES of freed heap
        that stay for the next prefill): int8 peer preset, 4096 tokens, resident 0.95 GB afterwards instead of
        1.61-1.66, prefill time unchanged (7.6-8.1 s either way)."""
        try:
            return super().prefill(input_ids, state, chunk, last_only)
        finally:
            trim_heap()

    def kv_present(self) -> list[np.ndarray]:
        """What a decode step's attention reads: the past in this engine's in-place KV caches (k, v and an
        int8 cache's scales, views [B, length, ...]); empty without in-place caches."""
        return [a for _, _, c in self._kv_slots if c.k is not None for a in c.stored()]

    def close(self) -> None:
        self.session = self.decoder = None
        self._kv_slots = []
        self._release()

    def _run(self, input_ids, state, last_only: bool = False):
        from jambatrt.graph.passes.slice_logits import POSITIONS
        from jambatrt.plugins.cpu.ort_ops import bound, run_checked   # raises OrtKernelError on kernel failures

        B, L = input_ids.shape
        native = L == 1 and self.decoder is not None
        if native:
            self.check_state(state, B)            # the graph checks its inputs; the native step relies on this
        for i, j, c in self._kv_slots:            # in-place caches: reuse, or restart from the state
            pk, pv = state[i], state[j]
            if c.k is None or c.views[0] is not pk or c.views[1] is not pv:
                c.reset(pk, pv, pk.shape[1] + L)    # a state this engine did not hand out last
            c.reserve(c.length + L)
        if native:
            return self.decoder.step(np.ascontiguousarray(input_ids, dtype=np.int64), state)
        feeds = dict(zip(self.input_names, [input_ids, *state]))
        feeds[POSITIONS] = np.array([1 if last_only else L], np.int64)     # an input of engines built since slice_logits
        outs = dict(zip(self.session_outputs, run_checked(self.session, self.session_outputs,
                                                          {n: feeds[n] for n in self.session_inputs},
                                                          _prefill_run_options() if L > 1 else None)))
        for name, (key, part) in self.kv_cached.items():
            c = bound(key)
            if part == "k":
                c.views = c.state_views()
            outs[name.replace("past.", "present.", 1)] = c.views[0 if part == "k" else 1]
        return outs["logits"], [outs[n] for n in self.output_names[1:]]
