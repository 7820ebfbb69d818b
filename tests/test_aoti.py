"""The AOTInductor engine (issue 9): the step program compiled by torch._inductor into one package.

On CPU (every machine): the package is compiled for CPU from the tiny artifact — the jamba ops
called back through torch's proxy executor — and must
match the eager `<op>_ref` model; the manifest entry, atomic writes, the CLI (build, validate,
generate, profile) and a Triton Inference Server model for it are checked. The CUDA path is
checked as far as a CPU-only host goes: the whole step program traces into the Triton kernels
(what Inductor compiles into a cuda package), the traceable kernel launches match `<op>_ref`
under Triton's interpreter, and building a cuda package says clearly that there is no GPU.
The GPU run itself is `python -m jambatrt.validate.aoti_gpu_check`."""

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import (ROOT, assert_same_model_sums, compare_steps, offline_logits, run_cli, start_server,
                      step_two_sequences)
from jambatrt.artifact import read_manifest, sha256_file, verify_files
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError
from jambatrt.export import ops as jops

CPU_ONLY = not torch.cuda.is_available()


# ---- the compiler sees the Triton kernels (CUDA path, checked without a GPU) ------------------------
def test_register_cuda_kernels_is_a_noop_without_cuda():
    from jambatrt.plugins.gpu import torch_ops

    if not CPU_ONLY:
        assert torch_ops.register_cuda_kernels() and torch_ops.register_cuda_kernels()   # idempotent
        return
    assert torch_ops.register_cuda_kernels() is False
    assert "no CUDA GPU" in torch_ops.cuda_unavailable_reason()
    for name in jops.REGISTRY:
        assert not torch._C._dispatch_has_kernel_for_dispatch_key(f"jamba::{name}", "CUDA"), name


def _kernel_names(ep) -> list[str]:
    from torch._higher_order_ops.triton_kernel_wrap import kernel_side_table

    names = []
    for n in ep.graph.nodes:
        if n.op == "call_function" and "triton_kernel_wrapper" in str(n.target):
            k = kernel_side_table.get_kernel(n.kwargs["kernel_idx"])
            while not hasattr(k, "__name__") and hasattr(k, "fn"):
                k = k.fn
            names.append(k.__name__)
    return names


def test_step_program_traces_into_triton_kernels(tiny_ckpt):
    """With the kernels registered, functionalisation for Inductor replaces every jamba op of the
    step program by its Triton kernels, without specialising batch, sequence or past; torch.export
    itself still keeps the ops opaque (model.onnx and program.pt2 unchanged)."""
    pytest.importorskip("triton", reason="triton not installed (pip install '.[gpu]')")
    import logging

    from jambatrt.config import JambaConfig
    from jambatrt.export.trace import export_step
    from jambatrt.export.weights import load_model
    from jambatrt.plugins.gpu.torch_ops import register_cuda_kernels, trace_cpu_ops_too, traced_kernels

    # no GPU: triton cannot analyse which kernel arguments are written and says so at length
    logging.getLogger("torch._higher_order_ops.triton_kernel_wrap").setLevel(logging.ERROR)
    assert register_cuda_kernels(require_gpu=False) and register_cuda_kernels(require_gpu=False)
    ep = export_step(load_model(tiny_ckpt), max_seq=4096)
    ops = [str(n.target) for n in ep.graph.nodes if "jamba" in str(n.target)]
    assert ops and all(o.startswith("jamba.") for o in ops)          # export: opaque, as before
    with trace_cpu_ops_too():
        traced = ep.run_decompositions({}, decompose_custom_triton_ops=True)
    code = traced.graph_module.code
    assert "torch.ops.jamba." not in code
    cfg = JambaConfig.load(tiny_ckpt)
    KERNELS = traced_kernels()
    want = []
    for i in range(cfg.num_hidden_layers):
        mixer = KERNELS["attention"] if cfg.is_attention(i) else KERNELS["causal_conv1d"] + KERNELS["selective_scan"]
        want += list(mixer)
        if cfg.is_moe(i):
            want += list(KERNELS["moe_int8"])
    assert sorted(_kernel_names(traced)) == sorted(want)
    # still dynamic: the same three dims with their ranges, grids computed from them at run time
    assert sorted((r.lower, r.upper) for r in traced.range_constraints.values()) == [(0, 4096), (1, 64), (1, 4096)]
    grids = [n.kwargs["grid"][0] for n in traced.graph.nodes if "triton_kernel_wrapper" in str(n.target)]
    assert any(any(isinstance(g, torch.fx.Node) for g in grid) for grid in grids)
    # and without the rule's device (CPU tensors, outside trace_cpu_ops_too) the ops stay opaque
    assert "torch.ops.jamba.selective_scan" in ep.run_decompositions({}, decompose_custom_triton_ops=True
                                                                     ).graph_module.code


