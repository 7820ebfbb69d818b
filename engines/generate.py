"""Token generation on any engine: prefill the prompt, then decode one token at a time with the
carried state. Greedy by default; temperature / top-p sampling with a seed."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from jambatrt.engines.base import Engine
from jambatrt.errors import InputError


@dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise InputError(f"temperature={self.temperature} (accepted: >= 0), top_p={self.top_p} (accepted: (0, 1])")


@dataclass
class Generation:
    prompt_ids: list[int]
    generated_ids: list[int] = field(default_factory=list)


def pick(logits: np.ndarray, sampling: Sampling, rng: np.random.Generator) -> np.ndarray:
    """logits [B,V] -> token ids [B]."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    z = logits.astype(np.float64)
    # shift before dividing: a tiny temperature then sends the others to exp(-inf) = 0, not inf - inf
    p = np.exp((z - z.max(-1, keepdims=True)) / sampling.temperature)
    p /= p.sum(-1, keepdims=True)
    out = np.empty(len(p), dtype=np.int64)
    for b, pb in enumerate(p):
        order = np.argsort(-pb, kind="stable")
        keep = np.cumsum(pb[order]) - pb[order] < sampling.top_p     # smallest set with mass >= top_p
        cand = order[keep]
        out[b] = rng.choice(cand, p=pb[cand] / pb[cand].sum())
    return out


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | None = None, on_token: Callable[[int, int], None] | None = None) -> tuple[list[Generation], dict]:
    """Generate for each prompt. Prompts of equal length run as one batch; otherwise each sequence
    runs alone (attention KV of different lengths cannot share one batch tensor), which gives every
    sequence exactly the tokens it gets alone. `on_token(seq_index, token)` streams tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt: give at least one token id per prompt")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens} (accepted: >= 0)")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > engine.max_seq:
        raise InputError(f"prompt + new tokens = {longest} exceeds the maximum context {engine.max_seq}")
    rng = np.random.default_rng(sampling.seed)
    groups = [list(range(len(prompts)))] if len({len(p) for p in prompts}) == 1 else [[i] for i in range(len(prompts))]
    gens = [Generation(list(p)) for p in prompts]
    t0 = time.perf_counter()
    prefill_s = 0.0
    for idx in groups:
        ids = np.array([prompts[i] for i in idx], dtype=np.int64)
        tp = time.perf_counter()
        logits, state = engine.prefill(ids, last_only=True)
        prefill_s += time.perf_counter() - tp
        alive = np.ones(len(idx), dtype=bool)
        for step in range(max_new_tokens):
            tok = pick(logits, sampling, rng)
            for j, i in enumerate(idx):
                if alive[j]:
                    gens[i].generated_ids.append(int(tok[j]))
                    if on_token:
                        on_token(i, int(tok[j]))
                    if eos_id is not None and tok[j] == eos_id:
                        alive[j] = False
            if not alive.any() or step == max_new_tokens - 1:
                break
            logits, state = engine.decode(tok, state)
    total = time.perf_counter() - t0
    n_new = sum(len(g.generated_ids) for g in gens)
    stats = {"tokens_per_s": n_new / total if total > 0 else 0.0,     # prompt processing included
             "prefill_seconds": prefill_s, "total_seconds": total, "new_tokens": n_new}
    return gens, stats
