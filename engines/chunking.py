"""The chunking plan for long prefill: TensorRT tensor volumes are 32-bit, so no tensor of the
graph may hold 2^31 elements or more — and at 262,144 tokens the logits alone ([L, 65536]) hold
2^34. A prefill of `total` tokens therefore runs as steps of at most `chunk` tokens with the
state carried (Mamba conv/SSM state, attention KV), and the plan proves every step's tensors
(hidden, in_proj output, logits, MoE rows, KV [B,P+C,Hkv,d], scores if materialised) stay under
the limit. The shape arithmetic is in export/plan.py; this module is the policy the engines use."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Iterator

from jambatrt.config import JambaConfig
from jambatrt.errors import InputError
from jambatrt.manifest import Manifest
from jambatrt.export.plan import (DEFAULT_CHUNK_CAP, TENSOR_LIMIT, activation_tensors, largest, max_prefill_chunk,
                                  weight_tensors)


@dataclass(frozen=True)
class ChunkPlan:
    total: int                      # tokens to prefill
    past: int                       # tokens already in the state
    batch: int
    chunk: int                      # tokens per step (the last step may be shorter)
    limit: int
    largest_tensor: str             # over every step of the plan
    largest_elements: int
    weights_over_limit: dict[str, int] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return -(-self.total // self.chunk)

    @property
    def fits(self) -> bool:
        return self.largest_elements <= self.limit

    def chunks(self) -> Iterator[tuple[int, int]]:
        """(start, end) of every step, relative to the new tokens."""
        for s in range(0, self.total, self.chunk):
            yield s, min(self.total, s + self.chunk)

    def as_dict(self) -> dict:
        return {**asdict(self), "steps": self.steps, "fits": self.fits}


def step_tensors(cfg: JambaConfig, batch: int, length: int, past: int, attention_scores: bool = False
                 ) -> dict[str, int]:
    """Element counts of the largest tensors of one step (`length` new tokens after `past`)."""
    return {n: math.prod(s) for n, s in activation_tensors(cfg, batch, length, past, attention_scores).items()}


def plan_chunks(cfg: JambaConfig, total: int, batch: int = 1, past: int = 0, cap: int | None = DEFAULT_CHUNK_CAP,
                limit: int = TENSOR_LIMIT, attention_scores: bool = False) -> ChunkPlan:
    """The longest chunk (<= cap; a power of two when shorter than total) for which every step of
    prefilling `total` tokens after `past` keeps every activation tensor under `limit` elements;
    each step is checked."""
    if total < 1 or batch < 1 or past < 0:
        raise InputError(f"total={total}, batch={batch}, past={past} (accepted: total >= 1, batch >= 1, past >= 0)")
    context = past + total
    chunk = max_prefill_chunk(cfg, batch, context, cap=min(cap or total, total), limit=limit,
                              attention_scores=attention_scores)
    if chunk is None:
        name, n = largest(activation_tensors(cfg, batch, 1, context - 1, attention_scores))
        raise InputError(f"batch {batch} at {context:,} tokens: {name} holds {n:,} elements even one token at a "
                         f"time (accepted: < {limit + 1:,}; lower the batch or the context)")
    worst_name, worst = "", 0
    for s in range(0, total, chunk):
        name, n = largest(activation_tensors(cfg, batch, min(chunk, total - s), past + s, attention_scores))
        if n > worst:
            worst_name, worst = name, n
    over = {n: math.prod(s) for n, s in weight_tensors(cfg).items() if math.prod(s) > limit}
    return ChunkPlan(total=total, past=past, batch=batch, chunk=chunk, limit=limit, largest_tensor=worst_name,
                     largest_elements=worst, weights_over_limit=over)


def engine_chunk_plan(manifest: Manifest, max_batch: int, max_seq: int | None = None, prefill_chunk: int | None = None,
                      chunk_cap: int = DEFAULT_CHUNK_CAP) -> tuple[JambaConfig, int, ChunkPlan]:
    """The plan a GPU engine build (TensorRT, AOTInductor) prefills with: the context is max_seq or
    the step program's; the chunk is the plan's for (max_batch, context), checked as a shape box —
    a full chunk on top of the longest past keeps every activation under 2^31 elements — and an
    explicit prefill_chunk must fit. Returns (config, max_seq, plan); InputError names what to lower."""
    cfg = manifest.config
    max_seq = max_seq or manifest.max_seq
    if max_seq < 1:
        raise InputError(f"max_seq={max_seq} (accepted: >= 1)")
    plan = plan_chunks(cfg, max_seq, max_batch, cap=prefill_chunk or chunk_cap)
    name, n = largest(activation_tensors(cfg, max_batch, plan.chunk, max_seq - 1))
    if n > TENSOR_LIMIT:
        raise InputError(f"batch {max_batch}: a {plan.chunk}-token chunk after {max_seq - 1:,} past tokens "
                         f"makes {name} {n:,} elements (accepted: < 2^31; lower max_batch or max_seq)")
    if prefill_chunk and plan.chunk < prefill_chunk:
        raise InputError(f"prefill_chunk={prefill_chunk}: at batch {max_batch} the largest chunk "
                         f"keeping every tensor under 2^31 elements is {plan.chunk}")
    return cfg, max_seq, plan
