"""jamba::selective_scan -- Mamba's selective scan (softplus on delta, D skip, SiLU(z) gate),
fp32 state in and out. The reference is the plain recurrence, memory O(B*D*N)."""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from jambatrt.export.ops.spec import ACTIVATION as T
from jambatrt.export.ops.spec import OpSpec

F32 = "float32"


def _output_shapes(s):
    """y like u [B,D,L]; state_out [B,D,N] (N from A [D,N])."""
    u, A = s["u"], s.get("A")
    return [u, None if u is None or A is None else [u[0], u[1], A[1]]]


SPEC = OpSpec(
    name="selective_scan",
    onnx_op_type="SelectiveScan",
    inputs=("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state"),
    optional_inputs=frozenset({"z", "delta_bias", "state"}),
    outputs=("y", "state_out"),
    input_types=(T, T, F32, T, T, F32, T, F32, F32),
    output_types=(T, F32),
    output_shapes=_output_shapes,
    zero_inputs={"state": (("u", 0), ("u", 1), ("B", 1))},               # h_0 = 0: [B,D,N] fp32
    tolerances={torch.float32: (5e-5, 1e-4), torch.bfloat16: (3e-2, 3e-2)},
)


def selective_scan_ref(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                       Cm: torch.Tensor, Dskip: torch.Tensor, z: Optional[torch.Tensor] = None,
                       delta_bias: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """u, delta, z [B,D,L]; A [D,N] (negative); Bm, Cm [B,N,L]; Dskip, delta_bias [D];
    state [B,D,N] fp32 or None (zeros).

        dt_t = softplus(delta_t + delta_bias)
        h_t  = exp(dt_t * A) * h_{t-1} + dt_t * B_t * u_t          (fp32)
        y_t  = (C_t . h_t + Dskip * u_t) * SiLU(z_t)

    Returns y [B,D,L] in u.dtype and the last state h_L [B,D,N] fp32."""
    Bsz, D, L = u.shape
    N = A.shape[1]
    dt = delta.float()
    if delta_bias is not None:
        dt = dt + delta_bias.float()[None, :, None]
    dt = F.softplus(dt)
    A, Bm, Cm, uf = A.float(), Bm.float(), Cm.float(), u.float()
    h = u.new_zeros(Bsz, D, N, dtype=torch.float32) if state is None else state.float().clone()
    ys = []
    for t in range(L):
        h = torch.exp(dt[:, :, t, None] * A) * h + (dt[:, :, t] * uf[:, :, t])[:, :, None] * Bm[:, None, :, t]
        ys.append(torch.einsum("bdn,bn->bd", h, Cm[:, :, t]))
    y = torch.stack(ys, dim=2) if ys else uf.new_zeros(Bsz, D, 0)
    y = y + Dskip.float()[None, :, None] * uf
    if z is not None:
        y = y * F.silu(z.float())
    return y.to(u.dtype), h


@torch.library.custom_op("jamba::selective_scan", mutates_args=())
def selective_scan(u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, Bm: torch.Tensor,
                   Cm: torch.Tensor, Dskip: torch.Tensor, z: Optional[torch.Tensor] = None,
                   delta_bias: Optional[torch.Tensor] = None, state: Optional[torch.Tensor] = None,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    return selective_scan_ref(u, delta, A, Bm, Cm, Dskip, z, delta_bias, state)


@selective_scan.register_fake
def _(u, delta, A, Bm, Cm, Dskip, z=None, delta_bias=None, state=None):
    Bsz, D, _ = u.shape
    return u.new_empty(u.shape), u.new_empty(Bsz, D, A.shape[1], dtype=torch.float32)
