"""plugins/tensorrt driven through TensorRT's own plugin layer, the way TensorRT builds an engine.

`tensorrt.plugin` (QDP: register, autotune, aot_impl, the plugin classes, shape expressions,
attribute conversion) is NVIDIA's Python code from the wheel `tensorrt-cu12-bindings`; only the
compiled module under it (libnvinfer) is replaced, by tests/tensorrt_standin.py. The harness below
then does what TensorRT's ONNX parser and builder do with a plugin node of the lowered graph
(engines/tensorrt.py `_lowered_onnx`):

- parser (onnx-tensorrt FallbackPluginImporter): look the creator up by the node's op_type and
  its `plugin_version` / `plugin_namespace` attributes (defaults "1" / ""), pass the creator's
  fields the node has as 1-D arrays (INT -> int32[1]), ask for AOT when `aot=1`;
- builder: output types and shape expressions (from the graph's symbolic input dims), the
  format/type combinations, configure, tactics, then per tactic the launch parameters and the
  kernel (IPluginV3QuickAOTBuild: get_launch_params, get_kernel).

Every result is checked against the compiled kernel (PTX entry name and parameters, Triton's two
hidden scratch pointers included) and against the eager launcher of plugins/gpu the descriptor
names (same grid, same int32 arguments, same constexprs, same output shapes for the same shapes;
the eager launcher runs on meta tensors with its kernels replaced by a recorder).

Releases: the first of tests/tensorrt_releases.txt is installed by `make setup` and always runs;
the others are wheels `make setup` downloads into .venv/tensorrt-releases/ (JAMBATRT_TRT_WHEELS
overrides); a missing one skips, saying so."""

from __future__ import annotations

import ast
import contextlib
import importlib
import importlib.metadata
import importlib.util
import os
import re
import sys
import warnings
import zipfile
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

HERE = Path(__file__).resolve().parent
RELEASES = [ln.split()[0] for ln in (HERE / "tensorrt_releases.txt").read_text().splitlines()
            if ln.strip() and not ln.startswith("#")]
PINNED = RELEASES[0]
WHEELS = Path(os.environ.get("JAMBATRT_TRT_WHEELS", Path(sys.prefix) / "tensorrt-releases"))
# concrete values of the graph's dynamic dims the launches are compared at: a prefill chunk after
# some past, and a decode step
BINDINGS = ({"batch": 2, "seq": 17, "past": 5}, {"batch": 1, "seq": 1, "past": 40})


# ---- TensorRT's plugin layer over the stand-in ---------------------------------------------------------
def _bindings_dir(release: str, tmp: Path) -> Path:
    """The `tensorrt_bindings` folder of one release: the installed one for the pinned release,
    else extracted from its downloaded wheel (only the plugin layer's Python files)."""
    if release == PINNED:
        try:
            installed = importlib.metadata.version("tensorrt-cu12-bindings")
        except importlib.metadata.PackageNotFoundError:
            pytest.fail(f"tensorrt-cu12-bindings=={PINNED} is not installed: run `make setup` (it installs it "
                        "with --no-deps; this harness is part of the fast suite)")
        assert installed == PINNED, f"tensorrt-cu12-bindings {installed} installed, {PINNED} pinned: run `make setup`"
        return Path(importlib.util.find_spec("tensorrt_bindings").submodule_search_locations[0])
    wheels = sorted(WHEELS.glob(f"tensorrt_cu12_bindings-{release}-*.whl"))
    if not wheels:
        pytest.skip(f"tensorrt-cu12-bindings=={release} is not in {WHEELS} (`make setup` downloads it; the "
                    "download failed or ran offline)")
    out = tmp / release
    if not (out / "tensorrt_bindings" / "plugin" / "__init__.py").exists():
        with zipfile.ZipFile(wheels[0]) as z:
            z.extractall(out, [n for n in z.namelist() if n.startswith("tensorrt_bindings/plugin/")])
    return out / "tensorrt_bindings"


