import os
import subprocess
import sys
from pathlib import Path

import jambatrt  # noqa: F401  (first: it sets how OpenMP threads wait before torch loads, threads.py)
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

from jambatrt.export.checkpoint import write_preset  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]

# Configs for parity: vary layer periods/offsets, expert count, top-k, odd sizes, tied embeddings, biases.
PARITY_CONFIGS = {
    "tiny": {},
    "odd": dict(vocab_size=301, hidden_size=48, intermediate_size=72, num_hidden_layers=5, num_attention_heads=6,
                num_key_value_heads=3, attn_layer_period=3, attn_layer_offset=0, expert_layer_period=3,
                expert_layer_offset=2, num_experts=5, num_experts_per_tok=1, mamba_d_state=5, mamba_d_conv=3,
                mamba_dt_rank=7),
    "allmoe": dict(vocab_size=200, hidden_size=40, intermediate_size=56, num_hidden_layers=3, num_attention_heads=4,
                   num_key_value_heads=1, attn_layer_period=2, attn_layer_offset=1, expert_layer_period=1,
                   expert_layer_offset=0, num_experts=6, num_experts_per_tok=3, mamba_d_state=4, mamba_dt_rank=3,
                   tie_word_embeddings=True, mamba_proj_bias=True, mamba_conv_bias=False, mamba_expand=3),
}


def sum_error_bound(abs_sum, n_terms: int, dtype=np.float32):
    """Largest |computed - exact| of a floating-point sum of `n_terms` terms whose absolute values add
    up to `abs_sum`, in ANY summation order (SIMD width, blocking, FMA, threads): gamma_n * sum|t|,
    gamma_n = n u / (1 - n u), u the unit roundoff (Higham, Accuracy and Stability of Numerical
    Algorithms, 2nd ed., section 4.2). A tolerance of eps * |result| is not one: a sum that cancels
    to near zero keeps the rounding of its large terms (issue 15: 1e-3 off on sums of 1,037 int8
    products, on one x86 CPU and not another). Compare against a float64 reference, so the bound is
    one-sided; still tight enough to catch one wrong term while n u < 1 / n."""
    u = np.finfo(dtype).eps / 2
    nu = n_terms * u
    assert nu < 0.5, f"{n_terms} terms: the bound is meaningless at this length in {np.dtype(dtype).name}"
    return nu / (1 - nu) * np.asarray(abs_sum, dtype=np.float64)


def assert_sums_close(got, want64, abs_sum, n_terms: int, dtype=np.float32, what: str = "sum"):
    """`got` (computed in `dtype`) vs `want64` (the same sums in float64): every element within
    sum_error_bound, plus one rounding of the result itself (the final cast / scale)."""
    got, want64 = np.asarray(got, np.float64), np.asarray(want64, np.float64)
    assert got.shape == want64.shape, (what, got.shape, want64.shape)
    bound = sum_error_bound(abs_sum, n_terms, dtype) + np.finfo(dtype).eps * np.abs(want64)
    err = np.abs(got - want64)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert (err <= bound).all(), (f"{what}: |diff| {err[worst]:.3e} at {worst} exceeds the rounding bound "
                                  f"{bound[worst]:.3e} (n={n_terms}, sum|terms| {np.asarray(abs_sum)[worst]:.3e})")


def assert_same_model_sums(got, want, config, length: int = 1, what: str = "values") -> None:
    """`got` and `want`: one fp32 model computation in two summation orders (another kernel or engine,
    chunks, thread count, a server process). Every value went through at most n_layers blocks of sums
    of at most K terms (the widest of hidden, intermediate, d_inner and the `length` tokens attended or
    scanned), each rounding relative to the tensor's magnitude; both sides round, so
    |got - want| <= 2 * sum_error_bound(max|want|, n_layers * K). Not a bare atol: it grows with the
    model's sums and the values' magnitude, and holds on any x86 CPU."""
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    n = config.num_hidden_layers * max(config.hidden_size, config.intermediate_size, config.d_inner, length)
    bound = 2 * float(sum_error_bound(np.abs(want).max(initial=0.0), n))
    err = float(np.abs(got - want).max(initial=0.0))
    assert err <= bound, f"{what}: max |diff| {err:.3e} exceeds the rounding bound {bound:.3e} (n = {n} terms)"