_TWIN_SCRIPT = r"""
import json, os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
import jambatrt
from jambatrt.export import ops as jops
from jambatrt.plugins.gpu import attention, causal_conv1d, moe_int8, selective_scan
torch.manual_seed(0)
out = []
def grade(case, dtype, got, want):
    atol, rtol = jops.SPECS[case.split(":")[0]].tolerances[dtype]
    got = got if isinstance(got, (tuple, list)) else (got,)
    want = want if isinstance(want, (tuple, list)) else (want,)
    for i, (g, w) in enumerate(zip(got, want)):
        ok = g.shape == w.shape and g.dtype == w.dtype and bool(torch.isfinite(g.float()).all())
        excess = float(((g.float() - w.float()).abs() - (atol + rtol * w.float().abs())).max()) if w.numel() else -1.0
        out.append({"case": f"{case} out{i} {str(dtype)[6:]}", "ok": ok and excess <= 0, "excess": excess,
                    "contiguous": g.is_contiguous()})
for dt in (torch.float32, torch.bfloat16):
    r = lambda *s, scale=1.0: (torch.randn(*s) * scale).to(dt)
    B, D, L, N = 2, 16, 19, 5
    u, delta, z = r(B, D, L), r(B, D, L, scale=0.5), r(B, D, L)
    A = -(torch.rand(D, N) * 2 + 0.1)
    Bm, Cm, Dk, bias, st = r(B, N, L), r(B, N, L), torch.randn(D), torch.randn(D) * 0.5, torch.randn(B, D, N)
    ut = u.transpose(1, 2).contiguous().transpose(1, 2)                    # [B,D,L] view of [B,L,D], as in the model
    for case, args in [("selective_scan:full", (ut, delta, A, Bm, Cm, Dk, z, bias, st)),
                       ("selective_scan:bare", (u, delta, A, Bm, Cm, Dk, None, None, None)),
                       ("selective_scan:L1", (u[..., :1], delta[..., :1], A, Bm[..., :1], Cm[..., :1], Dk,
                                              z[..., :1], bias, st))]:
        grade(case, dt, selective_scan.selective_scan_traceable(*args), jops.reference("selective_scan")(*args))
    x, w, b, s = r(B, D, L), r(D, 4, scale=0.5), r(D), r(B, D, 3)
    xt = x.transpose(1, 2).contiguous().transpose(1, 2)
    for case, args in [("causal_conv1d:state", (xt, w, b, s)), ("causal_conv1d:none", (x, w, b, None)),
                       ("causal_conv1d:L1", (x[..., :1], w, b, s))]:
        grade(case, dt, causal_conv1d.causal_conv1d_traceable(*args), jops.reference("causal_conv1d")(*args))
    q, k, v = r(2, 9, 4, 16), r(2, 9, 2, 16), r(2, 9, 2, 16)
    pk, pv = r(2, 5, 2, 16), r(2, 5, 2, 16)
    for case, args in [("attention:past", (q, k, v, pk, pv)), ("attention:none", (q, k, v, None, None)),
                       ("attention:P0", (q, k, v, pk[:, :0], pv[:, :0])),
                       ("attention:decode", (q[:, :1], k[:, :1], v[:, :1], pk, pv))]:
        grade(case, dt, attention.attention_traceable(*args), jops.reference("attention")(*args))
    E, H, I, Tn = 4, 32, 24, 10
    q8 = lambda w: (torch.round(w / (w.abs().amax(-1, keepdim=True) / 127)).clamp(-127, 127).to(torch.int8),
                    (w.abs().amax(-1) / 127).float())
    w13, s13 = q8(torch.randn(E, 2 * I, H) * H ** -0.5)
    w2, s2 = q8(torch.randn(E, H, I) * I ** -0.5)
    for case, (xx, lg, kk) in [("moe_int8:k2", (r(Tn, H), r(Tn, E), 2)), ("moe_int8:k1", (r(3, H), r(3, E), 1))]:
        args = (xx, lg, w13, s13, w2, s2, kk)
        grade(case, dt, moe_int8.moe_int8_traceable(*args), jops.reference("moe_int8")(*args))
print(json.dumps(out))
"""


