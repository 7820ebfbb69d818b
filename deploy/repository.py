"""Write a Triton Inference Server model repository from a jambatrt artifact.

Models (NAME defaults to "jamba"):
  NAME_prefill    Python backend, stateless: input_ids [B,L] int64 -> logits [B,L,V] fp32.
  NAME_sequence   Python backend with sequence batching (START/END/READY/CORRID): step-by-step
                  decode, the engine state kept per correlation id inside the model.
  NAME_generate   Python backend, decoupled: streams one response per generated token.
  NAME_tensorrt   `tensorrt_plan` running the artifact's TensorRT engine (only when the manifest
                  has an `engines.tensorrt` entry): the stateless step program, inputs/outputs and
                  dynamic dims taken from the manifest's `programs.step`; the state travels in the
                  request (past.*) and the response (present.*).
  with --stages   NAME_stage{k} per pipeline stage and the ensemble NAME_sequence over them, instead of
                  the above (deploy/stages_repository.py).

The Python models reference the artifact by absolute path rather than copying it: an artifact can
be many GB, the models only read it, and each model checks at load time that the manifest is the
one deployed and that every file matches its sha256 (a changed artifact is refused, never served).
A TensorRT plan is copied (Triton wants it inside the version directory) and hash-checked.
The repository is written atomically (temp dir + rename) and records the sha256 of each of its
files in jambatrt-repository.json (Triton ignores plain files at the repository root)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
import textwrap
from dataclasses import dataclass
from pathlib import Path

from jambatrt.artifact import atomic_dir, hash_tree, read_manifest, sha256_file, verify_files, write_json_atomic
from jambatrt.deploy.aoti_model import write_aoti_model
from jambatrt.deploy.stages_repository import STAGE_MODEL
from jambatrt.errors import ArtifactError, InputError

REPOSITORY_INFO = "jambatrt-repository.json"
PYTHON_MODEL = Path(__file__).with_name("triton_model.py")
AOTI_MODEL = Path(__file__).with_name("aoti_model.py")
PLAN_FILE = "model.plan"
INFO_VERSION = 1

TRITON_DTYPES = {"float32": "TYPE_FP32", "float16": "TYPE_FP16", "bfloat16": "TYPE_BF16", "int64": "TYPE_INT64",
                 "int32": "TYPE_INT32", "int8": "TYPE_INT8", "uint8": "TYPE_UINT8", "bool": "TYPE_BOOL",
                 "string": "TYPE_STRING"}


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


# ---- protobuf text format (config.pbtxt) ----------------------------------------------------------
class Enum(str):
    """An enum value: written bare (KIND_CPU), not quoted."""


def _scalar(v) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, Enum):
        return str(v)
    if isinstance(v, (int, float)):
        return repr(v)
    return json.dumps(str(v))      # JSON string escapes are valid protobuf text-format escapes


def _inline(msg: dict) -> str | None:
    """A small message on one line ({ kind: KIND_CPU count: 1 }), or None when it has repeated messages."""
    parts = []
    for key, v in msg.items():
        if isinstance(v, dict):
            inner = _inline(v)
            if inner is None:
                return None
            parts.append(f"{key} {inner}")
        elif isinstance(v, list) and v and any(isinstance(x, dict) for x in v):
            return None
        elif isinstance(v, list):
            parts.append(f"{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            parts.append(f"{key}: {_scalar(v)}")
    return "{ " + " ".join(parts) + " }"


def pbtxt(msg: dict, indent: int = 0, width: int = 110) -> str:
    """A dict as protobuf text format: dict -> message, list of dicts -> repeated message, list of
    scalars -> repeated scalar, Enum -> bare enum value. Small messages go on one line."""
    pad = "  " * indent
    lines = []
    for key, v in msg.items():
        if isinstance(v, dict):
            inner = _inline(v)
            if inner is not None and len(pad) + len(key) + len(inner) < width:
                lines.append(f"{pad}{key} {inner}")
            else:
                lines += [f"{pad}{key} {{", pbtxt(v, indent + 1, width), f"{pad}}}"]
        elif isinstance(v, list) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{key} [")
            for i, x in enumerate(v):
                comma = "," if i < len(v) - 1 else ""
                inner = _inline(x)
                if inner is not None and len(pad) + 2 + len(inner) < width:
                    lines.append(f"{pad}  {inner}{comma}")
                else:
                    lines += [f"{pad}  {{", pbtxt(x, indent + 2, width), f"{pad}  }}{comma}"]
            lines.append(f"{pad}]")
        elif isinstance(v, list):
            lines.append(f"{pad}{key}: [ {', '.join(_scalar(x) for x in v)} ]")
        else:
            lines.append(f"{pad}{key}: {_scalar(v)}")
    return "\n".join(line for line in lines if line)


def _comment(text: str, width: int = 100) -> str:
    return "".join(f"# {line}".rstrip() + "\n" for para in text.strip().splitlines()
                   for line in textwrap.wrap(para, width - 2, break_on_hyphens=False, break_long_words=False,
                                                 subsequent_indent="  "))


def _params(d: dict) -> list[dict]:
    return [{"key": k, "value": {"string_value": str(v)}} for k, v in d.items() if v is not None]


def _tensor(name: str, dtype: str, dims: list) -> dict:
    if dtype not in TRITON_DTYPES:
        raise ArtifactError(f"tensor {name}: dtype {dtype!r} has no Triton type (known: {', '.join(TRITON_DTYPES)})")
    return {"name": name, "data_type": Enum(TRITON_DTYPES[dtype]),
            "dims": [d if isinstance(d, int) else -1 for d in dims]}      # symbolic dims (batch, seq, past+seq) -> -1


# ---- TensorRT ------------------------------------------------------------------------------------
def tensorrt_config(manifest: dict, entry: dict, model_name: str, plugin_paths: list[str] = ()) -> str:
    """config.pbtxt for the artifact's TensorRT engine (entry = manifest["engines"]["tensorrt"], as
    engines/tensorrt.py writes it): the stateless step program, one GPU instance that may use every
    optimisation profile (Triton picks the one that fits each request's shapes). `plugin_paths`:
    plugin libraries as the server will see them, only for plugins that are not AOT."""
    step = manifest["programs"]["step"]
    gpu = entry.get("gpu", {})
    chunk = entry.get("chunk_plan", {}).get("chunk")
    notes = [f"TensorRT engine of a jambatrt artifact (dtype {manifest.get('dtype')}), TensorRT "
             f"{entry.get('tensorrt', '?')}, built for {gpu.get('arch', '?')} ({gpu.get('name', '?')}): serve it "
             "with the same TensorRT version on the same GPU architecture.",
             "Stateless step program: send input_ids [B,L] with the past.* state (P past tokens; an empty state "
             "has P = 0), read logits [B,L,V] and the present.* state to send with the next call."
             + (f" Send prompts in chunks of at most {chunk} tokens (the prefill profile)." if chunk else "")]
    if plugin_paths:
        notes.append("Plugins that are not AOT: start tritonserver with "
                     f"--backend-config=tensorrt,plugins=\"{';'.join(plugin_paths)}\"")
    else:
        notes.append("Plugins: the jamba:: kernels are AOT TensorRT plugins (QDP aot_impl: their PTX is inside the "
                     "plan" + (f"; {', '.join(entry['plugins'])}" if entry.get("plugins") else "") + "), so the "
                     "TensorRT backend needs no plugin library and no Python at run time. (Plugins built as "
                     "libraries would be loaded with --backend-config=tensorrt,plugins=\"a.so;b.so\".)")
    instance = {"kind": Enum("KIND_GPU"), "count": 1}
    if entry.get("profiles"):
        notes.append("Optimisation profiles: " + ", ".join(f"{i} = {p}" for i, p in enumerate(entry["profiles"])))
        instance["profile"] = [str(i) for i in range(len(entry["profiles"]))]
    cfg = {
        "name": model_name,
        "platform": "tensorrt_plan",
        "max_batch_size": 0,            # explicit-batch engine: the batch dim is part of dims
        "default_model_filename": PLAN_FILE,
        "input": [_tensor(s["name"], s["dtype"], s["shape"]) for s in step["inputs"]],
        "output": [_tensor(s["name"], s["dtype"], s["shape"]) for s in step["outputs"]],
        "instance_group": [instance],
    }
    return _comment("\n".join(notes)) + pbtxt(cfg) + "\n"


# ---- Python-backend models -------------------------------------------------------------------------
def _python_model(name: str, mode: str, common: dict, settings: RepositorySettings, **cfg) -> str:
    params = {"mode": mode, **common}
    if settings.execution_env:
        params["EXECUTION_ENV_PATH"] = settings.execution_env
    body = {"name": name, "backend": "python", **cfg,
            "instance_group": [{"kind": Enum("KIND_CPU"), "count": settings.instances}],
            "parameters": _params(params)}
    return pbtxt(body) + "\n"


def served_max_tokens(manifest: dict, max_tokens: int | None) -> int:
    """The Python models' token budget per request / sequence: the setting, at most the artifact's context."""
    max_seq = int(manifest["programs"]["step"].get("max_seq", manifest["config"]["max_position_embeddings"]))
    return min(max_tokens or max_seq, max_seq)


def python_configs(manifest: dict, artifact: Path, settings: RepositorySettings) -> dict[str, str]:
    """config.pbtxt text of the three Python-backend models, keyed by model name."""
    vocab = manifest["programs"]["step"]["outputs"][0]["shape"][-1]
    max_tokens = served_max_tokens(manifest, settings.max_tokens)
    common = {"artifact": str(artifact), "backend": settings.backend,
              "manifest_sha256": sha256_file(artifact / "manifest.json"), "max_tokens": max_tokens}
    n = settings.name
    prefill = _python_model(
        f"{n}_prefill", "prefill", common, settings, max_batch_size=0,
        input=[_tensor("input_ids", "int64", ["batch", "seq"])],
        output=[_tensor("logits", "float32", ["batch", "seq", vocab])])
    sequence = _python_model(
        f"{n}_sequence", "sequence",
        {**common, "idle_seconds": settings.idle_seconds, "max_sequences": settings.max_sequences}, settings,
        max_batch_size=settings.sequence_batch,           # the batch dim is implicit: input_ids [1, L]
        input=[_tensor("input_ids", "int64", ["seq"])],
        output=[_tensor("logits", "float32", [vocab]), _tensor("next_token", "int64", [1])],
        sequence_batching={
            # Triton forgets a sequence idle this long; the model drops its state on the same clock
            "max_sequence_idle_microseconds": int(settings.idle_seconds * 1e6),
            # "oldest": any number of live sequences (up to max_candidate_sequences) share the instance;
            # "direct" would give each sequence a batch slot and make further sequences wait
            "oldest": {"max_candidate_sequences": settings.max_sequences, "max_queue_delay_microseconds": 0},
            "control_input": [
                {"name": "START", "control": [{"kind": Enum("CONTROL_SEQUENCE_START"), "int32_false_true": [0, 1]}]},
                {"name": "END", "control": [{"kind": Enum("CONTROL_SEQUENCE_END"), "int32_false_true": [0, 1]}]},
                {"name": "READY", "control": [{"kind": Enum("CONTROL_SEQUENCE_READY"), "int32_false_true": [0, 1]}]},
                {"name": "CORRID", "control": [{"kind": Enum("CONTROL_SEQUENCE_CORRID"),
                                                "data_type": Enum("TYPE_UINT64")}]},
            ]})
    optional = [("max_new_tokens", "int32"), ("eos_id", "int64"), ("temperature", "float32"), ("top_p", "float32"),
                ("seed", "int64")]
    generate = _python_model(
        f"{n}_generate", "generate", common, settings, max_batch_size=0,
        model_transaction_policy={"decoupled": True},
        # either prompt_ids (token ids) or text_input (the generate extension's text; parameters in the
        # request's "parameters"), so both are optional; the guard and the model refuse neither or both
        input=[{**_tensor("prompt_ids", "int64", ["seq"]), "optional": True},
               {**_tensor("text_input", "string", [1]), "optional": True}]
              + [{**_tensor(k, t, [1]), "optional": True} for k, t in optional],
        output=[_tensor("token_id", "int64", [1]), _tensor("text_output", "string", [1])])
    return {f"{n}_prefill": prefill, f"{n}_sequence": sequence, f"{n}_generate": generate}


# ---- the repository ------------------------------------------------------------------------------
def plan_repository(artifact: str | Path, settings: RepositorySettings = RepositorySettings()) -> dict:
    """What `write_repository` would write: {"models": {name: {"kind", "config"}}, ...} (no files touched)."""
    artifact = Path(artifact).resolve()
    manifest = read_manifest(artifact)
    engines = manifest.get("engines", {})
    models: dict[str, dict] = {}
    if settings.stages:
        # the stages and their ensemble only: the whole model is what does not fit one device
        from jambatrt.deploy.stages_repository import stage_models
        return {"artifact": str(artifact), "manifest": manifest, "models": stage_models(manifest, artifact, settings)}
    if settings.backend in engines:
        for name, text in python_configs(manifest, artifact, settings).items():
            models[name] = {"kind": "python", "config": text}
    if "tensorrt" in engines:
        entry = engines["tensorrt"]
        libs = entry.get("plugin_libraries", [])
        models[f"{settings.name}_tensorrt"] = {"kind": "tensorrt", "entry": entry, "plugin_libraries": libs}
    if "aoti" in engines:
        models[f"{settings.name}_aoti"] = {"kind": "aoti", "entry": engines["aoti"]}
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
            "model_py_sha256": sha256_file(PYTHON_MODEL), "aoti_model_py_sha256": sha256_file(AOTI_MODEL),
            "stage_model_py_sha256": sha256_file(STAGE_MODEL),
            "settings": dataclasses.asdict(settings),
            "models": {k: v["kind"] for k, v in plan["models"].items()},
            # for the user to read: TritonServer derives these from the files, never from here
            "server_args": _planned_server_args(plan, repository)}
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
            if m["kind"] in ("python", "stage"):
                (tmp / name / "config.pbtxt").write_text(m["config"])
                shutil.copyfile(PYTHON_MODEL if m["kind"] == "python" else STAGE_MODEL, tmp / name / "1" / "model.py")
            elif m["kind"] == "ensemble":        # Triton wants the version directory, empty
                (tmp / name / "config.pbtxt").write_text(m["config"])
            elif m["kind"] == "aoti":
                write_aoti_model(tmp / name, artifact, manifest, name, settings.execution_env, settings.instances)
            else:
                plugins = _copy_plugins(artifact, manifest, m["plugin_libraries"], tmp / name / "plugins",
                                        repository / name / "plugins")
                _copy_checked(artifact, manifest, m["entry"]["path"], tmp / name / "1" / PLAN_FILE)
                (tmp / name / "config.pbtxt").write_text(tensorrt_config(manifest, m["entry"], name, plugins))
        info["files"] = hash_tree(tmp, skip=(REPOSITORY_INFO,))
        info["info_sha256"] = info_digest(info)
        write_json_atomic(tmp / REPOSITORY_INFO, info)
    return {**info, "reused": False}


def _plugin_args(plugin_libs: list[str]) -> list[str]:
    """tritonserver arguments for TensorRT plugin libraries (absolute paths in the repository)."""
    return [f"--backend-config=tensorrt,plugins={';'.join(plugin_libs)}"] if plugin_libs else []


def _planned_server_args(plan: dict, repository: Path) -> list[str]:
    libs = [str(repository / name / "plugins" / Path(rel).name) for name, m in plan["models"].items()
            if m["kind"] == "tensorrt" for rel in m["plugin_libraries"]]
    return _plugin_args(libs)


def info_digest(info: dict) -> str:
    """sha256 of the repository record itself (every key but this one, canonical JSON): the record
    is verified like every other file, so an edited one is never "kept (already up to date)"."""
    body = {k: v for k, v in info.items() if k not in ("info_sha256", "reused")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def server_args(repository: str | Path) -> list[str]:
    """The tritonserver arguments a verified repository needs (its TensorRT plugin libraries), derived
    from its files -- never read as argument strings from a file, so nothing on disk can add flags
    (a bind address, a port) to the server."""
    repository = Path(repository).absolute()
    info = verify_repository(repository)
    libs = sorted(str(repository / rel) for rel in info.get("files", {})
                  if len(Path(rel).parts) == 3 and Path(rel).parts[1] == "plugins"
                  and info.get("models", {}).get(Path(rel).parts[0]) == "tensorrt")
    return _plugin_args(libs)


def _copy_checked(artifact: Path, manifest: dict, rel: str, dest: Path) -> None:
    want = manifest.get("files", {}).get(rel)
    if want is None:
        raise ArtifactError(f"{artifact}: {rel} is not recorded in manifest.json (re-run `jambatrt build`)")
    shutil.copyfile(artifact / rel, dest)
    if sha256_file(dest) != want["sha256"]:
        raise ArtifactError(f"{artifact / rel}: does not match its sha256 in manifest.json (changed while copying?)")


def _copy_plugins(artifact: Path, manifest: dict, libs: list[str], tmp_dir: Path, final_dir: Path) -> list[str]:
    out = []
    for rel in libs:
        tmp_dir.mkdir(parents=True, exist_ok=True)
        _copy_checked(artifact, manifest, rel, tmp_dir / Path(rel).name)
        out.append(str(final_dir / Path(rel).name))
    return out


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
