"""Client helpers for a repository served by `jambatrt deploy --serve` (HTTP, 127.0.0.1 by default).

    c = JambaClient("127.0.0.1:8000")
    c.logits([[1, 2, 3]])                       # [1, 3, V] from NAME_prefill
    list(c.generate_stream([1, 2, 3], 8))      # tokens streamed from NAME_generate (SSE)
    c.generate_steps([1, 2, 3], 8, sequence_id=7)   # step by step through NAME_sequence (or model="aoti")
    "".join(c.generate_text_stream("Once upon", 32))  # text in, text streamed out (generate extension)
    c.generate_text("Hello", 32, chat=True)          # one response: the whole text

Needs `tritonclient[http]` (numpy 2 is fine for the client; only the server side needs numpy < 2).
The streaming call uses Triton's HTTP generate extension (server-sent events), which tritonclient's
HTTP client does not cover, through the standard library."""

from __future__ import annotations

import http.client
import json
import time
from collections.abc import Iterator

import numpy as np

from jambatrt.errors import BackendUnavailable, JambaTRTError


class InferenceError(JambaTRTError):
    """The server answered a request with an error (bad input, unknown sequence, model failure)."""

    def __init__(self, message: str, status: int | None = None):
        self.status = status
        super().__init__(message)


def _httpclient():
    try:
        import tritonclient.http as httpclient
    except ImportError:
        raise BackendUnavailable("tritonclient[http] is not installed (pip install 'tritonclient[http]', "
                                 "or `make serve-setup`)") from None
    return httpclient