@pytest.fixture(scope="session")
def make_checkpoint(tmp_path_factory):
    cache = {}

    def make(name="tiny", seed=0):
        if (name, seed) not in cache:
            out = tmp_path_factory.mktemp("ckpt") / f"{name}-{seed}"
            overrides = PARITY_CONFIGS.get(name, {})
            write_preset("tiny" if name in PARITY_CONFIGS else name, out, seed=seed, **overrides)
            cache[(name, seed)] = out
        return cache[(name, seed)]

    return make


@pytest.fixture(scope="session")
def tiny_ckpt(make_checkpoint):
    return make_checkpoint("tiny")


def private_artifact(tiny_artifact, tmp_path_factory, prefix: str, stages: int | None = None):
    """A private copy of the tiny artifact with the ORT engine built (and `stages` ORT stage engines),
    for a module that builds or serves more on it (other modules may rebuild theirs)."""
    import shutil

    from jambatrt.artifact import read_manifest
    dst = tmp_path_factory.mktemp(prefix) / "tiny"
    shutil.copytree(tiny_artifact, dst)
    if "ort" not in read_manifest(dst).get("engines", {}):
        run_cli("build", dst, "--backend", "ort", check=True)
    if stages is not None:
        from jambatrt.engines.staged import build_stages
        build_stages(dst, stages=stages)
    return dst


@pytest.fixture(scope="module")
def engine(artifact):
    """The ORT engine of the requesting module's own `artifact` fixture (a module may define its own
    `engine`, as test_aoti and test_engine_ort do)."""
    from jambatrt.engines.ort import OrtEngine
    with OrtEngine.load(artifact) as e:
        yield e


def start_server(repository, env, log_path, tries: int = 3, **kw):
    """A started TritonServer over `repository` (ports chosen free, or given in kw). Another process
    can take a chosen port between the choice and the bind (other test suites run alongside): a start
    that fails on a port in use is retried on fresh ports, up to `tries` times when none was given."""
    import re

    from jambatrt.deploy.server import ServerError, TritonServer
    for attempt in range(tries):
        srv = TritonServer(repository, env, log_path=log_path, **kw)
        try:
            return srv.start(timeout=240)
        except ServerError as e:
            fixed = any(kw.get(k) for k in ("http_port", "grpc_port", "metrics_port"))
            if fixed or attempt == tries - 1 or not re.search(r"in use|failed to bind", str(e), re.IGNORECASE):
                raise


