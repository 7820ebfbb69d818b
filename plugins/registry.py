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
Importing this module is cheap: it imports no implementation until asked."""

from __future__ import annotations

import importlib
import importlib.util
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
