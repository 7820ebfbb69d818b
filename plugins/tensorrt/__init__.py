"""TensorRT plugins for the jamba ops: quickly deployable plugins (`tensorrt.plugin`, QDP) with
an ahead-of-time implementation (`@trtp.aot_impl`) that hands TensorRT the PTX of our Triton
kernel, its launch grid and its int32 arguments as symbolic shape expressions. The engine then
holds the kernels: no Python runs at inference time (so Triton Inference Server's TensorRT
backend can serve it).

One module per op (`causal_conv1d`, `selective_scan`, `moe_int8`, `attention`). Each exposes
`DESCRIPTORS` (pure Python, importable without TensorRT: name, namespace, version, attributes,
inputs, outputs — what the ONNX parser matches against the node) and `register()`, which needs
TensorRT; `register` is the op's "tensorrt" implementation in plugins/registry.py, its
`descriptors=` the DESCRIPTORS, so this package lists no ops.

How TensorRT's ONNX parser finds and creates a plugin (onnx-tensorrt's FallbackPluginImporter):
the creator registered under (op_type, node attribute `plugin_version` — default "1",
node attribute `plugin_namespace` — default "", matched exactly; the node's domain is not read, and
"" is a namespace QDP refuses to register), so graph/passes/set_plugin_namespace.py writes both
attributes on every jamba node. It then passes the creator's fields that the node has as
attributes, each a 1-D array (an INT attribute is an int32 array of one element), and asks for the
AOT implementation when the node has `aot=1`.

What a QDP AOT plugin can and cannot do shapes these plugins:
- one kernel launch per plugin, no workspace; the kernel's parameters are (input pointers,
  int32 extras, output pointers) — our kernels are written in that order;
- every declared input is required: the graph must fill absent optional inputs (zero state,
  empty past KV) first — `graph.passes.materialize_optional_inputs` does;
- the plugin version is always "1" (QDP's creator hard-codes it), so SPEC.version must be 1;
- Triton appends two hidden pointer parameters (global/profile scratch) that TensorRT does not
  pass: kernels with nonzero scratch are refused (plugins.gpu.aot.check_scratch)."""

from __future__ import annotations

import inspect
import os
import typing
from dataclasses import asdict, dataclass, field

import numpy as np
import numpy.typing as npt

from jambatrt.errors import ArtifactError, BackendUnavailable
from jambatrt.plugins.gpu.aot import NO_OPT_IN_SHARED

NAMESPACE = "jamba"
QDP_VERSION = "1"                    # tensorrt.plugin registers every creator as version "1"
# beyond 48 KiB a kernel must opt in (cuFuncSetAttribute); TensorRT's AOT launch does not
MAX_STATIC_SHARED = NO_OPT_IN_SHARED


@dataclass(frozen=True)
class PluginDescriptor:
    """What TensorRT's registry and ONNX parser see of one plugin."""

    op: str                          # the jamba op (export/ops/<op>.py)
    name: str                        # plugin name == ONNX op_type
    namespace: str                   # == ONNX domain `jamba`
    version: str                     # == ONNX node attribute `plugin_version` (default "1")
    attributes: dict[str, str]       # attribute name -> Python type name
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    kernels: tuple[str, ...]         # Triton kernels (plugins/gpu) the aot_impl can return
    tactics: dict[int, str] = field(default_factory=dict)   # tactic id -> kernel
    # tactic id (0: the only one) -> "module:function" in plugins/gpu of the eager launcher that
    # launches the same kernel with the same grid and int32 arguments for the same shapes
    launchers: dict[int, str] = field(default_factory=dict)
    lowering: str = "node"           # "node": one plugin per ONNX node of the op; "split": see moe_int8
    notes: str = ""

    @property
    def plugin_id(self) -> str:
        return f"{self.namespace}::{self.name}"

    def as_dict(self) -> dict:
        return {**asdict(self), "plugin_id": self.plugin_id}


def descriptor_from_spec(spec, kernels, launchers, tactics=None, notes: str = "") -> PluginDescriptor:
    """The plugin of one op, named by its SPEC (export/ops/<op>.py): the single source of truth."""
    from jambatrt.export.ops import DOMAIN
    return PluginDescriptor(op=spec.name, name=spec.plugin_name, namespace=DOMAIN, version=str(spec.version),
                            attributes={k: t.__name__ for k, t in spec.attributes.items()},
                            inputs=tuple(spec.inputs), outputs=tuple(spec.outputs), kernels=tuple(kernels),
                            tactics=dict(tactics or {}), launchers=dict(launchers), notes=notes)


