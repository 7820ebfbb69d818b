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

Writes the JSON report and prints one line per context."""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np


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
        times = [[] for _ in contexts]
        for _ in range(steps):
            for i, eng in enumerate(engines):
                st, tok = states[i]
                t = time.perf_counter()
                logits, st = eng.decode([tok], st)
                times[i].append(time.perf_counter() - t)
                states[i] = (st, int(np.argmax(logits[0])))
    finally:
        for eng in engines:
            eng.close()
    rows = []
    for i, L in enumerate(contexts):
        ratios = [a / b for a, b in zip(times[i], times[0])]
        rows.append({"context": L, "prefill_seconds": prefill_s[i], "decode_ms_median": 1e3 * statistics.median(times[i]),
                     "decode_ms_min": 1e3 * min(times[i]), "decode_ms_max": 1e3 * max(times[i]),
                     "ratio_to_shortest_median": statistics.median(ratios),
                     "decode_ms": [round(1e3 * x, 3) for x in times[i]]})
    return {"artifact": str(artifact), "contexts": contexts, "steps": steps, "rows": rows,
            "method": "one ORT engine per context, decode steps round-robin over the contexts; "
                      "ratio = a step's time / the shortest context's step in the same round"}


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
    worst = max(r["ratio_to_shortest_median"] for r in rep["rows"])
    rep.update(flat_within=a.flat_within, worst_median_ratio=worst, flat=worst <= a.flat_within)
    for r in rep["rows"]:
        print(f"context {r['context']:>7,}: decode {r['decode_ms_median']:.2f} ms/token median "
              f"(min {r['decode_ms_min']:.2f}, max {r['decode_ms_max']:.2f}); "
              f"x{r['ratio_to_shortest_median']:.3f} of the shortest context, same rounds")
    print(f"flat within {a.flat_within}: {rep['flat']} (worst median ratio {worst:.3f})")
    if a.report:
        Path(a.report).parent.mkdir(parents=True, exist_ok=True)
        Path(a.report).write_text(json.dumps(rep, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
