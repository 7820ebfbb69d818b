"""The pipeline-stage part of a Triton model repository (`jambatrt deploy --stages`).

  NAME_stage{k}   Python backend, one per stage of manifest engines["ort-stages"] (deploy/stage_model.py):
                  sequence batching (START/END/READY/CORRID); keeps its layers' state per correlation
                  id; pinned by instance_group (KIND_CPU here; KIND_GPU with gpus: [k] for stage k on GPUs)
  NAME_sequence   an ensemble chaining the stages, with the single-engine sequence model's interface
                  (input_ids [1,L] -> logits [1,V], next_token [1,1]): a client cannot tell them apart.
                  Triton's ensemble scheduler gives every stage the request's correlation id and
                  START/END flags, so each stage's state follows the sequence; the hidden states
                  [1,L,H] are the only tensors passed between stages.

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
STAGES_KEY = "ort-stages"


def stage_models(manifest: Manifest, artifact: Path, settings) -> dict[str, dict]:
    """{model name: {"kind": "stage" | "ensemble", "config": config.pbtxt text}} for `deploy --stages`."""
    from jambatrt.deploy.repository import served_max_tokens

    entry = manifest.engine(STAGES_KEY, "--backend ort --stages N` or `--stage-plan auto --gpu-memory 80GB")
    if settings.stage_devices not in ("cpu", "gpu"):
        raise InputError(f"stage_devices={settings.stage_devices!r} (accepted: cpu, gpu)")
    n, stages = settings.name, entry["stages"]
    vocab = manifest.step.vocab
    H = manifest.config.hidden_size
    common = {"artifact": str(artifact), "manifest_sha256": sha256_file(artifact / "manifest.json"),
              "max_tokens": served_max_tokens(manifest, settings.max_tokens),
              "idle_seconds": settings.idle_seconds, "max_sequences": settings.max_sequences}
    models: dict[str, dict] = {}
    steps = []
    for k, s in enumerate(stages):
        first, last = k == 0, k == len(stages) - 1
        name = f"{n}_stage{k}"
        # the batch dim is implicit (max_batch_size > 0): a request's input_ids [1, L] has dims [-1]
        inp = tensor("input_ids", "int64", ["seq"]) if first else tensor("hidden_in", "float32", ["seq", H])
        out = ([tensor("logits", "float32", [vocab]), tensor("next_token", "int64", [1])] if last
               else [tensor("hidden_out", "float32", ["seq", H])])
        group = ({"kind": Enum("KIND_GPU"), "count": settings.instances, "gpus": [k]} if settings.stage_devices == "gpu"
                 else {"kind": Enum("KIND_CPU"), "count": settings.instances})
        params = {**common, "stage": k}
        if settings.execution_env:
            params["EXECUTION_ENV_PATH"] = settings.execution_env
        a, b = s["layers"]
        body = {"name": name, "backend": "python", "max_batch_size": settings.sequence_batch, "input": [inp],
                "output": out, "sequence_batching": sequence_batching(settings), "instance_group": [group],
                "parameters": parameters(params)}
        note = (f"Pipeline stage {k} of {len(stages)}: layers {a}-{b - 1}"
                + (" + embedding" if first else "") + (" + final norm and lm_head" if last else "")
                + f". Keeps those layers' state per correlation id; called by the ensemble {n}_sequence.")
        models[name] = {"kind": "stage", "config": comment(note) + pbtxt(body) + "\n"}
        steps.append({"model_name": name, "model_version": -1,
                      "input_map": {"key": "input_ids" if first else "hidden_in",
                                    "value": "input_ids" if first else f"hidden_{k - 1}"},
                      "output_map": ([{"key": "logits", "value": "logits"}, {"key": "next_token", "value": "next_token"}]
                                     if last else {"key": "hidden_out", "value": f"hidden_{k}"})})
    ensemble = {"name": f"{n}_sequence", "platform": "ensemble", "max_batch_size": settings.sequence_batch,
                "input": [tensor("input_ids", "int64", ["seq"])],
                "output": [tensor("logits", "float32", [vocab]), tensor("next_token", "int64", [1])],
                "ensemble_scheduling": {"step": steps}}
    note = (f"The {len(stages)} pipeline stages as one model, with the interface of the single-engine sequence "
            "model: send input_ids [1, L] with a sequence id (START on the first request, END on the last); "
            "every stage gets the sequence id and flags and keeps its own layers' state.")
    models[f"{n}_sequence"] = {"kind": "ensemble", "config": comment(note) + pbtxt(ensemble) + "\n"}
    return models
