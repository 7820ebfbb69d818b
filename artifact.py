"""The artifact directory every stage reads and writes: manifest.json (versions, config, dtype,
quantisation, weights, ops, programs, engines, and the sha256 and size of every file). Writes are
atomic: a temp directory renamed into place; an existing directory is replaced only with force, and
only once the new one is complete.

Integrity, at the size of the models this is for (a Jamba-1.5-Mini store is ~60 GB; hashing it
takes minutes):
- The manifest carries its own digest (sha256 of its canonical JSON without the digest), checked on
  every read, and every path in it must be relative and stay inside the artifact. A hand edit, a
  truncated copy or a path such as `../../etc/passwd` is refused.
- Every read checks that each listed file exists as a regular file with its recorded size, and
  hashes every file under FULL_HASH_BELOW in full (programs, graphs, configs: milliseconds).
- A large file is hashed in full on its first use; the check is then recorded in VERIFIED (size,
  mtime, inode, device and digest) and not repeated while those stay the same. Moving the
  artifact keeps the record valid; copying it makes new inodes, so the copy is checked again.
- `jambatrt verify OUT` hashes everything, whatever the record says.
Trade-off: between full checks, a large file rewritten in place with the same size and its mtime
forged back goes unnoticed until `verify` (or a copy) re-hashes it. Corruption by truncation,
partial copies and ordinary edits is caught on every load.

Interruption: SIGINT and SIGTERM both unwind (cli.py), so a temp directory is removed by the
stage that made it; one left by a SIGKILL is removed by the next run that writes the same target
(its name carries the pid that made it, which is gone)."""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
from importlib import metadata
from pathlib import Path, PurePosixPath
from typing import Callable, Iterable, Iterator

from jambatrt.errors import ArtifactError

MANIFEST = "manifest.json"
VERIFIED = ".verified.json"           # record of full checks: a cache, not part of the artifact's contents
FORMAT_VERSION = 2
FULL_HASH_BELOW = 64 << 20            # smaller files are hashed on every read
_PATH_KEYS = ("path", "pt2", "onnx", "plan")