@contextlib.contextmanager
def plugin_layer(bindings_dir: Path, release: str):
    """(trt, trtp): a fresh stand-in loaded as `tensorrt`, with the release's real `tensorrt.plugin`
    imported over it. The previous tensorrt modules are put back afterwards."""
    def ours(name):
        return name == "tensorrt" or name.startswith("tensorrt.")
    saved = {k: sys.modules.pop(k) for k in [k for k in sys.modules if ours(k)]}
    spec = importlib.util.spec_from_file_location("tensorrt", HERE / "tensorrt_standin.py",
                                                  submodule_search_locations=[str(bindings_dir)])
    trt = importlib.util.module_from_spec(spec)
    sys.modules["tensorrt"] = trt
    try:
        spec.loader.exec_module(trt)
        trt.__version__ = release
        with warnings.catch_warnings():   # NVIDIA's docstrings hold "\s" (DeprecationWarning when compiled)
            warnings.simplefilter("ignore", DeprecationWarning)
            trtp = importlib.import_module("tensorrt.plugin")
        trt.plugin = trtp
        yield trt, trtp
    finally:
        for k in [k for k in sys.modules if ours(k)]:
            del sys.modules[k]
        sys.modules.update(saved)


@pytest.fixture(scope="module", params=RELEASES, ids=lambda r: f"trt{r}")
def layer(request, tmp_path_factory):
    """Every jamba plugin registered with one release's plugin layer (register_all(), as a build
    does), kernels compiled for sm_90. Yields (release, trt, trtp)."""
    import jambatrt.plugins.tensorrt as P
    bindings = _bindings_dir(request.param, tmp_path_factory.getbasetemp() / "tensorrt-releases")
    mp = pytest.MonkeyPatch()
    mp.setenv("JAMBATRT_CUDA_ARCH", "sm_90")
    mp.setattr(P, "_REGISTERED", set())
    with plugin_layer(bindings, request.param) as (trt, trtp):
        P.register_all()
        yield request.param, trt, trtp
    mp.undo()


# ---- the lowered graphs -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lowered(tiny_artifact):
    """The tiny artifact's step graph through the TensorRT pass list, as the build hands it to the
    parser: MoE grouped (the default) and fused, each also split into expert groups (a tensor limit
    that puts 2 of the 4 experts in each group, so nodes carry expert_offset 2)."""
    from jambatrt.artifact import read_manifest
    from jambatrt.graph.onnx_export import load_onnx
    from jambatrt.graph.passes import PassSettings, run_passes, tensorrt_passes
    step = read_manifest(tiny_artifact)["programs"]["step"]
    out = {}
    for moe in ("grouped", "fused"):
        for limit in (None, 40_000):
            s = PassSettings(dtype="float32", moe=moe, **({"tensor_limit": limit} if limit else {}))
            model = load_onnx(tiny_artifact / step["onnx"], load_external_data=False)
            out[(moe, limit)] = run_passes(model, s, tensorrt_passes(s))
    return out


ONNX_TO_TRT = {TensorProto.FLOAT: "FLOAT", TensorProto.BFLOAT16: "BF16", TensorProto.FLOAT16: "HALF",
               TensorProto.INT8: "INT8", TensorProto.INT32: "INT32", TensorProto.INT64: "INT64"}


def dim_expr(trt, builder, dim):
    """An ONNX dim (int, or a dim_param such as "batch*seq" or "past + seq") as an IDimensionExpr."""
    if isinstance(dim, int):
        return builder.constant(dim)
    ops = {ast.Add: trt.DimensionOperation.SUM, ast.Sub: trt.DimensionOperation.SUB,
           ast.Mult: trt.DimensionOperation.PROD, ast.FloorDiv: trt.DimensionOperation.FLOOR_DIV}

    def walk(n):
        if isinstance(n, ast.Name):
            return trt.symbol(n.id)
        if isinstance(n, ast.Constant) and isinstance(n.value, int):
            return builder.constant(n.value)
        if isinstance(n, ast.BinOp) and type(n.op) in ops:
            return builder.operation(ops[type(n.op)], walk(n.left), walk(n.right))
        raise ValueError(f"dim {dim!r}: not an expression over named dims")
    return walk(ast.parse(dim, mode="eval").body)


def graph_tensors(model):
    """name -> (ONNX elem type, dims) for graph inputs, initializers and inferred value_info."""
    out = {}
    for vi in list(model.graph.input) + list(model.graph.value_info) + list(model.graph.output):
        t = vi.type.tensor_type
        if t.HasField("shape"):
            out[vi.name] = (t.elem_type, [d.dim_param or d.dim_value for d in t.shape.dim])
    for t in model.graph.initializer:
        out[t.name] = (t.data_type, list(t.dims))
    return out