def test_traceable_launches_match_ref_under_the_interpreter(tmp_path):
    """The wrap_triton launches a cuda package compiles (parameter order, grids, stand-ins for absent
    inputs, output layout) against `<op>_ref`, fp32 and bf16, run by Triton's CPU interpreter in a
    child process (TRITON_INTERPRET must be set before the kernels are defined)."""
    pytest.importorskip("triton", reason="triton not installed (pip install '.[gpu]')")
    env = {**os.environ, "TRITON_INTERPRET": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-c", _TWIN_SCRIPT], capture_output=True, text=True, env=env, timeout=600,
                       cwd=tmp_path)
    assert p.returncode == 0, p.stderr[-3000:]
    rows = json.loads(p.stdout.strip().splitlines()[-1])
    assert len(rows) == 2 * (3 * 2 + 3 * 2 + 4 * 3 + 2)
    assert all(r["contiguous"] for r in rows)
    bad = [r for r in rows if not r["ok"]]
    assert not bad, bad


# ---- the CPU package ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    """A private copy of the tiny artifact with the aoti engine built for CPU by the CLI."""
    dst = tmp_path_factory.mktemp("aoti-art") / "tiny"
    shutil.copytree(tiny_artifact, dst)
    p = run_cli("build", dst, "--backend", "aoti", check=True)
    assert "built aoti engine" in p.stdout and "Traceback" not in p.stderr
    return dst


@pytest.fixture(scope="module")
def engine(artifact):
    from jambatrt.engines.aoti import AotiEngine
    with AotiEngine.load(artifact) as e:
        yield e


def test_manifest_entry_and_files(artifact):
    import platform

    from jambatrt.config import JambaConfig

    m = verify_files(artifact)
    e = m["engines"]["aoti"]
    assert e["path"] == "engines/aoti/model.pt2" and (artifact / e["path"]).is_file()
    assert m["files"][e["path"]]["sha256"] == sha256_file(artifact / e["path"])
    assert e["device"] == "cpu" and "gpu" not in e and e["cpu_isa"]
    assert e["torch"] == torch.__version__ and e["python"] == platform.python_version()
    try:
        import triton
        assert e["triton"] == triton.__version__
    except ImportError:
        assert e["triton"] is None
    assert e["settings"] == {"device": "cpu", "max_batch": 4, "max_seq": None, "prefill_chunk": None,
                             "chunk_cap": 8192, "max_autotune": False, "emulate_precision_casts": True}
    assert e["max_seq"] == m["programs"]["step"]["max_seq"] and e["max_batch"] == 4
    assert e["chunk_plan"]["chunk"] == 8192 and e["chunk_plan"]["fits"]
    cfg = JambaConfig.from_hf_dict(m["config"])
    n_calls = sum(1 if cfg.is_attention(i) else 2 for i in range(cfg.num_hidden_layers)) + \
        sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    assert len(e["python_ops"]) == n_calls and all(o.startswith("jamba::") for o in e["python_ops"])
    assert e["triton_kernels"] == []
    # no temp dirs left: engines/ holds exactly the engines the manifest records (the copied
    # tiny artifact may already carry an ort engine, depending on which tests ran first)
    assert sorted(p.name for p in (artifact / "engines").iterdir()) == sorted(read_manifest(artifact)["engines"])
    assert "aoti" in read_manifest(artifact)["engines"]


