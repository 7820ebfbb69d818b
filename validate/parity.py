"""Engine vs reference parity, per sequence length, through Polygraphy's Comparator with runners
for our engines and references. Every length is checked; failures are collected, then reported."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

# Tolerances on logits per dtype: fp32 engines must match to 1e-3 with identical argmax;
# bf16 keeps ~3 significant digits, so compare against the logit scale and allow rare argmax flips.
TOLERANCES = {
    "float32": {"atol": 1e-3, "rtol": 0.0, "top1": 1.0},
    "bfloat16": {"atol": 5e-2, "rtol": 5e-2, "top1": 0.98},
}


@dataclass
class LengthResult:
    length: int
    max_abs_err: float
    mean_abs_err: float
    top1_agreement: float
    passed: bool
    seconds: dict = field(default_factory=dict)
    polygraphy_passed: bool | None = None
    nonfinite: int = 0


@dataclass
class ParityReport:
    passed: bool
    backend: str
    reference: str
    dtype: str
    results: list[LengthResult]
    tolerances: dict
    batch: int = 1
    mismatches: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [asdict(r) for r in self.results]
        return d


def _runner(name: str, prefill):
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class PrefillRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add("input_ids", np.int64, (-1, -1))

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            out = prefill(feed_dict["input_ids"])
            self.seconds = self.inference_time = time.perf_counter() - t0
            return OrderedDict(logits=np.asarray(out, dtype=np.float32))

    return PrefillRunner()


def compare_logits(a: np.ndarray, b: np.ndarray, tol: dict) -> dict:
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    bound = tol["atol"] + tol["rtol"] * np.abs(b64)
    top1 = float(np.mean(a.argmax(-1) == b.argmax(-1)))
    ok = bool(finite.all() and (diff <= bound).all() and top1 >= tol["top1"])
    return {"max_abs_err": float(diff.max()) if diff.size else 0.0, "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
            "top1_agreement": top1, "passed": ok, "nonfinite": int((~finite).sum())}


def run_parity(engine, reference, lengths: list[int], dtype: str, batch: int = 1, seed: int = 0,
               vocab: int | None = None, on_length=None) -> ParityReport:
    """engine/reference: objects with prefill(ids) -> logits ([B,L,V]); `on_length(i, L)` reports progress."""
    from polygraphy.comparator import Comparator, CompareFunc
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.ERROR      # our own report says what matters
    tol = TOLERANCES[dtype]
    vocab = vocab or engine.config.vocab_size
    rng = np.random.default_rng(seed)
    eng = _runner(f"engine-{engine.backend}", lambda ids: engine.prefill(ids)[0])
    ref = _runner(f"reference-{reference.name}", reference.prefill)
    results, mismatches = [], []
    for i, L in enumerate(lengths):
        if on_length:
            on_length(i, L)
        ids = rng.integers(0, vocab, size=(batch, L), dtype=np.int64)
        run = Comparator.run([eng, ref], data_loader=[{"input_ids": ids}], warm_up=0)
        (_, [e_out]), (_, [r_out]) = run
        poly = Comparator.compare_accuracy(run, compare_func=CompareFunc.simple(atol=tol["atol"], rtol=tol["rtol"],
                                                                                check_error_stat="elemwise"))
        m = compare_logits(e_out["logits"], r_out["logits"], tol)
        res = LengthResult(length=L, seconds={"engine": round(eng.seconds, 4),
                                              "reference": round(ref.seconds, 4)},
                           polygraphy_passed=bool(poly), **m)
        res.passed = res.passed and res.polygraphy_passed
        if not res.passed:
            mismatches.append(f"length {L}: max |diff| {res.max_abs_err:.3e} (atol {tol['atol']}), "
                              f"top-1 agreement {res.top1_agreement:.4f} (need {tol['top1']})"
                              + (f", {res.nonfinite} non-finite values" if res.nonfinite else ""))
        results.append(res)
    return ParityReport(passed=not mismatches, backend=engine.backend, reference=reference.name, dtype=dtype,
                        results=results, tolerances=tol, batch=batch, mismatches=mismatches)