def node_kind(node):
    """(op_type, attributes): nodes of one kind create the same plugin and launch the same kernels."""
    return node.op_type, tuple(sorted((a.name, str(helper.get_attribute_value(a))) for a in node.attribute))


def production_graph(cfg):
    """One node of every jamba op at a production config's sizes, bf16 activations, as export lays
    them out (weights as initializers holding dims only: nothing is ever read), for the TensorRT
    pass list. Its MoE weights reach 2^31 elements for Jamba-1.5-Large, which the passes split into
    expert groups as they do the real graph."""
    bf, f32, i8 = TensorProto.BFLOAT16, TensorProto.FLOAT, TensorProto.INT8
    D, N, K, H, E, I = (cfg.d_inner, cfg.mamba_d_state, cfg.mamba_d_conv, cfg.hidden_size, cfg.num_experts,
                        cfg.intermediate_size)
    Hq, Hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    inputs = {"x": (bf, ["batch", D, "seq"]), "conv_state": (bf, ["batch", D, K - 1]),
              "u": (bf, ["batch", D, "seq"]), "delta": (bf, ["batch", D, "seq"]), "Bm": (bf, ["batch", N, "seq"]),
              "Cm": (bf, ["batch", N, "seq"]), "z": (bf, ["batch", D, "seq"]), "ssm_state": (f32, ["batch", D, N]),
              "q": (bf, ["batch", "seq", Hq, d]), "k": (bf, ["batch", "seq", Hkv, d]), "v": (bf, ["batch", "seq", Hkv, d]),
              "past_k": (bf, ["batch", "past", Hkv, d]), "past_v": (bf, ["batch", "past", Hkv, d]),
              "h": (bf, ["batch*seq", H]), "logits": (bf, ["batch*seq", E])}
    weights = {"conv_w": (bf, [D, K]), "conv_b": (bf, [D]), "A": (f32, [D, N]), "Dskip": (f32, [D]),
               "dt_bias": (f32, [D]), "w13": (i8, [E, 2 * I, H]), "w13_scale": (f32, [E, 2 * I]),
               "w2": (i8, [E, H, I]), "w2_scale": (f32, [E, H])}
    nodes = [
        helper.make_node("CausalConv1d", ["x", "conv_w", "conv_b", "conv_state"], ["conv_y", "conv_state_out"],
                         name="conv", domain="jamba"),
        helper.make_node("SelectiveScan", ["u", "delta", "A", "Bm", "Cm", "Dskip", "z", "dt_bias", "ssm_state"],
                         ["scan_y", "ssm_state_out"], name="scan", domain="jamba"),
        helper.make_node("CausalAttention", ["q", "k", "v", "past_k", "past_v"], ["o", "present_k", "present_v"],
                         name="attention", domain="jamba"),
        helper.make_node("MoEInt8", ["h", "logits", "w13", "w13_scale", "w2", "w2_scale"], ["moe_y"], name="moe",
                         domain="jamba", top_k=cfg.num_experts_per_tok, expert_offset=0)]
    outputs = ["conv_y", "conv_state_out", "scan_y", "ssm_state_out", "o", "present_k", "present_v", "moe_y"]
    inits = []
    for name, (t, dims) in weights.items():
        w = TensorProto(name=name, data_type=t, dims=dims, data_location=TensorProto.EXTERNAL)
        w.external_data.add(key="location", value="weights-never-read.bin")
        inits.append(w)
    graph = helper.make_graph(nodes, "production", [helper.make_tensor_value_info(n, t, s) for n, (t, s) in inputs.items()],
                              [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("jamba", 1)])


# ---- TensorRT's parser and builder, as far as a plugin sees them ---------------------------------------------
class PluginNotFound(AssertionError):
    pass


