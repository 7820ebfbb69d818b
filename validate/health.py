"""Numerical health of one parity run: where, layer by layer, the engine first goes wrong.

The engine exposes only logits and its final state, so the honest per-layer signal is the state
each layer hands on (`present.layer{i}.*`: Mamba conv/SSM state, attention K/V) compared with the
reference's, plus non-finite values on either side (the reference's per-layer hidden states come
from `Reference.prefill_with_state`). Layer i's state is computed by layer i's mixer from layer
i's input, so when layer i-1's state agrees and layer i's does not, the error entered between the
two: in layer i-1's mixer output or feed-forward, or in layer i's norm / mixer up to its state."""

from __future__ import annotations

import numpy as np

# State tolerances per dtype (|engine - reference| <= atol + rtol * |reference|). States are
# intermediate activations (conv state, K/V ~ hidden magnitude; the SSM state of a random-init
# preset ~0.1), an order below the logits' scale, so fp32 gets a 10x tighter atol than the logits;
# correct fp32 kernels land near 1e-7.
STATE_TOLERANCES = {
    "float32": {"atol": 1e-4, "rtol": 1e-3},
    "bfloat16": {"atol": 5e-2, "rtol": 5e-2},
}


def compare_state(engine: np.ndarray, reference: np.ndarray, tol: dict, step=None) -> dict:
    """One state tensor, engine vs reference -> {max_abs_err, max_abs_ref, nonfinite, passed}.
    step: a quantised state's rounding step per element (an int8 KV cache: `kv_int8.quant_step`),
    added to the bound: an element a float rounding away from a rounding boundary may round apart."""
    e = np.asarray(engine).astype(np.float64)
    out = {"engine_nonfinite": int((~np.isfinite(e)).sum())}
    if reference is None:
        return {**out, "passed": out["engine_nonfinite"] == 0}
    r = np.asarray(reference).astype(np.float64)
    if e.shape != r.shape:
        return {**out, "passed": False, "shape": [list(e.shape), list(r.shape)]}
    d = np.abs(e - r)
    finite = np.isfinite(d)
    bound = tol["atol"] + tol["rtol"] * np.abs(r) + (0.0 if step is None else step)
    return {**out, "max_abs_err": float(np.nanmax(np.where(finite, d, np.nan))) if finite.any() else float("nan"),
            "max_abs_ref": float(np.abs(r[np.isfinite(r)]).max()) if np.isfinite(r).any() else float("nan"),
            "passed": bool(finite.all() and (d <= bound).all())}


def _layer_of(name: str) -> int:
    # present.layer{i}.{what}
    return int(name.split(".")[1].removeprefix("layer"))


def check_health(engine_states: dict[str, np.ndarray] | None, reference_states: dict[str, np.ndarray] | None,
                 reference_layers: list[dict], num_layers: int, dtype: str,
                 logits_nonfinite: int = 0, logits_passed: bool = True, steps: dict | None = None) -> dict:
    """-> {"first_bad_layer": int | None, "problem": str | None, "where": str | None,
    "layers": [{"layer", "kind", "states": {name: compare_state(...)}, "reference_nonfinite",
    "reference_max_abs", "ok"}], "state_tolerances": {...}}. steps: {state name: its rounding step}
    for quantised states (compare_state)."""
    tol = STATE_TOLERANCES[dtype]
    ref_by_layer = {d["layer"]: d for d in reference_layers}
    layers = []
    for i in range(num_layers):
        ref = ref_by_layer.get(i, {})
        entry = {"layer": i, "kind": ref.get("kind", ""), "states": {},
                 "reference_nonfinite": ref.get("nonfinite"), "reference_max_abs": ref.get("max_abs")}
        for name in sorted(n for n in (engine_states or {}) if _layer_of(n) == i):
            entry["states"][name] = compare_state(engine_states[name], (reference_states or {}).get(name), tol,
                                                  (steps or {}).get(name))
        entry["ok"] = (not ref.get("nonfinite")) and all(s["passed"] for s in entry["states"].values())
        layers.append(entry)

    report = {"first_bad_layer": None, "problem": None, "where": None, "layers": layers, "state_tolerances": tol}
    for entry in layers:
        if entry["ok"]:
            continue
        i = entry["layer"]
        problems = []
        if entry["reference_nonfinite"]:
            problems.append(f"the reference's layer {i} output holds {entry['reference_nonfinite']} NaN/Inf values")
        for name, s in entry["states"].items():
            if s["engine_nonfinite"]:
                problems.append(f"engine {name} holds {s['engine_nonfinite']} NaN/Inf values")
            elif "shape" in s:
                problems.append(f"engine {name} has shape {s['shape'][0]}, reference {s['shape'][1]}")
            elif not s["passed"]:
                problems.append(f"{name} drifts: max |diff| {s['max_abs_err']:.3e} (reference max |x| "
                                f"{s['max_abs_ref']:.3e}; atol {tol['atol']}, rtol {tol['rtol']}"
                                + (", + one int8 rounding step" if name in (steps or {}) else "") + ")")
        report.update(first_bad_layer=i, problem="; ".join(problems), where=_where(i, layers))
        return report
    if logits_nonfinite or not logits_passed:
        last = num_layers - 1
        report.update(problem=("logits hold NaN/Inf" if logits_nonfinite else "logits drift")
                      + " while every layer's state agrees",
                      where=f"after layer {last}'s state: layer {last}'s mixer output or feed-forward "
                            f"({layers[last]['kind'] or '?'}), the final norm or lm_head")
    return report


def _where(i: int, layers: list[dict]) -> str:
    if i == 0:
        return "the embedding or layer 0's norm / mixer (up to its state)"
    prev = layers[i - 1]
    return (f"between layer {i - 1}'s state (agrees) and layer {i}'s: layer {i - 1}'s mixer output or feed-forward "
            f"({prev['kind'] or '?'}), or layer {i}'s norm / mixer ({layers[i]['kind'] or '?'}) up to its state")
