"""GPU check of the AOTInductor engine (engines/aoti.py, issue 9) on a CUDA machine — one prepared
run, < 8 minutes on an H100/H200.

    python -m jambatrt.validate.aoti_gpu_check [--budget-s 430] [--mini-layers 3] [--skip-hf] [--skip-mini]

1. tiny preset artifact (float32) -> `AotiEngine.build(device="cuda")`: the manifest entry (GPU
   arch, torch/triton versions, our Triton kernels compiled into the package, no jamba op left
   as a Python callback) and parity of prefill at 1, 4096, 65536 tokens (chunked by the plan,
   state carried) against the eager reference (validate.reference, `<op>_ref` on CPU) with the
   tolerances of validate.parity / validate.health, plus 4 greedy decode steps;
2. bench preset (float32): prefill tok/s at 4096 and decode tok/s (32 steps after 4096) of the
   AOTI engine vs eager: transformers' JambaForCausalLM on the GPU (its torch scan: no mamba-ssm
   there), if transformers is installed, and this package's JambaLM running the Triton kernels
   eagerly (the same kernels, uncompiled graph);
3. a Jamba-1.5-Mini-sized layer stack (hidden 4096, d_inner 8192, 16 experts x 14336 int8, 32/8
   heads, vocab 65536; `--mini-layers` layers: Mamba, MoE and one attention layer; random
   weights; bf16) compiled the same way, prefilled at 32,768 and 262,144 tokens on the device in
   the plan's chunks, with tok/s and peak GPU memory, then 8 decode steps at 262,144 past.

Prints one JSON summary (and writes $OUT/aoti_gpu_check.json when OUT is set). Exit status 1 when
a parity check fails or a section raises; sections past the time budget are skipped and listed.
Needs the repository, torch with CUDA and triton (Python 3.11/3.12, torch 2.11+, triton 3.6+); no
network, no TensorRT, no polygraphy; the package installed (`pip install -e .`: `make setup`)."""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.pop("TRITON_INTERPRET", None)          # the kernels must be compiled, not interpreted
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import jambatrt  # noqa: E402,F401  (before torch: OpenMP wait settings, threads.py)
import numpy as np  # noqa: E402
import torch  # noqa: E402

T0 = time.perf_counter()
SUMMARY: dict = {"device": None, "tiny": {}, "bench": {}, "mini_stack": {}, "skipped": [], "errors": []}
WORK = Path(tempfile.mkdtemp(prefix="aoti-gpu-check-"))
# --cpu-dry-run: the same code paths on CPU with a cpu package and tiny sizes (to test this script
# without a GPU; nothing measured means anything)
DRY = "--cpu-dry-run" in sys.argv
DEV = "cpu" if DRY else "cuda"