def descriptors() -> dict[str, PluginDescriptor]:
    """Every plugin this package defines, by plugin name (no TensorRT needed)."""
    from jambatrt.plugins.registry import implementations
    return {d.name: d for impls in implementations("tensorrt").values() for d in impls[0].extra["descriptors"]}


# ---- TensorRT side (lazy) --------------------------------------------------------------------------
def require_tensorrt():
    """(tensorrt, tensorrt.plugin), or BackendUnavailable naming what is missing."""
    try:
        import tensorrt as trt
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT not installed: {e} (needs TensorRT >= 10.10 with its Python "
                                 "bindings on a CUDA machine; it is not installable from this project's registries)"
                                 ) from None
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:
        raise BackendUnavailable(f"TensorRT {getattr(trt, '__version__', '?')} has no tensorrt.plugin module "
                                 f"({e}); quickly deployable plugins need TensorRT >= 10.7") from None
    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise BackendUnavailable(f"TensorRT {trt.__version__} has no ahead-of-time plugins (QDP aot_impl needs "
                                 "TensorRT >= 10.10)")
    return trt, trtp


# Attributes are declared to tensorrt.plugin as 1-D NumPy arrays: the ONNX parser hands an INT
# attribute over as an int32 array of one element, and TensorRT 10.10 - 11.1 convert a field
# declared `int` with int(array), which NumPy >= 2.4 refuses (TypeError; 11.4 indexes [0]). Declared
# as arrays, every release passes them through (`f.data.astype(...)`), and the bodies get ints.
ATTR_ARRAYS = {"int": (npt.NDArray[np.int32], int), "float": (npt.NDArray[np.float32], float)}


def attribute_value(name: str, value, kind: str):
    """A plugin attribute as the Python int/float the plugin bodies use (from a 1-element array)."""
    convert = ATTR_ARRAYS[kind][1]
    flat = np.asarray(value).reshape(-1)
    if flat.size != 1:
        raise ArtifactError(f"plugin attribute {name!r} has {flat.size} values {flat.tolist()[:4]} (accepted: one {kind})")
    return convert(flat[0])


def qdp_function(name: str, params: list[tuple[str, typing.Any]], returns, body, attributes: dict[str, str]):
    """A function with the exact signature tensorrt.plugin validates (parameter names are the
    plugin's input names, which come from SPEC). `body` receives the bound arguments as a dict,
    attributes (name -> "int"/"float") converted to Python numbers."""
    sig = inspect.Signature([inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=a)
                             for n, a in params], return_annotation=returns)

    def fn(*args, **kwargs):
        bound = dict(sig.bind(*args, **kwargs).arguments)
        for a, kind in attributes.items():
            if a in bound:
                bound[a] = attribute_value(a, bound[a], kind)
        return body(bound)

    fn.__signature__ = sig
    fn.__name__ = fn.__qualname__ = name
    return fn


ACTIVATIONS = ("bfloat16", "float32")    # the activation dtypes every plugin accepts


def define_plugin(trtp, desc: PluginDescriptor, describe, io_types, aot_impl) -> None:
    """Register one QDP plugin with tensorrt.plugin: its shape/type function, autotune and AOT
    implementation, each with the exact signature QDP validates — the inputs by name, then the
    attributes (describe, aot_impl), then `outputs` (autotune, aot_impl) and `tactic` (aot_impl).
    describe and aot_impl receive the bound arguments as a dict; io_types(activation dtype) -> the
    plugin's I/O dtypes: autotune offers one combination per activation dtype, with the
    descriptor's tactics."""
    def autotune(a):
        return [combination(trtp, io_types(act), desc.tactics) for act in ACTIVATIONS]

    ins = tensor_params(trtp, desc.inputs)
    attrs = [(a, ATTR_ARRAYS[t][0]) for a, t in desc.attributes.items()]
    empty = inspect.Parameter.empty
    pid = desc.plugin_id
    kinds = dict(desc.attributes)
    trtp.register(pid)(qdp_function(f"{desc.name}_describe", ins + attrs,
                                    outputs_annotation(trtp, len(desc.outputs)), describe, kinds))
    trtp.autotune(pid)(qdp_function(f"{desc.name}_autotune", ins + [("outputs", empty)],
                                    list[trtp.AutoTuneCombination], autotune, kinds))
    trtp.aot_impl(pid)(qdp_function(f"{desc.name}_aot_impl", ins + attrs + [("outputs", empty), ("tactic", int)],
                                    aot_returns(trtp), aot_impl, kinds))


def tensor_params(trtp, names) -> list[tuple[str, typing.Any]]:
    return [(n, trtp.TensorDesc) for n in names]


def aot_returns(trtp):
    return typing.Tuple[typing.Union[str, bytes], typing.Union[str, bytes], trtp.KernelLaunchParams, trtp.SymIntExprs]


