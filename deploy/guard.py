"""A request guard in front of tritonserver: every KServe v2 request is checked against the served
model's inputs and limits before tritonserver sees it, so one request cannot kill the server.

Why a separate front end, and not checks in the models: tritonserver allocates before any model
code runs. Its HTTP front end sizes an input buffer from the request's `shape` before it reads the
JSON `data` (shape [10^9, 10^9] with one element: std::bad_alloc, the server aborts; [1, 10^9]: 8 GB
zeroed, 22 s), an element count that overflows int64 aborts it with std::length_error, and over HTTP
or gRPC a shape whose element count wraps to 0 reaches the Python backend stub, which dies
("array is too big") and leaves the model unusable. None of that reaches our `execute()`.

So tritonserver listens on private loopback ports, and this guard listens where the user asked
(127.0.0.1 only), checks each request, forwards the good ones unchanged and answers the rest itself
(400, Triton's {"error": ...} body / gRPC INVALID_ARGUMENT):
- the model exists and the route is part of the inference protocol (health, metadata, config,
  stats, infer, generate, generate_stream; no repository control, no shared-memory registration);
- every input is known, given once, with the model's datatype and rank; every dim within the model's
  limits (token budget, batch, context) and the element count within the model's maximum, computed
  in Python integers (no overflow);
- the data holds exactly that many elements (JSON `data` leaves, `binary_data_size`, gRPC contents
  or raw_input_contents); no shared-memory inputs; no compressed bodies (a decompression bomb);
- text (the generate extension's `text_input`): one string, valid UTF-8 (raw bytes, and a JSON escape
  of a lone surrogate), not empty, within TEXT_BYTES_PER_TOKEN bytes per token of the budget; exactly
  one of text_input / prompt_ids; the generate `parameters` the model reads, each of its JSON type;
  `"stream": true` only on generate_stream;
- the body within what the largest valid request needs.

This file has two roles: in jambatrt, `repository_specs()` derives each model's limits from the
verified repository and the artifact's manifest; run as a script (`python guard.py`, in the serve env,
which has grpcio; no jambatrt import, so it starts in well under a second) it serves, reading the
specs as JSON on stdin. tritonserver's own checks stay in place behind it, and so do the models'.
"""

from __future__ import annotations

import json
import math
import re
import sys
import threading
from dataclasses import asdict, dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

ITEMSIZE = {"BOOL": 1, "INT8": 1, "UINT8": 1, "INT16": 2, "UINT16": 2, "FP16": 2, "BF16": 2, "INT32": 4,
            "UINT32": 4, "FP32": 4, "INT64": 8, "UINT64": 8, "FP64": 8}
KSERVE_DTYPES = {"float32": "FP32", "float16": "FP16", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32",
                 "int8": "INT8", "uint8": "UINT8", "bool": "BOOL"}
JSON_CHARS_PER_ELEMENT = 32        # the longest a JSON number of ours plausibly takes, separator included
JSON_CHARS_PER_BYTE = 6            # a text byte escaped in JSON (\u00XX) at worst
BODY_SLACK = 1 << 16               # names, parameters, whitespace
# Bytes of text per token a text input may carry: tokens of the vocabularies in use are far shorter,
# so a prompt over this many bytes per token of budget cannot fit the budget anyway; the model
# counts the real tokens after encoding.
TEXT_BYTES_PER_TOKEN = 64
# the generate extension's "parameters" the generate model reads, with their JSON types
GENERATE_PARAMETERS = {"max_new_tokens": int, "max_tokens": int, "temperature": float, "top_p": float, "seed": int,
                       "eos_id": int, "stream": bool, "chat": bool}


