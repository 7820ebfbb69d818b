"""A stand-in for TensorRT's compiled Python module, so that TensorRT's own `tensorrt.plugin`
(QDP) can be imported and driven without libnvinfer.

The wheel `tensorrt-cu12-bindings` ships `tensorrt_bindings/plugin/` as plain Python (register,
autotune, aot_impl, the plugin and creator classes, shape expressions, attribute conversion) on
top of `tensorrt.so`, a pybind11 module over libnvinfer, which cannot be installed here. This file
replaces only that compiled module: it is loaded as the module `tensorrt` (tests/
test_tensorrt_plugin_layer.py) with the wheel's folder as its `__path__`, so `import tensorrt.plugin`
runs NVIDIA's code unchanged over these types.

What it imitates, from TensorRT's bindings (python/src/infer/pyPlugin.cpp, pyFoundationalTypes.cpp)
and headers (NvInferRuntimePlugin.h, NvInferRuntime.h):
- enums DataType (+ the aliases trt.float32, trt.bfloat16, ...), PluginFieldType, TensorFormat,
  TensorRTPhase, QuickPluginCreationRequest, DimensionOperation, PluginArgType, PluginArgDataType;
- PluginField: `data` reads `size` entries of the field's type from the buffer it was built on and
  returns them as a new 1-D array (kCHAR as int8, pybind11's `char`); PluginFieldCollection: len()
  and [i] (IndexError past the end);
- Dims (from a sequence; MAX_DIMS 8), DimsExprs, PluginTensorDesc, DynamicPluginTensorDesc;
- IDimensionExpr / IExprBuilder: constant() and operation(); an operation on two constants is a
  constant, as TensorRT's builder folds it (so a weight's dims stay build-time constants through
  `w13.shape_expr[1] // 2`); ISymExpr and ISymExprs (the setter the AOT launch parameters go into);
- the plugin registry: register_creator(creator, namespace) and get_creator(name, version,
  namespace) matching all three exactly, None when absent (IPluginRegistry);
- the base classes tensorrt.plugin derives from (IPluginV3, IPluginV3Quick*, IPluginCreatorV3Quick),
  ITensor (only for isinstance), Logger.
Not imitated: networks, builders, engines, CUDA. TensorRT's calls on a plugin (parser, builder)
are made by the test harness, in TensorRT's order.

Beyond TensorRT's API, for the harness: `symbol(name)` (a dynamic dimension, e.g. "seq"), and
`IDimensionExpr.evaluate(dims)`, its value for concrete dimensions."""

from __future__ import annotations

import enum

import numpy as np


# ---- enums -----------------------------------------------------------------------------------------
class DataType(enum.Enum):
    FLOAT = 0
    HALF = 1
    INT8 = 2
    INT32 = 3
    BOOL = 4
    UINT8 = 5
    FP8 = 6
    BF16 = 7
    INT64 = 8
    INT4 = 9
    FP4 = 10


float32, float16, bfloat16, int8, int32, int64 = (DataType.FLOAT, DataType.HALF, DataType.BF16, DataType.INT8,
                                                  DataType.INT32, DataType.INT64)
bool, uint8, fp8, int4 = DataType.BOOL, DataType.UINT8, DataType.FP8, DataType.INT4   # noqa: A001 (trt.bool)


class PluginFieldType(enum.Enum):
    FLOAT16 = 0
    FLOAT32 = 1
    FLOAT64 = 2
    INT8 = 3
    INT16 = 4
    INT32 = 5
    CHAR = 6
    DIMS = 7
    UNKNOWN = 8
    BF16 = 9
    INT64 = 10
    FP8 = 11
    INT4 = 12
    FP4 = 13


class TensorFormat(enum.Enum):
    LINEAR = 0
    CHW2 = 1
    HWC8 = 2
    CHW4 = 3
    CHW16 = 4
    CHW32 = 5
    DHWC8 = 6
    CDHW32 = 7
    HWC = 8
    DLA_LINEAR = 9
    DLA_HWC4 = 10
    HWC16 = 11
    DHWC = 12


