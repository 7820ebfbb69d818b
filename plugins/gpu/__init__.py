"""GPU kernels (Triton) behind the jamba:: ops, one module per op: `selective_scan`, `causal_conv1d`,
`moe_int8`, `attention`. Each module holds the Triton kernels and, per kernel, one `<kernel>_launch`
function computing its `Launch` (grid, int32 arguments, constexprs) from sizes, which everything
that launches the kernel uses: the eager launcher with the signature of `<op>_ref` (torch tensors
on CUDA, or on CPU under TRITON_INTERPRET=1), its wrap_triton twin `<op>_traceable` (torch_ops.py)
and the TensorRT plugin's aot_impl (over shape expressions). `kernel_spec(launch, dtype)` is the
AOT variant of a launch and `aot_kernels()` every variant `aot.py` compiles ahead of time.

Conventions every kernel keeps, so that TensorRT's AOT plugins can launch it without Python:
- parameter order (input pointers, int32 extras, output pointers), then constexprs;
- contiguous row-major tensors; element offsets in int32 (no tensor holds 2^31 elements: see
  engines/chunking.py), except offsets into stacked expert weights, which are int64;
- no global or profile scratch (both sizes 0, checked by aot.py).

This package file imports nothing heavy: `KernelSpec` is plain data."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# torch dtype name -> Triton language element type (pointer signatures "*bf16"); not the server's
# model-config types (deploy/pbtxt.py)
TL_TYPES = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "i8", "int32": "i32"}


@dataclass(frozen=True)
class KernelSpec:
    """One compilable kernel variant.

    signature: parameter -> Triton type ("*bf16", "i32", ... or "constexpr"), in parameter order.
    inputs / extras / outputs: the parameter names in each group (TensorRT's order).
    grid: the launch grid as a rule over the int32 extras (documentation and AOT index)."""

    name: str                  # variant name: file stem in the AOT output ("selective_scan_chunked.bf16")
    op: str                    # the jamba op it implements
    fn: Any                    # the triton.jit function
    signature: dict[str, str]
    constexprs: dict[str, Any]
    num_warps: int
    grid: str
    inputs: tuple[str, ...]
    extras: tuple[str, ...]
    outputs: tuple[str, ...]
    num_stages: int = 1
    notes: str = ""
    attrs: dict = field(default_factory=dict)   # ASTSource attrs (e.g. pointer divisibility)

    @property
    def kernel_name(self) -> str:
        return self.fn.__name__ if hasattr(self.fn, "__name__") else self.fn.fn.__name__


@dataclass(frozen=True)
class Launch:
    """One launch of one kernel, computed once by its `<kernel>_launch` function and used by the
    eager launcher, its wrap_triton twin (torch_ops.py) and the TensorRT plugin's aot_impl (sizes
    are ints there, TensorRT shape expressions here): grid, int32 arguments (in parameter order,
    after the input pointers), constexprs, num_warps and num_stages (None: Triton's default)."""

    kernel: str                # the triton.jit function's name in its module
    grid: tuple                # (x, y, z)
    extras: tuple
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int | None = None

    def options(self) -> dict[str, Any]:
        """The keyword arguments of `kernel[grid](...)`."""
        out = {**self.constexprs, "num_warps": self.num_warps}
        if self.num_stages is not None:
            out["num_stages"] = self.num_stages
        return out


def direct(kernel):
    """Launch a kernel as it is (the eager launchers' default); torch.library.wrap_triton is the other
    way, for the traceable twins Inductor compiles."""
    return kernel


def cdiv(a, b):
    """ceil(a / b) for ints and for anything with + and // (TensorRT shape expressions have their own)."""
    return (a + b - 1) // b


def pointer_types(names, dtypes: dict[str, str]) -> list[str]:
    """["*bf16", ...] for pointer parameters; dtypes maps name -> torch dtype name."""
    return ["*" + TL_TYPES[dtypes[n]] for n in names]


def named_signature(fn, types: list[str]) -> dict[str, str]:
    """Pair the kernel's parameter names (in order) with Triton types ("*bf16", "i32", "constexpr")."""
    names = list(fn.arg_names)
    if len(names) != len(types):
        raise ValueError(f"{fn.__name__}: {len(names)} parameters, {len(types)} types given")
    return dict(zip(names, types))


def next_pow2(n: int) -> int:
    return 1 << max(0, int(n) - 1).bit_length()


def interpreting() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    import os
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0", "false", "False")


def check_device(*tensors) -> None:
    """Kernels run on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    from jambatrt.errors import BackendUnavailable, InputError
    devs = {t.device.type for t in tensors if t is not None}
    if len(devs) > 1:
        raise InputError(f"tensors on several devices {sorted(devs)} (accepted: all on one device)")
    if "cpu" in devs and not interpreting():
        raise BackendUnavailable("Triton kernels need CUDA tensors; on CPU set TRITON_INTERPRET=1 before "
                                 "importing jambatrt.plugins.gpu (slow: for tests only)")
    for t in tensors:
        if t is not None and t.numel() >= 2 ** 31:
            raise InputError(f"tensor of shape {list(t.shape)} has {t.numel():,} elements (accepted: < 2^31; "
                             f"split the sequence into chunks, see jambatrt.engines.chunking)")


def fix_interpreter() -> None:
    """Correct two bf16 gaps of Triton's CPU interpreter (seen in triton 3.9; harmless where fixed):
    it stores bf16 as raw uint16 bits, so `tl.dot` on bf16 operands multiplies the bit patterns,
    and int -> bf16 casts (`int8_weights.to(tl.bfloat16)`) copy integers into the bits. Both are
    routed through fp32 here. Only the interpreter is touched; compiled kernels are unaffected."""
    import numpy as np
    import triton.language as tl
    from triton.runtime import interpreter as interp

    builder = interp.InterpreterBuilder
    if getattr(builder, "_jambatrt_bf16_fixed", False):
        return

    def bf16_to_f32(bits):
        return (np.asarray(bits).astype(np.uint32) << 16).view(np.float32)

    def f32_to_bf16(x):
        u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
        return ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)   # round to nearest even

    cast_impl, create_dot = builder.cast_impl, builder.create_dot

    def fixed_cast(self, src, dst_type):
        s, d = src.dtype.scalar, dst_type.scalar
        if d == tl.bfloat16 and not s.is_floating():
            return interp.TensorHandle(f32_to_bf16(src.data.astype(np.float32)), tl.bfloat16)
        if s == tl.bfloat16 and not d.is_floating():
            return interp.TensorHandle(bf16_to_f32(src.data).astype(interp._get_np_dtype(dst_type)), d)
        return cast_impl(self, src, dst_type)

    def fixed_dot(self, a, b, d, *args, **kwargs):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            def up(h):
                return interp.TensorHandle(bf16_to_f32(h.data), tl.float32) if h.dtype.scalar == tl.bfloat16 else h
            a, b = up(a), up(b)
        return create_dot(self, a, b, d, *args, **kwargs)

    builder.cast_impl, builder.create_dot = fixed_cast, fixed_dot
    builder._jambatrt_bf16_fixed = True