def parser_create(trt, node):
    """onnx-tensorrt's FallbackPluginImporter for one node -> (plugin, request)."""
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    text = lambda v: v.decode() if isinstance(v, bytes) else str(v)   # noqa: E731
    version, namespace = text(attrs.get("plugin_version", "1")), text(attrs.get("plugin_namespace", ""))
    creator = trt.get_plugin_registry().get_creator(node.op_type, version, namespace)
    if creator is None:
        raise PluginNotFound(f"{node.name}: Plugin not found, are the plugin name, version, and namespace correct? "
                             f"(name {node.op_type!r}, version {version!r}, namespace {namespace!r})")
    fields = []
    for f in creator.field_names:                  # the creator's fields the node has, in the creator's order
        if f.name not in attrs:
            continue
        v = attrs[f.name]
        if isinstance(v, int):
            fields.append(trt.PluginField(f.name, np.array([v], np.int32), trt.PluginFieldType.INT32))
        elif isinstance(v, float):
            fields.append(trt.PluginField(f.name, np.array([v], np.float32), trt.PluginFieldType.FLOAT32))
        elif isinstance(v, bytes):
            fields.append(trt.PluginField(f.name, np.frombuffer(v, np.int8), trt.PluginFieldType.CHAR))
        else:
            raise AssertionError(f"{node.name}: attribute {f.name} of type {type(v).__name__} in this harness")
    if "aot" in attrs:
        request = trt.QuickPluginCreationRequest.STRICT_AOT if attrs["aot"] else trt.QuickPluginCreationRequest.STRICT_JIT
    else:
        request = trt.QuickPluginCreationRequest.UNKNOWN
    plugin = creator.create_plugin(node.op_type, namespace, trt.PluginFieldCollection(fields),
                                   trt.TensorRTPhase.BUILD, request)
    return plugin, request


class LaunchParams:
    """What get_launch_params() fills (TensorRT's KernelLaunchParams): symbolic expressions."""
    grid_x = grid_y = grid_z = block_x = block_y = block_z = shared_mem = None


class PluginBuild:
    """TensorRT's builder on one plugin layer: add it (types, shapes), then per combination and
    tactic the AOT launch. `inputs`: [(DataType, [IDimensionExpr])]."""

    def __init__(self, trt, plugin, inputs):
        self.trt = trt
        self.plugin = plugin.clone()                   # a layer holds its own clone
        assert self.plugin.get_capability_interface(None) is self.plugin
        self.n_in = len(inputs)
        self.in_types = [t for t, _ in inputs]
        self.builder = trt.IExprBuilder()
        self.in_exprs = []
        for _, dims in inputs:
            e = trt.DimsExprs(len(dims))
            for i, d in enumerate(dims):
                e[i] = d
            self.in_exprs.append(e)
        self.n_out = self.plugin.get_num_outputs()
        self.out_types = list(self.plugin.get_output_data_types(self.in_types, [len(d) for _, d in inputs]))
        out = self.plugin.get_output_shapes(self.in_exprs, [], self.builder)
        self.out_exprs = [[o[i] for i in range(len(o))] for o in out]
        assert len(self.out_types) == len(self.out_exprs) == self.n_out

    def _descs(self, types, dims):
        descs = []
        for t, exprs in zip(types, [[e[i] for i in range(len(e))] for e in self.in_exprs] + self.out_exprs):
            d = self.trt.DynamicPluginTensorDesc()
            d.desc.type, d.desc.format = t, self.trt.TensorFormat.LINEAR
            d.desc.dims = self.trt.Dims([x.get_constant_value() if x.is_constant() else -1 for x in exprs])
            d.min = d.opt = d.max = self.trt.Dims([x.evaluate(dims) for x in exprs])
            descs.append(d)
        return descs

    def combinations(self, dims):
        """The (types, formats) combinations the plugin supports (get_supported_format_combinations)."""
        n = self.n_in + self.n_out
        flat = self.plugin.get_supported_format_combinations(self._descs(self.in_types + self.out_types, dims),
                                                             self.n_in)
        assert len(flat) % n == 0
        return [([d.type for d in flat[i:i + n]], [d.format for d in flat[i:i + n]]) for i in range(0, len(flat), n)]

    def launches(self, types, dims, spy):
        """configure_plugin with `types`, then per valid tactic: (tactic, launch params, extra args,
        kernel name, PTX, (KernelSpec, compiled kernel) the aot_impl compiled: from `spy`)."""
        descs = self._descs(types, dims)
        self.plugin.configure_plugin(descs[:self.n_in], descs[self.n_in:])
        out = []
        for tactic in sorted(self.plugin.get_valid_tactics()) or [0]:
            self.plugin.set_tactic(tactic)
            params, extras = LaunchParams(), self.trt.ISymExprs()
            self.plugin.get_launch_params(self.in_exprs, descs, self.n_in, params, extras, self.builder)
            compiled = spy[-1]
            name, ptx = self.plugin.get_kernel([d.desc for d in descs[:self.n_in]], [d.desc for d in descs[self.n_in:]])
            out.append((tactic, params, [extras.exprs[i] for i in range(extras.nbSymExprs)], name, ptx, compiled))
        return out


