"""ONNX shape inference with the jamba schemas registered (runs our inference functions too)."""

from __future__ import annotations

import onnx

from jambatrt.graph.schemas import register_schemas


def infer_shapes(model: onnx.ModelProto, settings=None) -> onnx.ModelProto:
    register_schemas()
    return onnx.shape_inference.infer_shapes(model, check_type=True, strict_mode=False, data_prop=True)