def served_generation_equals_generate(client, engine, artifact, capsys, vocab: int) -> None:
    """Greedy generation step by step through a served sequence model (client.generate_steps) equals
    offline generate() for a short and a 57-token prompt, and `jambatrt generate --json` (run in
    this process: a child spends its time importing) says the same."""
    import json

    from jambatrt import cli
    from jambatrt.engines.generate import generate
    for i, prompt in enumerate([[1, 2, 3], np.random.default_rng(4).integers(0, vocab, 57).tolist()]):
        want = generate(engine, [prompt], 12)[0][0].generated_ids
        assert client.generate_steps(prompt, 12, sequence_id=100 + i) == want, prompt
    capsys.readouterr()
    assert cli.main(["generate", str(artifact), "--backend", "ort", "--prompt-ids", "1,2,3", "--max-new-tokens", "12",
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["generated_ids"] == client.generate_steps([1, 2, 3], 12, sequence_id=7)


def compare_steps(got_engine, want_engine, check, seed: int) -> None:
    """Two engines on the same random ids [2, 37]: prefill whole and in chunks of 8 (state carried),
    then three greedy decode steps; check(got, want, what) on the logits and every state tensor."""
    ids = np.random.default_rng(seed).integers(0, want_engine.config.vocab_size, (2, 37))
    for chunk in (None, 8):
        want, ws = want_engine.prefill(ids, chunk=chunk)
        got, gs = got_engine.prefill(ids, chunk=chunk)
        check(got, want, f"logits chunk={chunk}")
        for i, (g, w) in enumerate(zip(gs, ws)):
            check(g, w, f"state {i} chunk={chunk}")
    for step in range(3):
        tok = want[:, -1].argmax(-1) if step == 0 else want.argmax(-1)
        want, ws = want_engine.decode(tok, ws)
        got, gs = got_engine.decode(tok, gs)
        check(got, want, f"decode {step}")
        for i, (g, w) in enumerate(zip(gs, ws)):
            check(g, w, f"decode {step} state {i}")


def native_decode_matches_graph(artifact, seed: int = 0, kv_int8: bool = False) -> None:
    """The ORT engine's native decode step (plugins/cpu/decode_step.py) against the same engine decoding
    through its ONNX Runtime graph: compare_steps' prefill and decode steps at batch 2, one fp32 model in
    two summation orders. kv_int8: the K/V states may also differ by one rounding step of the int8 cache
    (the step's keys computed by two kernels can round apart), as validate allows."""
    from jambatrt.engines.ort import OrtEngine
    from jambatrt.plugins.cpu.kv_int8 import quant_step
    with OrtEngine.load(artifact) as native, OrtEngine.load(artifact) as graph:
        assert native.decode_path == "native", native.decode_path
        graph.decoder, graph.decode_path = None, "graph"
        kv = {n for n, spec in enumerate(native.step_program.state) if "past" in spec.shape}

        def check(got, want, what):
            i = int(what.split("state ")[1].split()[0]) if "state " in what else None
            if kv_int8 and i in kv:
                w = np.asarray(want, np.float32)
                assert (np.abs(np.asarray(got, np.float32) - w) <= 1e-6 + quant_step(w)).all(), what
            else:
                assert_same_model_sums(got, want, native.config, 40, what)
        compare_steps(native, graph, check, seed)


def offline_logits(engine, prompt: list[int], fed: list[int], graph: bool = False) -> np.ndarray:
    """Logits [V] the offline engine gives after `prompt` and then `fed` one token per step, as a
    sequence model is fed by client.step. graph: its decode steps through the ONNX Runtime graph (as
    stage engines decode), not its native step, which sums in another order."""
    decoder = getattr(engine, "decoder", None)
    if graph:
        engine.decoder = None
    try:
        logits, state = engine.prefill(np.array([prompt]), last_only=True)
        for tok in fed:
            logits, state = engine.decode([tok], state)
    finally:
        if graph:
            engine.decoder = decoder
    return logits[0]


def step_two_sequences(client, engine, ids: tuple[int, int], vocab: int, n: int = 10):
    """Two sequences interleaved request by request on a served sequence model (client.step with
    START/END): each must get what offline generate() gives it alone. Returns sequence a's prompt,
    its generated ids and the logits of its last step, for the caller's own checks."""
    from jambatrt.engines.generate import generate
    pa, pb = [5, 6, 7, 8], np.random.default_rng(2).integers(0, vocab, 23).tolist()
    want_a = generate(engine, [pa], n)[0][0].generated_ids
    want_b = generate(engine, [pb], n)[0][0].generated_ids
    ida, idb = ids
    _, ta = client.step(ida, pa, start=True)
    _, tb = client.step(idb, pb, start=True)
    got_a, got_b, la = [ta], [tb], None
    for i in range(n - 1):
        last = i == n - 2
        la, ta = client.step(ida, [ta], end=last)
        _, tb = client.step(idb, [tb], end=last)
        got_a.append(ta)
        got_b.append(tb)
    assert got_a == want_a and got_b == want_b
    return pa, want_a, la


def run_cli(*args, check=False, env=None, timeout=900):
    """Run `python -m jambatrt ...` in a child process; returns CompletedProcess."""
    e = {**os.environ, **(env or {})}
    p = subprocess.run([sys.executable, "-m", "jambatrt", *map(str, args)], capture_output=True, text=True,
                       env=e, timeout=timeout)
    if check and p.returncode != 0:
        raise AssertionError(f"jambatrt {' '.join(map(str, args))} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p


@pytest.fixture(scope="session")
def tiny_artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "tiny"
    run_cli("export", "--preset", "tiny", "-o", out, check=True)
    return out


def hf_model(ckpt):
    """transformers' JambaForCausalLM on our checkpoint (fp32, eager attention off: sdpa)."""
    try:   # a test dependency in pyproject.toml (`make setup`): its absence is a broken install, not a skip
        import transformers
    except ImportError as e:
        pytest.fail(f"transformers not importable ({e}); it is in the test extra: pip install -e '.[test]'",
                    pytrace=False)
    transformers.logging.set_verbosity_error()
    return transformers.JambaForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def mamba_refs():
    """mamba-ssm's selective_scan_ref / selective_state_update_ref, imported without CUDA through
    temporary stubs (NOTES-ENV.md); the stubs are removed right after the import."""
    import importlib
    import importlib.util
    import types

    spec = importlib.util.find_spec("mamba_ssm")
    if spec is None:
        pytest.skip("mamba-ssm not installed (make setup installs it with MAMBA_SKIP_CUDA_BUILD=TRUE)")
    stubs = {}
    pkg = types.ModuleType("mamba_ssm")
    pkg.__path__ = list(spec.submodule_search_locations)
    stubs["mamba_ssm"] = pkg
    stubs["selective_scan_cuda"] = types.ModuleType("selective_scan_cuda")
    ln = types.ModuleType("mamba_ssm.ops.triton.layer_norm")
    ln._layer_norm_fwd = None
    stubs["mamba_ssm.ops.triton.layer_norm"] = ln
    saved = {k: sys.modules.get(k) for k in stubs}
    sys.modules.update(stubs)
    try:
        mod = importlib.import_module("mamba_ssm.ops.selective_scan_interface")
        fn = mod.selective_scan_ref
    finally:
        for k, v in saved.items():
            if v is None:
                sys.modules.pop(k, None)
            else:
                sys.modules[k] = v
        for k in [k for k in sys.modules if k.startswith("mamba_ssm")]:
            sys.modules.pop(k, None)
    return {"selective_scan_ref": fn}


def serve_env_or_fail(prefix=None):
    """The serve env, or a test failure naming why not. The server is part of the product, so a
    missing or broken serve env fails the deploy tests (issue 15, item 10) -- except when
    `make serve-setup` recorded a registry outage: nothing here can fix that, so they skip, saying so."""
    from jambatrt.deploy.server import find_serve_env
    from jambatrt.errors import BackendUnavailable

    try:
        env = find_serve_env(prefix)
    except BackendUnavailable as e:
        if "registry outage" in str(e):
            pytest.skip(f"serve env unavailable: {e}")
        pytest.fail(f"serve env unavailable: {e} (the deploy tests need it; `make serve-setup`)", pytrace=False)
    try:
        import tritonclient.http  # noqa: F401
    except ImportError as e:
        pytest.fail(f"serve env incomplete: tritonclient[http] not importable in the test env ({e}); "
                    "`make serve-setup` installs it", pytrace=False)
    return env


@pytest.fixture(scope="session")
def serve_env():
    """The numpy<2 environment tritonserver's Python backend runs in (`make serve-setup`)."""
    return serve_env_or_fail()


def native_variants(table: str, kernel: str) -> list:
    """One pytest param per native kernel of `table` (plugins/cpu/native.py: "int8", "f32", "attention",
    "scan", "scan_chunk", "gemm"), skipped, naming what is missing, only where this CPU lacks its instructions or there is no C
    compiler (a kernel that fails to build where both exist fails its tests). `kernel` names it in the reason."""
    from jambatrt.plugins.cpu.native import _TABLES, _compiler, runnable_variants
    return [pytest.param(v, marks=pytest.mark.skipif(
        v not in runnable_variants(table) or _compiler() is None,
        reason=f"the {v} {kernel} needs a CPU with {', '.join(needs)} and a C compiler"))
        for v, (_, needs) in _TABLES[table].items()]
