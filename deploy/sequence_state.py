"""Per-sequence state kept inside a Triton model, keyed by correlation id.

Every model that keeps a sequence's state on the server uses this: NAME_sequence (deploy/triton_model.py),
each pipeline stage NAME_stage{k} (deploy/stage_model.py) and the single-engine GPU models NAME_aoti /
NAME_tensorrt (deploy/engine_model.py). The state itself is whatever the model runs on (numpy arrays,
torch tensors on the model's device); this module only decides which state a request runs on and what
is kept afterwards:
  START   the sequence begins from the zero state (a state left under the same id is dropped)
  END     the state is dropped after the request, whether it succeeded or not
  else    the request runs on the state the sequence's previous request left; a sequence whose state
          is unknown (never started, idle longer than idle_seconds, evicted) is refused
A request that fails leaves the sequence's state as it was (it may be retried). At most
max_sequences states are kept; beyond that the least recently used goes first.

`sequence_batching(settings)` is the config.pbtxt block the models share: Triton's sequence batcher
hands each model instance the correlation id and the START/END flags as control inputs."""

from __future__ import annotations

import time
from collections import OrderedDict
from typing import Any, Callable

from jambatrt.errors import InputError


class SequenceStates:
    """correlation id -> (state, past tokens, last use); not thread-safe (one per model instance)."""

    def __init__(self, idle_seconds: float, max_sequences: int, max_tokens: int):
        self.idle_seconds, self.max_sequences, self.max_tokens = float(idle_seconds), int(max_sequences), int(max_tokens)
        self._states: OrderedDict = OrderedDict()

    def __len__(self) -> int:
        return len(self._states)

    def __contains__(self, corrid) -> bool:
        return corrid in self._states

    def clear(self) -> None:
        self._states.clear()

    def step(self, corrid, start: bool, end: bool, n_tokens: int, zero_state: Callable[[], Any],
             run: Callable[[Any], tuple[Any, Any]]):
        """Run one request of `n_tokens` tokens of sequence `corrid`: run(state) -> (output, new state).
        Returns the output; InputError for an unknown sequence or one past max_tokens."""
        now = time.monotonic()
        for cid in [c for c, (_, _, t) in self._states.items() if now - t > self.idle_seconds]:
            del self._states[cid]
        try:
            if start:
                self._states.pop(corrid, None)
                state, past = zero_state(), 0
            elif corrid in self._states:
                state, past, _ = self._states[corrid]
            else:
                raise InputError(f"unknown sequence id {corrid} (its state expired after {self.idle_seconds:g} s "
                                 "idle, was evicted, or it never started): send START first")
            if past + n_tokens > self.max_tokens:
                raise InputError(f"sequence {corrid}: {past} + {n_tokens} tokens exceed max_tokens {self.max_tokens}")
            out, state = run(state)
            if not end:
                self._states[corrid] = (state, past + n_tokens, now)
                self._states.move_to_end(corrid)
                while len(self._states) > self.max_sequences:
                    self._states.popitem(last=False)
        finally:
            if end:
                self._states.pop(corrid, None)
        return out


def sequence_controls(request, pb_utils) -> tuple[int, bool, bool]:
    """(correlation id, START, END) of a request from the sequence batcher's control inputs."""
    def control(name):
        t = pb_utils.get_input_tensor_by_name(request, name)
        return None if t is None else t.as_numpy().reshape(-1)[0].item()

    corrid = control("CORRID")
    return (request.correlation_id() if corrid is None else corrid), bool(control("START")), bool(control("END"))


def sequence_batching(settings) -> dict:
    """config.pbtxt `sequence_batching` for a model that keeps state per correlation id."""
    from jambatrt.deploy.repository import Enum

    def flag(name, kind):
        return {"name": name, "control": [{"kind": Enum(kind), "int32_false_true": [0, 1]}]}

    return {
        # Triton forgets a sequence idle this long; the model drops its state on the same clock
        "max_sequence_idle_microseconds": int(settings.idle_seconds * 1e6),
        # "oldest": any number of live sequences (up to max_candidate_sequences) share the instance;
        # "direct" would give each sequence a batch slot and make further sequences wait
        "oldest": {"max_candidate_sequences": settings.max_sequences, "max_queue_delay_microseconds": 0},
        "control_input": [
            flag("START", "CONTROL_SEQUENCE_START"), flag("END", "CONTROL_SEQUENCE_END"),
            flag("READY", "CONTROL_SEQUENCE_READY"),
            {"name": "CORRID", "control": [{"kind": Enum("CONTROL_SEQUENCE_CORRID"), "data_type": Enum("TYPE_UINT64")}]},
        ]}