@dataclass(frozen=True)
class InputSpec:
    name: str
    datatype: str                   # KServe v2 name: INT64, FP32, ...
    dims: tuple                     # one (lo, hi) per dim of the request's shape
    max_elements: int
    optional: bool = False
    max_bytes: int = 0              # BYTES inputs: the longest element, in UTF-8 bytes


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple                   # InputSpec, in the model's order
    outputs: tuple                  # output names
    decoupled: bool = False
    one_of: tuple = ()              # inputs of which exactly one must be given (each optional alone)

    def max_body(self) -> int:
        return BODY_SLACK + sum(i.max_elements * (i.max_bytes * JSON_CHARS_PER_BYTE + 2 if i.datatype == "BYTES" else
                                                  max(JSON_CHARS_PER_ELEMENT, ITEMSIZE.get(i.datatype, 8)))
                                for i in self.inputs)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400):
        self.status = status
        super().__init__(message)


# ---- limits of the served models (runs in jambatrt) ------------------------------------------------
def repository_specs(repository) -> dict[str, ModelSpec]:
    """Each model of a (verified) jambatrt repository with the inputs and limits it accepts."""
    from pathlib import Path

    from jambatrt.deploy.repository import served_max_tokens, verify_repository
    from jambatrt.manifest import Manifest

    info = verify_repository(Path(repository))
    manifest = Manifest.read(info["artifact"])
    settings = info["settings"]
    T = served_max_tokens(manifest, settings.get("max_tokens"))
    prefix = settings["name"]
    specs = {}
    for name, kind in info["models"].items():
        if kind == "python":
            mode = name.removeprefix(f"{prefix}_")
            if mode == "prefill":        # [B, L]: the request's token budget covers the whole batch
                specs[name] = ModelSpec(name, (InputSpec("input_ids", "INT64", ((0, T), (0, T)), T),), ("logits",))
            elif mode == "sequence":     # max_batch_size = sequence_batch: [b, L] with b the batch dim
                b = settings["sequence_batch"]
                specs[name] = ModelSpec(name, (InputSpec("input_ids", "INT64", ((0, b), (0, T)), b * T),),
                                        ("logits", "next_token"))
            elif mode == "generate":
                one = ((1, 1),)
                specs[name] = ModelSpec(name, (
                    InputSpec("prompt_ids", "INT64", ((0, T),), T, True),
                    InputSpec("text_input", "BYTES", one, 1, True, max_bytes=T * TEXT_BYTES_PER_TOKEN),
                    InputSpec("max_new_tokens", "INT32", one, 1, True), InputSpec("eos_id", "INT64", one, 1, True),
                    InputSpec("temperature", "FP32", one, 1, True), InputSpec("top_p", "FP32", one, 1, True),
                    InputSpec("seed", "INT64", one, 1, True)), ("token_id", "text_output"), decoupled=True,
                    one_of=("prompt_ids", "text_input"))
        elif kind in ("ensemble", "tensorrt", "aoti"):
            # the sequence model's interface: the pipeline stages as one model (deploy --stages), the
            # single-engine GPU models (state kept on the server); max_batch_size = sequence_batch
            b = settings["sequence_batch"]
            specs[name] = ModelSpec(name, (InputSpec("input_ids", "INT64", ((0, b), (0, T)), b * T),),
                                    ("logits", "next_token"))
        elif kind == "node-ensemble":
            # a later node's entry (deploy --nodes): the previous node's NAME_hop sends the hidden states
            b, H = settings["sequence_batch"], manifest.config.hidden_size
            specs[name] = ModelSpec(name, (InputSpec("hidden_in", "FP32", ((0, b), (0, T), (H, H)), b * T * H),),
                                    ("logits", "next_token"))
        # kinds "stage", "hop": reached only through the ensemble; no spec, so the guard refuses direct requests
    return specs


def specs_to_json(specs: dict[str, ModelSpec]) -> str:
    return json.dumps({n: asdict(s) for n, s in specs.items()})


def specs_from_json(text: str) -> dict[str, ModelSpec]:
    out = {}
    for n, s in json.loads(text).items():
        inputs = tuple(InputSpec(i["name"], i["datatype"], tuple(tuple(d) for d in i["dims"]), i["max_elements"],
                                 i["optional"], i.get("max_bytes", 0)) for i in s["inputs"])
        out[n] = ModelSpec(s["name"], inputs, tuple(s["outputs"]), s["decoupled"], tuple(s.get("one_of", ())))
    return out


