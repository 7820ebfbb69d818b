"""Throughput and peak memory of an engine and of the eager reference, per sequence length.

Every (side, length) runs in a fresh child process (`python -m jambatrt.validate.profile --worker
SPEC`), so its peak RSS is its own: the child reports its VmHWM (prefill: the whole run; decode:
after resetting the peak through /proc/self/clear_refs just before decoding) and the parent reads
the child's ru_maxrss from os.wait4 as a cross-check. A child's peak includes the interpreter,
torch/ONNX Runtime and the weights (`baseline_rss_bytes` says how much that is).

In a child: warm-up (a prefill of `warmup_tokens` tokens and `decode_warmup` decode steps; compiles
kernels, creates arenas), then the full-length prefill `repeats` times (fewer once `budget_s`
seconds are spent; at least once), keeping only the last position's logits as generation does,
then `decode_tokens` greedy decode steps from the prefilled state, each timed. tokens/s is the
median; min and max are kept.

Sides: "engine" (the built engine, e.g. ONNX Runtime with the CPU kernels) and "reference":
`eager-custom-ops`, this package's eager JambaLM calling torch.ops.jamba.* (the custom ops, with
whatever CPU kernels are registered for them; the report records which) in chunks with the state
carried. Lengths above `reference_max_length` skip the reference (null, with a note)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REFERENCE_NAME = "eager-custom-ops"
REFERENCE_DESCRIPTION = ("this package's JambaLM in eager PyTorch calling torch.ops.jamba.* custom ops "
                         "(impl=custom), prefilling in chunks of {chunk} tokens with the state carried")
RESULT_TAG = "JAMBATRT_PROFILE_RESULT "


# ---- in the child ------------------------------------------------------------------------------
def _proc_status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _custom_op_kernels() -> dict[str, str]:
    """Which function computes each torch.ops.jamba.* op on CPU (a registered kernel or the
    op's default body, which calls `<op>_ref`)."""
    from jambatrt.export import ops as jops
    out = {}
    for name, mod in jops.REGISTRY.items():
        try:
            fns = getattr(mod, name)._backend_fns
            out[name] = "registered cpu kernel" if "cpu" in fns else f"default body ({name}_ref)"
        except AttributeError:
            out[name] = "unknown"
    return out


def _side(spec: dict):
    """(what is timed, its info): the built engine, or the eager reference on the custom ops; both
    have the engines' generation interface (prefill_last, decode, cut_past, max_seq, config)."""
    if spec["side"] == "engine":
        from jambatrt.engines import engine_class
        engine = engine_class(spec["backend"]).load(spec["artifact"])
        return engine, {"chunk": engine.default_chunk(spec["batch"]),
                        "decode_path": getattr(engine, "decode_path", "graph")}
    import torch

    from jambatrt.validate.reference import EagerReference   # `import jambatrt` registered the CPU kernels
    ref = EagerReference(spec["artifact"], chunk=spec["reference_chunk"], impl="custom")
    return ref, {"chunk": ref.chunk, "custom_op_kernels": _custom_op_kernels(), "torch_threads": torch.get_num_threads()}


def _timed(fn):
    t0 = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t0


def worker(spec: dict) -> dict:
    """One (side, length) measurement; see the module docstring."""
    t_start = time.perf_counter()
    side, info = _side(spec)
    B, L = spec["batch"], spec["length"]
    rng = np.random.default_rng(spec["seed"])
    ids = rng.integers(0, side.config.vocab_size, size=(B, L), dtype=np.int64)
    out = {"side": spec["side"], "length": L, "batch": B, "info": info,
           "baseline_rss_bytes": _proc_status_kb("VmRSS") * 1024, "load_seconds": time.perf_counter() - t_start}

    # warm-up: compile kernels, create arenas; untimed
    side.prefill_last(ids[:, :max(1, min(L, spec["warmup_tokens"]))])
    prefill_s = []
    logits = state = None
    for _ in range(max(1, spec["repeats"])):
        (logits, state), dt = _timed(lambda: side.prefill_last(ids))
        prefill_s.append(dt)
        if sum(prefill_s) >= spec["budget_s"]:
            break
    out["prefill"] = {"seconds": prefill_s, "peak_rss_kb": _proc_status_kb("VmHWM")}

    if "decode" in spec["modes"]:
        steps = spec["decode_warmup"] + spec["decode_tokens"]
        context = L
        if L + steps > side.max_seq:       # at the maximum context: make room in the KV cache
            context = max(1, side.max_seq - steps)
            state = side.cut_past(state, context)
        logits = None if context != L else logits
        reset = _reset_peak()
        tok = np.zeros(B, dtype=np.int64) if logits is None else logits.argmax(-1)
        decode_s = []
        for i in range(steps):
            (logits, state), dt = _timed(lambda: side.decode(tok, state))
            tok = logits.argmax(-1)
            if i >= spec["decode_warmup"]:
                decode_s.append(dt)
        out["decode"] = {"seconds": decode_s, "context": context,
                         "peak_rss_kb": _proc_status_kb("VmHWM") if reset else None}
    return out


# ---- in the parent -----------------------------------------------------------------------------
def run_child(spec: dict, timeout_s: float | None = None, env: dict | None = None) -> dict:
    """Run `worker(spec)` in a fresh interpreter; returns its result plus "wait4_maxrss_bytes"
    (the child's peak RSS as the kernel accounted it). Raises RuntimeError with the child's
    stderr tail when it fails or runs past `timeout_s`."""
    e = {**os.environ, **(env or {})}     # with the OpenMP wait settings of threads.py
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        p = subprocess.Popen([sys.executable, "-m", "jambatrt.validate.profile", "--worker", json.dumps(spec)],
                             stdout=out, stderr=err, env=e)
        timer = threading.Timer(timeout_s, p.kill) if timeout_s else None
        if timer:
            timer.start()
        try:
            _, status, usage = os.wait4(p.pid, 0)      # the child's own rusage, unlike RUSAGE_CHILDREN
        finally:
            if timer:
                timer.cancel()
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    lines = [ln for ln in stdout.splitlines() if ln.startswith(RESULT_TAG)]
    if p.returncode != 0 or not lines:
        why = f"killed after {timeout_s} s" if p.returncode in (-9, 137) and timeout_s else f"exit {p.returncode}"
        raise RuntimeError(f"profile worker ({spec['side']}, length {spec['length']}) failed ({why}):\n"
                           + "\n".join(stderr.strip().splitlines()[-15:]))
    res = json.loads(lines[-1][len(RESULT_TAG):])
    res["wait4_maxrss_bytes"] = usage.ru_maxrss * 1024          # Linux: kilobytes
    return res


def _stats(tokens: int, seconds: list[float]) -> dict:
    tps = [tokens / s for s in seconds if s > 0]
    if not tps:
        return {"tokens_per_s": None, "tokens_per_s_min": None, "tokens_per_s_max": None, "runs": 0}
    return {"tokens_per_s": statistics.median(tps), "tokens_per_s_min": min(tps), "tokens_per_s_max": max(tps),
            "runs": len(tps), "seconds": [round(s, 6) for s in seconds]}


def _peak(res: dict, mode: str) -> int:
    kb = res[mode].get("peak_rss_kb")
    if kb is None:                          # no peak reset possible: the whole child's peak
        return res["wait4_maxrss_bytes"]
    return kb * 1024


def run_profile(artifact, backend: str, lengths: list[int], reference: str | None = "eager",
                modes: tuple[str, ...] = ("prefill", "decode"), repeats: int = 3, warmup_tokens: int = 4096,
                budget_s: float = 60.0, decode_tokens: int = 32, decode_warmup: int = 2, batch: int = 1,
                reference_max_length: int = 65536, reference_chunk: int = 8192, seed: int = 0,
                timeout_s: float | None = 3600, on_step=None) -> dict:
    """Profile `backend` (and the eager reference unless `reference` is None/"none") at every
    length; returns the report dict (DESIGN.md profile JSON plus details). `on_step(text)`
    reports progress."""
    reference = None if reference in (None, "none") else reference
    if reference not in (None, "eager"):
        from jambatrt.errors import InputError
        raise InputError(f"profile reference {reference!r} (accepted: eager, none)")
    settings = {"repeats": repeats, "warmup_tokens": warmup_tokens, "budget_s": budget_s,
                "decode_tokens": decode_tokens, "decode_warmup": decode_warmup, "batch": batch,
                "reference_max_length": reference_max_length, "reference_chunk": reference_chunk, "seed": seed,
                "modes": list(modes)}
    base = {"artifact": str(artifact), "backend": backend, **settings}
    results, children = [], []
    for L in lengths:
        if on_step:
            on_step(f"length {L:,}: {backend} engine")
        eng = run_child({**base, "side": "engine", "length": L}, timeout_s)
        ref, note = None, None
        if reference and L <= reference_max_length:
            if on_step:
                on_step(f"length {L:,}: {REFERENCE_NAME} reference")
            ref = run_child({**base, "side": "reference", "length": L}, timeout_s)
        elif reference:
            note = f"reference skipped: length > --reference-max-length {reference_max_length:,}"
        children += [c for c in (eng, ref) if c]
        for mode in modes:
            tokens = L * batch if mode == "prefill" else batch
            row = {"length": L, "mode": mode, "backend": backend, **_stats(tokens, eng[mode]["seconds"]),
                   "peak_rss_bytes": _peak(eng, mode), "baseline_rss_bytes": eng["baseline_rss_bytes"],
                   "child_peak_rss_bytes": eng["wait4_maxrss_bytes"],
                   "reference_tokens_per_s": None, "reference_peak_rss_bytes": None}
            if mode == "decode":
                row["context"] = eng["decode"]["context"]
            if ref:
                rs = _stats(tokens, ref[mode]["seconds"])
                row.update(reference_tokens_per_s=rs["tokens_per_s"], reference_tokens_per_s_min=rs["tokens_per_s_min"],
                           reference_tokens_per_s_max=rs["tokens_per_s_max"], reference_runs=rs["runs"],
                           reference_seconds=rs.get("seconds"), reference_peak_rss_bytes=_peak(ref, mode),
                           reference_baseline_rss_bytes=ref["baseline_rss_bytes"])
            if note:
                row["reference_note"] = note
            results.append(row)
    ref_info = next((c["info"] for c in children if c["side"] == "reference"), None)
    return {"backend": backend, "reference": REFERENCE_NAME if reference else None,
            "reference_description": REFERENCE_DESCRIPTION.format(chunk=reference_chunk) if reference else None,
            "reference_kernels": (ref_info or {}).get("custom_op_kernels"),
            "engine_chunk": next((c["info"].get("chunk") for c in children if c["side"] == "engine"), None),
            # what ran the engine's decode steps (the ORT engine: "native" or "graph (why)")
            "engine_decode": next((c["info"].get("decode_path") for c in children if c["side"] == "engine"), None),
            "settings": settings, "results": results}


def _main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "--worker":
        res = worker(json.loads(argv[1]))
        print(RESULT_TAG + json.dumps(res), flush=True)
        return 0
    print("usage: python -m jambatrt.validate.profile --worker SPEC_JSON (run by `jambatrt profile`)",
          file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
