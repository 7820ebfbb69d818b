"""Token generation on any engine: prefill the prompt, then decode one token at a time with the
carried state. Greedy by default; temperature / top-p sampling with a seed, through transformers'
logits warpers (TemperatureLogitsWarper, TopPLogitsWarper) and torch.multinomial."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

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


def pick(logits: np.ndarray, sampling: Sampling, generator) -> np.ndarray:
    """logits [B,V] -> token ids [B]; `generator`: a seeded torch.Generator (unused when greedy)."""
    if sampling.temperature == 0:
        return logits.argmax(-1)
    import torch
    try:
        from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopPLogitsWarper
    except ImportError:
        from jambatrt.errors import BackendUnavailable
        raise BackendUnavailable("sampling (--temperature > 0) uses transformers' logits warpers: pip install "
                                 "'jambatrt[text]' (or transformers)") from None
    z = torch.from_numpy(np.asarray(logits, dtype=np.float64))
    # shift by the max first (softmax does not change): a tiny temperature then sends the others to
    # exp(-inf) = 0 instead of inf - inf = NaN
    z = z - z.max(-1, keepdim=True).values
    warpers = LogitsProcessorList([TemperatureLogitsWarper(float(sampling.temperature))]
                                  + ([TopPLogitsWarper(float(sampling.top_p))] if sampling.top_p < 1 else []))
    probs = torch.softmax(warpers(None, z), dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0].numpy()


def _eos_set(eos_id) -> frozenset:
    if eos_id is None:
        return frozenset()
    return frozenset([int(eos_id)] if isinstance(eos_id, (int, np.integer)) else (int(e) for e in eos_id))


def generate(engine: Engine, prompts: list[list[int]], max_new_tokens: int, sampling: Sampling = Sampling(),
             eos_id: int | Iterable[int] | None = None,
             on_token: Callable[[int, int], None] | None = None) -> tuple[list[Generation], dict]:
    """Generate for each prompt; a sequence stops at any id of `eos_id` (one id or several: Jamba-1.5's
    generation config lists end of text and end of message). Prompts of equal length run as one batch; otherwise each sequence
    runs alone (attention KV of different lengths cannot share one batch tensor), which gives every
    sequence exactly the tokens it gets alone. `on_token(seq_index, token)` streams tokens."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise InputError("empty prompt: give at least one token id per prompt")
    if max_new_tokens < 0:
        raise InputError(f"max_new_tokens={max_new_tokens} (accepted: >= 0)")
    longest = max(len(p) for p in prompts) + max_new_tokens
    if longest > engine.max_seq:
        raise InputError(f"prompt + new tokens = {longest} exceeds the maximum context {engine.max_seq}")
    import torch
    rng = torch.Generator().manual_seed(sampling.seed)
    eos = _eos_set(eos_id)
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
                    if int(tok[j]) in eos:
                        alive[j] = False
            if not alive.any() or step == max_new_tokens - 1:
                break
            logits, state = engine.decode(tok, state)
    total = time.perf_counter() - t0
    n_new = sum(len(g.generated_ids) for g in gens)
    stats = {"tokens_per_s": n_new / total if total > 0 else 0.0,     # prompt processing included
             "prefill_seconds": prefill_s, "total_seconds": total, "new_tokens": n_new}
    return gens, stats