# ---- the checks (protocol-neutral) -------------------------------------------------------------------
def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def check_inputs(spec: ModelSpec, tensors: list[tuple[str, str, list]]) -> list[tuple[InputSpec, int]]:
    """tensors: (name, datatype, shape) as the request declares them -> (spec, element count) each.
    Refuses unknown/duplicate/missing inputs, another datatype or rank, a dim beyond its limit and
    an element count beyond the model's maximum."""
    by_name = {i.name: i for i in spec.inputs}
    seen, out = set(), []
    for name, datatype, shape in tensors:
        if not isinstance(name, str) or name not in by_name:
            raise BadRequest(f"{spec.name}: unknown input {name!r} (accepted: {', '.join(by_name)})")
        if name in seen:
            raise BadRequest(f"{spec.name}: input {name!r} given twice")
        seen.add(name)
        want = by_name[name]
        if datatype != want.datatype:
            raise BadRequest(f"{spec.name}: input {name!r} has data-type {datatype!r}; expected {want.datatype}")
        if not isinstance(shape, (list, tuple)) or not all(_is_int(d) for d in shape):
            raise BadRequest(f"{spec.name}: input {name!r}: shape {shape!r} is not a list of integers")
        if len(shape) != len(want.dims):
            raise BadRequest(f"{spec.name}: input {name!r} has shape {list(shape)}; expected {len(want.dims)} dims")
        for axis, (d, (lo, hi)) in enumerate(zip(shape, want.dims)):
            if not lo <= d <= hi:
                limit = "a fixed size" if lo == hi else "this model's limit: its max_tokens, batch or context"
                raise BadRequest(f"{spec.name}: input {name!r} has shape {list(shape)}: dim {axis} = {d} outside "
                                 f"[{lo}, {hi}] ({limit})")
        n = math.prod(shape)
        if n > want.max_elements:
            raise BadRequest(f"{spec.name}: input {name!r} has shape {list(shape)}: {n:,} elements exceed this "
                             f"model's {want.max_elements:,} (max_tokens per request)")
        out.append((want, n))
    missing = [i.name for i in spec.inputs if not i.optional and i.name not in seen]
    if missing:
        raise BadRequest(f"{spec.name}: missing input(s) {', '.join(map(repr, missing))}")
    if spec.one_of and len(seen & set(spec.one_of)) != 1:
        given = sorted(seen & set(spec.one_of))
        raise BadRequest(f"{spec.name}: give exactly one of {' or '.join(map(repr, spec.one_of))}"
                         + (f" (got {' and '.join(map(repr, given))})" if given else ""))
    return out


def check_text(spec: InputSpec, value) -> int:
    """A text element (JSON string, or bytes from gRPC) -> its UTF-8 length; refuses other types,
    invalid UTF-8 (a JSON escape of a lone surrogate is valid JSON and is not text), empty or
    whitespace-only text and text over the input's byte limit."""
    if isinstance(value, str):
        try:
            value = value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise BadRequest(f"input {spec.name!r} is not valid UTF-8 text (character {e.start}: {e.reason})") from None
    elif isinstance(value, bytes):
        try:
            value.decode("utf-8")
        except UnicodeDecodeError as e:
            raise BadRequest(f"input {spec.name!r} is not valid UTF-8 text (byte {e.start})") from None
    else:
        raise BadRequest(f"input {spec.name!r} is a {type(value).__name__}; expected a string")
    if not value.strip():
        raise BadRequest(f"input {spec.name!r} is empty text: give some text")
    if len(value) > spec.max_bytes:
        raise BadRequest(f"input {spec.name!r} holds {len(value):,} bytes of text, over this model's {spec.max_bytes:,} "
                         f"({TEXT_BYTES_PER_TOKEN} per token of max_tokens)")
    return len(value)


