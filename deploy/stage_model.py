"""Triton Inference Server Python-backend model for one pipeline stage of a jambatrt artifact
(`jambatrt build --stages N`; engines/staged.py).

`jambatrt deploy --stages` copies this file verbatim to `<NAME>_stage{k}/1/model.py` for every stage
and writes the ensemble `<NAME>_sequence` that chains them: a client calls it exactly like the
single-engine sequence model (input_ids [1,L] with a correlation id and START/END), and Triton's
ensemble scheduler hands the correlation id and the START/END flags to every stage. Each stage keeps
ITS layers' state (KV cache, Mamba conv/SSM state) per correlation id, on its own device: only the
hidden states [1,L,H] travel between stages, never the state.

config.pbtxt parameters:
  artifact, manifest_sha256   the artifact (read only) and the manifest deployed
  backend                     ort | aoti: which stage engines (manifest engines["<backend>-stages"])
  stage                       this stage's index in that entry's "stages"
  max_tokens                  per-sequence token budget (prompt + generated)
  idle_seconds, max_sequences state of silent sequences is dropped after idle_seconds; at most
                              max_sequences states are kept (the oldest go first)

Inputs/outputs: stage 0 takes input_ids [1,L] int64, the others hidden_in [1,L,H]; every stage but
the last returns hidden_out [1,L,H]; the last returns logits [1,V] of the last token and next_token
[1,1] (greedy). Every request gets a response: errors are error responses, never exceptions out of
execute(); a request that fails leaves this stage's state of that sequence as it was."""

import json

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (exists only inside the backend stub)

CHUNK = 16384          # tokens per session run (the engines' default prefill chunk); state carried


class _BadRequest(Exception):
    pass


def _error(msg, invalid_arg=True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    return pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)


class TritonPythonModel:
    def initialize(self, args):
        from jambatrt.artifact import check_deployed_manifest, verify_files
        from jambatrt.deploy.sequence_state import SequenceStates, sequence_controls
        from jambatrt.engines.staged import KEYS, stage_session
        from jambatrt.errors import InputError
        from jambatrt.manifest import Manifest, TensorSpec

        self.InputError = InputError
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.name = cfg.get("name", "")
        artifact = params["artifact"]
        check_deployed_manifest(artifact, params.get("manifest_sha256"))
        manifest = Manifest.read(artifact)
        verify_files(artifact, manifest.raw)        # every file against its sha256 before serving it
        backend = params.get("backend", "ort")
        if backend not in KEYS:
            raise ValueError(f"{self.name}: parameter backend={backend!r} (accepted: {', '.join(KEYS)}): "
                             "re-run `jambatrt deploy`")
        if args.get("model_instance_kind") == "GPU" and backend == "aoti":
            import torch
            torch.cuda.set_device(int(args.get("model_instance_device_id", 0)))
        stages = manifest.engine(KEYS[backend])["stages"]
        self.index = int(params["stage"])
        self.stage = stages[self.index]
        self.first, self.last = self.index == 0, self.index == len(stages) - 1
        self.vocab = manifest.config.vocab_size
        self.session = stage_session(manifest, backend, self.stage)
        self.past_specs = [TensorSpec.of(s) for s in self.stage["inputs"][1:]]
        # correlation id -> this stage's state {past name: array}
        self.states = SequenceStates(float(params.get("idle_seconds", "60")), int(params.get("max_sequences", "64")),
                                     int(params["max_tokens"]))
        self.sequence_controls = sequence_controls
        # warm up (the first run compiles the CPU kernels) so the first request is not the slow one
        self._run(self._zero_state(), np.zeros((1, 1), np.int64) if self.first else
                  np.zeros((1, 1, self.stage["inputs"][0]["shape"][-1]), np.float32))

    def finalize(self):
        self.states.clear()
        self.session.close()

    def _zero_state(self):
        out = {}
        for s in self.past_specs:
            out[s.name] = np.zeros(s.zero_shape(1), dtype=np.dtype(s.dtype))
        return out

    def _run(self, state, x):
        """x: ids [1,L] or hidden [1,L,H] -> (hidden [1,L,H] or logits [1,V] of the last token, new state)."""
        feed_name = self.stage["inputs"][0]["name"]
        outs = []
        for s in range(0, x.shape[1], CHUNK):
            got = self.session.run({feed_name: x[:, s:s + CHUNK], **state})
            state = {"past." + k.removeprefix("present."): v for k, v in got.items() if k.startswith("present.")}
            y = got[self.stage["outputs"][0]["name"]]
            outs.append(y[:, -1] if self.last else y)
        return (outs[-1] if self.last else np.concatenate(outs, axis=1)), state

    # ---- dispatch ------------------------------------------------------------------------------
    def execute(self, requests):
        out = []
        for r in requests:
            try:
                out.append(self._step(r))
            except (_BadRequest, self.InputError) as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {e}")))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {type(e).__name__}: {e}", False)))
        return out

    def _step(self, request):
        corrid, start, end = self.sequence_controls(request, pb_utils)
        name = self.stage["inputs"][0]["name"]
        t = pb_utils.get_input_tensor_by_name(request, name)
        if t is None:
            raise _BadRequest(f"missing input {name!r}")
        x = t.as_numpy()
        if self.first:
            if x.ndim != 2 or x.shape[0] != 1 or x.shape[1] < 1:
                raise _BadRequest(f"input_ids has shape {list(x.shape)}; expected [1, L] with at least one token")
            x = x.astype(np.int64, copy=False)
            if x.min() < 0 or x.max() >= self.vocab:
                raise _BadRequest(f"token id {int(x.max() if x.max() >= self.vocab else x.min())} out of range "
                                  f"(accepted: 0 .. {self.vocab - 1})")
        elif x.ndim != 3 or x.shape[0] != 1 or x.shape[1] < 1:
            raise _BadRequest(f"{name} has shape {list(x.shape)}; expected [1, L, H]")
        y = self.states.step(corrid, start, end, x.shape[1], self._zero_state, lambda state: self._run(state, x))
        if not self.last:
            return pb_utils.InferenceResponse([pb_utils.Tensor("hidden_out", np.ascontiguousarray(y, np.float32))])
        logits = np.ascontiguousarray(y, np.float32)                                     # [1, V]
        return pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits),
                                           pb_utils.Tensor("next_token", logits.argmax(-1).astype(np.int64)[:, None])])
