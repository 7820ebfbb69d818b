"""The pipeline-stage part of a Triton model repository (`jambatrt deploy --stages`).

  NAME_stage{k}   Python backend, one per stage of manifest engines["ort-stages"] (deploy/stage_model.py):
                  sequence batching (START/END/READY/CORRID); keeps its layers' state per correlation
                  id; pinned by instance_group (KIND_CPU here; KIND_GPU with gpus: [k] for stage k on GPUs;
                  with --nodes, k counts the node's own stages from 0)
  NAME_sequence   an ensemble chaining the stages, with the single-engine sequence model's interface
                  (input_ids [1,L] -> logits [1,V], next_token [1,1]): a client cannot tell them apart.
                  Triton's ensemble scheduler gives every stage the request's correlation id and
                  START/END flags, so each stage's state follows the sequence; the hidden states
                  [1,L,H] are the only tensors passed between stages.

Across servers (`--nodes N --node K`, docs/multinode.md): the stages are split into N contiguous
groups and node K's repository holds its group only. Its entry model is NAME_sequence on node 0
(input_ids) and NAME_node{K} on the others (hidden_in [1,L,H], the previous node's hidden states);
every node but the last ends its ensemble with
  NAME_hop        Python backend (deploy/hop_model.py), sequence batching: sends the hidden states to
                  the next node's NAME_node{K+1} over gRPC with the same correlation id and START/END,
                  and returns its logits and next token, or its error as an error response.

Triton's implicit state management (`sequence_batching.state`) would keep the state in the server
instead of the model, but the Python backend does not support it; the stage models hold it."""

from __future__ import annotations

from pathlib import Path

from jambatrt.artifact import sha256_file
from jambatrt.deploy.pbtxt import Enum, comment, parameters, pbtxt, tensor
from jambatrt.deploy.sequence_state import sequence_batching
from jambatrt.errors import InputError
from jambatrt.manifest import Manifest

STAGE_MODEL = Path(__file__).with_name("stage_model.py")
HOP_MODEL = Path(__file__).with_name("hop_model.py")


