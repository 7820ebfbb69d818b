"""Deploy to Triton Inference Server (issue 8): the model repository (Python-backend models over the
ONNX Runtime engine, a TensorRT engine model from the manifest), a real tritonserver on 127.0.0.1
behind the request guard (started and stopped by these tests), the client, bounded load, bad
requests, requests that used to kill the server, a seeded fuzz, a crash mid-request.

The server tests need the serve env (`make serve-setup`: numpy < 2, nvidia-pytriton, jambatrt);
without it they fail (the server is part of the product), and skip only when `make serve-setup`
recorded a registry outage, saying so. All traffic goes to 127.0.0.1; every
loop is bounded in count and time; every server is stopped by a fixture finalizer."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from conftest import ROOT, assert_same_model_sums, private_artifact, run_cli, step_two_sequences
from jambatrt.artifact import add_files, read_manifest, sha256_file
from jambatrt.deploy.pbtxt import Enum, pbtxt
from jambatrt.deploy.repository import RepositorySettings, verify_repository, write_repository
from jambatrt.deploy.server import TritonServer, find_serve_env, free_port
from jambatrt.errors import ArtifactError, BackendUnavailable, InputError

MAX_TOKENS = 2048          # the served models' token budget (smaller than the artifact's 262144)
V = 512                    # tiny preset vocab


def _tree_hashes(root: Path) -> dict:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    """A private copy of the tiny artifact with the ORT engine built (other modules may rebuild theirs)."""
    return private_artifact(tiny_artifact, tmp_path_factory, "deploy-art")


# ---- repository (no server) ---------------------------------------------------------------------
def test_pbtxt_writer():
    text = pbtxt({"name": "m", "max_batch_size": 0, "flag": True,
                  "input": [{"name": "x", "data_type": Enum("TYPE_INT64"), "dims": [-1, 3]}],
                  "model_transaction_policy": {"decoupled": True}})
    assert text.splitlines() == ['name: "m"', "max_batch_size: 0", "flag: true", "input [",
                                 '  { name: "x" data_type: TYPE_INT64 dims: [ -1, 3 ] }', "]",
                                 "model_transaction_policy { decoupled: true }"]
    assert 'string_value: "a\\"b"' in pbtxt({"p": {"string_value": 'a"b'}})


def test_sequence_state_store(monkeypatch):
    """The per-correlation-id store every stateful served model uses (deploy/sequence_state.py)."""
    from jambatrt.deploy import sequence_state
    from jambatrt.deploy.sequence_state import SequenceStates

    clock = [0.0]
    monkeypatch.setattr(sequence_state.time, "monotonic", lambda: clock[0])
    st = SequenceStates(idle_seconds=10, max_sequences=2, max_tokens=8)

    def add(tokens):            # the state is the list of tokens seen; the output is its length
        return lambda state: (len(state) + len(tokens), state + tokens)

    assert st.step(1, True, False, 3, list, add([1, 2, 3])) == 3
    assert st.step(2, True, False, 1, list, add([9])) == 1
    assert st.step(1, False, False, 1, list, add([4])) == 4          # sequence 1 carries its own state
    with pytest.raises(InputError, match="sequence 1: 4 \\+ 6 tokens exceed max_tokens 8"):
        st.step(1, False, False, 6, list, add([0] * 6))
    with pytest.raises(RuntimeError):                                  # a failing run keeps the state as it was
        st.step(1, False, False, 1, list, lambda state: (_ for _ in ()).throw(RuntimeError("boom")))
    assert st.step(1, False, False, 1, list, add([5])) == 5
    assert st.step(1, True, False, 1, list, add([7])) == 1             # START again: from the zero state
    assert st.step(1, False, True, 1, list, add([8])) == 2 and 1 not in st     # END drops it
    with pytest.raises(InputError, match="unknown sequence id 1 .*send START first"):
        st.step(1, False, False, 1, list, add([1]))
    st.step(3, True, False, 1, list, add([1]))
    st.step(4, True, False, 1, list, add([1]))                         # max_sequences 2: the oldest (2) goes
    assert 2 not in st and 3 in st and 4 in st
    clock[0] = 11.0                                                    # idle past idle_seconds: expired
    with pytest.raises(InputError, match="unknown sequence id 3"):
        st.step(3, False, False, 1, list, add([1]))
    assert len(st) == 0


def test_repository_layout_and_atomic_rules(artifact, tmp_path):
    art_before = _tree_hashes(artifact)
    repo = tmp_path / "repo"
    info = write_repository(artifact, repo, RepositorySettings(max_tokens=MAX_TOKENS))
    assert not info["reused"]
    assert set(info["models"]) == {"jamba_prefill", "jamba_sequence", "jamba_generate"}   # no TensorRT engine built
    for m in info["models"]:
        cfg = (repo / m / "config.pbtxt").read_text()
        assert f'name: "{m}"' in cfg and 'backend: "python"' in cfg
        assert f'string_value: "{artifact.resolve()}"' in cfg           # absolute path to the artifact
        assert (repo / m / "1" / "model.py").is_file()
    seq = (repo / "jamba_sequence" / "config.pbtxt").read_text()
    for control in ("CONTROL_SEQUENCE_START", "CONTROL_SEQUENCE_END", "CONTROL_SEQUENCE_READY",
                    "CONTROL_SEQUENCE_CORRID"):
        assert control in seq
    assert "decoupled: true" in (repo / "jamba_generate" / "config.pbtxt").read_text()
    assert verify_repository(repo)["artifact"] == str(artifact.resolve())
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]      # nothing half-written left
    # same artifact + settings: kept; different settings: refused without force; force replaces
    assert write_repository(artifact, repo, RepositorySettings(max_tokens=MAX_TOKENS))["reused"]
    with pytest.raises(ArtifactError, match="already exists"):
        write_repository(artifact, repo, RepositorySettings(max_tokens=100))
    assert not write_repository(artifact, repo, RepositorySettings(max_tokens=100), force=True)["reused"]
    assert 'string_value: "100"' in (repo / "jamba_prefill" / "config.pbtxt").read_text()
    # a hand-edited repository is detected
    (repo / "jamba_prefill" / "1" / "model.py").write_text("# edited\n")
    with pytest.raises(ArtifactError, match="jamba_prefill/1/model.py altered"):
        verify_repository(repo)
    assert _tree_hashes(artifact) == art_before                             # the artifact is never written


def test_repository_refusals(artifact, tiny_artifact, tmp_path):
    with pytest.raises(InputError, match="inside the artifact"):
        write_repository(artifact, artifact / "repo")
    bare = tmp_path / "bare"
    shutil.copytree(tiny_artifact, bare)
    m = read_manifest(bare)
    m["engines"] = {}
    shutil.rmtree(bare / "engines", ignore_errors=True)   # (before add_files, which records what is there)
    add_files(bare, m, "engines")          # rewrites the manifest without any engine
    with pytest.raises(ArtifactError, match="no engine to deploy"):
        write_repository(bare, tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    with pytest.raises(InputError, match="max_tokens"):
        RepositorySettings(max_tokens=0)
    p = run_cli("deploy", tmp_path / "nope", "--repository", tmp_path / "r2")
    assert p.returncode != 0 and "Traceback" not in p.stderr and "no such artifact" in p.stderr


def test_repository_record_cannot_move_the_bind_address(artifact, tmp_path, capsys):
    """Issue 15 (3): jambatrt-repository.json is verified like every file (its own sha256), and the
    server's flags never come from it: a `server_args` entry asking for another bind address makes
    the repository altered -- `deploy` no longer says "kept (already up to date)", refuses to serve
    it, and a server started over it anyway never gets the flag."""
    from jambatrt import cli
    from jambatrt.deploy.repository import REPOSITORY_INFO
    repo = tmp_path / "repo"
    settings = RepositorySettings(max_tokens=MAX_TOKENS)
    write_repository(artifact, repo, settings)
    assert write_repository(artifact, repo, settings)["reused"]
    info_path = repo / REPOSITORY_INFO
    info = json.loads(info_path.read_text())
    info["server_args"] = ["--http-address=127.0.0.2"]
    info_path.write_text(json.dumps(info))
    with pytest.raises(ArtifactError, match="jambatrt-repository.json altered"):
        verify_repository(repo)
    with pytest.raises(ArtifactError, match="altered"):
        write_repository(artifact, repo, settings)              # not "kept", not silently replaced
    assert cli.main(["deploy", str(artifact), "--repository", str(repo), "--max-tokens", str(MAX_TOKENS)]) == 2
    out, err = capsys.readouterr()
    assert "kept (already up to date)" not in out and "altered" in err
    env = find_serve_env()
    with pytest.raises(ArtifactError, match="altered"):
        TritonServer(repo, env)                                  # refuses before starting anything
    # the record re-signed by hand (its digest recomputed) still cannot inject flags: they are derived
    from jambatrt.deploy.repository import info_digest
    info["info_sha256"] = info_digest(info)
    info_path.write_text(json.dumps(info))
    cmd = TritonServer(repo, env).command()
    assert "--http-address=127.0.0.2" not in cmd and "127.0.0.2" not in " ".join(cmd)
    addresses = [cmd[i + 1] for i, a in enumerate(cmd) if a.endswith("-address")]
    assert addresses == ["127.0.0.1"] * 3
    from jambatrt.deploy.server import ServerError
    with pytest.raises(ServerError, match="override"):
        TritonServer(repo, env, extra_args=["--http-address=0.0.0.0"])
    # --force rewrites it; then it is current again
    assert not write_repository(artifact, repo, settings, force=True)["reused"]
    assert write_repository(artifact, repo, settings)["reused"]


def _with_tensorrt_entry(artifact: Path, dst: Path, **extra) -> Path:
    """A copy of the artifact with a synthetic TensorRT engine (TensorRT cannot build here)."""
    shutil.copytree(artifact, dst)
    (dst / "engines" / "tensorrt").mkdir(parents=True)
    (dst / "engines" / "tensorrt" / "model.plan").write_bytes(b"not a real plan: config writer test")
    m = read_manifest(dst)
    m["engines"]["tensorrt"] = {"path": "engines/tensorrt/model.plan", "tensorrt": "10.14.1",
                                "gpu": {"name": "NVIDIA H200", "arch": "sm_90"}, "chunk_plan": {"chunk": 4096},
                                "profiles": ["prefill", "decode"],
                                "plugins": ["jamba::SelectiveScan::1", "jamba::MoEInt8::1"], **extra}
    add_files(dst, m, "engines/tensorrt")
    return dst


def test_tensorrt_model_from_manifest(artifact, tmp_path):
    """NAME_tensorrt: the engine-model code path NAME_aoti uses (deploy/engine_model.py), on the GPU;
    the state stays on the server. (Running it needs TensorRT and a GPU: not on this host.)"""
    art = _with_tensorrt_entry(artifact, tmp_path / "art")
    info = write_repository(art, tmp_path / "repo", RepositorySettings(sequence_batch=4))
    assert info["models"]["jamba_tensorrt"] == "tensorrt"
    d = tmp_path / "repo" / "jamba_tensorrt"
    assert sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file()) == ["1/model.py", "config.pbtxt"]
    assert (d / "1" / "model.py").read_bytes() == (ROOT / "deploy" / "engine_model.py").read_bytes()
    cfg = (d / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and "max_batch_size: 4" in cfg and "KIND_GPU" in cfg
    assert 'key: "backend" value { string_value: "tensorrt" }' in cfg and "TensorRT 10.14.1" in cfg and "sm_90" in cfg
    # the sequence model's interface; the state never travels through the client
    assert '{ name: "input_ids" data_type: TYPE_INT64 dims: [ -1 ] }' in cfg
    assert '{ name: "logits" data_type: TYPE_FP32 dims: [ 512 ] }' in cfg and "next_token" in cfg
    assert "past." not in cfg and "present." not in cfg
    assert cfg.count("CONTROL_SEQUENCE_") == 4 and "max_candidate_sequences: 64" in cfg
    assert "Prompts run in chunks of 4096 tokens" in cfg
    # the request guard in front of the server accepts exactly that interface
    from jambatrt.deploy.guard import BadRequest, check_inputs, repository_specs
    spec = repository_specs(tmp_path / "repo")["jamba_tensorrt"]
    assert check_inputs(spec, [("input_ids", "INT64", [1, 7])])[0][1] == 7
    with pytest.raises(BadRequest, match="unknown input 'past.layer0.conv_state'"):
        check_inputs(spec, [("input_ids", "INT64", [1, 7]), ("past.layer0.conv_state", "FP32", [1, 128, 4])])


# ---- the serve env ----------------------------------------------------------------------------------
def test_serve_env_errors_name_the_fix(tmp_path):
    with pytest.raises(BackendUnavailable, match="make serve-setup"):
        find_serve_env(tmp_path / "none")
    (tmp_path / "failed").mkdir()
    (tmp_path / "failed" / ".serve-setup-failed").write_text("failed: pip install nvidia-pytriton\nno matching dist")
    with pytest.raises(BackendUnavailable, match="could not be created: failed: pip install nvidia-pytriton"):
        find_serve_env(tmp_path / "failed")
    fake = tmp_path / "np2"
    (fake / "bin").mkdir(parents=True)
    (fake / "bin" / "python3").write_text("")
    site = fake / "lib" / "python3.11" / "site-packages"
    (site / "pytriton" / "tritonserver" / "bin").mkdir(parents=True)
    (site / "pytriton" / "tritonserver" / "bin" / "tritonserver").write_text("")
    (site / "numpy-2.4.6.dist-info").mkdir()
    with pytest.raises(BackendUnavailable, match="numpy < 2"):
        find_serve_env(fake)


def _fake_serve_setup(tmp_path, pip_output: str):
    """`make serve-setup` into a fresh SERVE_VENV whose python prints `pip_output` and fails (what
    pip does when the registry is down, or when a package cannot be installed)."""
    venv = tmp_path / "venv-serve"
    (venv / "bin").mkdir(parents=True)
    py = venv / "bin" / "python"
    py.write_text(f"#!/bin/sh\ncat <<'OUT'\n{pip_output}\nOUT\nexit 1\n")
    py.chmod(0o755)
    stamp = tmp_path / "main-venv-installed"     # stands for .venv/.installed: keeps make off the main env
    stamp.touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith("MAKE")}
    p = subprocess.run(["make", "-C", str(ROOT), "serve-setup", f"SERVE_VENV={venv}", f"STAMP={stamp}"],
                       capture_output=True, text=True, timeout=120, env=env)
    return p, venv


def test_failed_serve_setup_fails_make_unless_registry_outage(tmp_path):
    """Issue 15 (10): a serve env that cannot be created fails `make serve-setup` (so `make test`)
    and the deploy tests; only a registry outage stated in pip's output lets them skip."""
    from conftest import serve_env_or_fail
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    broken, venv = _fake_serve_setup(tmp_path / "broken", "ERROR: No matching distribution found for nvidia-pytriton")
    assert broken.returncode != 0, broken.stdout + broken.stderr
    assert "serve-setup FAILED" in broken.stderr and "No matching distribution" in broken.stderr
    assert not (venv / ".installed").exists()
    with pytest.raises(pytest.fail.Exception, match="(?s)could not be created: failed: .*No matching distribution"):
        serve_env_or_fail(venv)

    outage, venv = _fake_serve_setup(tmp_path / "outage", "WARNING: Retrying (Retry(total=4, connect=None)) after "
                                     "connection broken by 'NewConnectionError(...: Temporary failure in name "
                                     "resolution)': /simple/nvidia-pytriton/\nERROR: Could not find a version")
    assert outage.returncode == 0, outage.stdout + outage.stderr
    assert "registry is unreachable" in outage.stdout
    assert (venv / ".serve-setup-failed").read_text().startswith("registry outage: ")
    with pytest.raises(pytest.skip.Exception, match="registry outage"):
        serve_env_or_fail(venv)


