"""NAME_aoti / NAME_tensorrt: Triton Inference Server models for the artifact's GPU engines (the
AOTInductor package of engines/aoti.py, the TensorRT engine of engines/tensorrt.py).

This file has two roles:
- in jambatrt (`jambatrt deploy`): `engine_config()` / `write_engine_model()` write the model's
  config.pbtxt and copy this very file as its `1/model.py`;
- inside the Python backend stub: `TritonPythonModel` loads the engine named by the `backend`
  parameter (aoti | tensorrt) and serves it with the interface of NAME_sequence: sequence batching
  (START/END/READY/CORRID), input_ids [1,L] int64 -> logits [1,V] fp32 of the last token and
  next_token [1,1] (greedy); L > 1 after START is (a chunk of) the prompt. The KV cache and Mamba
  state stay on the engine's device per correlation id (deploy/sequence_state.py) and are fed back
  to the engine as device tensors (`run_step_torch`): only token ids come in and only the last
  token's logits go out -- the state never travels through the client. Prompts longer than the
  engine's prefill chunk run in chunks, the state carried.

Instance group KIND_GPU for a cuda AOTI package and for TensorRT, KIND_CPU for a cpu AOTI package.
Triton's implicit state (`sequence_batching.state`) is not used: the Python backend does not
support it, and the step program returns logits for every token, not the next one.

The stub's interpreter must import jambatrt and torch (the serve env; tensorrt too for NAME_tensorrt);
a cpu AOTI package also calls the jamba ops back through Python, which the engine registers. Nothing
at module level imports triton_python_backend_utils, so jambatrt can import the writer."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

MODEL_FILE = Path(__file__)
BACKENDS = ("aoti", "tensorrt")
pb_utils = None       # triton_python_backend_utils, bound in TritonPythonModel.initialize


# ---- writer (jambatrt deploy) ----------------------------------------------------------------------
def engine_config(manifest: Manifest | dict, artifact: str | Path, model_name: str, backend: str, settings=None) -> str:
    """config.pbtxt of NAME_aoti / NAME_tensorrt for the artifact's `engines[backend]` entry;
    settings: a RepositorySettings (token budget, idle time, live sequences, instances, execution env)."""
    from jambatrt.artifact import sha256_file
    from jambatrt.deploy.pbtxt import Enum, comment, parameters, pbtxt, tensor
    from jambatrt.deploy.repository import RepositorySettings, served_max_tokens
    from jambatrt.deploy.sequence_state import sequence_batching
    from jambatrt.errors import InputError
    from jambatrt.manifest import Manifest

    if backend not in BACKENDS:
        raise InputError(f"engine model backend {backend!r} (accepted: {', '.join(BACKENDS)})")
    settings = settings or RepositorySettings()
    manifest = Manifest.of(artifact, manifest)
    entry = manifest.engine(backend)
    artifact = Path(artifact).resolve()
    device = "cuda" if backend == "tensorrt" else entry.get("device", "cpu")
    chunk = entry.get("chunk_plan", {}).get("chunk")
    gpu = entry.get("gpu") or {}
    where = (f"{gpu.get('arch', '?')} ({gpu.get('name', '?')})" if device == "cuda"
             else f"cpu ({entry.get('cpu_isa') or 'host ISA'})")
    built = (f"AOTInductor engine compiled by torch {entry.get('torch', '?')}" if backend == "aoti"
             else f"TensorRT {entry.get('tensorrt', '?')} engine")
    vocab = manifest.step.vocab
    notes = [f"{built} of a jambatrt artifact (dtype {manifest.dtype}) for {where}: serve it with the same "
             f"{'torch' if backend == 'aoti' else 'TensorRT'} on the same kind of device.",
             "Sequence model: send input_ids [1, L] with a sequence id (START on the first request, END on the "
             "last); read logits [1, V] of the last token and next_token [1, 1]. The KV and Mamba state stay on "
             "the server, on the engine's device, per sequence id."
             + (f" Prompts run in chunks of {chunk} tokens." if chunk else ""),
             "Python backend: the stub's environment needs torch and jambatrt"
             + ("; the cpu package calls the jamba:: ops back through Python." if backend == "aoti" and device == "cpu"
                else " (and tensorrt); the jamba:: kernels are AOT plugins inside the plan." if backend == "tensorrt"
                else "; the Triton kernels are compiled into the package.")]
    params = {"artifact": str(artifact), "backend": backend, "manifest_sha256": sha256_file(artifact / "manifest.json"),
              "max_tokens": served_max_tokens(manifest, settings.max_tokens),
              "idle_seconds": settings.idle_seconds, "max_sequences": settings.max_sequences}
    if settings.execution_env:
        params["EXECUTION_ENV_PATH"] = settings.execution_env
    cfg = {
        "name": model_name,
        "backend": "python",
        "max_batch_size": settings.sequence_batch,       # the batch dim is implicit: input_ids [1, L]
        "input": [tensor("input_ids", "int64", ["seq"])],
        "output": [tensor("logits", "float32", [vocab]), tensor("next_token", "int64", [1])],
        "sequence_batching": sequence_batching(settings),
        "instance_group": [{"kind": Enum("KIND_GPU" if device == "cuda" else "KIND_CPU"), "count": settings.instances}],
        "parameters": parameters(params),
    }
    return comment("\n".join(notes)) + pbtxt(cfg) + "\n"


def write_engine_model(model_dir: str | Path, artifact: str | Path, manifest, model_name: str, backend: str,
                       settings=None) -> Path:
    """Write model_dir/config.pbtxt and model_dir/1/model.py (this file). Returns model_dir."""
    text = engine_config(manifest, artifact, model_name, backend, settings)      # refusals before any file
    model_dir = Path(model_dir)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(text)
    shutil.copyfile(MODEL_FILE, model_dir / "1" / "model.py")
    return model_dir


# ---- the model (inside the Python backend stub) ------------------------------------------------------
def _error(msg: str, invalid_arg: bool = True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    return pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)


class TritonPythonModel:
    def initialize(self, args):
        global pb_utils
        import triton_python_backend_utils  # noqa: PLC0415 - exists only inside the backend stub

        pb_utils = triton_python_backend_utils
        import numpy as np

        import jambatrt  # noqa: F401  (before torch: it sets how OpenMP threads wait, threads.py)
        import torch

        from jambatrt.artifact import check_deployed_manifest
        from jambatrt.deploy.sequence_state import SequenceStates, sequence_controls
        from jambatrt.engines import engine_class
        from jambatrt.errors import InputError

        self.np, self.torch, self.InputError, self.sequence_controls = np, torch, InputError, sequence_controls
        config = json.loads(args["model_config"])
        self.name = config.get("name", "")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        backend = params.get("backend", "aoti")
        if backend not in BACKENDS:
            raise ValueError(f"{self.name}: parameter backend={backend!r} (accepted: {', '.join(BACKENDS)}): "
                             "re-run `jambatrt deploy`")
        artifact = params["artifact"]
        check_deployed_manifest(artifact, params.get("manifest_sha256"))
        if args.get("model_instance_kind") == "GPU":
            torch.cuda.set_device(int(args.get("model_instance_device_id", 0)))
        # verify=True: every artifact file checked against its sha256 before serving it
        self.engine = engine_class(backend).load(artifact, verify=True)
        self.device = "cuda" if backend == "tensorrt" else self.engine.device
        self.state_specs = self.engine.step_program.state
        self.vocab = self.engine.config.vocab_size
        self.chunk = self.engine.default_chunk(1)
        self.dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "int64": torch.int64}
        self.states = SequenceStates(float(params.get("idle_seconds", "60")), int(params.get("max_sequences", "64")),
                                     min(int(params.get("max_tokens") or self.engine.max_seq), self.engine.max_seq))
        # warm up (the first calls load kernels and allocate): a prompt token, then a decode step on its state
        with torch.inference_mode():
            _, state = self._run(self._zero_state(), self._ids([[0]]))
            self._run(state, self._ids([[0]]))

    def finalize(self):
        self.states.clear()
        self.engine.close()

    def _ids(self, rows):
        return self.torch.tensor(rows, dtype=self.torch.int64)

    def _zero_state(self):
        """The state before any token, on the engine's device: zeros for Mamba, an empty (P = 0) KV."""
        return [self.torch.zeros(s.zero_shape(1), dtype=self.dtypes[s.dtype], device=self.device)
                for s in self.state_specs]

    def _run(self, state, ids):
        """ids [1,L] int64 (host) + state on the device -> (logits [1,V] float32 on the host, new state)."""
        for s in range(0, ids.shape[1], self.chunk):
            logits, state = self.engine.run_step_torch(ids[:, s:s + self.chunk].to(self.device), state)
        return logits[:, -1].float().cpu().numpy(), state

    def execute(self, requests):
        out = []
        for r in requests:
            try:
                out.append(self._step(r))
            except self.InputError as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {e}")))
            except Exception as e:   # noqa: BLE001 - every request gets a response; the server stays up
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {type(e).__name__}: {e}", False)))
        return out

    def _step(self, request):
        np = self.np
        corrid, start, end = self.sequence_controls(request, pb_utils)
        t = pb_utils.get_input_tensor_by_name(request, "input_ids")
        if t is None:
            raise self.InputError("missing input 'input_ids'")
        ids = t.as_numpy()
        if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1:
            raise self.InputError(f"input_ids has shape {list(ids.shape)}; expected [1, L] with at least one token")
        if ids.dtype != np.int64:
            raise self.InputError(f"input_ids has dtype {ids.dtype}, expected int64")
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise self.InputError(f"token id {int(ids.max() if ids.max() >= self.vocab else ids.min())} out of range "
                                  f"(accepted: 0 .. {self.vocab - 1})")
        ids = self.torch.from_numpy(ids.copy())
        with self.torch.inference_mode():
            logits = self.states.step(corrid, start, end, ids.shape[1], self._zero_state,
                                      lambda state: self._run(state, ids))
        logits = np.ascontiguousarray(logits, np.float32)                           # [1, V]
        return pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits),
                                           pb_utils.Tensor("next_token", logits.argmax(-1).astype(np.int64)[:, None])])
