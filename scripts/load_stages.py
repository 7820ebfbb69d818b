#!/usr/bin/env python3
"""Load on the pipeline-stage ensemble (issue 19): N greedy generations from C concurrent clients
through a real tritonserver serving `jambatrt deploy --stages` (127.0.0.1, behind the request guard).

    .venv/bin/python scripts/load_stages.py OUT [--requests 200 --clients 8 --max-new-tokens 8]
        [--report bench/load_stages.json --plot bench/load_stages.png]

OUT: an artifact with stage engines (`jambatrt build OUT --backend ort --stages N`). One request
is one generation: its prompt (1..32 random tokens) with START, then one request per new token,
END on the last (JambaClient.generate_steps), each on its own sequence id. Every generation is
checked against the stage engines run offline (engines/staged.py, the same greedy tokens); the
script prints and writes errors, mismatches, p50/p99/max latency per generation and per step,
generations/s. Not part of `make test`: a benchmark (JSON + plot), never a timed assert.
Exit status 1 on any error or mismatch."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", help="artifact with stage engines")
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--seed", type=int, default=19)
    ap.add_argument("--report", default="bench/load_stages.json")
    ap.add_argument("--plot", default=None, help="PNG (default: beside the report)")
    a = ap.parse_args(argv)

    import numpy as np

    from jambatrt.deploy.client import JambaClient
    from jambatrt.deploy.repository import RepositorySettings, write_repository
    from jambatrt.deploy.server import TritonServer, find_serve_env
    from jambatrt.engines.generate import generate
    from jambatrt.engines.staged import StagedEngine

    rng = np.random.default_rng(a.seed)
    with StagedEngine.load(a.out) as offline:
        V = offline.config.vocab_size
        prompts = [rng.integers(0, V, int(rng.integers(1, 33))).tolist() for _ in range(a.requests)]
        want = [generate(offline, [p], a.max_new_tokens)[0][0].generated_ids for p in prompts]
        stages = len(offline.stages)
    latencies: list[float] = []
    step_latencies: list[float] = []
    errors: list[str] = []
    mismatches: list[int] = []
    lock = threading.Lock()
    with tempfile.TemporaryDirectory(prefix="load-stages-") as tmp:
        repo = Path(tmp) / "models"
        write_repository(a.out, repo, RepositorySettings(stages=True, max_tokens=64))
        srv = TritonServer(repo, find_serve_env(), log_path=Path(tmp) / "tritonserver.log")
        try:
            srv.start(timeout=300)

            def worker(k):
                with JambaClient(srv.http_url, timeout=120) as c:
                    for i in range(k, a.requests, a.clients):
                        t0 = time.perf_counter()
                        try:
                            got = c.generate_steps(prompts[i], a.max_new_tokens, sequence_id=10_000 + i)
                        except Exception as e:            # noqa: BLE001 - counted and reported
                            with lock:
                                errors.append(f"request {i}: {e}")
                            continue
                        dt = time.perf_counter() - t0
                        with lock:
                            latencies.append(dt)
                            step_latencies.append(dt / a.max_new_tokens)
                            if got != want[i]:
                                mismatches.append(i)

            t0 = time.perf_counter()
            with ThreadPoolExecutor(a.clients) as pool:
                list(pool.map(worker, range(a.clients)))
            wall = time.perf_counter() - t0
            ready = srv.is_ready()
        finally:
            srv.stop()
    ms = np.array(latencies) * 1e3
    step_ms = np.array(step_latencies) * 1e3
    pct = (lambda x, q: float(np.percentile(x, q)) if len(x) else None)
    report = {"artifact": str(Path(a.out).resolve()), "stages": stages, "requests": a.requests, "clients": a.clients,
              "max_new_tokens": a.max_new_tokens, "prompt_tokens": "1..32", "errors": len(errors),
              "error_examples": errors[:5], "mismatches": len(mismatches), "server_ready_after": ready,
              "generation_ms": {"p50": pct(ms, 50), "p99": pct(ms, 99), "max": float(ms.max()) if len(ms) else None},
              "per_step_ms": {"p50": pct(step_ms, 50), "p99": pct(step_ms, 99)},
              "generations_per_s": a.requests / wall, "wall_s": wall, "cpus": os.cpu_count(),
              "note": "one generation = prompt with START + one request per new token (END on the last), "
                      "through the ensemble NAME_sequence; CPU, ORT stage engines"}
    path = Path(a.report)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=2) + "\n")
    png = Path(a.plot) if a.plot else path.with_suffix(".png")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.hist(ms, bins=40)
        ax.set_xlabel(f"latency per generation (ms; prompt + {a.max_new_tokens} tokens)")
        ax.set_ylabel("generations")
        ax.set_title(f"{a.requests} generations, {a.clients} clients, {stages} stages: p50 {pct(ms, 50):.0f} ms, "
                     f"p99 {pct(ms, 99):.0f} ms", fontsize=9)
        fig.tight_layout()
        fig.savefig(png, dpi=100)
    except ImportError:
        png = None
    print(f"{a.requests} generations from {a.clients} clients through {stages} stages: {len(errors)} errors, "
          f"{len(mismatches)} mismatches vs the offline stage engines; per generation p50 {pct(ms, 50):.1f} ms, "
          f"p99 {pct(ms, 99):.1f} ms, max {ms.max():.1f} ms; per step p50 {pct(step_ms, 50):.1f} ms, "
          f"p99 {pct(step_ms, 99):.1f} ms; {a.requests / wall:.1f} generations/s on {os.cpu_count()} CPUs; "
          f"server ready after: {ready}")
    print(f"report: {path}" + (f" (plot {png})" if png else ""))
    return 0 if not errors and not mismatches and ready else 1


if __name__ == "__main__":
    sys.exit(main())
