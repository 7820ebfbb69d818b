"""torch.export of JambaLM with dynamic batch and sequence length (1 .. max_position_embeddings).

The prefill program takes input_ids [B,L] int64 and returns (logits [B,L,V], *state); the
custom ops stay opaque nodes (`torch.ops.jamba.*`), so no L x L tensor and no graph break."""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from jambatrt.export.model import JambaLM

MAX_BATCH = 64


class PrefillProgram(torch.nn.Module):
    """input_ids [B,L] -> (logits [B,L,V], *state) with no incoming state."""

    def __init__(self, model: JambaLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        logits, state = self.model(input_ids)
        return (logits, *state)


def export_prefill(model: JambaLM, max_seq: int | None = None, max_batch: int = MAX_BATCH) -> ExportedProgram:
    if model.impl != "custom":
        raise ValueError("export needs the custom-op model (impl='custom'), not the _ref model")
    max_seq = max_seq or model.config.max_position_embeddings
    example = torch.zeros(2, 17, dtype=torch.long)
    dyn = {"input_ids": {0: Dim("batch", min=1, max=max_batch), 1: Dim("seq", min=1, max=max_seq)}}
    with torch.no_grad():
        return torch.export.export(PrefillProgram(model).eval(), (example,), dynamic_shapes=dyn, strict=False)
