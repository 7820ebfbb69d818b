"""What every layer of the stack must agree on for one op: names, ONNX signature, tolerances."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

DOMAIN = "jamba"          # ONNX domain, torch library namespace and TensorRT plugin namespace
DOMAIN_VERSION = 1


@dataclass(frozen=True)
class OpSpec:
    name: str                                   # e.g. "selective_scan" -> torch.ops.jamba.selective_scan
    onnx_op_type: str                           # e.g. "SelectiveScan" in domain `jamba`
    inputs: tuple[str, ...]                     # ONNX/plugin input names, in order
    optional_inputs: frozenset[str]             # inputs that may be absent
    outputs: tuple[str, ...]
    attributes: dict[str, type] = field(default_factory=dict)   # name -> int | float
    # (atol, rtol) per activation dtype, for every kernel against `<op>_ref`
    tolerances: dict[torch.dtype, tuple[float, float]] = field(default_factory=dict)
    version: int = DOMAIN_VERSION

    @property
    def qualname(self) -> str:
        return f"{DOMAIN}::{self.name}"

    @property
    def plugin_name(self) -> str:
        """TensorRT plugin name: the ONNX parser matches node op_type == plugin name."""
        return self.onnx_op_type
