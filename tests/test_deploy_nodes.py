"""Pipeline stages across servers (issue 19): `deploy --stages --nodes 2 --node K` writes one repository
per node; node 0's NAME_hop sends the hidden states to node 1's NAME_node1 over gRPC with the same
correlation id and START/END. Two real tritonservers on 127.0.0.1 (serve env, each behind its request
guard) stand in for two machines; the client calls node 0's NAME_sequence exactly as on one server.
Needs the serve env like tests/test_deploy.py (fails without it, skips only on a recorded registry
outage)."""

import os
import signal

import numpy as np
import pytest

from conftest import (offline_logits, private_artifact, run_cli, served_generation_equals_generate, start_server,
                      step_two_sequences)
from jambatrt.deploy.repository import RepositorySettings, verify_repository, write_repository
from jambatrt.errors import InputError

MAX_TOKENS = 2048
V = 512
STAGES = 3
HOP_TIMEOUT = 20.0        # seconds node 0's hop waits for node 1 (the stalled-node test waits this long)


@pytest.fixture(scope="module")
def artifact(tiny_artifact, tmp_path_factory):
    return private_artifact(tiny_artifact, tmp_path_factory, "nodes-art", stages=STAGES)


def _settings(node: int, next_node: str | None = None, **kw):
    return RepositorySettings(max_tokens=MAX_TOKENS, stages=True, nodes=2, node=node, next_node=next_node,
                              hop_timeout=HOP_TIMEOUT, **kw)


def test_node_repositories(artifact, tmp_path, capsys):
    n1 = write_repository(artifact, tmp_path / "n1", _settings(1))
    assert n1["models"] == {"jamba_stage1": "stage", "jamba_stage2": "stage", "jamba_node1": "node-ensemble"}
    n0 = write_repository(artifact, tmp_path / "n0", _settings(0, "127.0.0.1:9001"))
    assert n0["models"] == {"jamba_stage0": "stage", "jamba_hop": "hop", "jamba_sequence": "ensemble"}
    verify_repository(tmp_path / "n0")
    hop = (tmp_path / "n0" / "jamba_hop" / "config.pbtxt").read_text()
    assert 'string_value: "127.0.0.1:9001"' in hop and 'string_value: "jamba_node1"' in hop
    assert "CONTROL_SEQUENCE_CORRID" in hop and "count: 2" in hop      # one instance per stage downstream
    entry = (tmp_path / "n1" / "jamba_node1" / "config.pbtxt").read_text()
    assert 'name: "hidden_in" data_type: TYPE_FP32 dims: [ -1, 64 ]' in entry
    assert 'input_map { key: "hidden_in" value: "hidden_in" }' in entry
    # on GPUs each node numbers its own: node 1's first stage on its GPU 0
    gpu = tmp_path / "gpu"
    write_repository(artifact, gpu, _settings(1, stage_devices="gpu"))
    assert "gpus: [ 0 ]" in (gpu / "jamba_stage1" / "config.pbtxt").read_text()
    # the guard: node 1's entry takes hidden states; the hop, like the stages, is not reachable directly
    from jambatrt.deploy.guard import repository_specs
    specs = repository_specs(tmp_path / "n1")
    assert set(specs) == {"jamba_node1"} and specs["jamba_node1"].inputs[0].dims == ((0, 8), (0, MAX_TOKENS), (64, 64))
    assert set(repository_specs(tmp_path / "n0")) == {"jamba_sequence"}

    # refusals: typed, naming what is accepted, nothing written
    for kw, match in [(dict(node=0, next_node=None), "not given"), (dict(node=0, next_node="http://h:1"), "HOST:PORT"),
                      (dict(node=0, next_node="h:0"), "HOST:PORT"), (dict(node=1, next_node="h:1"), "no next node"),
                      (dict(node=2), "0 <= node < nodes")]:
        with pytest.raises(InputError, match=match):
            _settings(**kw)
    with pytest.raises(InputError, match="needs stages=True"):
        RepositorySettings(nodes=2, next_node="h:1")
    with pytest.raises(InputError, match="3 stage engines"):
        write_repository(artifact, tmp_path / "four", RepositorySettings(stages=True, nodes=4, node=3))
    assert not (tmp_path / "four").exists()
    p = run_cli("deploy", artifact, "--repository", tmp_path / "cli", "--stages", "--nodes", "2")
    assert p.returncode == 2 and "--next-node" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert not (tmp_path / "cli").exists()


# ---- two real servers ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def nodes(artifact, serve_env, tmp_path_factory):
    """Node 1 first (its ports chosen free), then node 0's repository pointing at node 1's gRPC port.
    {"node0": TritonServer, "node1": TritonServer}; a test may replace node1 (every one is stopped)."""
    root = tmp_path_factory.mktemp("nodes")
    write_repository(artifact, root / "n1", _settings(1))
    servers = {"node1": start_server(root / "n1", serve_env, root / "node1.log", exit_timeout=10)}
    try:
        write_repository(artifact, root / "n0", _settings(0, servers["node1"].grpc_url))
        servers["node0"] = start_server(root / "n0", serve_env, root / "node0.log", exit_timeout=10)
        yield servers
    finally:
        for srv in servers.values():
            srv.stop()