def ptx_params(ptx: str, function: str) -> str:
    """The kernel's parameter kinds in order: p (64-bit pointer) or i (32-bit int)."""
    body = re.search(r"\.entry\s+" + re.escape(function) + r"\((.*?)\)", ptx, re.S)
    assert body, f".entry {function} not in the PTX"
    return "".join("p" if w == "u64" else "i" for w in re.findall(r"\.param\s+\.(u64|u32|b32|s32)", body[1]))


# ---- the eager launchers, recorded ----------------------------------------------------------------------------
class Recorder:
    """Stands for a triton.jit kernel: `kernel[grid](*args, **kwargs)` records instead of launching."""

    def __init__(self, name, calls):
        self.name, self.calls = name, calls

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.calls.append({"kernel": self.name, "grid": tuple(grid), "args": args, "kwargs": kwargs})
        return launch


def eager_launch(launcher: str, tensors, attrs):
    """Run plugins/gpu's launcher ("module:function") on meta tensors -> its single recorded launch."""
    import triton

    mod_name, fn_name = launcher.split(":")
    mod = importlib.import_module(f"jambatrt.plugins.gpu.{mod_name}")
    calls = []
    with pytest.MonkeyPatch.context() as mp:
        for name, obj in vars(mod).items():
            if isinstance(obj, triton.runtime.jit.JITFunction):
                mp.setattr(mod, name, Recorder(name, calls))
        getattr(mod, fn_name)(*tensors, *attrs)
    assert len(calls) == 1, f"{launcher} launched {[c['kernel'] for c in calls]} (one kernel per plugin)"
    return calls[0]


TORCH_DTYPES = {"FLOAT": "float32", "BF16": "bfloat16", "HALF": "float16", "INT8": "int8", "INT32": "int32",
                "INT64": "int64"}


def meta_tensor(trt_type, shape):
    import torch
    return torch.empty(shape, dtype=getattr(torch, TORCH_DTYPES[trt_type.name]), device="meta")


