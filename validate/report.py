"""Reports: the JSON DESIGN.md fixes, plus a markdown summary naming versions, machine and tolerances."""

from __future__ import annotations

import json
import os
import platform
from pathlib import Path

from jambatrt.artifact import library_versions, write_json_atomic


def machine() -> dict:
    return {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count(),
            "processor": platform.processor() or platform.machine()}


def write_parity(report: dict, path: str | Path, artifact_manifest: dict | None = None) -> tuple[Path, Path]:
    """Write report JSON to `path` and a markdown summary beside it (same stem, .md)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    report = {**report, "machine": machine(), "versions": library_versions()}
    if artifact_manifest:
        report["model"] = {"source": artifact_manifest.get("source"), "dtype": artifact_manifest.get("dtype"),
                           "quantization": artifact_manifest.get("quantization")}
    write_json_atomic(path, report)
    md = path.with_suffix(".md")
    md.write_text(parity_markdown(report))
    return path, md


def parity_markdown(r: dict) -> str:
    tol = r.get("tolerances", {})
    src = (r.get("model") or {}).get("source") or {}
    lines = [f"# Parity: {r['backend']} engine vs {r['reference']} reference — "
             f"{'PASSED' if r['passed'] else 'FAILED'}", "",
             f"- model: {src.get('preset') or src.get('checkpoint', '?')}, dtype {r['dtype']}, "
             f"experts {((r.get('model') or {}).get('quantization') or {}).get('experts', '?')}, batch {r.get('batch', 1)}",
             f"- tolerances: atol {tol.get('atol')}, rtol {tol.get('rtol')}, top-1 agreement >= {tol.get('top1')}",
             f"- machine: {r['machine']['platform']}, {r['machine']['cpus']} CPUs, Python {r['machine']['python']}",
             "- versions: " + ", ".join(f"{k} {v}" for k, v in r.get("versions", {}).items()), "",
             "| length | max abs err | mean abs err | top-1 agreement | engine s | reference s | passed |",
             "|---:|---:|---:|---:|---:|---:|:---:|"]
    for x in r["results"]:
        s = x.get("seconds", {})
        lines.append(f"| {x['length']:,} | {x['max_abs_err']:.3e} | {x['mean_abs_err']:.3e} | {x['top1_agreement']:.4f} "
                     f"| {s.get('engine', float('nan')):.3f} | {s.get('reference', float('nan')):.3f} "
                     f"| {'yes' if x['passed'] else 'NO'} |")
    if r.get("mismatches"):
        lines += ["", "## Mismatches", ""] + [f"- {m}" for m in r["mismatches"]]
    return "\n".join(lines) + "\n"


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
