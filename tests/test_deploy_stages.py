"""Pipeline stages served by Triton (issue 19): `deploy --stages` writes one Python-backend model per
stage (each keeping its layers' state per correlation id) and the ensemble NAME_sequence that chains
them; a real tritonserver (serve env, 127.0.0.1, behind the request guard) runs it. Needs the serve env
like tests/test_deploy.py (fails without it, skips only on a recorded registry outage)."""

import json
import subprocess
import threading
import time

import numpy as np
import pytest

from conftest import (offline_logits, private_artifact, served_generation_equals_generate, start_server,
                      step_two_sequences)
from jambatrt.deploy.repository import RepositorySettings, verify_repository, write_repository
from jambatrt.errors import ArtifactError

MAX_TOKENS = 2048
V = 512
STAGES = 3


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    """A private copy of the tiny artifact with the unsplit ORT engine and 3 stage engines."""
    return private_artifact(tiny_artifact, tmp_path_factory, "stages-deploy", stages=STAGES)


def _settings(**kw):
    return RepositorySettings(max_tokens=MAX_TOKENS, stages=True, **kw)


def test_stage_repository_layout(artifact, tiny_artifact, tmp_path):
    repo = tmp_path / "repo"
    info = write_repository(artifact, repo, _settings())
    assert info["models"] == {"jamba_stage0": "stage", "jamba_stage1": "stage", "jamba_stage2": "stage",
                              "jamba_sequence": "ensemble"}
    verify_repository(repo)
    for k in range(STAGES):
        cfg = (repo / f"jamba_stage{k}" / "config.pbtxt").read_text()
        assert "instance_group [" in cfg and "kind: KIND_CPU" in cfg and "CONTROL_SEQUENCE_CORRID" in cfg
        assert f'key: "stage" value {{ string_value: "{k}" }}' in cfg
    ens = (repo / "jamba_sequence" / "config.pbtxt").read_text()
    assert 'platform: "ensemble"' in ens and ens.count("model_name:") == STAGES
    assert (repo / "jamba_sequence" / "1").is_dir()
    # on GPUs: stage k pinned to GPU k
    gpu = write_repository(artifact, tmp_path / "gpu", _settings(stage_devices="gpu"))
    assert gpu["models"]["jamba_stage2"] == "stage"
    assert "kind: KIND_GPU" in (tmp_path / "gpu" / "jamba_stage2" / "config.pbtxt").read_text()
    assert "gpus: [ 2 ]" in (tmp_path / "gpu" / "jamba_stage2" / "config.pbtxt").read_text()
    # an artifact without stage engines is refused, naming the build that makes them
    with pytest.raises(ArtifactError, match="--stages N"):
        write_repository(tiny_artifact, tmp_path / "none", _settings())
    assert not (tmp_path / "none").exists()


def test_stage_configs_parse_as_triton_model_configs(artifact, serve_env, tmp_path):
    repo = tmp_path / "repo"
    write_repository(artifact, repo, _settings(stage_devices="gpu"))
    code = ("import sys, json\nfrom google.protobuf import text_format\n"
            "from tritonclient.grpc import model_config_pb2 as mc\nout = {}\n"
            "for p in sys.argv[1:]:\n    c = text_format.Parse(open(p).read(), mc.ModelConfig())\n"
            "    out[c.name] = [c.platform or c.backend, len(c.input), len(c.output),\n"
            "                   [list(g.gpus) for g in c.instance_group],\n"
            "                   [[s.model_name, dict(s.input_map), dict(s.output_map)] for s in c.ensemble_scheduling.step]]\n"
            "print(json.dumps(out))\n")
    p = subprocess.run([str(serve_env.python), "-c", code, *map(str, sorted(repo.glob("*/config.pbtxt")))],
                       capture_output=True, text=True, timeout=120, check=False)
    assert p.returncode == 0, p.stderr
    got = json.loads(p.stdout)
    assert got["jamba_stage1"][:4] == ["python", 1, 1, [[1]]]
    assert got["jamba_stage2"][:3] == ["python", 1, 2]
    assert got["jamba_sequence"][4] == [["jamba_stage0", {"input_ids": "input_ids"}, {"hidden_out": "hidden_0"}],
                                        ["jamba_stage1", {"hidden_in": "hidden_0"}, {"hidden_out": "hidden_1"}],
                                        ["jamba_stage2", {"hidden_in": "hidden_1"},
                                         {"logits": "logits", "next_token": "next_token"}]]


# ---- a real server ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def server(artifact, serve_env, tmp_path_factory):
    repo = tmp_path_factory.mktemp("stages-repo") / "models"
    write_repository(artifact, repo, _settings())
    srv = start_server(repo, serve_env, tmp_path_factory.mktemp("log") / "tritonserver.log")
    yield srv
    srv.stop()