def _random_state(cfg, batch, past, seed, dtype=torch.float32):
    """A random incoming state (dtype: the model's; the SSM state stays fp32)."""
    from jambatrt.export.model import state_shapes

    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g).to(dt or dtype) for _, shape, dt in state_shapes(cfg, batch, past)]


def test_step_matches_eager_reference(engine, artifact):
    """run_step against JambaLM on the plain `<op>_ref` ops: batch 1 and > 1, one token (decode) and
    many, empty / one-token / longer past, random incoming state."""
    from jambatrt.artifact import read_manifest
    from jambatrt.export.weights import load_artifact_model

    ref = load_artifact_model(artifact, read_manifest(artifact), impl="ref")
    cfg, V = ref.config, ref.config.vocab_size
    for i, (B, L, P) in enumerate([(1, 1, 0), (1, 1, 1), (2, 1, 37), (2, 17, 0), (1, 5, 7), (3, 64, 9), (4, 2, 2)]):
        ids = torch.randint(0, V, (B, L), generator=torch.Generator().manual_seed(i))
        state = _random_state(cfg, B, P, i)
        logits, new = engine.run_step(ids.numpy(), [s.numpy() for s in state])
        with torch.no_grad():
            want, want_state = ref(ids, state)
        assert logits.shape == (B, L, V) and logits.dtype == np.float32
        assert_same_model_sums(logits, want.numpy(), cfg, P + L, f"logits B={B} L={L} P={P}")
        assert len(new) == len(want_state)
        for got, w in zip(new, want_state):
            assert_same_model_sums(got, w.numpy(), cfg, P + L, f"state B={B} L={L} P={P}")


def test_bfloat16_package_matches_eager_bfloat16(tmp_path):
    """A bfloat16 artifact (which the ONNX Runtime CPU engine refuses) as a CPU package: bf16 state
    through the numpy interface, fp32 SSM state, logits as eager bf16 computes them."""
    from jambatrt.engines.aoti import AotiEngine
    from jambatrt.engines.base import _np_dtype
    from jambatrt.artifact import read_manifest
    from jambatrt.export.weights import load_artifact_model

    art = tmp_path / "bf16"
    run_cli("export", "--preset", "tiny", "--dtype", "bfloat16", "-o", art, check=True)
    AotiEngine.build(art)
    ref = load_artifact_model(art, read_manifest(art), impl="ref")
    with AotiEngine.load(art) as e:
        for i, (B, L, P) in enumerate([(2, 17, 0), (1, 1, 5)]):
            ids = torch.randint(0, e.config.vocab_size, (B, L), generator=torch.Generator().manual_seed(i))
            state = _random_state(e.config, B, P, i, torch.bfloat16)
            np_state = [s.view(torch.int16).numpy().view(_np_dtype("bfloat16")) if s.dtype == torch.bfloat16
                        else s.numpy() for s in state]
            logits, new = e.run_step(ids.numpy(), np_state)
            with torch.no_grad():
                want, want_state = ref(ids, state)
            assert logits.dtype == _np_dtype("bfloat16")
            assert [a.dtype for a in new] == [a.dtype for a in np_state]
            np.testing.assert_allclose(logits.astype(np.float32), want.float().numpy(), rtol=0, atol=2e-2)
            for got, w in zip(new, want_state):
                np.testing.assert_allclose(got.astype(np.float32), w.float().numpy(), rtol=0, atol=2e-2)


