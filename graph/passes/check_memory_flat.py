"""Refuse a graph holding any tensor with the sequence dimension twice (an L x L tensor): at
262,144 tokens one such fp32 tensor per head is 256 GiB."""

from __future__ import annotations

import re

import onnx

from jambatrt.errors import ArtifactError

SEQ = re.compile(r"\bseq\b")   # the exporter names the dynamic length `seq`; expressions keep it


def quadratic_tensors(model: onnx.ModelProto) -> list[str]:
    """Names and shapes of every typed tensor with two dims that depend on the sequence length."""
    g = model.graph
    bad = []
    for vi in list(g.value_info) + list(g.output) + list(g.input):
        dims = [d.dim_param for d in vi.type.tensor_type.shape.dim]
        if sum(bool(SEQ.search(d)) for d in dims) >= 2:
            bad.append(f"{vi.name} {dims}")
    return bad


def check_memory_flat(model: onnx.ModelProto, settings=None) -> onnx.ModelProto:
    bad = quadratic_tensors(model)
    if bad:
        raise ArtifactError("graph holds tensor(s) with two sequence-length dimensions: " + "; ".join(bad[:5]))
    return model
