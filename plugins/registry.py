"""Every implementation of every jamba op, per target, registered by the implementation itself (as
Torch-TensorRT registers its converters): a function in plugins/<folder>/<op>.py decorated with
`@implements(op, target)` implements `op` for `target`. Nothing else lists them: the op files of
a folder are found by the ops' names (export/ops), imported on first use, and register what they
provide. The test tables (tests/op_test_data.py) are checked against this registry.

    target    folder     what is registered
    cpu       cpu        the torch-level CPU kernel: torch.ops.jamba.<op>'s "cpu" implementation
    ort       cpu        the ONNX Runtime custom-op body (numpy in/out, SPEC.inputs order, attributes
                         as keywords); `out_shapes=` the output shapes for its error outputs
    gpu       gpu        the Triton launcher (torch.ops.jamba.<op>'s "cuda" implementation);
                         `traceable=` its wrap_triton twin, `kernels=` the Triton kernels the twin
                         launches, `aot=` (dtypes, config) -> the KernelSpecs compiled ahead of time
    tensorrt  tensorrt   `register()` of the QDP plugins; `descriptors=` what the ONNX parser matches

A target may register further implementations of an op as variants (`variant=True`: a second
scan kernel, a decode step, the one-launch MoE); each has its own test row.

Session ops (`@session_op(op_type, ...)`): ONNX Runtime ops that only the ORT engine's graphs
have, not exported jamba ops: a lowering target of its pass list (LinearInt8) and the forms the
engine gives a session, whose weights or KV cache live outside the graph (MoEInt8Mapped,
LinearInt8Mapped, CausalAttentionCached; found through `plugins.cpu.ort_ops.bound`). Each
registers beside its kernel in plugins/cpu/ with its ONNX signature; plugins/cpu/ort_ops.py
declares them with the ops' own bodies, and tests/op_test_data.py has a row for each.
Importing this module is cheap: it imports no implementation until asked."""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
from dataclasses import dataclass, field
from typing import Any, Callable

TARGETS = {"cpu": "cpu", "ort": "cpu", "gpu": "gpu", "tensorrt": "tensorrt"}   # target -> plugins/<folder>


@dataclass(frozen=True)
class Implementation:
    op: str
    target: str
    name: str                     # the function's name: unique per op and target
    fn: Callable
    variant: bool = False         # False: the op's own implementation for the target (one per op and target)
    extra: dict[str, Any] = field(default_factory=dict)


_IMPLEMENTATIONS: dict[tuple[str, str], dict[str, Implementation]] = {}   # (target, op) -> name -> impl


def implements(op: str, target: str, *, variant: bool = False, **extra):
    """Decorator: the function implements `op` for `target` (see the module docstring)."""
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r} (accepted: {', '.join(TARGETS)})")

    def register(fn):
        impls = _IMPLEMENTATIONS.setdefault((target, op), {})
        impl = Implementation(op, target, fn.__name__, fn, variant, dict(extra))
        if not variant and any(not i.variant and i.name != impl.name for i in impls.values()):
            raise ValueError(f"{op} has two {target} implementations")
        impls[impl.name] = impl          # a module imported again replaces its own entries
        return fn
    return register


def has_file(target: str, op: str) -> bool:
    """Whether plugins/<folder>/<op>.py exists (without importing it)."""
    return importlib.util.find_spec(f"jambatrt.plugins.{TARGETS[target]}.{op}") is not None


def _load(target: str) -> None:
    from jambatrt.export.ops import SPECS
    for op in SPECS:
        if has_file(target, op):
            importlib.import_module(f"jambatrt.plugins.{TARGETS[target]}.{op}")


def implementations(target: str, variants: bool = False) -> dict[str, list[Implementation]]:
    """op -> its implementations for `target` (the op's own first; with `variants`, the others too),
    for every op that has one. Imports the target's op files."""
    _load(target)
    out = {}
    for (t, op), impls in sorted(_IMPLEMENTATIONS.items()):
        chosen = sorted((i for i in impls.values() if variants or not i.variant), key=lambda i: (i.variant, i.name))
        if t == target and chosen:
            out[op] = chosen
    return out


def implementation(target: str, op: str) -> Implementation:
    """The op's own implementation for `target`; LookupError when it has none."""
    impls = implementations(target).get(op)
    if not impls:
        raise LookupError(f"{op} has no {target} implementation (plugins/{TARGETS[target]}/{op}.py registers "
                          f"one with @implements({op!r}, {target!r}))")
    return impls[0]


@dataclass(frozen=True)
class SessionOp:
    op_type: str                  # jamba::<op_type>
    fn: Callable                  # numpy in (inputs in order, attributes as keywords), numpy out
    inputs: tuple[str, ...]       # element types: "float32" | "int8"
    outputs: tuple[str, ...]
    attributes: dict[str, type]   # name -> int | float | str
    out_shapes: Callable          # (*inputs) -> the output shapes, for the error outputs


_SESSION_OPS: dict[str, SessionOp] = {}


def session_op(op_type: str, *, inputs: tuple[str, ...], outputs: tuple[str, ...] = ("float32",),
               attributes: dict[str, type] | None = None, out_shapes: Callable):
    """Decorator: the function is the body of ONNX Runtime session op `jamba::<op_type>` (see the
    module docstring)."""
    def register(fn):
        old = _SESSION_OPS.get(op_type)
        if old is not None and (old.fn.__module__, old.fn.__name__) != (fn.__module__, fn.__name__):
            raise ValueError(f"session op {op_type} is registered twice ({old.fn.__module__}.{old.fn.__name__}, "
                             f"{fn.__module__}.{fn.__name__})")
        _SESSION_OPS[op_type] = SessionOp(op_type, fn, tuple(inputs), tuple(outputs), dict(attributes or {}),
                                          out_shapes)
        return fn
    return register


def session_ops() -> dict[str, SessionOp]:
    """op type -> its session op. Imports every module of plugins/cpu (they register themselves)."""
    import jambatrt.plugins.cpu as cpu
    for m in pkgutil.iter_modules(cpu.__path__):
        importlib.import_module(f"{cpu.__name__}.{m.name}")
    return dict(sorted(_SESSION_OPS.items()))