class TensorRTPhase(enum.Enum):
    BUILD = 0
    RUNTIME = 1


class QuickPluginCreationRequest(enum.Enum):   # its presence turns tensorrt.plugin's AOT support on
    UNKNOWN = 0
    PREFER_JIT = 1
    PREFER_AOT = 2
    STRICT_JIT = 3
    STRICT_AOT = 4


class DimensionOperation(enum.Enum):
    SUM = 0
    PROD = 1
    MAX = 2
    MIN = 3
    SUB = 4
    EQUAL = 5
    LESS = 6
    FLOOR_DIV = 7
    CEIL_DIV = 8


class PluginArgType(enum.Enum):
    INT = 0


class PluginArgDataType(enum.Enum):
    INT8 = 0
    INT16 = 1
    INT32 = 2


# ---- plugin fields ---------------------------------------------------------------------------------
# the element type PluginField.data returns per field type (pyPlugin.cpp's getter); others raise there
_FIELD_DTYPES = {PluginFieldType.INT32: np.int32, PluginFieldType.UNKNOWN: np.int8, PluginFieldType.INT8: np.int8,
                 PluginFieldType.INT16: np.int16, PluginFieldType.FLOAT32: np.float32,
                 PluginFieldType.FLOAT64: np.float64, PluginFieldType.INT64: np.int64, PluginFieldType.CHAR: np.int8}


class PluginField:
    def __init__(self, name="", data=None, type=PluginFieldType.UNKNOWN):   # noqa: A002 (the bindings' name)
        self.name, self.type = name, type
        if data is None:
            self._bytes, self.size = b"", 0
        else:
            view = memoryview(data)                      # the buffer protocol, as py::buffer
            self._bytes = view.cast("B").tobytes() if view.ndim else view.tobytes()
            self.size = int(np.prod(view.shape)) if view.ndim else 1   # entries, whatever their width

    @property
    def data(self):
        if self.type not in _FIELD_DTYPES:
            raise AttributeError("No known conversion for returning data from PluginField")
        dt = np.dtype(_FIELD_DTYPES[self.type])
        if len(self._bytes) < self.size * dt.itemsize:   # C++ would read past the buffer
            raise ValueError(f"PluginField {self.name!r}: {self.size} x {dt} from a {len(self._bytes)}-byte buffer")
        return np.frombuffer(self._bytes, dtype=dt, count=self.size).copy()


class PluginFieldCollection:
    def __init__(self, fields=()):
        self._fields = list(fields)

    def __len__(self):
        return len(self._fields)

    def __getitem__(self, index):
        if not 0 <= index < len(self._fields):
            raise IndexError(index)
        return self._fields[index]


# ---- shapes ------------------------------------------------------------------------------------------
class Dims(list):
    MAX_DIMS = 8

    def __init__(self, shape=()):
        super().__init__(int(d) for d in shape)
        if len(self) > self.MAX_DIMS:
            raise ValueError(f"Dims: {len(self)} dimensions (at most {self.MAX_DIMS})")


class DimsExprs:
    def __init__(self, n=0):
        self._exprs = [None] * n

    def __len__(self):
        return len(self._exprs)

    def __getitem__(self, i):
        return self._exprs[i]

    def __setitem__(self, i, expr):
        if not isinstance(expr, IDimensionExpr):
            raise TypeError(f"DimsExprs[{i}] = {type(expr).__name__} (accepted: IDimensionExpr)")
        self._exprs[i] = expr


class PluginTensorDesc:
    def __init__(self):
        self.dims, self.type, self.format, self.scale = Dims(), DataType.FLOAT, TensorFormat.LINEAR, -1.0


class DynamicPluginTensorDesc:
    def __init__(self):
        self.desc, self.min, self.max, self.opt = PluginTensorDesc(), Dims(), Dims(), Dims()


