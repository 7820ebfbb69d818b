"""Write a Triton Inference Server model repository from a jambatrt artifact.

Models (NAME defaults to "jamba"):
  NAME_prefill    Python backend, stateless: input_ids [B,L] int64 -> logits [B,L,V] fp32.
  NAME_sequence   Python backend with sequence batching (START/END/READY/CORRID): step-by-step
                  decode, the engine state kept per correlation id inside the model.
  NAME_generate   Python backend, decoupled: streams one response per generated token.
  NAME_aoti       Python backend with sequence batching, the sequence model's interface, running the
  NAME_tensorrt   artifact's AOTInductor package / TensorRT engine (when the manifest has that engine;
                  deploy/engine_model.py): the KV and Mamba state stays on the model's device per
                  correlation id, never travels through the client.
  with --stages   NAME_stage{k} per pipeline stage and the ensemble NAME_sequence over them, instead of
                  the above (deploy/stages_repository.py); with --nodes N one repository per node
                  (--node K), chained by NAME_hop over gRPC (deploy/hop_model.py).

The Python models reference the artifact by absolute path rather than copying it: an artifact can
be many GB, the models only read it, and each model checks at load time that the manifest is the
one deployed and that every file matches its sha256 (a changed artifact is refused, never served).
The repository is written atomically (temp dir + rename) and records the sha256 of each of its
files in jambatrt-repository.json (Triton ignores plain files at the repository root)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from jambatrt.artifact import atomic_dir, hash_tree, sha256_file, verify_files, write_json_atomic
from jambatrt.deploy.engine_model import write_engine_model
from jambatrt.deploy.pbtxt import Enum, parameters, pbtxt, tensor
from jambatrt.deploy.sequence_state import sequence_batching
from jambatrt.deploy.stages_repository import HOP_MODEL, STAGE_MODEL
from jambatrt.errors import ArtifactError, InputError
from jambatrt.manifest import Manifest

REPOSITORY_INFO = "jambatrt-repository.json"
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
ENGINE_MODEL = Path(__file__).with_name("engine_model.py")
INFO_VERSION = 1


@dataclass(frozen=True)
class RepositorySettings:
    name: str = "jamba"                  # model name prefix
    max_tokens: int | None = None        # per-request / per-sequence token budget; None: the manifest's max_seq
    max_sequences: int = 64              # live sequences (sequence model)
    idle_seconds: float = 60.0           # a silent sequence's state is dropped after this
    sequence_batch: int = 8              # requests from different sequences handed to one execute()
    instances: int = 1                   # instances of each Python model
    backend: str = "ort"                 # the engine the Python models run
    execution_env: str | None = None     # EXECUTION_ENV_PATH for the Python models (else: python3 on PATH)
    stages: bool = False                 # serve the pipeline-stage engines (deploy/stages_repository.py)
    stage_devices: str = "cpu"           # stage k's instances: "cpu" (KIND_CPU) or "gpu" (KIND_GPU, gpus: [k])
    stage_backend: str = "ort"           # which stage engines: ort (`build --stages`) or aoti (`build --backend aoti --stages`)
    nodes: int = 1                       # with stages: split them over this many servers (one repository each)
    node: int = 0                        # which node's repository this is (0 .. nodes-1)
    next_node: str | None = None         # HOST:PORT of node+1's gRPC endpoint (every node but the last)
    hop_timeout: float = 300.0           # seconds NAME_hop waits for the next node's answer

    def __post_init__(self):
        if not self.name.replace("_", "").replace("-", "").isalnum():
            raise InputError(f"model name {self.name!r} (accepted: letters, digits, '_' and '-')")
        for k in ("max_sequences", "sequence_batch", "instances"):
            if getattr(self, k) < 1:
                raise InputError(f"{k}={getattr(self, k)} (accepted: >= 1)")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise InputError(f"max_tokens={self.max_tokens} (accepted: >= 1)")
        if self.idle_seconds <= 0:
            raise InputError(f"idle_seconds={self.idle_seconds} (accepted: > 0)")
        if self.stage_backend not in ("ort", "aoti"):
            raise InputError(f"stage_backend={self.stage_backend!r} (accepted: ort, aoti)")
        if self.stage_backend != "ort" and not self.stages:
            raise InputError(f"stage_backend={self.stage_backend!r} picks the stage engines: it needs stages=True "
                             "(--stages)")
        if self.hop_timeout <= 0:
            raise InputError(f"hop_timeout={self.hop_timeout} (accepted: > 0)")
        if self.nodes < 1 or not 0 <= self.node < self.nodes:
            raise InputError(f"nodes={self.nodes}, node={self.node} (accepted: nodes >= 1, 0 <= node < nodes)")
        if self.nodes > 1 and not self.stages:
            raise InputError(f"nodes={self.nodes} splits the pipeline-stage engines: it needs stages=True (--stages)")
        last = self.node == self.nodes - 1
        if last and self.next_node is not None:
            raise InputError(f"next_node={self.next_node!r} for node {self.node}, the last of {self.nodes}: it has "
                             "no next node (accepted: none)")
        if not last:
            from jambatrt.deploy.hop_model import check_address
            check_address(self.next_node, f"next_node / --next-node (node {self.node + 1}'s gRPC endpoint)")




# ---- Python-backend models -------------------------------------------------------------------------
def _python_model(name: str, mode: str, common: dict, settings: RepositorySettings, **cfg) -> str:
    params = {"mode": mode, **common}
    if settings.execution_env:
        params["EXECUTION_ENV_PATH"] = settings.execution_env
    body = {"name": name, "backend": "python", **cfg,
            "instance_group": [{"kind": Enum("KIND_CPU"), "count": settings.instances}],
            "parameters": parameters(params)}
    return pbtxt(body) + "\n"


def served_max_tokens(manifest: Manifest, max_tokens: int | None) -> int:
    """The Python models' token budget per request / sequence: the setting, at most the artifact's context."""
    return min(max_tokens or manifest.max_seq, manifest.max_seq)


def python_configs(manifest: Manifest, artifact: Path, settings: RepositorySettings) -> dict[str, str]:
    """config.pbtxt text of the three Python-backend models, keyed by model name."""
    vocab = manifest.step.vocab
    max_tokens = served_max_tokens(manifest, settings.max_tokens)
    common = {"artifact": str(artifact), "backend": settings.backend,
              "manifest_sha256": sha256_file(artifact / "manifest.json"), "max_tokens": max_tokens}
    n = settings.name
    prefill = _python_model(
        f"{n}_prefill", "prefill", common, settings, max_batch_size=0,
        input=[tensor("input_ids", "int64", ["batch", "seq"])],
        output=[tensor("logits", "float32", ["batch", "seq", vocab])])
    sequence = _python_model(
        f"{n}_sequence", "sequence",
        {**common, "idle_seconds": settings.idle_seconds, "max_sequences": settings.max_sequences}, settings,
        max_batch_size=settings.sequence_batch,           # the batch dim is implicit: input_ids [1, L]
        input=[tensor("input_ids", "int64", ["seq"])],
        output=[tensor("logits", "float32", [vocab]), tensor("next_token", "int64", [1])],
        sequence_batching=sequence_batching(settings))
    optional = [("max_new_tokens", "int32"), ("eos_id", "int64"), ("temperature", "float32"), ("top_p", "float32"),
                ("seed", "int64")]
    generate = _python_model(
        f"{n}_generate", "generate", common, settings, max_batch_size=0,
        model_transaction_policy={"decoupled": True},
        # either prompt_ids (token ids) or text_input (the generate extension's text; parameters in the
        # request's "parameters"), so both are optional; the guard and the model refuse neither or both
        input=[{**tensor("prompt_ids", "int64", ["seq"]), "optional": True},
               {**tensor("text_input", "string", [1]), "optional": True}]
              + [{**tensor(k, t, [1]), "optional": True} for k, t in optional],
        output=[tensor("token_id", "int64", [1]), tensor("text_output", "string", [1])])
    return {f"{n}_prefill": prefill, f"{n}_sequence": sequence, f"{n}_generate": generate}


# ---- the repository ------------------------------------------------------------------------------
def plan_repository(artifact: str | Path, settings: RepositorySettings = RepositorySettings()) -> dict:
    """What `write_repository` would write: {"models": {name: {"kind", "config"}}, ...} (no files touched)."""
    artifact = Path(artifact).resolve()
    manifest = Manifest.read(artifact)
    engines = manifest.engines
    models: dict[str, dict] = {}
    if settings.stages:
        # the stages and their ensemble only: the whole model is what does not fit one device
        from jambatrt.deploy.stages_repository import stage_models
        return {"artifact": str(artifact), "manifest": manifest, "models": stage_models(manifest, artifact, settings)}
    if settings.backend in engines:
        for name, text in python_configs(manifest, artifact, settings).items():
            models[name] = {"kind": "python", "config": text}
    if "tensorrt" in engines:
        models[f"{settings.name}_tensorrt"] = {"kind": "tensorrt"}
    if "aoti" in engines:
        models[f"{settings.name}_aoti"] = {"kind": "aoti"}
    if not models:
        raise ArtifactError(f"{artifact}: no engine to deploy (built: {', '.join(engines) or 'none'}); run "
                            f"`jambatrt build {artifact} --backend {settings.backend}` (or --backend tensorrt|aoti)")
    return {"artifact": str(artifact), "manifest": manifest, "models": models}


def write_repository(artifact: str | Path, repository: str | Path,
                     settings: RepositorySettings = RepositorySettings(), force: bool = False) -> dict:
    """Write the model repository; returns its info (also saved as jambatrt-repository.json).

    An existing repository is replaced only with `force`; one written from the same artifact with the
    same settings and unaltered is kept as it is (info["reused"] = True)."""
    artifact = Path(artifact).resolve()
    repository = Path(repository).absolute()
    if repository == artifact or artifact in repository.parents:
        raise InputError(f"--repository {repository} lies inside the artifact {artifact}: write it elsewhere")
    if repository in artifact.parents:
        raise InputError(f"--repository {repository} contains the artifact {artifact}: write it elsewhere")
    verify_files(artifact)          # refuse a tampered or half-written artifact before writing anything
    plan = plan_repository(artifact, settings)
    manifest = plan["manifest"]
    info = {"format_version": INFO_VERSION, "artifact": str(artifact),
            "manifest_sha256": sha256_file(artifact / "manifest.json"),
            "model_py_sha256": sha256_file(PYTHON_MODEL), "engine_model_py_sha256": sha256_file(ENGINE_MODEL),
            "stage_model_py_sha256": sha256_file(STAGE_MODEL), "hop_model_py_sha256": sha256_file(HOP_MODEL),
            "settings": dataclasses.asdict(settings),
            "models": {k: v["kind"] for k, v in plan["models"].items()}}
    if repository.exists() and not force:
        old = _read_info(repository)
        if old is not None and all(old.get(k) == info[k] for k in info):
            # "kept (already up to date)" only when every file -- this record included -- is as written
            verify_repository(repository)
            return {**old, "reused": True}
        if old is not None:
            try:
                verify_repository(repository)
            except ArtifactError as e:
                raise ArtifactError(f"{e}; not replaced without --force") from None
    with atomic_dir(repository, force=force) as tmp:
        for name, m in plan["models"].items():
            (tmp / name / "1").mkdir(parents=True)
            if m["kind"] in ("python", "stage", "hop"):
                (tmp / name / "config.pbtxt").write_text(m["config"])
                source = {"python": PYTHON_MODEL, "stage": STAGE_MODEL, "hop": HOP_MODEL}[m["kind"]]
                shutil.copyfile(source, tmp / name / "1" / "model.py")
            elif m["kind"] in ("ensemble", "node-ensemble"):        # Triton wants the version directory, empty
                (tmp / name / "config.pbtxt").write_text(m["config"])
            else:                                # aoti, tensorrt: the engine runs inside a Python model
                write_engine_model(tmp / name, artifact, manifest, name, m["kind"], settings)
        info["files"] = hash_tree(tmp, skip=(REPOSITORY_INFO,))
        info["info_sha256"] = info_digest(info)
        write_json_atomic(tmp / REPOSITORY_INFO, info)
    return {**info, "reused": False}


def info_digest(info: dict) -> str:
    """sha256 of the repository record itself (every key but this one, canonical JSON): the record
    is verified like every other file, so an edited one is never "kept (already up to date)"."""
    body = {k: v for k, v in info.items() if k not in ("info_sha256", "reused")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _read_info(repository: Path) -> dict | None:
    try:
        info = json.loads((Path(repository) / REPOSITORY_INFO).read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    return info if isinstance(info, dict) else None


def verify_repository(repository: str | Path) -> dict:
    """Check every repository file against the sha256 recorded when it was written; lists every
    missing, altered or unexpected file in one ArtifactError."""
    repository = Path(repository)
    info = _read_info(repository)
    if info is None:
        raise ArtifactError(f"{repository}: no readable {REPOSITORY_INFO}; not a repository written by `jambatrt deploy`")
    if info.get("info_sha256") != info_digest(info):
        raise ArtifactError(f"{repository}: {REPOSITORY_INFO} altered (its own sha256 does not match) -- re-run "
                            "`jambatrt deploy --force`")
    now = hash_tree(repository, skip=(REPOSITORY_INFO,))
    want = info.get("files", {})
    problems = [f"missing {k}" for k in want if k not in now]
    problems += [f"{k} altered" for k in want if k in now and now[k] != want[k]]
    problems += [f"unexpected file {k}" for k in now if k not in want and "__pycache__" not in k]
    if problems:
        raise ArtifactError(f"{repository}: " + "; ".join(problems) + " -- re-run `jambatrt deploy --force`")
    return info
