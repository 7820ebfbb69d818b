"""The artifact's manifest.json as typed objects: what the stages after export read (config, dtype,
quantisation, the step program's tensors, the built engines), each once, by name.

    m = Manifest.read(artifact)          # digest, paths and listed files checked (artifact.read_manifest)
    m.config.hidden_size, m.dtype, m.step.vocab, m.step.state, m.max_seq
    entry = m.engine("ort")              # ArtifactError naming the build command when it was not built
    path = m.file(entry["path"])         # a listed file inside the artifact, else ArtifactError

The JSON stays the one source: writers (export, `Engine.build`, `record_files`) update the dict of
`read_manifest` and sign it; `Manifest` is the read side and never writes. An engine's own entry stays a
dict (each backend has its own keys); what more than one reader needs from it is typed here."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

from jambatrt.artifact import MANIFEST, artifact_file, read_manifest
from jambatrt.config import JambaConfig
from jambatrt.errors import ArtifactError


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str                      # "float32" | "bfloat16" | "int64"
    shape: tuple                    # ints, and symbolic dims: "batch", "seq", "past"

    @classmethod
    def of(cls, d: dict) -> "TensorSpec":
        return cls(d["name"], d["dtype"], tuple(d["shape"]))

    def as_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}

    def zero_shape(self, batch: int) -> list[int]:
        """Its shape before any token: `batch` rows, no past (a state tensor's empty KV, P = 0)."""
        return [batch if d == "batch" else 0 if d == "past" else int(d) for d in self.shape]


@dataclass(frozen=True)
class Program:
    """One exported program (the step program: input_ids + state -> logits + new state)."""

    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    max_batch: int | None = None
    max_seq: int | None = None
    onnx: str | None = None         # its ONNX graph, relative to the artifact
    pt2: str | None = None          # its weightless ExportedProgram

    @classmethod
    def of(cls, d: dict) -> "Program":
        return cls(tuple(map(TensorSpec.of, d["inputs"])), tuple(map(TensorSpec.of, d["outputs"])),
                   d.get("max_batch"), d.get("max_seq"), d.get("onnx"), d.get("pt2"))

    @property
    def state(self) -> tuple[TensorSpec, ...]:
        """The incoming state, in order (every input after input_ids)."""
        return self.inputs[1:]

    @property
    def vocab(self) -> int:
        return int(self.outputs[0].shape[-1])


@dataclass(frozen=True)
class Manifest:
    artifact: Path
    raw: dict                       # the JSON as read (what writers update; fields no reader types)

    @classmethod
    def read(cls, artifact: str | Path) -> "Manifest":
        return cls(Path(artifact), read_manifest(artifact))

    @classmethod
    def of(cls, artifact: str | Path, manifest: "Manifest | dict | None") -> "Manifest":
        """`manifest` as a Manifest (a dict as read_manifest returns it is wrapped; None: read it)."""
        if isinstance(manifest, Manifest):
            return manifest
        return cls.read(artifact) if manifest is None else cls(Path(artifact), manifest)

    @cached_property
    def config(self) -> JambaConfig:
        return JambaConfig.from_hf_dict(self.raw["config"], source=str(self.artifact / MANIFEST))

    @property
    def dtype(self) -> str:
        return self.raw["dtype"]

    @property
    def experts_int8(self) -> bool:
        return self.raw["quantization"]["experts"] != "none"

    @property
    def weights_int8(self) -> bool:
        """--weights-int8 (artifacts from before it have no "weights" key)."""
        return self.raw["quantization"].get("weights", "none") != "none"

    @property
    def weights(self) -> str:
        """The weight store, relative to the artifact."""
        return self.raw["weights"]["path"]

    @cached_property
    def step(self) -> Program:
        return Program.of(self.raw["programs"]["step"])

    @property
    def max_seq(self) -> int:
        return int(self.step.max_seq or self.config.max_position_embeddings)

    @property
    def text(self) -> dict:
        """What export recorded of the tokenizer ({} for an artifact without one)."""
        return self.raw.get("text") or {}

    @property
    def engines(self) -> dict[str, dict]:
        return self.raw.get("engines", {})

    def engine(self, key: str, build_options: str | None = None) -> dict:
        """The entry of engine `key`; ArtifactError naming the build command (`jambatrt build OUT
        <build_options>`, default `--backend <key>`) when there is none."""
        entry = self.engines.get(key)
        if entry is None:
            raise ArtifactError(f"{self.artifact}: no {key} engine built "
                                f"(run `jambatrt build {self.artifact} {build_options or '--backend ' + key}`)")
        return entry

    def file(self, rel: str) -> Path:
        """A file the manifest lists; ArtifactError for anything unlisted or outside the artifact."""
        return artifact_file(self.artifact, self.raw, rel)