@pytest.fixture
def client(nodes):
    from jambatrt.deploy.client import JambaClient
    with JambaClient(nodes["node0"].http_url, timeout=120) as c:
        yield c


def test_greedy_generation_across_two_servers_equals_generate(client, nodes, engine, artifact, capsys):
    assert set(nodes["node0"].stub_pids().values()) == {"jamba_stage0", "jamba_hop"}
    assert set(nodes["node1"].stub_pids().values()) == {"jamba_stage1", "jamba_stage2"}
    served_generation_equals_generate(client, engine, artifact, capsys, V)


def test_interleaved_sequences_across_servers_keep_separate_state(client, engine):
    pa, want_a, la = step_two_sequences(client, engine, (2001, 2002), V)
    # the hidden states cross the hop as float32 unchanged: the logits equal the offline engine's (decoding
    # through its graph, as the stage engines do) to the bit
    np.testing.assert_array_equal(la, offline_logits(engine, pa, want_a[:-1], graph=True))


def test_errors_on_either_node_reach_the_client(client, nodes):
    from jambatrt.deploy.client import InferenceError, JambaClient
    with pytest.raises(InferenceError, match="out of range"):              # refused by node 0's stage 0
        client.step(3001, [1, V + 5], start=True)
    with pytest.raises(InferenceError, match="3002"):
        client.step(3002, [1])                                             # never started
    # only the entry models are served: the hop and the stages are refused by name on either node
    with pytest.raises(InferenceError, match="unknown model"):
        client._infer("jamba_hop", {"hidden_in": np.zeros((1, 1, 64), np.float32)}, ["logits"])
    with JambaClient(nodes["node1"].http_url, timeout=60) as c1:
        with pytest.raises(InferenceError, match="unknown model"):
            c1._infer("jamba_stage1", {"hidden_in": np.zeros((1, 1, 64), np.float32)}, ["hidden_out"])
        with pytest.raises(InferenceError, match="input_ids"):           # node 1 takes hidden states
            c1.step(3003, [1], start=True, model="jamba_node1")
    assert nodes["node0"].is_ready() and nodes["node1"].is_ready()


def test_a_stalled_next_node_gives_a_timeout_error(client, nodes, engine):
    """Node 1 stops answering (its front end frozen by SIGSTOP): node 0's request fails after the hop's
    timeout with an error naming the node, instead of hanging; once node 1 answers again, so does node 0."""
    from jambatrt.deploy.client import InferenceError
    from jambatrt.engines.generate import generate
    guard = nodes["node1"].guard_proc.pid
    os.kill(guard, signal.SIGSTOP)
    try:
        with pytest.raises(InferenceError, match=f"next node {nodes['node1'].grpc_url}.*no answer within 20 s") as e:
            client.step(4001, [1, 2, 3], start=True, end=True)
    finally:
        os.kill(guard, signal.SIGCONT)
    print(f"\n[nodes stalled] {e.value}")
    assert nodes["node0"].is_ready()
    assert client.generate_steps([4, 5], 4, sequence_id=4002) == generate(engine, [[4, 5]], 4)[0][0].generated_ids


def test_killing_the_next_node_mid_sequence_gives_errors_then_recovers(client, nodes, engine, serve_env):
    """Node 1's server dies (SIGKILL, tritonserver, stubs and guard) in the middle of a sequence: the
    next step gets an error response naming node 1, as does a new sequence (nothing listens there),
    and node 0 stays ready. Node 1 restarted on the same ports has lost its state of the old sequence
    (the client is told to START again); a new sequence generates as before. (Last in this module.)"""
    from jambatrt.deploy.client import InferenceError
    from jambatrt.engines.generate import generate
    old = nodes["node1"]
    url = old.grpc_url
    prompt = [9, 8, 7]
    want = generate(engine, [prompt], 6)[0][0].generated_ids
    _, tok = client.step(5001, prompt, start=True)
    _, tok = client.step(5001, [tok])
    old.kill()
    with pytest.raises(InferenceError, match=f"jamba_hop: next node {url} .*(onnect|UNAVAILABLE)") as e:
        client.step(5001, [tok])
    print(f"\n[nodes killed] {e.value}")
    with pytest.raises(InferenceError, match=f"jamba_hop: next node {url}"):
        client.step(5002, [1, 2], start=True)
    assert nodes["node0"].is_ready()
    # node 1 back on the same ports (node 0's repository names them)
    nodes["node1"] = start_server(old.repository, serve_env, old.log_path, http_port=old.http_port,
                                  grpc_port=old.grpc_port, metrics_port=old.metrics_port, exit_timeout=10)
    with pytest.raises(InferenceError, match="5001.*START") as e:
        client.step(5001, [tok], end=True)
    print(f"[nodes restarted] {e.value}")
    assert client.generate_steps(prompt, 6, sequence_id=5003) == want
    assert nodes["node0"].is_ready() and nodes["node1"].is_ready()
