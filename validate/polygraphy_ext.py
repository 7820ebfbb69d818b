"""Polygraphy's own command line on our engine: `polygraphy run model.onnx --onnxrt` with the
jamba CPU custom ops loaded, compared against this package's eager reference.

Polygraphy's ONNX Runtime loader (`SessionFromOnnx`) creates its own SessionOptions and has no
option for a custom-op library, so `--onnxrt` alone fails on the `jamba` domain nodes. `polygraphy
run` imports a `--data-loader-script` before it creates any session; importing this file:
1. gives Polygraphy's ORT loader SessionOptions with `custom_ops_library()` registered (only
   Polygraphy's loader module sees the change; onnxruntime itself is untouched), and
2. offers `load_data()`, which yields the feed dicts saved in the file named by $JAMBATRT_INPUTS.

The inputs and the reference outputs (logits and every `present.layer{i}.*` state) come from:

    python -m jambatrt.validate.polygraphy_ext OUT --length 17 --inputs in.json --outputs ref.json
    JAMBATRT_INPUTS=in.json polygraphy run OUT/model.ort.onnx --onnxrt \\
        --data-loader-script validate/polygraphy_ext.py --load-outputs ref.json \\
        --atol logits:1e-3 1e-4 --rtol logits:0 1e-3

(the script path is this file's: `python -c "import jambatrt.validate.polygraphy_ext as m;
print(m.__file__)"`). Polygraphy then checks every output with its per-output tolerances (the
values `jambatrt validate` uses) and exits non-zero on a mismatch."""

from __future__ import annotations

import atexit
import os
import sys
from collections import OrderedDict

import numpy as np

INPUTS_ENV = "JAMBATRT_INPUTS"


class _OnnxRuntimeWithJambaOps:
    """onnxruntime, except that SessionOptions() come with the jamba custom-op library registered."""

    def __init__(self, library: str):
        import onnxruntime
        self._ort, self._library = onnxruntime, library

    def __getattr__(self, name):
        return getattr(self._ort, name)

    def SessionOptions(self):  # noqa: N802  (onnxruntime's name)
        so = self._ort.SessionOptions()
        so.register_custom_ops_library(self._library)
        return so


def install() -> None:
    """Make Polygraphy's ONNX Runtime loader register our custom ops. Idempotent."""
    # Polygraphy imports this file with its folder first on sys.path, where profile.py etc. would
    # shadow same-named top-level modules (the standard library's `profile`): hide it meanwhile,
    # keeping sys.path's length, since Polygraphy deletes sys.path[0] afterwards.
    here = os.path.dirname(os.path.abspath(__file__))
    hidden = [i for i, p in enumerate(sys.path) if os.path.abspath(p or ".") == here]
    for i in hidden:
        sys.path[i] = os.path.join(here, "__hidden__")
    try:
        _install()
    finally:
        for i in hidden:
            sys.path[i] = here


def _install() -> None:
    from polygraphy.backend.onnxrt import loader

    from jambatrt.plugins.cpu import ort_ops

    if not isinstance(loader.onnxrt, _OnnxRuntimeWithJambaOps):
        loader.onnxrt = _OnnxRuntimeWithJambaOps(ort_ops.custom_ops_library())
        take = getattr(ort_ops, "take_errors", None)
        if take is not None:      # a failing kernel returns NaN outputs and records why: say so at exit
            atexit.register(lambda: [print(f"jamba kernel error: {e}", file=sys.stderr) for e in take()])


def load_data():
    """Polygraphy data loader: the feed dicts saved in $JAMBATRT_INPUTS (Polygraphy JSON)."""
    from polygraphy.json import load_json

    path = os.environ.get(INPUTS_ENV)
    if not path:
        raise RuntimeError(f"set {INPUTS_ENV} to an inputs file written by "
                           "`python -m jambatrt.validate.polygraphy_ext OUT --inputs FILE --outputs FILE`")
    return load_json(path, description="input data")


def write_inputs_and_outputs(artifact, length: int, inputs_path, outputs_path, batch: int = 1, seed: int = 0,
                             reference: str = "eager") -> dict:
    """Random ids [batch, length] + the zero state (the engine's step-program inputs) + logits_positions
    (the ORT engine graph's, graph/passes/slice_logits.py) -> `inputs_path`;
    the reference's logits and final states (named like the engine's outputs) -> `outputs_path`
    (Polygraphy RunResults). Returns the output names and their tolerances."""
    from polygraphy.comparator import IterationResult, RunResults
    from polygraphy.json import save_json

    from jambatrt.engines.base import _np_dtype
    from jambatrt.graph.passes.slice_logits import POSITIONS
    from jambatrt.manifest import Manifest
    from jambatrt.validate.health import STATE_TOLERANCES
    from jambatrt.validate.parity import TOLERANCES
    from jambatrt.validate.reference import make_reference

    manifest = Manifest.read(artifact)
    ids = np.random.default_rng(seed).integers(0, manifest.config.vocab_size, size=(batch, length), dtype=np.int64)
    feed = OrderedDict(input_ids=ids)
    for spec in manifest.step.state:
        feed[spec.name] = np.zeros(spec.zero_shape(batch), dtype=_np_dtype(spec.dtype))
    feed[POSITIONS] = np.array([length], np.int64)      # the ORT engine graph's: logits of every position
    save_json([feed], inputs_path, description="input data")

    ref = make_reference(reference, artifact)
    logits, states, _ = ref.prefill_with_state(ids)
    outputs = OrderedDict(logits=logits)
    outputs.update(states or {})
    results = RunResults()
    results.append((f"reference-{ref.name}", [IterationResult(outputs, runner_name=f"reference-{ref.name}")]))
    save_json(results, outputs_path, description="reference outputs")
    tol, stol = TOLERANCES[manifest.dtype], STATE_TOLERANCES[manifest.dtype]
    return {"outputs": list(outputs), "atol": f"logits:{tol['atol']} {stol['atol']}",
            "rtol": f"logits:{tol['rtol']} {stol['rtol']}"}


def _main(argv: list[str]) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m jambatrt.validate.polygraphy_ext",
                                description="Write inputs and eager-reference outputs for `polygraphy run "
                                            "OUT/model.ort.onnx --onnxrt --data-loader-script "
                                            f"{__file__}` (see this module's docstring).")
    p.add_argument("artifact")
    p.add_argument("--length", type=int, default=17)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference", default="eager", choices=["eager", "hf"])
    p.add_argument("--inputs", required=True, help="Polygraphy inputs JSON to write")
    p.add_argument("--outputs", required=True, help="Polygraphy RunResults JSON to write")
    a = p.parse_args(argv)
    info = write_inputs_and_outputs(a.artifact, a.length, a.inputs, a.outputs, a.batch, a.seed, a.reference)
    print(f"{INPUTS_ENV}={a.inputs} polygraphy run {a.artifact}/model.ort.onnx --onnxrt "
          f"--data-loader-script {__file__} --load-outputs {a.outputs} --atol {info['atol']} --rtol {info['rtol']}")
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
elif __name__ != "jambatrt.validate.polygraphy_ext":
    # imported by path, as Polygraphy does with --data-loader-script: hook its ORT loader now,
    # before it builds the session
    install()
