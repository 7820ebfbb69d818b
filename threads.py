"""How the OpenMP threads of this package's kernels wait between parallel regions.

numba's parallel kernels (`parallel=True`, threading layer omp) and torch's CPU ops run on one
libgomp thread team. A decode step of the int8 peer preset enters ~60 parallel regions (each large
GEMV, the MoE layers, the scans), tens of microseconds apart, with ONNX Runtime's nodes and the
Python op boundary in between. What the team's worker does when a region ends decides what the
next one costs:
- sleep at once (OMP_WAIT_POLICY=PASSIVE: spin count 0): waking it takes 30-75 us per region on
  this 2-core machine, against 1.5-4 us when it is still spinning. The int8 peer decode step took
  15-19 ms so, 10.6-12.5 ms with the spin below (issue 18; `make bench-peer`);
- spin for long (OMP_WAIT_POLICY=ACTIVE, or libgomp's default of 300000 spins): the core stays
  busy long after the kernel, while ONNX Runtime's own threads (float32 MatMuls; they never spin,
  engines/ort.py) and the caller need it;
- GOMP_SPINCOUNT=20000: spin through the gaps of a step (well under a millisecond), then sleep.
  libgomp lets GOMP_SPINCOUNT override OMP_WAIT_POLICY, which stays PASSIVE for any other OpenMP
  runtime in the process.
libgomp reads both once, when it loads (with torch), so `import jambatrt` sets them first; values
already in the environment win."""

from __future__ import annotations

import os

OMP_ENV = {"OMP_WAIT_POLICY": "PASSIVE", "GOMP_SPINCOUNT": "20000"}


def set_omp_env() -> None:
    """OMP_ENV's values into os.environ where it has none (child processes inherit them)."""
    for k, v in OMP_ENV.items():
        os.environ.setdefault(k, v)
