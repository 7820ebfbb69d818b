"""NAME_aoti: a Triton Inference Server model for the artifact's AOTInductor engine.

This file has two roles:
- in jambatrt (`jambatrt deploy`): `aoti_config()` / `write_aoti_model()` write the model's
  config.pbtxt and copy this very file as its `1/model.py`;
- inside the Python backend stub: `TritonPythonModel` loads engines/aoti/model.pt2 through
  `AotiEngine` and serves the stateless step program, as NAME_tensorrt does for a TensorRT plan:
  input_ids [B,L] int64 + past.* state (P past tokens; an empty state has P = 0) -> logits
  [B,L,V] + present.* state, names, dtypes and dims from the manifest's `programs.step`.
  Tensors travel by DLPack, so bfloat16 state works and a cuda package's outputs are handed to
  the server without a host copy. Instance group KIND_GPU for a cuda package, KIND_CPU for a cpu
  one. (The NAME_prefill / NAME_sequence / NAME_generate models of deploy/repository.py can also
  run this engine: `RepositorySettings(backend="aoti")`.)

The stub's interpreter must import jambatrt and torch (the serve env); a cpu package also calls
the jamba ops back through Python, which the engine registers. Nothing at module level imports
triton_python_backend_utils, so jambatrt can import the writer."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

MODEL_FILE = Path(__file__)
pb_utils = None       # triton_python_backend_utils, bound in TritonPythonModel.initialize


# ---- writer (jambatrt deploy) ----------------------------------------------------------------------
def aoti_config(manifest: dict, artifact: str | Path, model_name: str, execution_env: str | None = None,
                instances: int = 1) -> str:
    """config.pbtxt of NAME_aoti for the artifact's `engines.aoti` entry (engines/aoti.py)."""
    from jambatrt.artifact import sha256_file
    from jambatrt.deploy.repository import Enum, _comment, _params, _tensor, pbtxt
    from jambatrt.errors import ArtifactError

    entry = manifest.get("engines", {}).get("aoti")
    if entry is None:
        raise ArtifactError(f"{artifact}: no aoti engine built (run `jambatrt build {artifact} --backend aoti`)")
    artifact = Path(artifact).resolve()
    step = manifest["programs"]["step"]
    device = entry.get("device", "cpu")
    chunk = entry.get("chunk_plan", {}).get("chunk")
    where = (f"{entry['gpu']['arch']} ({entry['gpu']['name']})" if device == "cuda" and entry.get("gpu")
             else f"cpu ({entry.get('cpu_isa') or 'host ISA'})")
    notes = [f"AOTInductor engine of a jambatrt artifact (dtype {manifest.get('dtype')}), compiled by torch "
             f"{entry.get('torch', '?')} for {where}: serve it with the same torch on the same kind of device.",
             "Stateless step program: send input_ids [B,L] with the past.* state (P past tokens; an empty state "
             "has P = 0), read logits [B,L,V] and the present.* state to send with the next call."
             + (f" Send prompts in chunks of at most {chunk} tokens." if chunk else ""),
             "Python backend: the stub's environment needs torch and jambatrt"
             + ("; the cpu package calls the jamba:: ops back through Python." if device == "cpu" else
                "; the Triton kernels are compiled into the package.")]
    params = {"artifact": str(artifact), "manifest_sha256": sha256_file(artifact / "manifest.json")}
    if execution_env:
        params["EXECUTION_ENV_PATH"] = execution_env
    cfg = {
        "name": model_name,
        "backend": "python",
        "max_batch_size": 0,            # the batch dim is part of dims, as in the step program
        "input": [_tensor(s["name"], s["dtype"], s["shape"]) for s in step["inputs"]],
        "output": [_tensor(s["name"], s["dtype"], s["shape"]) for s in step["outputs"]],
        "instance_group": [{"kind": Enum("KIND_GPU" if device == "cuda" else "KIND_CPU"), "count": instances}],
        "parameters": _params(params),
    }
    return _comment("\n".join(notes)) + pbtxt(cfg) + "\n"


