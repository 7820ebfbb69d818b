"""Triton Inference Server Python-backend model that runs a jambatrt engine.

`jambatrt deploy` copies this file verbatim to `<model>/1/model.py`; the model's config.pbtxt
`parameters` say what it serves:
  mode       prefill  - stateless: input_ids [B,L] int64 -> logits [B,L,V] fp32
             sequence - sequence batching (START/END/READY/CORRID controls): per correlation id it
                        keeps the engine state; input_ids [1,L] -> logits [1,V] of the last token
                        and next_token [1,1] (greedy); L > 1 after START is a chunk of prompt
             generate - decoupled: prompt_ids [L] (+ optional max_new_tokens, eos_id, temperature,
                        top_p, seed) -> one response per generated token_id [1], then a final flag
  artifact   absolute path of the jambatrt artifact (read only: nothing here writes to it)
  backend    engine backend (ort)
  manifest_sha256  the manifest deployed; a rebuilt artifact is refused until redeployed
  max_tokens       per-request / per-sequence token budget (prompt + generated)
  idle_seconds, max_sequences  (sequence mode) state of silent sequences is dropped after
                   idle_seconds; at most max_sequences states are kept (the oldest go first)

It runs inside the backend stub's interpreter (the serve env: numpy < 2), never in the package's
own processes, so it is not imported by jambatrt itself. Every request gets a response: errors are
error responses (the stub and the server stay up), never exceptions out of execute()."""

import json
import os
import time
from collections import OrderedDict

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import triton_python_backend_utils as pb_utils  # noqa: E402  (exists only inside the backend stub)


def _error(msg, invalid_arg=True):
    code = getattr(pb_utils.TritonError, "INVALID_ARG" if invalid_arg else "INTERNAL", None)
    return pb_utils.TritonError(msg) if code is None else pb_utils.TritonError(msg, code)


def _input(request, name, required=True):
    t = pb_utils.get_input_tensor_by_name(request, name)
    if t is None:
        if required:
            raise _BadRequest(f"missing input {name!r}")
        return None
    return t.as_numpy()


def _scalar(request, name, default, cast):
    a = _input(request, name, required=False)
    if a is None:
        return default
    if a.size != 1:
        raise _BadRequest(f"input {name!r} must hold one value, got shape {list(a.shape)}")
    return cast(a.reshape(-1)[0])


