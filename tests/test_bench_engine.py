"""Engine benchmarks (make bench): ONNX Runtime engine vs transformers' eager Jamba on the bench
preset, measured side by side in one run. Writes bench/engine.json; asserts nothing about speed."""

import json
import os
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, run_cli
from jambatrt.engines.ort import OrtEngine
from jambatrt.validate.reference import HFReference

pytestmark = pytest.mark.bench
OUT = Path(os.environ.get("JAMBATRT_BENCH_DIR", ROOT / "bench"))


@pytest.fixture(scope="module")
def bench_artifact(tmp_path_factory):
    art = tmp_path_factory.mktemp("bench") / "bench"
    run_cli("export", "--preset", "bench", "-o", art, check=True)
    run_cli("build", art, "--backend", "ort", check=True)
    return art


def _time(fn, repeats=1):
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return best


def _write(name, payload):
    OUT.mkdir(parents=True, exist_ok=True)
    path = OUT / name
    data = json.loads(path.read_text()) if path.exists() else {}
    data.update(payload)
    path.write_text(json.dumps(data, indent=2))


def test_prefill_engine_vs_hf(bench_artifact):
    rows = []
    with OrtEngine.load(bench_artifact) as eng:
        hf = HFReference(bench_artifact)
        rng = np.random.default_rng(0)
        for L in (4096, 32768):
            ids = rng.integers(0, eng.config.vocab_size, (1, L))
            eng.prefill(ids[:, :64])                                   # warm-up (numba compile)
            t_eng = _time(lambda: eng.prefill(ids, last_only=True), repeats=2)
            t_hf = _time(lambda: hf.prefill(ids))
            rows.append({"length": L, "engine_tokens_per_s": L / t_eng, "hf_tokens_per_s": L / t_hf,
                         "speedup": t_hf / t_eng, "engine_s": t_eng, "hf_s": t_hf})
            print(f"\nprefill L={L}: engine {L / t_eng:,.0f} tok/s, HF eager {L / t_hf:,.0f} tok/s, x{t_hf / t_eng:.1f}")
    _write("engine.json", {"prefill_vs_hf": rows, "preset": "bench", "target_speedup": 20})
    assert all(r["engine_tokens_per_s"] > 0 for r in rows)


class _StepClock:
    """A logits processor that only records when transformers' generate reaches each step."""

    def __init__(self):
        self.stamps = []

    def __call__(self, input_ids, scores):
        self.stamps.append(time.perf_counter())
        return scores


def test_decode_latency_vs_hf(bench_artifact):
    from transformers import LogitsProcessorList

    n = 16
    rows = []
    with OrtEngine.load(bench_artifact) as eng:
        hf = HFReference(bench_artifact).model
        hf.generation_config.eos_token_id = None
        rng = np.random.default_rng(1)
        for ctx in (1024, 16384, 65536, 262144 - n - 1):      # "256K": leave room for the new tokens
            ids = rng.integers(0, eng.config.vocab_size, (1, ctx))
            logits, state = eng.prefill(ids, last_only=True)
            tok = logits.argmax(-1)
            times = []
            for _ in range(n):
                t0 = time.perf_counter()
                logits, state = eng.decode(tok, state)
                times.append(time.perf_counter() - t0)
                tok = logits.argmax(-1)
            per_tok = float(np.median(times))
            hf_per_tok = None
            if ctx <= 16384:   # HF's prefill materialises exp(dt*A) for all L: beyond this it is too slow here
                clock = _StepClock()
                with torch.no_grad():
                    hf.generate(torch.from_numpy(ids), max_new_tokens=n + 1, do_sample=False, pad_token_id=0,
                                logits_processor=LogitsProcessorList([clock]))
                hf_per_tok = float(np.median(np.diff(clock.stamps)))   # step k -> k+1: one cached decode
            rows.append({"context": ctx, "engine_ms_per_token": per_tok * 1e3,
                         "hf_ms_per_token": None if hf_per_tok is None else hf_per_tok * 1e3,
                         "ratio": None if hf_per_tok is None else hf_per_tok / per_tok})
            print(f"\ndecode ctx={ctx}: engine {per_tok * 1e3:.2f} ms/token"
                  + ("" if hf_per_tok is None else f", HF {hf_per_tok * 1e3:.2f} ms/token, x{hf_per_tok / per_tok:.1f}"))
    _write("engine.json", {"decode": rows})
    assert [r["context"] for r in rows][-1] > 262000 and all(r["engine_ms_per_token"] > 0 for r in rows)