def outputs_annotation(trtp, n: int):
    return trtp.TensorDesc if n == 1 else typing.Tuple[tuple([trtp.TensorDesc] * n)]


def dtype_name(trt, dt) -> str:
    """trt.DataType -> torch-style name ("bfloat16", "float32", ...)."""
    names = {trt.float32: "float32", trt.float16: "float16", trt.bfloat16: "bfloat16", trt.int8: "int8",
             trt.int32: "int32", trt.int64: "int64"}
    if dt not in names:
        raise BackendUnavailable(f"no kernel for TensorRT type {dt}")
    return names[dt]


TRT_TYPE = {"float32": "FP32", "bfloat16": "BF16", "float16": "FP16", "int8": "INT8", "int32": "INT32"}


def combination(trtp, types: list[str], tactics=None):
    """AutoTuneCombination for one fixed list of I/O dtypes (torch-style names), LINEAR layouts."""
    return trtp.AutoTuneCombination(", ".join(TRT_TYPE[t] for t in types), ", ".join(["LINEAR"] * len(types)),
                                    list(tactics) if tactics else None)


def build_arch() -> int:
    """Compute capability of the GPU the engine is built for (JAMBATRT_CUDA_ARCH overrides)."""
    env = os.environ.get("JAMBATRT_CUDA_ARCH")
    if env:
        from jambatrt.plugins.gpu.aot import parse_arch
        return parse_arch(env)
    try:
        import torch
        if torch.cuda.is_available():
            major, minor = torch.cuda.get_device_capability()
            return major * 10 + minor
    except ImportError:
        pass
    raise BackendUnavailable("no CUDA GPU visible to pick the kernels' arch (set JAMBATRT_CUDA_ARCH=sm_90 to "
                             "build for another GPU)")


def compile_for_trt(spec):
    """Compile a KernelSpec for the build GPU -> (kernel name, PTX bytes, compiled kernel)."""
    from jambatrt.plugins.gpu.aot import check_scratch, compile_kernel
    compiled = compile_kernel(spec, build_arch())
    check_scratch(spec, compiled)
    if compiled.metadata.shared > MAX_STATIC_SHARED:
        raise BackendUnavailable(f"kernel {spec.name} uses {compiled.metadata.shared} B of shared memory; TensorRT's "
                                 f"AOT launch gives at most {MAX_STATIC_SHARED} B (use smaller tiles)")
    ptx = compiled.asm["ptx"]
    return compiled.metadata.name, ptx.encode() if isinstance(ptx, str) else ptx, compiled


def aot_launch(trtp, spec, plan):
    """What an aot_impl returns for one launch: (kernel name, PTX, launch parameters, int32
    arguments). `plan` is the kernel's own Launch (plugins/gpu `<kernel>_launch`, computed over
    shape expressions): the grid and arguments the eager launcher uses for the same shapes."""
    name, ptx, compiled = compile_for_trt(spec)
    return name, ptx, launch(trtp, compiled, *plan.grid), sym_extras(trtp, plan.extras)


def launch(trtp, compiled, grid_x, grid_y=1, grid_z=1):
    return trtp.KernelLaunchParams(grid_x=grid_x, grid_y=grid_y, grid_z=grid_z,
                                   block_x=compiled.metadata.num_warps * 32, shared_mem=compiled.metadata.shared)


def sym_extras(trtp, values):
    """int32 kernel arguments after the inputs: shape expressions or ints."""
    return trtp.SymIntExprs.from_tuple([trtp.SymInt32(v) for v in values])


def constant(expr, what: str) -> int:
    """The value of a shape expression that must be known when the engine is built (weights)."""
    if isinstance(expr, int):
        return expr
    if _value(expr.is_constant):
        # a method on SymIntExpr/ShapeExpr in TensorRT 10.10 - 11.4, though their abstract base
        # declares a property: int(expr.constant_value) raised TypeError in every aot_impl
        return int(_value(expr.constant_value))
    raise BackendUnavailable(f"{what} must be a build-time constant (it sets a kernel's tile sizes)")


def _value(attr):
    """A property's value, or a method's result (tensorrt.plugin has used both for the same name)."""
    return attr() if callable(attr) else attr


_REGISTERED: set[str] = set()


def register_all() -> list[str]:
    """Register every plugin with TensorRT's registry (idempotent); returns the plugin ids.
    Must run in the process that parses the ONNX model and builds the engine."""
    from jambatrt.plugins.registry import implementations
    require_tensorrt()
    for op, (impl, *_) in implementations("tensorrt").items():
        if op not in _REGISTERED:
            impl.fn()
            _REGISTERED.add(op)
    return [d.plugin_id for d in descriptors().values()]
