"""Decode per-token time against context length, the contexts interleaved step by step.

    python -m jambatrt.validate.decode_flat ARTIFACT [--contexts 1024,4096,16384,65536]
        [--steps 64] [--report bench/decode-flat-float32.json]

One ORT engine per context in one process (each has its own in-place KV cache: a cache is only
kept by the engine that handed its state out last, so one engine would restart its cache whenever
it switched context). Each engine prefills its context, then the steps go round-robin over the
contexts: step 1 at every context, step 2 at every context, ... A shared machine's speed drifts
by 2x within minutes (other processes, memory bandwidth), so only times taken side by side can be
compared: the report gives, per context, the median per-token time and, per round, its ratio to
the shortest context's step of the same round (median of those ratios). Flat means every median
ratio within `--flat-within` (default 1.2) of 1.

What bounds flatness, measured in the same rounds: after each round's steps, every engine's KV cache
(the bytes its attention reads) is read once plainly, on all threads, with nothing computed. The floor
of a round is (shortest step + this context's read - the shortest context's read) / shortest step: the
ratio if the longer context cost only its extra cache bytes at a plain read's speed. A decode step's
weights stream between two reads, so each read starts from memory as the attention does.

Writes the JSON report and prints one line per context."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np
from numba import njit, prange

from jambatrt.plugins.cpu.prefetch import LINE


@njit(parallel=True, cache=True)
def _read_lines(a):
    """One byte of every cache line of a (uint8, 1-D), in 64 KB chunks over numba's threads: the lines'
    traffic from memory, nothing computed. Returns their sum (so the loads stay)."""
    chunk = 1 << 16
    n = (a.size + chunk - 1) // chunk
    total = 0
    for c in prange(n):
        s = 0
        for i in range(c * chunk, min(a.size, (c + 1) * chunk), LINE):
            s += a[i]
        total += s
    return total


def read_ms(arrays: list[np.ndarray]) -> float:
    """Milliseconds to read arrays (each [B, ...], every batch row C-contiguous) once with _read_lines."""
    rows = [a[b].reshape(-1).view(np.uint8) for a in arrays for b in range(a.shape[0])]
    t = time.perf_counter()
    for r in rows:
        _read_lines(r)
    return 1e3 * (time.perf_counter() - t)


def measure(artifact: Path, contexts: list[int], steps: int, seed: int = 0) -> dict:
    from jambatrt.engines import engine_class

    cls = engine_class("ort")
    rng = np.random.default_rng(seed)
    engines, states, prefill_s = [], [], []
    try:
        for L in contexts:
            eng = cls.load(artifact)
            vocab = eng.config.vocab_size
            ids = rng.integers(3, vocab, (1, L))
            t = time.perf_counter()
            logits, st = eng.prefill(ids, last_only=True)
            prefill_s.append(time.perf_counter() - t)
            engines.append(eng)
            states.append((st, int(np.argmax(logits[0]))))
        for i, eng in enumerate(engines):               # untimed: the first step of each engine
            st, tok = states[i]
            logits, st = eng.decode([tok], st)
            states[i] = (st, int(np.argmax(logits[0])))
        _read_lines(np.zeros(LINE, np.uint8))          # compiled (or loaded) before the timed reads
        times = [[] for _ in contexts]
        reads = [[] for _ in contexts]
        for _ in range(steps):
            for i, eng in enumerate(engines):
                st, tok = states[i]
                t = time.perf_counter()
                logits, st = eng.decode([tok], st)
                times[i].append(time.perf_counter() - t)
                states[i] = (st, int(np.argmax(logits[0])))
            for i, eng in enumerate(engines):
                reads[i].append(read_ms(eng.kv_present()))
        kv_bytes = [sum(a.nbytes for a in eng.kv_present()) for eng in engines]
    finally:
        for eng in engines:
            eng.close()
    rows = []
    for i, L in enumerate(contexts):
        ratios = [a / b for a, b in zip(times[i], times[0])]
        floors = [(1e3 * b + r - r0) / (1e3 * b) for b, r, r0 in zip(times[0], reads[i], reads[0])]
        rows.append({"context": L, "prefill_seconds": prefill_s[i], "decode_ms_median": 1e3 * statistics.median(times[i]),
                     "decode_ms_min": 1e3 * min(times[i]), "decode_ms_max": 1e3 * max(times[i]),
                     "ratio_to_shortest_median": statistics.median(ratios),
                     "kv_bytes": kv_bytes[i], "kv_read_ms_median": statistics.median(reads[i]),
                     "floor_ratio_median": statistics.median(floors),
                     "decode_ms": [round(1e3 * x, 3) for x in times[i]],
                     "kv_read_ms": [round(x, 3) for x in reads[i]]})
    return {"artifact": str(artifact), "contexts": contexts, "steps": steps, "rows": rows,
            "method": "one ORT engine per context, decode steps round-robin over the contexts; "
                      "ratio = a step's time / the shortest context's step in the same round; "
                      "floor = (the shortest step + this context's KV cache read plainly - the shortest "
                      "context's) / the shortest step, the reads after each round's steps"}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("artifact")
    p.add_argument("--contexts", default="1024,4096,16384,65536")
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--flat-within", type=float, default=1.2)
    p.add_argument("--report", default=None)
    a = p.parse_args(argv)
    contexts = sorted(int(x) for x in a.contexts.split(","))
    rep = measure(Path(a.artifact), contexts, a.steps)
    w = max(rep["rows"], key=lambda r: r["ratio_to_shortest_median"])
    worst, floor = w["ratio_to_shortest_median"], w["floor_ratio_median"]
    rep.update(flat_within=a.flat_within, worst_median_ratio=worst, flat=worst <= a.flat_within,
               worst_context=w["context"], floor_at_worst=floor)
    for r in rep["rows"]:
        print(f"context {r['context']:>7,}: decode {r['decode_ms_median']:.2f} ms/token median "
              f"(min {r['decode_ms_min']:.2f}, max {r['decode_ms_max']:.2f}); "
              f"x{r['ratio_to_shortest_median']:.3f} of the shortest context, same rounds; KV cache "
              f"{r['kv_bytes'] / 1e6:.1f} MB read plainly in {r['kv_read_ms_median']:.2f} ms, floor "
              f"x{r['floor_ratio_median']:.3f}")
    print(f"flat within {a.flat_within}: {rep['flat']} (worst median ratio {worst:.3f}, at {w['context']:,}; its "
          f"floor, the KV cache read plainly, x{floor:.3f})")
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