def check_generate_parameters(spec: ModelSpec, params) -> None:
    """The generate extension's 'parameters': an object of scalars; for a text-generating model the
    names it reads, each of its JSON type."""
    if not isinstance(params, dict) or any(isinstance(v, (list, dict)) for v in params.values()):
        raise BadRequest("request 'parameters' must be an object of scalar values")
    if not any(i.datatype == "BYTES" for i in spec.inputs):
        return
    for k, v in params.items():
        kind = GENERATE_PARAMETERS.get(k)
        if kind is None:
            raise BadRequest(f"{spec.name}: unknown parameter {k!r} (accepted: {', '.join(GENERATE_PARAMETERS)})")
        ok = isinstance(v, bool) if kind is bool else (
            isinstance(v, (int, float)) and not isinstance(v, bool) and (kind is float or float(v).is_integer()))
        if not ok:
            raise BadRequest(f"{spec.name}: parameter {k}={v!r} (accepted: {'true or false' if kind is bool else kind.__name__})")


def count_leaves(data, limit: int) -> int:
    """Elements of a (nested) JSON array, each a number or bool; stops past `limit` (no recursion)."""
    n, stack = 0, [data]
    while stack:
        v = stack.pop()
        if isinstance(v, list):
            stack.extend(v)
        elif isinstance(v, (int, float)):          # bool is an int
            n += 1
            if n > limit:
                return n
        else:
            raise BadRequest(f"'data' holds a {type(v).__name__} ({str(v)[:40]!r}); expected numbers")
    return n


def _depth(v) -> int:
    d = 0
    while isinstance(v, list):
        d += 1
        v = v[0] if v else None
    return d


def check_http_infer(spec: ModelSpec, header: dict, binary_len: int) -> None:
    """A KServe v2 /infer JSON header (+ `binary_len` bytes of binary data after it)."""
    if not isinstance(header, dict):
        raise BadRequest("request body is not a JSON object")
    inputs = header.get("inputs")
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest("'inputs' must be a non-empty list")
    if not all(isinstance(i, dict) for i in inputs):
        raise BadRequest("every entry of 'inputs' must be an object")
    checked = check_inputs(spec, [(i.get("name"), i.get("datatype"), i.get("shape")) for i in inputs])
    binary_total = 0
    for raw, (want, n) in zip(inputs, checked):
        params = raw.get("parameters", {})
        if not isinstance(params, dict) or set(params) - {"binary_data_size"}:
            raise BadRequest(f"input {want.name!r}: parameters {params!r} (accepted: binary_data_size only; "
                             "shared-memory inputs are not served)")
        if "binary_data_size" in params:
            size = params["binary_data_size"]
            if not _is_int(size) or size != n * ITEMSIZE[want.datatype]:
                raise BadRequest(f"input {want.name!r}: binary_data_size {size!r} for shape {raw['shape']} of "
                                 f"{want.datatype} (expected {n * ITEMSIZE[want.datatype]})")
            if "data" in raw:
                raise BadRequest(f"input {want.name!r}: both 'data' and binary_data_size")
            binary_total += size
        else:
            if "data" not in raw:
                raise BadRequest(f"input {want.name!r}: no 'data' and no binary_data_size")
            got = count_leaves(raw["data"], n)
            if got != n:
                raise BadRequest(f"input {want.name!r}: shape {raw['shape']} holds {n:,} elements, 'data' "
                                 f"{'more than ' + format(n, ',') if got > n else format(got, ',')}")
    if binary_total != binary_len:
        raise BadRequest(f"binary data of {binary_len:,} bytes after the JSON header; the inputs declare "
                         f"{binary_total:,}")
    outputs = header.get("outputs", [])
    if not isinstance(outputs, list):
        raise BadRequest("'outputs' must be a list")
    for o in outputs:
        if not isinstance(o, dict) or o.get("name") not in spec.outputs:
            raise BadRequest(f"requested output {o!r} (accepted: {', '.join(spec.outputs)})")
        params = o.get("parameters", {})
        if not isinstance(params, dict) or set(params) - {"binary_data"}:
            raise BadRequest(f"output {o['name']!r}: parameters {params!r} (accepted: binary_data only)")
    params = header.get("parameters", {})
    if not isinstance(params, dict) or any(isinstance(v, (list, dict)) for v in params.values()):
        raise BadRequest("request 'parameters' must be an object of scalar values")


