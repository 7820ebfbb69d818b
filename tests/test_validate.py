"""Validation (issue 6): the long-sequence eager reference and its twins of the `_ref` ops, state
parity and numerical health, reports with plots, failure on a perturbed engine, Polygraphy's CLI
with our custom ops. The 262,144-token run is behind `-m slow`."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ROOT, assert_same_model_sums, run_cli
from jambatrt.engines.base import Engine
from jambatrt.export import ops as jops
from jambatrt.manifest import Manifest
from jambatrt.validate.health import check_health
from jambatrt.validate.reference import EagerReference, HFReference, attention_flash, selective_scan_chunked

selective_scan_ref = jops.reference("selective_scan")
attention_ref = jops.reference("attention")
SCAN_TOL = jops.SPECS["selective_scan"].tolerances


def _scan_inputs(B, D, N, L, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    return dict(u=r(B, D, L).to(dtype), delta=(r(B, D, L) - 1.0).to(dtype), A=-torch.exp(r(D, N)),
                Bm=r(B, N, L).to(dtype), Cm=r(B, N, L).to(dtype), Dskip=r(D), z=r(B, D, L).to(dtype),
                delta_bias=r(D) * 0.5, state=r(B, D, N))


# ---- the long reference's ops against the oracles --------------------------------------------------
@pytest.mark.parametrize("L,block", [(1, 64), (7, 3), (200, 64), (257, 16), (300, 1000)])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_selective_scan_chunked_matches_ref(L, block, with_state, dtype):
    x = _scan_inputs(2, 12, 5, L, seed=L + block, dtype=dtype)
    if not with_state:
        x["state"] = None
    y0, h0 = selective_scan_ref(**x)
    y1, h1 = selective_scan_chunked(**x, block=block)
    atol, rtol = SCAN_TOL[dtype]
    assert y1.dtype == y0.dtype and h1.dtype == torch.float32
    torch.testing.assert_close(y1.float(), y0.float(), atol=atol, rtol=rtol)
    torch.testing.assert_close(h1, h0, atol=atol, rtol=rtol)


def test_selective_scan_chunked_optional_inputs_and_float64():
    x = _scan_inputs(1, 8, 4, 150, seed=3)
    x.update(z=None, delta_bias=None)
    y0, h0 = selective_scan_ref(**x)
    y1, h1 = selective_scan_chunked(**x, block=32, compute_dtype=torch.float64)
    torch.testing.assert_close(y1, y0, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(h1, h0, atol=5e-5, rtol=1e-4)


def test_selective_scan_chunked_strong_decay_has_no_overflow():
    """Large dt * |A| (decays far below fp32's range) must not overflow or produce NaN."""
    x = _scan_inputs(1, 6, 4, 300, seed=4)
    x["delta"] = x["delta"] * 0 + 8.0                # softplus(8) ~ 8, A up to ~ -20: exponents ~ -160
    x["A"] = x["A"] * 10
    y0, h0 = selective_scan_ref(**x)
    y1, h1 = selective_scan_chunked(**x, block=64)
    assert torch.isfinite(y1).all() and torch.isfinite(h1).all()
    torch.testing.assert_close(y1, y0, atol=5e-5, rtol=1e-4)


def test_selective_scan_chunked_matches_mamba_ssm(mamba_refs):
    """Independent oracle: mamba-ssm's selective_scan_ref (no initial state in its signature)."""
    x = _scan_inputs(2, 10, 6, 333, seed=5)
    want_y, want_h = mamba_refs["selective_scan_ref"](x["u"], x["delta"], x["A"], x["Bm"], x["Cm"], x["Dskip"],
                                                      z=x["z"], delta_bias=x["delta_bias"], delta_softplus=True,
                                                      return_last_state=True)
    y, h = selective_scan_chunked(**{**x, "state": None}, block=50)
    torch.testing.assert_close(y, want_y, atol=5e-5, rtol=1e-4)
    torch.testing.assert_close(h, want_h.float(), atol=5e-5, rtol=1e-4)


@pytest.mark.parametrize("L,Hq,Hkv", [(1, 4, 2), (33, 4, 4), (700, 6, 2)])
def test_attention_flash_matches_ref(L, Hq, Hkv):
    g = torch.Generator().manual_seed(L)
    q, k, v = (torch.randn(2, L, h, 16, generator=g) for h in (Hq, Hkv, Hkv))
    o0, k0, v0 = attention_ref(q, k, v)
    o1, k1, v1 = attention_flash(q, k, v)
    torch.testing.assert_close(o1, o0, atol=2e-5, rtol=1e-4)
    assert torch.equal(k1, k0) and torch.equal(v1, v0)
    # with a past it is attention_ref itself (SDPA's causal mask is top-left aligned)
    pk, pv = torch.randn(2, 5, Hkv, 16, generator=g), torch.randn(2, 5, Hkv, 16, generator=g)
    torch.testing.assert_close(attention_flash(q, k, v, pk, pv)[0], attention_ref(q, k, v, pk, pv)[0])


# ---- the references ------------------------------------------------------------------------------
def _assert_same(a, b, config):
    la, sa, ha = a
    lb, sb, hb = b
    length = la.shape[1]
    assert_same_model_sums(la, lb, config, length, "logits")
    assert (la.argmax(-1) == lb.argmax(-1)).all()
    assert sa.keys() == sb.keys() and len(sa) == 8      # tiny: 3 Mamba layers x 2 + 1 attention x 2
    for n in sa:
        assert_same_model_sums(sa[n], sb[n], config, length, n)
    assert [(h["layer"], h["kind"], h["nonfinite"]) for h in ha] == [(h["layer"], h["kind"], h["nonfinite"]) for h in hb]
    assert [h["kind"] for h in ha] == ["mamba+mlp", "attention+moe", "mamba+mlp", "mamba+moe"]


def test_long_reference_matches_plain_reference(tiny_artifact):
    ids = np.random.default_rng(0).integers(0, 512, (2, 700))
    plain = EagerReference(tiny_artifact, chunk=128, impl="ref").prefill_with_state(ids)
    long = EagerReference(tiny_artifact, chunk=128, impl="long").prefill_with_state(ids)
    _assert_same(plain, long, Manifest.read(tiny_artifact).config)
    assert long[1]["present.layer1.k"].shape == (2, 700, 2, 16)


def test_auto_reference_switches_to_long_past_the_threshold(tiny_artifact):
    ref = EagerReference(tiny_artifact, chunk=64, long_from=100)
    assert "eager-long" in ref.describe(101) and "<op>_ref" in ref.describe(100)
    ids = np.random.default_rng(1).integers(0, 512, (1, 300))
    auto = ref.prefill_with_state(ids)
    plain = EagerReference(tiny_artifact, chunk=64, impl="ref").prefill_with_state(ids)
    _assert_same(auto, plain, ref.config)
    np.testing.assert_array_equal(ref.prefill(ids), auto[0])


def test_long_reference_matches_transformers(tiny_artifact):
    ids = np.random.default_rng(2).integers(0, 512, (1, 600))
    hf_logits, hf_states, hf_layers = HFReference(tiny_artifact).prefill_with_state(ids)
    logits, _, layers = EagerReference(tiny_artifact, chunk=256, impl="long").prefill_with_state(ids)
    assert hf_states is None                    # transformers keeps its cache in its own layout
    assert np.abs(logits - hf_logits).max() <= 1e-4
    assert (logits.argmax(-1) == hf_logits.argmax(-1)).all()
    for a, b in zip(layers, hf_layers):         # per-layer hidden magnitudes agree: same function
        assert a["nonfinite"] == b["nonfinite"] == 0 and a["max_abs"] == pytest.approx(b["max_abs"], rel=1e-4)


# ---- numerical health --------------------------------------------------------------------------------
def _states(rng):
    return {f"present.layer{i}.{n}": rng.standard_normal((1, 8, 3)).astype(np.float32)
            for i in range(3) for n in ("conv_state", "ssm_state")}


def test_health_names_first_layer_with_nan_or_drift():
    rng = np.random.default_rng(0)
    ref = _states(rng)
    layers = [{"layer": i, "kind": "mamba+mlp", "nonfinite": 0, "max_abs": 1.0} for i in range(3)]
    ok = check_health({k: v.copy() for k, v in ref.items()}, ref, layers, 3, "float32")
    assert ok["first_bad_layer"] is None and ok["problem"] is None

    eng = {k: v.copy() for k, v in ref.items()}
    eng["present.layer1.ssm_state"][0, 2, 1] = np.nan
    eng["present.layer2.conv_state"] += 0.5
    bad = check_health(eng, ref, layers, 3, "float32")
    assert bad["first_bad_layer"] == 1 and "NaN/Inf" in bad["problem"] and "layer 0's" in bad["where"]
    assert bad["layers"][2]["states"]["present.layer2.conv_state"]["passed"] is False

    eng = {k: v.copy() for k, v in ref.items()}
    eng["present.layer2.conv_state"] += 1e-3
    drift = check_health(eng, ref, layers, 3, "float32")
    assert drift["first_bad_layer"] == 2 and "drifts" in drift["problem"]

    layers[0]["nonfinite"] = 4                                  # the reference itself blew up
    assert check_health(ref, ref, layers, 3, "float32")["first_bad_layer"] == 0
    layers[0]["nonfinite"] = 0
    tail = check_health(ref, ref, layers, 3, "float32", logits_passed=False)
    assert tail["first_bad_layer"] is None and "lm_head" in tail["where"]


# ---- the validate command ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def built(tiny_artifact):
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    return tiny_artifact


def _png_size(path: Path) -> tuple[int, int]:
    import matplotlib.image
    img = matplotlib.image.imread(str(path))                   # fails on anything but a real PNG
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return img.shape[1], img.shape[0]


def test_validate_report_markdown_plots_and_states(built, tmp_path):
    rep = tmp_path / "v" / "r.json"
    p = run_cli("validate", built, "--backend", "ort", "--lengths", "1,17,300", "--report", rep)
    assert p.returncode == 0, p.stderr
    r = json.loads(rep.read_text())
    assert r["passed"] is True and r["state_tolerances"] == {"atol": 1e-4, "rtol": 1e-3}
    for x in r["results"]:
        assert x["passed"] and x["max_abs_err"] <= 1e-3
        assert len(x["states"]) == 8 and all(s["passed"] and s["max_abs_err"] <= 1e-4 for s in x["states"].values())
        assert x["health"]["first_bad_layer"] is None and len(x["health"]["layers"]) == 4
        assert x["reference_impl"].startswith("eager, <op>_ref ops")
    md = rep.with_suffix(".md").read_text()
    for must in ("preset tiny", "tolerances: logits atol 0.001", "states (present.*) atol 0.0001", "machine:",
                 "CPUs", "versions: torch", "onnxruntime", "Numerical health", "| 300 |"):
        assert must in md, must
    for png in (rep.with_suffix(".error.png"), rep.with_suffix(".top1.png")):
        w, h = _png_size(png)
        assert w >= 600 and h >= 400
    assert "plots:" in p.stdout and "r.error.png" in p.stdout


def _perturb_engine_initializer(artifact: Path, name: str, factor: float) -> None:
    """Scale one expert's row of an initializer of the BUILT engine (stored inline in its graph, so the
    artifact's weights stay as they are), then re-record the engine's sha256 in the manifest (as a
    rebuild would): the engine computes a wrong function. Its decode steps go through the graph too (as
    `build --decode graph` records it): the native decode step reads the artifact's weight store, which
    this leaves intact."""
    import onnx
    from onnx import numpy_helper
    from onnx.external_data_helper import load_external_data_for_tensor

    from jambatrt.artifact import read_manifest, record_files

    manifest = read_manifest(artifact)
    path = artifact / manifest["engines"]["ort"]["path"]
    model = onnx.load(str(path), load_external_data=False)
    init = next(i for i in model.graph.initializer if i.name == name)
    load_external_data_for_tensor(init, str(artifact))
    arr = numpy_helper.to_array(init).copy()
    arr[0] *= factor
    init.CopyFrom(numpy_helper.from_array(arr, name))
    onnx.save(model, str(path))
    manifest["engines"]["ort"]["settings"]["decode"] = "graph"
    record_files(artifact, manifest, [manifest["engines"]["ort"]["path"]])


def test_validate_fails_and_names_the_layer_when_moe_scale_is_wrong(built, tmp_path):
    art = tmp_path / "bad"
    shutil.copytree(built, art)
    # tiny: layer 1 is attention + MoE; its expert-0 w13 scales x1.5 (a wrong dequantisation scale)
    _perturb_engine_initializer(art, "model.model.layers.1.feed_forward.w13_scale", 1.5)
    rep = tmp_path / "bad.json"
    p = run_cli("validate", art, "--backend", "ort", "--lengths", "1,17", "--report", rep)
    assert p.returncode == 1, p.stdout + p.stderr
    assert "ParityError" in p.stderr and "length 1:" in p.stderr and "length 17:" in p.stderr
    r = json.loads(rep.read_text())
    assert r["passed"] is False and len(r["mismatches"]) >= 2
    for x in r["results"]:
        assert not x["passed"] and x["max_abs_err"] > 1e-3
        h = x["health"]
        # layer 1's own state (its K/V) is computed before its MoE: the first state to drift is layer 2's
        assert h["first_bad_layer"] == 2, h["problem"]
        assert "layer 1's mixer output or feed-forward (attention+moe)" in h["where"]
        assert x["states"]["present.layer1.k"]["passed"] and not x["states"]["present.layer2.conv_state"]["passed"]
    assert "first bad layer 2" in rep.with_suffix(".md").read_text()
    assert rep.with_suffix(".error.png").exists()


# ---- Polygraphy's command line with our custom ops -------------------------------------------------------
def test_polygraphy_run_onnxrt_with_custom_ops(built, tmp_path):
    inputs, outputs = tmp_path / "in.json", tmp_path / "ref.json"
    p = subprocess.run([sys.executable, "-m", "jambatrt.validate.polygraphy_ext", str(built), "--length", "17",
                        "--inputs", str(inputs), "--outputs", str(outputs)], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    polygraphy = shutil.which("polygraphy", path=str(Path(sys.executable).parent))
    # polygraphy is a dependency of jambatrt (pyproject.toml): its command missing is a broken install
    assert polygraphy is not None, f"no polygraphy command beside {sys.executable}: run `make setup`"
    model = str(built / "model.ort.onnx")
    script = ["--data-loader-script", str(ROOT / "validate" / "polygraphy_ext.py")]
    tolerances = ["--atol", "logits:1e-3", "1e-4", "--rtol", "logits:0", "1e-3"]
    env = {**os.environ, "JAMBATRT_INPUTS": str(inputs)}
    ok = subprocess.run([polygraphy, "run", model, "--onnxrt", *script, "--load-outputs", str(outputs), *tolerances],
                        capture_output=True, text=True, env=env, timeout=600)
    assert ok.returncode == 0, ok.stdout[-3000:] + ok.stderr[-3000:]
    out = ok.stdout + ok.stderr
    assert "PASSED | simple | All outputs matched" in out and "present.layer2.ssm_state" in out

    # the same command fails when the reference outputs are off by more than the tolerance
    from polygraphy.comparator import RunResults
    run = RunResults.load(str(outputs))
    res = run[list(run.keys())[0]][0]
    res["logits"] = res["logits"] + 0.01
    bad = tmp_path / "bad.json"
    run.save(str(bad))
    fail = subprocess.run([polygraphy, "run", model, "--onnxrt", *script, "--load-outputs", str(bad), *tolerances],
                          capture_output=True, text=True, env=env, timeout=600)
    assert fail.returncode != 0 and "FAILED" in fail.stdout + fail.stderr


# ---- 262,144 tokens ----------------------------------------------------------------------------------------
@pytest.mark.slow
def test_bench_preset_262k_prefill_parity(tmp_path):
    """262,144-token prefill on the bench preset: parity (logits and states) against the long eager
    reference, and the engine's peak RSS from `jambatrt profile` (a child process). Times are
    printed, not asserted."""
    art = tmp_path / "bench"
    run_cli("export", "--preset", "bench", "-o", art, check=True)
    run_cli("build", art, "--backend", "ort", check=True)
    rep = tmp_path / "parity.json"
    p = run_cli("validate", art, "--backend", "ort", "--lengths", "262144", "--report", rep, timeout=3600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(rep.read_text())
    x = r["results"][0]
    assert r["passed"] and x["length"] == 262144 and x["max_abs_err"] <= 1e-3 and x["top1_agreement"] == 1.0
    assert "eager-long" in x["reference_impl"] and x["health"]["first_bad_layer"] is None
    prof = tmp_path / "profile.json"
    p = run_cli("profile", art, "--backend", "ort", "--lengths", "262144", "--reference", "none", "--repeats", "1",
                "--decode-tokens", "8", "--report", prof, timeout=3600)
    print(p.stdout)
    assert p.returncode == 0, p.stdout + p.stderr
    rows = {x["mode"]: x for x in json.loads(prof.read_text())["results"]}
    assert rows["prefill"]["length"] == 262144 and rows["prefill"]["peak_rss_bytes"] < 4e9
    assert rows["decode"]["tokens_per_s"] > 0


# ---- tokens with an undecided MoE top-k ------------------------------------------------------------------
class _EditedLogits:
    """Engine wrapper whose prefill logits at one token are edited by `edit(logits)`."""

    def __init__(self, engine, token):
        self.engine, self.token = engine, token

    def __getattr__(self, name):
        return getattr(self.engine, name)

    prefill_with_state = Engine.prefill_with_state    # what the parity runner calls, through prefill below

    def prefill(self, ids):
        logits, state = self.engine.prefill(ids)
        logits = logits.copy()
        self.edit(logits)
        return logits, state


class _FlipAt(_EditedLogits):
    """Logits at one token differ as after the other expert choice."""

    def edit(self, logits):
        logits[0, self.token] += 0.05


class _TieAt(EagerReference):
    """Reference that reports a routing margin of 0 (a tie) at one token of layer 3."""

    def __init__(self, artifact, token):
        super().__init__(artifact)
        self.token = token

    def prefill_with_state(self, ids, stats=True):
        out = super().prefill_with_state(ids, stats)
        self.last_router_margins[3][0, self.token] = 0.0
        return out


def test_undecided_routing_tokens_are_graded_apart(built):
    from jambatrt.engines.ort import OrtEngine
    from jambatrt.validate.parity import run_parity

    with OrtEngine.load(built) as engine:
        flipped = _FlipAt(engine, token=40)
        plain = run_parity(flipped, EagerReference(built), [64], "float32")
        assert not plain.passed and plain.results[0].max_abs_err >= 0.05      # a real mismatch is caught
        tie = run_parity(flipped, _TieAt(built, token=40), [64], "float32")
        assert tie.passed, tie.mismatches
        rt = tie.results[0].routing
        assert rt["undecided_tokens"] == 1 and rt["tokens"] == [[0, 40]] and rt["undecided_by_layer"][3] == 1
        assert rt["max_abs_err_undecided"] == pytest.approx(0.05, abs=1e-4)
        assert tie.results[0].max_abs_err <= 1e-3
        # a tie elsewhere does not excuse the flipped token
        assert not run_parity(flipped, _TieAt(built, token=41), [64], "float32").passed
        # more undecided tokens than allowed (64 tokens: at most 1) cannot be graded apart
        many = _TieAt(built, token=[40, 41])
        r = run_parity(engine, many, [64], "float32")
        assert not r.passed and "undecided MoE top-k" in " ".join(r.mismatches)


# ---- argmax ties (issue 15, item 11) ----------------------------------------------------------------------
def _set_top2(logits, token, margin, shift=0.0):
    """At `token` of batch row 0: make the second-largest logit `margin` below the largest (negative:
    above it), then move the two apart/together by `shift` each. Returns the two vocabulary indices."""
    row = logits[0, token]
    j1, j2 = np.argsort(row)[-1], np.argsort(row)[-2]
    row[j2] = row[j1] - margin
    row[j1] -= shift
    row[j2] += shift
    return j1, j2


class _RefTop2(EagerReference):
    """Reference whose top-two logits at one token are `margin` apart."""

    def __init__(self, artifact, token, margin):
        super().__init__(artifact)
        self.token, self.margin = token, margin

    def prefill_with_state(self, ids, stats=True):
        logits, states, layers = super().prefill_with_state(ids, stats)
        logits = logits.copy()
        _set_top2(logits, self.token, self.margin)
        return logits, states, layers


class _EngineTop2(_EditedLogits):
    """At one token, the top-two logits are `margin` apart and shifted by `shift`."""

    def __init__(self, engine, token, margin, shift=0.0):
        super().__init__(engine, token)
        self.margin, self.shift = margin, shift

    def edit(self, logits):
        _set_top2(logits, self.token, self.margin, self.shift)


def test_argmax_ties_are_graded_apart_and_not_blamed_on_a_layer(built):
    """A position whose reference top-two margin (2e-7) is far below the logits tolerance (1e-3) may
    flip: counted and listed, the run passes and health blames nobody. A flip where the reference's
    margin (1.5e-3) exceeds the tolerance still fails, although every logit is within atol."""
    from jambatrt.engines.ort import OrtEngine
    from jambatrt.validate.parity import run_parity

    with OrtEngine.load(built) as engine:
        tie = run_parity(_EngineTop2(engine, 30, margin=-2e-7), _RefTop2(built, 30, margin=2e-7), [64], "float32")
        r = tie.results[0]
        assert r.top1_agreement == pytest.approx(63 / 64) and r.max_abs_err <= 1e-3
        assert tie.passed, tie.mismatches
        assert r.argmax_ties["tied_positions"] >= 1 and r.argmax_ties["flipped"] == 1
        assert r.argmax_ties["positions"] == [[0, 30]] and r.argmax_ties["flipped_margins"][0] < 1e-6
        assert r.health["problem"] is None and r.health["first_bad_layer"] is None
        # decided: reference margin 1.5e-3 > atol; the engine moves each of the two by 8e-4 (< atol) and flips
        decided = run_parity(_EngineTop2(engine, 30, margin=1.5e-3, shift=8e-4), _RefTop2(built, 30, margin=1.5e-3),
                             [64], "float32")
        d = decided.results[0]
        assert d.max_abs_err < 1e-3 and d.top1_agreement == pytest.approx(63 / 64)
        assert not decided.passed and d.argmax_ties["flipped"] == 0
        assert "decided" in " ".join(decided.mismatches)
