"""The jamba:: custom ops. Importing this package registers them with torch.

One module per op (the file name is the op's name); each holds SPEC (export/ops/spec.py: names,
ONNX types and shape rules, tolerances), the custom op `<name>`, its fake and `<name>_ref`. The
modules are found here by listing the package: adding an op is adding its file.
REGISTRY maps op name -> module, SPECS op name -> SPEC."""

import importlib
import pkgutil

from jambatrt.export.ops.spec import ACTIVATION, DOMAIN, DOMAIN_VERSION, OpSpec

REGISTRY = {}
for _m in sorted(m.name for m in pkgutil.iter_modules(__path__) if m.name != "spec"):
    _module = importlib.import_module(f"{__name__}.{_m}")
    if _module.SPEC.name != _m:
        raise ImportError(f"{_module.__file__}: SPEC.name {_module.SPEC.name!r} (the file is named after its op)")
    REGISTRY[_m] = _module
SPECS: dict[str, OpSpec] = {name: m.SPEC for name, m in REGISTRY.items()}


def reference(name: str):
    """The plain-PyTorch oracle `<name>_ref` of op `name`."""
    return getattr(REGISTRY[name], f"{name}_ref")


__all__ = ["REGISTRY", "SPECS", "ACTIVATION", "DOMAIN", "DOMAIN_VERSION", "OpSpec", "reference"]