def check_http_generate(spec: ModelSpec, body: dict, op: str = "generate_stream") -> None:
    """The generate extension's body: input name -> value (scalar or array), plus 'parameters'/'id'.
    `op`: generate (one response) or generate_stream; "stream": true asks for one response per token,
    which only generate_stream can carry."""
    if not isinstance(body, dict):
        raise BadRequest("request body is not a JSON object")
    by_name = {i.name: i for i in spec.inputs}
    tensors = []
    for k, v in body.items():
        if k in ("parameters", "id"):
            continue
        if k not in by_name:
            raise BadRequest(f"{spec.name}: unknown input {k!r} (accepted: {', '.join(by_name)})")
        want = by_name[k]
        if want.datatype == "BYTES":         # the generate extension's text: one string
            check_text(want, v)
            tensors.append((k, want.datatype, [1] * len(want.dims)))
            continue
        n = count_leaves(v, want.max_elements) if isinstance(v, list) else (1 if isinstance(v, (int, float)) else -1)
        if n < 0:
            raise BadRequest(f"{spec.name}: input {k!r} is a {type(v).__name__}; expected a number or an array")
        if n > want.max_elements or _depth(v) > len(want.dims):
            raise BadRequest(f"{spec.name}: input {k!r} holds {n:,} elements in {_depth(v)} dims (at most "
                             f"{want.max_elements:,} in {len(want.dims)}: max_tokens)")
        tensors.append((k, want.datatype, [n] + [1] * (len(want.dims) - 1)))
    check_inputs(spec, tensors)
    params = body.get("parameters", {})
    check_generate_parameters(spec, params)
    if op == "generate" and params.get("stream") is True:
        raise BadRequest(f"{spec.name}: parameter stream=true streams one response per token: POST "
                         "generate_stream (generate answers once, with the whole text)")


# ---- HTTP ------------------------------------------------------------------------------------------
_INFER = re.compile(r"^/v2/models/(?P<model>[^/]+)(?:/versions/[0-9]+)?/(?P<op>infer|generate|generate_stream)$")
_GET = re.compile(r"^/v2(?:/health/(?:live|ready)|/models/stats|/models/(?P<model>[^/]+)(?:/versions/[0-9]+)?"
                  r"(?:/ready|/config|/stats)?)?$")
_FORWARD_HEADERS = ("Content-Type", "Inference-Header-Content-Length", "Accept", "Accept-Encoding")