class _BadRequest(Exception):
    pass


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        from jambatrt.artifact import check_deployed_manifest
        from jambatrt.engines.base import engine_class
        from jambatrt.errors import InputError, JambaTRTError

        self.InputError, self.JambaTRTError = InputError, JambaTRTError
        self.model_config = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in self.model_config.get("parameters", {}).items()}
        self.name = self.model_config.get("name", "")
        self.mode = params.get("mode")
        decoupled = pb_utils.using_decoupled_model_transaction_policy(self.model_config)
        if self.mode not in ("prefill", "sequence", "generate") or decoupled != (self.mode == "generate"):
            raise ValueError(f"{self.name}: parameter mode={self.mode!r} with decoupled={decoupled} (accepted: "
                             "prefill or sequence, not decoupled; generate, decoupled): re-run `jambatrt deploy`")
        artifact = params["artifact"]
        check_deployed_manifest(artifact, params.get("manifest_sha256"))
        # verify=True: every artifact file is checked against its sha256 before serving it
        self.engine = engine_class(params.get("backend", "ort")).load(artifact, verify=True)
        self.max_tokens = min(int(params.get("max_tokens") or self.engine.max_seq), self.engine.max_seq)
        self.idle_seconds = float(params.get("idle_seconds", "60"))
        self.max_sequences = int(params.get("max_sequences", "64"))
        self.states = OrderedDict()     # correlation id -> (engine state, past tokens, last use)
        # warm up (first run compiles the CPU kernels) so the first request is not the slow one
        self.engine.prefill(np.array([[0]], dtype=np.int64))

    def finalize(self):
        self.states.clear()
        self.engine.close()

    # ---- dispatch ------------------------------------------------------------------------------
    def execute(self, requests):
        if self.mode == "generate":
            for r in requests:
                self._generate(r)
            return None
        out = []
        for r in requests:
            try:
                out.append(self._prefill(r) if self.mode == "prefill" else self._sequence(r))
            except (_BadRequest, self.InputError) as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {e}")))
            except Exception as e:
                out.append(pb_utils.InferenceResponse(error=_error(f"{self.name}: {type(e).__name__}: {e}", False)))
        return out

    # ---- prefill: ids -> logits ------------------------------------------------------------------
    def _ids(self, request, name, ndim):
        ids = _input(request, name)
        if ids.ndim != ndim or ids.shape[-1] < 1:
            raise _BadRequest(f"{name} has shape {list(ids.shape)}; expected {ndim} dims with at least one token")
        return ids.astype(np.int64, copy=False)

    def _prefill(self, request):
        ids = self._ids(request, "input_ids", 2)
        # the budget covers the whole request: B rows of L tokens make B x L x V logits
        if ids.shape[1] > self.max_tokens or ids.size > self.max_tokens:
            raise _BadRequest(f"{ids.shape[0]} x {ids.shape[1]} tokens exceed this model's max_tokens {self.max_tokens}")
        logits, _ = self.engine.prefill(ids)
        return pb_utils.InferenceResponse([pb_utils.Tensor("logits", np.ascontiguousarray(logits, np.float32))])

    # ---- sequence: per-correlation-id state ------------------------------------------------------
    def _control(self, request, name):
        a = _input(request, name, required=False)
        return None if a is None else a.reshape(-1)[0].item()

    def _sequence(self, request):
        now = time.monotonic()
        for cid in [c for c, (_, _, t) in self.states.items() if now - t > self.idle_seconds]:
            del self.states[cid]
        corrid = self._control(request, "CORRID")
        if corrid is None:
            corrid = request.correlation_id()
        start, end = bool(self._control(request, "START")), bool(self._control(request, "END"))
        try:
            ids = self._ids(request, "input_ids", 2)      # [1, L]: the batch dim is the sequence's own
            if start:
                self.states.pop(corrid, None)
                state, past = None, 0
            elif corrid in self.states:
                state, past, _ = self.states[corrid]
            else:
                raise _BadRequest(f"unknown sequence id {corrid} (its state expired after {self.idle_seconds:g} s "
                                  "idle, was evicted, or it never started): send START first")
            if past + ids.shape[1] > self.max_tokens:
                raise _BadRequest(f"sequence {corrid}: {past} + {ids.shape[1]} tokens exceed max_tokens "
                                  f"{self.max_tokens}")
            logits, state = self.engine.prefill(ids, state, last_only=True)        # [1, V]
            if not end:
                self.states[corrid] = (state, past + ids.shape[1], now)
                self.states.move_to_end(corrid)
                while len(self.states) > self.max_sequences:
                    self.states.popitem(last=False)
        finally:
            if end:
                self.states.pop(corrid, None)
        logits = np.ascontiguousarray(logits, np.float32)
        return pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits),
                                           pb_utils.Tensor("next_token", logits.argmax(-1).astype(np.int64)[:, None])])

    # ---- generate: decoupled, one response per token ---------------------------------------------
    def _generate(self, request):
        from jambatrt.engines.generate import Sampling, generate

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            prompt = self._ids(request, "prompt_ids", 1).tolist()
            n = _scalar(request, "max_new_tokens", 16, int)
            if n < 0:
                raise _BadRequest(f"max_new_tokens={n} (accepted: >= 0)")
            if len(prompt) + n > self.max_tokens:
                raise _BadRequest(f"{len(prompt)} prompt + {n} new tokens exceed max_tokens {self.max_tokens}")
            eos = _scalar(request, "eos_id", -1, int)
            sampling = Sampling(_scalar(request, "temperature", 0.0, float), _scalar(request, "top_p", 1.0, float),
                                _scalar(request, "seed", 0, int))

            def on_token(_i, tok):
                if getattr(request, "is_cancelled", lambda: False)():
                    raise _Cancelled()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("token_id", np.array([tok], np.int64))]))

            generate(self.engine, [prompt], n, sampling, eos_id=None if eos < 0 else eos, on_token=on_token)
            error = None
        except _Cancelled:
            error = None
        except (_BadRequest, self.InputError) as e:
            error = _error(f"{self.name}: {e}")
        except Exception as e:
            error = _error(f"{self.name}: {type(e).__name__}: {e}", False)
        try:
            if error is None:
                sender.send(flags=final)
            else:
                sender.send(pb_utils.InferenceResponse(error=error), flags=final)
        except Exception:
            pass