def test_chunked_prefill_equals_one_call(engine):
    rng = np.random.default_rng(3)
    ids = rng.integers(0, engine.config.vocab_size, (2, 300))
    whole, s1 = engine.prefill(ids)
    chunked, s2 = engine.prefill(ids, chunk=64)
    assert_same_model_sums(chunked, whole, engine.config, 300, "logits")
    for a, b in zip(s1, s2):
        assert_same_model_sums(b, a, engine.config, 300, "state")
    assert engine.default_chunk(1) == 8192


def test_runtime_refusals(engine, artifact, tmp_path):
    from jambatrt.engines.aoti import AotiEngine

    with pytest.raises(InputError, match="max_batch 4"):
        engine.prefill(np.zeros((5, 3), dtype=np.int64))
    with pytest.raises(InputError, match="out of range"):
        engine.prefill(np.array([[engine.config.vocab_size]]))
    m = read_manifest(artifact)
    m["engines"]["aoti"]["torch"] = "1.13.0"
    with pytest.raises(BackendUnavailable, match="compiled by torch 1.13.0"):
        AotiEngine(artifact, m)
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    (bad / "engines" / "aoti" / "model.pt2").write_bytes(b"not a package")
    with pytest.raises(ArtifactError, match="engines/aoti/model.pt2 has 13 bytes, the manifest says"):
        AotiEngine.load(bad)
    with pytest.raises(ArtifactError, match="cannot load the AOTInductor package"):
        AotiEngine.load(bad, verify=False)


def test_cpu_package_needs_the_ops_registered_in_the_process(artifact):
    """Where the CPU path stops being ahead-of-time: the package calls the ops back by name, so a
    process that has not registered them (a C++-only runtime, or Python without jambatrt) cannot
    even load it."""
    code = f"import torch\ntorch._inductor.aoti_load_package({str(artifact / 'engines/aoti/model.pt2')!r})\n"
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert p.returncode != 0 and "Could not find schema for jamba::" in p.stderr, p.stderr[-2000:]


@pytest.mark.skipif(not CPU_ONLY, reason="this host has a CUDA GPU: the no-GPU refusal cannot be observed")
def test_cuda_build_without_gpu_is_refused_cleanly(artifact):
    from jambatrt.engines.aoti import AotiEngine

    before = read_manifest(artifact)
    with pytest.raises(BackendUnavailable, match="no CUDA GPU"):
        AotiEngine.build(artifact, device="cuda")
    with pytest.raises(InputError, match="device='tpu'"):
        AotiEngine.build(artifact, device="tpu")
    with pytest.raises(InputError, match="unknown aoti setting"):
        AotiEngine.build(artifact, attention="gqa")
    assert read_manifest(artifact) == before
    assert sorted(p.name for p in (artifact / "engines").iterdir()) == sorted(before["engines"])


def test_cli_validate_generate_profile(artifact, tmp_path):
    from jambatrt.artifact import read_manifest
    from jambatrt.export.weights import load_artifact_model

    p = run_cli("validate", artifact, "--backend", "aoti", "--lengths", "1,17,300", "--report", tmp_path / "v.json")
    assert p.returncode == 0, p.stderr[-2000:]
    report = json.loads((tmp_path / "v.json").read_text())
    assert report["passed"] and report["backend"] == "aoti" and len(report["results"]) == 3
    p = run_cli("generate", artifact, "--backend", "aoti", "--prompt-ids", "1,2,3", "--max-new-tokens", "6", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout.strip().splitlines()[-1])
    ref = load_artifact_model(artifact, read_manifest(artifact), impl="ref")   # greedy decode on the eager reference
    ids, state, want = torch.tensor([[1, 2, 3]]), None, []
    with torch.no_grad():
        for _ in range(6):
            logits, state = ref(ids, state)
            ids = logits[:, -1].argmax(-1, keepdim=True)
            want.append(int(ids))
    assert got["prompt_ids"] == [1, 2, 3] and got["generated_ids"] == want
    p = run_cli("profile", artifact, "--backend", "aoti", "--lengths", "64", "--repeats", "1", "--warmup-tokens", "16",
                "--decode-tokens", "4", "--reference", "none", "--report", tmp_path / "p.json")
    assert p.returncode == 0, p.stderr[-2000:]
    rows = json.loads((tmp_path / "p.json").read_text())["results"]
    assert {r["mode"] for r in rows} == {"prefill", "decode"} and all(r["tokens_per_s"] > 0 for r in rows)