def _handler(specs: dict[str, ModelSpec], upstream: tuple[str, int], timeout: float):
    import http.client

    class Guard(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        server_version = "jambatrt-guard"

        def setup(self):
            super().setup()
            self.connection.settimeout(timeout)

        def log_message(self, *args):        # the server's log is tritonserver's; no line per request
            pass

        def _error(self, status: int, message: str, close: bool = False):
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            if close:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            path = self.path.split("?", 1)[0]
            m = _GET.match(path)
            if m is None:
                return self._error(404, f"{path}: not served here (the inference protocol only)")
            if m.group("model") is not None and m.group("model") not in specs:
                return self._error(400, f"Request for unknown model: '{m.group('model')}' is not found")
            self._forward("GET", None)

        def do_POST(self):
            path = self.path.split("?", 1)[0]
            m = _INFER.match(path)
            if m is None:
                self._drain()
                return self._error(404, f"POST {path}: not served here (infer, generate, generate_stream only)",
                                   close=True)
            spec = specs.get(m.group("model"))
            if spec is None:
                self._drain()
                return self._error(400, f"Request for unknown model: '{m.group('model')}' is not found", close=True)
            try:
                body = self._body(spec)
                if m.group("op") == "infer":
                    if spec.decoupled:
                        raise BadRequest(f"{spec.name} is decoupled: use generate_stream (or gRPC streaming)")
                    header_len = self.headers.get("Inference-Header-Content-Length")
                    if header_len is not None:
                        if not header_len.isdigit() or int(header_len) > len(body):
                            raise BadRequest(f"Inference-Header-Content-Length {header_len!r} (body is "
                                             f"{len(body)} bytes)")
                        h = int(header_len)
                        check_http_infer(spec, _json(body[:h]), len(body) - h)
                    else:
                        check_http_infer(spec, _json(body), 0)
                else:
                    check_http_generate(spec, _json(body), m.group("op"))
            except BadRequest as e:
                return self._error(e.status, str(e), close=e.status in (411, 413, 415))
            self._forward("POST", body)

        def _drain(self):
            self.close_connection = True

        def _body(self, spec: ModelSpec) -> bytes:
            if self.headers.get("Transfer-Encoding"):
                raise BadRequest("chunked request bodies are not accepted: send Content-Length", 411)
            enc = self.headers.get("Content-Encoding", "identity").strip().lower()
            if enc not in ("", "identity"):
                raise BadRequest(f"Content-Encoding {enc!r} is not accepted (send the body uncompressed)", 415)
            length = self.headers.get("Content-Length")
            if length is None or not length.isdigit():
                raise BadRequest(f"Content-Length {length!r}: required, a non-negative integer", 411)
            n, cap = int(length), spec.max_body()
            if n > cap:
                raise BadRequest(f"{spec.name}: body of {n:,} bytes exceeds the {cap:,} the largest valid request "
                                 "needs", 413)
            body = self.rfile.read(n)
            if len(body) != n:
                raise BadRequest(f"body ended after {len(body)} of {n} bytes")
            return body

        def _forward(self, method: str, body: bytes | None):
            # a fresh loopback connection per request: retrying on a kept-alive one that broke could
            # run a sequence step twice, and a connect on 127.0.0.1 costs ~0.1 ms
            headers = {k: self.headers[k] for k in _FORWARD_HEADERS if self.headers.get(k) is not None}
            upstream_conn = http.client.HTTPConnection(*upstream, timeout=timeout)
            try:
                try:
                    upstream_conn.request(method, self.path, body=body, headers=headers)
                    resp = upstream_conn.getresponse()
                except (ConnectionError, http.client.HTTPException, OSError):
                    return self._error(503, "the inference server is not reachable (stopping or down)", close=True)
                chunked = resp.getheader("Transfer-Encoding", "").lower() == "chunked"
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("transfer-encoding", "content-length", "connection", "server", "date"):
                        self.send_header(k, v)
                if chunked:                      # generate_stream: server-sent events, passed on as they come
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    while True:
                        piece = resp.read1(1 << 16)
                        if not piece:
                            break
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                        self.wfile.flush()
                    self.wfile.write(b"0\r\n\r\n")
                else:
                    data = resp.read()
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
            finally:
                upstream_conn.close()

    return Guard


def _json(raw: bytes):
    try:
        return json.loads(raw)
    except UnicodeDecodeError as e:
        raise BadRequest(f"request body is not valid UTF-8 (byte {e.start}): JSON text must be UTF-8") from None
    except ValueError as e:
        raise BadRequest(f"request body is not valid JSON ({str(e)[:120]})") from None
    except RecursionError:
        raise BadRequest("request body nests too deeply") from None


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 128


# ---- gRPC ------------------------------------------------------------------------------------------
_GRPC_SERVICE = "/inference.GRPCInferenceService/"
_GRPC_FORWARD = {"ServerLive", "ServerReady", "ModelReady", "ServerMetadata", "ModelMetadata", "ModelConfig",
                 "ModelStatistics", "ModelInfer"}
_CONTENTS = {"BOOL": "bool_contents", "INT8": "int_contents", "INT16": "int_contents", "INT32": "int_contents",
             "INT64": "int64_contents", "UINT8": "uint_contents", "UINT16": "uint_contents",
             "UINT32": "uint_contents", "UINT64": "uint64_contents", "FP32": "fp32_contents",
             "FP64": "fp64_contents"}


def check_grpc_infer(specs: dict[str, ModelSpec], req) -> None:
    """A ModelInferRequest (tritonclient.grpc.service_pb2)."""
    spec = specs.get(req.model_name)
    if spec is None:
        raise BadRequest(f"Request for unknown model: '{req.model_name}' is not found", 404)
    checked = check_inputs(spec, [(i.name, i.datatype, list(i.shape)) for i in req.inputs])
    raw = list(req.raw_input_contents)
    if raw and len(raw) != len(req.inputs):
        raise BadRequest(f"{len(raw)} raw_input_contents for {len(req.inputs)} inputs")
    for k, (inp, (want, n)) in enumerate(zip(req.inputs, checked)):
        if any(p.startswith("shared_memory") for p in inp.parameters):
            raise BadRequest(f"input {want.name!r}: shared-memory inputs are not served")
        if want.datatype == "BYTES":
            if raw:                  # each element: a 4-byte length, then its bytes
                if len(raw[k]) > n * (4 + want.max_bytes):
                    raise BadRequest(f"input {want.name!r}: {len(raw[k]):,} bytes, over this model's {want.max_bytes:,}")
            else:
                items = list(inp.contents.bytes_contents)
                if len(items) != n:
                    raise BadRequest(f"input {want.name!r}: shape {list(inp.shape)} holds {n:,} elements, contents {len(items):,}")
                for item in items:
                    check_text(want, item)
        elif raw:
            if len(raw[k]) != n * ITEMSIZE[want.datatype]:
                raise BadRequest(f"input {want.name!r}: {len(raw[k])} bytes for shape {list(inp.shape)} of "
                                 f"{want.datatype} (expected {n * ITEMSIZE[want.datatype]})")
        else:
            got = len(getattr(inp.contents, _CONTENTS.get(want.datatype, "bytes_contents")))
            if got != n:
                raise BadRequest(f"input {want.name!r}: shape {list(inp.shape)} holds {n:,} elements, contents {got:,}")
    for o in req.outputs:
        if o.name not in spec.outputs or any(p.startswith(("shared_memory", "classification")) for p in o.parameters):
            raise BadRequest(f"requested output {o.name!r} (accepted: {', '.join(spec.outputs)}, no shared memory)")


def _grpc_server(specs: dict[str, ModelSpec], upstream: str, listen: str, timeout: float):
    import queue
    from concurrent import futures

    import grpc
    from tritonclient.grpc import service_pb2

    max_msg = max([s.max_body() for s in specs.values()] + [1 << 20])
    opts = [("grpc.max_send_message_length", 2 ** 31 - 1), ("grpc.max_receive_message_length", min(max_msg, 2 ** 31 - 1))]
    channel = grpc.insecure_channel(upstream, options=opts)

    def metadata(context):
        return [(k, v) for k, v in context.invocation_metadata() if not k.startswith((":", "grpc-"))]

    def code_of(e: BadRequest):
        return grpc.StatusCode.NOT_FOUND if e.status == 404 else grpc.StatusCode.INVALID_ARGUMENT

    def unary(name):
        call = channel.unary_unary(_GRPC_SERVICE + name)

        def handle(raw: bytes, context):
            if name == "ModelInfer":
                try:
                    check_grpc_infer(specs, _parse(service_pb2.ModelInferRequest, raw))
                except BadRequest as e:
                    context.abort(code_of(e), str(e))
            elif name in ("ModelReady", "ModelMetadata", "ModelConfig"):
                req = _parse({"ModelReady": service_pb2.ModelReadyRequest, "ModelMetadata":
                              service_pb2.ModelMetadataRequest, "ModelConfig": service_pb2.ModelConfigRequest}[name], raw)
                if req.name not in specs:
                    context.abort(grpc.StatusCode.NOT_FOUND, f"Request for unknown model: '{req.name}' is not found")
            try:
                return call(raw, timeout=timeout, metadata=metadata(context))
            except grpc.RpcError as e:
                context.abort(e.code(), e.details() or "")
        return handle

    def stream(request_iterator, context):
        """ModelStreamInfer: a request that fails its checks gets an error response in the stream
        and is not forwarded; the others go through."""
        out = queue.Queue()
        done = object()

        def checked():
            for raw in request_iterator:
                req_id = ""
                try:
                    req = _parse(service_pb2.ModelInferRequest, raw)
                    req_id = req.id
                    check_grpc_infer(specs, req)
                except BadRequest as e:
                    out.put(service_pb2.ModelStreamInferResponse(
                        error_message=str(e),
                        infer_response=service_pb2.ModelInferResponse(id=req_id)).SerializeToString())
                    continue
                yield raw

        call = channel.stream_stream(_GRPC_SERVICE + "ModelStreamInfer")(checked(), timeout=None,
                                                                          metadata=metadata(context))

        def pump():
            try:
                for r in call:
                    out.put(r)
            except grpc.RpcError as e:
                out.put(e)
            finally:
                out.put(done)
        threading.Thread(target=pump, daemon=True).start()
        context.add_callback(call.cancel)
        while True:
            item = out.get()
            if item is done:
                return
            if isinstance(item, grpc.RpcError):
                if item.code() != grpc.StatusCode.CANCELLED:
                    context.abort(item.code(), item.details() or "")
                return
            yield item

    class Handler(grpc.GenericRpcHandler):
        def service(self, details):
            method = details.method
            if not method.startswith(_GRPC_SERVICE):
                return None
            name = method[len(_GRPC_SERVICE):]
            if name == "ModelStreamInfer":
                return grpc.stream_stream_rpc_method_handler(stream)
            if name in _GRPC_FORWARD:
                return grpc.unary_unary_rpc_method_handler(unary(name))

            def refuse(raw, context):
                context.abort(grpc.StatusCode.PERMISSION_DENIED, f"{name}: not served here (the inference "
                              "protocol only: no repository control, no shared memory)")
            return grpc.unary_unary_rpc_method_handler(refuse)

    server = grpc.server(futures.ThreadPoolExecutor(max_workers=16), options=opts, handlers=[Handler()])
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    return server


def _parse(cls, raw: bytes):
    try:
        return cls.FromString(raw)
    except Exception as e:  # noqa: BLE001 - protobuf's DecodeError and friends: the request is malformed
        raise BadRequest(f"malformed request ({type(e).__name__})") from None


# ---- the guard process -------------------------------------------------------------------------------
def serve(specs: dict[str, ModelSpec], http_listen: tuple[str, int], http_upstream: tuple[str, int],
          grpc_listen: str | None, grpc_upstream: str | None, timeout: float = 600.0) -> None:
    """Listen, print one 'ready' line, serve until SIGTERM / SIGINT."""
    import signal

    httpd = _HTTPServer(http_listen, _handler(specs, http_upstream, timeout))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.2}, daemon=True).start()
    grpcd = None
    if grpc_listen:
        grpcd = _grpc_server(specs, grpc_upstream, grpc_listen, timeout)
        grpcd.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print("ready", flush=True)
    stop.wait()
    httpd.shutdown()
    if grpcd is not None:
        grpcd.stop(grace=2).wait(5)


def main(argv=None) -> int:
    import argparse
    p = argparse.ArgumentParser(description="jambatrt's request guard in front of tritonserver (specs: JSON on stdin)")
    p.add_argument("--http", required=True, help="HOST:PORT to listen on")
    p.add_argument("--http-upstream", required=True, help="tritonserver's HTTP HOST:PORT")
    p.add_argument("--grpc", default=None, help="HOST:PORT to listen on for gRPC")
    p.add_argument("--grpc-upstream", default=None)
    p.add_argument("--timeout", type=float, default=600.0)
    a = p.parse_args(argv)

    def hostport(s):
        host, _, port = s.rpartition(":")
        return host, int(port)
    serve(specs_from_json(sys.stdin.readline()), hostport(a.http), hostport(a.http_upstream), a.grpc,
          a.grpc_upstream, a.timeout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
