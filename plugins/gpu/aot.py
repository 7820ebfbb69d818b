"""Ahead-of-time compilation of every GPU kernel to PTX and cubin, with no GPU
(`jambatrt plugins --arch sm_80,sm_90 -o DIR`).

Writes DIR/<arch>/<variant>.ptx and .cubin and DIR/index.json: per kernel variant and arch the
Triton function, signature, constexprs, parameter groups (inputs, int32 extras, outputs — the
order TensorRT's AOT plugins launch with), num_warps, shared memory, the sizes of the two hidden
scratch parameters Triton appends to every kernel (global_scratch, profile_scratch: both must be
0, since TensorRT passes no such buffers), registers, stack (spills), static shared memory and
theoretical occupancy when cuobjdump is at hand, sha256 of every file and the Triton version.

PTX is pinned to ISA 8.0 for sm_80/sm_90: Triton's default (the newest its ptxas knows) is
rejected by older drivers ("PTX was compiled with an unsupported toolchain")."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from jambatrt.errors import BackendUnavailable, InputError

FORMAT_VERSION = 1
# TensorRT's AOT plugin launch does not opt a kernel into more than the default 48 KiB of shared
# memory per block (static + dynamic)
NO_OPT_IN_SHARED = 48 * 1024
PINNED_PTX = {80: 80, 86: 80, 87: 80, 89: 80, 90: 80}   # compute capability -> PTX ISA version
FP_FUSION = True   # Triton 3.9 warns that its default flips in 3.10: say it explicitly


def _triton():
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        raise BackendUnavailable("TRITON_INTERPRET is set: the kernels are interpreted functions and cannot be "
                                 "compiled ahead of time (unset it for `jambatrt plugins`)")
    try:
        import triton
        from triton.backends.compiler import GPUTarget
    except ImportError as e:
        raise BackendUnavailable(f"Triton not installed ({e}): pip install 'jambatrt[gpu]'") from None
    return triton, GPUTarget


def parse_arch(text: str) -> int:
    """"sm_90" / "sm_90a" / "90" / "9.0" -> 90."""
    m = re.fullmatch(r"(?:sm_?)?(\d+)(?:\.(\d))?a?", text.strip().lower())
    if not m:
        raise InputError(f"arch {text!r} (accepted: sm_80, sm_86, sm_89, sm_90, ... or a compute capability)")
    return int(m.group(1)) * 10 + int(m.group(2)) if m.group(2) else int(m.group(1))


@dataclass(frozen=True)
class ArchLimits:
    """Per-SM and per-block limits of one compute capability (CUDA programming guide, "Technical
    Specifications per Compute Capability"), the inputs of the occupancy calculation."""

    regs_per_sm: int = 65536
    reg_unit: int = 256              # registers are allocated per warp in units of 256
    max_regs_per_thread: int = 255
    threads_per_sm: int = 2048
    blocks_per_sm: int = 32
    shared_per_sm: int = 167936      # bytes usable by blocks
    shared_per_block: int = 166912   # most one block may use (opted in)
    reserved_shared: int = 1024      # the CUDA runtime's share of every block


ARCH_LIMITS = {
    80: ArchLimits(),
    86: ArchLimits(threads_per_sm=1536, blocks_per_sm=16, shared_per_sm=102400, shared_per_block=101376),
    89: ArchLimits(threads_per_sm=1536, blocks_per_sm=24, shared_per_sm=102400, shared_per_block=101376),
    90: ArchLimits(shared_per_sm=233472, shared_per_block=232448),
}


def occupancy(cc: int, registers: int, threads: int, shared_bytes: int) -> dict:
    """Theoretical occupancy of one kernel: resident blocks and warps per SM and what limits them.
    shared_bytes: the block's static + dynamic shared memory."""
    lim = ARCH_LIMITS[cc]
    warps = -(-threads // 32)
    regs_per_warp = -(-max(registers, 1) * 32 // lim.reg_unit) * lim.reg_unit
    by = {"blocks": lim.blocks_per_sm, "threads": lim.threads_per_sm // threads,
          "registers": (lim.regs_per_sm // regs_per_warp) // warps,
          "shared": lim.shared_per_sm // (shared_bytes + lim.reserved_shared)}
    blocks = min(by.values())
    return {"blocks_per_sm": blocks, "warps_per_sm": blocks * warps,
            "occupancy": round(blocks * warps * 32 / lim.threads_per_sm, 3),
            "limited_by": min(by, key=lambda k: (by[k], k != "registers"))}


def resource_problems(entry: dict) -> list[str]:
    """What keeps a compiled kernel (an index entry) from running well or at all: spills (a stack
    frame: Triton kernels have none unless registers spill), shared memory over the architecture's
    per-block limit or over what TensorRT's AOT launch gives without opting in."""
    r, cc = entry.get("resources"), parse_arch(entry["arch"])
    where = f"{entry['arch']} {entry['kernel']}"
    if r is None:
        return [f"{where}: no resource usage (cuobjdump missing)"]
    out = []
    if r["stack"] or r["local"]:
        out.append(f"{where}: spills ({r['registers']} registers, {r['stack']} B stack frame, {r['local']} B local)")
    shared = entry["shared_bytes"] + r["shared"]
    if shared > ARCH_LIMITS[cc].shared_per_block:
        out.append(f"{where}: {shared} B shared memory > the {ARCH_LIMITS[cc].shared_per_block} B an {entry['arch']} "
                   "block can have")
    if shared > NO_OPT_IN_SHARED:
        out.append(f"{where}: {shared} B shared memory > {NO_OPT_IN_SHARED} B (TensorRT's AOT launch does not opt in)")
    return out


def kernels_for_config(cfg, dtypes=("bfloat16", "float32")) -> list:
    """The kernel variants a model launches: the constexprs that come from its dims (d_state, conv
    width, top-k of n experts, head_dim); hidden and expert sizes are run-time arguments. Each op's
    variants come from its registered GPU implementation (`aot=`, plugins/registry.py); cfg None:
    Jamba's dims."""
    from jambatrt.plugins.registry import implementations
    return [k for impls in implementations("gpu").values() for k in impls[0].extra["aot"](dtypes, cfg)]


def all_kernels(dtypes=("bfloat16", "float32")) -> list:
    """Every kernel variant of every op, with the default tile sizes and Jamba's dims where a
    constexpr needs one (d_state 16, d_conv 4, top-2 of 16 experts, head_dim 128)."""
    return kernels_for_config(None, dtypes)


def compile_kernel(spec, cc: int):
    """Compile one KernelSpec for compute capability `cc` -> triton CompiledKernel (no GPU needed)."""
    triton, GPUTarget = _triton()
    options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages, "enable_fp_fusion": FP_FUSION}
    if cc in PINNED_PTX:
        options["ptx_version"] = PINNED_PTX[cc]
    src = triton.compiler.ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs,
                                    attrs=spec.attrs or None)
    return triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)


def check_scratch(spec, compiled) -> dict:
    md = compiled.metadata
    sizes = {"global_scratch": int(getattr(md, "global_scratch_size", 0) or 0),
             "profile_scratch": int(getattr(md, "profile_scratch_size", 0) or 0)}
    if any(sizes.values()):
        raise BackendUnavailable(f"kernel {spec.name} needs scratch memory {sizes}; TensorRT's AOT launch passes "
                                 f"no scratch buffers, so it cannot run there")
    return sizes


def resource_usage(cubin_path: Path) -> dict | None:
    """Registers / spills from the cuobjdump Triton bundles (None where it is missing)."""
    try:
        import triton
        tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        if not tool.exists():
            return None
        out = subprocess.run([str(tool), "--dump-resource-usage", str(cubin_path)], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    return None if not m else {"registers": int(m[1]), "stack": int(m[2]), "shared": int(m[3]), "local": int(m[4])}


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _compile_one(args):
    """Worker: compile one (variant, arch) and write its files; returns the index entry."""
    dtypes, name, cc, out = args
    spec = next(k for k in all_kernels(dtypes) if k.name == name)
    compiled = compile_kernel(spec, cc)
    scratch = check_scratch(spec, compiled)
    arch = f"sm_{cc}"
    d = Path(out) / arch
    d.mkdir(parents=True, exist_ok=True)
    ptx = compiled.asm["ptx"]
    ptx_bytes = ptx.encode() if isinstance(ptx, str) else ptx
    cubin = compiled.asm.get("cubin")
    files, sha = {"ptx": f"{arch}/{spec.name}.ptx"}, {}
    (Path(out) / files["ptx"]).write_bytes(ptx_bytes)
    sha["ptx"] = _sha256(ptx_bytes)
    if cubin:
        files["cubin"] = f"{arch}/{spec.name}.cubin"
        (Path(out) / files["cubin"]).write_bytes(cubin)
        sha["cubin"] = _sha256(cubin)
    text = ptx_bytes.decode(errors="replace")
    version = re.search(r"^\.version\s+(\S+)", text, re.M)
    target = re.search(r"^\.target\s+(\S+)", text, re.M)
    md = compiled.metadata
    resources = resource_usage(Path(out) / files["cubin"]) if cubin else None
    if resources is not None:
        resources["occupancy"] = occupancy(cc, resources["registers"], md.num_warps * 32,
                                           md.shared + resources["shared"])
    return {
        "kernel": spec.name, "op": spec.op, "function": md.name, "arch": arch,
        "ptx_target": target[1] if target else None, "ptx_version": version[1] if version else None,
        "signature": spec.signature, "constexprs": spec.constexprs,
        "params": {"inputs": list(spec.inputs), "extras": list(spec.extras), "outputs": list(spec.outputs),
                   "hidden": ["global_scratch", "profile_scratch"]},
        "num_warps": md.num_warps, "num_stages": spec.num_stages, "block": [md.num_warps * 32, 1, 1],
        "shared_bytes": md.shared, "scratch_bytes": scratch, "grid": spec.grid, "notes": spec.notes,
        "resources": resources,
        "files": files, "sha256": sha,
    }


def write_plugins(out: str | Path, archs: list[str], dtypes=("bfloat16", "float32"), jobs: int | None = None,
                  force: bool = False, progress=lambda msg: None) -> dict:
    """Compile every kernel for every arch into `out` (atomically: a temp dir renamed into place).
    Returns the index (also written to out/index.json)."""
    triton, _ = _triton()
    from jambatrt.artifact import atomic_dir, write_json_atomic
    ccs = sorted({parse_arch(a) for a in archs})
    if not ccs:
        raise InputError("no --arch given (accepted: e.g. sm_80,sm_90)")
    if min(ccs) < 80:
        raise InputError(f"sm_{min(ccs)}: bf16 tensor-core kernels need sm_80 or newer (accepted: sm_80, sm_90, ...)")
    names = [k.name for k in all_kernels(dtypes)]
    work = [(tuple(dtypes), n, cc) for cc in ccs for n in names]
    jobs = max(1, min(jobs or os.cpu_count() or 1, len(work)))
    with atomic_dir(out, force=force) as tmp:
        entries = []
        if jobs == 1:
            for i, (dt, n, cc) in enumerate(work):
                progress(f"[{i + 1}/{len(work)}] sm_{cc} {n}")
                entries.append(_compile_one((dt, n, cc, str(tmp))))
        else:
            import multiprocessing
            with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
                for i, e in enumerate(pool.map(_compile_one, [(dt, n, cc, str(tmp)) for dt, n, cc in work])):
                    progress(f"[{i + 1}/{len(work)}] {e['arch']} {e['kernel']}")
                    entries.append(e)
        index = {"format_version": FORMAT_VERSION, "triton_version": triton.__version__,
                 "archs": [f"sm_{cc}" for cc in ccs], "dtypes": list(dtypes), "fp_fusion": FP_FUSION,
                 "kernels": entries}
        write_json_atomic(tmp / "index.json", index)
    return index

