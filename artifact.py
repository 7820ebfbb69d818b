"""The artifact directory every stage reads and writes: manifest.json (versions, config, dtype,
quantisation, ops, programs, sha256 of every file, engines). Writes are atomic: a temp directory
renamed into place; an existing directory is replaced only with force, and only once the new one
is complete."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from importlib import metadata
from pathlib import Path
from typing import Iterator

from jambatrt.errors import ArtifactError

MANIFEST = "manifest.json"
FORMAT_VERSION = 1


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def check_deployed_manifest(artifact: str | Path, want: str | None) -> None:
    """For a served model: the artifact's manifest.json must still have the sha256 recorded when
    the repository was written (`jambatrt deploy`); ArtifactError otherwise. No-op without a record."""
    if not want:
        return
    got = sha256_file(Path(artifact) / "manifest.json")
    if got != want:
        raise ArtifactError(f"{artifact}/manifest.json changed since this repository was written "
                            f"(sha256 {got[:12]}, deployed {want[:12]}): re-run `jambatrt deploy`")


def library_versions(names=("torch", "onnx", "onnxscript", "onnxruntime", "onnxruntime-extensions", "numba",
                             "numpy", "safetensors", "transformers", "triton", "tensorrt")) -> dict[str, str]:
    out = {}
    for n in names:
        try:
            out[n] = metadata.version(n)
        except metadata.PackageNotFoundError:
            pass
    return out


def hash_tree(root: Path, skip: tuple[str, ...] = (MANIFEST,)) -> dict[str, str]:
    return {str(p.relative_to(root)): sha256_file(p) for p in sorted(root.rglob("*"))
            if p.is_file() and str(p.relative_to(root)) not in skip}


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out`. On any failure nothing is left
    under `out`'s name and an existing `out` is untouched."""
    out = Path(out)
    if out.exists() and not force:
        raise ArtifactError(f"{out} already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; the artifact gets the usual mode
    try:
        yield tmp
        if out.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            os.rename(out, old / "x")
            os.rename(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def read_manifest(out: str | Path) -> dict:
    out = Path(out)
    path = out / MANIFEST
    if not out.is_dir():
        raise ArtifactError(f"{out}: no such artifact directory (create one with `jambatrt export`)")
    try:
        m = json.loads(path.read_text())
    except FileNotFoundError:
        raise ArtifactError(f"{out}: no {MANIFEST}; not a jambatrt artifact (create one with `jambatrt export`)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ArtifactError(f"{path}: corrupt manifest ({e})") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version={m.get('format_version')!r} (accepted: {FORMAT_VERSION})")
    return m


def verify_files(out: str | Path, manifest: dict | None = None, prefix: str = "") -> dict:
    """Check every file the manifest lists (optionally only those under `prefix`) against its
    sha256. Raises ArtifactError listing every missing or altered file."""
    out = Path(out)
    manifest = manifest or read_manifest(out)
    problems = []
    for rel, digest in manifest.get("files", {}).items():
        if not rel.startswith(prefix):
            continue
        p = out / rel
        if not p.is_file():
            problems.append(f"missing file {rel}")
        elif sha256_file(p) != digest:
            problems.append(f"{rel} does not match its sha256 in {MANIFEST} (altered or corrupt)")
    if problems:
        raise ArtifactError(f"{out}: " + "; ".join(problems) + " -- re-run `jambatrt export`/`build`")
    return manifest


def add_files(out: str | Path, manifest: dict, subdir: str) -> dict:
    """Record the sha256 of every file under `subdir` in the manifest and rewrite it atomically."""
    out = Path(out)
    files = {k: v for k, v in manifest.get("files", {}).items() if not k.startswith(subdir.rstrip("/") + "/")}
    for p in sorted((out / subdir).rglob("*")):
        if p.is_file():
            files[str(p.relative_to(out))] = sha256_file(p)
    manifest["files"] = dict(sorted(files.items()))
    write_json_atomic(out / MANIFEST, manifest)
    return manifest
