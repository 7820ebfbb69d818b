"""`jambatrt profile` (issue 6): per-(side, length) child processes, min/median/max tokens/s, peak
RSS of each child, the DESIGN.md JSON, markdown and the PNG."""

import json

import numpy as np
import pytest

from conftest import run_cli
from jambatrt.validate.profile import run_child
from jambatrt.validate.report import plot_profile


@pytest.fixture(scope="module")
def built(tiny_artifact):
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    return tiny_artifact


def test_profile_cli_json_markdown_plot(built, tmp_path):
    rep, png = tmp_path / "p.json", tmp_path / "plots" / "p.png"
    p = run_cli("profile", built, "--backend", "ort", "--lengths", "1,64", "--repeats", "2", "--warmup-tokens", "8",
                "--decode-tokens", "4", "--reference-max-length", "16", "--report", rep, "--plot", png)
    assert p.returncode == 0, p.stdout + p.stderr
    r = json.loads(rep.read_text())
    assert r["backend"] == "ort" and r["reference"] == "eager-custom-ops" and "custom ops" in r["reference_description"]
    assert set(r["reference_kernels"]) == {"selective_scan", "causal_conv1d", "moe_int8", "attention"}
    assert [(x["length"], x["mode"]) for x in r["results"]] == [(1, "prefill"), (1, "decode"), (64, "prefill"),
                                                               (64, "decode")]
    for x in r["results"]:
        # the DESIGN.md fields and types
        assert isinstance(x["length"], int) and x["backend"] == "ort" and x["mode"] in ("prefill", "decode")
        assert isinstance(x["tokens_per_s"], float) and x["tokens_per_s"] > 0
        assert isinstance(x["peak_rss_bytes"], int) and x["peak_rss_bytes"] >= x["baseline_rss_bytes"] > 50e6
        assert x["tokens_per_s_min"] <= x["tokens_per_s"] <= x["tokens_per_s_max"]
        assert x["runs"] == (2 if x["mode"] == "prefill" else 4) and len(x["seconds"]) == x["runs"]
        # the kernel's own accounting of the child (wait4) bounds the peak the child measured itself
        assert x["child_peak_rss_bytes"] >= 0.95 * x["peak_rss_bytes"]
    short, long = r["results"][0], r["results"][2]
    assert isinstance(short["reference_tokens_per_s"], float) and short["reference_peak_rss_bytes"] > 50e6
    assert long["reference_tokens_per_s"] is None and "reference-max-length" in long["reference_note"]
    assert r["results"][3]["context"] == 64
    md = rep.with_suffix(".md").read_text()
    for must in ("preset tiny", "machine:", "versions: torch", "eager-custom-ops", "| 64 | decode |", "peak RSS"):
        assert must in md, must
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image
    h, w = matplotlib.image.imread(str(png)).shape[:2]
    assert w >= 1000 and h >= 400
    assert "tok/s" in p.stdout and "peak RSS" in p.stdout


def test_profile_modes_and_no_reference(built, tmp_path):
    rep = tmp_path / "p.json"
    p = run_cli("profile", built, "--backend", "ort", "--lengths", "5", "--modes", "prefill", "--reference", "none",
                "--repeats", "1", "--report", rep)
    assert p.returncode == 0, p.stderr
    r = json.loads(rep.read_text())
    assert r["reference"] is None and [x["mode"] for x in r["results"]] == ["prefill"]
    assert r["results"][0]["reference_tokens_per_s"] is None
    assert rep.with_suffix(".png").exists()          # default plot path: beside the report


def test_profile_bad_modes_is_a_typed_error(built):
    p = run_cli("profile", built, "--backend", "ort", "--modes", "prefil")
    assert p.returncode == 2 and "InputError" in p.stderr and "Traceback" not in p.stderr


def test_failing_child_reports_its_error(tmp_path):
    spec = {"artifact": str(tmp_path / "missing"), "backend": "ort", "side": "engine", "length": 4, "batch": 1,
            "seed": 0, "warmup_tokens": 1, "repeats": 1, "budget_s": 1, "decode_tokens": 1, "decode_warmup": 0,
            "modes": ["prefill"], "reference_chunk": 8}
    with pytest.raises(RuntimeError, match=r"(?s)profile worker \(engine, length 4\) failed.*ArtifactError"):
        run_child(spec, timeout_s=300)


