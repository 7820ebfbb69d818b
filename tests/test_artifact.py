"""The artifact at scale and under abuse (issues 13, 15): one weight store, relocatable, a manifest that
is trusted only when its digest and paths check out, integrity checks that stay cheap for large
files, and writes that leave nothing behind when interrupted, killed, raced or out of space."""

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time

import pytest

from conftest import run_cli
from jambatrt.artifact import (FULL_HASH_BELOW, VERIFIED, manifest_digest, read_manifest, verify_files,
                               write_manifest)
from jambatrt.errors import ArtifactError


@pytest.fixture(scope="module")
def built(tmp_path_factory, tiny_artifact):
    """A private copy of the tiny artifact with its ONNX Runtime engine (tests below edit it)."""
    art = tmp_path_factory.mktemp("built") / "art"
    shutil.copytree(tiny_artifact, art)
    run_cli("build", art, "--backend", "ort", check=True)
    return art


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_error(p, *needles):
    assert p.returncode == 2, (p.returncode, p.stderr[-2000:])
    assert "Traceback" not in p.stderr, p.stderr
    for n in needles:
        assert n in p.stderr, (n, p.stderr)


# ---- relocation ---------------------------------------------------------------------------------
def test_moved_and_copied_artifact_validates_and_generates(built, tmp_path):
    """After export nothing reads the source checkpoint: the artifact moved (and a copy of it)
    validates against the eager reference and generates, with no path back to where it was made."""
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    shutil.copytree(built, tmp_path / "staging")
    os.rename(tmp_path / "staging", moved)
    copied = _copy(moved, tmp_path / "copied")
    shutil.rmtree(moved)                   # the copy must not lean on the original either
    p = run_cli("validate", copied, "--backend", "ort", "--lengths", "1,17", "--report", tmp_path / "r.json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert json.loads((tmp_path / "r.json").read_text())["passed"]
    p = run_cli("generate", copied, "--backend", "ort", "--prompt-ids", "1,2,3", "--max-new-tokens", "4", "--json")
    assert p.returncode == 0, p.stderr[-2000:]
    assert len(json.loads(p.stdout.strip().splitlines()[-1])["generated_ids"]) == 4
    text = (copied / "manifest.json").read_text() + (copied / "model.onnx").read_bytes().decode("latin-1")
    assert str(built) not in text


def test_ort_engine_adds_no_weight_copy(built):
    """The ONNX Runtime engine is a lowered graph whose initializers point into weights.safetensors."""
    import onnx
    from onnx.external_data_helper import ExternalDataInfo, uses_external_data

    m = read_manifest(built)
    engine = built / m["engines"]["ort"]["path"]
    assert engine.stat().st_size < (built / "weights.safetensors").stat().st_size
    model = onnx.load(str(engine), load_external_data=False)
    assert {ExternalDataInfo(t).location for t in model.graph.initializer if uses_external_data(t)} \
        == {"weights.safetensors"}
    assert sum(len(t.raw_data) for t in model.graph.initializer if not uses_external_data(t)) < 4096
    stores = [p.name for p in built.rglob("*") if p.suffix in (".data", ".safetensors", ".bin")]
    assert stores == ["weights.safetensors"], stores


# ---- the manifest is trusted only when verified (issue 15 item 2) ----------------------------------
def _edit(art, fn, resign=False):
    m = json.loads((art / "manifest.json").read_text())
    fn(m)
    if resign:       # an editor who also recomputes the digest: the path checks must still hold
        m["digest"] = manifest_digest(m)
    (art / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("case", ["dtype", "vocab", "drop_file", "engine_outside", "passwd", "absolute"])
def test_tampered_manifest_is_refused(built, tmp_path, case):
    art = _copy(built, tmp_path / "art")
    other = _copy(built, tmp_path / "other")
    edits = {
        "dtype": (lambda m: m.update(dtype="bfloat16"), False, "does not match its own digest"),
        "vocab": (lambda m: m["config"].update(vocab_size=999), False, "does not match its own digest"),
        "drop_file": (lambda m: m["files"].pop("weights.safetensors"), False, "does not match its own digest"),
        "engine_outside": (lambda m: m["engines"]["ort"].update(path="../other/model.ort.onnx"), True,
                           "not a relative path inside the artifact"),
        "passwd": (lambda m: m["files"].update({"../../../../etc/passwd": {"sha256": "0" * 64, "bytes": 1}}), True,
                   "not a relative path inside the artifact"),
        "absolute": (lambda m: m["programs"]["step"].update(onnx=str(other / "model.onnx")), True,
                     "not a relative path inside the artifact"),
    }
    fn, resign, needle = edits[case]
    _edit(art, fn, resign)
    for cmd in (["build", art, "--backend", "ort"], ["validate", art, "--backend", "ort", "--lengths", "1"],
                ["generate", art, "--backend", "ort", "--prompt-ids", "1", "--max-new-tokens", "1"]):
        _one_line_error(run_cli(*cmd), "ArtifactError", needle)


def test_unlisted_engine_is_refused(built, tmp_path):
    """An engine path that the file list does not cover (hence was never hashed) is refused."""
    art = _copy(built, tmp_path / "art")
    shutil.copy(art / "model.ort.onnx", art / "sneaky.onnx")
    _edit(art, lambda m: m["engines"]["ort"].update(path="sneaky.onnx"), resign=True)
    _one_line_error(run_cli("generate", art, "--backend", "ort", "--prompt-ids", "1", "--max-new-tokens", "1"),
                    "sneaky.onnx", "not among the artifact's listed files")


def test_symlink_out_of_the_artifact_is_refused(built, tmp_path):
    art = _copy(built, tmp_path / "art")
    outside = tmp_path / "outside.onnx"
    shutil.copy(art / "model.ort.onnx", outside)
    (art / "model.ort.onnx").unlink()
    (art / "model.ort.onnx").symlink_to(outside)
    with pytest.raises(ArtifactError, match="leads outside the artifact"):
        verify_files(art)


# ---- integrity that scales ------------------------------------------------------------------------
def test_truncated_or_altered_weights_are_caught(built, tmp_path, monkeypatch):
    """Size is checked on every load; content on the first full check and by `jambatrt verify`. With a
    valid record of an earlier full check, an edit that keeps size and mtime is found only by
    verify: the documented trade-off (artifact.py)."""
    import jambatrt.artifact as A
    monkeypatch.setattr(A, "FULL_HASH_BELOW", 1024)        # treat the tiny store as a large file
    art = _copy(built, tmp_path / "art")
    weights = art / "weights.safetensors"
    verify_files(art)                                       # full check, recorded
    record = json.loads((art / VERIFIED).read_text())
    assert "weights.safetensors" in record

    st = weights.stat()
    with open(weights, "r+b") as f:                         # flip one byte, keep size and mtime
        f.seek(st.st_size // 2)
        b = f.read(1)
        f.seek(st.st_size // 2)
        f.write(bytes([b[0] ^ 1]))
    os.utime(weights, ns=(st.st_atime_ns, st.st_mtime_ns))
    verify_files(art)                                       # cheap check: not seen (the trade-off)
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        verify_files(art, full=True)
    p = run_cli("verify", art)
    _one_line_error(p, "weights.safetensors does not match its sha256")

    (art / VERIFIED).unlink()                               # no record: the first use hashes it in full
    with pytest.raises(ArtifactError, match="weights.safetensors does not match its sha256"):
        verify_files(art)

    with open(weights, "r+b") as f:                         # truncation: caught by size, every time
        f.truncate(st.st_size - 10)
    with pytest.raises(ArtifactError, match="weights.safetensors has .* bytes, the manifest says"):
        verify_files(art)


def test_build_replaces_a_missing_or_damaged_engine_but_not_damaged_inputs(built, tmp_path):
    """`jambatrt build` verifies the artifact before any work, but not the engine it is about to replace:
    an engine file truncated or deleted is rebuilt (the error of every other command says to re-run
    build); a damaged input (the weights) is still refused, and the old engine left as it was."""
    art = _copy(built, tmp_path / "art")
    engine = art / read_manifest(art)["engines"]["ort"]["path"]
    good = engine.read_bytes()
    for damage in (lambda: engine.write_bytes(good[:100]), engine.unlink):
        damage()
        p = run_cli("build", art, "--backend", "ort")
        assert p.returncode == 0, p.stderr
        assert engine.read_bytes() == good
        verify_files(art, full=True)
    weights = art / "weights.safetensors"
    with open(weights, "r+b") as f:
        f.truncate(weights.stat().st_size - 10)
    p = run_cli("build", art, "--backend", "ort")
    _one_line_error(p, "weights.safetensors has", "bytes, the manifest says")
    assert engine.read_bytes() == good


def test_verify_command(built):
    p = run_cli("verify", built)
    assert p.returncode == 0, p.stderr
    assert "match their sha256" in p.stdout
    assert FULL_HASH_BELOW > 1 << 20


def test_manifest_rewrite_keeps_digest(built, tmp_path):
    art = _copy(built, tmp_path / "art")
    m = read_manifest(art)
    m["engines"]["note"] = {"path": "model.ort.onnx"}
    write_manifest(art, m)
    assert read_manifest(art)["engines"]["note"] == {"path": "model.ort.onnx"}


# ---- writes that leave nothing behind (issue 15 items 4, 5) -----------------------------------------
def _temps(parent, name):
    return [p for p in parent.iterdir() if p.name.startswith(f".{name}.")]


def test_concurrent_exports_do_not_replace_each_other(tmp_path):
    """Two exports to one OUT at once: one lands, the other fails at the final rename instead of
    silently replacing it."""
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jambatrt", "export", "--preset", "tiny", "-o", str(out)]
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    err = next(e for rc, e in results if rc == 2)
    assert "ArtifactError" in err and ("appeared while" in err or "already exists" in err), err
    assert "Traceback" not in err
    read_manifest(out)
    verify_files(out, full=True)
    assert not _temps(tmp_path, "out")


def _temp_holds_file(parent, name) -> bool:
    """A temp dir of `name` holds a file; False as well when it vanishes while being looked at (the
    writer renamed or removed it)."""
    try:
        return any(f.is_file() for t in _temps(parent, name) for f in t.rglob("*"))
    except FileNotFoundError:
        return False


def _stop_mid_write(cmd, parent, name, attempts: int = 3):
    """Runs cmd until a temp dir of `name` under `parent` holds a file, then stops it there (SIGSTOP):
    the process, or None if every attempt finished before that (a fast machine's tiny export can
    write and rename its temp dir between two polls)."""
    for _ in range(attempts):
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.time() + 300
        while p.poll() is None and time.time() < deadline:
            if _temp_holds_file(parent, name):
                p.send_signal(signal.SIGSTOP)
                if p.poll() is None and _temps(parent, name):
                    return p
                break
            time.sleep(0.001)
        p.send_signal(signal.SIGCONT)
        p.wait(timeout=120)
        shutil.rmtree(parent / name, ignore_errors=True)
    return None


def test_sigterm_leaves_nothing_and_stale_temps_are_cleaned(tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "jambatrt", "export", "--preset", "tiny", "-o", str(out)]
    p = _stop_mid_write(cmd, tmp_path, "out")
    assert p is not None, "every export finished before its temp dir could be caught holding a file"
    p.send_signal(signal.SIGTERM)              # delivered when it continues, mid-write
    p.send_signal(signal.SIGCONT)
    assert p.wait(timeout=120) == 143, p.stderr.read()
    assert not out.exists() and not _temps(tmp_path, "out")

    # a SIGKILLed run's leftovers: its pid is gone, so the next run removes them and says so
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = tmp_path / f".out.tmp-{dead.pid}-abcd"
    (stale / "sub").mkdir(parents=True)
    (stale / "sub" / "weights.safetensors").write_bytes(b"x" * 1000)
    mine = tmp_path / f".out.tmp-{os.getpid()}-live"          # a live process's temp dir stays
    mine.mkdir()
    r = run_cli("export", "--preset", "tiny", "-o", out)
    assert r.returncode == 0, r.stderr
    assert f"removed {stale}" in r.stderr
    assert not stale.exists() and mine.exists()


def test_disk_full_leaves_nothing(tmp_path, tiny_ckpt):
    """A write that fails (here the file-size limit, EFBIG, as a full disk gives ENOSPC) ends the
    export with one line naming the file, and no partial artifact or temp dir is left."""
    out = tmp_path / "out"

    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (200_000, 200_000))

    p = subprocess.run([sys.executable, "-m", "jambatrt", "export", str(tiny_ckpt), "-o", str(out)],
                       capture_output=True, text=True, preexec_fn=limit, timeout=600)
    _one_line_error(p, "ArtifactError", "weights.safetensors", "cannot write")
    assert not out.exists() and not _temps(tmp_path, "out")