def write_aoti_model(model_dir: str | Path, artifact: str | Path, manifest: dict, model_name: str,
                     execution_env: str | None = None, instances: int = 1) -> Path:
    """Write model_dir/config.pbtxt and model_dir/1/model.py (this file). Returns model_dir."""
    model_dir = Path(model_dir)
    (model_dir / "1").mkdir(parents=True, exist_ok=True)
    (model_dir / "config.pbtxt").write_text(aoti_config(manifest, artifact, model_name, execution_env, instances))
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
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
        import torch
        from torch.utils import dlpack

        from jambatrt.artifact import check_deployed_manifest
        from jambatrt.engines.aoti import AotiEngine
        from jambatrt.errors import InputError, JambaTRTError

        self.torch, self.dlpack = torch, dlpack
        self.InputError, self.JambaTRTError = InputError, JambaTRTError
        config = json.loads(args["model_config"])
        self.name = config.get("name", "")
        params = {k: v.get("string_value", "") for k, v in config.get("parameters", {}).items()}
        artifact = params["artifact"]
        check_deployed_manifest(artifact, params.get("manifest_sha256"))
        if args.get("model_instance_kind") == "GPU":
            torch.cuda.set_device(int(args.get("model_instance_device_id", 0)))
        self.engine = AotiEngine.load(artifact, verify=True)    # every artifact file checked against its sha256
        step = self.engine.step_program
        self.inputs, self.outputs = step["inputs"], step["outputs"]
        self.dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
                       "int64": torch.int64}
        # warm up: the first call loads kernels and allocates; not the first request's cost
        with torch.inference_mode():
            self.engine.run_step_torch(*self._check([self._ids([[0]]), *self._empty_state(1)]))

    def finalize(self):
        self.engine.close()

    def _ids(self, rows):
        return self.torch.tensor(rows, dtype=self.torch.int64)

    def _empty_state(self, batch: int):
        return [self.torch.zeros([batch if d == "batch" else 0 if d == "past" else int(d) for d in s["shape"]],
                                 dtype=self.dtypes[s["dtype"]]) for s in self.inputs[1:]]

    def _check(self, tensors):
        """Shapes/dtypes against the step program; returns (ids, state) on the engine's device."""
        ids, state = tensors[0], tensors[1:]
        if ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise self.InputError(f"input_ids shape {list(ids.shape)} (accepted: [batch >= 1, length >= 1])")
        B, V = ids.shape[0], self.engine.config.vocab_size
        if B > self.engine.entry["max_batch"]:          # shapes and limits first, then the values
            raise self.InputError(f"batch {B} exceeds the engine's max_batch {self.engine.entry['max_batch']}")
        if ids.shape[1] > self.engine.max_seq:
            raise self.InputError(f"{ids.shape[1]} tokens exceed the engine's context {self.engine.max_seq}")
        if ids.dtype != self.torch.int64:
            raise self.InputError(f"input_ids has dtype {ids.dtype}, expected int64")
        if int(ids.min()) < 0 or int(ids.max()) >= V:
            raise self.InputError(f"token id out of range (accepted: 0 .. {V - 1})")
        past = None
        for spec, t in zip(self.inputs[1:], state):
            want = spec["shape"]
            if (t.dim() != len(want) or t.shape[0] != B
                    or any(isinstance(w, int) and w != g for w, g in zip(want, t.shape))):
                raise self.InputError(f"{spec['name']} has shape {list(t.shape)}, expected {want} with batch {B}")
            if t.dtype != self.dtypes[spec["dtype"]]:
                raise self.InputError(f"{spec['name']} has dtype {t.dtype}, expected {spec['dtype']}")
            if "past" in want:
                p = t.shape[want.index("past")]
                if past is not None and p != past:
                    raise self.InputError(f"{spec['name']} holds {p} past tokens, others {past}")
                past = p
        if (past or 0) + ids.shape[1] > self.engine.max_seq:
            raise self.InputError(f"context {past or 0} + {ids.shape[1]} tokens exceeds {self.engine.max_seq}")
        dev = self.engine.device
        return ids.to(dev), [t.to(dev) for t in state]

    def execute(self, requests):
        out = []
        for r in requests:
            try:
                tensors = []
                for spec in self.inputs:
                    t = pb_utils.get_input_tensor_by_name(r, spec["name"])
                    if t is None:
                        raise self.InputError(f"missing input {spec['name']!r}")
                    tensors.append(self.dlpack.from_dlpack(t.to_dlpack()))
                with self.torch.inference_mode():
                    logits, state = self.engine.run_step_torch(*self._check(tensors))
                out.append(pb_utils.InferenceResponse([
                    pb_utils.Tensor.from_dlpack(spec["name"], self.dlpack.to_dlpack(t.contiguous()))
                    for spec, t in zip(self.outputs, [logits, *state])]))
            except (self.InputError, ValueError) as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {e}")))
            except Exception as e:   # noqa: BLE001 - every request gets a response; the server stays up
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {type(e).__name__}: {e}", False)))
        return out
