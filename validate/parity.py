"""Engine vs reference parity, per sequence length, through Polygraphy's Comparator with runners
for our engines and references. Every length is checked; failures are collected, then reported.

Compared per length: the logits (the DESIGN.md report fields) and, where the reference keeps a
comparable state, every final state tensor `present.layer{i}.*` with its own tolerance
(Polygraphy's per-output atol/rtol); `validate/health.py` turns the states into the first layer
that goes wrong."""

from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import asdict, dataclass, field

import numpy as np

from jambatrt.validate.health import STATE_TOLERANCES, check_health

# Tolerances on logits per dtype: fp32 engines must match to 1e-3 with identical argmax wherever the
# reference's argmax is decided (its top-two margin >= the tolerance: closer than that, rounding may
# pick either token, and such ties are counted and listed apart, see compare_logits);
# bf16 keeps ~3 significant digits, so compare against the logit scale and allow rare argmax flips.
# router_margin: a token whose MoE routing margin (p_k - p_(k+1), the reference's softmax) is below
# it has a numerically undecided top-k choice -- either expert set is a correct result, and the
# token's output then differs by O(expert output). Such tokens are graded apart: dropped from
# the logits/K/V comparison, counted and reported with their error; at most
# MAX_UNDECIDED_FRACTION of the tokens (at least one) may be undecided.
TOLERANCES = {
    "float32": {"atol": 1e-3, "rtol": 0.0, "top1": 1.0, "router_margin": 1e-6},
    "bfloat16": {"atol": 5e-2, "rtol": 5e-2, "top1": 0.98, "router_margin": 1e-2},
}
MAX_UNDECIDED_FRACTION = 1e-3


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
    reference_impl: str = ""
    states: dict = field(default_factory=dict)      # present.* name -> {max_abs_err, passed, ...}
    routing: dict = field(default_factory=dict)     # tokens with an undecided top-k (graded apart)
    argmax_ties: dict = field(default_factory=dict)  # positions whose reference top-2 margin < tolerance
    top1_agreement_decided: float = 1.0             # top-1 agreement where the reference's argmax is decided
    health: dict = field(default_factory=dict)      # validate/health.py: first bad layer, per layer


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
    state_tolerances: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["results"] = [asdict(r) for r in self.results]
        return d


def _runner(name: str, source, with_state: bool = True):
    """A Polygraphy runner around an engine or a reference: both have `prefill_with_state(ids) ->
    (logits, {state name: array} | None, extras)`; the last call's extras stay on `runner.extras`;
    without `with_state` the states are not compared."""
    from polygraphy.backend.base import BaseRunner
    from polygraphy.common import TensorMetadata

    class PrefillRunner(BaseRunner):
        def __init__(self):
            super().__init__(name=name)
            self.extras = None

        def activate_impl(self):
            pass

        def deactivate_impl(self):
            pass

        def get_input_metadata_impl(self):
            return TensorMetadata().add("input_ids", np.int64, (-1, -1))

        def infer_impl(self, feed_dict):
            t0 = time.perf_counter()
            logits, states, self.extras = source.prefill_with_state(feed_dict["input_ids"])
            self.seconds = self.inference_time = time.perf_counter() - t0
            out = OrderedDict(logits=np.asarray(logits, dtype=np.float32))
            for k, v in ((states or {}) if with_state else {}).items():   # bf16 states compare as fp32 (no bf16 in Polygraphy)
                out[k] = np.asarray(v, np.float32) if v.dtype.name == "bfloat16" else np.asarray(v)   # int8 KV: float32
            return out

    return PrefillRunner()


def _per_token(name: str) -> bool:
    """Outputs with one row per input token ([B, L, ...] from a zero state): logits, K/V."""
    return name == "logits" or name.endswith((".k", ".v"))


def _drop_tokens(run, drop: np.ndarray):
    """A copy of Polygraphy RunResults with the tokens in `drop` [B, L] removed from every
    per-token output ([B, L, ...] -> [n, ...]), so every check grades the same tokens."""
    from polygraphy.comparator import IterationResult, RunResults

    out = RunResults()
    for name, iters in run.items():
        out.append((name, [IterationResult({k: (np.asarray(v)[~drop] if _per_token(k) else v) for k, v in it.items()},
                                           runtime=it.runtime, runner_name=it.runner_name) for it in iters]))
    return out