# ---- one plugin node, end to end ------------------------------------------------------------------------------
def check_node(trt, node, inputs, spy, onnx_outputs=None, launches=True):
    """Create `node` as the parser does, build it as the builder does, check every launch against
    the PTX and the eager launcher (launches=False: creation and shapes only). `inputs`:
    [(DataType, [IDimensionExpr])]. Returns the plugin's output (types, exprs) for the nodes
    downstream, and the number of launches checked."""
    import torch

    from jambatrt.plugins.tensorrt import MAX_STATIC_SHARED, descriptors
    d = descriptors()[node.op_type]
    plugin, request = parser_create(trt, node)
    assert request == trt.QuickPluginCreationRequest.STRICT_AOT, f"{node.name}: the engine must hold the kernels"
    build = PluginBuild(trt, plugin, inputs)
    attr_values = [helper.get_attribute_value(a) for name in d.attributes for a in node.attribute if a.name == name]
    assert len(attr_values) == len(d.attributes), f"{node.name}: attributes {list(d.attributes)} must all be set"
    # shapes the ONNX schemas inferred agree with the plugin's shape expressions
    for i, exprs in enumerate(build.out_exprs):
        known = (onnx_outputs or {}).get(node.output[i])
        if known is None:
            continue
        assert ONNX_TO_TRT[known[0]] == build.out_types[i].name, f"{node.name} output {i}: type"
        assert len(known[1]) == len(exprs), f"{node.name} output {i}: rank"
        for dims in BINDINGS:
            for j, (x, e) in enumerate(zip(known[1], exprs)):
                if isinstance(x, str) and x.startswith("unk__"):   # ONNX inferred no size for it
                    continue
                assert e.evaluate(dims) == dim_expr(trt, build.builder, x).evaluate(dims), \
                    f"{node.name} output {i} dim {j} ({x}) at {dims}"
    outputs = list(zip(build.out_types, build.out_exprs))
    if not launches:
        return outputs, 0
    combos = build.combinations(BINDINGS[0])
    assert combos, f"{node.name}: no type combination"
    assert all(f == trt.TensorFormat.LINEAR for _, fmts in combos for f in fmts)
    network_types = build.in_types + build.out_types
    assert network_types in [t for t, _ in combos], f"{node.name}: the graph's own types are not supported"
    n_checked = 0
    for types, _ in combos:
        launches = build.launches(types, BINDINGS[0], spy)
        assert sorted(t for t, *_ in launches) == (sorted(d.tactics) or [0]), node.name
        for tactic, params, extras, kname, ptx, (spec, compiled) in launches:
            assert kname == d.tactics.get(tactic, d.kernels[0]) + "_kernel" == compiled.metadata.name, node.name
            ptx = ptx.decode()
            assert ".version 8.0" in ptx and ".target sm_90a" in ptx, f"{kname}: PTX pinned for the driver"
            kinds = ptx_params(ptx, kname)
            # inputs, int32 extras, outputs, then Triton's global/profile scratch pointers
            assert kinds == "p" * build.n_in + "i" * len(extras) + "p" * build.n_out + "pp", (node.name, kinds)
            assert all(e.type == trt.PluginArgType.INT and e.dtype == trt.PluginArgDataType.INT32 for e in extras)
            assert params.block_x.expr.is_constant() and params.shared_mem.expr.is_constant()
            assert params.block_x.expr.get_constant_value() == compiled.metadata.num_warps * 32
            assert (params.block_y.expr.get_constant_value(), params.block_z.expr.get_constant_value()) == (1, 1)
            assert params.shared_mem.expr.get_constant_value() == compiled.metadata.shared <= MAX_STATIC_SHARED
            for dims in BINDINGS:
                ins = [meta_tensor(t, [e.evaluate(dims) for e in exprs])
                       for t, exprs in zip(types[:build.n_in], [[x[i] for i in range(len(x))] for x in build.in_exprs])]
                call = eager_launch(d.launchers[tactic], ins, attr_values)
                where = f"{node.name} {[t.name for t in types]} tactic {tactic} at {dims}"
                assert call["kernel"] == kname, where
                grid = tuple(call["grid"]) + (1,) * (3 - len(call["grid"]))
                got = tuple(getattr(params, g).expr.evaluate(dims) for g in ("grid_x", "grid_y", "grid_z"))
                assert got == grid, f"{where}: grid {got}, the eager launcher's {grid}"
                args = call["args"]
                ints = [a for a in args if not isinstance(a, torch.Tensor)]
                assert [e.expr.evaluate(dims) for e in extras] == ints, f"{where}: int32 arguments"
                outs = [a for a in args[build.n_in + len(ints):] if isinstance(a, torch.Tensor)]
                assert [list(o.shape) for o in outs] == [[e.evaluate(dims) for e in x] for x in build.out_exprs], where
                assert [o.dtype for o in outs] == [meta_tensor(t, [0]).dtype for t in types[build.n_in:]], where
                kw = dict(call["kwargs"])
                assert kw.pop("num_warps") == spec.num_warps, where
                if "num_stages" in kw:
                    assert kw.pop("num_stages") == spec.num_stages, where
                assert kw == spec.constexprs, f"{where}: constexprs {kw} vs the AOT variant's {spec.constexprs}"
            n_checked += 1
    return outputs, n_checked


@pytest.fixture
def compile_spy(monkeypatch):
    """Records (KernelSpec, compiled kernel) of every compile an aot_impl asks for."""
    import jambatrt.plugins.tensorrt as P
    seen, real = [], P.compile_for_trt

    def spy(spec):
        name, ptx, compiled = real(spec)
        seen.append((spec, compiled))
        return name, ptx, compiled
    monkeypatch.setattr(P, "compile_for_trt", spy)
    return seen


