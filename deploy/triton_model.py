"""Triton Inference Server Python-backend model that runs a jambatrt engine.

`jambatrt deploy` copies this file verbatim to `<model>/1/model.py`; the model's config.pbtxt
`parameters` say what it serves:
  mode       prefill  - stateless: input_ids [B,L] int64 -> logits [B,L,V] fp32
             sequence - sequence batching (START/END/READY/CORRID controls): per correlation id it
                        keeps the engine state; input_ids [1,L] -> logits [1,V] of the last token
                        and next_token [1,1] (greedy); L > 1 after START is a chunk of prompt
             generate - decoupled: prompt_ids [L] (+ optional max_new_tokens, eos_id, temperature,
                        top_p, seed) -> one response per generated token_id [1], then a final flag;
                        or text_input [1] (the generate extension's JSON: {"text_input": ...,
                        "parameters": {...}}) -> text_output [1]: with parameters.stream true one
                        response per token (token_id + its decoded text), else one response with the
                        whole text; stops at the generation config's EOS ids. Requests run on their
                        own threads and take turns on the engine one step at a time (FairLock), so
                        concurrent streams interleave token by token.
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
import sys
import threading
from collections import deque
from concurrent.futures import ThreadPoolExecutor

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


# the generate extension's request parameters: name -> (type, check, what is accepted)
_PARAMETERS = {
    "max_new_tokens": (int, lambda v: v >= 0, "an integer >= 0"), "max_tokens": (int, lambda v: v >= 0, "an integer >= 0"),
    "temperature": (float, lambda v: 0 <= v < float("inf"), "a finite number >= 0"),
    "top_p": (float, lambda v: 0 < v <= 1, "a number in (0, 1]"), "seed": (int, lambda v: 0 <= v < 2 ** 63, "an integer >= 0"),
    "eos_id": (int, lambda v: v >= 0, "a token id"), "stream": (bool, lambda v: True, "true or false"),
    "chat": (bool, lambda v: True, "true or false"),
}


def _parameters(request):
    try:
        raw = json.loads(request.parameters() or "{}")
    except (AttributeError, ValueError):
        raw = {}
    out = {}
    for k, v in raw.items():
        if k not in _PARAMETERS:
            continue                     # Triton's own (e.g. sequence or priority keys) and unknown ones
        kind, ok, accepted = _PARAMETERS[k]
        good = (isinstance(v, bool) if kind is bool else
                isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer()))
        if not good or not ok(kind(v)):
            raise _BadRequest(f"parameter {k}={v!r} (accepted: {accepted})")
        out[k] = kind(v)
    return out


def _report_crash(future):
    """A generation thread that raised past its own handlers (a bug: they catch everything) says so
    in the server log instead of vanishing with the executor."""
    e = future.exception()
    if e is not None:
        print(f"jamba generate thread: {type(e).__name__}: {e}", file=sys.stderr, flush=True)   # the server log


class FairLock:
    """A lock handed over in arrival order: generations on threads take turns one engine step each
    (threading.Lock lets the thread that just released it take it again at once)."""

    def __init__(self):
        self._mutex = threading.Lock()
        self._queue = deque()
        self._held = False

    def __enter__(self):
        with self._mutex:
            if not self._held and not self._queue:
                self._held = True
                return self
            turn = threading.Event()
            self._queue.append(turn)
        turn.wait()
        return self

    def __exit__(self, *exc):
        with self._mutex:
            if self._queue:
                self._queue.popleft().set()      # ownership passes straight to the next in line
            else:
                self._held = False


class _TakingTurns:
    """An engine whose prefill/decode calls run one at a time, in turn (the CPU kernels are not made
    to run concurrently in one process)."""

    def __init__(self, engine, lock):
        self._engine, self._lock = engine, lock

    def __getattr__(self, name):
        return getattr(self._engine, name)

    def prefill(self, *a, **kw):
        with self._lock:
            return self._engine.prefill(*a, **kw)

    def decode(self, *a, **kw):
        with self._lock:
            return self._engine.decode(*a, **kw)


class _Cancelled(Exception):
    pass


class TritonPythonModel:
    def initialize(self, args):
        from jambatrt.artifact import check_deployed_manifest
        from jambatrt.deploy.sequence_state import SequenceStates, sequence_controls
        from jambatrt.engines import engine_class
        from jambatrt.errors import ArtifactError, InputError, JambaTRTError

        # the caller's errors (answered INVALID_ARG): a flat tuple -- `except` refuses a nested one
        # with a TypeError, which in a generation thread would leave the request unanswered
        self.user_errors, self.JambaTRTError = (_BadRequest, InputError, ArtifactError), JambaTRTError
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
        # correlation id -> engine state (sequence mode)
        self.states = SequenceStates(float(params.get("idle_seconds", "60")), int(params.get("max_sequences", "64")),
                                     self.max_tokens)
        self.sequence_controls = sequence_controls
        self.codec = None
        if self.mode == "generate":
            self.turns = _TakingTurns(self.engine, FairLock())
            # generations in flight at once (each takes its turn per step); more requests wait here
            self.pool = ThreadPoolExecutor(max_workers=int(params.get("max_sequences", "8") or 8),
                                           thread_name_prefix="jamba-generate")
            from jambatrt.text import TextCodec, no_tokenizer_message
            self.codec_error = no_tokenizer_message(artifact)
            if self.engine.manifest.text.get("tokenizer"):
                try:
                    self.codec = TextCodec(artifact, self.engine.manifest.text)
                except JambaTRTError as e:     # the id interface still serves; text requests say why not
                    self.codec_error = str(e)
        # warm up (first run compiles the CPU kernels) so the first request is not the slow one; the
        # decoding models a decode step too (one token on a carried state takes other kernel paths)
        _, state = self.engine.prefill(np.array([[0]], dtype=np.int64))
        if self.mode in ("generate", "sequence"):
            self.engine.decode(np.array([0], dtype=np.int64), state)

    def finalize(self):
        if self.mode == "generate":
            self.pool.shutdown(wait=True)
        self.states.clear()
        self.engine.close()

    # ---- dispatch ------------------------------------------------------------------------------
    def execute(self, requests):
        if self.mode == "generate":
            for r in requests:           # each on its own thread: responses go out through its sender
                self.pool.submit(self._generate, r).add_done_callback(_report_crash)
            return None
        out = []
        for r in requests:
            try:
                out.append(self._prefill(r) if self.mode == "prefill" else self._sequence(r))
            except self.user_errors as e:
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
    def _sequence(self, request):
        corrid, start, end = self.sequence_controls(request, pb_utils)
        ids = self._ids(request, "input_ids", 2)      # [1, L]: the batch dim is the sequence's own
        logits = self.states.step(corrid, start, end, ids.shape[1], lambda: None,      # None: the engine's zero state
                                  lambda state: self.engine.prefill(ids, state, last_only=True))   # [1, V]
        logits = np.ascontiguousarray(logits, np.float32)
        return pb_utils.InferenceResponse([pb_utils.Tensor("logits", logits),
                                           pb_utils.Tensor("next_token", logits.argmax(-1).astype(np.int64)[:, None])])

    # ---- generate: decoupled, one response per token ---------------------------------------------
    def _text_request(self, request, text, params):
        """text_input -> (prompt ids, EOS ids)."""
        if self.codec is None:
            raise _BadRequest(self.codec_error)
        if text.size != 1:
            raise _BadRequest(f"text_input must hold one string, got shape {list(text.shape)}")
        raw = text.reshape(-1)[0]
        try:
            prompt = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        except UnicodeDecodeError as e:
            raise _BadRequest(f"text_input is not valid UTF-8 (byte {e.start})") from None
        if params.get("chat"):
            ids = self.codec.encode_chat([{"role": "user", "content": prompt}])
        else:
            ids = self.codec.encode(prompt)
        return ids, self.codec.eos_token_ids

    def _generate(self, request):
        from jambatrt.engines.generate import Sampling, generate

        sender = request.get_response_sender()
        final = pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL
        try:
            params = _parameters(request)
            text = _input(request, "text_input", required=False)
            if text is not None and _input(request, "prompt_ids", required=False) is not None:
                raise _BadRequest("give exactly one of text_input (text) or prompt_ids (token ids), not both")
            if text is not None:
                prompt, eos = self._text_request(request, text, params)
                stream = params.get("stream", False)
            else:
                if _input(request, "prompt_ids", required=False) is None:
                    raise _BadRequest("give text_input (text) or prompt_ids (token ids)")
                prompt, eos, stream = self._ids(request, "prompt_ids", 1).tolist(), [], True
            n = params.get("max_new_tokens", params.get("max_tokens", _scalar(request, "max_new_tokens", 16, int)))
            if n < 0:
                raise _BadRequest(f"max_new_tokens={n} (accepted: >= 0)")
            if len(prompt) + n > self.max_tokens:
                raise _BadRequest(f"{len(prompt)} prompt + {n} new tokens exceed max_tokens {self.max_tokens}")
            eos_given = params.get("eos_id", _scalar(request, "eos_id", -1, int))
            if eos_given >= 0:
                eos = [eos_given]
            temperature = params.get("temperature", _scalar(request, "temperature", 0.0, float))
            top_p = params.get("top_p", _scalar(request, "top_p", 1.0, float))
            seed = params.get("seed", _scalar(request, "seed", 0, int))
            # the same rules whether a value came as an input tensor or as a request parameter
            for k, v in (("temperature", temperature), ("top_p", top_p), ("seed", seed)):
                if not _PARAMETERS[k][1](v):
                    raise _BadRequest(f"{k}={v!r} (accepted: {_PARAMETERS[k][2]})")
            sampling = Sampling(temperature, top_p, seed)
            pieces = self.codec.stream() if text is not None else None

            def on_token(_i, tok):
                if getattr(request, "is_cancelled", lambda: False)():
                    raise _Cancelled()
                if not stream:
                    return
                outputs = [pb_utils.Tensor("token_id", np.array([tok], np.int64))]
                if pieces is not None:
                    outputs.append(pb_utils.Tensor("text_output", np.array([pieces.step(tok).encode()], np.object_)))
                sender.send(pb_utils.InferenceResponse(outputs))

            gens, _ = generate(self.turns, [prompt], n, sampling, eos_id=eos, on_token=on_token)
            tail = pieces.finish() if stream and pieces is not None else ""
            if tail:                 # text held back at the end (bytes that never formed a character)
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([tail.encode()],
                                                                                               np.object_))]))
            if not stream:           # the whole text in one response (POST .../generate)
                whole = self.codec.decode(gens[0].generated_ids).encode()
                sender.send(pb_utils.InferenceResponse([pb_utils.Tensor("text_output", np.array([whole], np.object_))]))
            error = None
        except _Cancelled:
            error = None
        except self.user_errors as e:
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
