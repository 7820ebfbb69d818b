"""The jamba:: custom ops. Importing this package registers them with torch.

REGISTRY maps op name -> module; each module holds SPEC, the custom op `<name>` and `<name>_ref`."""

from jambatrt.export.ops import attention, causal_conv1d, moe_int8, selective_scan
from jambatrt.export.ops.spec import DOMAIN, DOMAIN_VERSION, OpSpec

REGISTRY = {m.SPEC.name: m for m in (causal_conv1d, selective_scan, moe_int8, attention)}
SPECS: dict[str, OpSpec] = {name: m.SPEC for name, m in REGISTRY.items()}


def reference(name: str):
    """The plain-PyTorch oracle `<name>_ref` of op `name`."""
    return getattr(REGISTRY[name], f"{name}_ref")


__all__ = ["REGISTRY", "SPECS", "DOMAIN", "DOMAIN_VERSION", "OpSpec", "reference"]