def drive_graph(trt, model, spy):
    """Every kind of jamba node of a lowered graph through parser and builder; tensors produced by
    plugins flow on with the plugin's own shape expressions (the ONNX schemas of the split MoE
    plugins infer none). Returns the op_types checked."""
    builder = trt.IExprBuilder()
    known = graph_tensors(model)
    produced, seen, checked = {}, set(), {}
    for node in (n for n in model.graph.node if n.domain == "jamba"):
        inputs = []
        for name in node.input:
            if name in produced:
                inputs.append(produced[name])
            else:
                assert name in known, f"{node.name}: no shape for input {name}"
                elem, dims = known[name]
                inputs.append((getattr(trt.DataType, ONNX_TO_TRT[elem]), [dim_expr(trt, builder, x) for x in dims]))
        first = node_kind(node) not in seen
        seen.add(node_kind(node))
        outs, n = check_node(trt, node, inputs, spy, known, launches=first)
        produced.update(zip(node.output, outs))
        if first:
            checked[node.op_type] = checked.get(node.op_type, 0) + n
    return checked


# ---- the tests ------------------------------------------------------------------------------------------------
def test_every_plugin_through_the_real_layer(layer, lowered, compile_spy):
    """Every jamba plugin of the lowered graphs (grouped and fused MoE, with and without expert
    groups) created as the parser creates it, shaped, autotuned and AOT-launched by TensorRT's own
    plugin layer; each launch matches the PTX and the eager launcher."""
    release, trt, trtp = layer
    from jambatrt.plugins.tensorrt import descriptors
    checked = {}
    for key, model in lowered.items():
        for op, n in drive_graph(trt, model, compile_spy).items():
            checked[op] = checked.get(op, 0) + n
    assert set(checked) == set(descriptors()), f"TensorRT {release}: plugins not reached {set(descriptors()) - set(checked)}"
    # both activation types of every plugin, both scan tactics
    assert all(n >= 2 for n in checked.values()) and checked["SelectiveScan"] >= 4, checked


PRODUCTION_BINDINGS = ({"batch": 1, "seq": 4096, "past": 258048}, {"batch": 4, "seq": 1, "past": 262143})


@pytest.mark.parametrize("preset", ["jamba-1.5-mini", "jamba-1.5-large"])
def test_every_plugin_at_production_shapes(layer, preset, compile_spy, monkeypatch):
    """The same harness at Jamba-1.5-Mini / -Large sizes (hidden 4096 / 8192, head_dim 128, 16
    experts of 14336 / 24576; Large's experts split into groups of 4), bf16 activations, at a
    4096-token chunk after 258,048 tokens and a decode step at 262,143: every plugin's launches equal
    the eager launcher's, with the production kernel variants (the ones the resource test checks)."""
    from jambatrt.config import preset as load_preset
    from jambatrt.graph.passes import PassSettings, run_passes, tensorrt_passes
    from jambatrt.plugins.tensorrt import descriptors
    release, trt, _ = layer
    monkeypatch.setattr(sys.modules[__name__], "BINDINGS", PRODUCTION_BINDINGS)
    cfg = load_preset(preset)
    checked = {}
    for moe in ("grouped", "fused"):
        s = PassSettings(dtype="bfloat16", moe=moe)
        model = run_passes(production_graph(cfg), s, tensorrt_passes(s))
        offsets = {helper.get_attribute_value(a) for n in model.graph.node for a in n.attribute
                   if a.name == "expert_offset"}
        assert offsets == ({0} if preset == "jamba-1.5-mini" else {0, 4, 8, 12}), offsets
        for op, n in drive_graph(trt, model, compile_spy).items():
            checked[op] = checked.get(op, 0) + n
    assert set(checked) == set(descriptors()), checked
    head128 = [spec for spec, _ in compile_spy if spec.op == "attention"]
    assert head128 and all(spec.constexprs["HEAD_DIM"] == 128 for spec in head128)


def test_parser_finds_every_plugin(layer, lowered):
    """Bug 2 (issue 14): the parser looks a plugin up by (op_type, plugin_version, plugin_namespace),
    namespace default "" — never the node's domain. Every jamba node of the lowered graph names
    the namespace and version its plugin is registered under; a node without them is not found."""
    release, trt, _ = layer
    registry = trt.get_plugin_registry()
    for model in lowered.values():
        for node in (n for n in model.graph.node if n.domain == "jamba"):
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            assert (attrs.get("plugin_namespace"), attrs.get("plugin_version"), attrs.get("aot")) == (b"jamba", b"1", 1), \
                f"{node.name} ({node.op_type}): {attrs}"
            assert registry.get_creator(node.op_type, "1", "jamba") is not None
            bare = helper.make_node(node.op_type, list(node.input), list(node.output), name=node.name, domain="jamba")
            with pytest.raises(PluginNotFound):
                parser_create(trt, bare)


