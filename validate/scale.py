"""`make bench-scale`: the pipeline at the size of the models it exists for, on one machine.

A Jamba-1.5-Mini-shaped slice: Mini's dimensions (hidden 4096, 16 experts of 14336, vocab 65536,
d_state 16, dt_rank 256), two layers (attention + dense MLP; Mamba + MoE), 3.7e9 parameters, 7.4 GB
of bf16 in 2 GB shards with an index and per-expert key names as AI21's checkpoints store them,
written tensor by tensor. Then, each in a child process whose tree's private memory (RssAnon,
sampled: mapped weight files do not count, copies of them do) is recorded:

    export (float32), export (bfloat16)      bound: 3 GB each
    build --backend ort                      bound: 3 GB, no weight copy under the artifact
    validate --backend ort --lengths 1,17    bound: 6 GB

The artifact's size is compared with one copy of each weight (float32: 4 B per non-expert
parameter, 1 B per expert parameter, plus the scales), and export throughput with the disk's own
write and cold-read bandwidth measured in the same run. Writes bench/scale/scale.json and .md.

    python -m jambatrt.validate.scale [--dir bench/scale] [--keep]"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import time
from pathlib import Path

GB = 1e9
BOUNDS = {"export float32": 3 * GB, "export bfloat16": 3 * GB, "build ort": 3 * GB, "validate ort": 6 * GB}
SLICE = dict(num_hidden_layers=2, attn_layer_period=2, attn_layer_offset=0, expert_layer_period=2,
             expert_layer_offset=1)


def slice_config():
    from jambatrt.config import preset
    return preset("jamba-1.5-mini", **SLICE)


def _drop_cache(path: Path) -> None:
    """Evict a file's clean pages from the page cache (no root needed), so the next read is cold."""
    for p in ([path] if path.is_file() else sorted(path.rglob("*"))):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def disk_bandwidth(where: Path, nbytes: int = 2 << 30) -> dict:
    """Sequential write (fsync'd) and cold sequential read of one file, bytes/s."""
    f = where / ".bandwidth-probe"
    block = os.urandom(1 << 20) * 16
    t = time.perf_counter()
    with open(f, "wb") as out:
        for _ in range(nbytes // len(block)):
            out.write(block)
        out.flush()
        os.fsync(out.fileno())
    write = nbytes / (time.perf_counter() - t)
    _drop_cache(f)
    t = time.perf_counter()
    with open(f, "rb") as inp:
        while inp.read(1 << 24):
            pass
    read = nbytes / (time.perf_counter() - t)
    f.unlink()
    return {"write_bytes_per_s": write, "read_bytes_per_s": read, "probe_bytes": nbytes}


def one_copy_bytes(cfg, dtype_bytes: int) -> int:
    """One copy of each weight: non-expert parameters at the export dtype, experts int8 + fp32 scales."""
    from jambatrt.export.checkpoint import hf_tensor_shapes
    expert = sum(math.prod(s) for n, s in hf_tensor_shapes(cfg).items() if ".experts." in n)
    dense = sum(math.prod(s) for n, s in hf_tensor_shapes(cfg).items() if ".experts." not in n)
    moe_layers = sum(cfg.is_moe(i) for i in range(cfg.num_hidden_layers))
    scales = moe_layers * cfg.num_experts * (2 * cfg.intermediate_size + cfg.hidden_size) * 4
    return dense * dtype_bytes + expert + scales


def _run(name: str, args: list[str], results: dict, log) -> None:
    from jambatrt.validate.memory import run_sampled
    p, peak, wall = run_sampled([sys.executable, "-m", "jambatrt", *map(str, args)])
    ok = p.returncode == 0 and peak <= BOUNDS[name]
    results["stages"][name] = {"returncode": p.returncode, "peak_rss_anon_bytes": peak, "bound_bytes": BOUNDS[name],
                               "seconds": round(wall, 1), "passed": ok,
                               "stderr_tail": p.stderr[-600:] if p.returncode else ""}
    log(f"{name:<18} rc {p.returncode}  peak private {peak / GB:5.2f} GB (bound {BOUNDS[name] / GB:.0f})  "
        f"{wall:6.1f} s  {'ok' if ok else 'FAIL'}")
    if p.returncode:
        log(p.stderr[-2000:])


def run(root: Path, keep: bool = False, reuse: bool = False, log=print) -> dict:
    import torch

    from jambatrt.artifact import read_manifest
    from jambatrt.export.checkpoint import write_preset
    from jambatrt.export.store import read_header

    root.mkdir(parents=True, exist_ok=True)
    ckpt = root / "checkpoint"
    cfg = slice_config()
    results: dict = {"config": {k: getattr(cfg, k) for k in ("hidden_size", "intermediate_size", "num_experts",
                                                            "vocab_size", "mamba_d_state", "mamba_dt_rank")},
                     "stages": {}}
    results["disk"] = disk = disk_bandwidth(root)
    log(f"disk: write {disk['write_bytes_per_s'] / GB:.2f} GB/s, cold read {disk['read_bytes_per_s'] / GB:.2f} GB/s")
    t = time.perf_counter()
    reused = reuse and (ckpt / "model.safetensors.index.json").is_file()
    if not reused:
        shutil.rmtree(ckpt, ignore_errors=True)
        write_preset("jamba-1.5-mini", ckpt, dtype=torch.bfloat16, max_shard_bytes=2 * 10 ** 9, **SLICE)
    shards = sorted(ckpt.glob("*.safetensors"))
    ck_bytes = sum(p.stat().st_size for p in shards)
    params = sum(math.prod(i["shape"]) for s in shards for i in read_header(s)[0].values())
    results["checkpoint"] = {"bytes": ck_bytes, "parameters": params, "shards": len(shards),
                             "seconds": round(time.perf_counter() - t, 1), "reused": reused}
    log(f"checkpoint: {params / 1e9:.2f}e9 parameters, {ck_bytes / GB:.2f} GB in {len(shards)} shards "
        f"({results['checkpoint']['seconds']} s)")

    for dname, dbytes in (("float32", 4), ("bfloat16", 2)):
        art = root / f"artifact-{dname}"
        _drop_cache(ckpt)                    # the export reads the checkpoint cold, as after a download
        _run(f"export {dname}", ["export", ckpt, "-o", art, "--dtype", dname, "--force"], results, log)
        if results["stages"][f"export {dname}"]["returncode"]:
            continue
        m = read_manifest(art)
        size = sum(p.stat().st_size for p in art.rglob("*") if p.is_file())
        want = one_copy_bytes(cfg, dbytes)
        written = m["weights"]["bytes"]
        t_w = m["export_seconds"]["weights"]
        ideal = ck_bytes / disk["read_bytes_per_s"] + written / disk["write_bytes_per_s"]
        results["stages"][f"export {dname}"].update({
            "artifact_bytes": size, "one_copy_bytes": want, "artifact_over_one_copy": size / want,
            "weights_seconds": t_w, "read_plus_write_bytes_per_s": (ck_bytes + written) / t_w,
            "disk_bound_seconds": ideal, "fraction_of_disk_bound": ideal / t_w})
        log(f"  artifact {size / GB:.2f} GB = {size / want:.3f} x one copy ({want / GB:.2f} GB); weights "
            f"{t_w:.1f} s ({(ck_bytes + written) / t_w / GB:.2f} GB/s read+write, disk bound {ideal:.1f} s: "
            f"{ideal / t_w:.0%} of it)")

    art = root / "artifact-float32"
    if art.exists():
        before = {p for p in art.rglob("*") if p.is_file()}
        _run("build ort", ["build", art, "--backend", "ort"], results, log)
        new = [p for p in art.rglob("*") if p.is_file() and p not in before]
        results["stages"]["build ort"]["new_files_bytes"] = {str(p.relative_to(art)): p.stat().st_size for p in new}
        copies = [p for p in new if p.stat().st_size > 64 << 20]
        results["stages"]["build ort"]["weight_copies"] = [str(p) for p in copies]
        results["stages"]["build ort"]["passed"] &= not copies
        log(f"  new files: {', '.join(f'{p.name} {p.stat().st_size / 1e6:.1f} MB' for p in new)}")
        _run("validate ort", ["validate", art, "--backend", "ort", "--lengths", "1,17", "--report",
                              root / "parity.json"], results, log)
    results["passed"] = all(s["passed"] for s in results["stages"].values()) and len(results["stages"]) == 4
    write_report(results, root)
    if not keep:
        for p in [ckpt, *root.glob("artifact-*")]:
            shutil.rmtree(p, ignore_errors=True)
    return results


def write_report(results: dict, root: Path) -> None:
    from jambatrt.artifact import write_json_atomic
    write_json_atomic(root / "scale.json", results)
    d = results["disk"]
    lines = ["# jambatrt at Jamba-1.5-Mini's dimensions (2-layer slice)", "",
             f"checkpoint: {results['checkpoint']['parameters']:,} parameters, "
             f"{results['checkpoint']['bytes'] / GB:.2f} GB bf16 in {results['checkpoint']['shards']} shards; "
             f"disk: write {d['write_bytes_per_s'] / GB:.2f} GB/s, cold read {d['read_bytes_per_s'] / GB:.2f} GB/s",
             "", "| stage | peak private memory | bound | seconds | result |", "|---|---|---|---|---|"]
    for name, s in results["stages"].items():
        lines.append(f"| {name} | {s['peak_rss_anon_bytes'] / GB:.2f} GB | {s['bound_bytes'] / GB:.0f} GB | "
                     f"{s['seconds']} | {'ok' if s['passed'] else 'FAIL'} |")
    for name, s in results["stages"].items():
        if "artifact_bytes" in s:
            lines.append(f"\n{name}: artifact {s['artifact_bytes'] / GB:.2f} GB = {s['artifact_over_one_copy']:.3f} x "
                         f"one copy of each weight; weights written in {s['weights_seconds']:.1f} s = "
                         f"{s['fraction_of_disk_bound']:.0%} of the disk's read+write bound")
    (root / "scale.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m jambatrt.validate.scale", description=__doc__.split("\n\n")[0])
    p.add_argument("--dir", default="bench/scale", help="working and report directory (default bench/scale)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoint and artifacts (~18 GB)")
    p.add_argument("--reuse", action="store_true", help="use the checkpoint a --keep run left in DIR")
    a = p.parse_args(argv)
    r = run(Path(a.dir), keep=a.keep, reuse=a.reuse)
    print(f"report: {Path(a.dir) / 'scale.json'} ({'passed' if r['passed'] else 'FAILED'})")
    return 0 if r["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