def _routing(reference, batch: int, length: int, tol: dict) -> tuple[np.ndarray, dict]:
    margins = getattr(reference, "last_router_margins", None) or {}
    undecided = np.zeros((batch, length), dtype=bool)
    by_layer, min_margin = {}, {}
    for layer, m in sorted(margins.items()):
        if m.shape != undecided.shape:
            continue
        mask = m < tol["router_margin"]
        undecided |= mask
        by_layer[layer], min_margin[layer] = int(mask.sum()), float(m.min())
    return undecided, {"margin_threshold": tol["router_margin"], "undecided_tokens": int(undecided.sum()),
                       "undecided_by_layer": by_layer, "min_margin_by_layer": min_margin,
                       "allowed": max(1, int(MAX_UNDECIDED_FRACTION * batch * length))}


def _simple_compare(**kw):
    """Polygraphy's elementwise comparison with per-output tolerances (SimpleCompareFunc since
    0.50; CompareFunc.simple, deprecated there, before)."""
    from polygraphy import comparator
    if hasattr(comparator, "SimpleCompareFunc"):
        return comparator.SimpleCompareFunc(**kw)
    return comparator.CompareFunc.simple(**kw)


def argmax_margins(logits: np.ndarray) -> np.ndarray:
    """[..., V] -> [...]: top-1 minus top-2 logit (float64); +inf where V < 2 (nothing to tie with)."""
    x = np.asarray(logits, dtype=np.float64)
    if x.shape[-1] < 2:
        return np.full(x.shape[:-1], np.inf)
    top2 = np.partition(x, -2, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def compare_logits(a: np.ndarray, b: np.ndarray, tol: dict) -> dict:
    """Engine logits `a` vs reference logits `b`, [..., V].

    Argmax ties are graded apart: where the reference's own top-two margin is below the logits
    tolerance (atol + rtol * |top-1|), an engine within tolerance may pick either token, so such
    positions are counted (`argmax_ties`) and their flips listed, but only flips where the
    reference's margin exceeds the tolerance count against `top1` (`top1_agreement_decided`).
    `top1_agreement` stays the plain fraction over every position (the report field)."""
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    diff = np.abs(a64 - b64)
    finite = np.isfinite(a64) & np.isfinite(b64)
    bound = tol["atol"] + tol["rtol"] * np.abs(b64)
    agree = a.argmax(-1) == b.argmax(-1)
    margin = argmax_margins(b64)
    top_abs = np.abs(b64.max(-1)) if b64.size else np.zeros(agree.shape)
    tie = margin < tol["atol"] + tol["rtol"] * top_abs
    decided = ~tie
    top1 = float(np.mean(agree)) if agree.size else 1.0          # no token left to grade
    top1_decided = float(np.mean(agree[decided])) if decided.any() else 1.0
    flipped = np.flatnonzero((tie & ~agree).reshape(-1))
    ok = bool(finite.all() and (diff <= bound).all() and top1_decided >= tol["top1"])
    return {"max_abs_err": float(diff.max()) if diff.size else 0.0, "mean_abs_err": float(diff.mean()) if diff.size else 0.0,
            "top1_agreement": top1, "top1_agreement_decided": top1_decided, "passed": ok,
            "nonfinite": int((~finite).sum()),
            "argmax_ties": {"margin_threshold": {"atol": tol["atol"], "rtol": tol["rtol"]},
                            "tied_positions": int(tie.sum()), "flipped": int(flipped.size),
                            "flipped_index": flipped[:20].tolist(),
                            "flipped_margins": [float(m) for m in margin.reshape(-1)[flipped[:20]]]}}


def run_parity(engine, reference, lengths: list[int], dtype: str, batch: int = 1, seed: int = 0,
               vocab: int | None = None, on_length=None, check_state: bool = True) -> ParityReport:
    """engine: an `engines.base.Engine`; reference: a `validate.reference.Reference`; both run
    through one runner by their `prefill_with_state(ids)`. Every length
    is run and compared (logits, and the final states when `check_state` and the reference keeps
    them); `on_length(i, L)` reports progress. Returns the report; it never raises on mismatch."""
    from polygraphy.comparator import Comparator
    from polygraphy.logger import G_LOGGER

    G_LOGGER.module_severity = G_LOGGER.CRITICAL   # our own report lists every mismatch
    tol, stol = TOLERANCES[dtype], STATE_TOLERANCES[dtype]
    # an int8 KV cache against a reference that rounds K/V the same way: its K/V states may differ by
    # one rounding step where a float rounding crossed a boundary (plugins/cpu/kv_int8.py)
    kv_int8 = getattr(reference, "kv_cache", "float32") == "int8"
    if kv_int8:
        from jambatrt.plugins.cpu.kv_int8 import quant_step
    vocab = vocab or engine.config.vocab_size
    rng = np.random.default_rng(seed)
    eng = _runner(f"engine-{engine.backend}", engine)
    ref = _runner(f"reference-{reference.name}", reference, with_state=check_state)
    results, mismatches = [], []
    for i, L in enumerate(lengths):
        if on_length:
            on_length(i, L)
        ids = rng.integers(0, vocab, size=(batch, L), dtype=np.int64)
        run = Comparator.run([eng, ref], data_loader=[{"input_ids": ids}], warm_up=0)
        undecided, routing = _routing(reference, batch, L, tol)
        if undecided.any():
            (_, [e_all]), (_, [r_all]) = run
            pos = np.argwhere(undecided)
            routing["tokens"] = [[int(b), int(t)] for b, t in pos[:20]]
            routing["max_abs_err_undecided"] = float(np.abs(e_all["logits"][undecided].astype(np.float64)
                                                            - r_all["logits"][undecided]).max())
            run = _drop_tokens(run, undecided)
        (_, [e_out]), (_, [r_out]) = run
        common = [k for k in e_out.keys() if k in r_out]      # the logits, plus states the reference keeps
        steps = {k: quant_step(r_out[k]) for k in common if kv_int8 and k.endswith((".k", ".v"))}
        atol = {k: (tol if k == "logits" else stol)["atol"] + (float(steps[k].max(initial=0.0)) if k in steps else 0.0)
                for k in common}
        rtol = {k: (tol if k == "logits" else stol)["rtol"] for k in common}
        poly = Comparator.compare_accuracy(run, compare_func=_simple_compare(atol=atol, rtol=rtol,
                                                                             check_error_stat="elemwise"))
        m = compare_logits(e_out["logits"], r_out["logits"], tol)
        # compare_logits indexes the positions it was given: [B, L] in order, or the kept tokens when
        # undecided routing dropped some; map its flat indices back to [batch, position]
        kept = np.argwhere(~undecided)
        ties = m.pop("argmax_ties")
        ties["positions"] = [[int(b), int(t)] for b, t in kept[ties.pop("flipped_index")]]
        e_states = {k: e_out[k] for k in e_out.keys() if k != "logits"}
        r_states = {k: r_out[k] for k in r_out.keys() if k != "logits"} or None
        health = check_health(e_states, r_states, ref.extras or [], engine.config.num_hidden_layers, dtype,
                              logits_nonfinite=m["nonfinite"], logits_passed=m["passed"], steps=steps)
        states = {n: s for layer in health["layers"] for n, s in layer["states"].items() if r_states}
        for layer in health["layers"]:
            if layer["layer"] in routing["min_margin_by_layer"]:
                layer["router_min_margin"] = routing["min_margin_by_layer"][layer["layer"]]
                layer["router_undecided_tokens"] = routing["undecided_by_layer"][layer["layer"]]
        res = LengthResult(length=L, seconds={"engine": round(eng.seconds, 4), "reference": round(ref.seconds, 4)},
                           polygraphy_passed=bool(poly),
                           reference_impl=reference.describe(L) if hasattr(reference, "describe") else reference.name,
                           states=states, health=health, routing=routing, argmax_ties=ties, **m)
        states_ok = all(s["passed"] for s in states.values())
        routing_ok = routing["undecided_tokens"] <= routing["allowed"]
        res.passed = (res.passed and res.polygraphy_passed and states_ok and routing_ok
                      and health["first_bad_layer"] is None)
        if not routing_ok:
            mismatches.append(f"length {L}: {routing['undecided_tokens']} tokens have an undecided MoE top-k "
                              f"(routing margin < {tol['router_margin']}; at most {routing['allowed']} may be "
                              "graded apart)")
        if not res.passed:
            mismatches.append(f"length {L}: max |diff| {res.max_abs_err:.3e} (atol {tol['atol']}), "
                              f"top-1 agreement {res.top1_agreement_decided:.4f} where the reference's argmax is "
                              f"decided (need {tol['top1']}; {ties['tied_positions']} tied positions graded apart)"
                              + (f", {res.nonfinite} non-finite values" if res.nonfinite else "")
                              + ("" if res.polygraphy_passed else ", Polygraphy's comparison failed"))
            bad = [n for n, s in states.items() if not s["passed"]]
            if bad:
                mismatches.append(f"length {L}: states beyond tolerance: {', '.join(bad)}")
            if health["problem"]:
                first = health["first_bad_layer"]
                mismatches.append(f"length {L}: " + (f"first bad layer {first}: " if first is not None else "")
                                  + f"{health['problem']} -- look at {health['where']}")
        results.append(res)
    return ParityReport(passed=not mismatches, backend=engine.backend, reference=reference.name, dtype=dtype,
                        results=results, tolerances=tol, batch=batch, mismatches=mismatches,
                        state_tolerances=stol if any(r.states for r in results) else {})