def node_stages(n_stages: int, nodes: int) -> list[range]:
    """The stage indices of each node: `nodes` contiguous groups, sizes differing by at most one
    (the stages themselves are already balanced by the stage plan)."""
    if nodes > n_stages:
        raise InputError(f"nodes={nodes}: the artifact has {n_stages} stage engines and each node needs at least one "
                         f"(accepted: 1 .. {n_stages}; or build more: `jambatrt build OUT --backend ort --stages N`)")
    cuts = [k * n_stages // nodes for k in range(nodes + 1)]
    return [range(a, b) for a, b in zip(cuts, cuts[1:])]


def entry_model(name: str, node: int) -> str:
    """The model a node is called through: NAME_sequence on node 0, NAME_node{K} on the others."""
    return f"{name}_sequence" if node == 0 else f"{name}_node{node}"


def stage_models(manifest: Manifest, artifact: Path, settings) -> dict[str, dict]:
    """{model name: {"kind": "stage" | "hop" | "ensemble" | "node-ensemble", "config": config.pbtxt text}}
    of node settings.node's repository for `deploy --stages` (the only node unless settings.nodes > 1)."""
    from jambatrt.deploy.repository import served_max_tokens

    from jambatrt.engines.staged import KEYS
    backend = settings.stage_backend
    entry = manifest.engine(KEYS[backend], f"--backend {backend} --stages N` or `--stage-plan auto --gpu-memory 80GB")
    if settings.stage_devices not in ("cpu", "gpu"):
        raise InputError(f"stage_devices={settings.stage_devices!r} (accepted: cpu, gpu)")
    n, stages = settings.name, entry["stages"]
    vocab = manifest.step.vocab
    H = manifest.config.hidden_size
    common = {"artifact": str(artifact), "manifest_sha256": sha256_file(artifact / "manifest.json"),
              "max_tokens": served_max_tokens(manifest, settings.max_tokens),
              "idle_seconds": settings.idle_seconds, "max_sequences": settings.max_sequences}
    env = {"EXECUTION_ENV_PATH": settings.execution_env}        # None: not written
    mine = node_stages(len(stages), settings.nodes)[settings.node]
    last_node = settings.node == settings.nodes - 1
    logits_out = [tensor("logits", "float32", [vocab]), tensor("next_token", "int64", [1])]
    models: dict[str, dict] = {}
    steps = []
    for k in mine:
        s = stages[k]
        first, last = k == 0, k == len(stages) - 1
        name = f"{n}_stage{k}"
        # the batch dim is implicit (max_batch_size > 0): a request's input_ids [1, L] has dims [-1]
        inp = tensor("input_ids", "int64", ["seq"]) if first else tensor("hidden_in", "float32", ["seq", H])
        out = logits_out if last else [tensor("hidden_out", "float32", ["seq", H])]
        group = ({"kind": Enum("KIND_GPU"), "count": settings.instances, "gpus": [k - mine.start]}
                 if settings.stage_devices == "gpu" else {"kind": Enum("KIND_CPU"), "count": settings.instances})
        a, b = s["layers"]
        body = {"name": name, "backend": "python", "max_batch_size": settings.sequence_batch, "input": [inp],
                "output": out, "sequence_batching": sequence_batching(settings), "instance_group": [group],
                "parameters": parameters({**common, "backend": backend, "stage": k, **env})}
        note = (f"Pipeline stage {k} of {len(stages)} ({backend} engine): layers {a}-{b - 1}"
                + (" + embedding" if first else "") + (" + final norm and lm_head" if last else "")
                + f". Keeps those layers' state per correlation id; called by the ensemble {entry_model(n, settings.node)}.")
        models[name] = {"kind": "stage", "config": comment(note) + pbtxt(body) + "\n"}
        steps.append({"model_name": name, "model_version": -1,
                      "input_map": {"key": "input_ids" if first else "hidden_in",
                                    "value": "input_ids" if first else "hidden_in" if k == mine.start else f"hidden_{k - 1}"},
                      "output_map": ([{"key": "logits", "value": "logits"}, {"key": "next_token", "value": "next_token"}]
                                     if last else {"key": "hidden_out", "value": f"hidden_{k}"})})
    if not last_node:
        nxt = entry_model(n, settings.node + 1)
        body = {"name": f"{n}_hop", "backend": "python", "max_batch_size": settings.sequence_batch,
                "input": [tensor("hidden_in", "float32", ["seq", H])], "output": logits_out,
                "sequence_batching": sequence_batching(settings),
                # one instance per sequence in flight downstream: an instance waits for its answer
                "instance_group": [{"kind": Enum("KIND_CPU"), "count": settings.instances * (len(stages) - mine.stop)}],
                "parameters": parameters({"next_node": settings.next_node, "next_model": nxt,
                                          "timeout_seconds": settings.hop_timeout, **env})}
        note = (f"Sends stage {mine.stop - 1}'s hidden states to {nxt} on node {settings.node + 1} "
                f"({settings.next_node}, gRPC) with the request's correlation id and START/END; returns its logits "
                f"and next token, or its error (after at most {settings.hop_timeout:g} s).")
        models[f"{n}_hop"] = {"kind": "hop", "config": comment(note) + pbtxt(body) + "\n"}
        steps.append({"model_name": f"{n}_hop", "model_version": -1,
                      "input_map": {"key": "hidden_in", "value": f"hidden_{mine.stop - 1}"},
                      "output_map": [{"key": "logits", "value": "logits"}, {"key": "next_token", "value": "next_token"}]})
    first_node = settings.node == 0
    name = entry_model(n, settings.node)
    ensemble = {"name": name, "platform": "ensemble", "max_batch_size": settings.sequence_batch,
                "input": [tensor("input_ids", "int64", ["seq"]) if first_node
                          else tensor("hidden_in", "float32", ["seq", H])],
                "output": logits_out, "ensemble_scheduling": {"step": steps}}
    if settings.nodes == 1:
        note = (f"The {len(stages)} pipeline stages as one model, with the interface of the single-engine sequence "
                "model: send input_ids [1, L] with a sequence id (START on the first request, END on the last); "
                "every stage gets the sequence id and flags and keeps its own layers' state.")
    else:
        held = f"stage {mine.start}" if len(mine) == 1 else f"stages {mine.start}-{mine.stop - 1}"
        note = (f"Node {settings.node} of {settings.nodes}: {held} of {len(stages)}"
                + ("" if last_node else f", then {n}_hop to node {settings.node + 1}") + ". "
                + ("Send input_ids [1, L] with a sequence id (START first, END last), as to the single-engine "
                   "sequence model." if first_node else f"Called by node {settings.node - 1}'s {n}_hop with the "
                   f"hidden states hidden_in [1, L, {H}] (stage {mine.start - 1}'s) and the sequence id and flags."))
    models[name] = {"kind": "ensemble" if first_node else "node-ensemble", "config": comment(note) + pbtxt(ensemble) + "\n"}
    return models