def log(msg: str) -> None:
    print(f"[{time.perf_counter() - T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def section(name: str, budget_s: float, needs_s: float):
    """Run the decorated section unless fewer than needs_s seconds of the budget are left."""
    def wrap(fn):
        def run(*a, **k):
            left = budget_s - (time.perf_counter() - T0)
            if left < needs_s:
                SUMMARY["skipped"].append({"section": name, "reason": f"{left:.0f} s of the budget left, "
                                                                      f"needs ~{needs_s:.0f} s"})
                log(f"SKIP {name}: {left:.0f} s left")
                return None
            log(f"== {name}")
            try:
                return fn(*a, **k)
            except Exception as e:   # keep going: one failing section must not hide the others
                SUMMARY["errors"].append({"section": name, "error": f"{type(e).__name__}: {e}",
                                          "trace": traceback.format_exc()[-3000:]})
                log(f"ERROR {name}: {type(e).__name__}: {e}")
                return None
        return run
    return wrap


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def cuda_mem(name: str) -> int:
    """torch.cuda.<name>() (memory_allocated, max_memory_allocated, ...); 0 in a CPU dry run."""
    return getattr(torch.cuda, name)() if DEV == "cuda" else 0


def reset_peak() -> None:
    if DEV == "cuda":
        torch.cuda.reset_peak_memory_stats()


def empty_cache() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def make_artifact(preset: str, out: Path, dtype=torch.float32) -> Path:
    """An artifact as `jambatrt export` writes it, without model.onnx (the aoti engine reads step.pt2;
    ONNX tooling need not exist on this machine)."""
    from jambatrt.artifact import atomic_dir, record_files
    from jambatrt.export.run import export_stage

    with atomic_dir(out, force=True) as tmp:
        manifest, known = export_stage(tmp, preset_name=preset, dtype=dtype, onnx=False)
        record_files(tmp, manifest, [p.name for p in tmp.iterdir() if p.is_file() and not p.name.startswith(".")
                                     and p.name != "manifest.json"], known=known)
    return out


def build(art: Path) -> tuple[dict, float]:
    from jambatrt.engines.aoti import AotiEngine

    t = time.perf_counter()
    entry = AotiEngine.build(art, device=DEV)
    return entry, time.perf_counter() - t


# ---- 1. tiny: build + parity ----------------------------------------------------------------------
def check_tiny(lengths: list[int]) -> None:
    from jambatrt.engines.aoti import AotiEngine
    from jambatrt.validate.health import STATE_TOLERANCES
    from jambatrt.validate.parity import TOLERANCES
    from jambatrt.validate.reference import make_reference

    out = SUMMARY["tiny"]
    art = make_artifact("tiny", WORK / "tiny")
    entry, secs = build(art)
    out["build_seconds"] = round(secs, 1)
    out["entry"] = {k: entry.get(k) for k in ("device", "gpu", "torch", "triton", "python", "triton_kernels",
                                              "python_ops", "max_batch", "max_seq")}
    out["entry"]["chunk"] = entry["chunk_plan"]["chunk"]
    from jambatrt.plugins.gpu.torch_ops import traced_kernels
    want_kernels = sorted({k for ks in traced_kernels().values() for k in ks})
    python_ops = [o for o in entry["python_ops"] if o.startswith("jamba::")]
    if DEV == "cuda":     # no jamba op called back through Python (the build refuses that too)
        out["package_ok"] = not python_ops
        # our kernel names found in the package's sources (informational: found by name only)
        out["kernels_not_found_by_name"] = sorted(set(want_kernels) - set(entry["triton_kernels"]))
    else:                 # a cpu package calls every jamba op back through Python
        out["package_ok"] = bool(python_ops)
    log(f"built in {secs:.1f} s: kernels {entry['triton_kernels']}, python ops {entry['python_ops']}")
    engine = AotiEngine.load(art)
    ref = make_reference("eager", art)
    tol, stol = TOLERANCES["float32"], STATE_TOLERANCES["float32"]
    names = [o.name for o in engine.step_program.outputs[1:]]
    rng = np.random.default_rng(0)
    rows = []
    for L in lengths:
        ids = rng.integers(0, engine.config.vocab_size, (1, L))
        engine.prefill(ids[:, :min(L, 64)])       # warm (first call per shape range)
        t = time.perf_counter()
        logits, state = engine.prefill(ids)
        t_eng = time.perf_counter() - t
        t = time.perf_counter()
        r_logits, r_state, _ = ref.prefill_with_state(ids)
        t_ref = time.perf_counter() - t
        err = np.abs(logits.astype(np.float64) - r_logits)
        excess = float((err - (tol["atol"] + tol["rtol"] * np.abs(r_logits))).max())
        top1 = float((logits.argmax(-1) == r_logits.argmax(-1)).mean())
        s_err = {}
        s_ok = True
        for n, s in zip(names, state):
            if r_state and n in r_state:
                e = np.abs(s.astype(np.float64) - r_state[n])
                s_err[n] = float(e.max()) if e.size else 0.0
                s_ok &= bool((e <= stol["atol"] + stol["rtol"] * np.abs(r_state[n])).all())
        ok = excess <= 0 and top1 >= tol["top1"] and s_ok and bool(np.isfinite(logits).all())
        rows.append({"length": L, "max_abs_err": float(err.max()), "mean_abs_err": float(err.mean()),
                     "top1_agreement": top1, "state_max_abs_err": max(s_err.values(), default=None),
                     "passed": ok, "seconds": {"engine": round(t_eng, 3), "reference": round(t_ref, 3)}})
        log(f"parity L={L}: max|diff| {err.max():.2e} top-1 {top1:.4f} states "
            f"{max(s_err.values(), default=0):.2e} engine {t_eng:.3f}s ref {t_ref:.1f}s {'ok' if ok else 'FAIL'}")
    out["parity"] = rows
    # greedy decode: 4 engine decode steps vs one reference prefill of prompt + generated tokens
    ids = rng.integers(0, engine.config.vocab_size, (1, lengths[1]))
    last, state = engine.prefill(ids, last_only=True)
    toks, dec = [], []
    for _ in range(4):
        toks.append(int(last[0].argmax()))
        last, state = engine.decode(np.array([toks[-1]]), state)
        dec.append(last[0])
    full = np.concatenate([ids, np.array([toks])], axis=1)
    r = ref.prefill(full)[0, -4:]
    err = float(np.abs(np.stack(dec) - r).max())
    out["decode"] = {"steps": 4, "max_abs_err": err, "passed": err <= 1e-3 and
                     bool((np.stack(dec).argmax(-1) == r.argmax(-1)).all())}
    log(f"decode parity: max|diff| {err:.2e}")
    engine.close()


# ---- 2. bench: tok/s vs eager ----------------------------------------------------------------------
def _time(fn, reps: int) -> float:
    """Median seconds of fn() over reps runs (synchronised)."""
    times = []
    for _ in range(reps):
        sync()
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench(L: int, decode_steps: int, skip_hf: bool) -> None:
    from jambatrt.engines.aoti import AotiEngine
    from jambatrt.engines.base import to_torch
    from jambatrt.manifest import Manifest
    from jambatrt.export.weights import load_artifact_model
    from jambatrt.validate.reference import hf_checkpoint
    from jambatrt.export.model import state_shapes

    out = SUMMARY["bench"]
    art = make_artifact("bench", WORK / "bench")
    entry, secs = build(art)
    out["build_seconds"] = round(secs, 1)
    engine = AotiEngine.load(art)
    V = engine.config.vocab_size
    ids = np.random.default_rng(1).integers(0, V, (1, L))
    engine.prefill(ids[:, :256])
    t_pre = _time(lambda: engine.prefill(ids, last_only=True), 3)
    last, state = engine.prefill(ids, last_only=True)
    engine.decode(np.array([1]), state)

    def decode_loop():              # the numpy Engine API: the state goes to the host and back every step
        s = state
        for _ in range(decode_steps):
            _, s = engine.decode(np.array([1]), s)
    t_dec = _time(decode_loop, 1)
    tok = to_torch(np.array([[1]], dtype=np.int64), engine.device)
    dev_state = [to_torch(a, engine.device) for a in state]

    def decode_loop_device():       # the serving path (run_step_torch): the state stays on the device
        s = dev_state
        with torch.inference_mode():
            for _ in range(decode_steps):
                _, s = engine.run_step_torch(tok, s)
    decode_loop_device()
    t_dev = _time(decode_loop_device, 1)
    out["aoti"] = {"prefill_tokens_per_s": L / t_pre, "decode_tokens_per_s": decode_steps / t_dev,
                   "decode_tokens_per_s_numpy_api": decode_steps / t_dec,
                   "prefill_seconds": t_pre, "length": L, "chunk": entry["chunk_plan"]["chunk"]}
    log(f"aoti: prefill {L / t_pre:,.0f} tok/s, decode {decode_steps / t_dev:,.1f} tok/s (state on the device; "
        f"{decode_steps / t_dec:,.1f} through the numpy API)")
    engine.close()

    # this package's eager model with the Triton kernels as the ops' CUDA implementation
    model = load_artifact_model(art).to(DEV)
    ids_t = torch.from_numpy(ids).to(DEV)
    zero = [torch.zeros(s, dtype=d or torch.float32, device=DEV) for _, s, d in state_shapes(model.config, 1, 0)]
    with torch.inference_mode():
        model(ids_t[:, :256], zero)
        t_pre = _time(lambda: model(ids_t, zero), 2)
        _, st = model(ids_t, zero)

        def eager_decode():
            s, tok = st, ids_t[:, :1]
            for _ in range(decode_steps):
                _, s = model(tok, s)
        t_dec = _time(eager_decode, 1)
    out["eager_triton_kernels"] = {"prefill_tokens_per_s": L / t_pre, "decode_tokens_per_s": decode_steps / t_dec}
    log(f"eager (Triton kernels): prefill {L / t_pre:,.0f} tok/s, decode {decode_steps / t_dec:,.1f} tok/s")
    del model
    empty_cache()

    if skip_hf:
        SUMMARY["skipped"].append({"section": "bench transformers", "reason": "--skip-hf"})
        return
    try:
        import transformers
    except ImportError:
        SUMMARY["skipped"].append({"section": "bench transformers", "reason": "transformers not installed"})
        return
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as d:    # the artifact's weights in HF's layout, for transformers
        hf_ckpt = hf_checkpoint(Manifest.read(art), Path(d) / "hf")
        hf = transformers.JambaForCausalLM.from_pretrained(str(hf_ckpt), dtype=torch.float32).to(DEV).eval()
    mask = torch.ones_like(ids_t)
    with torch.inference_mode():
        hf(ids_t[:, :64])
        t_pre = _time(lambda: hf(ids_t, attention_mask=mask, use_cache=False), 1)
        gen = dict(do_sample=False, attention_mask=mask, pad_token_id=0)
        t1 = _time(lambda: hf.generate(ids_t, max_new_tokens=1, min_new_tokens=1, **gen), 1)
        tn = _time(lambda: hf.generate(ids_t, max_new_tokens=decode_steps + 1, min_new_tokens=decode_steps + 1,
                                       **gen), 1)
    out["transformers_eager"] = {"prefill_tokens_per_s": L / t_pre,
                                 "decode_tokens_per_s": decode_steps / max(tn - t1, 1e-9),
                                 "version": transformers.__version__,
                                 "note": "decode = extra time of generate(N+1) over generate(1)"}
    log(f"transformers: prefill {L / t_pre:,.0f} tok/s, decode {decode_steps / max(tn - t1, 1e-9):,.1f} tok/s")
    out["speedup_vs_transformers"] = {
        "prefill": out["aoti"]["prefill_tokens_per_s"] / out["transformers_eager"]["prefill_tokens_per_s"],
        "decode": out["aoti"]["decode_tokens_per_s"] / out["transformers_eager"]["decode_tokens_per_s"]}
    del hf
    empty_cache()


# ---- 3. a Mini-sized stack at 32K and 256K --------------------------------------------------------
def mini_stack(layers: int, lengths: list[int], decode_steps: int) -> None:
    from jambatrt.config import preset
    from jambatrt.engines.aoti import compile_package
    from jambatrt.engines.chunking import plan_chunks
    from jambatrt.export.model import JambaLM, state_shapes
    from jambatrt.export.trace import export_step

    out = SUMMARY["mini_stack"]
    # Mamba + MLP, Mamba + MoE, attention + MLP, Mamba + MoE, ... (3 layers hold every kind; ~6 GB)
    cfg = preset("tiny" if DRY else "jamba-1.5-mini", num_hidden_layers=layers, attn_layer_period=4,
                 attn_layer_offset=2, max_position_embeddings=262144)
    out["config"] = {"layers": layers, "attention_layers": cfg.attention_layers, "hidden": cfg.hidden_size,
                     "d_inner": cfg.d_inner, "experts": cfg.num_experts, "intermediate": cfg.intermediate_size,
                     "vocab": cfg.vocab_size, "dtype": "bfloat16", "experts_int8": True}
    t = time.perf_counter()
    torch.manual_seed(0)
    model = JambaLM(cfg, experts_int8=True, dtype=torch.bfloat16).eval().requires_grad_(False)
    for m in model.modules():     # small random weights: finite activations, meaningful routing
        if isinstance(m, (torch.nn.Linear, torch.nn.Embedding)):
            m.weight.normal_(0, 0.02)
    ep = export_step(model, max_seq=cfg.max_position_embeddings, max_batch=2)   # export's example has batch 2
    del model
    gc.collect()
    if DEV == "cuda":
        from torch.export.passes import move_to_device_pass
        ep = move_to_device_pass(ep, "cuda")
    H, I = cfg.hidden_size, cfg.intermediate_size
    for name, w in ep.state_dict.items():       # random int8 experts, made on the GPU
        if w.dtype == torch.int8:
            w.copy_(torch.randint(-127, 128, w.shape, dtype=torch.int8, device=w.device))
        elif name.endswith("w13_scale"):
            w.fill_(1.0 / (127 * H ** 0.5))
        elif name.endswith("w2_scale"):
            w.fill_(1.0 / (127 * I ** 0.5))
    out["export_seconds"] = round(time.perf_counter() - t, 1)
    t = time.perf_counter()
    pkg = WORK / "mini_stack.pt2"
    info = compile_package(ep, DEV, pkg)
    out["compile_seconds"] = round(time.perf_counter() - t, 1)
    out["package_bytes"] = pkg.stat().st_size
    out["triton_kernels"], out["python_ops"] = info["triton_kernels"], info["fallback_ops"]
    log(f"mini stack compiled in {out['compile_seconds']} s ({pkg.stat().st_size / 1e9:.1f} GB)")
    del ep
    empty_cache()
    runner = torch._inductor.aoti_load_package(str(pkg))
    sync()
    out["weights_resident_bytes"] = cuda_mem("memory_allocated")
    chunk = plan_chunks(cfg, max(lengths), 1).chunk
    out["chunk"] = chunk
    V = cfg.vocab_size
    rows = []
    with torch.inference_mode():
        runner(torch.zeros(1, 16, dtype=torch.long, device=DEV),
               [torch.zeros(s, dtype=d or torch.bfloat16, device=DEV) for _, s, d in state_shapes(cfg, 1, 0)])
        for L in lengths:
            state = [torch.zeros(s, dtype=d or torch.bfloat16, device=DEV) for _, s, d in state_shapes(cfg, 1, 0)]
            ids = torch.randint(0, V, (1, L), device=DEV)
            empty_cache()
            sync()
            reset_peak()
            base = cuda_mem("memory_allocated")
            t = time.perf_counter()
            for s in range(0, L, chunk):
                outs = runner(ids[:, s:s + chunk].contiguous(), state)
                last, state = outs[0][:, -1], list(outs[1:])
                del outs
            sync()
            secs = time.perf_counter() - t
            finite = bool(torch.isfinite(last.float()).all())
            peak = cuda_mem("max_memory_allocated")
            row = {"length": L, "mode": "prefill", "seconds": round(secs, 3), "tokens_per_s": L / secs,
                   "peak_allocated_bytes": peak, "peak_above_weights_bytes": peak - base,
                   "peak_reserved_bytes": cuda_mem("max_memory_reserved"), "finite_logits": finite}
            gib = 2 ** 30
            log(f"mini stack prefill L={L:,}: {secs:.2f} s, {L / secs:,.0f} tok/s, peak "
                f"{row['peak_allocated_bytes'] / gib:.1f} GiB "
                f"({row['peak_above_weights_bytes'] / gib:.1f} above weights)")
            rows.append(row)
            tok = last.argmax(-1, keepdim=True)
            reset_peak()
            t = time.perf_counter()
            for _ in range(decode_steps):
                outs = runner(tok, state)
                tok, state = outs[0][:, -1].argmax(-1, keepdim=True), list(outs[1:])
                del outs
            sync()
            secs = time.perf_counter() - t
            rows.append({"length": L, "mode": "decode", "steps": decode_steps, "tokens_per_s": decode_steps / secs,
                         "peak_allocated_bytes": cuda_mem("max_memory_allocated")})
            log(f"mini stack decode at {L:,} past: {decode_steps / secs:,.1f} tok/s")
            del state, ids
    out["results"] = rows
    del runner
    empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--budget-s", type=float, default=430.0, help="wall-clock budget; later sections are skipped")
    ap.add_argument("--mini-layers", type=int, default=3,
                    help="layers of the Mini-sized stack (default 3: Mamba + MLP, Mamba + MoE, attention + MLP)")
    ap.add_argument("--skip-hf", action="store_true", help="no transformers baseline")
    ap.add_argument("--skip-mini", action="store_true", help="no Mini-sized stack")
    ap.add_argument("--cpu-dry-run", action="store_true",
                    help="run the same code paths on CPU (cpu packages, tiny sizes) to test this script")
    a = ap.parse_args()
    if not DRY and not torch.cuda.is_available():
        print(json.dumps({"error": "no CUDA GPU visible"}))
        return 2
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    SUMMARY["device"] = {"torch": torch.__version__, "triton": triton_version, "python": sys.version.split()[0]}
    if DRY:
        SUMMARY["device"].update(name="cpu (dry run)", dry_run=True)
    else:
        SUMMARY["device"].update(name=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                                 memory_bytes=torch.cuda.get_device_properties(0).total_memory)
    log(f"{SUMMARY['device']}")
    section("tiny build + parity", a.budget_s, 60)(check_tiny)([1, 300, 1000] if DRY else [1, 4096, 65536])
    section("bench tok/s", a.budget_s, 90)(bench)(512 if DRY else 4096, 4 if DRY else 32, a.skip_hf)
    if a.skip_mini:
        SUMMARY["skipped"].append({"section": "mini stack", "reason": "--skip-mini"})
    else:
        section("mini stack 32K / 256K", a.budget_s, 150)(mini_stack)(
            a.mini_layers, [1000, 3000] if DRY else [32768, 262144], 8)
    tiny = SUMMARY["tiny"]
    parity = tiny.get("parity") or []
    ok = (not SUMMARY["errors"] and tiny.get("package_ok") and parity and all(r["passed"] for r in parity)
          and tiny.get("decode", {}).get("passed"))
    SUMMARY["passed"] = bool(ok)
    SUMMARY["seconds"] = round(time.perf_counter() - T0, 1)
    text = json.dumps(SUMMARY, indent=1, default=str)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], "aoti_gpu_check.json").write_text(text)
    print(text)
    return 0 if ok else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    finally:
        import shutil
        shutil.rmtree(WORK, ignore_errors=True)
