"""What every layer of the stack must agree on for one op: names, ONNX signature (types, shape
rules, what an absent input means), tolerances. Plain data: nothing here imports onnx."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Union

import torch

DOMAIN = "jamba"          # ONNX domain, torch library namespace and TensorRT plugin namespace
DOMAIN_VERSION = 1
ACTIVATION = "T"          # an input/output type: the activation type (float32, bfloat16, float16)

# A dim of a shape rule: an int, None (unknown) or a symbolic dim passed through as it is.
Dims = Optional[list]
# One dim of an absent input's zeros: a constant, or (input, axis) / (input, axis, offset): that
# input's size along axis, plus offset.
ZeroDim = Union[int, tuple]


@dataclass(frozen=True)
class OpSpec:
    name: str                                   # e.g. "selective_scan" -> torch.ops.jamba.selective_scan
    onnx_op_type: str                           # e.g. "SelectiveScan" in domain `jamba`
    inputs: tuple[str, ...]                     # ONNX/plugin input names, in order
    optional_inputs: frozenset[str]             # inputs that may be absent
    outputs: tuple[str, ...]
    # ONNX element type per input / output: ACTIVATION or a fixed dtype name ("float32", "int8")
    input_types: tuple[str, ...]
    output_types: tuple[str, ...]
    # ONNX shape inference: {present input: dims or None (rank unknown)} -> dims of every output
    output_shapes: Callable[[dict[str, Dims]], list[Dims]]
    attributes: dict[str, type] = field(default_factory=dict)   # name -> int | float
    # absent optional input -> the zeros that stand for it (backends whose kernels take every
    # input: ONNX Runtime's Python ops, TensorRT plugins); an optional input without a rule must
    # be present for them
    zero_inputs: dict[str, tuple[ZeroDim, ...]] = field(default_factory=dict)
    # (atol, rtol) per activation dtype, for every kernel against `<op>_ref`
    tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    version: int = DOMAIN_VERSION

    def __post_init__(self):
        if len(self.input_types) != len(self.inputs) or len(self.output_types) != len(self.outputs):
            raise ValueError(f"{self.name}: one type per input and per output")
        unknown = (set(self.optional_inputs) | set(self.zero_inputs)) - set(self.inputs)
        if unknown or not set(self.zero_inputs) <= set(self.optional_inputs):
            raise ValueError(f"{self.name}: optional/zero inputs {sorted(unknown or self.zero_inputs)} "
                             "must be optional inputs of the op")

    @property
    def qualname(self) -> str:
        return f"{DOMAIN}::{self.name}"

    @property
    def plugin_name(self) -> str:
        """TensorRT plugin name: the ONNX parser matches node op_type == plugin name."""
        return self.onnx_op_type

    def io_types(self, activation: str) -> list[str]:
        """Every input's then every output's dtype name for one activation dtype."""
        return [activation if t == ACTIVATION else t for t in (*self.input_types, *self.output_types)]
