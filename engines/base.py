"""One interface for every engine (ONNX Runtime, TensorRT, ...), Polygraphy-runner style:
build once into the artifact (`engines/<backend>/`), load, then prefill / decode.

Arrays are numpy. State is the flat list of `jambatrt.export.model.state_shapes` (Mamba:
conv_state [B,D,K-1], ssm_state [B,D,N] fp32; attention: k, v [B,P,Hkv,d])."""

from __future__ import annotations

import abc
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from jambatrt.artifact import add_files, atomic_dir, atomic_file, read_manifest, record_files, verify_files
from jambatrt.errors import ArtifactError, InputError
from jambatrt.manifest import Manifest, Program


LOGITS_CHUNK_BYTES = 256 << 20      # float32 logits per prefill chunk (default_chunk)
ACTIVATION_CHUNK_BYTES = 64 << 20   # a prefill chunk's largest other float32 activation (default_chunk)


def default_chunk(cfg, batch: int) -> int:
    """Engine.default_chunk for a JambaConfig."""
    from jambatrt.export.plan import chunk_activation_elements
    logits, other = chunk_activation_elements(cfg, batch, 1)     # per token of the chunk
    fit = min(LOGITS_CHUNK_BYTES // (4 * logits), ACTIVATION_CHUNK_BYTES // (4 * other)) // 256 * 256
    return int(min(16384, max(512, fit)))


class Engine(abc.ABC):
    backend: str = ""              # its entry in the manifest's engines
    build_options: str = ""        # how `jambatrt build` makes it (default: --backend <backend>)

    def __init__(self, artifact: str | Path, manifest: Manifest | dict | None = None):
        self.artifact = Path(artifact)
        self.manifest = Manifest.of(self.artifact, manifest)
        self.config = self.manifest.config
        self.entry = self.manifest.engine(self.backend, self.build_options or None)

    # ---- building ------------------------------------------------------------------------------
    Settings: ClassVar[type]       # the build settings: a frozen dataclass with `from_kwargs(**kw)`
    output: ClassVar[str]          # what the build writes, relative to the artifact: a file or a folder
    reads_onnx: ClassVar[bool] = True   # the build reads model.onnx (else the step program step.pt2)

    @classmethod
    def build(cls, artifact: str | Path, **settings) -> dict:
        """Write the engine into the artifact and record it in the manifest; returns its entry.
        The start and end every backend shares: settings checked (an unknown one is refused), the
        step program the backend reads present, the artifact's files verified before any work;
        `_prepare` then refuses what the backend cannot build (before anything is written) and
        `_build` writes into a temp file or folder that replaces `output` only once whole (the old
        engine stays until then); the entry (with build_seconds) and the written files are
        recorded in the manifest as it is then (another build may have recorded its engine
        meanwhile)."""
        s = cls.Settings.from_kwargs(**settings)
        artifact = Path(artifact)
        manifest = Manifest.read(artifact)
        if cls.reads_onnx and not manifest.step.onnx:
            raise ArtifactError(f"{artifact}: the artifact has no model.onnx (re-run `jambatrt export`)")
        # refuse tampered or incomplete inputs before any work; not the engine this build replaces, which a
        # user rebuilds precisely when it is missing or damaged
        verify_files(artifact, manifest.raw, exclude=cls.output)
        t0 = time.perf_counter()
        prepared = cls._prepare(artifact, manifest, s)
        out = artifact / cls.output
        # a folder (atomic_dir) or a file (atomic_file) that becomes `output` once whole
        with (atomic_file(out) if Path(cls.output).suffix else atomic_dir(out, force=True)) as tmp:
            entry = cls._build(artifact, manifest, s, prepared, tmp)
        entry["build_seconds"] = round(time.perf_counter() - t0, 3)
        raw = read_manifest(artifact)
        raw.setdefault("engines", {})[cls.backend] = entry
        if out.is_dir():
            add_files(artifact, raw, cls.output)
        else:
            record_files(artifact, raw, [cls.output])
        return entry

    @classmethod
    def _prepare(cls, artifact: Path, manifest: Manifest, settings: Any) -> Any:
        """The checks and plans that need nothing written (InputError / BackendUnavailable for what
        this backend cannot build); what it returns goes to `_build`."""
        return None

    @classmethod
    def _build(cls, artifact: Path, manifest: Manifest, settings: Any, prepared: Any, out: Path) -> dict:
        """Write the engine into `out` (a temp file or folder standing for `output`); returns the
        manifest entry, its paths as they will be once `out` is `output`. (engines/staged.py, which
        writes one file per stage, overrides `build` itself.)"""
        raise NotImplementedError(f"{cls.__name__} builds through its own `build`")

    @classmethod
    def load(cls, artifact: str | Path, verify: bool = True) -> "Engine":
        manifest = read_manifest(artifact)
        if verify:
            verify_files(artifact, manifest)
        return cls(artifact, Manifest(Path(artifact), manifest))

    # ---- running -------------------------------------------------------------------------------
    @abc.abstractmethod
    def run_step(self, input_ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """One call of the step program: ids [B,L] + state (P past tokens) -> logits [B,L,V], state."""

    @property
    def step_program(self) -> Program:
        return self.manifest.step

    @property
    def max_seq(self) -> int:
        return self.manifest.max_seq

    def zero_state(self, batch: int) -> list[np.ndarray]:
        """The state before any token: zeros for Mamba, empty (P = 0) KV for attention."""
        out = []
        for spec in self.step_program.state:
            out.append(np.zeros(spec.zero_shape(batch), dtype=_np_dtype(spec.dtype)))
        return out

    def check_state(self, state: list, batch: int) -> int:
        """Returns the number of past tokens P; InputError when the state is not this model's.
        numpy arrays or torch tensors (deploy/aoti_model.py checks the server's tensors here)."""
        specs = self.step_program.state
        if not isinstance(state, (list, tuple)) or len(state) != len(specs):
            raise InputError(f"state has {len(state) if isinstance(state, (list, tuple)) else type(state).__name__} "
                             f"tensors; this model's state has {len(specs)} ({specs[0].name}, ...): "
                             "a state from another model or config?")
        past = None
        for spec, t in zip(specs, state):
            want = spec.shape
            if t.ndim != len(want) or t.shape[0] != batch or any(
                    isinstance(w, int) and w != g for w, g in zip(want, t.shape)):
                raise InputError(f"state tensor {spec.name} has shape {list(t.shape)}, expected "
                                 f"{[batch if w == 'batch' else w for w in want]}: a state from another model, "
                                 "config or batch?")
            if dtype_name(t) != spec.dtype:
                raise InputError(f"state tensor {spec.name} has dtype {t.dtype}, expected {spec.dtype}")
            if "past" in want:
                p = t.shape[want.index("past")]
                if past is not None and p != past:
                    raise InputError(f"state tensor {spec.name} holds {p} past tokens, others {past}")
                past = p
        return past or 0

    def prefill(self, input_ids, state: list[np.ndarray] | None = None, chunk: int | None = None,
                last_only: bool = False) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids [B,L] (+ optional incoming state) -> (logits [B,L,V] or [B,V] if last_only,
        new state). Runs in chunks of `chunk` tokens (default: the engine's plan), state carried."""
        ids = self.check_ids(input_ids)
        B, L = ids.shape
        state = self.zero_state(B) if state is None else list(state)
        past = self.check_state(state, B)
        if past + L > self.max_seq:
            raise InputError(f"context {past} + {L} = {past + L} tokens exceeds the maximum {self.max_seq}")
        chunk = chunk or self.default_chunk(B)
        outs = []
        step = self.run_step_last if last_only else self.run_step
        for s in range(0, L, chunk):
            logits, state = step(ids[:, s:s + chunk], state)
            outs.append(logits[:, -1] if last_only else logits)
        return (outs[-1] if last_only else np.concatenate(outs, axis=1) if len(outs) > 1 else outs[0]), state

    @property
    def compute_dtype(self) -> str:
        """The precision its results are validated at (validate/parity.py TOLERANCES): the artifact's
        dtype, or an engine's lower one (the ORT engine's --prefill-compute bfloat16)."""
        return self.manifest.dtype

    def run_step_last(self, input_ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """run_step whose logits need hold only the last position ([B,1,V] or more): an engine that can
        skip the output layer for the others overrides it."""
        return self.run_step(input_ids, state)

    def prefill_with_state(self, input_ids) -> tuple[np.ndarray, dict, list]:
        """The reference interface (validate/reference.py `Reference.prefill_with_state`), so one
        runner compares engines and references: -> (logits [B,L,V], {step output name: final
        state}, no per-layer health)."""
        logits, state = self.prefill(input_ids)
        return logits, dict(zip((o.name for o in self.step_program.outputs[1:]), state)), []

    def decode(self, token_ids, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """token_ids [B] + state -> (logits [B,V], new state)."""
        ids = self.check_ids(np.asarray(token_ids).reshape(-1, 1))
        past = self.check_state(state, ids.shape[0])
        if past + 1 > self.max_seq:
            raise InputError(f"context {past} + 1 tokens exceeds the maximum {self.max_seq}")
        logits, state = self.run_step(ids, list(state))
        return logits[:, -1], state

    def prefill_last(self, input_ids) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids [B,L] from the empty state -> (the last position's logits [B,V], state): what
        generation and `profile` run; the eager reference has the same method (validate/reference.py)."""
        return self.prefill(input_ids, last_only=True)

    def cut_past(self, state: list, keep: int) -> list:
        return cut_past(self.step_program.state, state, keep)

    def default_chunk(self, batch: int) -> int:
        """Tokens per prefill run: up to 16384, fewer (a multiple of 256, at least 512) where a chunk's
        float32 logits [batch, chunk, vocab] would pass LOGITS_CHUNK_BYTES: a step computes the logits of
        every position, and with a 32000-token vocab they dominated the prefill's peak memory. ORT
        engine, int8 peer preset, 8192 tokens: chunk 2048 instead of 8192 peaks at 2.84 instead of
        3.82 GB, at 226 instead of 215 tokens/s. Likewise the chunk's largest other activation (export/plan.py
        `activation_tensors`: the MoE rows' gate/up, the Mamba in_proj output, ...) within
        ACTIVATION_CHUNK_BYTES: int8 peer preset, 8192 tokens, last position's logits only, chunk 1280
        (what this gives) instead of 2048 peaks at 1.38 instead of 1.54 GB (1024: 1.32), at the same speed
        (interleaved, 4096 tokens, 1024 against 2048: -1.3% int8, +4% float32)."""
        return default_chunk(self.config, batch)

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ---- shared input checks ---------------------------------------------------------------------
    def check_ids(self, input_ids) -> np.ndarray:
        ids = np.asarray(input_ids)
        if ids.ndim != 2 or ids.shape[0] < 1 or ids.shape[1] < 1:
            raise InputError(f"input_ids shape {list(ids.shape)} (accepted: [batch >= 1, length >= 1]; "
                             "an empty prompt has nothing to prefill)")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids dtype {ids.dtype} (accepted: integer token ids)")
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise InputError(f"token id {int(ids.max() if ids.max() >= V else ids.min())} out of range "
                             f"(accepted: 0 .. {V - 1})")
        if ids.shape[1] > self.max_seq:
            raise InputError(f"sequence length {ids.shape[1]} exceeds the maximum {self.max_seq}")
        return ids.astype(np.int64, copy=False)


def settings_from_kwargs(cls, backend: str, kw: dict):
    """A build-settings dataclass from keyword options: None keeps a default, unknown names are refused."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(kw) - names)
    if unknown:
        raise InputError(f"unknown {backend} setting(s) {', '.join(unknown)} (accepted: {', '.join(sorted(names))})")
    return cls(**{k: v for k, v in kw.items() if v is not None})


def cut_past(specs, state: list, keep: int) -> list:
    """The state (arrays or tensors, in the order of the step program's state `specs`) with only the
    first `keep` past tokens of its KV; the Mamba state as it is."""
    return [t[:, :keep] if "past" in s.shape else t for s, t in zip(specs, state)]


def dtype_name(t) -> str:
    """A numpy array's or torch tensor's dtype as the step program names it ("bfloat16", "int64")."""
    return _dtype_name(t.dtype)


@functools.cache
def _dtype_name(dtype) -> str:     # str(dtype) costs ~5 us, and a decode step checks every state tensor's
    return str(dtype).removeprefix("torch.")


def to_torch(a: np.ndarray, device: str = "cpu"):
    """numpy -> a torch tensor on `device` (bfloat16 through its int16 bits; read-only arrays, such
    as a server's buffers, copied: torch.from_numpy warns on them)."""
    import torch
    a = np.ascontiguousarray(a)
    if not a.flags.writeable:
        a = a.copy()
    t = torch.from_numpy(a.view(np.int16)).view(torch.bfloat16) if a.dtype == _np_dtype("bfloat16") \
        else torch.from_numpy(a)
    return t.to(device) if device != "cpu" else t


def to_numpy(t) -> np.ndarray:
    """A torch tensor (any device) -> numpy on the host (bfloat16 as ml_dtypes.bfloat16)."""
    import torch
    t = t.detach().contiguous()
    if t.dtype == torch.bfloat16:
        return t.view(torch.int16).cpu().numpy().view(_np_dtype("bfloat16"))
    return t.cpu().numpy()


def _np_dtype(name: str):
    if name == "bfloat16":
        import ml_dtypes
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(name)