@pytest.fixture
def client(server):
    from jambatrt.deploy.client import JambaClient
    with JambaClient(server.http_url, timeout=120) as c:
        yield c


def test_greedy_generation_through_the_ensemble_equals_generate(client, server, engine, artifact, capsys):
    assert client.ready() and client.model_ready("sequence")
    assert set(server.stub_pids().values()) == {f"jamba_stage{k}" for k in range(STAGES)}
    served_generation_equals_generate(client, engine, artifact, capsys, V)


def test_interleaved_sequences_keep_separate_state(client, engine):
    pa, want_a, la = step_two_sequences(client, engine, (2001, 2002), V)
    # the offline engine fed the same way (prompt, then one token per step, decoding through its graph as
    # the stage engines do) gives the same logits, bit for bit: the stages run the same kernels on the same values
    np.testing.assert_array_equal(la, offline_logits(engine, pa, want_a[:-1], graph=True))


def test_bad_requests_through_the_ensemble(client, server):
    from jambatrt.deploy.client import InferenceError
    with pytest.raises(InferenceError, match="out of range"):
        client.step(3001, [1, V + 5], start=True)
    with pytest.raises(InferenceError, match="3002"):
        client.step(3002, [1])                                         # never started
    client.step(3003, [1, 2], start=True)
    with pytest.raises(InferenceError, match="out of range"):
        client.step(3003, [V])
    assert client.step(3003, [3], end=True)[0].shape == (V,)           # the sequence is still usable
    with pytest.raises(InferenceError, match="max_tokens"):
        client.step(3004, [1] * (MAX_TOKENS + 1), start=True)
    # the stage models are reached only through the ensemble: the guard refuses them by name
    with pytest.raises(InferenceError, match="unknown model"):
        client._infer("jamba_stage1", {"hidden_in": np.zeros((1, 1, 64), np.float32)}, ["hidden_out"])
    assert server.is_ready()


def test_killing_a_stage_mid_request_gives_an_error_not_a_hang(server):
    """SIGKILL stage 1's backend stub while sequences stream through the ensemble: the request in
    flight gets an error response (within the client's timeout, not a hang), every request is
    answered, and the server stays ready. (Last in this module: it leaves stage 1 dead; the Python
    backend does not restart a stub, so that model answers errors until the server is restarted --
    `deploy --serve` exits 2 on a dead stub for a supervisor to restart it.)"""
    import os
    import signal

    from jambatrt.deploy.client import InferenceError, JambaClient
    srv = server
    outcomes, inflight, stop = [], threading.Event(), threading.Event()
    prompt = np.random.default_rng(5).integers(0, V, MAX_TOKENS - 8).tolist()    # a long prefill per request

    def traffic():
        with JambaClient(srv.http_url, timeout=60) as c:
            for i in range(200):
                if stop.is_set():
                    break
                inflight.set()
                t0 = time.monotonic()
                try:
                    c.step(5000 + i, prompt, start=True, end=True)
                    outcomes.append(("ok", time.monotonic() - t0))
                except InferenceError as e:
                    outcomes.append((str(e), time.monotonic() - t0))
                inflight.clear()

    t = threading.Thread(target=traffic, daemon=True)
    t.start()
    deadline = time.monotonic() + 120
    while len(outcomes) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(outcomes) >= 3 and all(o == "ok" for o, _ in outcomes), (outcomes, srv.log_tail())
    victim = next(p for p, m in srv.stub_pids().items() if m == "jamba_stage1")
    assert inflight.wait(30)
    n_before = len(outcomes)
    os.kill(victim, signal.SIGKILL)
    while len(outcomes) < n_before + 3 and time.monotonic() < deadline and t.is_alive():
        time.sleep(0.05)
    stop.set()
    t.join(90)
    assert not t.is_alive(), "a request hung after the stage died"
    after = outcomes[n_before:]
    errors = [(o, s) for o, s in after if o != "ok"]
    assert errors, after
    assert all(s < 60 for _, s in after), after                       # answered, not timed out
    assert "jamba_stage1" in errors[0][0] or "stub" in errors[0][0].lower(), errors[0]
    print(f"\n[stages kill] stage 1's stub killed: next responses {[(o[:90], round(s, 2)) for o, s in after]}")
    assert srv.is_ready()
    with JambaClient(srv.http_url, timeout=10) as c:
        assert c.ready()
    # stage 1 cannot unload with its stub dead: a SIGTERM would wait tritonserver's exit timeout (30 s) for it
    srv.kill()