# ---- Triton Inference Server ------------------------------------------------------------------------
def test_aoti_model_config(artifact, tmp_path):
    from jambatrt.deploy.engine_model import engine_config, write_engine_model
    from jambatrt.deploy.repository import RepositorySettings

    m = read_manifest(artifact)
    d = write_engine_model(tmp_path / "jamba_aoti", artifact, m, "jamba_aoti", "aoti",
                           RepositorySettings(max_tokens=300, sequence_batch=4))
    cfg = (d / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "max_batch_size: 4" in cfg and "KIND_CPU" in cfg
    # the sequence model's interface: ids in, the last token's logits out; no state through the client
    assert '{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }' in cfg
    assert '{ name: "logits" data_type: TYPE_FP32 dims: [ 512 ] }' in cfg and "next_token" in cfg
    assert "past." not in cfg and "present." not in cfg and cfg.count("data_type: TYPE_") == 4    # + CORRID
    assert "CONTROL_SEQUENCE_START" in cfg and "CONTROL_SEQUENCE_CORRID" in cfg
    assert 'key: "backend" value { string_value: "aoti" }' in cfg and 'string_value: "300"' in cfg
    assert f'string_value: "{artifact.resolve()}"' in cfg and sha256_file(artifact / "manifest.json") in cfg
    assert (d / "1" / "model.py").read_text() == (ROOT / "deploy" / "engine_model.py").read_text()
    m["engines"]["aoti"] = {**m["engines"]["aoti"], "device": "cuda", "gpu": {"name": "NVIDIA H100", "arch": "sm_90"}}
    assert "KIND_GPU" in engine_config(m, artifact, "x", "aoti") and "sm_90" in engine_config(m, artifact, "x", "aoti")
    del m["engines"]["aoti"]
    with pytest.raises(ArtifactError, match="no aoti engine built"):
        write_engine_model(tmp_path / "none", artifact, m, "x", "aoti")
    assert not (tmp_path / "none").exists()
    with pytest.raises(InputError, match="accepted: aoti, tensorrt"):
        engine_config(m, artifact, "x", "ort")


def _greedy(engine, prompt, n):
    from jambatrt.engines.generate import generate
    return generate(engine, [prompt], n)[0][0].generated_ids


def test_served_aoti_keeps_sequence_state_on_the_server(artifact, engine, serve_env, tmp_path):
    """tritonserver on 127.0.0.1 serving NAME_aoti (a sequence model: the state stays in the model,
    per correlation id) and the generic NAME_prefill model running the aoti engine."""
    from jambatrt.deploy.client import InferenceError, JambaClient
    from jambatrt.deploy.repository import RepositorySettings, write_repository
    from jambatrt.deploy.server import TritonServer

    repo = tmp_path / "repo"
    info = write_repository(artifact, repo, RepositorySettings(backend="aoti", max_tokens=512))
    assert info["models"]["jamba_aoti"] == "aoti"        # written by the repository writer itself
    V = engine.config.vocab_size
    rng = np.random.default_rng(5)
    a, b = rng.integers(0, V, 7).tolist(), rng.integers(0, V, 40).tolist()
    want_a, want_b = _greedy(engine, a, 6), _greedy(engine, b, 6)
    srv = TritonServer(repo, serve_env, models=["jamba_aoti", "jamba_prefill"], log_path=tmp_path / "server.log")
    with srv.start(timeout=240), JambaClient(srv.http_url, timeout=120) as jc:
        # greedy generation through the served model equals the engine's (what `jambatrt generate` runs)
        assert jc.generate_steps(a, 6, sequence_id=11, model="aoti") == want_a
        # two sequences interleaved token by token keep separate state
        la, ta = jc.step(21, a, start=True, model="aoti")
        lb, tb = jc.step(22, b, start=True, model="aoti")
        assert_same_model_sums(la, engine.prefill(np.array([a]))[0][0, -1], engine.config, len(a), "served logits a")
        assert_same_model_sums(lb, engine.prefill(np.array([b]))[0][0, -1], engine.config, len(b), "served logits b")
        got_a, got_b = [ta], [tb]
        for i in range(5):
            end = i == 4
            got_a.append(jc.step(21, [got_a[-1]], end=end, model="aoti")[1])
            got_b.append(jc.step(22, [got_b[-1]], end=end, model="aoti")[1])
        assert got_a == want_a and got_b == want_b
        # refusals are error responses; the server stays up
        with pytest.raises(InferenceError, match="sequence (id )?21"):       # ended above: refused (by Triton or the model)
            jc.step(21, [1], model="aoti")
        with pytest.raises(InferenceError, match="out of range"):
            jc.step(23, [1, 10 ** 6], start=True, model="aoti")
        jc.step(24, rng.integers(0, V, 500), start=True, model="aoti")
        with pytest.raises(InferenceError, match="500 \\+ 13 tokens exceed max_tokens 512"):
            jc.step(24, rng.integers(0, V, 13), model="aoti")
        jc.step(24, rng.integers(0, V, 12), end=True, model="aoti")     # the refusal left the state as it was
        ids = rng.integers(0, V, (1, 33))
        assert_same_model_sums(jc.logits(ids), engine.prefill(ids)[0], engine.config, ids.shape[1], "prefill logits")
        assert jc.ready() and jc.model_ready("aoti")


def test_aoti_stages_equal_the_unsplit_package(artifact, engine, capsys):
    """`build --backend aoti --stages 2`: each stage's StageProgram (export/trace.py, the cut the ORT
    stages make of model.onnx) compiled by AOTInductor; run in order they give the unsplit package's
    logits and states bit for bit (the same compiled code on the same values) for prefill, chunked
    prefill and decode, and `generate --backend aoti --stages` runs them."""
    from jambatrt import cli
    from jambatrt.engines.generate import generate
    from jambatrt.engines.staged import AotiStagedEngine

    capsys.readouterr()
    assert cli.main(["build", str(artifact), "--backend", "aoti", "--stages", "2"]) == 0
    assert "built 2 aoti stage engines" in capsys.readouterr().out
    m = verify_files(artifact)
    e = m["engines"]["aoti-stages"]
    assert e["backend"] == "aoti" and e["device"] == "cpu" and e["torch"] == torch.__version__
    assert [s["layers"] for s in e["stages"]] == e["plan"]["ranges"] and len(e["stages"]) == 2
    for k, s in enumerate(e["stages"]):
        assert s["path"] == f"engines/aoti-stages/stage{k}.pt2"
        assert m["files"][s["path"]]["sha256"] == sha256_file(artifact / s["path"])
        assert (s["inputs"][0]["name"], s["outputs"][0]["name"]) == (("input_ids", "hidden_out") if k == 0
                                                                     else ("hidden_in", "logits"))
        assert s["python_ops"] and all(o.startswith("jamba::") for o in s["python_ops"])
    # between them the stages call every op the unsplit package calls, nothing else
    assert sorted(o for s in e["stages"] for o in s["python_ops"]) == sorted(m["engines"]["aoti"]["python_ops"])

    def same(got, want, what):
        np.testing.assert_array_equal(got, want, err_msg=what)

    with AotiStagedEngine.load(artifact) as st:
        compare_steps(st, engine, same, seed=3)
    capsys.readouterr()
    assert cli.main(["generate", str(artifact), "--backend", "aoti", "--stages", "--prompt-ids", "1,2,3",
                     "--max-new-tokens", "8", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generated_ids"] == generate(engine, [[1, 2, 3]], 8)[0][0].generated_ids


def test_failed_aoti_stage_build_leaves_the_artifact_as_it_was(artifact, tiny_artifact, monkeypatch, tmp_path):
    """A stage that fails to compile leaves no stage file, no temp file and the previous stage build,
    manifest entry included, as it was. (The first stage fails, so nothing is compiled: the loop that
    writes every stage to a temp file and moves them into place only when all are whole is the ORT
    stages' too.)"""
    from pathlib import Path

    from jambatrt.engines import aoti
    from jambatrt.engines.staged import build_stages

    fresh = tmp_path / "fresh"                     # no stage build yet: not even the folder is left
    shutil.copytree(tiny_artifact, fresh)
    before = {p: sha256_file(p) for p in artifact.rglob("*") if p.is_file()}
    calls = []

    def fail(ep, device, path, **kw):
        calls.append(Path(path))
        Path(path).write_bytes(b"half a package")
        raise BackendUnavailable("compiler gone")

    monkeypatch.setattr(aoti, "compile_package", fail)
    with pytest.raises(BackendUnavailable, match="compiler gone"):
        build_stages(artifact, stages=3, backend="aoti")
    assert len(calls) == 1 and calls[0].parent == artifact / "engines" / "aoti-stages" and not calls[0].exists()
    assert {p: sha256_file(p) for p in artifact.rglob("*") if p.is_file()} == before
    fresh_before = sorted(p.relative_to(fresh) for p in fresh.rglob("*"))
    with pytest.raises(BackendUnavailable, match="compiler gone"):
        build_stages(fresh, stages=2, backend="aoti")
    assert sorted(p.relative_to(fresh) for p in fresh.rglob("*")) == fresh_before


def test_served_aoti_stages_keep_state_on_the_server(artifact, engine, serve_env, tmp_path):
    """`deploy --stages --stage-backend aoti`: one Triton model per AOTInductor stage package, chained by
    the ensemble NAME_sequence, each keeping its layers' state per sequence; two interleaved sequences
    get what the unsplit package gives each alone, logits bit for bit."""
    from jambatrt.deploy.client import JambaClient
    from jambatrt.deploy.repository import RepositorySettings, write_repository
    from jambatrt.engines.staged import build_stages

    if "aoti-stages" not in read_manifest(artifact)["engines"]:     # built by the test above when it ran
        build_stages(artifact, stages=2, backend="aoti")
    repo = tmp_path / "repo"
    info = write_repository(artifact, repo, RepositorySettings(stages=True, stage_backend="aoti", max_tokens=512))
    assert info["models"] == {"jamba_stage0": "stage", "jamba_stage1": "stage", "jamba_sequence": "ensemble"}
    assert 'key: "backend" value { string_value: "aoti" }' in (repo / "jamba_stage0" / "config.pbtxt").read_text()
    with pytest.raises(InputError, match="needs stages=True"):
        RepositorySettings(stage_backend="aoti")
    srv = start_server(repo, serve_env, tmp_path / "server.log")
    try:
        with JambaClient(srv.http_url, timeout=120) as jc:
            pa, want_a, la = step_two_sequences(jc, engine, (31, 32), engine.config.vocab_size)
            np.testing.assert_array_equal(la, offline_logits(engine, pa, want_a[:-1]))
            assert jc.ready()
    finally:
        srv.stop()