def test_configs_parse_as_triton_model_configs(artifact, serve_env, tmp_path):
    """Triton's own protobuf schema (from the serve env) parses every generated config, TensorRT included."""
    art = _with_tensorrt_entry(artifact, tmp_path / "art")
    repo = tmp_path / "repo"
    write_repository(art, repo)
    code = ("import sys, json\nfrom google.protobuf import text_format\n"
            "from tritonclient.grpc import model_config_pb2 as mc\nout = {}\n"
            "for p in sys.argv[1:]:\n    c = text_format.Parse(open(p).read(), mc.ModelConfig())\n"
            "    out[c.name] = [c.platform or c.backend, len(c.input), len(c.output), c.max_batch_size]\n"
            "print(json.dumps(out))\n")
    p = subprocess.run([str(serve_env.python), "-c", code, *map(str, sorted(repo.glob("*/config.pbtxt")))],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["jamba_tensorrt"] == ["python", 1, 2, 8]        # input_ids -> logits, next_token; state on the server
    assert got["jamba_prefill"] == ["python", 1, 1, 0]
    assert got["jamba_sequence"][:3] == ["python", 1, 2]
    assert got["jamba_generate"] == ["python", 7, 2, 0]       # prompt_ids or text_input; token_id, text_output


# ---- a real server ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def repository(artifact, tmp_path_factory):
    repo = tmp_path_factory.mktemp("deploy-repo") / "models"
    write_repository(artifact, repo, RepositorySettings(max_tokens=MAX_TOKENS, idle_seconds=60))
    return repo


@pytest.fixture(scope="module")
def server(repository, serve_env, tmp_path_factory):
    srv = TritonServer(repository, serve_env, log_path=tmp_path_factory.mktemp("log") / "tritonserver.log")
    try:
        srv.start(timeout=240)
        yield srv
    finally:
        srv.stop()


@pytest.fixture
def client(server):
    from jambatrt.deploy.client import JambaClient
    with JambaClient(server.http_url, timeout=120) as c:
        yield c


def test_health(client, server):
    assert client.live() and client.ready()
    for kind in ("prefill", "sequence", "generate"):
        assert client.model_ready(kind), server.log_tail()
    assert not client.model_ready("tensorrt")


def test_logits_equal_offline_engine(client, engine):
    rng = np.random.default_rng(0)
    for shape in [(1, 1), (1, 17), (2, 33), (1, MAX_TOKENS)]:     # 4 MiB of logits: the stub's shm grows
        ids = rng.integers(0, V, shape)
        got = client.logits(ids)
        want, _ = engine.prefill(ids)
        assert got.shape == want.shape == (*shape, V) and got.dtype == np.float32
        assert_same_model_sums(got, want, engine.config, shape[1], f"logits {shape}")
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_streamed_generation_equals_generate(client, engine):
    from jambatrt.engines.generate import generate
    prompts = [[1, 2, 3], [7] * 5, np.random.default_rng(1).integers(0, V, 40).tolist()]
    for prompt in prompts:
        want = generate(engine, [prompt], 12)[0][0].generated_ids
        arrivals = []
        for tok in client.generate_stream(prompt, 12):
            arrivals.append((time.perf_counter(), tok))
        assert [t for _, t in arrivals] == want, prompt
        assert len(arrivals) == 12                                      # one streamed response per token
    # eos stops the stream exactly where generate() stops
    prompt = prompts[0]
    eos = generate(engine, [prompt], 12)[0][0].generated_ids[3]
    want = generate(engine, [prompt], 12, eos_id=eos)[0][0].generated_ids
    assert client.generate(prompt, 12, eos_id=eos) == want and want[-1] == eos
    assert client.generate(prompt, 0) == []


def test_sequences_step_by_step_keep_separate_state(client, engine):
    """Two sequences interleaved request by request on the sequence-batching model: each gets what
    offline generate() gives it alone."""
    pa, want_a, la = step_two_sequences(client, engine, (1001, 1002), V)
    # the final logits equal the offline engine's for the same context
    want_logits, _ = engine.prefill(np.array([pa + want_a[:-1]]))
    assert_same_model_sums(la, want_logits[0, -1], engine.config, len(pa) + len(want_a), "logits")
    # the helper does the same in one call; a sequence id can be reused after END
    assert client.generate_steps(pa, len(want_a), sequence_id=1001) == want_a


def test_bounded_load_200_requests_8_clients(server, engine):
    """200 prefill requests from 8 concurrent clients: 0 errors, latency percentiles printed (no timed asserts)."""
    from jambatrt.deploy.client import JambaClient
    n_req, n_clients, deadline = 200, 8, time.monotonic() + 180
    rng = np.random.default_rng(3)
    work = [rng.integers(0, V, (1, int(rng.integers(1, 65)))) for _ in range(n_req)]
    check = {0, 57, 199}
    latencies, errors, results = [], [], {}
    lock = threading.Lock()

    def worker(k):
        with JambaClient(server.http_url, timeout=60) as c:
            for i in range(k, n_req, n_clients):
                if time.monotonic() > deadline:
                    with lock:
                        errors.append(f"request {i}: deadline passed")
                    continue
                t0 = time.perf_counter()
                try:
                    out = c.logits(work[i])
                except Exception as e:
                    with lock:
                        errors.append(f"request {i}: {e}")
                    continue
                with lock:
                    latencies.append(time.perf_counter() - t0)
                    if i in check:
                        results[i] = out

    t0 = time.perf_counter()
    with ThreadPoolExecutor(n_clients) as pool:
        list(pool.map(worker, range(n_clients)))
    wall = time.perf_counter() - t0
    assert errors == [], errors[:5]
    assert len(latencies) == n_req
    for i, out in results.items():
        assert_same_model_sums(out, engine.prefill(work[i])[0], engine.config, work[i].shape[1], f"request {i}")
    ms = np.array(latencies) * 1e3
    print(f"\n[deploy load] {n_req} requests, {n_clients} clients, 0 errors: p50 {np.percentile(ms, 50):.1f} ms, "
          f"p99 {np.percentile(ms, 99):.1f} ms, max {ms.max():.1f} ms, {n_req / wall:.1f} req/s "
          f"(prefill of 1..64 tokens, tiny preset, {os.cpu_count()} cores)")
    assert server.is_ready()


def test_bad_requests_get_errors_and_server_stays_ready(client, server):
    from jambatrt.deploy.client import InferenceError

    def refused(fn, *needles):
        with pytest.raises(InferenceError) as e:
            fn()
        for n in needles:
            assert n.lower() in str(e.value).lower(), str(e.value)
        assert client.ready() and server.is_ready()

    refused(lambda: client.logits([[1, 2, 3]], dtype=np.int32), "data-type")              # wrong dtype
    refused(lambda: client.logits(np.array([[1.0, 2.0]], np.float32), dtype=np.float32), "data-type")
    refused(lambda: client._infer("jamba_prefill", {"input_ids": np.ones((1, 2, 3), np.int64)}, ["logits"]),
            "shape")                                                                          # wrong rank
    refused(lambda: client.logits(np.zeros((1, 0), np.int64)), "at least one token")          # empty
    refused(lambda: client.logits(np.zeros((1, MAX_TOKENS + 1), np.int64)), "max_tokens")    # too long
    refused(lambda: client.logits([[1, V]]), "out of range")                                 # unknown token id
    refused(lambda: client.step(987654, [1]), "987654")                                      # unknown sequence id
    refused(lambda: client.step(0, [1], start=True), "correlation")                          # no sequence id
    refused(lambda: client._infer("jamba_nope", {"input_ids": np.ones((1, 1), np.int64)}, ["logits"]),
            "unknown model")
    with pytest.raises(InferenceError, match="max_tokens"):                                   # generation too long
        client.generate([1, 2, 3], MAX_TOKENS)
    with pytest.raises(InferenceError, match="max_new_tokens"):
        client.generate([1, 2, 3], -1)
    seq = 4242
    client.step(seq, [1, 2], start=True)
    with pytest.raises(InferenceError, match="out of range"):                                # bad token mid-sequence
        client.step(seq, [V + 5])
    client.step(seq, [3], end=True)                                                           # sequence still usable
    # malformed HTTP bodies
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", server.http_port, timeout=30)
    try:
        conn.request("POST", "/v2/models/jamba_prefill/infer", b"{not json", {"Content-Type": "application/json"})
        r = conn.getresponse()
        r.read()
        assert r.status >= 400           # tritonserver 2.51 answers a malformed body with 400 or 500
    finally:
        conn.close()
    assert client.ready() and client.model_ready("prefill") and client.model_ready("sequence")
    assert client.logits([[1, 2, 3]]).shape == (1, 3, V)                                    # still serving


# ---- text in, text out (issue 17): the generate extension's text_input -> text_output ----------------
TEXT_A, TEXT_B = "The quick brown fox", "Hello there, kato mira?"   # no EOS within 256 / 16 tokens (tiny preset)
N_A, N_B = 256, 16


def _cli_text(capsys, artifact, *args) -> dict:
    """What `jambatrt generate ARTIFACT ... --json` prints (the CLI, in this process)."""
    from jambatrt import cli
    assert cli.main(["generate", str(artifact), "--backend", "ort", "--json", *map(str, args)]) == 0
    return json.loads(capsys.readouterr().out)


def test_guard_text_checks(repository):
    """The guard's text rules on the repository's own generate spec, without a server: what passes,
    and what each refusal names (HTTP JSON strings, and the bytes gRPC carries)."""
    from jambatrt.deploy.guard import BadRequest, check_http_generate, check_text, repository_specs
    spec = repository_specs(repository)["jamba_generate"]
    text = next(i for i in spec.inputs if i.name == "text_input")
    assert text.datatype == "BYTES" and text.max_bytes == MAX_TOKENS * 64 and spec.one_of == ("prompt_ids", "text_input")
    assert check_text(text, "héllo 日本") == len("héllo 日本".encode()) and check_text(text, "ok".encode()) == 2
    check_http_generate(spec, {"text_input": "hi", "parameters": {"max_new_tokens": 4, "chat": True, "stream": True,
                                                                  "temperature": 0.7, "top_p": 0.9, "seed": 3}})
    check_http_generate(spec, {"text_input": "hi", "parameters": {"max_new_tokens": 4}}, "generate")
    check_http_generate(spec, {"prompt_ids": [1, 2, 3], "max_new_tokens": 4})      # the id interface as before
    bad = [({"text_input": "caf\udce9"}, "not valid UTF-8"), ({"text_input": " \t"}, "empty text"),
           ({"text_input": "x" * (text.max_bytes + 1)}, "bytes of text"), ({"text_input": 5}, "expected a string"),
           ({"text_input": "hi", "prompt_ids": [1]}, "exactly one of"), ({"max_new_tokens": 2}, "exactly one of"),
           ({"text_input": "hi", "parameters": {"n": 2}}, "unknown parameter 'n'"),
           ({"text_input": "hi", "parameters": {"chat": "yes"}}, "chat='yes'"),
           ({"text_input": "hi", "parameters": {"max_new_tokens": 2.5}}, "max_new_tokens=2.5"),
           ({"text_input": "hi", "parameters": ["stream"]}, "object of scalar values")]
    for body, needle in bad:
        with pytest.raises(BadRequest, match=needle.replace("(", r"\(")):
            check_http_generate(spec, body)
    with pytest.raises(BadRequest, match="generate_stream"):
        check_http_generate(spec, {"text_input": "hi", "parameters": {"stream": True}}, "generate")
    for raw, needle in [(b"caf\xe9", "not valid UTF-8"), (b"", "empty text")]:           # gRPC bytes_contents
        with pytest.raises(BadRequest, match=needle):
            check_text(text, raw)


def test_served_text_equals_cli_streamed_and_interleaved(client, server, artifact, capsys):
    """Two text requests on generate_stream at once -- a plain prompt (256 tokens: long enough that
    the second arrives while it runs, even on a busy machine) and a chat message (16 tokens, sent once
    the first has streamed its first piece): each streams the text the CLI
    prints for the same input, and the second is served while the first is still streaming (it does
    not wait for it: the first's pieces arrive before and after all of the second's). The model takes
    the two in turns one engine step each; in which order the pieces of two connections arrive is up
    to the schedulers, so the arrival order is printed, not asserted beyond that."""
    from jambatrt.deploy.client import JambaClient
    want_a = _cli_text(capsys, artifact, "--prompt", TEXT_A, "--max-new-tokens", N_A)
    want_b = _cli_text(capsys, artifact, "--chat", TEXT_B, "--max-new-tokens", N_B)
    assert len(want_a["generated_ids"]) == N_A and len(want_b["generated_ids"]) == N_B  # no early EOS here
    arrivals, lock, started = [], threading.Lock(), threading.Event()

    def run(tag, text, n, chat):
        with JambaClient(server.http_url, timeout=120) as c:
            for piece in c.generate_text_stream(text, n, chat=chat):
                with lock:
                    arrivals.append((tag, piece))
                started.set()

    with ThreadPoolExecutor(2) as pool:
        fa = pool.submit(run, "a", TEXT_A, N_A, False)
        assert started.wait(120), server.log_tail()
        fb = pool.submit(run, "b", TEXT_B, N_B, True)
        fa.result(timeout=300)
        fb.result(timeout=300)
    got_a = "".join(p for t, p in arrivals if t == "a")
    got_b = "".join(p for t, p in arrivals if t == "b")
    tags = [t for t, _ in arrivals]
    import itertools
    runs = " ".join(f"{t}{len(list(g))}" for t, g in itertools.groupby(tags))
    print(f"\n[served text] a: {got_a[:40]!r}... ({tags.count('a')} pieces)\n              b: {got_b!r} "
          f"({tags.count('b')} pieces); arrival order (runs) {runs}")
    assert got_a == want_a["text"] and got_b == want_b["text"]
    assert tags.count("a") >= N_A and tags.count("b") >= N_B                  # one piece per token (+ a held-back tail)
    assert tags[0] == "a" and tags[-1] == "a", "".join(tags)                 # b overlapped a, did not queue behind it
    # POST .../generate: one response, the whole text; the id interface is unchanged beside it
    assert client.generate_text(TEXT_B, N_B, chat=True) == want_b["text"]
    assert client.generate(want_a["prompt_ids"], 8) == want_a["generated_ids"][:8]
    assert server.is_ready()


def test_served_text_bad_input_gets_error_responses(client, server):
    """Empty text, text over the model's budget (in tokens, and in bytes), invalid UTF-8 (raw bytes,
    and a JSON escape of a lone surrogate), text that is not a string, bad parameters: each gets an
    error response with one line naming it; the server stays ready and serves the next request."""
    from jambatrt.deploy.client import InferenceError

    def refused(body, *needles, route="generate_stream"):
        raw = body if isinstance(body, bytes) else json.dumps(body).encode()
        status, text = _post(server.http_port, f"/v2/models/jamba_generate/{route}", raw)
        assert status is not None, f"no answer: {text}"
        msg = text.decode(errors="replace")
        assert status >= 400 and '"error"' in msg, (status, msg[:300])
        assert "\n" not in json.loads(msg[msg.index("{"):msg.rindex("}") + 1])["error"], msg[:300]
        for n in needles:
            assert n.lower() in msg.lower(), msg[:300]
        assert server.is_ready() and client.model_ready("generate")

    refused({"text_input": ""}, "empty")
    refused({"text_input": "  \n "}, "empty")
    refused({"text_input": "kato " * 3000, "parameters": {"max_new_tokens": 4}}, "exceed max_tokens")
    refused({"text_input": "k" * (MAX_TOKENS * 64 + 1)}, "bytes of text")
    refused(b'{"text_input": "caf\xe9 \xff"}', "utf-8")
    refused(b'{"text_input": "ok \\ud800 no"}', "utf-8")
    refused({"text_input": 7}, "expected a string")
    refused({"text_input": ["a", "b"]}, "expected a string")
    refused({"text_input": "hi", "parameters": {"max_new_tokens": "many"}}, "max_new_tokens")
    refused({"text_input": "hi", "parameters": {"top_p": 0}}, "top_p")
    refused({"text_input": "hi", "parameters": {"beams": 4}}, "unknown parameter")
    refused({"text_input": "hi", "prompt_ids": [1, 2]}, "one of")
    refused({"parameters": {"max_new_tokens": 4}}, "text_input")
    refused({"text_input": "", "parameters": {"chat": True}}, "empty", route="generate")
    refused({"text_input": "hi", "parameters": {"stream": True}}, "generate_stream", route="generate")
    with pytest.raises(InferenceError, match="empty"):
        list(client.generate_text_stream(" ", 4))
    assert client.generate_text(TEXT_A, 4)                                   # still serving text
    assert client.ready() and server.is_ready()


# ---- one request must not kill the server (issue 15, item 1) -----------------------------------------
def _post(port: int, path: str, body: bytes, headers: dict | None = None, timeout: float = 60.0):
    """One request on its own connection -> (status, body); (None, reason) when no response came."""
    import http.client
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("POST", path, body, {"Content-Type": "application/json", **(headers or {})})
        r = conn.getresponse()
        return r.status, r.read()
    except (OSError, http.client.HTTPException) as e:
        return None, repr(e)
    finally:
        conn.close()


def _infer_body(shape, data, datatype="INT64", name="input_ids") -> bytes:
    return json.dumps({"inputs": [{"name": name, "shape": shape, "datatype": datatype, "data": data}]}).encode()


GRPC_PROBE = """
import json, sys, grpc
from tritonclient.grpc import service_pb2, service_pb2_grpc
stub = service_pb2_grpc.GRPCInferenceServiceStub(grpc.insecure_channel(sys.argv[1]))
out = []
for model, name, shape, contents in json.loads(sys.argv[2]):
    req = service_pb2.ModelInferRequest(model_name=model)
    t = req.inputs.add(); t.name = name; t.datatype = "INT64"; t.shape.extend(shape)
    t.contents.int64_contents.extend(contents)
    try:
        r = stub.ModelInfer(req, timeout=60); out.append(["OK", list(r.outputs[0].shape)])
    except grpc.RpcError as e:
        out.append([e.code().name, e.details()])
print(json.dumps(out))
"""


def test_one_request_cannot_kill_the_server(client, server, serve_env):
    """The requests of issue 15 (and the overflowing shapes that killed the backend stub) against
    every served model, over HTTP and gRPC: each is refused with a 400 / INVALID_ARGUMENT naming the
    limit, at once, and the server, its backend stubs and a good request's logits are unchanged."""
    ids = np.array([[3, 1, 4, 1, 5, 9]])
    before = client.logits(ids)
    stubs = server.stub_pids()
    assert len(stubs) == 3
    huge = [
        ("jamba_prefill", "/infer", _infer_body([1000000000, 1000000000], [1])),      # was: std::bad_alloc, abort
        ("jamba_prefill", "/infer", _infer_body([1, 1000000000], [1])),               # was: 8 GB zeroed, 22 s
        ("jamba_prefill", "/infer", _infer_body([4294967296, 4294967296], [])),       # was: the stub died
        ("jamba_prefill", "/infer", _infer_body([2 ** 64 - 1, 1], [1])),              # was: length_error, abort
        ("jamba_prefill", "/infer", _infer_body([-1, 3], [1, 2, 3])),
        ("jamba_prefill", "/infer", _infer_body([64, 64], [0] * 4096)),               # 4096 tokens > max_tokens
        ("jamba_sequence", "/infer", _infer_body([1, 1000000000], [1])),
        ("jamba_generate", "/generate_stream", json.dumps({"prompt_ids": [1] * (MAX_TOKENS + 1)}).encode()),
        ("jamba_generate", "/generate", json.dumps({"prompt_ids": [[[1]]]}).encode()),
    ]
    for model, route, body in huge:
        status, text = _post(server.http_port, f"/v2/models/{model}{route}", body)
        assert status == 400, (model, route, status, text[:300])
        assert b"outside" in text or b"elements" in text or b"dims" in text, text[:300]
    cases = [["jamba_prefill", "input_ids", [1000000000, 1000000000], [1]],
             ["jamba_prefill", "input_ids", [4294967296, 4294967296], []],
             ["jamba_prefill", "input_ids", [1, 3], [1, 2]],
             ["jamba_prefill", "input_ids", [1, 3], [1, 2, 3]]]
    p = subprocess.run([str(serve_env.python), "-c", GRPC_PROBE, server.grpc_url, json.dumps(cases)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    got = json.loads(p.stdout)
    assert [g[0] for g in got] == ["INVALID_ARGUMENT"] * 3 + ["OK"], got
    assert got[3][1] == [1, 3, V]
    assert server.is_ready() and server.stub_pids() == stubs
    np.testing.assert_array_equal(client.logits(ids), before)


def test_fuzz_malformed_kserve_requests(client, server, serve_env):
    """Seeded fuzz: 400 random malformed KServe v2 HTTP requests (shapes, datatypes, names, data
    lengths, binary sizes, parameters, headers, bodies) at the served models, and 60 over gRPC.
    Every request gets an answer; the server stays ready, no backend stub dies, and a good
    request's logits are unchanged."""
    import random
    import socket
    rng = random.Random(1515)
    ids = np.array([[2, 7, 1, 8, 2, 8]])
    before = client.logits(ids)
    stubs = server.stub_pids()
    dims = [0, 1, 2, 3, 5, MAX_TOKENS, MAX_TOKENS + 1, 10 ** 9, 2 ** 31, 2 ** 32, 2 ** 63 - 1, 2 ** 63, 2 ** 64 - 1,
            2 ** 64, -1, -(2 ** 63), 1.5, "3", True, None, [2]]
    dtypes = ["INT64", "INT64", "INT32", "FP32", "BYTES", "BOOL", "UINT64", "BF16", "FOO", "", 5, None]
    names = ["input_ids", "input_ids", "input_ids", "prompt_ids", "x", "", None, 7]
    models = ["jamba_prefill"] * 6 + ["jamba_sequence", "jamba_generate", "jamba_nope"]

    def random_data(n):
        k = rng.choice([0, 1, 2, n if isinstance(n, int) and 0 <= n <= 64 else 3, 100])
        leaf = rng.choice([1, 1, 1, 0.5, -1, 2 ** 70, "a", None, True, [], {}])
        data = [leaf if rng.random() < 0.3 else rng.randrange(600) for _ in range(k)]
        return rng.choice([data, [data], data, "x", None, 5, {"a": 1}])

    def random_infer():
        shape = [rng.choice(dims) for _ in range(rng.choice([0, 1, 2, 2, 2, 3, 4]))]
        n = 1
        for d in shape:
            n = n * d if isinstance(d, int) and not isinstance(d, bool) else -1
        inp = {"name": rng.choice(names), "datatype": rng.choice(dtypes), "shape": shape, "data": random_data(n)}
        for k in list(inp):
            if rng.random() < 0.08:
                del inp[k]
        if rng.random() < 0.15:
            inp["parameters"] = rng.choice([{"binary_data_size": rng.choice([0, 8, 48, -8, 2 ** 40, "8"])},
                                            {"shared_memory_region": "r", "shared_memory_byte_size": 8}, [], "p"])
        body = {"inputs": rng.choice([[inp], [inp, inp], [], inp, None])}
        if rng.random() < 0.2:
            body["outputs"] = rng.choice([[{"name": "logits"}], [{"name": "nope"}], [{"name": "logits", "parameters":
                                          {"classification": 5}}], "x"])
        if rng.random() < 0.1:
            body["parameters"] = rng.choice([{"sequence_id": rng.choice([1, -1, 2 ** 70, "s"])}, {"timeout": 1}, [1]])
        return json.dumps(body).encode()

    def random_body():
        kind = rng.random()
        if kind < 0.55:
            return random_infer(), {}
        if kind < 0.65:      # binary data after a JSON header, sizes that agree or not
            n = rng.choice([1, 3, 10 ** 9])
            header = json.dumps({"inputs": [{"name": "input_ids", "datatype": "INT64", "shape": [1, n],
                                             "parameters": {"binary_data_size": rng.choice([8 * n, 8, 0])}}]}).encode()
            data = np.ones(rng.choice([1, 3, 5]), np.int64).tobytes()
            hl = rng.choice([len(header), len(header) + 1, len(header) + 100000, -1, "x"])
            return header + data, {"Inference-Header-Content-Length": str(hl)}
        if kind < 0.75:
            return rng.choice([b"", b"{", b"[]", b"null", b'"s"', b"{not json", b"\xff\xfe\x00", b"[" * 100000,
                               b'{"inputs": [' * 5000, b'{"inputs": NaN}', b'{"inputs": 1e999}',
                               bytes(rng.randrange(256) for _ in range(rng.randrange(1, 300)))]), {}
        if kind < 0.80:      # the generate extension's body with text: odd strings, types and parameters
            t = rng.choice(["", " \n", "abc", "x" * (MAX_TOKENS * 64 + 1), "caf\udce9", "\u65e5\u672c", 7, None, ["a"],
                            {"t": 1}])
            params = rng.choice([{}, {"max_new_tokens": rng.choice([1, -1, 10 ** 12, "x", True, 2.5])},
                                 {"stream": rng.choice([True, "yes", 1])}, {"chat": True}, {"beams": 2},
                                 {"temperature": rng.choice([-1, 1e309, 0.7])}, [1], "p"])
            body = json.dumps({"text_input": t, "parameters": params}).encode()
            return (body.replace(b"abc", b"a\xffc") if rng.random() < 0.2 else body), {}
        if kind < 0.85:      # the generate extension's body with token ids
            v = rng.choice([[1, 2, 3], [1] * (MAX_TOKENS + 5), [[1, 2]], [[[1]]], "abc", None, {"a": 1}, 2 ** 70, -5])
            return json.dumps({"prompt_ids": v, rng.choice(["max_new_tokens", "bogus", "seed"]): rng.choice(
                [1, -1, 10 ** 12, [1, 2], "x"])}).encode(), {}
        return random_infer(), rng.choice([{"Content-Encoding": "gzip"}, {"Content-Encoding": "deflate"},
                                           {"Transfer-Encoding": "chunked"}, {"Inference-Header-Content-Length": "0"}])

    statuses = {}
    for i in range(400):
        model = rng.choice(models)
        route = rng.choice(["/infer"] * 4 + ["/generate", "/generate_stream", "/versions/1/infer", "/load"])
        body, headers = random_body()
        if i % 40 == 39:     # a body shorter than its Content-Length, then the client stops sending
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
                sock.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nContent-Length: "
                             f"{len(body) + 1000}\r\n\r\n".encode() + body)
                sock.shutdown(socket.SHUT_WR)
                first = sock.recv(64)
            assert first.startswith(b"HTTP/1.1 4"), first
            statuses["short body"] = statuses.get("short body", 0) + 1
            continue
        if "Transfer-Encoding" in headers:       # a chunked body, sent as such
            with socket.create_connection(("127.0.0.1", server.http_port), timeout=60) as sock:
                sock.sendall(f"POST /v2/models/{model}/infer HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                             f"\r\n{len(body):x}\r\n".encode() + body + b"\r\n0\r\n\r\n")
                first = sock.recv(64)
            assert first.startswith(b"HTTP/1.1 4"), first
            statuses["chunked"] = statuses.get("chunked", 0) + 1
            continue
        status, text = _post(server.http_port, f"/v2/models/{model}{route}", body, headers)
        assert status is not None, (i, model, route, body[:200], headers, text)
        statuses[status] = statuses.get(status, 0) + 1
    print(f"\n[deploy fuzz] HTTP statuses over 400 random malformed requests: {dict(sorted(statuses.items(), key=str))}")

    cases = []
    for _ in range(60):
        shape = [rng.choice([0, 1, 3, MAX_TOKENS + 1, 10 ** 9, 2 ** 32, 2 ** 62, -1, -(2 ** 63)])
                 for _ in range(rng.choice([1, 2, 2, 3]))]
        cases.append([rng.choice(["jamba_prefill", "jamba_prefill", "jamba_sequence", "jamba_nope"]),
                      rng.choice(["input_ids", "input_ids", "x"]), shape, [1] * rng.choice([0, 1, 3])])
    p = subprocess.run([str(serve_env.python), "-c", GRPC_PROBE, server.grpc_url, json.dumps(cases)],
                       capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-2000:]
    codes = {}
    for code, _ in json.loads(p.stdout):
        codes[code] = codes.get(code, 0) + 1
    print(f"[deploy fuzz] gRPC codes over {len(cases)} random requests: {codes}")
    assert server.is_ready() and client.ready() and server.stub_pids() == stubs
    for kind in ("prefill", "sequence", "generate"):
        assert client.model_ready(kind)
    np.testing.assert_array_equal(client.logits(ids), before)
    assert client.generate([1, 2, 3], 3) and client.step(77, [1, 2], start=True, end=True)[0].shape == (V,)


def test_execution_env_path_picks_the_environment(artifact, serve_env, engine, tmp_path):
    """`--execution-env`: the models name their environment themselves (EXECUTION_ENV_PATH), so a
    server whose PATH leads to another python (here the numpy-2 test env, which the stub cannot use)
    still runs them in the serve env."""
    from jambatrt.deploy.client import JambaClient
    repo = tmp_path / "repo"
    write_repository(artifact, repo, RepositorySettings(execution_env=str(serve_env.prefix)))
    assert f'key: "EXECUTION_ENV_PATH" value {{ string_value: "{serve_env.prefix}" }}' in \
        (repo / "jamba_prefill" / "config.pbtxt").read_text()
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    srv = TritonServer(repo, serve_env, models=["jamba_prefill"], env_on_path=False, extra_env={"PATH": path},
                       log_path=tmp_path / "server.log")
    try:
        srv.start(timeout=240)
        with JambaClient(srv.http_url) as c:
            ids = np.array([[3, 1, 4, 1, 5]])
            assert_same_model_sums(c.logits(ids), engine.prefill(ids)[0], engine.config, ids.shape[1], "logits")
    finally:
        srv.stop()


def test_kill_mid_request_leaves_repository_and_artifact_intact(repository, artifact, serve_env, tmp_path):
    """SIGKILL the server (and its backend stubs) while a generation is streaming: the repository and
    the artifact are byte-for-byte what they were, and the repository is still judged current."""
    from jambatrt.deploy.client import InferenceError, JambaClient
    before_repo, before_art = _tree_hashes(repository), _tree_hashes(artifact)
    srv = TritonServer(repository, serve_env, models=["jamba_generate"], log_path=tmp_path / "kill.log")
    try:
        srv.start(timeout=240)
        got, err = [], []

        def stream():
            try:
                with JambaClient(srv.http_url, timeout=60) as c:
                    for tok in c.generate_stream([1, 2, 3], MAX_TOKENS - 3):
                        got.append(tok)
            except (InferenceError, OSError, Exception) as e:
                err.append(e)

        t = threading.Thread(target=stream, daemon=True)
        t.start()
        deadline = time.monotonic() + 60
        while len(got) < 3 and time.monotonic() < deadline and t.is_alive():
            time.sleep(0.01)
        assert len(got) >= 3, (err, srv.log_tail())            # the request is in flight
        regions = srv._shm_regions()
        assert regions                                          # the backend stub's shared memory
        srv.kill()
        t.join(60)
        assert not t.is_alive() and len(got) < MAX_TOKENS - 3
        assert not [r for r in regions if Path("/dev/shm", r).exists()]     # kill() cleans up after the stubs
    finally:
        srv.stop()
    assert _tree_hashes(repository) == before_repo
    assert _tree_hashes(artifact) == before_art
    verify_repository(repository)
    info = write_repository(artifact, repository, RepositorySettings(max_tokens=MAX_TOKENS, idle_seconds=60))
    assert info["reused"]


def test_cli_deploy_serve_stops_on_ctrl_c(artifact, serve_env, tmp_path):
    """`jambatrt deploy --serve` writes the repository, serves on 127.0.0.1 until SIGINT (Ctrl-C),
    then stops the server cleanly; SIGTERM the same (the server fixture's stop)."""
    repo = tmp_path / "repo"
    ports = [free_port(), free_port(), free_port()]
    cmd = [sys.executable, "-m", "jambatrt", "deploy", str(artifact), "--repository", str(repo), "--serve",
           "--max-tokens", str(MAX_TOKENS), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
           "--metrics-port", str(ports[2])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            env={**os.environ, "JAMBATRT_SERVE_ENV": str(serve_env.prefix)}, cwd=ROOT)
    lines = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None and not any("stops it" in x for x in lines):
            time.sleep(0.1)
        out = "".join(lines)
        assert "Ctrl-C or SIGTERM stops it" in out, out
        assert f"http://127.0.0.1:{ports[0]}" in out and "jamba_generate" in out
        from jambatrt.deploy.client import JambaClient
        with JambaClient(f"127.0.0.1:{ports[0]}") as c:
            assert c.ready() and c.generate([1, 2, 3], 2) and c.logits([[1]]).shape == (1, 1, V)
        proc.send_signal(signal.SIGINT)
        proc.wait(90)
        reader.join(10)
        rest = "".join(lines)
        assert proc.returncode == 0, rest
        assert "tritonserver stopped (exit code 0)" in rest, rest
        with JambaClient(f"127.0.0.1:{ports[0]}", timeout=5) as c:
            assert not c.live()
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    verify_repository(repo)


def _deploy_serve(artifact, repo, serve_env):
    ports = [free_port(), free_port(), free_port()]
    cmd = [sys.executable, "-m", "jambatrt", "deploy", str(artifact), "--repository", str(repo), "--serve",
           "--max-tokens", str(MAX_TOKENS), "--http-port", str(ports[0]), "--grpc-port", str(ports[1]),
           "--metrics-port", str(ports[2])]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "JAMBATRT_SERVE_ENV": str(serve_env.prefix)}, cwd=ROOT)
    lines = []
    threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True).start()
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None and not any("stops it" in x for x in lines):
        time.sleep(0.1)
    assert any("stops it" in x for x in lines), "".join(lines) + proc.stderr.read()
    return proc, lines


