"""The prepared GPU checks (`python -m jambatrt.validate.gpu_check`, `... .aoti_gpu_check`) run their own
CPU dry runs here, so a lent GPU's few minutes are never lost to a broken script: the same code
paths with Triton's interpreter / CPU packages at tiny sizes, every parity check graded."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(module: str, *args: str, timeout: int = 900) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    p = subprocess.run([sys.executable, "-m", f"jambatrt.validate.{module}", *args], capture_output=True, text=True,
                       timeout=timeout, env=env, cwd=REPO)
    assert p.returncode == 0, f"{module} {' '.join(args)} exited {p.returncode}:\n{p.stderr[-3000:]}"
    return json.loads(p.stdout[p.stdout.index("{"):])


def test_gpu_check_dry_run():
    summary = _run("gpu_check", "--quick", "--cpu-interpret")
    assert summary["dry_run"] and summary["passed"] and not summary["errors"]
    assert summary["parity_cases"] >= 30


def test_aoti_gpu_check_dry_run():
    pytest.importorskip("transformers", reason="transformers not installed (the script's baseline)")
    summary = _run("aoti_gpu_check", "--cpu-dry-run")
    assert summary["passed"] and not summary["errors"] and not summary["skipped"], summary["errors"]
    tiny = summary["tiny"]
    assert [r["length"] for r in tiny["parity"]] == [1, 300, 1000] and all(r["passed"] for r in tiny["parity"])
    assert tiny["decode"]["passed"]
    assert summary["bench"]["aoti"]["prefill_tokens_per_s"] > 0
    assert {r["mode"] for r in summary["mini_stack"]["results"]} == {"prefill", "decode"}
