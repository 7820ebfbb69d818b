"""Engines: build and run the artifact's step program behind one interface (engines/base.py).

`engine_class(backend)` is the factory: it imports the backend's module only when asked, so heavy
libraries (onnxruntime, tensorrt, torch's Inductor) load on demand."""

from __future__ import annotations

import importlib

from jambatrt.errors import InputError

# backend name -> "module:class"; base.py knows no backend
BACKENDS = {"ort": "jambatrt.engines.ort:OrtEngine", "tensorrt": "jambatrt.engines.tensorrt:TensorRTEngine",
            "aoti": "jambatrt.engines.aoti:AotiEngine"}


def engine_class(backend: str):
    """The Engine subclass for a backend name."""
    if backend not in BACKENDS:
        raise InputError(f"unknown backend {backend!r} (accepted: {', '.join(BACKENDS)})")
    module, cls = BACKENDS[backend].split(":")
    return getattr(importlib.import_module(module), cls)