def test_shape_expression_constants(layer):
    """Bug 1 (issue 14): `constant()` reads a build-time constant shape expression of the real
    plugin layer (SymIntExpr.constant_value is a method there) and refuses a dynamic one."""
    release, trt, trtp = layer
    from jambatrt.errors import BackendUnavailable
    from jambatrt.plugins.tensorrt import constant
    builder = trt.IExprBuilder()
    sym = importlib.import_module("tensorrt.plugin._tensor").SymIntExpr
    sym._exprBuilder = builder                      # what the plugin layer sets around get_launch_params
    try:
        fixed = trtp.ShapeExpr(builder.constant(128))
        assert constant(fixed, "head_dim") == 128
        assert constant(fixed // 2, "half") == 64        # operations on constants fold
        with pytest.raises(BackendUnavailable, match="build-time constant"):
            constant(trtp.ShapeExpr(trt.symbol("seq")), "seq")
    finally:
        sym._exprBuilder = None


def test_int_attributes_as_the_parser_passes_them(layer):
    """Bug 3 (issue 14): the parser hands an INT attribute to create_plugin as an int32 array of
    one element; every release must accept it (10.10 - 11.1 convert a field declared `int` with
    int(array), which NumPy >= 2.4 refuses) and the plugin bodies see ints."""
    release, trt, trtp = layer
    creator = trt.get_plugin_registry().get_creator("MoEInt8", "1", "jamba")
    fields = trt.PluginFieldCollection([
        trt.PluginField("top_k", np.array([2], np.int32), trt.PluginFieldType.INT32),
        trt.PluginField("expert_offset", np.array([4], np.int32), trt.PluginFieldType.INT32)])
    plugin = creator.create_plugin("MoEInt8", "jamba", fields, trt.TensorRTPhase.BUILD,
                                   trt.QuickPluginCreationRequest.STRICT_AOT)
    assert {k: int(np.asarray(v).reshape(-1)[0]) for k, v in plugin.attrs.items()} == {"top_k": 2, "expert_offset": 4}
    from jambatrt.plugins.tensorrt import attribute_value
    assert attribute_value("top_k", plugin.attrs["top_k"], "int") == 2
    assert type(attribute_value("top_k", plugin.attrs["top_k"], "int")) is int


def test_attribute_with_several_values_is_refused():
    from jambatrt.errors import ArtifactError
    from jambatrt.plugins.tensorrt import attribute_value
    with pytest.raises(ArtifactError, match="top_k.*2 values"):
        attribute_value("top_k", np.array([2, 3], np.int32), "int")


def test_stand_in_matches_the_bindings_field_rules():
    """The stand-in's PluginField reads back what the bindings do: `size` entries of the field's
    type from its buffer (an int64 array as INT32 reads its first 4-byte words)."""
    spec = importlib.util.spec_from_file_location("tensorrt_standin_check", HERE / "tensorrt_standin.py")
    trt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(trt)
    f = trt.PluginField("k", np.array([7], np.int32), trt.PluginFieldType.INT32)
    assert f.size == 1 and f.data.dtype == np.int32 and f.data.tolist() == [7]
    assert trt.PluginField("s", b"jamba", trt.PluginFieldType.CHAR).data.tobytes() == b"jamba"
    assert trt.PluginField("w", np.array([1, 2], np.int64), trt.PluginFieldType.INT32).data.tolist() == [1, 0]
    with pytest.raises(IndexError):
        trt.PluginFieldCollection([f])[1]
    b = trt.IExprBuilder()
    e = b.operation(trt.DimensionOperation.CEIL_DIV, b.operation(trt.DimensionOperation.PROD, trt.symbol("s"),
                                                                 b.constant(3)), b.constant(4))
    assert not e.is_constant() and e.evaluate({"s": 5}) == 4
    assert b.operation(trt.DimensionOperation.FLOOR_DIV, b.constant(9), b.constant(2)).get_constant_value() == 4
    reg = trt.get_plugin_registry()

    class C:
        name, plugin_version = "X", "1"
    assert reg.register_creator(C(), "ns") and not reg.register_creator(C(), "ns")
    assert reg.get_creator("X", "1", "ns") is not None and reg.get_creator("X", "1", "") is None