def sha256_file(path: Path, chunk: int = 1 << 22, on_bytes: Callable[[int], None] | None = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
            if on_bytes:
                on_bytes(len(block))
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


# ---- atomic directories ------------------------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _rename_noreplace(src: Path, dst: Path) -> None:
    """rename(2) that fails when `dst` exists (renameat2 RENAME_NOREPLACE), so two writers of the
    same directory cannot both win. Falls back to rename(2) where the call is missing (it still
    refuses a non-empty directory)."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        fn = None
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(err, os.strerror(err), str(dst))
    os.rename(src, dst)


_TEMP = re.compile(r"\.(tmp|old|preset)-(\d+)-")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(out: Path) -> list[Path]:
    """Remove temp directories of `out` (`.<name>.tmp-<pid>-*`, `.old-`, `.preset-`) whose process is
    gone (a SIGKILL, a power cut); -> what was removed. Those of running processes are left alone."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.glob(f".{out.name}.*"):
        m = _TEMP.search(p.name[len(out.name) + 1:])
        if m and not _pid_alive(int(m.group(2))):
            shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def temp_dir_for(out: Path, kind: str = "tmp") -> Path:
    """A fresh `.<name>.<kind>-<pid>-XXXX` directory beside `out` (mode as for any new directory)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{kind}-{os.getpid()}-", dir=out.parent))
    os.chmod(tmp, 0o777 & ~_umask())   # mkdtemp makes 0700; the artifact gets the usual mode
    return tmp


@contextlib.contextmanager
def atomic_dir(out: str | Path, force: bool = False) -> Iterator[Path]:
    """Yield a temp dir beside `out`; on success it becomes `out`. On any failure (an exception,
    SIGINT, SIGTERM) nothing is left under `out`'s name and an existing `out` is untouched. If `out`
    appears while this runs (another writer), the rename fails instead of replacing it, even with
    force: force replaces what existed when we started."""
    out = Path(out)
    existed = out.exists() or out.is_symlink()
    if existed and not force:
        raise ArtifactError(f"{out} already exists (pass --force to replace it)")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        for p in clean_stale(out):
            print(f"removed {p}, left by an interrupted run", file=sys.stderr)
        tmp = temp_dir_for(out)
    except OSError as e:
        raise ArtifactError(f"cannot create {out}: {e.strerror or e}") from None
    try:
        yield tmp
        old = None
        if existed and (out.exists() or out.is_symlink()):
            old = temp_dir_for(out, "old")
            os.rename(out, old / "x")
        try:
            _rename_noreplace(tmp, out)
        except OSError as e:
            if e.errno in (errno.EEXIST, errno.ENOTEMPTY):
                kept = f"; the replaced one is kept in {old / 'x'}" if old else ""
                raise ArtifactError(f"{out} appeared while this run was writing it (another export or build "
                                    f"of the same target?); it was left as it is{kept}") from None
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextlib.contextmanager
def atomic_file(out: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temp file path beside `out`; on success it replaces `out`, with `mode` (default: the
    usual mode of a new file). On failure it is removed and an existing `out` is untouched."""
    out = Path(out)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.chmod(tmp, 0o666 & ~_umask() if mode is None else mode)   # mkstemp makes 0600
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_json_atomic(path: Path, obj) -> None:
    with atomic_file(path) as tmp, open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def manifest_digest(m: dict) -> str:
    body = {k: v for k, v in m.items() if k != "digest"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def write_manifest(out: str | Path, m: dict) -> dict:
    m["digest"] = manifest_digest(m)
    write_json_atomic(Path(out) / MANIFEST, m)
    return m


def inside(out: Path, rel: str, what: str = "path") -> Path:
    """`out / rel` where `rel` is a plain relative path that stays inside `out` (no `..`, no
    absolute path, no symlink leading out); ArtifactError otherwise."""
    p = PurePosixPath(rel) if isinstance(rel, str) else None
    if p is None or not rel or p.is_absolute() or ".." in p.parts or "\\" in rel:
        raise ArtifactError(f"{out}/{MANIFEST}: {what} {rel!r} is not a relative path inside the artifact")
    full = Path(out) / p
    try:
        resolved = full.resolve()
        root = Path(out).resolve()
    except OSError as e:            # a symlink loop
        raise ArtifactError(f"{full}: {e.strerror or e}") from None
    if not resolved.is_relative_to(root):
        raise ArtifactError(f"{out}/{MANIFEST}: {what} {rel!r} leads outside the artifact (to {resolved})")
    return full


def _paths_in(m: dict) -> Iterator[tuple[str, str]]:
    for rel in m.get("files", {}):
        yield "file", rel
    for section in ("programs", "engines", "weights"):
        stack = [m.get(section) or {}]
        while stack:
            d = stack.pop()
            for k, v in d.items():
                if isinstance(v, dict):
                    stack.append(v)
                elif k in _PATH_KEYS and isinstance(v, str):
                    yield f"{section} {k}", v


def read_manifest(out: str | Path) -> dict:
    """The manifest, once its digest matches and every path in it stays inside the artifact."""
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
    except OSError as e:
        raise ArtifactError(f"{path}: unreadable ({e.strerror or e})") from None
    if not isinstance(m, dict):
        raise ArtifactError(f"{path}: corrupt manifest (expected a JSON object)")
    if m.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version={m.get('format_version')!r} (accepted: {FORMAT_VERSION}; "
                            "re-export with this jambatrt)")
    if m.get("digest") != manifest_digest(m):
        raise ArtifactError(f"{path} does not match its own digest: it was edited or is corrupt "
                            "(re-run `jambatrt export`; manifests are written by jambatrt only)")
    if not isinstance(m.get("files"), dict):
        raise ArtifactError(f"{path}: no file list")
    for what, rel in _paths_in(m):
        inside(out, rel, what)
    listed = m["files"]
    for what, rel in _paths_in(m):
        if what != "file" and rel not in listed and not any(k.startswith(rel.rstrip("/") + "/") for k in listed):
            raise ArtifactError(f"{path}: {what} {rel!r} is not among the artifact's listed files")
    return m


def artifact_file(out: str | Path, manifest: dict, rel: str) -> Path:
    """The path of a file the manifest lists; ArtifactError for anything unlisted or outside."""
    if rel not in manifest.get("files", {}):
        raise ArtifactError(f"{out}: {rel} is not a file of this artifact's manifest")
    return inside(Path(out), rel)


# ---- files: record and verify --------------------------------------------------------------------
def file_entry(path: Path, sha256: str | None = None) -> dict:
    return {"sha256": sha256 or sha256_file(path), "bytes": path.stat().st_size}


def record_files(out: str | Path, manifest: dict, rels: Iterable[str], known: dict[str, str] | None = None) -> dict:
    """Record sha256 and size of `rels` (digests in `known` were computed while writing: not read
    again) and rewrite the manifest atomically."""
    out = Path(out)
    files = dict(manifest.get("files", {}))
    for rel in rels:
        files[rel] = file_entry(out / rel, (known or {}).get(rel))
    manifest["files"] = dict(sorted(files.items()))
    _remember(out, manifest, [r for r in rels if (known or {}).get(r)])
    return write_manifest(out, manifest)


def add_files(out: str | Path, manifest: dict, subdir: str) -> dict:
    """Record every file under `subdir` (replacing what was recorded there) and rewrite the manifest."""
    out = Path(out)
    prefix = subdir.rstrip("/") + "/"
    manifest["files"] = {k: v for k, v in manifest.get("files", {}).items() if not k.startswith(prefix)}
    rels = [str(p.relative_to(out)) for p in sorted((out / subdir).rglob("*")) if p.is_file()]
    return record_files(out, manifest, rels)


def _stat_key(p: Path) -> list[int]:
    st = p.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ino, st.st_dev]


def _load_record(out: Path) -> dict:
    try:
        r = json.loads((out / VERIFIED).read_text())
        return r if isinstance(r, dict) else {}
    except (OSError, ValueError):
        return {}


def _remember(out: Path, manifest: dict, rels: list[str]) -> None:
    """Note that `rels` were hashed in full and matched (best effort: a read-only artifact just
    gets hashed again next time)."""
    if not rels:
        return
    record = _load_record(out)
    for rel in rels:
        with contextlib.suppress(OSError):
            record[rel] = {"stat": _stat_key(out / rel), "sha256": manifest["files"][rel]["sha256"]}
    with contextlib.suppress(OSError):
        write_json_atomic(out / VERIFIED, record)


def verify_files(out: str | Path, manifest: dict | None = None, prefix: str = "", full: bool = False,
                 on_bytes: Callable[[int], None] | None = None, exclude: str | None = None) -> dict:
    """Check the files the manifest lists (optionally only those under `prefix`, and not `exclude`, a
    file or a folder): each present as a regular file of its recorded size; hashed in full when small,
    never checked before, changed since its last full check, or `full`. Raises ArtifactError listing
    every problem."""
    out = Path(out)
    manifest = manifest or read_manifest(out)
    record = {} if full else _load_record(out)
    problems, hashed = [], []
    for rel, entry in manifest.get("files", {}).items():
        if not rel.startswith(prefix) or (exclude and (rel == exclude or rel.startswith(exclude.rstrip("/") + "/"))):
            continue
        p = inside(out, rel, "file")
        if p.is_symlink() or not p.is_file():
            problems.append(f"missing file {rel}" if not p.exists() else f"{rel} is not a regular file")
            continue
        size = p.stat().st_size
        if size != entry.get("bytes"):
            problems.append(f"{rel} has {size:,} bytes, the manifest says {entry.get('bytes')!r} "
                            "(truncated, altered or partly copied)")
            continue
        rec = record.get(rel) or {}
        if not full and size >= FULL_HASH_BELOW and rec.get("stat") == _stat_key(p) \
                and rec.get("sha256") == entry["sha256"]:
            if on_bytes:
                on_bytes(size)
            continue
        if sha256_file(p, on_bytes=on_bytes) != entry.get("sha256"):
            problems.append(f"{rel} does not match its sha256 in {MANIFEST} (altered or corrupt)")
        elif size >= FULL_HASH_BELOW or full:
            hashed.append(rel)
    if problems:
        raise ArtifactError(f"{out}: " + "; ".join(problems) + " -- re-run `jambatrt export`/`build`")
    _remember(out, manifest, hashed)
    return manifest
