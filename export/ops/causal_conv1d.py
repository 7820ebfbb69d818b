"""jamba::causal_conv1d -- depthwise causal convolution + bias + SiLU, carrying the last K-1 inputs."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from jambatrt.export.ops.spec import ACTIVATION as T
from jambatrt.export.ops.spec import OpSpec


def _output_shapes(s):
    """y like x [B,D,L]; state_out [B,D,K-1] (K from weight [D,K])."""
    x, w = s["x"], s.get("weight")
    k = w[1] - 1 if w and isinstance(w[1], int) else None
    return [x, None if x is None else [x[0], x[1], k]]


SPEC = OpSpec(
    name="causal_conv1d",
    onnx_op_type="CausalConv1d",
    inputs=("x", "weight", "bias", "state"),
    optional_inputs=frozenset({"state"}),
    outputs=("y", "state_out"),
    input_types=(T, T, T, T),
    output_types=(T, T),
    output_shapes=_output_shapes,
    zero_inputs={"state": (("x", 0), ("x", 1), ("weight", 1, -1))},      # no inputs before x: [B,D,K-1]
    tolerances={torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)},
)


def causal_conv1d_ref(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                      state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [B,D,L], weight [D,K], bias [D], state [B,D,K-1] (the K-1 inputs before x; zeros if None).

    Returns y [B,D,L] = SiLU(conv(x) + bias) in x.dtype (fp32 accumulation) and the new state
    [B,D,K-1] = the last K-1 inputs of cat(state, x)."""
    B, D, L = x.shape
    K = weight.shape[1]
    if state is None:
        state = x.new_zeros(B, D, K - 1)
    xs = torch.cat([state.to(x.dtype), x], dim=2)                       # [B,D,K-1+L]
    y = F.conv1d(xs.float(), weight.float().unsqueeze(1), bias.float(), groups=D)  # [B,D,L]
    return F.silu(y).to(x.dtype), xs[:, :, xs.shape[2] - (K - 1):].contiguous()


@torch.library.custom_op("jamba::causal_conv1d", mutates_args=())
def causal_conv1d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                  state: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    return causal_conv1d_ref(x, weight, bias, state)


@causal_conv1d.register_fake   # outputs are contiguous, as every kernel returns them
def _(x, weight, bias, state=None):
    B, D, _ = x.shape
    return x.new_empty(x.shape), x.new_empty(B, D, weight.shape[1] - 1)