def test_plot_profile_with_reference_missing_at_long_lengths(tmp_path):
    rows = [{"length": L, "mode": m, "backend": "ort", "tokens_per_s": 100.0 * L ** 0.5, "tokens_per_s_min": 90.0,
             "tokens_per_s_max": 110.0 * L ** 0.5, "peak_rss_bytes": int(3e8 + 1e3 * L),
             "reference_tokens_per_s": 50.0 if L < 65536 else None,
             "reference_peak_rss_bytes": int(4e8) if L < 65536 else None}
            for L in (1, 4096, 65536, 262144) for m in ("prefill", "decode")]
    report = {"backend": "ort", "reference": "eager-custom-ops", "results": rows,
              "machine": {"processor": "cpu", "cpus": 2}, "model": {"source": {"preset": "bench"}}}
    png = plot_profile(report, tmp_path / "x.png")
    import matplotlib.image
    assert matplotlib.image.imread(str(png)).shape[2] in (3, 4)


def test_peer_bench_peak_rss_is_the_childs_own():
    """`make bench-peer` reports llama.cpp's peak RSS per test: the child's own, not the resident
    memory of the bench process that started it (which a forked child's ru_maxrss counts)."""
    import sys

    from jambatrt.validate.peer import _wait_rss
    held = np.ones(512 << 20, np.uint8)            # the bench process holding models
    _, small = _wait_rss([sys.executable, "-c", "pass"])
    _, large = _wait_rss([sys.executable, "-c", "b = bytearray(300 << 20); b[::4096] = b'x' * len(b[::4096])"])
    assert held.sum() and small < 200 << 20 <= (300 << 20) <= large < (300 + 200) << 20


def test_peer_bench_flat_decode_report(tiny_artifact, tmp_path):
    """`make bench-peer`'s decode per token against context: validate/decode_flat.py in a child on a built
    artifact (two contexts, three steps), read back into peer.json, peer.md's table and the plot's
    third panel. (The table's other rows here are made up: this checks the report, not a measurement.)"""
    from jambatrt.validate import peer
    run_cli("build", tiny_artifact, "--backend", "ort", check=True)
    flat = peer.flat_decode({"float32": tiny_artifact}, [40, 8], 3, tmp_path)
    f = flat[0]
    assert [r["context"] for r in f["rows"]] == [8, 40] and f["rows"][0]["ratio_to_shortest_median"] == 1.0
    assert all(r["decode_ms_median"] > 0 for r in f["rows"]) and f["steps"] == 3
    assert f["flat"] == (f["worst_median_ratio"] <= peer.FLAT_WITHIN)
    # the floor: each context's cache read plainly in the same rounds (prefill + the untimed and 3 timed steps)
    cfg = json.loads((tiny_artifact / "config.json").read_text())
    per_pos = 2 * 4 * cfg["num_key_value_heads"] * (cfg["hidden_size"] // cfg["num_attention_heads"])
    layers = sum(1 for i in range(cfg["num_hidden_layers"])
                 if i % cfg["attn_layer_period"] == cfg["attn_layer_offset"])
    assert [r["kv_bytes"] for r in f["rows"]] == [layers * per_pos * (L + 4) for L in (8, 40)]
    assert all(r["kv_read_ms_median"] > 0 for r in f["rows"])
    w = max(f["rows"], key=lambda r: r["ratio_to_shortest_median"])
    assert f["rows"][0]["floor_ratio_median"] == pytest.approx(1.0)
    assert (f["worst_context"], f["floor_at_worst"]) == (w["context"], w["floor_ratio_median"])
    rows = [{"round": 1, "precision": "float32", "mode": "decode", "length": 512, "jambatrt_tokens_per_s": 2.0,
             "jambatrt_peak_rss_bytes": 1, "jambatrt_decode": "native", "llama_cpp_tokens_per_s": 1.0,
             "llama_cpp_peak_rss_bytes": 1, "llama_cpp_settings": {}, "ratio": 2.0}]
    meta = {"llama_cpp": "x", "threads": 2, "kv_cache": "float32", "rounds": 1, "machine": "cpu"}
    peer.write_report(tmp_path, peer.summarise(rows), rows, [], meta, flat)
    md = (tmp_path / "peer.md").read_text()
    assert "decode per token against context" in md and "| float32 | " in md and "(x1.00)" in md
    assert f"x{f['floor_at_worst']:.2f} (at {w['context']:,}: " in md
    assert json.loads((tmp_path / "peer.json").read_text())["flat_decode"] == flat
    import matplotlib.image
    assert matplotlib.image.imread(str(tmp_path / "peer.png")).shape[1] > 1500      # three panels at 110 dpi