def _stubs_of(repo: Path) -> dict[int, str]:
    out = {}
    for p in Path("/proc").glob("[0-9]*"):
        try:
            args = (p / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if args and args[0].endswith(b"triton_python_backend_stub") and str(repo).encode() in b" ".join(args):
            out[int(p.name)] = next(a.decode() for a in args if a.endswith(b"model.py"))
    return out


@pytest.mark.parametrize("victim", ["backend stub", "tritonserver"])
def test_deploy_serve_reports_a_crash_and_exits_nonzero(artifact, serve_env, tmp_path, victim):
    """Issue 15 (1): under `deploy --serve`, a backend stub that dies (its model then answers every
    request with an error while the server still says READY) or a tritonserver that dies ends the
    command at once: exit code 2 and one ServerError line naming what died."""
    repo = tmp_path / "repo"
    proc, lines = _deploy_serve(artifact, repo, serve_env)
    try:
        if victim == "backend stub":
            stubs = _stubs_of(repo)
            pid = next(p for p, m in stubs.items() if "jamba_prefill" in m)
        else:
            pid = int(next(x for x in lines if "tritonserver ready (pid" in x).split("pid ")[1].split(")")[0])
        os.kill(pid, signal.SIGKILL)
        t0 = time.monotonic()
        proc.wait(90)
        waited = time.monotonic() - t0
        err = proc.stderr.read()
        assert proc.returncode == 2, (proc.returncode, err)
        assert "error: ServerError:" in err and "Traceback" not in err, err
        assert ("jamba_prefill" in err and "died" in err) if victim == "backend stub" else "exited with code -9" in err
        print(f"\n[deploy --serve] {victim} killed: exit {proc.returncode} after {waited:.1f} s: {err.strip()[:200]}")
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
    assert not _stubs_of(repo)                  # nothing of that server left running
