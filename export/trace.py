"""torch.export of JambaLM with dynamic batch and sequence length (1 .. max_position_embeddings).

Two programs:
- prefill: input_ids [B,L] -> (logits [B,L,V], *state)                  -> program.pt2
- step:    input_ids [B,L], state (P past tokens) -> (logits, *state)  -> model.onnx
  `step` serves prefill from scratch (zero state, P = 0), chunked prefill (state carried) and
  decode (L = 1). The custom ops stay opaque nodes (`torch.ops.jamba.*`): no L x L tensor,
  no graph break.

Tracing needs shapes, not weights: `fake_model` gives the model fake CPU tensors (no memory, any
size), so Jamba-1.5-Large traces on a laptop; the weights are bound later from the artifact's store
(export/weights.py)."""

from __future__ import annotations

import torch
from torch.export import Dim, ExportedProgram

from jambatrt.config import JambaConfig
from jambatrt.export.model import JambaLM, state_shapes

MAX_BATCH = 64


def fake_model(cfg: JambaConfig, dtype: torch.dtype = torch.float32, experts_int8: bool = True,
               weights_int8: bool = False) -> JambaLM:
    """JambaLM whose parameters and buffers are FakeTensors on the CPU: what torch.export needs to
    trace (shapes, dtypes, devices), none of the memory. Shared weights stay shared."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from jambatrt.export.weights import meta_model

    model = meta_model(cfg, dtype, experts_int8, weights_int8=weights_int8)
    mode = FakeTensorMode(allow_non_fake_inputs=True)
    fakes: dict[int, torch.Tensor] = {}

    def fake(t: torch.Tensor, param: bool) -> torch.Tensor:
        if id(t) not in fakes:
            with mode:
                f = torch.empty(t.shape, dtype=t.dtype, device="cpu")
            fakes[id(t)] = torch.nn.Parameter(f, requires_grad=False) if param else f
        return fakes[id(t)]

    for mod in model.modules():
        for n, p in mod._parameters.items():
            if p is not None:
                mod._parameters[n] = fake(p, True)
        for n, b in mod._buffers.items():
            if b is not None:
                mod._buffers[n] = fake(b, False)
    return model


class PrefillProgram(torch.nn.Module):
    """input_ids [B,L] -> (logits [B,L,V], *state) with no incoming state."""

    def __init__(self, model: JambaLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor):
        logits, state = self.model(input_ids)
        return (logits, *state)


class StepProgram(torch.nn.Module):
    """(input_ids [B,L], state list) -> (logits [B,L,V], *new state)."""

    def __init__(self, model: JambaLM):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, state: list[torch.Tensor]):
        logits, new_state = self.model(input_ids, list(state))
        return (logits, *new_state)


class StageProgram(torch.nn.Module):
    """One pipeline stage, layers [a, b): (x, their state list) -> (y, *their new state). x is input_ids
    [B,L] on the first stage (a = 0), hidden_in [B,L,H] on the others; y is logits [B,L,V] on the last
    (b = all layers), hidden_out [B,L,H] on the others -- the cut graph/passes/split_stages.py makes of
    model.onnx, made here from the model itself (AOTInductor stage engines, engines/staged.py)."""

    def __init__(self, model: JambaLM, a: int, b: int):
        super().__init__()
        self.model, self.a, self.b = model, a, b

    def forward(self, x: torch.Tensor, state: list[torch.Tensor]):
        m = self.model
        h = m.model.embed_tokens(x) if self.a == 0 else x
        h, new_state = m.run_layers(h, list(state), self.a, self.b)
        y = m.lm_head(m.model.final_layernorm(h)) if self.b == m.config.num_hidden_layers else h
        return (y, *new_state)


def _dims(max_seq: int, max_batch: int):
    return (Dim("batch", min=1, max=max_batch), Dim("seq", min=1, max=max_seq), Dim("past", min=0, max=max_seq))


def _check(model: JambaLM):
    if model.impl != "custom":
        raise ValueError("export needs the custom-op model (impl='custom'), not the _ref model")


def export_prefill(model: JambaLM, max_seq: int | None = None, max_batch: int = MAX_BATCH) -> ExportedProgram:
    _check(model)
    batch, seq, _ = _dims(max_seq or model.config.max_position_embeddings, max_batch)
    example = torch.zeros(2, 17, dtype=torch.long)
    with torch.no_grad():
        return torch.export.export(PrefillProgram(model).eval(), (example,),
                                   dynamic_shapes={"input_ids": {0: batch, 1: seq}}, strict=False)


def zero_state(model: JambaLM, batch: int, past: int = 0) -> list[torch.Tensor]:
    dtype = next(model.parameters()).dtype
    return [torch.zeros(shape, dtype=dt or dtype) for _, shape, dt in state_shapes(model.config, batch, past)]


def export_step(model: JambaLM, max_seq: int | None = None, max_batch: int = MAX_BATCH) -> ExportedProgram:
    return _export_stateful(StepProgram(model), model, 0, model.config.num_hidden_layers, max_seq, max_batch)


def export_stage(model: JambaLM, a: int, b: int, max_seq: int | None = None,
                 max_batch: int = MAX_BATCH) -> ExportedProgram:
    """The pipeline stage of layers [a, b) (StageProgram), dynamic batch, seq and past as export_step."""
    return _export_stateful(StageProgram(model, a, b), model, a, b, max_seq, max_batch)


def _export_stateful(program: torch.nn.Module, model: JambaLM, a: int, b: int, max_seq: int | None,
                     max_batch: int) -> ExportedProgram:
    """torch.export of (x, state of layers [a, b)) -> ...; x: ids [B,L] when a = 0, else hidden [B,L,H]."""
    _check(model)
    batch, seq, past = _dims(max_seq or model.config.max_position_embeddings, max_batch)
    shapes = state_shapes(model.config, 2, 5)[2 * a:2 * b]
    state_dyn = [{0: batch, 1: past} if name.endswith((".k", ".v")) else {0: batch} for name, _, _ in shapes]
    x = (torch.zeros(2, 3, dtype=torch.long) if a == 0
         else torch.zeros(2, 3, model.config.hidden_size, dtype=next(model.parameters()).dtype))
    example = (x, zero_state(model, 2, 5)[2 * a:2 * b])
    with torch.no_grad():
        return torch.export.export(program.eval(), example, dynamic_shapes=({0: batch, 1: seq}, state_dyn),
                                   strict=False)