_OPS = {DimensionOperation.SUM: lambda a, b: a + b, DimensionOperation.PROD: lambda a, b: a * b,
        DimensionOperation.MAX: max, DimensionOperation.MIN: min, DimensionOperation.SUB: lambda a, b: a - b,
        DimensionOperation.EQUAL: lambda a, b: int(a == b), DimensionOperation.LESS: lambda a, b: int(a < b),
        DimensionOperation.FLOOR_DIV: lambda a, b: a // b, DimensionOperation.CEIL_DIV: lambda a, b: -(-a // b)}


class IDimensionExpr:
    """A constant, a named dynamic dimension, or an operation on two expressions."""

    def __init__(self, op, args=(), value=None):
        self._op, self._args, self._value = op, tuple(args), value

    def is_constant(self):
        return self._op == "const"

    def get_constant_value(self):
        if not self.is_constant():
            raise RuntimeError("get_constant_value() of a non-constant IDimensionExpr")
        return self._value

    def is_size_tensor(self):
        return False

    # harness, not TensorRT: the value for concrete dimensions {"batch": 2, "seq": 17, ...}
    def evaluate(self, dims: dict) -> int:
        if self._op == "const":
            return self._value
        if self._op == "sym":
            return int(dims[self._value])
        a, b = (x.evaluate(dims) for x in self._args)
        return int(_OPS[self._op](a, b))

    def __repr__(self):
        if self._op in ("const", "sym"):
            return str(self._value)
        return f"{self._op.name}({', '.join(map(repr, self._args))})"


def symbol(name: str) -> IDimensionExpr:
    """Harness, not TensorRT: a dynamic dimension of a network input (what the parser declares)."""
    return IDimensionExpr("sym", value=name)


class IExprBuilder:
    def constant(self, value):
        return IDimensionExpr("const", value=int(value))

    def operation(self, op, first, second):
        if not isinstance(op, DimensionOperation):
            raise TypeError(f"operation({op!r}) (accepted: DimensionOperation)")
        if first.is_constant() and second.is_constant():
            return self.constant(_OPS[op](first.get_constant_value(), second.get_constant_value()))
        return IDimensionExpr(op, (first, second))

    def declare_size_tensor(self, output_index, opt, upper):
        raise NotImplementedError("size tensors (data-dependent shapes): no jamba plugin declares one")


class ISymExpr:
    def __init__(self):
        pass


class ISymExprs:
    """The setter get_launch_params() writes the kernel's extra int arguments into."""

    def __init__(self):
        self.nbSymExprs = 0
        self.exprs = {}

    def __setitem__(self, i, sym_expr):
        if not 0 <= i < self.nbSymExprs:
            raise IndexError(i)
        if not isinstance(sym_expr, ISymExpr):
            raise TypeError(f"ISymExprs[{i}] = {type(sym_expr).__name__} (accepted: ISymExpr)")
        self.exprs[i] = sym_expr


# ---- plugin interfaces and registry ------------------------------------------------------------------
class _Interface:
    def __init__(self):
        pass


class IPluginV3(_Interface):
    pass


class IPluginV3QuickCore(_Interface):
    pass


class IPluginV3QuickBuild(_Interface):
    pass


class IPluginV3QuickRuntime(_Interface):
    pass


class IPluginV3QuickAOTBuild(_Interface):
    pass


class IPluginCreatorV3Quick(_Interface):
    pass


class ITensor:
    pass


class IPluginRegistry:
    def __init__(self):
        self._creators = {}

    def register_creator(self, creator, plugin_namespace):
        key = (creator.name, creator.plugin_version, plugin_namespace)
        if key in self._creators:
            return False
        self._creators[key] = creator
        return True

    def get_creator(self, name, version, plugin_namespace=""):
        return self._creators.get((name, version, plugin_namespace))


_REGISTRY = IPluginRegistry()


def get_plugin_registry():
    return _REGISTRY


class ILogger:
    class Severity(enum.Enum):
        INTERNAL_ERROR = 0
        ERROR = 1
        WARNING = 2
        INFO = 3
        VERBOSE = 4


class Logger(ILogger):
    INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = ILogger.Severity

    def __init__(self, min_severity=ILogger.Severity.WARNING):
        self.min_severity = min_severity
        self.messages = []

    def log(self, severity, msg):
        self.messages.append((severity, msg))
