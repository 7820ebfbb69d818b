"""NAME_hop: the cross-server hop of a pipeline split over several Triton servers (`jambatrt deploy
--stages --nodes N --node K --next-node HOST:PORT`; deploy/stages_repository.py, docs/multinode.md).

This file has two roles:
- in jambatrt: `check_address()` checks a --next-node address when the repository is written;
- inside the Python backend stub (copied verbatim to `NAME_hop/1/model.py` on every node but the last):
  the last step of the node's ensemble. It takes the hidden states [1,L,H] of the node's last stage
  and sends them to the next node's entry model (NAME_node{K+1}) over gRPC, with the request's
  correlation id and START/END flags, so every stage downstream keeps its layers' state per sequence
  just as on one server; it returns that model's logits [1,V] and next_token [1,1].

The Python backend's own BLS (`pb_utils.InferenceRequest`) reaches only models of the same server, so
the hop is a tritonclient call from inside the model. Every request gets a response within
timeout_seconds: the next node's error (bad input, unknown sequence), an unreachable or dead node
and a node that does not answer in time all come back as an error response naming the node, never
as a hang. The hop keeps no state. A request that fails downstream has already advanced this node's
stages; the client starts the sequence again (START), as after any failed request of an ensemble.

config.pbtxt parameters:
  next_node         HOST:PORT of the next node's gRPC endpoint (its request guard)
  next_model        the model called there (NAME_node{K+1})
  timeout_seconds   how long one request may wait for the next node's answer"""

import json

RECONNECT_BACKOFF_MS = 1000     # a restarted next node is reached again within about a second


def check_address(address, what: str = "address") -> str:
    """HOST:PORT (a gRPC endpoint, no scheme) -> itself; InputError naming what is accepted."""
    from jambatrt.errors import InputError

    host, sep, port = str(address or "").rpartition(":")
    ok = (sep and host and "/" not in address and " " not in address and port.isdigit()
          and 1 <= int(port) <= 65535)
    if not ok:
        raise InputError(f"{what}: {'not given' if address is None else repr(address)} (accepted: HOST:PORT, e.g. 10.0.0.2:8001 -- the next node's gRPC "
                         "port, no scheme)")
    return address


class TritonPythonModel:
    def initialize(self, args):
        import tritonclient.grpc as grpcclient
        import triton_python_backend_utils as pb_utils  # exists only inside the backend stub

        from jambatrt.deploy.sequence_state import sequence_controls

        self.pb_utils, self.grpc, self.sequence_controls = pb_utils, grpcclient, sequence_controls
        cfg = json.loads(args["model_config"])
        params = {k: v.get("string_value", "") for k, v in cfg.get("parameters", {}).items()}
        self.name = cfg.get("name", "")
        self.url = check_address(params["next_node"], "next_node")
        self.model = params["next_model"]
        self.timeout = float(params["timeout_seconds"])
        big = 2 ** 31 - 1        # a prefill chunk's hidden states are far over gRPC's 4 MB default
        self.client = grpcclient.InferenceServerClient(self.url, channel_args=[
            ("grpc.max_send_message_length", big), ("grpc.max_receive_message_length", big),
            ("grpc.initial_reconnect_backoff_ms", RECONNECT_BACKOFF_MS),
            ("grpc.max_reconnect_backoff_ms", RECONNECT_BACKOFF_MS)])

    def finalize(self):
        self.client.close()

    def execute(self, requests):
        return [self._forward(r) for r in requests]

    def _error(self, msg: str, code: str = "INTERNAL"):
        e = self.pb_utils.TritonError
        code = getattr(e, code, None)
        return self.pb_utils.InferenceResponse(error=e(msg) if code is None else e(msg, code))

    def _forward(self, request):
        pb = self.pb_utils
        try:
            corrid, start, end = self.sequence_controls(request, pb)
            hidden = pb.get_input_tensor_by_name(request, "hidden_in").as_numpy()
            inp = self.grpc.InferInput("hidden_in", list(hidden.shape), "FP32")
            inp.set_data_from_numpy(hidden)
            outputs = [self.grpc.InferRequestedOutput(o) for o in ("logits", "next_token")]
            res = self.client.infer(self.model, [inp], outputs=outputs, sequence_id=int(corrid),
                                    sequence_start=start, sequence_end=end, client_timeout=self.timeout)
        except Exception as e:     # noqa: BLE001 - every failure is this request's error response
            status = str(getattr(e, "status", lambda: "")() or "")
            msg = getattr(e, "message", lambda: str(e))() or type(e).__name__
            if "DEADLINE_EXCEEDED" in status:
                msg = f"no answer within {self.timeout:g} s"
            code = ("INVALID_ARG" if "INVALID_ARGUMENT" in status else
                    "UNAVAILABLE" if "UNAVAILABLE" in status or "DEADLINE" in status else "INTERNAL")
            return self._error(f"{self.name}: next node {self.url} ({self.model}): {msg}", code)
        return pb.InferenceResponse([pb.Tensor("logits", res.as_numpy("logits")),
                                     pb.Tensor("next_token", res.as_numpy("next_token"))])