class JambaClient:
    """One connection to the server; not thread-safe (use one client per thread)."""

    def __init__(self, url: str = "127.0.0.1:8000", name: str = "jamba", timeout: float = 120.0):
        self.url, self.name, self.timeout = url, name, timeout
        self._http = _httpclient()
        self.client = self._http.InferenceServerClient(url, connection_timeout=timeout, network_timeout=timeout)

    def close(self) -> None:
        self.client.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- health --------------------------------------------------------------------------------
    def _quiet(self, fn, *args) -> bool:
        try:
            return bool(fn(*args))
        except Exception:      # noqa: BLE001 - connection refused / reset: simply not live or ready
            return False

    def live(self) -> bool:
        return self._quiet(self.client.is_server_live)

    def ready(self) -> bool:
        return self._quiet(self.client.is_server_ready)

    def model_ready(self, kind: str) -> bool:
        """kind: prefill | sequence | generate | aoti | tensorrt (or a full model name)."""
        return self._quiet(self.client.is_model_ready, self._model(kind))

    def wait_ready(self, timeout: float = 60.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ready():
                return
            time.sleep(0.25)
        raise InferenceError(f"server {self.url} not ready after {timeout:.0f} s")

    def _model(self, kind: str) -> str:
        return kind if "_" in kind else f"{self.name}_{kind}"

    # ---- requests ------------------------------------------------------------------------------
    def _infer(self, model: str, arrays: dict[str, np.ndarray], outputs: list[str], **kw):
        inputs = []
        for name, a in arrays.items():
            dtype = {np.dtype(np.int64): "INT64", np.dtype(np.int32): "INT32", np.dtype(np.float32): "FP32",
                     np.dtype(np.float64): "FP64"}.get(a.dtype)
            if dtype is None:
                raise InferenceError(f"input {name}: dtype {a.dtype} (this client sends int64, int32, float32, float64)")
            t = self._http.InferInput(name, list(a.shape), dtype)
            t.set_data_from_numpy(a, binary_data=True)
            inputs.append(t)
        try:
            res = self.client.infer(model, inputs, outputs=[self._http.InferRequestedOutput(o, binary_data=True)
                                                            for o in outputs], **kw)
        except Exception as e:       # tritonclient.utils.InferenceServerException, connection errors
            raise InferenceError(f"{model}: {_message(e)}", getattr(e, "status", lambda: None)()) from None
        return [res.as_numpy(o) for o in outputs]

    def logits(self, ids, dtype=np.int64) -> np.ndarray:
        """ids [B,L] (or [L]) -> logits [B,L,V] float32 from the stateless prefill model."""
        a = np.asarray(ids, dtype=dtype)
        a = a[None] if a.ndim == 1 else a
        return self._infer(self._model("prefill"), {"input_ids": a}, ["logits"])[0]

    def step(self, sequence_id: int, ids, start: bool = False, end: bool = False,
             model: str = "sequence") -> tuple[np.ndarray, int]:
        """Feed ids (the prompt after start, then one token at a time) to sequence `sequence_id`;
        returns (logits [V] of the last token, the greedy next token). model: any model with the
        sequence interface -- sequence (NAME_sequence, the stage ensemble too), aoti, tensorrt."""
        a = np.asarray(ids, dtype=np.int64).reshape(1, -1)
        logits, nxt = self._infer(self._model(model), {"input_ids": a}, ["logits", "next_token"],
                                  sequence_id=int(sequence_id), sequence_start=start, sequence_end=end)
        return logits[0], int(nxt.reshape(-1)[0])

    def generate_steps(self, prompt: list[int], max_new_tokens: int, sequence_id: int,
                       eos_id: int | None = None, model: str = "sequence") -> list[int]:
        """Greedy generation, one request per token on a sequence model (see step); ends the sequence."""
        out: list[int] = []
        if max_new_tokens <= 0:
            return out
        _, tok = self.step(sequence_id, prompt, start=True, end=max_new_tokens == 1, model=model)
        out.append(tok)
        while len(out) < max_new_tokens:
            done = eos_id is not None and tok == eos_id
            last = done or len(out) == max_new_tokens - 1
            _, nxt = self.step(sequence_id, [tok], end=last, model=model)
            if done:
                break
            tok = nxt
            out.append(tok)
        return out

    def generate_stream(self, prompt: list[int], max_new_tokens: int = 16, eos_id: int | None = None,
                        temperature: float = 0.0, top_p: float = 1.0, seed: int = 0) -> Iterator[int]:
        """Tokens as the decoupled generate model streams them (HTTP generate_stream, SSE)."""
        body = {"prompt_ids": [int(t) for t in prompt], "max_new_tokens": int(max_new_tokens),
                "temperature": float(temperature), "top_p": float(top_p), "seed": int(seed)}
        if eos_id is not None:
            body["eos_id"] = int(eos_id)
        for event in self._events("generate_stream", body):
            tok = event.get("token_id")
            if tok is not None:
                yield int(tok[0] if isinstance(tok, list) else tok)

    def _events(self, route: str, body: dict) -> Iterator[dict]:
        """POST the generate extension's JSON to NAME_generate/<route>; -> each response as a dict (the
        events of generate_stream, the one answer of generate). An error event raises InferenceError."""
        host, _, port = self.url.rpartition(":")
        conn = http.client.HTTPConnection(host, int(port), timeout=self.timeout)
        model = self._model("generate")
        try:
            conn.request("POST", f"/v2/models/{model}/{route}", json.dumps(body),
                         {"Content-Type": "application/json", "Accept": "text/event-stream"})
            resp = conn.getresponse()
            if resp.status != 200:
                raise InferenceError(f"{model}: HTTP {resp.status}: {resp.read().decode(errors='replace')}",
                                     resp.status)
            if route == "generate":
                event = json.loads(resp.read())
                if "error" in event:
                    raise InferenceError(f"{model}: {event['error']}")
                yield event
                return
            for raw in resp:
                line = raw.decode().strip()
                if not line.startswith("data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    raise InferenceError(f"{model}: {event['error']}")
                yield event
        finally:
            conn.close()

    @staticmethod
    def _text_body(text: str, max_new_tokens: int, temperature: float, top_p: float, seed: int, chat: bool,
                   stream: bool) -> dict:
        return {"text_input": text, "parameters": {"max_new_tokens": int(max_new_tokens), "temperature": float(temperature),
                                                   "top_p": float(top_p), "seed": int(seed), "chat": bool(chat),
                                                   "stream": stream}}

    def generate_text_stream(self, text: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                             seed: int = 0, chat: bool = False) -> Iterator[str]:
        """Decoded text as it is generated (HTTP generate_stream, SSE): the server's tokenizer encodes
        `text` (as a user message through its chat template with chat=True) and it stops at the model's
        EOS ids. Joined, the pieces are the whole text."""
        for event in self._events("generate_stream", self._text_body(text, max_new_tokens, temperature, top_p,
                                                                     seed, chat, True)):
            piece = event.get("text_output")
            if piece is not None:
                yield piece[0] if isinstance(piece, list) else piece

    def generate_text(self, text: str, max_new_tokens: int = 32, temperature: float = 0.0, top_p: float = 1.0,
                      seed: int = 0, chat: bool = False) -> str:
        """The whole generated text in one response (HTTP generate)."""
        body = self._text_body(text, max_new_tokens, temperature, top_p, seed, chat, False)
        return "".join(e["text_output"][0] if isinstance(e.get("text_output"), list) else e.get("text_output", "")
                       for e in self._events("generate", body))

    def generate(self, prompt: list[int], max_new_tokens: int = 16, **kw) -> list[int]:
        return list(self.generate_stream(prompt, max_new_tokens, **kw))


def _message(e: Exception) -> str:
    msg = getattr(e, "message", None)
    return (msg() if callable(msg) else None) or str(e)
