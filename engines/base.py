"""One interface for every engine (ONNX Runtime, TensorRT, ...), Polygraphy-runner style:
build once into the artifact (`engines/<backend>/`), load, then prefill / decode.

Arrays are numpy. State is the flat list of `jambatrt.export.model.state_shapes` (Mamba:
conv_state [B,D,K-1], ssm_state [B,D,N] fp32; attention: k, v [B,P,Hkv,d])."""

from __future__ import annotations

import abc
from pathlib import Path

import numpy as np

from jambatrt.artifact import read_manifest, verify_files
from jambatrt.config import JambaConfig
from jambatrt.errors import ArtifactError, InputError


class Engine(abc.ABC):
    backend: str = ""

    def __init__(self, artifact: str | Path, manifest: dict | None = None):
        self.artifact = Path(artifact)
        self.manifest = manifest or read_manifest(self.artifact)
        self.config = JambaConfig.from_hf_dict(self.manifest["config"], source=str(self.artifact / "manifest.json"))
        if self.backend not in self.manifest.get("engines", {}):
            raise ArtifactError(f"{self.artifact}: no {self.backend!r} engine built "
                                f"(run `jambatrt build {self.artifact} --backend {self.backend}`)")

    # ---- building ------------------------------------------------------------------------------
    @classmethod
    @abc.abstractmethod
    def build(cls, artifact: str | Path, **settings) -> dict:
        """Write engines/<backend>/ into the artifact and record it in the manifest; returns the entry."""

    @classmethod
    def load(cls, artifact: str | Path, verify: bool = True) -> "Engine":
        manifest = read_manifest(artifact)
        if verify:
            verify_files(artifact, manifest)
        return cls(artifact, manifest)

    # ---- running -------------------------------------------------------------------------------
    @abc.abstractmethod
    def prefill(self, input_ids: np.ndarray, state: list[np.ndarray] | None = None
                ) -> tuple[np.ndarray, list[np.ndarray]]:
        """input_ids [B,L] int64 (+ optional incoming state) -> (logits [B,L,V], new state)."""

    def decode(self, token_ids: np.ndarray, state: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """token_ids [B] int64 + state -> (logits [B,V], new state)."""
        raise NotImplementedError(f"{self.backend} engine has no decode yet")

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
            raise InputError(f"input_ids shape {list(ids.shape)} (accepted: [batch >= 1, length >= 1])")
        if not np.issubdtype(ids.dtype, np.integer):
            raise InputError(f"input_ids dtype {ids.dtype} (accepted: integer token ids)")
        V = self.config.vocab_size
        if ids.min() < 0 or ids.max() >= V:
            raise InputError(f"token id {int(ids.max() if ids.max() >= V else ids.min())} out of range "
                             f"(accepted: 0 .. {V - 1})")
        max_seq = self.manifest["programs"]["prefill"].get("max_seq", self.config.max_position_embeddings)
        if ids.shape[1] > max_seq:
            raise InputError(f"sequence length {ids.shape[1]} exceeds the maximum {max_seq}")
        return ids.astype(np.int64, copy=False)


def engine_class(backend: str) -> type[Engine]:
    """The Engine subclass for a backend name (imports lazily: heavy libraries load on demand)."""
    if backend == "ort":
        from jambatrt.engines.ort import OrtEngine
        return OrtEngine
    if backend == "tensorrt":
        from jambatrt.engines.tensorrt import TensorRTEngine
        return TensorRTEngine
    raise InputError(f"unknown backend {backend!r} (accepted: ort, tensorrt)")
